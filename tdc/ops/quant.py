"""Affine int8 quantization: quantize, dequantize, fake_quant (for quantization-aware training)
and the int8 inference ops qlinear and qconv2d.

A real number r is represented by an int8 q with r = scale * (q - zero_point). Activations are
quantized per tensor (one scale and zero point), weights per output channel and symmetrically
(zero point 0, values in [-127, 127]), biases as int32 with scale x_scale * w_scale[o].

qlinear and qconv2d accumulate exactly in integers,

    acc[o] = sum_k (x[k] - x_zero) * w[o, k] + bias[o],

then requantize in float32, the way the kernels do (so they match the reference bit for bit):

    i8 output:  y = clamp(rint(f32(acc) * m[o]) + y_zero, lo, 127), m[o] = f32(x_scale * w_scale[o] / y_scale),
                lo = y_zero with relu (the real zero), else -128;
    f32 output: y = f32(acc) * f32(x_scale * w_scale[o]), then max(y, 0) with relu.

rint rounds half to even (numpy's rint, the C runtime's rintf and vcvtps2dq in the default
rounding mode). m[o] is computed in float64 and rounded once to float32 (`multipliers`).
"""
from __future__ import annotations

import numpy as np

from ..ir.opdef import Attr, defop
from ..ir.types import TensorType
from . import functional as F
from .common import fail, norm_axis, numel
from .conv import GEOMETRY, conv_out_shape, pad_input, spatial_out, windows

QMIN, QMAX = -128, 127
WMAX = 127                    # symmetric weights: -128 is never produced
# |acc| <= K * 255 * 127 + |bias| must fit an int32 (the kernels accumulate in int32).
MAX_K = (2 ** 31 - 1) // (255 * 127) - 1

AFFINE = {
    "scale": Attr("floats", doc="one scale (per tensor) or one per channel along axis; > 0"),
    "zero_point": Attr("ints", (0,), doc="one zero point, or one per channel; in [-128, 127]"),
    "axis": Attr("int", 1, doc="the channel axis of per-channel parameters"),
}


def _check_affine(x: TensorType, scale, zero_point, axis):
    if not scale or min(scale) <= 0 or not all(np.isfinite(scale)):
        fail(f"scales must be finite and > 0, got {list(scale)}")
    if min(zero_point) < QMIN or max(zero_point) > QMAX:
        fail(f"zero points must lie in [{QMIN}, {QMAX}], got {list(zero_point)}")
    n = max(len(scale), len(zero_point))
    if n > 1:
        if x.rank == 0:
            fail("per-channel parameters need a tensor with a channel axis")
        ax = norm_axis(axis, x.rank)
        for what, vals in (("scale", scale), ("zero_point", zero_point)):
            if len(vals) not in (1, x.shape[ax]):
                fail(f"{len(vals)} {what}s for axis {axis} of {x.shape[ax]} channels")


def _affine(shape, scale, zero_point, axis):
    """scale (f32) and zero point (i32) arrays broadcasting against a tensor of `shape`."""
    s = np.asarray(scale, np.float32)
    z = np.asarray(zero_point, np.int32)
    if max(len(s), len(z)) > 1:
        ax = norm_axis(axis, len(shape))
        view = [1] * len(shape)
        view[ax] = -1
        s, z = s.reshape(view), z.reshape(view)
    return s, z


def _q(x, scale, zero_point, axis, qmin=QMIN, qmax=QMAX):
    """rint(x / scale) + zero_point in float32, before clamping (the C runtime computes alike)."""
    s, z = _affine(x.shape, scale, zero_point, axis)
    r = np.rint(x.astype(np.float32) / s)
    return np.clip(r, -65536, 65536).astype(np.int32) + z, z, s


# ---- quantize / dequantize ---------------------------------------------------------

def _quantize_infer(ins, scale, zero_point, axis):
    x = ins[0]
    if x.dtype != "f32":
        fail(f"quantize takes an f32 tensor, got {x}")
    _check_affine(x, scale, zero_point, axis)
    return x.with_dtype("i8")


def _quantize_ref(x, *, scale, zero_point, axis):
    q, _, _ = _q(x, scale, zero_point, axis)
    return np.clip(q, QMIN, QMAX).astype(np.int8)


def _dequantize_infer(ins, scale, zero_point, axis):
    q = ins[0]
    if q.dtype != "i8":
        fail(f"dequantize takes an i8 tensor, got {q}")
    _check_affine(q, scale, zero_point, axis)
    return q.with_dtype("f32")


def _dequantize_ref(q, *, scale, zero_point, axis):
    s, z = _affine(q.shape, scale, zero_point, axis)
    return ((q.astype(np.int32) - z).astype(np.float32) * s).astype(np.float32)


defop("quantize", "quant", attrs=AFFINE, infer=_quantize_infer, ref=_quantize_ref,
      cost=lambda ins, outs, **a: 3 * numel(ins[0].shape),
      doc="f32 -> i8: clamp(rint(x / scale) + zero_point, -128, 127), per tensor or per channel")
defop("dequantize", "quant", attrs=AFFINE, infer=_dequantize_infer, ref=_dequantize_ref,
      cost=lambda ins, outs, **a: 2 * numel(ins[0].shape),
      doc="i8 -> f32: (q - zero_point) * scale, per tensor or per channel")


# ---- fake_quant: quantize and dequantize in float, for quantization-aware training ------
#
# The scales and zero points are attributes (fixed at build time) or, when given as the two
# trailing inputs scale f32[n] and zero_point i32[n], values computed in the graph: QAT derives
# them every step from the current weights and from running ranges (tdc/passes/quantize.py).
# They never get a gradient (the straight-through estimator treats the grid as constant).

FAKE_ATTRS = {**AFFINE,
              "scale": Attr("floats", (), doc="one scale (per tensor) or one per channel along axis; > 0 "
                                              "(empty when the scale and zero point are inputs)"),
              "qmin": Attr("int", QMIN, doc="lowest integer level"),
              "qmax": Attr("int", QMAX, doc="highest integer level (weights: -127..127)")}


def _fake_infer(ins, n_data, scale, zero_point, axis, qmin, qmax):
    data, grid = ins[:n_data], ins[n_data:]
    x = data[0]
    if x.dtype not in ("f32", "f64"):
        fail(f"fake_quant takes an f32 or f64 tensor, got {x}")
    if not QMIN <= qmin < qmax <= QMAX:
        fail(f"need -128 <= qmin < qmax <= 127, got qmin={qmin}, qmax={qmax}")
    for t in data[1:]:
        if t != x:
            fail(f"the gradient must be {x}, got {t}")
    if not grid:
        _check_affine(x, scale, zero_point, axis)
        return x
    if len(grid) != 2:
        fail("give both the scale and the zero point as inputs, or neither")
    s, z = grid
    if s.dtype != "f32" or z.dtype != "i32" or s.rank != 1 or z.shape != s.shape:
        fail(f"scale and zero_point inputs must be f32[n] and i32[n], got {s} and {z}")
    if s.shape[0] > 1 and (x.rank == 0 or s.shape[0] != x.shape[norm_axis(axis, x.rank)]):
        fail(f"{s.shape[0]} scales for axis {axis} of {x}")
    return x


def _grid(scale, zero_point, s, z):
    """The scales and zero points: the inputs when given, else the attributes."""
    return (scale, zero_point) if s is None else (s, z)


def _fake_ref(x, s=None, z=None, *, scale, zero_point, axis, qmin, qmax):
    q, z, s = _q(x, *_grid(scale, zero_point, s, z), axis)
    return ((np.clip(q, qmin, qmax) - z).astype(np.float32) * s).astype(x.dtype)


def _fake_grad_ref(g, x, s=None, z=None, *, scale, zero_point, axis, qmin, qmax):
    q, _, _ = _q(x, *_grid(scale, zero_point, s, z), axis)
    return np.where((q >= qmin) & (q <= qmax), g, 0).astype(g.dtype)


def _fake_grad(ctx, x, *grid):
    return [F.apply("fake_quant_grad", ctx.g, x, *grid, **ctx.attrs)] + [None] * len(grid)


defop("fake_quant", "quant", arity=(1, 3), attrs=FAKE_ATTRS, infer=lambda ins, **a: _fake_infer(ins, 1, **a),
      ref=_fake_ref, nondiff=(1, 2), grad=_fake_grad,
      cost=lambda ins, outs, **a: 5 * numel(ins[0].shape),
      doc="fake_quant(x[, scale, zero_point]): dequantize(quantize(x)) in float; its gradient is the "
          "straight-through estimator: g where x quantizes inside [qmin, qmax], 0 where it is clamped")
defop("fake_quant_grad", "quant", arity=(2, 4), attrs=FAKE_ATTRS, infer=lambda ins, **a: _fake_infer(ins, 2, **a),
      ref=_fake_grad_ref, nondiff=(1, 2, 3),
      grad=lambda ctx, g, x, *grid: [F.apply("fake_quant_grad", ctx.g, x, *grid, **ctx.attrs), None]
      + [None] * len(grid),
      cost=lambda ins, outs, **a: 4 * numel(ins[0].shape),
      doc="fake_quant_grad(g, x[, scale, zero_point]): g where x quantizes inside [qmin, qmax], else 0")


# ---- qlinear / qconv2d ---------------------------------------------------------------

QOUT = {
    "x_scale": Attr("float", doc="the input's scale"),
    "x_zero": Attr("int", 0, doc="the input's zero point"),
    "w_scale": Attr("floats", doc="the weights' scales: one, or one per output channel"),
    "y_scale": Attr("float", 1.0, doc="the output's scale (i8 output)"),
    "y_zero": Attr("int", 0, doc="the output's zero point (i8 output)"),
    "relu": Attr("bool", False, doc="clamp the output at the real zero"),
    "out": Attr("str", "i8", choices=("i8", "f32"), doc="requantize to i8, or dequantize to f32"),
}


def _check_q(x: TensorType, w: TensorType, bias, n_out: int, k: int, a) -> None:
    if x.dtype != "i8" or w.dtype != "i8":
        fail(f"the input and the weights must be i8, got {x} and {w}")
    if bias is not None and (bias.dtype != "i32" or bias.shape != (n_out,)):
        fail(f"the bias must be i32[{n_out}] (one per output channel), got {bias}")
    for name in ("x_scale", "y_scale"):
        if not (a[name] > 0 and np.isfinite(a[name])):
            fail(f"{name} must be finite and > 0, got {a[name]}")
    ws = a["w_scale"]
    if len(ws) not in (1, n_out) or min(ws) <= 0 or not all(np.isfinite(ws)):
        fail(f"w_scale must be 1 or {n_out} finite scales > 0, got {len(ws)}")
    for name in ("x_zero", "y_zero"):
        if not QMIN <= a[name] <= QMAX:
            fail(f"{name} must lie in [{QMIN}, {QMAX}], got {a[name]}")
    if k > MAX_K:
        fail(f"{k} products per output may overflow the int32 accumulator (at most {MAX_K})")


def multipliers(attrs: dict, n_out: int) -> np.ndarray:
    """The float32 factor per output channel that turns an accumulator into the output
    (the kernels get this array; the reference uses it too)."""
    ws = np.broadcast_to(np.asarray(attrs["w_scale"], np.float64), (n_out,))
    m = attrs["x_scale"] * ws
    if attrs["out"] == "i8":
        m = m / attrs["y_scale"]
    return m.astype(np.float32)


def requantize(acc: np.ndarray, attrs: dict, channel_axis: int) -> np.ndarray:
    """The output of qlinear / qconv2d from the exact accumulators (int64 array)."""
    n_out = acc.shape[channel_axis]
    view = [1] * acc.ndim
    view[channel_axis] = n_out
    m = multipliers(attrs, n_out).reshape(view)
    accf = acc.astype(np.int32).astype(np.float32)
    y = accf * m
    if attrs["out"] == "f32":
        return np.maximum(y, np.float32(0)) if attrs["relu"] else y
    r = np.clip(np.rint(y), -256, 256).astype(np.int32) + attrs["y_zero"]
    lo = attrs["y_zero"] if attrs["relu"] else QMIN
    return np.clip(r, lo, QMAX).astype(np.int8)


def _exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # float64 products and sums of int8-sized integers are exact below 2^53, far above MAX_K * 255 * 127
    return np.rint(np.matmul(a.astype(np.float64), b.astype(np.float64))).astype(np.int64)


def _qlinear_infer(ins, **a):
    x, w = ins[0], ins[1]
    if x.rank < 1 or w.rank != 2:
        fail("x needs rank >= 1 and w must be [out, in]")
    if x.shape[-1] != w.shape[1]:
        fail(f"x has {x.shape[-1]} features but w is [out={w.shape[0]}, in={w.shape[1]}]")
    _check_q(x, w, ins[2] if len(ins) == 3 else None, w.shape[0], w.shape[1], a)
    return TensorType(a["out"], x.shape[:-1] + (w.shape[0],))


def _qlinear_ref(x, w, b=None, **a):
    acc = _exact_matmul(x.astype(np.int32) - a["x_zero"], w.T)
    if b is not None:
        acc = acc + b.astype(np.int64)
    return requantize(acc, a, acc.ndim - 1)


def _qconv2d_infer(ins, stride, pad, dilation, groups, **a):
    x, w = ins[0], ins[1]
    out = conv_out_shape(x.shape, w.shape, stride, pad, dilation, groups)
    _check_q(x, w, ins[2] if len(ins) == 3 else None, w.shape[0], numel(w.shape[1:]), a)
    return TensorType(a["out"], out)


def _qconv2d_ref(x, w, b=None, *, stride, pad, dilation, groups, **a):
    n, co = x.shape[0], w.shape[0]
    oh, ow = spatial_out(x.shape[2:], w.shape[2:], stride, pad, dilation)
    # padding holds the real zero: x_zero, which contributes nothing
    xp = pad_input(x.astype(np.int32) - a["x_zero"], pad, 0)
    cols = windows(xp, w.shape[2:], stride, dilation, (oh, ow))
    cols = cols.reshape(n, groups, x.shape[1] // groups * w.shape[2] * w.shape[3], oh * ow)
    wm = w.reshape(groups, co // groups, -1)
    acc = _exact_matmul(wm, cols).reshape(n, co, oh, ow)
    if b is not None:
        acc = acc + b.astype(np.int64)[:, None, None]
    return requantize(acc, a, 1)


defop("qlinear", "quant", arity=(2, 3), attrs=QOUT, infer=_qlinear_infer, ref=_qlinear_ref,
      cost=lambda ins, outs, **a: 2 * numel(outs[0].shape) * ins[1].shape[1],
      doc="qlinear(x i8, w i8[out, in][, bias i32[out]]): x @ w.T in int32, requantized to i8 or dequantized "
          "to f32 (see tdc/ops/quant.py)")
defop("qconv2d", "quant", arity=(2, 3), attrs={**GEOMETRY, **QOUT}, infer=_qconv2d_infer, ref=_qconv2d_ref,
      cost=lambda ins, outs, **a: 2 * numel(outs[0].shape) * numel(ins[1].shape[1:]),
      doc="qconv2d(x i8 NCHW, w i8[Cout, Cin/groups, kh, kw][, bias i32[Cout]]): conv2d in int32 (padding "
          "is x_zero), requantized to i8 or dequantized to f32")
