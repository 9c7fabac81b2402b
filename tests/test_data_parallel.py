"""Data parallelism: the data_parallel pass (buckets, overlap, algorithm choice), simulated ranks on
the reference backend, and real MPI jobs (every one under the venv's mpiexec with a timeout, so a
deadlock fails the test): the allreduce algorithms of both communicators against MPI_Allreduce,
the numba and LLVM steps and the native executable against one process, `tdc train --ranks`, and
what happens when a rank is killed or stops answering."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tdc
from tdc.cli import main
from tdc.errors import TdcError
from tdc.ir.weights import read_weights
from tdc.passes.data_parallel import NETWORKS, DataParallel, allreduce_time, choose_allreduce

from test_train_conv_models import _idx_dir, _to_lenet

HERE = Path(__file__).parent
ROOT = HERE.parent
EXAMPLES = ROOT / "examples"
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
TDC = [sys.executable, "-m", "tdc.cli"]
TIMEOUT = 300          # seconds for any MPI job: a hang fails the test instead of stalling CI
sys.path.insert(0, str(EXAMPLES))
import lenet  # noqa: E402
import mlp  # noqa: E402


def mpirun(n: int, args: list[str], timeout: float = TIMEOUT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([MPIEXEC, "-n", str(n), *args], capture_output=True, text=True, timeout=timeout, **kw)


def last_json(p: subprocess.CompletedProcess):
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- the pass ---------------------------------------------------------------------------------

def test_every_gradient_is_averaged_in_buckets_in_the_order_backprop_makes_them():
    step = tdc.train_step(lenet.lenet, batch=8, optimizer=tdc.Optimizer("sgd"),
                          parallel=DataParallel(2, bucket_bytes=20000))
    starts = [n for n in step.nodes if n.op == "allreduce_start"]
    waits = [n for n in step.nodes if n.op == "allreduce_wait"]
    params = {p.name: p.type.size for p in step.params}
    assert len(starts) == len(waits) >= 3
    assert sum(n.inputs[0].type.size for n in starts) == sum(params.values())   # every gradient, once
    for n in starts:
        assert n.attrs["world"] == 2 and n.attrs["algo"] in ("ring", "doubling", "tree", "mpi")
    # buckets close once past the threshold: all but the last hold at least 20000 bytes
    assert all(n.inputs[0].type.nbytes >= 20000 for n in starts[:-1])
    # backprop reaches fc3 first and conv1 last: the first bucket holds fc3's gradients
    first = starts[0].inputs[0].producer
    assert first.op == "concat" and any(v.type.size == params["fc3.weight"] for v in first.inputs) or \
        starts[0].inputs[0].type.size == params["fc3.weight"]
    loss = [n for n in step.nodes if n.op == "allreduce" and n.attrs["op"] == "mean"]
    assert len(loss) == 1 and loss[0].inputs[0].type.shape == ()


def test_without_overlap_each_bucket_is_one_blocking_allreduce():
    step = tdc.train_step(mlp.mlp, batch=8, optimizer=tdc.Optimizer("sgd"),
                          parallel=DataParallel(2, bucket_bytes=0, overlap=False))
    assert not any(n.op in ("allreduce_start", "allreduce_wait") for n in step.nodes)
    assert sum(n.op == "allreduce" for n in step.nodes) == 6 + 1    # one per gradient (bucket 0 B) + the loss


def test_dump_shows_starts_right_after_their_last_gradient_and_waits_right_before_their_first_use(capsys):
    """The compile pipeline's graph (what `tdc dump --train --ranks 2 --after schedule_comm` prints):
    nothing but a bucket's packing between its last gradient and its allreduce_start, and nothing
    but the unpacking between an allreduce_wait and the first node that uses the result."""
    from tdc.backends import get_target
    from tdc.lower.pipeline import compile_pipeline
    from tdc.passes.data_parallel import _pack_chain, _unpack_chain
    from tdc.passes.manager import Pipeline
    step = tdc.train_step(lenet.lenet, batch=16, optimizer=tdc.Optimizer("sgd"),
                          parallel=DataParallel(2, bucket_bytes=50000))
    passes = compile_pipeline(get_target("llvm")).passes
    g = Pipeline(passes[:[p.name for p in passes].index("schedule_comm") + 1]).run(step)
    nodes = g.nodes
    starts = [n for n in nodes if n.op == "allreduce_start"]
    assert len(starts) >= 2
    for s in starts:
        chain = _pack_chain(s)
        grads = {v.producer for m in chain for v in m.inputs if v.producer is not None and v.producer not in chain}
        last = max(nodes.index(p) for p in grads)
        assert all(m in chain for m in nodes[last + 1:nodes.index(s) + 1]), s
    for w in [n for n in nodes if n.op == "allreduce_wait"]:
        chain = _unpack_chain(g, w)
        made = {v for m in chain for v in m.outputs}
        first_use = next(i for i, m in enumerate(nodes) if m not in chain and any(v in made for v in m.inputs))
        assert all(m in chain for m in nodes[nodes.index(w):first_use]), w
        assert nodes[first_use].op not in ("allreduce_start", "allreduce_wait")
    assert main(["dump", str(EXAMPLES / "lenet.py"), "--train", "--ranks", "2", "--batch", "16", "--bucket-mb",
                 "0.05", "--optimizer", "sgd", "--backend", "llvm", "--after", "schedule_comm"]) == 0
    text = capsys.readouterr().out
    assert text.count("allreduce_start(") == len(starts) and text.count("allreduce_wait(") == len(starts)
    assert text.index("allreduce_start(") < text.index("conv2d_grad_weight(") < text.index("allreduce_wait(")


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(TdcError, match="a batch of 10 does not split evenly over 3 ranks"):
        tdc.train_step(mlp.mlp, batch=10, parallel=DataParallel(3))


def test_alpha_beta_costs_follow_the_classic_analyses():
    net = NETWORKS["10gbe"]
    n = 100 << 20
    for p in (2, 4, 8, 64):
        ring = allreduce_time("ring", n, p, net)
        # the ring moves 2 (p - 1) / p of the data per rank: bandwidth-bound on large messages
        assert ring == pytest.approx(2 * (p - 1) * net.alpha + 2 * (p - 1) / p * n * net.beta
                                     + (p - 1) / p * n * net.gamma)
        assert ring < allreduce_time("tree", n, p, net) and ring < allreduce_time("doubling", n, p, net)
    # small messages are latency-bound: recursive doubling's log p steps beat the ring's 2 (p - 1)
    assert choose_allreduce(64, 64, net) in ("doubling", "mpi")
    assert choose_allreduce(n, 64, net) in ("ring", "mpi")
    assert allreduce_time("ring", n, 1, net) == 0


def test_simulated_ranks_train_like_one_process():
    """The reference backend's simulated ranks (the oracle) with batch B / N give the losses and
    params of one process with batch B, step for step over 20 steps, for N = 2 and 4."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((160, 784)).astype(np.float32), rng.integers(0, 10, 160)
    # momentum: Adam divides each gradient element by its own running size, so near-zero gradients
    # amplify rounding (one weight in 235k moved by 7e-5 here with Adam)
    opt = tdc.Optimizer("momentum", lr=0.01)
    one = tdc.compile(tdc.train_step(mlp.mlp, batch=8, optimizer=opt), seed=1)
    many = [tdc.compile(tdc.train_step(mlp.mlp, batch=8, optimizer=opt, parallel=DataParallel(n)), seed=1)
            for n in (2, 4)]
    for s in range(20):
        feed = dict(x=x[8 * s:8 * s + 8], y=y[8 * s:8 * s + 8], lr=np.float32(0.01))
        want = one(**feed)["loss"]
        for exe in many:
            assert abs(exe(**feed)["loss"] - want) <= 1e-5 * max(1.0, abs(want))
    for exe in many:
        for k, v in one.state.items():
            np.testing.assert_allclose(exe.state[k], v, atol=1e-5, err_msg=k)


def test_a_step_for_two_ranks_refuses_to_run_alone():
    step = tdc.train_step(mlp.mlp, batch=8, parallel=DataParallel(2))
    for backend in ("numba", "llvm"):
        with pytest.raises(TdcError, match="compiled for 2 ranks but runs in a world of 1"):
            tdc.compile(step, backend=backend)


# ---- real MPI jobs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_every_allreduce_algorithm_equals_mpi_allreduce(ranks):
    """Sizes 1, 7, 1000 and 1M floats (none divisible by 3, 7 by none), sum, mean, max and min,
    the mpi4py and the C communicator: within p * eps * sum|x| of MPI_Allreduce (float32 sums in
    another order), and the same bits on every rank."""
    report = last_json(mpirun(ranks, [sys.executable, str(HERE / "mpi" / "allreduce_check.py"), "1,7,1000,1000000"]))
    assert len(report) == 2 * 4 * 4 * 4
    for r in report:
        assert r["error_over_bound"] <= 1.0 and r["same_on_every_rank"], r


@pytest.mark.parametrize("ranks", [2, 4])
def test_data_parallel_steps_equal_one_process(ranks):
    """20 steps on N ranks of batch 8 / N against one reference process of batch 8: numba (MLP, on 2
    ranks: each rank compiles cold, and 4 of them on 2 cores took most of a minute), LLVM (MLP,
    LeNet-5) and LLVM with synchronized batchnorm; params within 1e-5, losses within 1e-5
    (relative), identical on every rank. 4 ranks oversubscribe the 2 cores."""
    specs = ["numba:mlp"] * (ranks == 2) + ["llvm:mlp", "llvm:lenet", "llvm:bn:sync"]
    report = last_json(mpirun(ranks, [sys.executable, str(HERE / "mpi" / "dp_step.py"), *specs]))
    for r in report:
        assert r["loss_err"] <= 1e-5 and r["param_err"] <= 1e-5, r
        assert r["sim_param_err"] <= 1e-5 and r["same_params_on_every_rank"], r
        assert r["bytes_sent"] > 0


@pytest.fixture(scope="module", params=[2, 4])
def native_dp(request, tmp_path_factory):
    """The MLP's SGD training step compiled for 2 or 4 ranks (global batch 16), and data for 10 steps."""
    d = tmp_path_factory.mktemp(f"native_dp{request.param}")
    assert main(["compile", str(EXAMPLES / "mlp.py"), "--train", "--batch", "16", "--optimizer", "sgd",
                 "--ranks", str(request.param), "-o", str(d / "b")]) == 0
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((160, 784)).astype(np.float32))
    np.save(d / "y.npy", rng.integers(0, 10, 160))
    return d, request.param


def test_native_executable_trains_on_n_ranks_like_one_process(native_dp):
    d, n = native_dp
    args = [str(d / "b" / "model"), "--input", f"x={d / 'x.npy'}", "--input", f"y={d / 'y.npy'}",
            "--input", "lr=0.05", "--steps", "20", "--print-every", "20", "--save", str(d / "w.weights")]
    p = mpirun(n, args)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("step 20/20") == 1 and f"on {n} ranks" in p.stdout and "MB sent per step" in p.stdout
    x, y = np.load(d / "x.npy"), np.load(d / "y.npy")
    one = tdc.compile(tdc.train_step(mlp.mlp, batch=16, optimizer=tdc.Optimizer("sgd")), seed=0)
    for s in range(20):
        loss = one(x=x[16 * (s % 10):16 * (s % 10) + 16], y=y[16 * (s % 10):16 * (s % 10) + 16],
                   lr=np.float32(0.05))["loss"]
    assert abs(float(p.stdout.split("loss=")[-1].split()[0]) - loss) <= 1e-5
    got = read_weights(str(d / "w.weights"))
    for k, v in one.state.items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, err_msg=k)


def test_native_executable_refuses_another_world_size_or_a_rank_with_other_arguments(native_dp):
    d, n = native_dp
    base = [str(d / "b" / "model"), "--input", f"x={d / 'x.npy'}", "--input", f"y={d / 'y.npy'}", "--input", "lr=0.05"]
    p = mpirun(3, base + ["--steps", "2"])
    assert p.returncode != 0 and f"compiled for {n} ranks but runs in a world of 3: start it with mpiexec -n {n}" \
        in p.stderr
    p = subprocess.run([MPIEXEC, "-n", "1", *base, "--steps", "2", ":", "-n", str(n - 1), *base, "--steps", "3"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode != 0 and "the ranks disagree on the program and its arguments" in p.stderr


def _train(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(TDC + ["train", *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, **kw)


def test_tdc_train_on_two_ranks_reaches_the_accuracy_of_one(tmp_path):
    """`tdc train examples/lenet.py --ranks 2 --data mnist:DIR` (MNIST's IDX format, made from
    scikit-learn's digits) on the LLVM backend: the same test accuracy as one rank within a point,
    and the metrics record the bytes each step sent and its wait."""
    data = _idx_dir(str(tmp_path), _to_lenet, 800, 300)
    common = [str(EXAMPLES / "lenet.py"), "--data", f"mnist:{data}", "--backend", "llvm", "--epochs", "2",
              "--batch", "32", "--lr", "2e-3", "--no-progress"]
    one = _train(common + ["--metrics", str(tmp_path / "m1.jsonl")])
    two = _train(common + ["--ranks", "2", "--metrics", str(tmp_path / "m2.jsonl")])
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    acc = [float(p.stdout.strip().splitlines()[-1].split()[2]) for p in (one, two)]
    assert acc[0] >= 0.8 and abs(acc[0] - acc[1]) <= 0.01, acc
    assert two.stdout.count("test accuracy") == 3       # two epochs and the summary, from rank 0 alone
    rows = [json.loads(ln) for ln in (tmp_path / "m2.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "test_accuracy" not in r]
    assert steps and all(r["bytes_sent"] > 0 and r["comm_wait_ms"] >= 0 for r in steps)


def _rank_pid(token: str, rank: int, deadline: float) -> int:
    """The pid of rank `rank` of the job whose command line holds `token`."""
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if token in cmd and "tdc.cli" in cmd and f"PMI_RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} of the job found")


def _wait_for_checkpoint(ck: Path, proc, deadline: float):
    while not (ck / "last.npz").exists():
        assert proc.poll() is None and time.time() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.2)


def kill_rank_1_after_a_checkpoint(args: list[str], ck: Path, how: str) -> tuple[str, float]:
    """Start `tdc train args` (checkpointing into ck), send rank 1 the signal `how` once the first
    checkpoint is written, and return the job's one error line and the seconds it took to end."""
    proc = subprocess.Popen(TDC + ["train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        deadline = time.time() + TIMEOUT
        _wait_for_checkpoint(ck, proc, deadline)
        os.kill(_rank_pid(str(ck), 1, deadline), getattr(signal, how))
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
        ended = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("tdc: error")]
    assert len(lines) == 1, err
    return lines[0], ended


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_rank_that_dies_or_stops_ends_the_job_with_its_name_and_resume_finishes(tmp_path, how):
    """Rank 1 killed (hydra ends the job at once) or stopped (rank 0 stops waiting after
    --comm-timeout and asks every rank to answer a roll call): the job ends within the timeout with
    one line naming rank 1, the checkpoint is whole, and --resume finishes the run."""
    ck = tmp_path / "ck"
    args = [str(EXAMPLES / "digits.py"), "--backend", "llvm", "--ranks", "2", "--epochs", "400", "--batch", "32",
            "--checkpoint", str(ck), "--checkpoint-every", "5", "--comm-timeout", "3", "--no-progress"]
    line, ended = kill_rank_1_after_a_checkpoint(args, ck, how)
    if how == "SIGKILL":
        assert "rank 1 (pid" in line and "Killed (signal 9)" in line and ended < 10, (line, ended)
    else:
        assert "no answer from rank 1 within 3 s" in line and ended < 3 + 2 + 10, (line, ended)
    ckpt = np.load(ck / "last.npz")          # whole: it loads
    assert len(ckpt.files) > 0
    resume = [a if a != "400" else "3" for a in args] + ["--resume"]
    done = _train(resume)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout and "after 3 epochs" in done.stdout, done.stdout


def test_tdc_train_runs_as_it_is_under_an_mpiexec_of_ones_own(tmp_path):
    p = subprocess.run([MPIEXEC, "-n", "2", *TDC, "train", str(EXAMPLES / "digits.py"), "--backend", "llvm",
                        "--ranks", "2", "--epochs", "1", "--no-progress"], capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("test accuracy") == 2     # the epoch line and the summary, rank 0 only


def test_ranks_that_disagree_on_the_settings_are_refused_at_start(tmp_path):
    """Started by hand with a different --batch on each rank: refused before any step, not a deadlock."""
    common = ["train", str(EXAMPLES / "digits.py"), "--backend", "llvm", "--ranks", "2", "--epochs", "1",
              "--no-progress"]
    p = subprocess.run([MPIEXEC, "-n", "1", *TDC, *common, "--batch", "32", ":", "-n", "1", *TDC, *common,
                        "--batch", "16"], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert p.returncode != 0 and "the ranks disagree on the training step and its settings" in p.stderr, p.stderr
