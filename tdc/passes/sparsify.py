"""The sparsify pass: pruned linear layers of an inference graph as CSR products.

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

Modes: "auto" (the cost model decides), "on" (every such layer with density < 1 goes sparse),
"off" (nothing changes). The pass is for inference: a graph that updates params is refused, since
the op has no gradient and the CSR arrays would not follow the weights' updates.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph
from ..ir.types import TensorType
from ..ops.sparse import INDEX_DTYPE, to_csr
from .target import Target, read_json, targets_path, update_json

MODES = ("auto", "on", "off")
SUFFIXES = (".values", ".cols", ".rowptr")
SMALL_BATCH = 4            # rows below which the kernels run row by row (runtime/sparse.c, kernels.py)
# Probe layers (in, out) at one row (the GEMV path, no transposes) and at a batch: a tiny one, whose
# time is the kernels' per-call cost (what the small layers, such as the MLP's 100x10 at well under
# a microsecond, mostly consist of), and a large one for the rates, sparse at two densities.
TINY, ROW_PROBE, BATCH_PROBE, BATCH = (8, 4), (768, 384), (512, 256), 64
PROBE_DENSITIES = (0.05, 0.25)
RATES_VERSION = 2


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
    cached = getattr(target, "_sparse_rates", None)
    if cached is not None:
        return cached
    key = f"{target.cache_key()}|sparse_linear|v{RATES_VERSION}"
    entry = read_json(targets_path()).get(key)
    try:
        rates = SparseRates(*(float(entry[f]) for f in SparseRates.__dataclass_fields__))
    except (TypeError, KeyError, ValueError):
        rates = calibrate(target)
        update_json(targets_path(), key, {**rates.__dict__, "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    target._sparse_rates = rates
    return rates


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
    """(graph, params, one Decision per candidate layer) with the chosen layers as sparse_linear.
    `target` prices the layers in mode "auto"; "on" and "off" need none."""
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
    rates = None
    for node in list(g.nodes):
        if node.op != "linear":
            continue
        w = node.inputs[1]
        if not (w.is_arg and w.kind == "param" and w.name in params and w.type.dtype in ("f32", "f64")):
            continue
        wv = np.asarray(params[w.name], w.type.np_dtype)
        n, k = w.type.shape
        m = int(np.prod(node.inputs[0].type.shape[:-1], dtype=np.int64))
        nnz = int(np.count_nonzero(wv))
        if mode == "on":
            sparse = nnz < n * k
            why = f"density {nnz / max(n * k, 1):.4f} ({nnz} of {n * k}), --sparse on"
        else:
            rates = rates or sparse_rates(target)
            t_dense, t_sparse = rates.times(m, k, n, nnz)
            sparse = t_sparse < t_dense
            why = (f"density {nnz / max(n * k, 1):.4f} ({nnz} of {n * k}); {target.name} cost model at {m} rows: "
                   f"sparse {t_sparse * 1e6:.3g} us, dense {t_dense * 1e6:.3g} us "
                   f"(break-even density {rates.break_even(m, k, n):.3f})")
        decisions.append(Decision(w.name, (n, k), nnz, sparse, why))
        if not sparse:
            continue
        if w.name not in csr_of:
            arrays = to_csr(wv)
            names = [w.name + s for s in SUFFIXES]
            clash = [a for a in names if any(x.name == a for x in g.args)]
            if clash:
                raise TdcError(f"sparsify: graph {g.name} already has an argument named {clash[0]!r}")
            types = [TensorType(w.type.dtype, arrays[0].shape), TensorType(INDEX_DTYPE, arrays[1].shape),
                     TensorType(INDEX_DTYPE, arrays[2].shape)]
            csr_of[w.name] = [g.add_arg(a, t, "const") for a, t in zip(names, types)]
            params.update(zip(names, arrays))
        sl = g.emit("sparse_linear", [node.inputs[0], *csr_of[w.name], *node.inputs[2:]], {"note": why},
                    placement=node.placement, loc=node.loc)[0]
        _replace(g, node, sl)
    used = {v for nd in g.nodes for v in nd.inputs} | {v for _, v in g.outputs}
    for a in [a for a in g.args if a.name in csr_of and a not in used]:
        g.args.remove(a)
        params.pop(a.name, None)
    g.toposort()
    return g, params, decisions


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
        return "// sparsify: no linear layer with a weight param of f32 or f64 to consider"
    return "\n".join(f"// sparsify: {d.line()}" for d in decisions)
