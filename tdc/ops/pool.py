"""2-D pooling (NCHW): max, average and global average, with their backward ops.

Output sizes, padding and ceil_mode follow ONNX (and PyTorch): with ceil_mode a
last partial window is kept unless it would start in the trailing padding, and
the part of a window past the padded input is never counted.
"""
from __future__ import annotations

import numpy as np

from ..ir.types import TensorType
from .conv import add_windows, ceil_extra, pad_input, spatial_out, windows, work_dtype
from ..ir.opdef import Attr, defop
from .common import fail, need_float, numel
from . import functional as F


def _window_attrs(dilation: bool, **extra) -> dict:
    attrs = {
        "kernel": Attr("ints", length=2, doc="(kh, kw)"),
        "stride": Attr("ints", length=2, doc="(sh, sw)"),
        "pad": Attr("ints", (0, 0, 0, 0), length=4, doc="(top, left, bottom, right)"),
    }
    if dilation:
        attrs["dilation"] = Attr("ints", (1, 1), length=2, doc="(dh, dw)")
    attrs["ceil_mode"] = Attr("bool", False, doc="round the output size up (ONNX rule)")
    attrs.update(extra)
    return attrs


def _check_input(x: TensorType, what="input", int8: bool = False):
    if x.rank != 4:
        fail(f"the {what} must be NCHW (rank 4), got shape {list(x.shape)}")
    if not (int8 and x.dtype in ("i8", "u8")):
        need_float(x, f"the {what}")


def _covered(size, k, s, d, lo, n) -> np.ndarray:
    """For each of the n windows along a dim, how many of its taps fall on real input."""
    pos = np.arange(n)[:, None] * s + np.arange(k)[None, :] * d
    return ((pos >= lo) & (pos < lo + size)).sum(1)


def _pool_out(x_shape, kernel, stride, pad, dilation, ceil_mode, need_real: bool):
    """Checked pooled shape; with need_real, every window must overlap the real input
    (max of nothing, or an average over zero elements, is undefined)."""
    oh, ow = spatial_out(x_shape[2:], kernel, stride, pad, dilation, ceil_mode)
    if need_real:
        for axis, n in ((0, oh), (1, ow)):
            hits = _covered(x_shape[2 + axis], kernel[axis], stride[axis], dilation[axis], pad[axis], n)
            if not hits.all():
                which = "row" if axis == 0 else "column"
                fail(f"pooling window {int(np.argmin(hits))} along the {which}s lies entirely in the padding "
                     f"(kernel {list(kernel)}, stride {list(stride)}, pad {list(pad)}, dilation {list(dilation)}); "
                     f"use less padding")
    return (x_shape[0], x_shape[1], oh, ow)


# ---- maxpool2d -----------------------------------------------------------------------
# The backward ops locate each window's argmax (the first maximum in row-major window
# order) from x. maxpool2d_grad scatters into it, maxpool2d_gather reads from it; the two
# are adjoint to each other, which gives their gradients. Their derivative w.r.t. x is
# zero almost everywhere, so x is not differentiated.

MAX_ATTRS = _window_attrs(dilation=True)


def _maxpool_infer(ins, kernel, stride, pad, dilation, ceil_mode):
    # i8 too: max commutes with an affine quantization (scale > 0), so int8 graphs pool their codes;
    # and u8, the dtype images come in (ONNX MaxPool takes uint8)
    _check_input(ins[0], int8=True)
    return ins[0].with_shape(_pool_out(ins[0].shape, kernel, stride, pad, dilation, ceil_mode, True))


def _max_windows(x, kernel, stride, pad, dilation, ceil_mode, fill):
    """x padded with `fill`, its windows [N, C, kh*kw, oh, ow], and the padded shape."""
    out_hw = spatial_out(x.shape[2:], kernel, stride, pad, dilation, ceil_mode)
    xp = pad_input(x, pad, fill, ceil_extra(x.shape[2:], kernel, stride, pad, dilation, out_hw))
    win = windows(xp, kernel, stride, dilation, out_hw)
    return win.reshape(x.shape[:2] + (kernel[0] * kernel[1],) + out_hw), xp.shape


def _argmax(x, **a):
    win, padded = _max_windows(x, fill=-np.inf, **a)
    return np.argmax(win, axis=2)[:, :, None], padded


def _maxpool_ref(x, **a):
    # every window overlaps the real input, so the lowest value of the dtype acts as -inf
    win, _ = _max_windows(x, fill=-np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min, **a)
    return win.max(axis=2)


def _maxpool_grad_infer(ins, kernel, stride, pad, dilation, ceil_mode):
    g, x = ins
    _check_input(x)
    want = x.with_shape(_pool_out(x.shape, kernel, stride, pad, dilation, ceil_mode, True))
    if g != want:
        fail(f"the output gradient must be {want} (the pooled shape of {x}), got {g}")
    return x


def _maxpool_grad_ref(g, x, **a):
    idx, padded = _argmax(x, **a)
    kernel, pad = a["kernel"], a["pad"]
    wt = work_dtype(g.dtype)
    cols = np.zeros(g.shape[:2] + (kernel[0] * kernel[1],) + g.shape[2:], wt)
    np.put_along_axis(cols, idx, g[:, :, None], axis=2)
    dxp = np.zeros(padded, wt)
    add_windows(dxp, cols.reshape(g.shape[:2] + tuple(kernel) + g.shape[2:]), kernel, a["stride"], a["dilation"])
    h, w = x.shape[2:]
    return dxp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w].astype(g.dtype)


def _maxpool_gather_infer(ins, kernel, stride, pad, dilation, ceil_mode):
    h, x = ins
    _check_input(x)
    if h != x:
        fail(f"the gathered tensor must be {x} (like the pooled input), got {h}")
    return x.with_shape(_pool_out(x.shape, kernel, stride, pad, dilation, ceil_mode, True))


def _maxpool_gather_ref(h, x, **a):
    idx, _ = _argmax(x, **a)
    win, _ = _max_windows(h, fill=0.0, **a)
    return np.take_along_axis(win, idx, axis=2)[:, :, 0]


def _pool_cost(ins, outs, kernel, **a):
    return numel(outs[0].shape) * kernel[0] * kernel[1]


def _grad_pool_cost(ins, outs, kernel, **a):
    return numel(ins[0].shape) * kernel[0] * kernel[1]


defop("maxpool2d", "pool", attrs=MAX_ATTRS, infer=_maxpool_infer, ref=_maxpool_ref,
      grad=lambda ctx, x: [F.apply("maxpool2d_grad", ctx.g, x, **ctx.attrs)], cost=_pool_cost,
      doc="max over each window; padding is -inf")
defop("maxpool2d_grad", "pool", arity=(2, 2), attrs=MAX_ATTRS, infer=_maxpool_grad_infer, ref=_maxpool_grad_ref,
      grad=lambda ctx, g, x: [F.apply("maxpool2d_gather", ctx.g, x, **ctx.attrs), None], nondiff=(1,),
      cost=_grad_pool_cost,
      doc="maxpool2d_grad(g, x): each output gradient added at its window's argmax in x (first on ties)")
defop("maxpool2d_gather", "pool", arity=(2, 2), attrs=MAX_ATTRS, infer=_maxpool_gather_infer,
      ref=_maxpool_gather_ref, grad=lambda ctx, h, x: [F.apply("maxpool2d_grad", ctx.g, x, **ctx.attrs), None],
      nondiff=(1,), cost=_pool_cost,
      doc="maxpool2d_gather(h, x): h at the argmax of each of x's pooling windows (the adjoint of maxpool2d_grad)")


def maxpool_tables(hw, kernel, stride, pad, dilation, out_hw, storage_order: int):
    """For a 2-D max pool over an image of `hw` padded by pad = (top, left, bottom, right) and by
    the ceil_mode rows past it: `gather` [oh*ow*K] picks each window's K taps out of the flattened
    padded image (row-major, window-major), and `flat` [oh*ow*K] gives the ONNX index of each tap
    in the unpadded image: h * W + w (storage_order 0) or w * H + h (1); padding taps get -1.
    Also the padded shape (height, width)."""
    (h, w), (kh, kw), (oh, ow) = hw, kernel, out_hw
    rows = (np.arange(oh)[:, None] * stride[0] + np.arange(kh)[None, :] * dilation[0])   # [oh, kh] padded
    cols = (np.arange(ow)[:, None] * stride[1] + np.arange(kw)[None, :] * dilation[1])   # [ow, kw]
    r = rows[:, None, :, None]
    c = cols[None, :, None, :]
    # the padded image, with the rows and columns past it that ceil_mode windows reach
    height_p = max(h + pad[0] + pad[2], int(rows.max()) + 1)
    width_p = max(w + pad[1] + pad[3], int(cols.max()) + 1)
    gather = (r * width_p + c).reshape(-1)
    rr, cc = r - pad[0], c - pad[1]
    real = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    flat = np.where(real, rr * w + cc if storage_order == 0 else cc * h + rr, -1).reshape(-1)
    return gather.astype(np.int64), flat.astype(np.int64), (height_p, width_p)


# ---- avgpool2d -------------------------------------------------------------------------
# The divisor of each window depends only on the attributes, so avgpool2d is a fixed linear
# map; its adjoint avgpool2d_grad spreads g / count over each window, and the adjoint of
# that is avgpool2d again.

AVG_ATTRS = _window_attrs(dilation=False, count_include_pad=Attr(
    "bool", False, doc="divide by the window size within the padded input, not by its real elements"))
_NO_DILATION = (1, 1)


def _avgpool_infer(ins, kernel, stride, pad, ceil_mode, count_include_pad):
    _check_input(ins[0])
    return ins[0].with_shape(_pool_out(ins[0].shape, kernel, stride, pad, _NO_DILATION, ceil_mode,
                                       need_real=not count_include_pad))


def _counts(in_hw, out_hw, kernel, stride, pad, count_include_pad) -> np.ndarray:
    """[oh, ow] divisors: the window elements inside the padded (or the real) input."""
    per_dim = []
    for axis in (0, 1):
        size, lo = in_hw[axis], pad[axis]
        if count_include_pad:
            size, lo = size + pad[axis] + pad[axis + 2], 0
        per_dim.append(_covered(size, kernel[axis], stride[axis], 1, lo, out_hw[axis]))
    return np.outer(per_dim[0], per_dim[1])


def _avgpool_ref(x, *, kernel, stride, pad, ceil_mode, count_include_pad):
    dt = x.dtype
    out_hw = spatial_out(x.shape[2:], kernel, stride, pad, _NO_DILATION, ceil_mode)
    extra = ceil_extra(x.shape[2:], kernel, stride, pad, _NO_DILATION, out_hw)
    xp = pad_input(x.astype(work_dtype(dt), copy=False), pad, 0.0, extra)
    sums = windows(xp, kernel, stride, _NO_DILATION, out_hw).sum(axis=(2, 3))
    return (sums / _counts(x.shape[2:], out_hw, kernel, stride, pad, count_include_pad)).astype(dt, copy=False)


def _avgpool_grad_infer(ins, input_shape, kernel, stride, pad, ceil_mode, count_include_pad):
    (g,) = ins
    if len(input_shape) != 4:
        fail(f"input_shape must be NCHW (rank 4), got {list(input_shape)}")
    _check_input(g, "output gradient")
    x = g.with_shape(input_shape)
    want = x.with_shape(_pool_out(input_shape, kernel, stride, pad, _NO_DILATION, ceil_mode,
                                  need_real=not count_include_pad))
    if g != want:
        fail(f"the output gradient must be {want} (the pooled shape of input_shape {list(input_shape)}), got {g}")
    return x


def _avgpool_grad_ref(g, *, input_shape, kernel, stride, pad, ceil_mode, count_include_pad):
    dt, wt = g.dtype, work_dtype(g.dtype)
    in_hw, out_hw = tuple(input_shape[2:]), g.shape[2:]
    share = g.astype(wt) / _counts(in_hw, out_hw, kernel, stride, pad, count_include_pad)
    cols = np.broadcast_to(share[:, :, None, None], g.shape[:2] + tuple(kernel) + out_hw)
    eh, ew = ceil_extra(in_hw, kernel, stride, pad, _NO_DILATION, out_hw)
    dxp = np.zeros(g.shape[:2] + (in_hw[0] + pad[0] + pad[2] + eh, in_hw[1] + pad[1] + pad[3] + ew), wt)
    add_windows(dxp, cols, kernel, stride, _NO_DILATION)
    h, w = in_hw
    return dxp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w].astype(dt)


def _avgpool_grad(ctx, x):
    return [F.apply("avgpool2d_grad", ctx.g, input_shape=x.shape, **ctx.attrs)]


def _avgpool_grad_grad(ctx, g):
    attrs = {k: v for k, v in ctx.attrs.items() if k != "input_shape"}
    return [F.apply("avgpool2d", ctx.g, **attrs)]


defop("avgpool2d", "pool", attrs=AVG_ATTRS, infer=_avgpool_infer, ref=_avgpool_ref, grad=_avgpool_grad,
      cost=lambda ins, outs, kernel, **a: numel(outs[0].shape) * (kernel[0] * kernel[1] + 1),
      doc="mean over each window (count_include_pad chooses the divisor at the borders)")
defop("avgpool2d_grad", "pool", attrs={"input_shape": Attr("ints", doc="shape of avgpool2d's x"), **AVG_ATTRS},
      infer=_avgpool_grad_infer, ref=_avgpool_grad_ref, grad=_avgpool_grad_grad,
      cost=lambda ins, outs, kernel, **a: numel(ins[0].shape) * (kernel[0] * kernel[1] + 1),
      doc="avgpool2d_grad(g): each output gradient spread evenly over its window's counted elements")


# ---- global_avgpool -----------------------------------------------------------------------

def _global_infer(ins):
    _check_input(ins[0])
    if 0 in ins[0].shape[2:]:
        fail(f"global_avgpool needs a non-empty image, got shape {list(ins[0].shape)}")
    n, c = ins[0].shape[:2]
    return ins[0].with_shape((n, c, 1, 1))


def _global_ref(x):
    return x.mean(axis=(2, 3), keepdims=True, dtype=work_dtype(x.dtype)).astype(x.dtype, copy=False)


def _global_grad(ctx, x):
    h, w = x.shape[2:]
    # broadcasting [N, C, 1, 1] against ones gives the spread gradient its input shape
    return [F.ones_like(x) * (ctx.g * (1.0 / (h * w)))]


defop("global_avgpool", "pool", infer=_global_infer, ref=_global_ref, grad=_global_grad,
      cost=lambda ins, outs: numel(ins[0].shape), doc="mean over H and W: [N, C, H, W] -> [N, C, 1, 1]")
