"""The DSL's functions: one per op (plus a few conveniences), recording into the current graph.

Every function takes tensors (or Python numbers, which become constants of the
dtype of the tensor beside them) and returns tensors. Attribute conveniences
(an int stride for both dims, a symmetric pad) are expanded here; the op
registry checks everything else.
"""
from __future__ import annotations

import builtins
import math
import functools

import numpy as np

from ..errors import ShapeError
from ..ir.types import DTYPES, is_unsigned
from .tensor import Builder, Tensor, user_location


def _b(*xs) -> Builder:
    for x in xs:
        if isinstance(x, Tensor):
            return x.builder
    return Builder.current()


def apply(op: str, /, *inputs, **attrs):
    """Record any registered op: apply("relu", x), apply("conv2d", x, w, stride=[2, 2])."""
    return _b(*inputs).apply(op, list(inputs), attrs)


def constant(value, dtype: str | None = None) -> Tensor:
    return Builder.current().constant(value, dtype)


def full(shape, value: float = 0.0, dtype: str = "f32") -> Tensor:
    return apply("full", shape=tuple(shape), value=value, dtype=dtype)


def zeros_like(x: Tensor) -> Tensor:
    return x.builder.apply("full", [], {"shape": x.shape, "value": 0.0, "dtype": x.dtype})


def ones_like(x: Tensor) -> Tensor:
    return x.builder.apply("full", [], {"shape": x.shape, "value": 1.0, "dtype": x.dtype})


# ---- elementwise -------------------------------------------------------------
def add(a, b): return apply("add", a, b)
def sub(a, b): return apply("sub", a, b)
def mul(a, b): return apply("mul", a, b)
def div(a, b): return apply("div", a, b)
def pow(a, b): return apply("pow", a, b)
def maximum(a, b): return apply("maximum", a, b)
def minimum(a, b): return apply("minimum", a, b)
def where(cond, a, b): return apply("where", cond, a, b)
def neg(x): return apply("neg", x)
def abs(x): return apply("abs", x)
def sign(x): return apply("sign", x)
def exp(x): return apply("exp", x)
def log(x): return apply("log", x)
def sqrt(x): return apply("sqrt", x)
def rsqrt(x): return apply("rsqrt", x)
def relu(x): return apply("relu", x)
def leaky_relu(x, alpha: float = 0.01): return apply("leaky_relu", x, alpha=alpha)
def sigmoid(x): return apply("sigmoid", x)
def tanh(x): return apply("tanh", x)
def erf(x): return apply("erf", x)
def cast(x, to: str): return apply("cast", x, to=to)
def square(x): return x * x


def gelu(x, approximate: str = "none"):
    """x times the standard normal CDF of x (ONNX Gelu, PyTorch's GELU): exactly
    0.5 x (1 + erf(x / sqrt 2)), or with approximate="tanh" 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    if approximate == "none":
        return x * (erf(x * (1.0 / math.sqrt(2.0))) * 0.5 + 0.5)
    if approximate == "tanh":
        return x * (tanh((x + x * x * x * 0.044715) * math.sqrt(2.0 / math.pi)) * 0.5 + 0.5)
    raise ShapeError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")


def clip(x, lo=None, hi=None):
    if lo is not None:
        x = maximum(x, lo)
    if hi is not None:
        x = minimum(x, hi)
    return x


# ---- linear algebra ---------------------------------------------------------------
def matmul(a, b): return apply("matmul", a, b)


def linear(x, w, b=None):
    """x @ w.T (+ b): w is [out, in], as in PyTorch and ONNX Gemm(transB=1)."""
    return apply("linear", *([x, w] if b is None else [x, w, b]))


# ---- convolution and pooling --------------------------------------------------------
def _pair(v, name):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pads(pad):
    """An int (all sides), (ph, pw) (symmetric) or (top, left, bottom, right)."""
    if isinstance(pad, int):
        return (pad,) * 4
    pad = tuple(pad)
    if len(pad) == 2:
        return (pad[0], pad[1], pad[0], pad[1])
    return pad


def conv2d(x, w, b=None, stride=1, pad=0, dilation=1, groups: int = 1, algo: str = "auto"):
    """NCHW convolution; w is [Cout, Cin/groups, kh, kw]; pad is (top, left, bottom, right)."""
    return apply("conv2d", *([x, w] if b is None else [x, w, b]), stride=_pair(stride, "stride"),
                 pad=_pads(pad), dilation=_pair(dilation, "dilation"), groups=groups, algo=algo)


def _transposed_axis(n: int, k: int, s: int, d: int, lo: int, hi: int, extra: int):
    """One spatial axis of a transposed convolution as conv2d_grad_input plus zero rows.

    Scattering n input rows at stride s with a kernel spanning (k-1)*d + 1 fills `span` rows; the
    output is rows lo .. span + extra - hi of that, where rows outside [0, span) are zeros (a
    negative lo or hi, which ONNX's output_shape can imply, and output_padding reach there).
    conv2d_grad_input(g, w) computes rows [lo', lo' + size) for pads lo', hi' >= 0 only when the
    conv2d over an input of `size` rows gives back n rows, i.e. size + lo' + hi' is in
    [span, span + s); the output rows it cannot reach are all past `span`, so they become zero
    padding (`lead` before, `trail` after). Returns (lead, lo', size, hi', trail); size <= 0 means
    no output row touches the scattered rows."""
    span = s * (n - 1) + (k - 1) * d + 1
    lead, lo_c = builtins.max(0, -lo), builtins.max(0, lo)
    rest = span + extra - hi - lo_c            # output rows from scattered row lo_c on
    size = builtins.min(rest, span + s - 1 - lo_c)
    hi_c = builtins.max(0, span - lo_c - size)
    return lead, lo_c, size, hi_c, rest - size


def _conv_transpose_problem(x, w, b, stride, pad, output_padding, dilation, groups, rank: int = 4) -> str | None:
    """What makes conv_transpose2d's (rank 4) or conv_transpose3d's (rank 5) arguments (x, w and b as
    TensorTypes, b may be None) invalid, or None (shared with the ONNX importer)."""
    r = rank - 2
    layout, kernel = ("NCHW", "kh, kw") if r == 2 else ("NCDHW", "kd, kh, kw")
    if x.rank != rank:
        return f"the input must be {layout} (rank {rank}), got {x}"
    if w.rank != rank:
        return f"the weight must be [Cin, Cout/groups, {kernel}] (rank {rank}), got {w}"
    if x.dtype not in ("f16", "f32", "f64") or w.dtype != x.dtype:
        return f"the input and weight must be floats of one dtype, got {x} and {w}"
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        return f"groups must be an integer >= 1, got {groups!r} (input {x}, weight {w})"
    for name, v in (("stride", stride), ("pad", pad), ("output_padding", output_padding), ("dilation", dilation)):
        want = 2 * r if name == "pad" else r
        if len(v) != want or not builtins.all(isinstance(i, (int, np.integer)) for i in v):
            return f"{name} must be {want} integers, got {list(v)} (input {x}, weight {w})"
    c = x.shape[1]
    if c % groups:
        return f"the input {x} has {c} channels, not divisible by groups={groups}"
    if w.shape[0] != c:
        return (f"channel mismatch: the input {x} has {c} channels, so the weight must be "
                f"[{c}, Cout/groups, {kernel}], got {w}")
    if builtins.min(w.shape[2:]) < 1 or builtins.min(w.shape[1:2]) < 1:
        return f"the weight {w} has an empty dim"
    if builtins.min(stride) < 1 or builtins.min(dilation) < 1:
        return f"stride {list(stride)} and dilation {list(dilation)} must be >= 1 (input {x}, weight {w})"
    for op, s, d in zip(output_padding, stride, dilation):
        if not 0 <= op < builtins.max(s, d):   # ONNX's and PyTorch's rule: it only picks existing rows
            return (f"output_padding {list(output_padding)} must be >= 0 and less than max(stride, dilation) "
                    f"per dim (stride {list(stride)}, dilation {list(dilation)}; input {x}, weight {w})")
    out = [s * (n - 1) + (k - 1) * d + 1 + op - lo - hi
           for n, k, s, d, op, lo, hi in zip(x.shape[2:], w.shape[2:], stride, dilation, output_padding,
                                            pad[:r], pad[r:])]
    if builtins.min(out) < 1:
        return (f"the output would be {'x'.join(map(str, out))}: input {x}, weight {w}, stride {list(stride)}, "
                f"pad {list(pad)}, output_padding {list(output_padding)}, dilation {list(dilation)}")
    if b is not None and b.shape != (w.shape[1] * groups,):
        return f"the bias must be [{w.shape[1] * groups}] (one per output channel), got {b}"
    return None


def conv_transpose2d(x, w, b=None, stride=1, pad=0, output_padding=0, dilation=1, groups: int = 1,
                     algo: str = "auto"):
    """Transposed convolution (ONNX ConvTranspose, PyTorch's ConvTranspose2d), NCHW; w is
    [Cin, Cout/groups, kh, kw] and b is [Cout]. Each output dim is
    stride * (in - 1) + output_padding + (k - 1) * dilation + 1 - pad_begin - pad_end, with pad
    (top, left, bottom, right); a negative pad adds zero rows or columns on its side.

    It is the gradient of a conv2d w.r.t. its input, and is recorded as that op,
    conv2d_grad_input(x, w) (whose weight layout [conv's Cout, Cin/groups, kh, kw] is this w as it
    is), so every backend's kernels, the conv_algo pass and autodiff serve it; rows that op cannot
    reach (output_padding past the bottom pad, negative pads) are zero padding around it."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    pad, output_padding = _pads(pad), _pair(output_padding, "output_padding")
    problem = _conv_transpose_problem(x.type, w.type, None if b is None else b.type, stride, pad,
                                     output_padding, dilation, groups)
    if problem:
        loc = user_location()
        raise ShapeError(f"{loc + ': ' if loc else ''}conv_transpose2d: {problem}")
    n, cout = x.shape[0], w.shape[1] * groups
    axes = [_transposed_axis(*a) for a in zip(x.shape[2:], w.shape[2:], stride, dilation, pad[:2], pad[2:],
                                              output_padding)]
    (lead_h, lo_h, h, hi_h, trail_h), (lead_w, lo_w, wd, hi_w, trail_w) = axes
    if h < 1 or wd < 1:   # pads past every scattered row: only zeros (and the bias) are left
        y = x.builder.apply("full", [], {"shape": (n, cout, lead_h + h + trail_h, lead_w + wd + trail_w),
                                         "value": 0.0, "dtype": x.dtype})
    else:
        y = apply("conv2d_grad_input", x, w, input_shape=(n, cout, h, wd), stride=stride,
                  pad=(lo_h, lo_w, hi_h, hi_w), dilation=dilation, groups=int(groups), algo=algo)
        if lead_h or lead_w or trail_h or trail_w:
            y = apply("pad", y, pads=(0, 0, lead_h, lead_w, 0, 0, trail_h, trail_w), value=0.0)
    if b is not None:
        y = y + reshape(b, (cout, 1, 1))
    return y


def maxpool2d(x, kernel, stride=None, pad=0, dilation=1, ceil_mode: bool = False, return_indices: bool = False,
              storage_order: int = 0):
    """Max over each window (padding never wins). With return_indices, also the i64 index of each
    window's first maximum in x flattened, as ONNX MaxPool's Indices: (n * C + c) * H * W plus
    h * W + w (storage_order 0) or w * H + h (storage_order 1)."""
    kernel = _pair(kernel, "kernel")
    attrs = dict(kernel=kernel, stride=kernel if stride is None else _pair(stride, "stride"), pad=_pads(pad),
                 dilation=_pair(dilation, "dilation"), ceil_mode=ceil_mode)
    y = apply("maxpool2d", x, **attrs)
    if not return_indices:
        return y
    if storage_order not in (0, 1):
        loc = user_location()
        raise ShapeError(f"{loc + ': ' if loc else ''}maxpool2d: storage_order must be 0 or 1, not {storage_order!r}")
    return y, _maxpool_indices(x, y, storage_order=storage_order, **attrs)


def _maxpool_indices(x, y, kernel, stride, pad, dilation, ceil_mode, storage_order):
    """The Indices of maxpool2d as a composite: gather each window's taps from the padded image
    (an im2col as one gather), take the first-index argmax over them, and look up that tap's
    flat input index in a constant table. Integers, so no gradient flows through it."""
    from .pool import maxpool_tables
    (n, c, h, w), (oh, ow) = x.shape, y.shape[2:]
    fill = -np.inf if x.dtype.startswith("f") else float(np.iinfo(DTYPES[x.dtype]).min)
    taps, flat, (height_p, width_p) = maxpool_tables((h, w), kernel, stride, pad, dilation, (oh, ow), storage_order)
    pads = (0, 0, pad[0], pad[1], 0, 0, height_p - h - pad[0], width_p - w - pad[1])
    xp = apply("pad", x, pads=pads, value=fill) if any(pads) else x
    k = kernel[0] * kernel[1]
    win = reshape(gather(reshape(xp, (n, c, height_p * width_p)), constant(taps, "i64"), axis=2),
                  (n, c, oh, ow, k))
    pos = argmax(win, axis=4, keepdims=False)   # first maximum: ONNX's and onnxruntime's tie rule
    window = constant((np.arange(oh * ow, dtype=np.int64) * k).reshape(oh, ow), "i64")
    image = constant((np.arange(n * c, dtype=np.int64) * (h * w)).reshape(n, c, 1, 1), "i64")
    return reshape(gather(constant(flat, "i64"), reshape(pos + window, (n * c * oh * ow,)), axis=0),
                   (n, c, oh, ow)) + image


def avgpool2d(x, kernel, stride=None, pad=0, ceil_mode: bool = False, count_include_pad: bool = False,
              dilation=1):
    """The mean over each window of an NCHW input; pad is (top, left, bottom, right), stride defaults
    to the kernel. The divisor is the window's elements on the real input, or with count_include_pad
    within the padded input. The avgpool2d op has no dilation: a dilated window (ONNX AveragePool's
    dilations) is a sum of strided slices times a constant 1 / divisor, computed at build time."""
    kernel, stride, pad, dilation = _pool_args(kernel, stride, pad, dilation, 4)
    if tuple(dilation) == (1, 1):
        return apply("avgpool2d", x, kernel=kernel, stride=stride, pad=pad, ceil_mode=ceil_mode,
                     count_include_pad=count_include_pad)
    _refuse("avgpool2d", _pool_problem(x.type, kernel, stride, pad, dilation, ceil_mode, not count_include_pad, 4))
    return _avgpool_taps(x, kernel, stride, pad, dilation, ceil_mode, count_include_pad)


def global_avgpool(x): return apply("global_avgpool", x)


# ---- resizing ----------------------------------------------------------------------------
def _resize_problem(x_type, sizes, scales, axes, mode, coordinate_transformation_mode, nearest_mode,
                    keep_aspect_ratio_policy, antialias, roi) -> str | None:
    """What makes resize's arguments invalid, or None (shared with the ONNX importer)."""
    if (sizes is None) == (scales is None):
        return "give exactly one of sizes and scales"
    if len(set(axes)) != len(axes) or not builtins.all(0 <= a < x_type.rank for a in axes):
        return f"axes {list(axes)} must be distinct dims of the rank-{x_type.rank} input"
    given, what = (sizes, "sizes") if sizes is not None else (scales, "scales")
    if len(given) != len(axes):
        return f"{len(given)} {what} {list(given)} for the {len(axes)} resized axes {list(axes)}"
    if not builtins.all(np.isfinite(v) and v > 0 for v in given):
        return f"{what} {list(given)} must be > 0"
    from .resize import COORDINATE_MODES, MODES, NEAREST_MODES
    for name, v, allowed in (("mode", mode, MODES), ("nearest_mode", nearest_mode, NEAREST_MODES),
                             ("coordinate_transformation_mode", coordinate_transformation_mode, COORDINATE_MODES),
                             ("keep_aspect_ratio_policy", keep_aspect_ratio_policy, ("stretch", "not_larger",
                                                                                     "not_smaller"))):
        if v not in allowed:
            return f"{name} must be one of {', '.join(allowed)}, not {v!r}"
    if antialias and mode == "nearest":
        return "antialias applies to linear and cubic modes, not nearest"
    if mode != "nearest" and x_type.dtype not in ("f16", "f32", "f64"):
        return f"{mode} mode interpolates, so the input must be a float tensor"
    if roi is not None and len(roi) != 2 * len(axes):
        return f"roi {list(roi)} must have 2 values per resized axis ({2 * len(axes)})"
    return None


def resize(x, sizes=None, scales=None, mode: str = "nearest", axes=None,
           coordinate_transformation_mode: str = "half_pixel", nearest_mode: str = "round_prefer_floor",
           cubic_coeff_a: float = -0.75, exclude_outside: bool = False, antialias: bool = False,
           keep_aspect_ratio_policy: str = "stretch", roi=None, extrapolation_value: float = 0.0):
    """Resize `axes` (default: all) of x to `sizes`, or by `scales` (each output dim is
    floor(dim * scale)), as ONNX Resize: nearest, linear (bilinear, trilinear: one axis after
    another) or cubic interpolation, with its coordinate_transformation_mode, nearest_mode,
    cubic_coeff_a, exclude_outside, antialias, keep_aspect_ratio_policy (with sizes) and, for
    tf_crop_and_resize, roi (starts then ends, fractions of each axis) and extrapolation_value.

    A composite: per resized axis, one gather per filter tap with constant indices computed here,
    each times a constant weight, summed (nearest is a single gather). So every backend runs it and
    its gradient is the gathers' scatter-adds."""
    from .resize import axis_taps
    axes = tuple(range(x.ndim)) if axes is None else tuple(a + x.ndim if a < 0 else a for a in axes)
    sizes = None if sizes is None else [int(v) for v in sizes]
    scales = None if scales is None else [float(v) for v in scales]
    problem = _resize_problem(x.type, sizes, scales, axes, mode, coordinate_transformation_mode, nearest_mode,
                              keep_aspect_ratio_policy, antialias, roi)
    loc = user_location()
    if problem:
        raise ShapeError(f"{loc + ': ' if loc else ''}resize: {problem} (input {x.type})")
    dims = [x.shape[a] for a in axes]
    if sizes is not None:
        scales = [s / d for s, d in zip(sizes, dims)]
        if keep_aspect_ratio_policy != "stretch":   # one scale for all axes, the output rounded half up
            s = (builtins.min if keep_aspect_ratio_policy == "not_larger" else builtins.max)(scales)
            scales, sizes = [s] * len(dims), [int(s * d + 0.5) for d in dims]
    else:
        sizes = [int(np.floor(s * d)) for s, d in zip(scales, dims)]
    if builtins.min(sizes, default=1) < 1:
        raise ShapeError(f"{loc + ': ' if loc else ''}resize: the output would have an empty dim: sizes {sizes} "
                         f"of axes {list(axes)} "
                         f"(input {x.type}, scales {scales})")
    for j, (a, n_out, scale) in enumerate(zip(axes, sizes, scales)):
        n_in = x.shape[a]
        if n_out == n_in and scale == 1.0 and coordinate_transformation_mode != "tf_crop_and_resize":
            continue   # every mode maps each row to itself
        span = (0.0, 1.0) if roi is None else (float(roi[j]), float(roi[j + len(axes)]))
        idx, weight, outside = axis_taps(n_in, n_out, scale, mode, coordinate_transformation_mode, nearest_mode,
                                         float(cubic_coeff_a), bool(exclude_outside), bool(antialias), span)
        along = [n_out if i == a else 1 for i in range(x.ndim)]
        y = None
        for k in range(idx.shape[1]):
            tap = gather(x, constant(idx[:, k], "i64"), axis=a)
            if not np.all(weight[:, k] == 1):
                tap = tap * constant(weight[:, k].reshape(along), x.dtype)
            y = tap if y is None else y + tap
        if outside.any() and extrapolation_value != 0:
            y = y + constant((outside * float(extrapolation_value)).reshape(along), x.dtype)
        x = y
    return x


def upsample(x, scale_factor, mode: str = "nearest"):
    """Scale the spatial dims (2 on) of an [N, C, ...] tensor by scale_factor (a number, or one
    per spatial dim), as PyTorch's Upsample without align_corners: nearest picks floor(x / s),
    linear interpolates with half-pixel centres."""
    spatial = x.ndim - 2
    factors = [scale_factor] * spatial if isinstance(scale_factor, (int, float)) else list(scale_factor)
    return resize(x, scales=factors, mode=mode, axes=range(2, x.ndim),
                  coordinate_transformation_mode="asymmetric" if mode == "nearest" else "pytorch_half_pixel",
                  nearest_mode="floor")


# ---- 3-D convolution and pooling, dilated average pooling -----------------------------------
# tdc's conv and pool ops are 2-D. The 3-D (NCDHW) forms are compositions of them with slices,
# pads, reshapes and adds over the depth, and dilated average pooling is sums of strided slices, so
# every backend, export and autodiff serve them with no kernels of their own. 3-D pads are in ONNX's
# order: the begins (d, h, w), then the ends.

def _triple(v):
    return (v,) * 3 if isinstance(v, (int, np.integer)) else tuple(v)


def _pads3(pad):
    """An int (all sides), (pd, ph, pw) (symmetric) or (d_begin, h_begin, w_begin, d_end, h_end, w_end)."""
    if isinstance(pad, (int, np.integer)):
        return (pad,) * 6
    pad = tuple(pad)
    return pad + pad if len(pad) == 3 else pad


def _refuse(op: str, problem: str | None):
    if problem:
        loc = user_location()
        raise ShapeError(f"{loc + ': ' if loc else ''}{op}: {problem}")


def _windows_along(size, k, s, d, lo, hi, ceil_mode=False) -> int:
    from .conv import out_size   # conv imports this module
    return out_size(size, k, s, d, lo, hi, ceil_mode)


def _in_window(size, k, s, d, lo, n) -> np.ndarray:
    """For each of the n windows along a dim, how many of its taps fall on rows [lo, lo + size)."""
    pos = np.arange(n)[:, None] * s + np.arange(k)[None, :] * d
    return ((pos >= lo) & (pos < lo + size)).sum(1)


def _window_problem(x, kernel, stride, pad, dilation, ceil_mode=False, real=False) -> str | None:
    """What makes sliding `kernel` over x's spatial dims invalid, or None; with `real`, every window
    must reach the real input (a max or an average over padding alone is undefined)."""
    r = x.rank - 2
    for name, v, want in (("kernel", kernel, r), ("stride", stride, r), ("pad", pad, 2 * r),
                          ("dilation", dilation, r)):
        if len(v) != want or not builtins.all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in v):
            return f"{name} must be {want} integers, got {list(v)} (input {x})"
    if builtins.min(kernel) < 1 or builtins.min(stride) < 1 or builtins.min(dilation) < 1 or builtins.min(pad) < 0:
        return (f"kernel {list(kernel)}, stride {list(stride)} and dilation {list(dilation)} must be >= 1 and "
                f"pad {list(pad)} >= 0 (input {x})")
    geo = list(zip(x.shape[2:], kernel, stride, dilation, pad[:r], pad[r:]))
    out = [_windows_along(*g, ceil_mode) for g in geo]
    if builtins.min(out) < 1:
        return (f"the output would be {'x'.join(map(str, out))}: kernel {list(kernel)} (dilation {list(dilation)}) "
                f"does not fit the input {x} padded by {list(pad)} (stride {list(stride)})")
    for axis, ((size, k, s, d, lo, _), n) in enumerate(zip(geo, out)):
        if real and not _in_window(size, k, s, d, lo, n).all():
            return (f"a window along spatial dim {axis} lies entirely in the padding (input {x}, kernel {list(kernel)}, "
                    f"stride {list(stride)}, pad {list(pad)}, dilation {list(dilation)}); use less padding")
    return None


def _taps(x, axis, k, s, d, lo, n, fill=0.0) -> list:
    """The k taps of the n windows (stride s, dilation d) along `axis`: tap j holds rows j*d, j*d + s, ...
    of x padded with `fill`, by lo rows before and by as many after as the last window reaches."""
    reach = (n - 1) * s + (k - 1) * d + 1
    pads = [0] * (2 * x.ndim)
    pads[axis], pads[x.ndim + axis] = lo, builtins.max(0, reach - lo - x.shape[axis])
    xp = pad(x, pads, fill) if builtins.any(pads) else x
    taps = []
    for j in range(k):
        starts, ends, steps = [0] * x.ndim, list(xp.shape), [1] * x.ndim
        starts[axis], ends[axis], steps[axis] = j * d, j * d + (n - 1) * s + 1, s
        taps.append(apply("slice", xp, starts=starts, ends=ends, steps=steps))
    return taps


def _conv3d_problem(x, w, b, stride, pad, dilation, groups) -> str | None:
    if x.rank != 5:
        return f"the input must be NCDHW (rank 5), got {x}"
    if w.rank != 5:
        return f"the weight must be [Cout, Cin/groups, kd, kh, kw] (rank 5), got {w}"
    if x.dtype not in ("f16", "f32", "f64") or w.dtype != x.dtype:
        return f"the input and weight must be floats of one dtype, got {x} and {w}"
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        return f"groups must be an integer >= 1, got {groups!r} (input {x}, weight {w})"
    c, cout = x.shape[1], w.shape[0]
    if c % groups or cout % groups or w.shape[1] * groups != c:
        return (f"channel mismatch: the input {x} has {c} channels and groups={groups}, so the weight must be "
                f"[Cout, {c}/{groups}, kd, kh, kw] with Cout a multiple of {groups}, got {w}")
    if b is not None and b.shape != (cout,):
        return f"the bias must be [{cout}] (one per output channel), got {b}"
    return _window_problem(x, w.shape[2:], stride, pad, dilation)


def conv3d(x, w, b=None, stride=1, pad=0, dilation=1, groups: int = 1):
    """NCDHW convolution (ONNX Conv on 5-D inputs, PyTorch's Conv3d); w is [Cout, Cin/groups, kd, kh,
    kw], b is [Cout]; pad is (d, h, w) begins then ends, zeros.

    Output depth o is the sum over kernel depths t of conv2d(input depth o * stride + t * dilation
    - pad_begin, w[:, :, t]): the output depths are folded into the batch ([N * Do, C, H, W]) and
    each depth tap is one conv2d, so the backends' conv kernels and gradients do the work."""
    stride, dilation, pad = _triple(stride), _triple(dilation), _pads3(pad)
    _refuse("conv3d", _conv3d_problem(x.type, w.type, None if b is None else b.type, stride, pad, dilation, groups))
    (n, c, d, h, wd), kd = x.shape, w.shape[2]
    do = _windows_along(d, kd, stride[0], dilation[0], pad[0], pad[3])
    plane_pad = (pad[1], pad[2], pad[4], pad[5])
    xt = transpose(x, (0, 2, 1, 3, 4))   # depth beside the batch, to fold the two into one dim
    y = None
    for t, xs in enumerate(_taps(xt, 1, kd, stride[0], dilation[0], pad[0], do)):
        wt = w[:, :, t]
        yt = conv2d(reshape(xs, (n * do, c, h, wd)), wt, None, stride[1:], plane_pad, dilation[1:], int(groups))
        y = yt if y is None else y + yt
    y = transpose(reshape(y, (n, do) + y.shape[1:]), (0, 2, 1, 3, 4))
    return y if b is None else y + reshape(b, (w.shape[0], 1, 1, 1))


def _pool_args(kernel, stride, pad, dilation, rank):
    if rank == 5:
        kernel = _triple(kernel)
        return kernel, kernel if stride is None else _triple(stride), _pads3(pad), _triple(dilation)
    kernel = _pair(kernel, "kernel")
    return kernel, kernel if stride is None else _pair(stride, "stride"), _pads(pad), _pair(dilation, "dilation")


def _pool_problem(x, kernel, stride, pad, dilation, ceil_mode, real, rank, ints=False) -> str | None:
    if x.rank != rank:
        return f"the input must be {'NCDHW' if rank == 5 else 'NCHW'} (rank {rank}), got {x}"
    if x.dtype not in ("f16", "f32", "f64") + (("i8", "u8") if ints else ()):
        return f"the input must be a float{' (or i8/u8)' if ints else ''} tensor, got {x}"
    return _window_problem(x, kernel, stride, pad, dilation, ceil_mode, real)


def maxpool3d(x, kernel, stride=None, pad=0, dilation=1, ceil_mode: bool = False):
    """The max over each (kd, kh, kw) window of an NCDHW input (ONNX MaxPool on 5-D inputs); padding
    is -inf, stride defaults to the kernel, pad is (d, h, w) begins then ends; ceil_mode as maxpool2d's.

    The box max is separable: maxpool2d over (H, W) of every depth slice, then the max of the depth
    taps, strided slices of its result padded with the dtype's lowest value."""
    kernel, stride, pad, dilation = _pool_args(kernel, stride, pad, dilation, 5)
    _refuse("maxpool3d", _pool_problem(x.type, kernel, stride, pad, dilation, ceil_mode, True, 5, ints=True))
    n, c, d, h, wd = x.shape
    y = maxpool2d(reshape(x, (n, c * d, h, wd)), kernel[1:], stride[1:], (pad[1], pad[2], pad[4], pad[5]),
                  dilation[1:], ceil_mode)
    y = reshape(y, (n, c, d) + y.shape[2:])
    do = _windows_along(d, kernel[0], stride[0], dilation[0], pad[0], pad[3], ceil_mode)
    lowest = -math.inf if x.dtype in ("f16", "f32", "f64") else float(np.iinfo(DTYPES[x.dtype]).min)
    taps = _taps(y, 2, kernel[0], stride[0], dilation[0], pad[0], do, lowest)
    for t in taps[1:]:
        taps[0] = maximum(taps[0], t)
    return taps[0]


def _avgpool_taps(x, kernel, stride, pad, dilation, ceil_mode, count_include_pad):
    """Average pooling of any rank and dilation as window sums times a constant 1 / count. The box
    sum is separable: the sum of the taps along each spatial dim in turn (undilated (H, W) planes of a
    5-D input by avgpool2d, whose divisor is known and undone by the constant)."""
    r = x.ndim - 2
    geo = list(zip(x.shape[2:], kernel, stride, dilation, pad[:r], pad[r:]))
    out = [_windows_along(*g, ceil_mode) for g in geo]
    # the divisor of each window: its taps on the real input, or within the padded one (not past it)
    counts = [_in_window(size + lo + hi, k, s, d, 0, n) if count_include_pad else _in_window(size, k, s, d, lo, n)
              for (size, k, s, d, lo, hi), n in zip(geo, out)]
    scale = functools.reduce(np.multiply.outer, [1.0 / cnt for cnt in counts])
    y, axes = x, range(r)
    if r == 3 and tuple(dilation[1:]) == (1, 1):
        n, c, d, h, wd = x.shape
        y = avgpool2d(reshape(x, (n, c * d, h, wd)), kernel[1:], stride[1:], (pad[1], pad[2], pad[4], pad[5]),
                      ceil_mode, count_include_pad=True)
        y = reshape(y, (n, c, d) + y.shape[2:])
        planes = [_in_window(size + lo + hi, k, s, 1, 0, m) for (size, k, s, _, lo, hi), m in zip(geo[1:], out[1:])]
        scale = scale * np.multiply.outer(*planes)
        axes = range(1)
    for a in axes:
        size, k, s, d, lo, _ = geo[a]
        taps = _taps(y, a + 2, k, s, d, lo, out[a])
        y = taps[0]
        for t in taps[1:]:
            y = y + t
    return y * constant(scale.astype(DTYPES[x.dtype]), x.dtype)


def avgpool3d(x, kernel, stride=None, pad=0, dilation=1, ceil_mode: bool = False, count_include_pad: bool = False):
    """The mean over each (kd, kh, kw) window of an NCDHW input (ONNX AveragePool on 5-D inputs);
    stride defaults to the kernel, pad is (d, h, w) begins then ends. The divisor is the window's
    taps on the real input, or with count_include_pad its taps within the padded input (a ceil_mode
    window past the padded input counts only what it covers, as ONNX and PyTorch do)."""
    kernel, stride, pad, dilation = _pool_args(kernel, stride, pad, dilation, 5)
    _refuse("avgpool3d", _pool_problem(x.type, kernel, stride, pad, dilation, ceil_mode, not count_include_pad, 5))
    return _avgpool_taps(x, kernel, stride, pad, dilation, ceil_mode, count_include_pad)


def _place(z, axis, at, total):
    """z's rows land at rows at, at + 1, ... of a dim of `total` rows, zeros elsewhere (rows
    outside [0, total) are dropped)."""
    first, last = builtins.max(0, -at), builtins.min(z.shape[axis], total - at)
    if first > 0 or last < z.shape[axis]:
        starts, ends = [0] * z.ndim, list(z.shape)
        starts[axis], ends[axis] = first, last
        z = slice(z, starts, ends)
    pads = [0] * (2 * z.ndim)
    pads[axis] = builtins.max(0, at)
    pads[z.ndim + axis] = total - pads[axis] - (last - first)
    return pad(z, pads) if builtins.any(pads) else z


def conv_transpose3d(x, w, b=None, stride=1, pad=0, output_padding=0, dilation=1, groups: int = 1):
    """Transposed convolution of an NCDHW input (ONNX ConvTranspose on 5-D inputs, PyTorch's
    ConvTranspose3d); w is [Cin, Cout/groups, kd, kh, kw], b is [Cout], pad is (d, h, w) begins then
    ends (negative: zero rows on that side). Each output dim is
    stride * (in - 1) + output_padding + (k - 1) * dilation + 1 - pad_begin - pad_end.

    Input depth i through kernel depth t lands on output depth i * stride + t * dilation - pad_begin:
    the input depths are folded into the batch, each depth tap is one conv_transpose2d, and its
    result is spread `stride` depths apart (zero depths between), shifted into place and summed."""
    stride, dilation, extra = _triple(stride), _triple(dilation), _triple(output_padding)
    pad = _pads3(pad)
    _refuse("conv_transpose3d", _conv_transpose_problem(x.type, w.type, None if b is None else b.type, stride, pad,
                                                        extra, dilation, groups, rank=5))
    (n, cin, di, h, wd), kd, cout = x.shape, w.shape[2], w.shape[1] * groups
    s, dl = stride[0], dilation[0]
    do = s * (di - 1) + (kd - 1) * dl + 1 + extra[0] - pad[0] - pad[3]
    plane = [sp * (m - 1) + (k - 1) * dp + 1 + e - lo - hi for m, k, sp, dp, e, lo, hi in
             zip((h, wd), w.shape[3:], stride[1:], dilation[1:], extra[1:], pad[1:3], pad[4:])]
    xt = reshape(transpose(x, (0, 2, 1, 3, 4)), (n * di, cin, h, wd))
    y = None
    for t in range(kd):
        at = t * dl - pad[0]   # the output depth of input depth 0 through tap t
        if at >= do or at + s * (di - 1) < 0:
            continue           # this tap reaches no output depth
        wt = w[:, :, t]
        yt = conv_transpose2d(xt, wt, None, stride[1:], (pad[1], pad[2], pad[4], pad[5]), extra[1:], dilation[1:],
                              int(groups))
        # [N, Di, 1, R] padded to [N, Di, s, R] is the depths spread s apart, s - 1 zero depths after each
        z = reshape(yt, (n, di, 1, cout * plane[0] * plane[1]))
        z = reshape(_pad_op(z, (0, 0, 0, 0, 0, 0, s - 1, 0)) if s > 1 else z, (n, di * s, z.shape[3]))
        z = _place(z, 1, at, do)
        y = z if y is None else y + z
    if y is None:
        y = full((n, do, cout * plane[0] * plane[1]), 0.0, x.dtype)
    y = transpose(reshape(y, (n, do, cout, *plane)), (0, 2, 1, 3, 4))
    return y if b is None else y + reshape(b, (cout, 1, 1, 1))


# ---- normalization, dropout -----------------------------------------------------------
def _lrn_problem(x_type, size, alpha, beta, bias) -> str | None:
    """What makes lrn's arguments invalid, or None (shared with the ONNX importer)."""
    if x_type.rank < 3:
        return f"the input must be [N, C, D1, ...] (rank >= 3), got rank {x_type.rank}"
    if x_type.dtype not in ("f16", "f32", "f64"):
        return "the input must be a float tensor"
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        return f"size must be an integer >= 1, got {size!r}"
    for k, v in (("alpha", alpha), ("beta", beta), ("bias", bias)):
        if not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            return f"{k} must be a finite number, got {v!r}"
    return None


def lrn(x, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0):
    """Local response normalization across channels (dim 1), as ONNX's LRN and AlexNet's:
    y = x / (bias + alpha / size * sum of x^2 over channels [c - (size-1)//2, c + size//2]) ** beta.

    A composite of existing ops, so every backend and autodiff handle it: the window sum of x^2
    is an avgpool2d of kernel (size, 1) over a [N, 1, C, rest] view, padded (size-1)//2 channels
    before and size//2 after (an even size looks one channel further ahead, as ONNX says; PyTorch's
    LocalResponseNorm looks behind) and dividing by size (count_include_pad): the alpha / size."""
    problem = _lrn_problem(x.type, size, alpha, beta, bias)
    if problem:
        loc = user_location()
        raise ShapeError(f"{loc + ': ' if loc else ''}lrn: {problem} (input: {x.type})")
    size, (n, c) = int(size), x.shape[:2]
    sq = reshape(square(x), (n, 1, c, int(np.prod(x.shape[2:], dtype=np.int64))))
    mean_sq = avgpool2d(sq, (size, 1), stride=1, pad=((size - 1) // 2, 0, size // 2, 0), count_include_pad=True)
    denom = reshape(mean_sq, x.shape) * float(alpha) + float(bias)
    # x * denom^-beta: one pow and a mul (its gradient is then two elementwise ops, not a division too)
    return x * pow(denom, -float(beta))


def batchnorm(x, gamma, beta, mean, var, eps: float = 1e-5, momentum: float = 0.9, training: bool = False):
    """Inference: one output. Training: (y, new running mean, new running var)."""
    return apply("batchnorm", x, gamma, beta, mean, var, eps=eps, momentum=momentum, training=training)


def dropout(x, key, rate: float = 0.5, seed: int = 0):
    """Zero each element with probability `rate` (scale the rest by 1/(1-rate)).
    The mask is a hash of (seed, key, element index): the same on every backend."""
    return apply("dropout", x, key, rate=rate, seed=seed)


# ---- shape --------------------------------------------------------------------------
def reshape(x, shape): return apply("reshape", x, shape=tuple(shape))
def transpose(x, perm=None): return apply("transpose", x, perm=tuple(perm) if perm is not None else tuple(range(x.ndim))[::-1])
def broadcast_to(x, shape): return apply("broadcast_to", x, shape=tuple(shape))
def flatten(x, axis: int = 1): return apply("flatten", x, axis=axis)
def concat(xs, axis: int = 0): return apply("concat", *xs, axis=axis)
def gather(data, indices, axis: int = 0): return apply("gather", data, indices, axis=axis)


def slice(x, starts, ends, steps=None):
    """x[starts[i]:ends[i]:steps[i]] on every dim (Python rules for negative and out-of-range bounds)."""
    starts, ends = list(starts), list(ends)
    steps = list(steps) if steps is not None else [1] * len(starts)
    if not (len(starts) == len(ends) == len(steps) == x.ndim):
        raise ShapeError(f"slice of {x.type} needs {x.ndim} starts, ends and steps")
    s, e = [], []
    for i, (a, b, st) in enumerate(zip(starts, ends, steps)):
        if st < 1:
            raise ShapeError(f"slice of {x.type}: step {st} on dim {i}: steps must be >= 1")
        a, b, _ = builtins.slice(a, b, st).indices(x.shape[i])
        s.append(a)
        e.append(builtins.max(a, b))
    return apply("slice", x, starts=s, ends=e, steps=steps)




def getitem(x, idx):
    """Basic indexing: ints, slices (step >= 1), Ellipsis and None."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if builtins.sum(i is Ellipsis for i in idx) > 1:
        raise ShapeError("only one ... is allowed in an index")
    n_real = builtins.sum(1 for i in idx if i is not None and i is not Ellipsis)
    if n_real > x.ndim:
        raise ShapeError(f"too many indices for {x.type}")
    full_idx = []
    for i in idx:
        if i is Ellipsis:
            full_idx.extend([builtins.slice(None)] * (x.ndim - n_real))
        else:
            full_idx.append(i)
    full_idx.extend([builtins.slice(None)] * (x.ndim - builtins.sum(1 for i in full_idx if i is not None)))
    starts, ends, steps, out_shape = [], [], [], []
    dim = 0
    for i in full_idx:
        if i is None:
            out_shape.append(1)
            continue
        n = x.shape[dim]
        if isinstance(i, builtins.slice):
            a, b, st = i.indices(n)
            if st < 1:
                raise ShapeError(f"index of {x.type}: negative steps are not supported")
            starts.append(a); ends.append(builtins.max(a, b)); steps.append(st)
            out_shape.append(len(range(a, builtins.max(a, b), st)))
        elif isinstance(i, (int, np.integer)):
            j = int(i) + n if i < 0 else int(i)
            if not 0 <= j < n:
                raise ShapeError(f"index {i} is out of range for dim {dim} of {x.type}")
            starts.append(j); ends.append(j + 1); steps.append(1)
        else:
            raise ShapeError(f"unsupported index {i!r}: use ints, slices, ... and None")
        dim += 1
    y = apply("slice", x, starts=starts, ends=ends, steps=steps)
    return y if tuple(y.shape) == tuple(out_shape) else reshape(y, out_shape)


def split(x, sizes, axis: int = 0) -> list:
    """x cut along `axis` into consecutive pieces of `sizes` (which must add up to its length)."""
    ax = axis + x.ndim if axis < 0 else axis
    if not 0 <= ax < x.ndim or builtins.sum(sizes) != x.shape[ax] or builtins.min(sizes, default=0) < 0:
        raise ShapeError(f"split of {x.type} along axis {axis} into {list(sizes)}: the sizes must be >= 0 and "
                         f"add up to {x.shape[ax] if 0 <= ax < x.ndim else 'the dim'}")
    out, at = [], 0
    for s in sizes:
        starts, ends = [0] * x.ndim, list(x.shape)
        starts[ax], ends[ax] = at, at + s
        out.append(apply("slice", x, starts=starts, ends=ends, steps=[1] * x.ndim))
        at += s
    return out


def pad(x, pads, value: float = 0.0):
    """pads = (begin_0, ..., begin_n-1, end_0, ..., end_n-1), as in ONNX; constant mode."""
    return apply("pad", x, pads=tuple(pads), value=value)


_pad_op = pad   # for the functions whose `pad` argument hides it


# ---- reductions -------------------------------------------------------------------
def _axes(axes):
    if axes is None:
        return None
    return (axes,) if isinstance(axes, int) else tuple(axes)


def sum(x, axes=None, keepdims: bool = False): return apply("reduce_sum", x, axes=_axes(axes), keepdims=keepdims)
def mean(x, axes=None, keepdims: bool = False): return apply("reduce_mean", x, axes=_axes(axes), keepdims=keepdims)
def max(x, axes=None, keepdims: bool = False): return apply("reduce_max", x, axes=_axes(axes), keepdims=keepdims)


def min(x, axes=None, keepdims: bool = False):
    """The min over axes, as a max: -max(-x) for floats, and c - max(c - x) for integers with c
    = -1 (signed) or the largest value (unsigned): c - x is the bitwise complement, which never
    overflows where -x would (the most negative signed value, any nonzero unsigned one)."""
    if x.dtype in ("f16", "f32", "f64"):
        return -max(-x, axes, keepdims)
    c = constant(np.iinfo(DTYPES[x.dtype]).max if is_unsigned(x.dtype) else -1, x.dtype)
    return c - max(c - x, axes, keepdims)


def argmax(x, axis: int = 0, keepdims: bool = True, select_last_index: bool = False):
    """The index (i64) of the largest value along `axis`: the first one unless select_last_index
    (ONNX ArgMax), as a composite: the positions equal to the max, their least (or greatest) index."""
    if x.ndim == 0 or x.dtype == "bool":
        raise ShapeError(f"argmax needs a tensor of numbers of rank >= 1, got {x.type}")
    ax = axis + x.ndim if axis < 0 else axis
    if not 0 <= ax < x.ndim:
        raise ShapeError(f"argmax: axis {axis} is out of range for {x.type}")
    n = x.shape[ax]
    iota = constant(np.arange(n, dtype=np.int64).reshape([n if i == ax else 1 for i in range(x.ndim)]), "i64")
    hit = apply("equal", x, max(x, ax, keepdims=True))
    if select_last_index:
        idx = max(where(hit, iota, constant(-1, "i64")), ax, keepdims)
    else:
        idx = min(where(hit, iota, constant(n, "i64")), ax, keepdims)
    return idx


def layer_norm(x, scale=None, bias=None, axis: int = -1, eps: float = 1e-5, stats: bool = False):
    """Normalize over the dims from `axis` on (ONNX LayerNormalization): (x - mean) / sqrt(var + eps),
    times `scale` and plus `bias` (broadcast over those dims). With stats=True, also the mean and
    1 / sqrt(var + eps), with the normalized dims kept as 1."""
    ax = axis + x.ndim if axis < 0 else axis
    if not 0 <= ax < x.ndim:
        raise ShapeError(f"layer_norm: axis {axis} is out of range for {x.type}")
    axes = tuple(range(ax, x.ndim))
    mu = mean(x, axes, keepdims=True)
    d = x - mu
    inv = rsqrt(mean(d * d, axes, keepdims=True) + float(eps))
    y = d * inv
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return (y, mu, inv) if stats else y


def sum_to(x: Tensor, shape) -> Tensor:
    """Sum x over the dims that broadcasting expanded, so the result has `shape` (undoes broadcasting)."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    lead = x.ndim - len(shape)
    axes = list(range(lead)) + [lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1]
    y = sum(x, axes, keepdims=True) if axes else x
    return reshape(y, shape) if y.shape != shape else y


def softmax(x, axis: int = -1): return apply("softmax", x, axis=axis)
def log_softmax(x, axis: int = -1): return apply("log_softmax", x, axis=axis)


# ---- losses -----------------------------------------------------------------------
def softmax_cross_entropy(logits, labels):
    """Mean over the batch of -log softmax(logits)[label]; labels are integers in [0, C)."""
    return apply("softmax_cross_entropy", logits, labels)


def mse(pred, target):
    """Mean of (pred - target)^2 over all elements."""
    return apply("mse", pred, target)


# ---- communication (simulated ranks in the reference interpreter, MPI in backends) ---
def allreduce(x, op: str = "sum"): return apply("allreduce", x, op=op)
def broadcast(x, root: int = 0): return apply("broadcast", x, root=root)
def send(x, dst: int, tag: int = 0): return apply("send", x, dst=dst, tag=tag)


def recv(shape, dtype: str = "f32", src: int = 0, tag: int = 0):
    return apply("recv", shape=tuple(shape), dtype=dtype, src=src, tag=tag)


__all__ = [n for n, v in list(globals().items())
           if callable(v) and getattr(v, "__module__", None) == __name__ and not n.startswith("_")]
