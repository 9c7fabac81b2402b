"""Sparse products: a linear layer whose weight is stored in CSR (compressed sparse rows).

    sparse_linear(x [..., K], values [nnz], cols [nnz] i32, rowptr [N+1] i32[, bias [N]]) -> [..., N]

computes x @ W.T (+ bias) for the [N, K] matrix W whose row n holds values[rowptr[n]:rowptr[n+1]]
at columns cols[rowptr[n]:rowptr[n+1]] (zeros elsewhere). N comes from rowptr's length and K from
x's last dim, so the op takes no attributes but a `note` the sparsify pass writes (why the layer is
sparse: its density and the cost model's times), which `tdc dump` shows.

The CSR arrays are data, not types: inference cannot check that they describe a matrix. `check_csr`
does (rowptr starts at 0, never decreases, ends at nnz; every column in [0, K)); the reference runs
it on every call and the compiled executables when they bind the arrays, since their kernels index
memory with them. Duplicate (row, column) entries are summed, as scipy's CSR product does.

Its gradient keeps the pattern: w.r.t. x it is the product with W's transpose
(sparse_linear_grad_input), w.r.t. the values one dot product per nonzero
(sparse_linear_grad_values: dv[j] = sum over rows of dy[:, row(j)] * x[:, cols[j]]), so a training
step with the values as a param updates only the weights that survive pruning, and the pruned
ones stay exactly zero whatever the optimizer does (passes/sparsify.py: sparse_training).
"""
from __future__ import annotations

import numpy as np

from ..errors import TdcError
from ..ir.opdef import Attr, defop
from ..ir.types import TensorType
from . import functional as F
from .common import fail, need_float, numel
from .conv import GEOMETRY, _conv2d_ref, conv_out_shape

INDEX_DTYPE = "i32"


def _infer(ins, note):
    x, values, cols, rowptr = ins[:4]
    need_float(x)
    if x.rank < 1:
        fail("x needs rank >= 1")
    if values.dtype != x.dtype:
        fail(f"values must be {x.dtype} like x, got {values.dtype}")
    if values.rank != 1 or cols.shape != values.shape:
        fail(f"values and cols must be vectors of the same length (nnz), got {list(values.shape)} and "
             f"{list(cols.shape)}")
    if cols.dtype != INDEX_DTYPE or rowptr.dtype != INDEX_DTYPE:
        fail(f"cols and rowptr must be {INDEX_DTYPE}, got {cols.dtype} and {rowptr.dtype}")
    if rowptr.rank != 1 or rowptr.shape[0] < 1:
        fail(f"rowptr must be [N+1] with N >= 0, got {list(rowptr.shape)}")
    n = rowptr.shape[0] - 1
    if len(ins) == 5 and (ins[4].shape != (n,) or ins[4].dtype != x.dtype):
        fail(f"bias must be {x.dtype}[{n}], got {ins[4]}")
    return TensorType(x.dtype, x.shape[:-1] + (n,))


def check_csr(values: np.ndarray, cols: np.ndarray, rowptr: np.ndarray, k: int, what: str = "sparse_linear"):
    """Raise a one-line error unless (values, cols, rowptr) is a CSR matrix with K = k columns."""
    nnz = len(values)
    rp = np.asarray(rowptr, np.int64)
    if len(rp) < 1 or rp[0] != 0 or rp[-1] != nnz or np.any(np.diff(rp) < 0):
        raise TdcError(f"{what}: rowptr must start at 0, never decrease and end at nnz={nnz}; got "
                       f"{rp[:4].tolist()}{'...' if len(rp) > 4 else ''} ending at {rp[-1] if len(rp) else None}")
    c = np.asarray(cols, np.int64)
    if len(c) and (c.min() < 0 or c.max() >= k):
        raise TdcError(f"{what}: column indices must lie in [0, {k}), got {c.min()}..{c.max()}")


def csr_columns(op: str, x_shape, attrs) -> int:
    """K, the columns of the CSR weight of a sparse_linear or sparse_conv2d whose x has `x_shape`."""
    if op == "sparse_linear":
        return x_shape[-1]
    return x_shape[1] // attrs["groups"] * attrs["kernel"][0] * attrs["kernel"][1]


def dense_weight(values, cols, rowptr, k: int) -> np.ndarray:
    """The [N, K] matrix a CSR triple describes (duplicates summed)."""
    n = len(rowptr) - 1
    w = np.zeros((n, k), values.dtype)
    rows = np.repeat(np.arange(n), np.diff(np.asarray(rowptr, np.int64)))
    np.add.at(w, (rows, np.asarray(cols, np.int64)), values)
    return w


def to_csr(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, cols, rowptr) of the nonzeros of a 2-D array, row by row, columns ascending."""
    if w.ndim != 2:
        raise TdcError(f"to_csr needs a 2-D weight, got shape {list(w.shape)}")
    rows, cols = np.nonzero(w)
    counts = np.bincount(rows, minlength=w.shape[0])
    rowptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return np.ascontiguousarray(w[rows, cols]), cols.astype(np.int32), rowptr


def _rows(rowptr) -> np.ndarray:
    """The row of each nonzero."""
    rp = np.asarray(rowptr, np.int64)
    return np.repeat(np.arange(len(rp) - 1), np.diff(rp))


def _ref(x, values, cols, rowptr, bias=None, note=""):
    k = x.shape[-1]
    check_csr(values, cols, rowptr, k)
    w = dense_weight(values, cols, rowptr, k)
    y = (x.reshape(numel(x.shape[:-1]), k) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))   # -1 fails when k = 0
    return y + bias if bias is not None else y


def _grad(ctx, x, values, cols, rowptr, b=None):
    n, k = rowptr.shape[0] - 1, x.shape[-1]
    g2 = F.reshape(ctx.g, (-1, n))
    x2 = F.reshape(x, (-1, k))
    gx = F.reshape(F.apply("sparse_linear_grad_input", g2, values, cols, rowptr, k=k), x.shape)
    grads = [gx, F.apply("sparse_linear_grad_values", x2, g2, cols, rowptr), None, None]
    return grads + ([F.sum(g2, 0)] if b is not None else [])


defop("sparse_linear", "sparse", arity=(4, 5), attrs={"note": Attr("str", "", doc="why the layer is sparse")},
      infer=_infer, ref=_ref, nondiff=(2, 3), grad=_grad,
      cost=lambda ins, outs, note: 2 * numel(outs[0].shape[:-1]) * ins[1].shape[0],
      doc="x @ W.T + b with W [N, K] in CSR: values [nnz], cols [nnz] i32, rowptr [N+1] i32")


def _check_index_args(cols, rowptr, nnz: int):
    if cols.dtype != INDEX_DTYPE or rowptr.dtype != INDEX_DTYPE or cols.shape != (nnz,) or rowptr.rank != 1 \
            or rowptr.shape[0] < 1:
        fail(f"cols must be {INDEX_DTYPE}[{nnz}] and rowptr {INDEX_DTYPE}[N+1], got {cols} and {rowptr}")


def _grad_input_infer(ins, k):
    g, values, cols, rowptr = ins
    need_float(g)
    _check_index_args(cols, rowptr, values.shape[0] if values.rank == 1 else -1)
    if g.rank != 2 or g.shape[1] != rowptr.shape[0] - 1 or values.dtype != g.dtype:
        fail(f"g must be [M, {rowptr.shape[0] - 1}] of the values' dtype, got {g} and values {values}")
    return TensorType(g.dtype, (g.shape[0], k))


def _grad_input_ref(g, values, cols, rowptr, k):
    check_csr(values, cols, rowptr, k, "sparse_linear_grad_input")
    return (g @ dense_weight(values, cols, rowptr, k)).astype(g.dtype)


def _grad_values_infer(ins):
    x, g, cols, rowptr = ins
    need_float(x)
    _check_index_args(cols, rowptr, cols.shape[0] if cols.rank == 1 else -1)
    if x.rank != 2 or g.rank != 2 or g.shape != (x.shape[0], rowptr.shape[0] - 1) or g.dtype != x.dtype:
        fail(f"x must be [M, K] and g [M, {rowptr.shape[0] - 1}] of one float dtype, got {x} and {g}")
    return TensorType(x.dtype, cols.shape)


def _grad_values_ref(x, g, cols, rowptr):
    check_csr(np.zeros(len(cols), x.dtype), cols, rowptr, x.shape[1], "sparse_linear_grad_values")
    c = np.asarray(cols, np.int64)
    return np.einsum("mj,mj->j", g[:, _rows(rowptr)], x[:, c]).astype(x.dtype)


defop("sparse_linear_grad_input", "sparse", arity=(4, 4), attrs={"k": Attr("int", doc="columns of W (x's last dim)")},
      infer=_grad_input_infer, ref=_grad_input_ref, nondiff=(1, 2, 3),
      cost=lambda ins, outs, k: 2 * ins[0].shape[0] * ins[1].shape[0],
      doc="g @ W for W [N, K] in CSR (values, cols, rowptr): sparse_linear's gradient w.r.t. x")
defop("sparse_linear_grad_values", "sparse", arity=(4, 4), infer=_grad_values_infer, ref=_grad_values_ref,
      nondiff=(0, 1, 2, 3), cost=lambda ins, outs: 2 * ins[0].shape[0] * ins[2].shape[0],
      doc="dv[j] = sum_m g[m, row(j)] * x[m, cols[j]]: sparse_linear's gradient w.r.t. its values")


# ---- sparse_conv2d ------------------------------------------------------------------------
# sparse_conv2d(x [N, C, H, W], values, cols, rowptr[, bias [CO]]) -> [N, CO, OH, OW]: conv2d with
# its weight [CO, C/groups, KH, KW] flattened to [CO, C/groups*KH*KW] and stored in CSR (rows are
# output channels, columns (c*KH + i)*KW + j, im2col's row order). The kernel shape is an attribute
# since the weight is gone. Inference only, like sparse_linear: no gradient rule.

def _conv_infer(ins, kernel, stride, pad, dilation, groups, note):
    x, values, cols, rowptr = ins[:4]
    need_float(x)
    if values.dtype != x.dtype or values.rank != 1 or cols.shape != values.shape:
        fail(f"values must be a {x.dtype} vector and cols an i32 vector of its length, got {values} and {cols}")
    if cols.dtype != INDEX_DTYPE or rowptr.dtype != INDEX_DTYPE or rowptr.rank != 1 or rowptr.shape[0] < 1:
        fail(f"cols and rowptr must be {INDEX_DTYPE} vectors, rowptr [CO+1]; got {cols} and {rowptr}")
    if x.rank != 4:
        fail(f"x must be NCHW (rank 4), got shape {list(x.shape)}")
    co = rowptr.shape[0] - 1
    cg = x.shape[1] // groups if groups >= 1 else 0
    out = conv_out_shape(x.shape, (co, cg, *kernel), stride, pad, dilation, groups, w_name="CSR weight")
    if len(ins) == 5 and (ins[4].shape != (co,) or ins[4].dtype != x.dtype):
        fail(f"bias must be {x.dtype}[{co}], got {ins[4]}")
    return TensorType(x.dtype, out)


def _conv_ref(x, values, cols, rowptr, bias=None, *, kernel, stride, pad, dilation, groups, note):
    co, k = len(rowptr) - 1, csr_columns("sparse_conv2d", x.shape, {"kernel": kernel, "groups": groups})
    check_csr(values, cols, rowptr, k, "sparse_conv2d")
    w = dense_weight(values, cols, rowptr, k).reshape(co, x.shape[1] // groups, *kernel)
    return _conv2d_ref(x, w, bias, stride=stride, pad=pad, dilation=dilation, groups=groups,
                       algo="auto", algo_note="")


CONV_ATTRS = {"kernel": Attr("ints", length=2, doc="(KH, KW) of the pruned weight"), **GEOMETRY,
              "note": Attr("str", "", doc="why the layer is sparse")}


def _conv_cost(ins, outs, **a):
    n, _, oh, ow = outs[0].shape
    return 2 * n * oh * ow * ins[1].shape[0]     # one multiply-add per nonzero and output pixel


defop("sparse_conv2d", "sparse", arity=(4, 5), attrs=CONV_ATTRS, infer=_conv_infer, ref=_conv_ref, nondiff=(2, 3),
      cost=_conv_cost,
      doc="conv2d(x, W[, b]) with W [CO, C/groups*KH*KW] in CSR (values, cols i32, rowptr [CO+1] i32); "
          "inference only")
