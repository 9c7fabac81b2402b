"""Mini-batch training of a @tdc.model: the loop behind `tdc train`.

    result = train("examples/digits.py", data="digits", epochs=5, batch=32,
                   optimizer=Optimizer("adam", lr=2e-3), checkpoint="ckpt")
    print(result.summary())

Every step runs the single training graph from `train_step` (forward, loss,
backward, update) on one batch. The data order of epoch e is a permutation drawn
from (seed, e), so a run resumed from a checkpoint in the middle of an epoch
recomputes it and sees the same batches; with the state restored bit for bit, the
resumed losses equal those of an uninterrupted run exactly.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..backends import compile as compile_graph
from ..backends.comm import World1, check_world, communicator, fail_job, launched_ranks, survive_lost_ranks
from ..errors import TdcError
from ..ir.printer import print_graph
from ..passes.data_parallel import DataParallel
from ..frontend.model import Model
from ..passes.optimizer import SLOTS, Optimizer
from ..passes.quantize import RANGE_SUFFIXES, learned_ranges, quantize_int8
from ..passes.sparsify import dense_params, sparse_training
from ..passes.training import LOSSES, train_step
from .checkpoint import LAST, check_compatible, check_settings, load_checkpoint, save_checkpoint
from .data import Dataset, check_labels, fit_to_model, load_data
from .launch import (add_parallel_arguments, announce_rank, attach_rank_output, launch, needs_launch,
                     parallel_config)
from .hogwild import make_runners, run_steps
from .staged import StagedStep, staged
from ..passes.parameter_server import ParameterServer
from ..passes.partition import Partition
from ..frontend.init import whole_params
from .schedule import SCHEDULES, Schedule, make_schedule
from .profile import host_peak, profile_table
from .prune import SCOPES, Prune, mask_names, prune_state, sparsity_report
from ..files import atomic_write, check_output_dir, check_output_file
from ..ir.weights import save_npz

# Adam at 2e-3 beat 1e-3 on the digits CNN (batch 16-64, 8-12 epochs); the others are common starting points.
DEFAULT_EPOCHS = 10
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.01, "nesterov": 0.01, "adagrad": 0.01, "rmsprop": 1e-3, "adam": 2e-3,
              "adamw": 2e-3}


@dataclass
class TrainResult:
    losses: np.ndarray              # float32 loss of every step run by this call, in order
    first_step: int                 # global step number of losses[0] (> 0 after a resume)
    step: int                       # steps completed in all, including before a resume
    epoch: int                      # epochs completed
    epochs: int                     # epochs asked for
    test_accuracy: float
    test_loss: float
    correct: int
    total: int
    seconds: float
    history: list[dict] = field(default_factory=list)   # the evaluation records
    state: dict[str, np.ndarray] = field(default_factory=dict)
    rank: int = 0                   # this process's rank; only rank 0 evaluates
    servers: list = field(default_factory=list)   # parameter servers' ServerStats (on rank 0)
    role: str = "worker"            # "server" on a parameter server's rank (it trains nothing itself)
    sparsity: float | None = None   # with pruning: the fraction of the prunable weights that are zero
    int8_accuracy: float | None = None   # with QAT: the int8 graph's test accuracy over the learned ranges

    def summary(self) -> str:
        if self.role == "server":
            return f"parameter server rank {self.rank}: served its workers, {self.seconds:.1f} s"
        done = (f"{self.epoch} epoch{'' if self.epoch == 1 else 's'}" if self.epoch >= self.epochs
                else f"{self.step} steps")
        pruned = f", pruned weights sparsity {self.sparsity:.4f}" if self.sparsity is not None else ""
        int8 = "" if self.int8_accuracy is None else \
            f", int8 test accuracy {self.int8_accuracy:.4f} (learned ranges)"
        return (f"test accuracy {self.test_accuracy:.4f} ({self.correct}/{self.total}) "
                f"after {done}{pruned}{int8}, {self.seconds:.1f} s")


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of epoch `epoch`: a function of (seed, epoch) only, so it can be recomputed."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(n)


def _as_model(model) -> Model:
    if isinstance(model, Model):
        return model
    from .loader import Source
    src = Source(model)
    if src.model is None:
        kind = "an ONNX file" if str(model).endswith(".onnx") else "an IR file"
        raise TdcError(f"{model}: tdc train needs a Python model (FILE.py[:NAME]) that can be traced in training "
                       f"mode at any batch size; {kind} is one fixed graph")
    return src.model


def _targets(y: np.ndarray, loss: str, num_classes: int, dtype) -> np.ndarray:
    if loss == "mse":
        return (y[:, None] == np.arange(num_classes)).astype(dtype)
    return y


def evaluate(exe, input_name: str, output: str, x: np.ndarray, y: np.ndarray, batch: int,
             loss: str = "softmax_cross_entropy") -> tuple[int, float]:
    """(correct predictions, mean loss) over all of x with an inference executable of fixed `batch`.
    The last batch is padded with zeros and its padded rows ignored, so every sample counts once."""
    logits = []
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        k = len(xb)
        if k < batch:
            xb = np.concatenate([xb, np.zeros((batch - k,) + xb.shape[1:], xb.dtype)])
        logits.append(exe(**{input_name: xb})[output][:k])
    z = np.concatenate(logits).astype(np.float64)
    correct = int(np.sum(np.argmax(z, axis=1) == y))
    if loss == "mse":
        value = float(np.mean((z - _targets(y, "mse", z.shape[1], np.float64)) ** 2))
    else:
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        value = float(-logp[np.arange(len(y)), y].mean())
    return correct, value


def compile_progress(what: str, out=None):
    """A `progress(done, total)` for tdc.compile: a line on a terminal that counts the kernels,
    and on anything else one line at the end when the compile took more than a second."""
    t0 = time.perf_counter()
    out = out or sys.stderr

    def report(done: int, total: int):
        if out.isatty():
            print(f"\rcompiling {what}: {done}/{total} kernels", end="\n" if done == total else "", file=out, flush=True)
        elif done == total and time.perf_counter() - t0 > 1.0:
            print(f"compiled {what}: {total} kernels in {time.perf_counter() - t0:.1f} s", file=out, flush=True)
    return report


class _Progress:
    """A tqdm bar per epoch when tqdm is importable and wanted; otherwise nothing (epoch lines still print)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                            file=sys.stderr, dynamic_ncols=True)

    def update(self, loss: float, acc: float, rate: float):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", samples_s=f"{rate:.0f}", refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _read_metrics(path: str, step: int, epoch: int) -> list[dict]:
    """The records of `path` up to a checkpoint at (step, epochs completed): later ones are redone
    by the resumed run. A line cut short by a kill is dropped."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if not isinstance(r, dict):
                continue
            if ("test_accuracy" in r and r.get("epoch", 0) <= epoch) or \
               ("test_accuracy" not in r and r.get("step", 0) <= step):
                kept.append(r)
    return kept


def _write_plot(path: str, records: list[dict], out) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out(f"note: matplotlib is not installed; not writing {path} (pip install matplotlib)")
        return
    steps = [r for r in records if "test_accuracy" not in r]
    evals = [r for r in records if "test_accuracy" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="training loss (batch)")
    ax1.plot([r["step"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test loss")
    ax1.set_xlabel("step")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.plot([r["epoch"] for r in evals], [r["test_accuracy"] for r in evals], "o-")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _initial_weights(args) -> dict | None:
    """tdc train --weights: the model's params and state from a file, checked against its graph."""
    if not args.weights:
        if args.sparse == "on":
            raise TdcError("--sparse on retrains pruned weights: give them with --weights FILE")
        return None
    from ..ir.weights import load_weights
    model = _as_model(args.model)
    return load_weights(args.weights, model.trace(args.batch or model.batch, training=True), strict=False)


def _sparse_source(params, resume: bool, checkpoint: str | None) -> dict:
    """The pruned weights sparse training starts from: `params`, or the checkpoint it resumes."""
    if resume and checkpoint and os.path.exists(os.path.join(checkpoint, LAST)):
        return load_checkpoint(checkpoint).state
    if params is None:
        raise TdcError("sparse training retrains pruned weights with their pattern fixed: give the weights "
                       "(tdc train --weights FILE)")
    return params


def train(model, data: Dataset | str = "digits", *, epochs: int = DEFAULT_EPOCHS, batch: int | None = None,
          optimizer: Optimizer | None = None, loss: str = "softmax_cross_entropy",
          schedule: Schedule | str = "constant", warmup: int = 0, step_size: int | None = None,
          gamma: float = 0.1, scale_lr: int | None = None, backend: str = "reference", seed: int = 0,
          checkpoint: str | None = None, checkpoint_every: int | None = None, keep_checkpoints: bool = False,
          resume: bool = False, metrics: str | None = None, plot: str | None = None,
          save_weights: str | None = None, max_steps: int | None = None, log_every: int = 1,
          params: dict[str, np.ndarray] | None = None, progress: bool = True, verbose: bool = True,
          out=print, conv_algo: str = "auto", autotune: bool = False,
          parallel: DataParallel | ParameterServer | None = None, comm_timeout: float = 30.0,
          nonfinite_steps: int = 1, staleness_lr: bool = False, momentum_correction: bool = False,
          hogwild: bool = False, threads: int | None = None, prune: Prune | None = None,
          qat: bool = False, sparse: bool = False, profile: bool = False) -> TrainResult:
    """Train `model` (a Model or "FILE.py[:NAME]") on `data` (a Dataset, "digits" or "mnist:DIR").

    schedule: a Schedule, or a name (constant|step|cosine) built with warmup/step_size/gamma and,
      with scale_lr=BASE_BATCH, the linear scaling rule lr * batch / BASE_BATCH.
    checkpoint: a directory; DIR/last.npz is written after every epoch, every `checkpoint_every`
      steps, and when stopping at `max_steps`. resume=True continues from it (or starts afresh,
      with a note, when there is none yet).
    max_steps: stop once this many steps (counted over the whole run, including before a resume) are done.
    conv_algo, autotune: convolution algorithm choice, as for `tdc.compile`.
    profile: time every kernel of the training step (llvm backend) and print where the steps'
      time went when training ends (tdc.runtime.profile).
    parallel: data parallelism (a DataParallel): `batch` is the global batch, each rank trains on
      its part (batch / ranks) and the gradients are averaged over the ranks every step. On the
      reference backend the ranks are simulated in this process; on numba and llvm this process is
      one rank of an MPI job of parallel.ranks processes (`tdc train --ranks N` starts them), and
      rank 0 alone prints, evaluates, writes metrics, checkpoints and weights. With gradient
      compression (parallel.compress) the step runs on the staged runtime (runtime/staged.py).
      A ParameterServer: the ranks after the workers are servers that keep the params and
      the optimizer state and apply the workers' gradients (sync, async or bounded staleness);
      `batch` is split over the workers. staleness_lr divides a server's lr by 1 + the
      staleness of each update; momentum_correction lowers the momentum of an asynchronous run
      by the momentum asynchrony adds (1 - 1/workers, Mitliagkas et al. 2016).
    hogwild: `threads` threads (default: the cores) run steps at once on the llvm backend, each on
      its own batches, updating the shared params without locks (runtime/hogwild.py). (`tdc train
      --threads N` without --hogwild sets how many threads each step's kernels use, TDC_THREADS.)
    metrics: a JSON-lines file: {epoch, step, loss, lr, accuracy} every `log_every` steps and
      {epoch, step, loss, test_accuracy, test_loss} after every epoch's evaluation (a loss that
      is not finite is written as null).
    nonfinite_steps: stop (TdcError naming the step) once this many steps in a row had a loss
      that is NaN or infinite; the checkpoint then holds the last state saved before them.
    prune: magnitude pruning (a Prune): the step keeps masked weights at zero (passes/prune.py)
      and the masks are recomputed before the epochs where prune's schedule raises the sparsity.
    qat: quantization-aware training: the step sees int8 rounding (passes/quantize.py
      insert_fake_quant); the saved weights hold the learned activation ranges, and the result's
      int8_accuracy is the int8 graph's (quantized with those ranges) on the test set.
    sparse: retrain pruned `params` with their pattern fixed: each linear layer whose weight has
      zeros runs as CSR products forward and backward, its nonzeros the trained param
      (passes/sparsify.py: sparse_training); the result, evaluation and saved weights are dense.
    """
    t_start = time.perf_counter()
    model = _as_model(model)
    if isinstance(data, str):
        data = load_data(data)
    optimizer = optimizer or Optimizer("adam", lr=DEFAULT_LR["adam"])
    batch = model.batch if batch is None else batch
    if loss not in LOSSES:
        raise TdcError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    if epochs < 0:
        raise TdcError(f"epochs must be >= 0, got {epochs}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise TdcError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if profile and (parallel is not None or hogwild or backend != "llvm"):
        raise TdcError("--profile times the kernels of one process's step on the llvm backend: "
                       "it does not combine with " + ("--ranks" if parallel is not None else
                                                      "--hogwild" if hogwild else f"--backend {backend}"))
    if hogwild:
        if parallel is not None:
            raise TdcError("--hogwild runs threads in one process; it does not combine with --ranks")
        if checkpoint_every:
            raise TdcError("--hogwild checkpoints at the end of each epoch only (its steps run at once): "
                           "drop --checkpoint-every")
        if backend != "llvm":
            raise TdcError(f"Hogwild runs on the llvm backend (threads sharing one compiled step's weights), "
                           f"not {backend}: use --backend llvm")
        from ..passes.target import available_cores
        threads = threads or available_cores()
    if prune is not None:
        if parallel is not None or hogwild:
            raise TdcError("--prune trains in one process: it does not combine with --ranks, --ps or --hogwild")
        if epochs <= prune.last_epoch():
            raise TdcError(f"--prune-schedule {prune.schedule} prunes to {prune.sparsity:g} before epoch "
                           f"{prune.last_epoch() + 1}: train for more than {prune.last_epoch()} epochs")
    if qat and (parallel is not None or hogwild):
        raise TdcError("--qat trains in one process: it does not combine with --ranks, --ps or --hogwild")
    if sparse and (parallel is not None or hogwild or prune is not None or qat):
        raise TdcError("--sparse on retrains pruned weights with a fixed pattern in one process: it does not combine "
                       "with --prune (whose masks change the pattern), --qat, --ranks, --ps or --hogwild")
    if resume and not checkpoint:
        raise TdcError("resuming needs the checkpoint directory (--checkpoint DIR)")
    if log_every < 1:
        raise TdcError(f"log_every must be >= 1, got {log_every}")
    if nonfinite_steps < 1:
        raise TdcError(f"nonfinite_steps must be >= 1, got {nonfinite_steps}")
    # every place results go, checked before any work (a run must not be lost at its end)
    if save_weights:
        check_output_file(save_weights, "--save-weights")
    if metrics:
        check_output_file(metrics, "--metrics")
    if plot:
        check_output_file(plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise TdcError(f"--plot {plot} needs matplotlib (pip install matplotlib, or make demo's venv)") from None
    if checkpoint:
        check_output_dir(checkpoint, "--checkpoint")

    types = model.input_types(batch)
    if len(types) != 1:
        raise TdcError(f"model {model.name} takes {len(types)} inputs ({', '.join(types)}); "
                       "training feeds one input of samples")
    input_name, input_type = next(iter(types.items()))
    ranks = parallel.ranks if parallel is not None else 1
    partitioned = isinstance(parallel, Partition)          # every rank sees the whole batch
    local = parallel.split_batch(batch) if parallel is not None and not partitioned else batch   # samples per worker and step
    use_staged = staged(parallel)
    _check_parallel_training(parallel, checkpoint or resume)
    optimizer, encoder_momentum = _staged_optimizer(optimizer, parallel, momentum_correction, out)
    if hogwild and optimizer.name in ("adam", "adamw", "rmsprop", "adagrad"):
        out(f"tdc: warning: Hogwild with {optimizer.name}: threads race on its per-weight statistics too, and on "
            "a loaded machine a run can diverge in its first steps; sgd or momentum is Hogwild's setting")
    simulated = backend == "reference" and not use_staged      # the reference backend runs every rank itself
    if isinstance(parallel, ParameterServer) and parallel.mode != "sync":
        survive_lost_ranks()        # asynchronous servers and workers go on without a lost worker
    comm = communicator(comm_timeout) if not simulated else World1()
    if ranks > 1 and not simulated:
        check_world(ranks, comm)
    rank = comm.rank
    announce_rank(rank)
    root = rank == 0
    if not root:                             # rank 0 speaks and writes for the job
        verbose, progress, metrics, plot, save_weights = False, False, None, None, None
    infer_graph = model.trace(batch, training=False)
    if len(infer_graph.outputs) != 1:
        raise TdcError(f"model {model.name} has {len(infer_graph.outputs)} outputs; training needs one "
                       "(the class scores)")
    output, out_value = infer_graph.outputs[0]
    if out_value.type.rank != 2:
        raise TdcError(f"model {model.name}: output {output} is {out_value.type}; training on labels needs "
                       "[batch, classes] scores")
    num_classes = out_value.type.shape[1]
    x_train = fit_to_model(data.x_train, input_type, f"{data.name} training")
    x_test = fit_to_model(data.x_test, input_type, f"{data.name} test")
    y_train = check_labels(data.y_train, num_classes, f"{data.name} training labels")
    y_test = check_labels(data.y_test, num_classes, f"{data.name} test labels")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise TdcError(f"{data.name}: {len(x_train)} training samples but {len(y_train)} labels, "
                       f"{len(x_test)} test samples but {len(y_test)} labels")
    n = len(x_train)
    steps_per_epoch = n // batch   # the last partial batch is dropped: the graph has a fixed batch size
    if steps_per_epoch == 0:
        raise TdcError(f"{data.name} has {n} training samples, fewer than one batch of {batch}")
    total_steps = epochs * steps_per_epoch
    if isinstance(schedule, str):
        schedule = make_schedule(schedule, optimizer.lr, total_steps, warmup=warmup, step_size=step_size,
                                 gamma=gamma, batch=batch, base_batch=scale_lr)

    if partitioned and parallel.target is None:      # the partition's costs: one set of rates for every rank
        parallel.target = agreed_rates(comm, backend)
    if sparse:
        forward, params, _ = sparse_training(model.trace(batch, training=True), _sparse_source(params, resume,
                                                                                                checkpoint))
        train_graph = train_step(forward, loss, optimizer, batch)
    else:
        train_graph = train_step(model, loss, optimizer, batch, parallel=parallel, prune=prune is not None, qat=qat)
    settings = {"batch": batch, "loss": loss, "data": data.name, "train_samples": n}
    if qat:
        settings["qat"] = True
    if prune is not None:
        settings["prune"] = prune.describe()
    if ranks > 1:
        settings["ranks"] = ranks
        comm.agree(hashlib.sha256((print_graph(train_graph) + repr(sorted(settings.items())) + repr(
            (seed, epochs, max_steps, repr(schedule))) + str(data.x_train.shape)).encode()).hexdigest()[:16],
            "the training step and its settings (model, --batch, --optimizer, --lr, data, ...)")
    step, epoch0, pos0 = 0, 0, 0
    epoch_loss, epoch_correct, epoch_seen = 0.0, 0, 0
    if resume:
        if os.path.exists(os.path.join(checkpoint, LAST)):
            ck = load_checkpoint(checkpoint)
            check_compatible(ck, train_graph, optimizer.to_dict())
            check_settings(ck, model=model.name, seed=seed, **settings)
            params = ck.state
            step, epoch0, pos0 = ck.step, ck.epoch, ck.position
            epoch_loss = ck.meta.get("epoch_loss", 0.0)
            epoch_correct = ck.meta.get("epoch_correct", 0)
            epoch_seen = ck.meta.get("epoch_seen", 0)
            if verbose:
                out(f"resuming from {ck.path}: step {step}, epoch {epoch0 + 1}, batch {pos0}/{steps_per_epoch}")
        elif verbose:
            out(f"no checkpoint in {checkpoint} yet; starting from scratch")
    progress_fn = compile_progress("the training step") if verbose else None
    if use_staged:
        exe = StagedStep(train_graph, parallel, comm, backend=backend, params=params, seed=seed,
                         staleness_lr=staleness_lr, momentum=encoder_momentum, conv_algo=conv_algo, autotune=autotune,
                         progress=progress_fn)
        if exe.is_server:
            exe.serve()
            return TrainResult(np.zeros(0, np.float32), 0, 0, 0, epochs, 0.0, 0.0, 0, len(y_test),
                               time.perf_counter() - t_start, rank=rank, role="server")
    else:
        exe = compile_graph(train_graph, backend=backend, params=params, seed=seed, conv_algo=conv_algo,
                            autotune=autotune, progress=progress_fn, profile=profile)
    def step_state() -> dict[str, np.ndarray]:
        """The step's params and state; a partitioned step's are gathered at rank 0 (every rank
        must call this)."""
        return (exe.gather_state() or {}) if partitioned and not simulated else exe.state

    def model_state() -> dict[str, np.ndarray]:
        """The inference graph's params, pieces of split params put together (every rank calls),
        CSR-trained weights made dense."""
        if sparse:
            return dense_params(train_graph, exe.state)
        return whole_params(train_graph, exe.gather_state() or {}) if partitioned else exe.state

    infer_args = [a.name for a in infer_graph.args if a.kind != "input"]
    # QAT's learned ranges go with the weights: tdc run/compile --quantize int8 reads them
    saved_args = infer_args + [a.name for a in train_graph.state if a.name.endswith(RANGE_SUFFIXES)]
    runners = make_runners(exe, threads) if hogwild else None
    # The inference executable owns copies that are refreshed in place before each evaluation:
    # a backend may bind its buffers at compile time, so replacing dict entries would go unseen.
    initial = model_state()
    eval_exe = compile_graph(infer_graph, backend=backend, params={k: initial[k].copy() for k in infer_args},
                             seed=seed, conv_algo=conv_algo, autotune=autotune,
                             progress=compile_progress("the evaluation graph") if verbose else None) if root else None

    records: list[dict] = []
    metrics_file = None
    if metrics:
        if resume and step > 0:
            records = _read_metrics(metrics, step, epoch0)
            atomic_write(metrics, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
            metrics_file = open(metrics, "a", encoding="utf-8")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(metrics)), exist_ok=True)
            metrics_file = open(metrics, "w", encoding="utf-8")

    def log(record: dict):
        records.append(record)
        if metrics_file is not None:
            finite = {k: (v if not isinstance(v, float) or np.isfinite(v) else None) for k, v in record.items()}
            metrics_file.write(json.dumps(finite, allow_nan=False) + "\n")   # JSON has no NaN
            metrics_file.flush()

    bad_steps = 0     # steps in a row whose loss is not finite
    pruned = mask_names(train_graph)

    def prune_before(epoch: int) -> None:
        """New masks before `epoch` when the schedule raises the sparsity there."""
        s = prune.sparsity_at(epoch)
        if s == (prune.sparsity_at(epoch - 1) if epoch > 0 else 0.0):
            return
        exe.set_state(prune_state(exe.state, train_graph, s, prune.scope))
        if verbose:
            total, per = sparsity_report(exe.state, pruned)
            out(f"pruned to {s:.4f} ({prune.scope}) before epoch {epoch + 1}: sparsity {total:.4f}; "
                + ", ".join(f"{k} {v:.4f}" for k, v in per.items()))

    def save(epoch: int, position: int):
        state = step_state() if checkpoint else {}
        # never over a finite state with a diverged one
        if checkpoint and root and bad_steps == 0 and all(
                np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f"):
            save_checkpoint(checkpoint, state, model=model.name, step=step, epoch=epoch, position=position,
                            seed=seed, optimizer=optimizer.to_dict(), keep=keep_checkpoints,
                            epoch_loss=epoch_loss, epoch_correct=epoch_correct, epoch_seen=epoch_seen,
                            epochs=epochs, schedule=repr(schedule), backend=backend, **settings)

    def run_eval() -> tuple[int, float]:
        """Rank 0's evaluation of the params (every rank calls this: a partitioned step gathers them)."""
        state = model_state()
        if not root:
            return 0, 0.0
        eval_exe.set_state({k: state[k] for k in infer_args})
        return evaluate(eval_exe, input_name, output, x_test, y_test, batch, loss)

    losses: list[np.ndarray] = []
    first_step = step
    history: list[dict] = [r for r in records if "test_accuracy" in r]
    last_eval = None    # (step, correct, test loss)
    target_dtype = out_value.type.np_dtype
    epoch = epoch0
    try:
        for epoch in range(epoch0, epochs):
            order = epoch_order(seed, epoch, n)
            first = pos0 if epoch == epoch0 else 0
            bar = _Progress(progress, steps_per_epoch, first, f"epoch {epoch + 1}/{epochs}")
            t_epoch, stopped, position = time.perf_counter(), False, first
            if prune is not None and first == 0:    # a run resumed within an epoch has its masks
                prune_before(epoch)

            def feed(i: int, step: int) -> dict:
                idx = order[i * batch:(i + 1) * batch]
                mine = idx if simulated or partitioned else idx[rank * local:(rank + 1) * local]   # this rank's shard
                return {input_name: x_train[mine], "y": _targets(y_train[mine], loss, num_classes, target_dtype),
                        "lr": np.float32(schedule.lr_at(step))}
            ran = None       # Hogwild: the epoch's steps, run at once on the threads
            if runners is not None:
                last = steps_per_epoch if max_steps is None else min(steps_per_epoch, first + max(0, max_steps - step))
                ran = run_steps(runners, [feed(i, step + i - first) for i in range(first, last)])
            try:
                for i in range(first, steps_per_epoch):
                    if max_steps is not None and step >= max_steps:
                        stopped = True
                        break
                    idx = order[i * batch:(i + 1) * batch]
                    lr = schedule.lr_at(step)
                    sent0, wait0 = exe.comm_stats()
                    res = ran[i - first] if ran is not None else exe(**feed(i, step))
                    sent1, wait1 = exe.comm_stats()
                    value = res.get("loss", np.float32(0.0))    # a partitioned step's outputs are rank 0's
                    losses.append(value)
                    step, position = step + 1, i + 1
                    bad_steps = 0 if np.isfinite(value) else bad_steps + 1
                    # the training accuracy of rank 0's part of the batch (its output)
                    correct = int(np.sum(np.argmax(res[output], axis=1) == y_train[idx[:local]])) if output in res else 0
                    epoch_loss += float(value)
                    epoch_correct += correct
                    epoch_seen += local
                    if step % log_every == 0:
                        record = {"epoch": epoch + 1, "step": step, "loss": float(value), "lr": lr,
                                  "accuracy": correct / local}
                        if ranks > 1:
                            record.update(bytes_sent=sent1 - sent0, comm_wait_ms=(wait1 - wait0) * 1e3,
                                          seconds=time.perf_counter() - t_start)
                        log(record)
                    if bad_steps >= nonfinite_steps:
                        kept = (f"; {checkpoint}/{LAST} holds the last finite state saved"
                                if checkpoint and os.path.exists(os.path.join(checkpoint, LAST)) else "")
                        raise TdcError(f"the loss is {float(value)} at step {step} (lr {lr:g}): training diverged and "
                                       f"was stopped{kept}; try a smaller --lr" + (
                                           f" (stopped after {bad_steps} such steps in a row)" if bad_steps > 1 else ""))
                    rate = (position - first) * batch / max(time.perf_counter() - t_epoch, 1e-9)
                    bar.update(epoch_loss / (epoch_seen / local), epoch_correct / epoch_seen, rate)
                    if checkpoint_every and step % checkpoint_every == 0 and position < steps_per_epoch:
                        save(epoch, position)
            finally:
                bar.close()
            if stopped:
                save(epoch, position)
                break
            seconds = time.perf_counter() - t_epoch
            correct, test_loss = run_eval()
            last_eval = (step, correct, test_loss)
            mean_loss = epoch_loss / max(epoch_seen / local, 1)
            record = {"epoch": epoch + 1, "step": step, "loss": mean_loss,
                      "test_accuracy": correct / len(y_test), "test_loss": test_loss,
                      "seconds": time.perf_counter() - t_start}
            if pruned:
                record["sparsity"] = sparsity_report(exe.state, pruned)[0]
            log(record)
            history.append(record)
            if verbose:
                rate = (steps_per_epoch - first) * batch / max(seconds, 1e-9)
                line = (f"epoch {epoch + 1}/{epochs}  loss {mean_loss:.4f}  "
                        f"test accuracy {correct / len(y_test):.4f} ({correct}/{len(y_test)})  "
                        f"test loss {test_loss:.4f}  {rate:.0f} samples/s")
                if pruned:
                    line += f"  sparsity {record['sparsity']:.4f}"
                _write_line(line, out, progress)
            epoch_loss, epoch_correct, epoch_seen = 0.0, 0, 0
            save(epoch + 1, 0)
        else:
            epoch = max(epochs, epoch0)
        servers = []
        if use_staged:
            exe.finish()         # rank 0 now holds the servers' final params
            servers = exe.stats
            if root and servers:
                _report_servers(servers, parallel, log, out if verbose else None)
                last_eval = None
    finally:
        if metrics_file is not None:
            metrics_file.close()
    if last_eval is not None and last_eval[0] == step:
        _, correct, test_loss = last_eval
    else:
        correct, test_loss = run_eval()
    if profile and verbose:
        out(profile_table(exe.kernel_times(), host_peak()))
    final = model_state() if partitioned or sparse else exe.state
    if save_weights:
        save_npz(save_weights, {k: final[k] for k in saved_args})
    if plot:
        _write_plot(plot, records, out)
    int8_accuracy = None
    if qat and root:
        qg, qp = quantize_int8(infer_graph, final, learned_ranges(infer_graph, final))
        qexe = compile_graph(qg, backend=backend, params=qp, seed=seed)
        int8_accuracy = evaluate(qexe, input_name, output, x_test, y_test, batch, loss)[0] / len(y_test)
    return TrainResult(np.array(losses, np.float32), first_step, step, epoch, epochs, correct / len(y_test),
                       test_loss, correct, len(y_test), time.perf_counter() - t_start, history, dict(final),
                       rank, servers, sparsity=sparsity_report(final, pruned)[0] if pruned else None,
                       int8_accuracy=int8_accuracy)


class FixedRates:
    """A Target's rates and nothing else: what the partition passes price nodes with."""

    def __init__(self, rates):
        self._rates = rates

    def rates(self):
        return self._rates


def agreed_rates(comm, backend: str) -> FixedRates:
    """The cost-model rates of `backend` (the llvm backend's for the reference), measured or read
    from the cache by rank 0 and sent to the others: every rank must choose the same partition."""
    import numpy as np
    from ..backends import get_target
    from ..passes.target import Rates
    ours = get_target(backend if backend != "reference" else "llvm").rates() if comm.rank == 0 else None
    if comm.size == 1:
        return FixedRates(ours)
    nums = np.array([ours.gemm_flops, ours.copy_bytes] if ours is not None else [0.0, 0.0])
    comm.call(lambda c: c.complete([c.comm.Ibcast(nums, root=0)], [0], "agreeing on the cost model's rates"))
    return FixedRates(ours or Rates(float(nums[0]), float(nums[1]), {}))


def _check_parallel_training(parallel, checkpointing: bool) -> None:
    if isinstance(parallel, ParameterServer) and checkpointing:
        raise TdcError("checkpoints of parameter-server training are not supported: the optimizer state lives on "
                       "the servers; use --save-weights for the trained weights")


def _staged_optimizer(opt: Optimizer, parallel, momentum_correction: bool, out) -> tuple[Optimizer, float]:
    """The optimizer in the training graph, and the momentum a DGC encoder keeps locally.
    DGC moves momentum to the workers (momentum correction: what is sent is the accumulated
    velocity), so the graph's update is plain SGD on the summed velocities."""
    compression = getattr(parallel, "compression", None)
    momentum = 0.0
    if compression is not None and compression.dgc:
        if opt.name not in ("sgd", "momentum"):
            raise TdcError(f"--compress {parallel.compress}: DGC keeps SGD momentum on the workers; use --optimizer "
                           f"momentum (or sgd), not {opt.name}")
        momentum = opt.momentum if opt.name == "momentum" else 0.0
        opt = replace(opt, name="sgd")
    if momentum_correction:
        if not isinstance(parallel, ParameterServer) or parallel.mode == "sync":
            raise TdcError("--momentum-correction is for asynchronous parameter servers (--ps S --mode async|bounded)")
        if opt.name not in ("momentum", "nesterov"):
            raise TdcError(f"--momentum-correction lowers SGD momentum; --optimizer {opt.name} has none")
        implicit = 1 - 1 / parallel.workers
        opt = replace(opt, momentum=max(0.0, opt.momentum - implicit))
        out(f"momentum correction: asynchrony over {parallel.workers} workers adds about {implicit:.2f} of implicit "
            f"momentum; the servers use {opt.momentum:.2f}")
    return opt, momentum


def _report_servers(servers: list, parallel, log, out) -> None:
    """Rank 0's account of what the parameter servers saw: the staleness of the updates, how far
    workers ran ahead, the workers lost."""
    def merge(key):
        total: dict[int, int] = {}
        for st in servers:
            for k, v in getattr(st, key).items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))
    staleness, lead, lost = merge("staleness"), merge("lead"), merge("lost")
    log({"parameter_servers": len(servers), "mode": parallel.mode, "updates": sum(s.updates for s in servers),
         "staleness_histogram": {str(k): v for k, v in staleness.items()},
         "lead_histogram": {str(k): v for k, v in lead.items()}, "lost_workers": sorted(lost)})
    if out is not None:
        hist = " ".join(f"{k}:{v}" for k, v in staleness.items())
        out(f"parameter servers ({parallel.mode}): {sum(s.updates for s in servers)} updates; staleness histogram "
            f"(staleness:updates) {hist}; most steps ahead of the slowest worker {max(lead, default=0)}")
        for w, steps in lost.items():
            out(f"tdc: warning: worker rank {w} was lost after its step {steps}; the others finished without it")


def _write_line(line: str, out, progress: bool):
    # Printing under a live tqdm bar garbles it; tqdm.write prints above the bar.
    if progress and out is print:
        try:
            from tqdm import tqdm
            tqdm.write(line)
            return
        except ImportError:
            pass
    out(line)


# ---- command line --------------------------------------------------------------------------

def add_optimizer_arguments(p: argparse.ArgumentParser) -> None:
    """The loss and the optimizer's update rule: what goes into a training graph (tdc train,
    tdc compile --train, tdc dump --train)."""
    p.add_argument("--loss", default="softmax_cross_entropy", choices=list(LOSSES),
                   help="loss appended for training (default: softmax_cross_entropy)")
    p.add_argument("--optimizer", default="adam", choices=list(SLOTS),
                   help="update rule in the training graph (default adam; adamw: adam with decoupled weight decay)")
    p.add_argument("--momentum", type=float, default=0.9, help="for momentum and nesterov (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0, metavar="WD",
                   help="weight decay (default 0): L2 (WD * p added to the gradient) unless --decoupled-decay")
    p.add_argument("--decoupled-decay", action="store_true",
                   help="decay the weights beside the update, p -= lr * WD * p (AdamW's way; --optimizer adamw "
                        "implies it), instead of adding WD * p to the gradient")
    p.add_argument("--no-decay-bias-norm", action="store_true",
                   help="no weight decay on biases and normalization scales and shifts (params of rank 1)")
    p.add_argument("--prune", type=float, metavar="S",
                   help="magnitude pruning: zero the fraction S (0 <= S < 1) of smallest linear, matmul and conv2d "
                        "weights; masks in the training step keep them zero through every update")
    p.add_argument("--prune-scope", default="layer", choices=SCOPES,
                   help="with --prune: S of each layer's weights (layer, the default) or one threshold over all of "
                        "them (global)")
    p.add_argument("--prune-schedule", default="oneshot", metavar="oneshot[:E]|iterative:N",
                   help="with --prune: prune once before epoch E+1 (oneshot, E default 0), or ramp the sparsity "
                        "S(1-(1-e/N)^3) before epochs 2..N+1 (iterative:N, Zhu and Gupta's cubic schedule)")


def prune_from(args) -> Prune | None:
    """The Prune of --prune, --prune-scope and --prune-schedule (None without --prune)."""
    if args.prune is None:
        if args.prune_schedule != "oneshot" or args.prune_scope != "layer":
            raise TdcError("--prune-scope and --prune-schedule go with --prune S")
        return None
    return Prune(args.prune, args.prune_scope, args.prune_schedule)


def optimizer_from(args, lr: float = 0.01) -> Optimizer:
    return Optimizer(args.optimizer, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                     decoupled=args.decoupled_decay, decay_bias_norm=not args.no_decay_bias_norm)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="FILE.py[:NAME] with a @tdc.model")
    p.add_argument("--data", default="digits", metavar="DATA",
                   help="digits (scikit-learn's 8x8 digits, the default), mnist:DIR (IDX files), cifar10:DIR "
                        "(CIFAR-10 binary batches), npz:FILE[:x_train=NAME,...] (arrays x_train, y_train, x_test, "
                        "y_test), npy:DIR (x_train.npy, ... memory-mapped); ~ is your home directory")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}")
    p.add_argument("--batch", type=int, help="mini-batch size (default: the model's batch)")
    p.add_argument("--lr", type=float, help="learning rate (default: " +
                   ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--schedule", default="constant", choices=list(SCHEDULES), help="learning-rate schedule")
    p.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear warm-up steps")
    p.add_argument("--step-size", type=int, metavar="STEPS",
                   help="step schedule: decay every STEPS steps (default: a third of the run)")
    p.add_argument("--gamma", type=float, default=0.1, help="step schedule: decay factor (default 0.1)")
    p.add_argument("--scale-lr", type=int, metavar="BASE_BATCH",
                   help="linear scaling rule: multiply lr by batch / BASE_BATCH (use with --warmup)")
    add_optimizer_arguments(p)
    p.add_argument("--backend", default="llvm", choices=("llvm", "numba", "reference"),
                   help="llvm (native code through LLVM, compiled in a second or two: the default), numba "
                        "(generated Numba source; the first run compiles for up to a minute, later runs load from "
                        "the cache) or reference (the numpy interpreter; bitwise-reproducible resumes)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order (default 0)")
    p.add_argument("--checkpoint", metavar="DIR", help="write DIR/last.npz after every epoch")
    p.add_argument("--checkpoint-every", type=int, metavar="K", help="also checkpoint every K steps")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep DIR/step-N.npz for every checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from DIR/last.npz")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps in all")
    p.add_argument("--metrics", metavar="FILE.jsonl", help="write per-step and per-epoch metrics as JSON lines")
    p.add_argument("--plot", metavar="FILE.png", help="plot loss and accuracy (needs matplotlib)")
    p.add_argument("--save-weights", metavar="FILE.npz", help="save the trained weights for tdc run --weights")
    p.add_argument("--weights", metavar="FILE",
                   help="start from these weights (.npz, a checkpoint, or a tdc compress file) instead of the "
                        "initialisation; arrays the model lacks are an error, params the file lacks are initialised")
    p.add_argument("--sparse", choices=("off", "on"), default="off",
                   help="on: retrain the --weights as pruned, with their pattern fixed: linear layers whose weights "
                        "have zeros run as CSR products forward and backward and only their nonzeros are trained "
                        "(exactly zero stays zero); --save-weights writes them dense (default off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile", action="store_true",
                   help="llvm backend: time every kernel of the training step and print, when training ends, each "
                        "one's ops, time per step, share, GFLOP/s, GB/s and fraction of the host's FMA peak")
    p.add_argument("--nonfinite-steps", type=int, default=1, metavar="N",
                   help="stop once N steps in a row had a NaN or infinite loss (default 1)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads per step's kernels (default: the cores); with --hogwild, steps run at once")
    p.add_argument("--hogwild", action="store_true",
                   help="llvm backend: N threads (--threads) each train on their own batches and update the shared "
                        "params without locks (Hogwild)")
    p.add_argument("--qat", action="store_true",
                   help="quantization-aware training: the step rounds weights and activations as int8 inference "
                        "will (straight-through gradients, activation ranges as running averages); --save-weights "
                        "then holds the ranges, which tdc run/compile --quantize int8 use instead of calibrating")
    add_parallel_arguments(p)


def cmd_train(args, argv: list[str] | None = None) -> int:
    """`tdc train`; with --ranks N on a compiled backend, this process starts the N ranks under
    mpiexec (argv: its own command line, by default sys.argv's) unless it is one of them already."""
    attach_rank_output()
    if args.threads is not None:
        if args.threads < 1:
            raise TdcError(f"--threads must be >= 1, got {args.threads}")
        # Hogwild's threads each run whole steps; otherwise the threads split each step's kernels
        os.environ["TDC_THREADS"] = "1" if args.hogwild else str(args.threads)
        os.environ["NUMBA_NUM_THREADS"] = os.environ["TDC_THREADS"]
    parallel = parallel_config(args)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    opt = optimizer_from(args, lr)
    prune = prune_from(args)
    if parallel is not None and (args.backend != "reference" or staged(parallel)) and needs_launch(parallel.ranks):
        # the settings' mistakes are one line from here, not one from every rank after the launch
        _check_parallel_training(parallel, bool(args.checkpoint or args.resume))
        _staged_optimizer(opt, parallel, args.momentum_correction, out=lambda line: None)
        survive = isinstance(parallel, ParameterServer) and parallel.mode != "sync"
        return launch(parallel.ranks, sys.argv[1:] if argv is None else argv, survivable=survive)
    try:
        result = train(args.model, args.data, epochs=args.epochs, batch=args.batch, optimizer=opt, loss=args.loss,
                       schedule=args.schedule, warmup=args.warmup, step_size=args.step_size, gamma=args.gamma,
                       scale_lr=args.scale_lr, backend=args.backend, seed=args.seed, checkpoint=args.checkpoint,
                       checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                       resume=args.resume, metrics=args.metrics, plot=args.plot, save_weights=args.save_weights,
                       max_steps=args.max_steps, progress=not args.no_progress,
                       conv_algo=getattr(args, "conv_algo", "auto"), autotune=getattr(args, "autotune", False),
                       parallel=parallel, comm_timeout=args.comm_timeout, nonfinite_steps=args.nonfinite_steps,
                       staleness_lr=args.staleness_lr, momentum_correction=args.momentum_correction,
                       hogwild=args.hogwild, threads=args.threads, prune=prune, qat=args.qat,
                       params=_initial_weights(args), sparse=args.sparse == "on", profile=args.profile)
    except Exception as e:
        if launched_ranks() > 1 and not getattr(args, "debug", False):   # one rank alone would leave the others waiting
            fail_job(str(e) if isinstance(e, TdcError) else f"internal error: {type(e).__name__}: {e}")
        raise
    if result.rank == 0:
        print(result.summary())
    if isinstance(parallel, ParameterServer) and parallel.mode != "sync" and launched_ranks() > 1:
        # MPI_Finalize waits for every rank, a lost one too: end without it (the results are written)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
