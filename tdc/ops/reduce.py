"""Reductions over axes, with keepdims, and softmax / log_softmax."""
from __future__ import annotations

import numpy as np

from . import functional as F
from ..ir.opdef import Attr, defop
from .common import fail, need_float, norm_axes, norm_axis, numel

_REDUCE_ATTRS = {"axes": Attr("ints", None, optional=True), "keepdims": Attr("bool", False)}


def reduced_shape(shape, axes, keepdims):
    ax = norm_axes(axes, len(shape))
    if keepdims:
        return tuple(1 if i in ax else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in ax)


def _reduce_infer(float_only, needs_values=False):
    def infer(ins, axes, keepdims):
        x = ins[0]
        if float_only:
            need_float(x)
        elif x.dtype == "bool":
            fail("cannot reduce a bool tensor (cast it first)")
        out = reduced_shape(x.shape, axes, keepdims)
        if needs_values and _count(x.shape, axes) == 0 and numel(out) > 0:
            fail("cannot take the max over an empty axis")
        return x.with_shape(out)
    return infer


def _np_axes(axes, ndim):
    """The axes argument for numpy. A scalar accepts axis 0 (see norm_axis), which numpy does not."""
    return norm_axes(axes, ndim) if ndim else None


def _count(shape, axes):
    return numel([shape[i] for i in norm_axes(axes, len(shape)) if i < len(shape)])   # a scalar's axis 0 counts 1


def _spread(ctx, x):
    """The output gradient reshaped with kept dims and broadcast back to x's shape."""
    kept = reduced_shape(x.shape, ctx.attrs["axes"], True)
    return F.broadcast_to(F.reshape(ctx.g, kept), x.shape)


def _reduce_max_ref(x, axes, keepdims):
    if x.size == 0:
        out = reduced_shape(x.shape, axes, keepdims)
        if numel(out):
            fail("cannot take the max over an empty axis")
        return np.zeros(out, x.dtype)
    return np.max(x, axis=_np_axes(axes, x.ndim), keepdims=keepdims)


def _reduce_max_grad(ctx, x):
    # ties share the gradient equally (a valid subgradient, and symmetric)
    kept = reduced_shape(x.shape, ctx.attrs["axes"], True)
    m = F.broadcast_to(F.reshape(ctx.out, kept), x.shape)
    mask = F.cast(F.apply("equal", x, m), x.dtype)
    n = F.broadcast_to(F.sum(mask, ctx.attrs["axes"], keepdims=True), x.shape)
    return [_spread(ctx, x) * mask / n]


def _reduce_cost(ins, outs, **a):
    return numel(ins[0].shape)


defop("reduce_sum", "reduce", attrs=_REDUCE_ATTRS, infer=_reduce_infer(False),
      ref=lambda x, axes, keepdims: np.sum(x, axis=_np_axes(axes, x.ndim), keepdims=keepdims, dtype=x.dtype),
      grad=lambda ctx, x: [_spread(ctx, x)], cost=_reduce_cost, doc="sum over axes (all when axes is none)")
defop("reduce_mean", "reduce", attrs=_REDUCE_ATTRS, infer=_reduce_infer(True),
      ref=lambda x, axes, keepdims: np.mean(x, axis=_np_axes(axes, x.ndim), keepdims=keepdims).astype(x.dtype),
      grad=lambda ctx, x: [_spread(ctx, x) * (1.0 / max(_count(x.shape, ctx.attrs["axes"]), 1))],
      cost=_reduce_cost, doc="mean over axes (all when axes is none)")
defop("reduce_max", "reduce", attrs=_REDUCE_ATTRS, infer=_reduce_infer(False, needs_values=True), ref=_reduce_max_ref,
      grad=_reduce_max_grad, cost=_reduce_cost, doc="max over axes; ties share the gradient")


def _softmax_infer(ins, axis):
    need_float(ins[0])
    norm_axis(axis, ins[0].rank)
    return ins[0]


def _softmax_ref(x, axis):
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype)


def _log_softmax_ref(x, axis):
    z = x - np.max(x, axis=axis, keepdims=True)
    return (z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))).astype(x.dtype)


def _softmax_grad(ctx, x):
    y, a = ctx.out, ctx.attrs["axis"]
    return [y * (ctx.g - F.sum(ctx.g * y, a, keepdims=True))]


def _log_softmax_grad(ctx, x):
    a = ctx.attrs["axis"]
    return [ctx.g - F.exp(ctx.out) * F.sum(ctx.g, a, keepdims=True)]


defop("softmax", "reduce", attrs={"axis": Attr("int", -1)}, infer=_softmax_infer, ref=_softmax_ref,
      grad=_softmax_grad, cost=lambda ins, outs, **a: 5 * numel(ins[0].shape), doc="exp(x) / sum(exp(x)) along axis")
defop("log_softmax", "reduce", attrs={"axis": Attr("int", -1)}, infer=_softmax_infer, ref=_log_softmax_ref,
      grad=_log_softmax_grad, cost=lambda ins, outs, **a: 5 * numel(ins[0].shape),
      doc="x - log(sum(exp(x))) along axis, computed stably")
