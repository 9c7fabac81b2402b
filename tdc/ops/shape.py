"""Ops that move data without arithmetic: reshape, transpose, flatten, concat, slice, pad, broadcast."""
from __future__ import annotations

import numpy as np

from ..ir.types import TensorType
from . import functional as F
from ..ir.opdef import Attr, defop
from ..errors import TdcError
from .common import broadcast_shapes, fail, need_float, norm_axis, numel, same_dtype


def _copy_cost(ins, outs, **a):
    return 0


# ---- reshape ------------------------------------------------------------------

def resolve_shape(size: int, shape) -> tuple[int, ...]:
    """Fill in one -1 so that the shape has `size` elements."""
    shape = list(shape)
    if shape.count(-1) > 1:
        fail(f"shape {shape} has more than one -1")
    if any(d < -1 for d in shape):
        fail(f"shape {shape} has a negative dimension")
    known = numel([d for d in shape if d != -1])
    if -1 in shape:
        if known == 0 or size % known:
            fail(f"cannot reshape {size} elements to {shape}")
        shape[shape.index(-1)] = size // known
    if numel(shape) != size:
        fail(f"cannot reshape {size} elements to {list(shape)}")
    return tuple(shape)


defop("reshape", "shape", storage=True, attrs={"shape": Attr("ints")},
      infer=lambda ins, shape: ins[0].with_shape(resolve_shape(ins[0].size, shape)),
      ref=lambda x, shape: np.reshape(x, resolve_shape(x.size, shape)).copy(),
      grad=lambda ctx, x: [F.reshape(ctx.g, x.shape)], cost=_copy_cost,
      doc="same elements, new shape (one dim may be -1)")


def _flatten_infer(ins, axis):
    x = ins[0]
    r = x.rank
    if r == 0:
        a = 0     # a scalar flattens to [1, 1] whatever the axis
    elif -r <= axis <= r:
        a = axis + r if axis < 0 else axis   # as in ONNX: a negative axis counts from the back of x's dims
    else:
        fail(f"axis {axis} is out of range for flatten of rank {r} (need {-r} <= axis <= {r})")
    return x.with_shape((numel(x.shape[:a]), numel(x.shape[a:])))


defop("flatten", "shape", storage=True, attrs={"axis": Attr("int", 1)}, infer=_flatten_infer,
      ref=lambda x, axis: x.reshape(_flatten_infer([TensorType.of(x)], axis).shape).copy(),
      grad=lambda ctx, x: [F.reshape(ctx.g, x.shape)], cost=_copy_cost,
      doc="2-D [prod(dims before axis), prod(dims from axis)]")

# ---- transpose ------------------------------------------------------------------


def _transpose_infer(ins, perm):
    x = ins[0]
    if sorted(perm) != list(range(x.rank)):
        fail(f"perm {list(perm)} is not a permutation of 0..{x.rank - 1}")
    return x.with_shape(tuple(x.shape[p] for p in perm))


defop("transpose", "shape", storage=True, attrs={"perm": Attr("ints")}, infer=_transpose_infer,
      ref=lambda x, perm: np.transpose(x, perm).copy(),   # (ascontiguousarray turns a scalar into [1])
      grad=lambda ctx, x: [F.transpose(ctx.g, tuple(np.argsort(ctx.attrs["perm"]).tolist()))],
      cost=_copy_cost, doc="permute dims: out.shape[i] = x.shape[perm[i]]")

# ---- broadcast_to ------------------------------------------------------------------


def _broadcast_infer(ins, shape):
    x = ins[0]
    if broadcast_shapes(x.shape, tuple(shape)) != tuple(shape):
        fail(f"{list(x.shape)} does not broadcast to {list(shape)}")
    return x.with_shape(shape)


defop("broadcast_to", "shape", storage=True, attrs={"shape": Attr("ints")}, infer=_broadcast_infer,
      ref=lambda x, shape: np.broadcast_to(x, shape).copy(),
      grad=lambda ctx, x: [F.sum_to(ctx.g, x.shape)], cost=_copy_cost,
      doc="numpy broadcasting to a given shape")

# ---- concat ----------------------------------------------------------------------


def _concat_infer(ins, axis):
    dt = same_dtype(ins)
    r = ins[0].rank
    if r == 0:
        fail("cannot concatenate scalars")
    a = norm_axis(axis, r)
    for t in ins:
        if t.rank != r or any(t.shape[i] != ins[0].shape[i] for i in range(r) if i != a):
            fail(f"shapes must match except on axis {axis}")
    shape = list(ins[0].shape)
    shape[a] = sum(t.shape[a] for t in ins)
    return TensorType(dt, tuple(shape))


def _concat_grad(ctx, *xs):
    a = norm_axis(ctx.attrs["axis"], xs[0].ndim)
    grads, off = [], 0
    for x in xs:
        starts = [0] * x.ndim
        ends = list(ctx.g.shape)
        starts[a], ends[a] = off, off + x.shape[a]
        grads.append(F.slice(ctx.g, starts, ends))
        off += x.shape[a]
    return grads


defop("concat", "shape", storage=True, arity=(1, None), attrs={"axis": Attr("int", 0)}, infer=_concat_infer,
      ref=lambda *xs, axis: np.concatenate(xs, axis=axis), grad=_concat_grad, cost=_copy_cost,
      doc="join tensors along an axis")

# ---- slice --------------------------------------------------------------------
# Attributes are normalized by the DSL: 0 <= start <= end <= dim and step >= 1 on every dim.

_SLICE_ATTRS = {"starts": Attr("ints"), "ends": Attr("ints"), "steps": Attr("ints")}


def _slice_shape(shape, starts, ends, steps):
    if not (len(starts) == len(ends) == len(steps) == len(shape)):
        fail(f"starts, ends and steps need one entry per dim ({len(shape)})")
    out = []
    for i, (d, s, e, st) in enumerate(zip(shape, starts, ends, steps)):
        if st < 1 or not (0 <= s <= e <= d):
            fail(f"dim {i}: need 0 <= start <= end <= {d} and step >= 1, got {s}:{e}:{st}")
        out.append(len(range(s, e, st)))
    return tuple(out)


def _slices(starts, ends, steps):
    return tuple(slice(s, e, st) for s, e, st in zip(starts, ends, steps))


defop("slice", "shape", storage=True, attrs=_SLICE_ATTRS,
      infer=lambda ins, starts, ends, steps: ins[0].with_shape(_slice_shape(ins[0].shape, starts, ends, steps)),
      ref=lambda x, starts, ends, steps: x[_slices(starts, ends, steps)].copy(),
      grad=lambda ctx, x: [F.apply("slice_grad", ctx.g, input_shape=x.shape, **ctx.attrs)],
      cost=_copy_cost, doc="x[start:end:step] on every dim")


def _slice_grad_infer(ins, input_shape, starts, ends, steps):
    if _slice_shape(input_shape, starts, ends, steps) != ins[0].shape:
        fail(f"gradient shape does not match the slice of {list(input_shape)}")
    return ins[0].with_shape(input_shape)


def _slice_grad_ref(g, input_shape, starts, ends, steps):
    out = np.zeros(input_shape, g.dtype)
    out[_slices(starts, ends, steps)] = g
    return out


defop("slice_grad", "shape", storage=True, attrs={"input_shape": Attr("ints"), **_SLICE_ATTRS}, infer=_slice_grad_infer,
      ref=_slice_grad_ref,
      grad=lambda ctx, g: [F.apply("slice", ctx.g, **{k: v for k, v in ctx.attrs.items() if k != "input_shape"})],
      cost=_copy_cost, doc="zeros of input_shape with g written into the slice (the adjoint of slice)")

# ---- pad --------------------------------------------------------------------------


def _pad_infer(ins, pads, value):
    x = ins[0]
    if len(pads) != 2 * x.rank:
        fail(f"pads needs {2 * x.rank} entries (begins then ends), got {len(pads)}")
    if any(p < 0 for p in pads):
        fail(f"negative pads {list(pads)} are not supported (use slice to crop)")
    return x.with_shape(tuple(d + pads[i] + pads[i + x.rank] for i, d in enumerate(x.shape)))


def _pad_ref(x, pads, value):
    r = x.ndim
    if r == 0:
        return x.copy()   # nothing to pad (np.pad rejects an empty pad list)
    return np.pad(x, [(pads[i], pads[i + r]) for i in range(r)], constant_values=value)


def _pad_grad(ctx, x):
    p = ctx.attrs["pads"]
    return [F.slice(ctx.g, p[:x.ndim], [p[i] + d for i, d in enumerate(x.shape)])]


defop("pad", "shape", storage=True, attrs={"pads": Attr("ints"), "value": Attr("float", 0.0)}, infer=_pad_infer,
      ref=_pad_ref, grad=_pad_grad, cost=_copy_cost,
      doc="constant padding; pads = (begin_0..begin_n-1, end_0..end_n-1) as in ONNX")

# ---- gather -----------------------------------------------------------------------
# out[o, j, i] = data[o, indices[j], i] over data viewed as [outer, n, inner] around `axis`
# (ONNX Gather, numpy take); indices may be negative (from the end). Its adjoint adds each
# gradient element into the row it was read from: rows read twice get both (weight sharing's
# "gradients summed per cluster").

_INDEX_DTYPES = ("i8", "i32", "i64")


def _gather_infer(ins, axis):
    data, idx = ins
    if data.rank < 1:
        fail("data must have rank >= 1")
    if idx.dtype not in _INDEX_DTYPES:
        fail(f"indices must be integers ({', '.join(_INDEX_DTYPES)}), got {idx}")
    ax = norm_axis(axis, data.rank)
    return data.with_shape(data.shape[:ax] + idx.shape + data.shape[ax + 1:])


def _check_indices(idx, n, op):
    bad = (idx < -n) | (idx >= n)
    if np.any(bad):
        raise TdcError(f"{op}: index {int(idx[bad][0])} is out of range for a dim of {n} (indices must be in [-{n}, {n}))")


def _gather_ref(data, idx, axis):
    ax = norm_axis(axis, data.ndim)
    _check_indices(idx, data.shape[ax], "gather")
    return np.take(data, idx.astype(np.int64), axis=ax)


defop("gather", "shape", storage=True, arity=(2, 2), attrs={"axis": Attr("int", 0)}, infer=_gather_infer, ref=_gather_ref, nondiff=(1,),
      grad=lambda ctx, data, idx: [F.apply("gather_grad", ctx.g, idx, axis=norm_axis(ctx.attrs["axis"], data.ndim),
                                           size=data.shape[norm_axis(ctx.attrs["axis"], data.ndim)]), None],
      cost=lambda ins, outs, **a: numel(outs[0].shape),
      doc="data's slices at `indices` along `axis` (ONNX Gather; negative indices count from the end)")


def _gather_grad_infer(ins, axis, size):
    g, idx = ins
    if idx.dtype not in _INDEX_DTYPES:
        fail(f"indices must be integers ({', '.join(_INDEX_DTYPES)}), got {idx}")
    if size < 1 or not 0 <= axis <= g.rank - idx.rank:
        fail(f"size {size} and axis {axis} do not fit a gradient {g} of indices {idx}")
    if g.shape[axis:axis + idx.rank] != idx.shape:
        fail(f"gradient {g} does not hold indices {idx} at axis {axis}")
    need_float(g)
    return g.with_shape(g.shape[:axis] + (size,) + g.shape[axis + idx.rank:])


def _gather_grad_ref(g, idx, axis, size):
    _check_indices(idx, size, "gather_grad")
    outer, inner = int(np.prod(g.shape[:axis])), int(np.prod(g.shape[axis + idx.ndim:]))
    rows = np.where(idx < 0, idx + size, idx).reshape(-1).astype(np.int64)
    out = np.zeros((outer, size, inner), g.dtype)
    np.add.at(out, (slice(None), rows), g.reshape(outer, rows.size, inner))
    return out.reshape(g.shape[:axis] + (size,) + g.shape[axis + idx.ndim:])


defop("gather_grad", "shape", arity=(2, 2), attrs={"axis": Attr("int"), "size": Attr("int")}, infer=_gather_grad_infer,
      ref=_gather_grad_ref, nondiff=(1,),
      grad=lambda ctx, g, idx: [F.apply("gather", ctx.g, idx, axis=ctx.attrs["axis"]), None],
      cost=lambda ins, outs, **a: numel(ins[0].shape),
      doc="the adjoint of gather: zeros of `size` rows along `axis`, each g slice added into the row its index names")
