"""The sparsify pass: pruned linear and conv2d layers of an inference graph as CSR products.

Given a graph and its params (name -> array), every `linear` whose weight W is a param (f32 or
f64, with its value given) is priced both ways on the target, from W's measured density:

    dense:   C_dense(M) + 2 M K N / R_dense(M)          (the BLAS GEMM, or GEMV for M < 4)
    sparse:  C_sparse(M) + M nnz / R_nz(M) + M N / R_out   (row by row, M < 4)
             C_sparse(M) + M nnz / R_nz(M) + M (K + N) / R_pack   (a batch: R_pack its transposes)

where M is the layer's rows (batch), [N, K] W's shape and nnz its nonzeros. The rates are this
machine's, measured on the target's own kernels the first time they are needed (`calibrate`:
a small and a large probe layer at one row and at a batch, the sparse kernel at two densities
each; C is the per-call time the small layers mostly consist of, the Python call excluded) and kept
in targets.json with the target's other rates. A layer whose sparse time is lower becomes
`sparse_linear(x, W.values, W.cols, W.rowptr[, b])`; the CSR arrays are new `const` args and W
leaves the graph and the params if nothing else reads it. The node's `note` says why (density,
both modelled times, the break-even density), which `tdc dump` prints.

A conv2d whose weight [CO, C/groups, KH, KW] is such a param is priced the same way as the CSR
matrix [CO, C/groups*KH*KW]: dense is the conv_algo pass's estimate for the algorithm it would pick
(its calibrated model), sparse

    C_conv + (copies x R_copy + multiply-adds x R_mac) / min(N, threads)

where the copies are the padded images (or, where the target has no such path or the stride is
not 1, the im2col columns) and the outputs, and the multiply-adds one per nonzero and computed
output position; the three coefficients are fitted to the target's sparse_conv2d kernel on probe
layers (`calibrate_conv`). A chosen layer becomes `sparse_conv2d(x, W.values, W.cols, W.rowptr[, b])`.

Modes: "auto" (the cost model decides), "on" (every such layer with density < 1 goes sparse),
"off" (nothing changes). The pass is for inference: a graph that updates params is refused, since
its CSR arrays are consts made from the weights' values, which the updates would leave behind.
Training with the pruned pattern fixed is `sparse_training`, on the forward graph before
train_step: the values become the param.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph
from ..ir.types import TensorType
from ..ops.sparse import INDEX_DTYPE, check_csr, dense_weight, to_csr
from .conv_algo import choose, conv_problem, estimate, nonnegative_fit
from .target import Target, read_json, targets_path, update_json

MODES = ("auto", "on", "off")
SUFFIXES = (".values", ".cols", ".rowptr")
SMALL_BATCH = 4            # rows below which the kernels run row by row (runtime/sparse.c, kernels.py)
# Probe layers (in, out) at one row (the GEMV path, no transposes) and at a batch: a tiny one, whose
# time is the kernels' per-call cost (what the small layers, such as the MLP's 100x10 at well under
# a microsecond, mostly consist of), and a large one for the rates, sparse at two densities.
TINY, ROW_PROBE, BATCH_PROBE, BATCH = (8, 4), (768, 384), (512, 256), 64
PROBE_DENSITIES = (0.05, 0.25)
RATES_VERSION = 3   # 3: the llvm probes timed in C loops (runtime/timing.c)


@dataclass(frozen=True)
class SparseRates:
    dense_row_call: float   # seconds per call of the dense linear on one row, beyond its flops
    dense_row: float        # its flop/s
    dense_batch_call: float
    dense_batch: float
    sparse_row_call: float  # seconds per call of the sparse kernel, row by row
    row_out: float          # outputs per second it loops over beyond their nonzeros (N per row)
    nz_row: float           # nonzeros x rows per second
    sparse_batch_call: float
    pack: float             # elements per second of the batch path's transposes, (K + N) per row
    nz_batch: float

    def times(self, m: int, k: int, n: int, nnz: int) -> tuple[float, float]:
        """(dense, sparse) modelled seconds of one call on an [m, k] input and an [n, k] weight."""
        if m < SMALL_BATCH:
            dense = self.dense_row_call + 2.0 * m * k * n / self.dense_row
            return dense, self.sparse_row_call + m * (n / self.row_out + nnz / self.nz_row)
        dense = self.dense_batch_call + 2.0 * m * k * n / self.dense_batch
        return dense, self.sparse_batch_call + m * ((k + n) / self.pack + nnz / self.nz_batch)

    def break_even(self, m: int, k: int, n: int) -> float:
        """The density below which the sparse kernel is modelled faster (0 if never, 1 if always)."""
        dense, fixed = self.times(m, k, n, 0)
        per_nz = self.times(m, k, n, 1)[1] - fixed
        return float(np.clip((dense - fixed) / (per_nz * k * n), 0.0, 1.0)) if k * n else 1.0


def calibrate(target: Target) -> SparseRates:
    """Time the target's dense and sparse linear kernels on the probe layers and fit the model."""
    fitted = []
    for m, (k, n) in ((1, ROW_PROBE), (BATCH, BATCH_PROBE)):
        d_call, s_call = target.time_linear(m, *TINY), target.time_sparse_linear(m, *TINY, 1.0)
        dense = 2.0 * m * k * n / max(target.time_linear(m, k, n) - d_call, 1e-9)
        d_call = max(d_call - 2.0 * m * TINY[0] * TINY[1] / dense, 0.0)    # the tiny layer's flops
        nnz = [m * round(d * k * n) for d in PROBE_DENSITIES]
        t = [target.time_sparse_linear(m, k, n, d) for d in PROBE_DENSITIES]
        per_nz = max((t[1] - t[0]) / (nnz[1] - nnz[0]), 1e-15)
        elems = (lambda k, n: m * (n if m < SMALL_BATCH else k + n))
        s_call = max(s_call - m * TINY[0] * TINY[1] * per_nz, 0.0)    # the tiny layer's nonzeros
        per_elem = max(t[0] - per_nz * nnz[0] - s_call, 1e-15) / elems(k, n)
        s_call = max(s_call - elems(*TINY) * per_elem, 0.0)           # and its rows
        fitted.append((d_call, dense, s_call, 1.0 / per_elem, 1.0 / per_nz))
    (drc, dr, src, ro, nzr), (dbc, db, sbc, pack, nzb) = fitted
    return SparseRates(drc, dr, dbc, db, src, ro, nzr, sbc, pack, nzb)


def sparse_rates(target: Target) -> SparseRates:
    """This machine's rates for `target`: cached in targets.json, or measured now (once)."""
    return _cached_rates(target, f"sparse_linear|v{RATES_VERSION}", SparseRates, calibrate)


def _cached_rates(target: Target, kind: str, cls, measure):
    """Rates of dataclass `cls` for `target`, kept on it and in targets.json under `kind`, or
    measured now by measure(target)."""
    attr = "_rates_" + kind
    if getattr(target, attr, None) is not None:
        return getattr(target, attr)
    key = f"{target.cache_key()}|{kind}"
    entry = read_json(targets_path()).get(key)
    try:
        rates = cls(*(float(entry[f]) for f in cls.__dataclass_fields__))
    except (TypeError, KeyError, ValueError):
        rates = measure(target)
        update_json(targets_path(), key, {**rates.__dict__, "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    setattr(target, attr, rates)
    return rates


# ---- conv2d --------------------------------------------------------------------------------

# (x, w, stride) of the probe layers (pad 1): a tiny one (the per-call cost), one channel of large
# images, many channels of small ones, and a strided one (the im2col path); each at two densities.
CONV_PROBES = (((1, 2, 6, 6), (4, 2, 3, 3), 1), ((8, 1, 28, 28), (8, 1, 5, 5), 1), ((8, 16, 12, 12), (16, 16, 3, 3), 1),
               ((4, 16, 16, 16), (16, 16, 3, 3), 2))
CONV_RATES_VERSION = 1


@dataclass(frozen=True)
class SparseConvRates:
    call: float     # seconds per call
    copy: float     # seconds per element copied (padded images or im2col columns, and outputs)
    mac: float      # seconds per multiply-add (a nonzero at one computed position)

    def time(self, p: dict, nnz: int, wide: bool, threads: int) -> float:
        copies, macs = sparse_conv_work(p, nnz, wide)
        return self.call + (self.copy * copies + self.mac * macs) / max(1, min(p["x"][0], threads))


def sparse_conv_work(p: dict, nnz: int, wide: bool) -> tuple[int, int]:
    """(elements copied, multiply-adds) of a sparse_conv2d on conv problem `p` (passes/conv_algo.py)
    with `nnz` nonzeros: the kernels' loops counted (runtime/sparse.c, numba kernels.py)."""
    n, c, _, _ = p["x"]
    co, _, kh, kw = p["w"]
    _, _, oh, ow = p["y"]
    dh, dw = p["dilation"]
    if wide and tuple(p["stride"]) == (1, 1):
        hp, wp = oh + (kh - 1) * dh, ow + (kw - 1) * dw
        return n * (c * hp * wp + co * oh * ow), n * nnz * oh * wp
    return n * (c * kh * kw + co) * oh * ow, n * nnz * oh * ow


def _conv_probe(x_shape, w_shape, stride, density, rng):
    """A sparse_conv2d node (pad 1) with a random CSR weight of `density`, and its input arrays."""
    co, k = w_shape[0], int(np.prod(w_shape[1:]))
    w = rng.standard_normal((co, k)).astype(np.float32)
    w[rng.random((co, k)) >= density] = 0
    arrays = [rng.standard_normal(x_shape).astype(np.float32), *to_csr(w)]
    g = Graph("probe")
    args = [g.add_arg("x", TensorType("f32", x_shape), "input")] + [
        g.add_arg(name, TensorType(dtype, a.shape), "const")
        for name, dtype, a in zip(("v", "c", "r"), ("f32", INDEX_DTYPE, INDEX_DTYPE), arrays[1:])]
    g.emit("sparse_conv2d", args, {"kernel": w_shape[2:], "stride": (stride, stride), "pad": (1, 1, 1, 1)})
    return g.nodes[0], arrays


def calibrate_conv(target: Target) -> SparseConvRates:
    """Time the target's sparse_conv2d on the probe layers and fit its three coefficients."""
    rng = np.random.default_rng(0)
    rows, measured = [], []
    for x_shape, w_shape, stride in CONV_PROBES:
        for density in PROBE_DENSITIES:
            node, arrays = _conv_probe(x_shape, w_shape, stride, density, rng)
            p = conv_problem_of(node)
            copies, macs = sparse_conv_work(p, len(arrays[1]), target.sparse_conv_wide)
            threads = max(1, min(x_shape[0], target.threads()))
            rows.append((1.0, copies / threads, macs / threads))
            measured.append(target.time_sparse_conv(node, arrays))
    return SparseConvRates(*nonnegative_fit(rows, measured))


def conv_problem_of(node) -> dict:
    """conv_problem for a sparse_conv2d node: its weight's shape from the CSR rows and the kernel."""
    a, x = node.attrs, node.inputs[0].type.shape
    w = (node.inputs[3].type.shape[0] - 1, x[1] // a["groups"], *a["kernel"])
    return {"op": "conv2d", "x": tuple(x), "w": w, "y": tuple(node.outputs[0].type.shape),
            "stride": tuple(a["stride"]), "pad": tuple(a["pad"]), "dilation": tuple(a["dilation"]),
            "groups": a["groups"], "dtype": node.inputs[0].type.dtype}


def sparse_conv_rates(target: Target) -> SparseConvRates:
    """This machine's sparse_conv2d rates for `target`: cached in targets.json, or measured now (once)."""
    return _cached_rates(target, f"sparse_conv2d|v{CONV_RATES_VERSION}", SparseConvRates, calibrate_conv)


def dense_conv_time(node, target: Target) -> float:
    """The conv_algo pass's estimate for conv2d `node` by the algorithm it would choose."""
    algo, _ = choose(node, node.attrs["algo"], target, filter_cached=True)
    return estimate(conv_problem(node), algo, target, filter_cached=True)


@dataclass
class Decision:
    weight: str
    shape: tuple[int, int]
    nnz: int
    sparse: bool
    why: str

    @property
    def density(self) -> float:
        return self.nnz / max(self.shape[0] * self.shape[1], 1)

    def line(self) -> str:
        return f"{self.weight} [{self.shape[0]},{self.shape[1]}]: {'csr' if self.sparse else 'dense'}, {self.why}"


def sparsify(graph: Graph, params: dict, target: Target | None = None,
             mode: str = "auto") -> tuple[Graph, dict, list[Decision]]:
    """(graph, params, one Decision per candidate layer) with the chosen layers as sparse_linear or
    sparse_conv2d. `target` prices the layers in mode "auto"; "on" and "off" need none."""
    if mode not in MODES:
        raise TdcError(f"--sparse must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return graph, params, []
    if graph.updates:
        raise TdcError(f"sparsify: graph {graph.name} updates params (a training step); sparse layers are for "
                       "inference graphs (sparse_linear has no gradient rule)")
    if mode == "auto" and target is None:
        raise TdcError("sparsify: --sparse auto needs a compiled backend's cost model (numba or llvm); "
                       "use --sparse on to make every pruned layer sparse")
    g, _ = graph.map_copy()
    params = dict(params)
    decisions: list[Decision] = []
    csr_of: dict[str, list] = {}       # weight name -> its const args (shared by every layer reading it)
    for node in list(g.nodes):
        if node.op not in ("linear", "conv2d"):
            continue
        w = node.inputs[1]
        if not (w.is_arg and w.kind == "param" and w.name in params and w.type.dtype in ("f32", "f64")):
            continue
        wv = np.asarray(params[w.name], w.type.np_dtype)
        n, k = w.type.shape[0], int(np.prod(w.type.shape[1:], dtype=np.int64))
        nnz = int(np.count_nonzero(wv))
        density = f"density {nnz / max(n * k, 1):.4f} ({nnz} of {n * k})"
        if mode == "on":
            sparse, why = nnz < n * k, f"{density}, --sparse on"
        else:
            t_dense, t_sparse, at, even = _priced(node, target, nnz)
            # a weight with no zeros does the dense product's work and loads an index per weight too:
            # a fitted model that says otherwise (noisy probes on a busy machine) is not believed
            sparse = t_sparse < t_dense and nnz < n * k
            why = (f"{density}; {target.name} cost model at {at}: sparse {t_sparse * 1e6:.3g} us, "
                   f"dense {t_dense * 1e6:.3g} us (break-even density {even:.3f})")
        decisions.append(Decision(w.name, (n, k), nnz, sparse, why))
        if not sparse:
            continue
        if w.name not in csr_of:
            arrays = to_csr(wv.reshape(n, k))
            names = [w.name + s for s in SUFFIXES]
            clash = [a for a in names if any(x.name == a for x in g.args)]
            if clash:
                raise TdcError(f"sparsify: graph {g.name} already has an argument named {clash[0]!r}")
            types = [TensorType(w.type.dtype, arrays[0].shape), TensorType(INDEX_DTYPE, arrays[1].shape),
                     TensorType(INDEX_DTYPE, arrays[2].shape)]
            csr_of[w.name] = [g.add_arg(a, t, "const") for a, t in zip(names, types)]
            params.update(zip(names, arrays))
        if node.op == "linear":
            op, attrs = "sparse_linear", {"note": why}
        else:
            geometry = {a: node.attrs[a] for a in ("stride", "pad", "dilation", "groups")}
            op, attrs = "sparse_conv2d", {"kernel": w.type.shape[2:], **geometry, "note": why}
        new = g.emit(op, [node.inputs[0], *csr_of[w.name], *node.inputs[2:]], attrs,
                     placement=node.placement, loc=node.loc)[0]
        _replace(g, node, new)
    used = {v for nd in g.nodes for v in nd.inputs} | {v for _, v in g.outputs}
    for a in [a for a in g.args if a.name in csr_of and a not in used]:
        g.args.remove(a)
        params.pop(a.name, None)
    g.toposort()
    return g, params, decisions


# ---- training with a fixed pattern -----------------------------------------------------------------

def sparse_training(graph: Graph, params: dict) -> tuple[Graph, dict, list[Decision]]:
    """(graph, params, decisions) for training with the pruned pattern fixed: every linear whose
    weight param W has zeros becomes sparse_linear(x, W.values, W.cols, W.rowptr[, b]) with the
    values a param (what the optimizer updates: the pruned weights are not stored, so they stay
    exactly zero) and the indices consts. `graph` is a forward graph, before train_step; `params`
    holds W, or (resuming) the CSR arrays themselves. conv2d layers stay dense: sparse_conv2d has
    no gradient kernels."""
    if graph.updates:
        raise TdcError(f"sparse training: convert the forward graph before train_step, not {graph.name}'s step")
    g, _ = graph.map_copy()
    params = dict(params)
    decisions = []
    for node in list(g.nodes):
        w = node.inputs[1] if node.op == "linear" else None
        if w is None or not (w.is_arg and w.kind == "param" and w.type.dtype in ("f32", "f64")):
            continue
        names = [w.name + s for s in SUFFIXES]
        if w.name in params:
            arrays = to_csr(np.asarray(params.pop(w.name), w.type.np_dtype))
        elif all(nm in params for nm in names):
            arrays = tuple(params[nm] for nm in names)
        else:
            continue
        n, k = w.type.shape
        if len(arrays[0]) == n * k:
            params[w.name] = dense_weight(*arrays, k)      # nothing pruned: the dense kernels are faster
            continue
        check_csr(*arrays, k, f"sparse training of {w.name}")
        kinds = ("param", "const", "const")
        types = [TensorType(w.type.dtype, arrays[0].shape), TensorType(INDEX_DTYPE, arrays[1].shape),
                 TensorType(INDEX_DTYPE, arrays[2].shape)]
        csr = [g.add_arg(nm, t, kind) for nm, t, kind in zip(names, types, kinds)]
        params.update(zip(names, arrays))
        decisions.append(Decision(w.name, (n, k), len(arrays[0]), True,
                                  f"density {len(arrays[0]) / (n * k):.4f}, trained as CSR (pattern fixed)"))
        new = g.emit("sparse_linear", [node.inputs[0], *csr, *node.inputs[2:]], {"note": decisions[-1].why},
                     placement=node.placement, loc=node.loc)[0]
        _replace(g, node, new)
        if any(w in nd.inputs for nd in g.nodes):
            raise TdcError(f"sparse training: weight {w.name} is read by another layer too; its pattern cannot "
                           "be trained as CSR in one place and dense in the other")
        g.args.remove(w)
    g.toposort()
    return g, params, decisions


def dense_params(graph: Graph, state: dict) -> dict:
    """`state` with each sparse_linear's CSR arrays (W.values, W.cols, W.rowptr) replaced by the
    dense weight W they describe: what the inference graph and --save-weights take."""
    out = dict(state)
    for node in graph.nodes:
        if node.op != "sparse_linear" or not node.inputs[1].name.endswith(SUFFIXES[0]):
            continue
        names = [v.name for v in node.inputs[1:4]]
        if not all(nm in state for nm in names):
            continue
        weight = names[0][:-len(SUFFIXES[0])]
        out[weight] = dense_weight(*(state[nm] for nm in names), node.inputs[0].type.shape[-1])
        for nm in names:
            out.pop(nm, None)
    return out


def _priced(node, target: Target, nnz: int) -> tuple[float, float, str, float]:
    """(dense seconds, sparse seconds, what they are for, break-even density) of layer `node` with
    `nnz` nonzeros in its weight, by the target's cost models."""
    if node.op == "linear":
        n, k = node.inputs[1].type.shape
        m = int(np.prod(node.inputs[0].type.shape[:-1], dtype=np.int64))
        rates = sparse_rates(target)
        return (*rates.times(m, k, n, nnz), f"{m} rows", rates.break_even(m, k, n))
    rates, p = sparse_conv_rates(target), conv_problem(node)
    size = int(np.prod(p["w"]))
    dense = dense_conv_time(node, target)
    fixed = rates.time(p, 0, target.sparse_conv_wide, target.threads())
    per_nz = rates.time(p, 1, target.sparse_conv_wide, target.threads()) - fixed
    even = float(np.clip((dense - fixed) / (per_nz * size), 0.0, 1.0)) if size and per_nz > 0 else 1.0
    return dense, rates.time(p, nnz, target.sparse_conv_wide, target.threads()), f"batch {p['x'][0]}", even


def _replace(g: Graph, node, new_value) -> None:
    """Make every reader of node's output read new_value instead, and drop node."""
    old = node.outputs[0]
    new_node = new_value.producer
    g.nodes.remove(new_node)
    g.nodes[g.nodes.index(node)] = new_node     # in node's place: its inputs are computed before it
    for nd in g.nodes:
        nd.inputs = [new_value if v is old else v for v in nd.inputs]
    g.outputs = [(name, new_value if v is old else v) for name, v in g.outputs]


def report(decisions: list[Decision]) -> str:
    """What `tdc dump --sparse` prints above the graph: one line per candidate layer."""
    if not decisions:
        return "// sparsify: no linear or conv2d layer with a weight param of f32 or f64 to consider"
    return "\n".join(f"// sparsify: {d.line()}" for d in decisions)
