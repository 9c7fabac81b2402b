"""`tdc compress`: Deep Compression (Han et al. 2016) of a trained model, end to end.

    prune    magnitude pruning to the asked sparsity (passes/prune.py masks) and retraining
    quantize k-means weight sharing of each pruned weight's survivors (1-D k-means, initialised
             linearly over [min, max], by density (the CDF's quantiles) or at random samples,
             as the paper compares), then retraining of the centroids alone (passes/share.py:
             a centroid's gradient is the sum over its cluster)
    huffman  canonical Huffman coding of the cluster codes and the index gaps (ir/compressed.py)

The weights of linear, matmul and conv2d nodes are compressed; every other array is kept as it
is. The result is a compressed model file `tdc run` and `tdc compile` read like any weights file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..ir.compressed import SharedLayer, SharedWeight, encode_shared, read_compressed, read_compressed_layers, \
    write_compressed
from ..passes.optimizer import Optimizer
from ..passes.prune import prunable
from ..passes.share import CENTROIDS, share_weights, shared_values
from ..passes.training import train_step
from .data import Dataset, check_labels, fit_to_model
from .prune import Prune

INITS = ("linear", "density", "random")


@dataclass(frozen=True)
class Quantize:
    """kmeans: k shared weights per layer; binary: sign(w) times one scale per sign (XNOR-Net's
    alpha = mean |w| to start); ternary: as binary, and the weights under 0.7 mean |w| pruned
    too (Ternary Weight Networks' threshold). The scales are then retrained as centroids."""
    kind: str
    k: int = 2
    init: str = "linear"

    @staticmethod
    def parse(spec: str) -> "Quantize":
        if spec in ("binary", "ternary"):
            return Quantize(spec)
        kind, _, rest = spec.partition(":")
        k, _, init = rest.partition(":")
        bad = (f"--quantize must be kmeans:K or kmeans:K:INIT (K from 2 to 256, INIT {'|'.join(INITS)}), binary "
               f"or ternary, not {spec!r}")
        if kind != "kmeans" or not k.isdigit() or not 2 <= int(k) <= 256 or (init and init not in INITS):
            raise TdcError(bad)
        return Quantize("kmeans", int(k), init or "linear")

    def share(self, w: np.ndarray, seed: int = 0) -> SharedWeight:
        """The weight's codes (-1 where pruned: its zeros, and ternary's small weights) and centroids."""
        kept = w != 0
        if self.kind == "ternary" and kept.any():
            kept &= np.abs(w) > 0.7 * np.abs(w[kept]).mean()
        codes = np.full(w.shape, -1, np.int64)
        if self.kind == "kmeans":
            centroids, codes[kept] = kmeans_1d(w[kept], self.k, self.init, seed=seed)
        else:
            alpha = float(np.abs(w[kept]).mean()) if kept.any() else 0.0
            centroids, codes[kept] = np.array([-alpha, alpha], np.float32), w[kept] > 0
        return SharedWeight(codes, centroids)


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", iters: int = 50,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k] float32, codes [n]) of Lloyd's k-means on scalars. In one dimension the
    nearest centroid is found by bisecting the midpoints of the sorted centroids."""
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0:
        return np.zeros(k, np.float32), np.zeros(0, np.int64)
    if init == "linear":
        c = np.linspace(x.min(), x.max(), k)
    elif init == "density":
        c = np.quantile(x, (np.arange(k) + 0.5) / k)
    elif init == "random":
        c = np.random.default_rng(seed).choice(x, size=k, replace=x.size < k)
    else:
        raise TdcError(f"k-means initialization must be one of {', '.join(INITS)}, not {init!r}")
    c = np.sort(c)
    for _ in range(iters):
        codes = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        counts = np.bincount(codes, minlength=k)
        sums = np.bincount(codes, weights=x, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)   # an empty cluster keeps its centroid
        order = np.argsort(new, kind="stable")
        if np.array_equal(new[order], c):
            break
        c = new[order]
    codes = np.searchsorted((c[1:] + c[:-1]) / 2, x)
    return c.astype(np.float32), codes


@dataclass
class CompressResult:
    accuracy: dict[str, float]          # "before", "pruned", "compressed" (read back from the file)
    table: str
    file_bytes: int
    dense_bytes: int


def _feeds(graph, input_name, xb, yb, lr):
    return {input_name: xb, "y": yb.astype(graph.arg("y").type.np_dtype), "lr": np.float32(lr)}


def _accuracy(model, params, data_x, data_y, batch, backend, seed) -> float:
    from ..backends import compile as compile_graph
    from .trainer import evaluate
    g = model.trace(batch, training=False)
    exe = compile_graph(g, backend=backend, params={a.name: params[a.name] for a in g.args if a.kind != "input"},
                        seed=seed)
    correct, _ = evaluate(exe, g.inputs[0].name, g.outputs[0][0], data_x, data_y, batch)
    return correct / len(data_y)


def retrain_centroids(model, params: dict, shared: dict[str, SharedWeight], x, y, *, epochs: int, batch: int,
                      optimizer: Optimizer, backend: str, seed: int) -> dict[str, SharedWeight]:
    """The shared weights after `epochs` of training their centroids (and the other params) on (x, y)."""
    from ..backends import compile as compile_graph
    from .trainer import epoch_order
    if epochs == 0 or not shared:
        return shared
    graph = share_weights(model.trace(batch, training=True), {k: len(s.centroids) for k, s in shared.items()})
    step = train_step(graph, optimizer=optimizer)
    values = {k: v for k, v in params.items() if k not in shared}
    for name, s in shared.items():
        values.update(shared_values(s.codes, s.centroids, name))
    exe = compile_graph(step, backend=backend, params={a.name: values[a.name] for a in step.args if a.name in values},
                        seed=seed)
    input_name = graph.inputs[0].name
    for epoch in range(epochs):
        order = epoch_order(seed, epoch, len(x))
        for s in range(0, len(x) - batch + 1, batch):
            mine = order[s:s + batch]
            exe(**_feeds(step, input_name, x[mine], y[mine], optimizer.lr))
    for name in list(params):
        if name in exe.state:
            params[name] = exe.state[name].copy()
    return {k: SharedWeight(s.codes, exe.state[k + CENTROIDS].copy()) for k, s in shared.items()}


def compress(model, params: dict[str, np.ndarray], data: Dataset, output: str, *, prune: Prune | None,
             quantize: Quantize, huffman: bool, epochs: int = 4, share_epochs: int = 2, batch: int | None = None,
             optimizer: Optimizer | None = None, schedule: str = "constant", backend: str = "llvm", seed: int = 0,
             out=print) -> CompressResult:
    """Compress `model` with `params`, retraining on `data`; write the compressed file to `output`."""
    from ..files import check_output_file
    from .trainer import train     # trainer imports much of tdc: only when compressing
    check_output_file(output, "-o")
    batch = batch or model.batch
    optimizer = optimizer or Optimizer("adam", lr=1e-3)
    g = model.trace(batch, training=False)
    if len(g.inputs) != 1:
        raise TdcError(f"model {model.name} takes {len(g.inputs)} inputs; compressing retrains on one input of samples")
    input_type = g.inputs[0].type
    classes = g.outputs[0][1].type.shape[-1]
    x_train = fit_to_model(data.x_train, input_type, f"{data.name} training")
    x_test = fit_to_model(data.x_test, input_type, f"{data.name} test")
    y_train = check_labels(data.y_train, classes, f"{data.name} training labels")
    y_test = check_labels(data.y_test, classes, f"{data.name} test labels")
    params = {a.name: np.asarray(params[a.name]) for a in g.args if a.kind != "input"}
    weights = prunable(g)
    if not weights:
        raise TdcError(f"model {model.name} has no linear, matmul or conv2d weights to compress")
    accuracy = {"before": _accuracy(model, params, x_test, y_test, batch, backend, seed)}
    out(f"test accuracy before: {accuracy['before']:.4f}")
    if prune is not None:
        r = train(model, data, epochs=epochs, batch=batch, optimizer=optimizer, schedule=schedule, backend=backend,
                  seed=seed,
                  params=params, prune=prune, progress=False, verbose=False, out=out)
        params = {k: r.state[k].copy() for k in params}
        accuracy["pruned"] = r.test_accuracy
        out(f"pruned to {prune.sparsity:g} ({prune.scope}) and retrained {epochs} epochs: test accuracy "
            f"{accuracy['pruned']:.4f}")
    shared = {name: quantize.share(params[name], seed) for name in weights}
    shared = retrain_centroids(model, params, shared, x_train, y_train, epochs=share_epochs, batch=batch,
                               optimizer=optimizer, backend=backend, seed=seed)
    layers = {k: encode_shared(s, huffman) for k, s in shared.items()}
    raw = {k: v for k, v in params.items() if k not in shared}
    write_compressed(output, raw, layers)
    file_bytes = os.path.getsize(output)
    dense_bytes = sum(v.size * 4 for v in params.values())
    decoded = read_compressed(output)
    accuracy["compressed"] = _accuracy(model, decoded, x_test, y_test, batch, backend, seed)
    table = compression_table(*read_compressed_layers(output))
    out(table)
    out(f"test accuracy: {accuracy['before']:.4f} before, "
        + (f"{accuracy['pruned']:.4f} pruned, " if "pruned" in accuracy else "")
        + f"{accuracy['compressed']:.4f} compressed (read back from {output})")
    out(f"wrote {output}: {file_bytes} bytes, {dense_bytes / file_bytes:.1f}x smaller than the float32 "
        f"weights ({dense_bytes} bytes)")
    return CompressResult(accuracy, table, file_bytes, dense_bytes)


# ---- the lecture's table -----------------------------------------------------------------------

def compression_table(raw: dict[str, np.ndarray], shared: dict[str, SharedLayer]) -> str:
    """Per layer: #weights, weights% kept (P), bits per weight code and per index (P+Q: the best
    fixed widths; P+Q+H: as Huffman-coded in the file, when it is), and compress rate (bits stored
    over 32 per weight, codebook and code tables included). Raw arrays count at their own size."""
    huffman = any(s.codes.lengths is not None for s in shared.values())
    h = (lambda v: v) if huffman else (lambda v: "-")
    head = ["Layer", "#Weights", "Weights% (P)", "Weight bits (P+Q)", "Weight bits (P+Q+H)", "Index bits (P+Q)",
            "Index bits (P+Q+H)", "Compress rate (P+Q)", "Compress rate (P+Q+H)"]
    rows = []
    t = dict.fromkeys(["n", "kept", "pq", "pqh", "code_pq", "code_h", "index_pq", "index_pq_count", "index_h",
                       "index_count"], 0)
    for name, s in shared.items():
        n = int(np.prod(s.shape))
        b, pq = s.fixed()
        index_pq = pq - s.codes.count * s.codes.width - 32 * len(s.centroids)
        index_entries = index_pq // b if b else 0
        rows.append([name, _count(n), f"{100 * s.nnz / max(n, 1):.1f}%", str(s.codes.width),
                     h(f"{s.codes.bits / max(s.nnz, 1):.1f}"), str(b), h(f"{s.gaps.bits / max(s.gaps.count, 1):.1f}"),
                     f"{100 * pq / (32 * n):.2f}%", h(f"{100 * s.bits() / (32 * n):.2f}%")])
        for k, v in [("n", n), ("kept", s.nnz), ("pq", pq), ("pqh", s.bits()), ("code_pq", s.nnz * s.codes.width),
                     ("code_h", s.codes.bits), ("index_pq", index_pq), ("index_pq_count", index_entries),
                     ("index_h", s.gaps.bits), ("index_count", s.gaps.count)]:
            t[k] += v
    n_raw = sum(int(v.size) for v in raw.values())
    raw_bits = sum(int(v.size) * v.dtype.itemsize * 8 for v in raw.values())
    if raw:
        rate = f"{100 * raw_bits / (32 * n_raw):.1f}%"
        rows.append(["others (raw)", _count(n_raw), "100%", "-", "-", "-", "-", rate, h(rate)])
    total, pq, pqh = t["n"] + n_raw, t["pq"] + raw_bits, t["pqh"] + raw_bits
    per = lambda a, b: f"{t[a] / max(t[b], 1):.1f}"  # noqa: E731
    rows.append(["Total", _count(total), f"{100 * t['kept'] / max(t['n'], 1):.1f}% ({t['n'] / max(t['kept'], 1):.0f}x)",
                 per("code_pq", "kept"), h(per("code_h", "kept")), per("index_pq", "index_pq_count"),
                 h(per("index_h", "index_count")), f"{100 * pq / (32 * total):.2f}% ({32 * total / pq:.0f}x)",
                 h(f"{100 * pqh / (32 * total):.2f}% ({32 * total / pqh:.0f}x)")])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def _count(n: int) -> str:
    return f"{n / 1000:.0f}K" if n >= 10_000 else str(n)


def rate_bits(raw: dict[str, np.ndarray], shared: dict[str, SharedLayer]) -> tuple[int, int, int]:
    """(float32 bits of every array, bits stored without Huffman, bits stored as the file codes them)."""
    n = sum(int(v.size) for v in raw.values()) + sum(math.prod(s.shape) for s in shared.values())
    raw_bits = sum(int(v.size) * v.dtype.itemsize * 8 for v in raw.values())
    return (32 * n, raw_bits + sum(s.fixed()[1] for s in shared.values()),
            raw_bits + sum(s.bits() for s in shared.values()))


# ---- tdc compress ------------------------------------------------------------------------------

def add_compress_arguments(p) -> None:
    from .prune import SCOPES
    p.add_argument("model", metavar="MODEL", help="FILE.py[:NAME] with a @tdc.model")
    p.add_argument("--weights", required=True, metavar="W", help="its trained weights (tdc train --save-weights)")
    p.add_argument("--data", default="digits", metavar="DATA",
                   help="what to retrain and measure accuracy on, as tdc train --data takes it (default digits)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="the compressed model file to write (tdc run/compile --weights read it)")
    p.add_argument("--prune", type=float, metavar="S",
                   help="zero the fraction S of smallest linear, matmul and conv2d weights, then retrain")
    p.add_argument("--prune-scope", default="layer", choices=SCOPES,
                   help="S of each layer (layer, the default) or one threshold over all of them (global)")
    p.add_argument("--prune-schedule", default="oneshot", metavar="oneshot|iterative:N",
                   help="as tdc train's: prune at once, or ramp up to S over N epochs (default oneshot)")
    p.add_argument("--quantize", required=True, metavar="kmeans:K[:INIT]|binary|ternary",
                   help="share each weight's survivors among K centroids (2..256) found by k-means, initialised "
                        "linear (default), density or random; or binary (sign and a scale per sign) or ternary "
                        "(binary, with the weights under 0.7 mean |w| pruned); then retrain the centroids")
    p.add_argument("--huffman", action="store_true", help="Huffman-code the cluster codes and the index gaps")
    p.add_argument("--epochs", type=int, default=4, help="retraining epochs after pruning (default 4)")
    p.add_argument("--share-epochs", type=int, default=2, help="epochs retraining the centroids (default 2)")
    p.add_argument("--batch", type=int, help="mini-batch size (default: the model's batch)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate while retraining (default 1e-3)")
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"),
                   help="the learning rate while retraining after pruning (default constant; cosine: down to 0)")
    p.add_argument("--backend", default="llvm", choices=("llvm", "numba", "reference"),
                   help="where retraining and evaluation run (default llvm)")
    p.add_argument("--seed", type=int, default=0, help="data order and k-means' random initialization (default 0)")


def cmd_compress(args) -> int:
    from ..ir.weights import load_weights
    from .data import load_data
    from .trainer import _as_model
    if args.epochs < 0 or args.share_epochs < 0:
        raise TdcError("--epochs and --share-epochs must be >= 0")
    if args.batch is not None and args.batch < 1:
        raise TdcError(f"--batch must be >= 1, got {args.batch}")
    quantize = Quantize.parse(args.quantize)
    if args.prune is None and (args.prune_scope != "layer" or args.prune_schedule != "oneshot"):
        raise TdcError("--prune-scope and --prune-schedule go with --prune S")
    prune = Prune(args.prune, args.prune_scope, args.prune_schedule) if args.prune is not None else None
    if prune is not None and args.epochs <= prune.last_epoch():
        raise TdcError(f"--prune-schedule {prune.schedule} needs more than {prune.last_epoch()} --epochs")
    model = _as_model(args.model)
    params = load_weights(args.weights, model.trace(args.batch or model.batch, training=False))
    compress(model, params, load_data(args.data), args.output, prune=prune, quantize=quantize, huffman=args.huffman,
             epochs=args.epochs, share_epochs=args.share_epochs, batch=args.batch,
             optimizer=Optimizer("adam", lr=args.lr), schedule=args.schedule, backend=args.backend, seed=args.seed)
    return 0
