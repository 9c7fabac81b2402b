"""2-D convolution (NCHW) and its two backward ops.

The reference computes convolution as a matrix product over im2col columns: a
strided view of the padded input holds every window without a copy per pixel.
The backward ops are ops of their own (rather than conv2d with flipped kernels)
so that stride, dilation, groups and asymmetric padding need no special cases
in gradient graphs, and a later pass can pick an algorithm for each of them.

The window helpers here (output size, padding, window views and their adjoint)
are shared with pooling.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..ir.types import TensorType
from ..ir.opdef import Attr, defop
from .common import fail, need_float, numel, same_dtype
from . import functional as F

CONV_ALGOS = ("auto", "direct", "im2col", "fft", "winograd", "winograd_f2", "winograd_f4")
# "auto": not chosen yet (the conv_algo pass picks one); "winograd": F(2x2,3x3) or F(4x4,3x3), the
# pass picks which. The others name one algorithm. The reference backend ignores the choice.
ALGORITHMS = ("direct", "im2col", "fft", "winograd_f2", "winograd_f4")


def legal_algos(op: str, kernel, stride, dilation) -> tuple[str, ...]:
    """The algorithms that can compute conv op `op` (conv2d, conv2d_grad_input or conv2d_grad_weight)
    with this geometry: Winograd needs a 3x3 kernel, stride 1 and dilation 1 (any padding and groups);
    the others take any geometry."""
    wino = tuple(kernel) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
    return ALGORITHMS if wino else ("direct", "im2col", "fft")


ALGO_ATTRS = {
    "algo": Attr("str", "auto", choices=CONV_ALGOS,
                 doc="algorithm for the compiled backends (auto: chosen by the conv_algo pass); the reference ignores it"),
    "algo_note": Attr("str", "", doc="why the algorithm asked for was not used (set by the conv_algo pass)"),
}


# ---- window geometry (shared with pool.py) -------------------------------------

def out_size(size: int, k: int, stride: int, dil: int, lo: int, hi: int, ceil_mode: bool = False) -> int:
    """Number of windows along one spatial dim (may be <= 0 when the kernel does not fit)."""
    span = size + lo + hi - dil * (k - 1) - 1
    n = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and n > 0 and (n - 1) * stride >= size + lo:
        n -= 1   # ONNX / PyTorch: a window starting in the trailing padding is dropped
    return n


def check_window_attrs(kernel, stride, pad, dilation=(1, 1)):
    if min(kernel) < 1:
        fail(f"kernel {list(kernel)} must be >= 1")
    if min(stride) < 1:
        fail(f"stride {list(stride)} must be >= 1")
    if min(dilation) < 1:
        fail(f"dilation {list(dilation)} must be >= 1")
    if min(pad) < 0:
        fail(f"pad {list(pad)} (top, left, bottom, right) must be >= 0")


def spatial_out(hw, kernel, stride, pad, dilation=(1, 1), ceil_mode: bool = False) -> tuple[int, int]:
    """Checked output (height, width) of sliding `kernel` over an input of spatial size `hw`."""
    check_window_attrs(kernel, stride, pad, dilation)
    oh = out_size(hw[0], kernel[0], stride[0], dilation[0], pad[0], pad[2], ceil_mode)
    ow = out_size(hw[1], kernel[1], stride[1], dilation[1], pad[1], pad[3], ceil_mode)
    if oh < 1 or ow < 1:
        ph, pw = hw[0] + pad[0] + pad[2], hw[1] + pad[1] + pad[3]
        eh, ew = dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1
        fail(f"the output would be {oh}x{ow}: a {kernel[0]}x{kernel[1]} kernel (dilation {list(dilation)}, "
             f"spanning {eh}x{ew}) does not fit the {hw[0]}x{hw[1]} input padded to {ph}x{pw} "
             f"(pad {list(pad)}, stride {list(stride)})")
    return oh, ow


def ceil_extra(hw, kernel, stride, pad, dilation, out_hw) -> tuple[int, int]:
    """Rows and columns past the padded input that ceil_mode windows reach (never counted)."""
    return tuple(max(0, (o - 1) * s + d * (k - 1) + 1 - (n + lo + hi))
                 for n, k, s, d, lo, hi, o in zip(hw, kernel, stride, dilation, pad[:2], pad[2:], out_hw))


def pad_input(x: np.ndarray, pad, value=0.0, extra=(0, 0)) -> np.ndarray:
    t, l, b, r = pad
    return np.pad(x, ((0, 0), (0, 0), (t, b + extra[0]), (l, r + extra[1])), constant_values=value)


def windows(xp: np.ndarray, kernel, stride, dilation, out_hw) -> np.ndarray:
    """A read-only view [N, C, kh, kw, oh, ow] of padded xp: [n, c, i, j, y, x] = xp[n, c, y*sh + i*dh, x*sw + j*dw]."""
    sn, sc, sy, sx = xp.strides
    shape = xp.shape[:2] + tuple(kernel) + tuple(out_hw)
    strides = (sn, sc, sy * dilation[0], sx * dilation[1], sy * stride[0], sx * stride[1])
    return as_strided(xp, shape, strides, writeable=False)


def add_windows(dst: np.ndarray, cols: np.ndarray, kernel, stride, dilation) -> None:
    """dst += the adjoint of `windows` applied to cols [N, C, kh, kw, oh, ow] (overlaps accumulate)."""
    oh, ow = cols.shape[4:]
    for i in range(kernel[0]):
        y = i * dilation[0]
        for j in range(kernel[1]):
            x = j * dilation[1]
            dst[:, :, y:y + stride[0] * (oh - 1) + 1:stride[0], x:x + stride[1] * (ow - 1) + 1:stride[1]] += cols[:, :, i, j]


def work_dtype(dt: np.dtype) -> np.dtype:
    # numpy's f16 matmul is slow and loses precision in the sums; accumulate in f32
    return np.dtype(np.float32) if dt == np.float16 else dt


# ---- conv2d -----------------------------------------------------------------------

GEOMETRY = {
    "stride": Attr("ints", (1, 1), length=2, doc="(sh, sw)"),
    "pad": Attr("ints", (0, 0, 0, 0), length=4, doc="(top, left, bottom, right), zeros"),
    "dilation": Attr("ints", (1, 1), length=2, doc="(dh, dw)"),
    "groups": Attr("int", 1, doc="input and output channels are split into this many independent groups"),
}


def conv_out_shape(x_shape, w_shape, stride, pad, dilation, groups, x_name="input", w_name="weight"):
    """Validate a convolution of an x of x_shape with a w of w_shape; returns the output shape."""
    if len(x_shape) != 4:
        fail(f"the {x_name} must be NCHW (rank 4), got shape {list(x_shape)}")
    if len(w_shape) != 4:
        fail(f"the {w_name} must be [Cout, Cin/groups, kh, kw] (rank 4), got shape {list(w_shape)}")
    n, c, h, w = x_shape
    co, cg, kh, kw = w_shape
    if groups < 1:
        fail(f"groups must be >= 1, got {groups}")
    if c % groups:
        fail(f"the {x_name} {list(x_shape)} has {c} channels, not divisible by groups={groups}")
    if co % groups:
        fail(f"the {w_name} {list(w_shape)} has {co} output channels, not divisible by groups={groups}")
    if cg != c // groups:
        fail(f"channel mismatch: the {x_name} {list(x_shape)} has {c} channels, so with groups={groups} the "
             f"{w_name} must be [Cout, {c // groups}, kh, kw], got {list(w_shape)}")
    oh, ow = spatial_out((h, w), (kh, kw), stride, pad, dilation)
    return (n, co, oh, ow)


def _conv2d_infer(ins, stride, pad, dilation, groups, algo, algo_note):
    x, w = ins[0], ins[1]
    need_float(x)
    dt = same_dtype(ins)
    out = conv_out_shape(x.shape, w.shape, stride, pad, dilation, groups)
    if len(ins) == 3 and ins[2].shape != (out[1],):
        fail(f"the bias must be [{out[1]}] (one per output channel of weight {list(w.shape)}), got {list(ins[2].shape)}")
    return TensorType(dt, out)


def _im2col(x, kernel, stride, pad, dilation, groups, out_hw):
    """Columns [N, G, Cin/G * kh * kw, oh * ow] of the zero-padded x."""
    n, c = x.shape[:2]
    cols = windows(pad_input(x, pad), kernel, stride, dilation, out_hw)
    return cols.reshape(n, groups, c // groups * kernel[0] * kernel[1], out_hw[0] * out_hw[1])


def _conv2d_ref(x, w, b=None, *, stride, pad, dilation, groups, algo, algo_note):
    dt, wt = x.dtype, work_dtype(x.dtype)
    n, co = x.shape[0], w.shape[0]
    oh, ow = spatial_out(x.shape[2:], w.shape[2:], stride, pad, dilation)
    cols = _im2col(x.astype(wt, copy=False), w.shape[2:], stride, pad, dilation, groups, (oh, ow))
    wm = w.astype(wt, copy=False).reshape(groups, co // groups, -1)
    y = np.matmul(wm, cols).reshape(n, co, oh, ow)   # [G, o, K] @ [N, G, K, P] -> [N, G, o, P]
    if b is not None:
        y += b.astype(wt, copy=False)[:, None, None]
    return y.astype(dt, copy=False)


def _geometry(attrs) -> dict:
    """The geometry and the algorithm asked for: the backward ops of a layer inherit its choice
    (a forward forced to Winograd asks for Winograd backward too; the pass checks legality)."""
    return {**{k: attrs[k] for k in GEOMETRY}, "algo": attrs["algo"]}


def _conv2d_grad(ctx, x, w, b=None):
    geo = _geometry(ctx.attrs)
    grads = [F.apply("conv2d_grad_input", ctx.g, w, input_shape=x.shape, **geo),
             F.apply("conv2d_grad_weight", x, ctx.g, weight_shape=w.shape, **geo)]
    if b is not None:
        grads.append(F.sum(ctx.g, (0, 2, 3)))
    return grads


def _conv2d_cost(ins, outs, **a):
    bias = numel(outs[0].shape) if len(ins) == 3 else 0
    return 2 * numel(outs[0].shape) * numel(ins[1].shape[1:]) + bias


defop("conv2d", "conv", arity=(2, 3),
      attrs={**GEOMETRY, **ALGO_ATTRS},
      infer=_conv2d_infer, ref=_conv2d_ref, grad=_conv2d_grad, cost=_conv2d_cost,
      doc="conv2d(x, w[, b]): NCHW cross-correlation; w is [Cout, Cin/groups, kh, kw], b is [Cout]")


# ---- backward ops ---------------------------------------------------------------------
# Both are linear in each input. With A(x, w) = conv2d(x, w), GI(g, w) = A(., w)^T g and
# GW(x, g) = A(x, .)^T g, the identities <A(x, w), g> = <x, GI(g, w)> = <w, GW(x, g)> give
# every VJP: d<GI(g, w), h>/dg = A(h, w), /dw = GW(h, g); d<GW(x, g), h>/dx = GI(g, h), /dg = A(x, h).

def _check_g(g: TensorType, want, what):
    if g.shape != tuple(want):
        fail(f"the output gradient must be {list(want)} (the conv2d output for {what}), got {list(g.shape)}")


def _grad_input_infer(ins, input_shape, stride, pad, dilation, groups, algo, algo_note):
    g, w = ins
    need_float(g)
    dt = same_dtype(ins)
    want = conv_out_shape(input_shape, w.shape, stride, pad, dilation, groups, x_name="input_shape")
    _check_g(g, want, f"input_shape {list(input_shape)} and weight {list(w.shape)}")
    return TensorType(dt, input_shape)


def _grad_input_ref(g, w, *, input_shape, stride, pad, dilation, groups, algo, algo_note):
    dt, wt = g.dtype, work_dtype(g.dtype)
    n, c, h, wd = input_shape
    co, cg, kh, kw = w.shape
    oh, ow = g.shape[2:]
    gm = g.astype(wt, copy=False).reshape(n, groups, co // groups, oh * ow)
    wm = w.astype(wt, copy=False).reshape(groups, co // groups, cg * kh * kw)
    cols = np.matmul(wm.transpose(0, 2, 1), gm).reshape(n, c, kh, kw, oh, ow)
    t, l, b, r = pad
    dxp = np.zeros((n, c, h + t + b, wd + l + r), wt)
    add_windows(dxp, cols, (kh, kw), stride, dilation)
    # padded rows never reached by a window (floor division) keep their zero gradient
    return dxp[:, :, t:t + h, l:l + wd].astype(dt)


def _grad_input_grad(ctx, g, w):
    geo = _geometry(ctx.attrs)
    return [F.apply("conv2d", ctx.g, w, **geo),
            F.apply("conv2d_grad_weight", ctx.g, g, weight_shape=w.shape, **geo)]


def _grad_weight_infer(ins, weight_shape, stride, pad, dilation, groups, algo, algo_note):
    x, g = ins
    need_float(x)
    dt = same_dtype(ins)
    want = conv_out_shape(x.shape, weight_shape, stride, pad, dilation, groups, w_name="weight_shape")
    _check_g(g, want, f"input {list(x.shape)} and weight_shape {list(weight_shape)}")
    return TensorType(dt, weight_shape)


def _grad_weight_ref(x, g, *, weight_shape, stride, pad, dilation, groups, algo, algo_note):
    dt, wt = x.dtype, work_dtype(x.dtype)
    n = x.shape[0]
    co = weight_shape[0]
    oh, ow = g.shape[2:]
    cols = _im2col(x.astype(wt, copy=False), weight_shape[2:], stride, pad, dilation, groups, (oh, ow))
    # contract over batch and pixels at once: [G, o, N*P] @ [G, N*P, K]
    gm = g.astype(wt, copy=False).reshape(n, groups, co // groups, oh * ow).transpose(1, 2, 0, 3)
    gm = gm.reshape(groups, co // groups, n * oh * ow)
    cm = cols.transpose(1, 0, 3, 2).reshape(groups, n * oh * ow, -1)
    return np.matmul(gm, cm).reshape(weight_shape).astype(dt, copy=False)


def _grad_weight_grad(ctx, x, g):
    geo = _geometry(ctx.attrs)
    return [F.apply("conv2d_grad_input", g, ctx.g, input_shape=x.shape, **geo),
            F.apply("conv2d", x, ctx.g, **geo)]


def _grad_input_cost(ins, outs, **a):
    g, w = ins
    return 2 * numel(g.shape) * numel(w.shape[1:])


def _grad_weight_cost(ins, outs, **a):
    x, g = ins
    return 2 * numel(g.shape) * numel(outs[0].shape[1:])


defop("conv2d_grad_input", "conv", arity=(2, 2),
      attrs={"input_shape": Attr("ints", length=4, doc="shape of conv2d's x"), **GEOMETRY, **ALGO_ATTRS},
      infer=_grad_input_infer, ref=_grad_input_ref, grad=_grad_input_grad, cost=_grad_input_cost,
      doc="conv2d_grad_input(g, w): the gradient of conv2d w.r.t. x, given the output gradient g")
defop("conv2d_grad_weight", "conv", arity=(2, 2),
      attrs={"weight_shape": Attr("ints", length=4, doc="shape of conv2d's w"), **GEOMETRY, **ALGO_ATTRS},
      infer=_grad_weight_infer, ref=_grad_weight_ref, grad=_grad_weight_grad, cost=_grad_weight_cost,
      doc="conv2d_grad_weight(x, g): the gradient of conv2d w.r.t. w, given the output gradient g")
