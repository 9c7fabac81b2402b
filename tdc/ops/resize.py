"""The build-time tables of F.resize (ONNX Resize), computed with numpy from the spec's formulas.

F.resize is a composition of gathers with these constant indices and of multiplications by these
constant weights, so it needs no kernels of its own: every backend runs it and autodiff
differentiates it (a gather's gradient is a scatter-add).
"""
from __future__ import annotations

import numpy as np

COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                    "tf_crop_and_resize")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
MODES = ("nearest", "linear", "cubic")


def source_coords(n_in: int, n_out: int, scale: float, mode: str, roi=(0.0, 1.0)):
    """Each output position's coordinate in the input (float64), and which fall outside it
    (tf_crop_and_resize only). The scaled length scale * n_in need not be an integer; ONNX's
    formulas use it as it is, except half_pixel_symmetric, which re-centres on the integer one."""
    x = np.arange(n_out, dtype=np.float64)
    length = scale * n_in
    outside = np.zeros(n_out, bool)
    if mode == "half_pixel":
        src = (x + 0.5) / scale - 0.5
    elif mode == "half_pixel_symmetric":
        src = n_in / 2 * (1 - n_out / length) + (x + 0.5) / scale - 0.5
    elif mode == "pytorch_half_pixel":
        # a single output pixel reads pixel 0, as the spec says (onnx's reference puts it at -0.5)
        src = (x + 0.5) / scale - 0.5 if length > 1 else np.zeros(n_out)
    elif mode == "align_corners":
        src = x * (n_in - 1) / (length - 1) if length != 1 else np.zeros(n_out)
    elif mode == "asymmetric":
        src = x / scale
    else:   # tf_crop_and_resize: the output spans roi, given in fractions of the input
        lo, hi = roi
        src = (x * (hi - lo) * (n_in - 1) / (length - 1) if length != 1
               else np.full(n_out, (hi - lo) * (n_in - 1) / 2)) + lo * (n_in - 1)
        outside = (src < 0) | (src > n_in - 1)
    return src, outside


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def axis_taps(n_in: int, n_out: int, scale: float, mode: str, coordinate_mode: str, nearest_mode: str,
              cubic_coeff_a: float, exclude_outside: bool, antialias: bool, roi=(0.0, 1.0)):
    """One resized axis as taps: (idx [n_out, taps] int64 in [0, n_in), weight [n_out, taps]
    float64, outside [n_out] bool). Output row i is sum_k weight[i, k] * input[idx[i, k]], or the
    extrapolation value where outside[i] (whose weights are 0)."""
    src, outside = source_coords(n_in, n_out, scale, coordinate_mode, roi)
    # ONNX's convention: the base pixel is the one strictly left of src, so the fraction is in (0, 1]
    base = np.ceil(src).astype(np.int64) - 1
    frac = src - base
    if mode == "nearest":
        up = {"round_prefer_floor": frac > 0.5, "round_prefer_ceil": frac >= 0.5,
              "floor": frac == 1, "ceil": np.ones(n_out, bool)}[nearest_mode]
        idx = (base + up)[:, None]
        weight = np.ones((n_out, 1))
    else:
        # antialias widens the filter by 1 / scale when downsampling, so every input pixel counts
        s = min(scale, 1.0) if antialias else 1.0
        support = 1 if mode == "linear" else 2
        start = int(np.floor(-support / s)) + 1
        k = np.arange(start, 2 - start)
        t = (k[None, :] - frac[:, None]) * s
        weight = np.clip(1 - np.abs(t), 0, 1) if mode == "linear" else _cubic(t, cubic_coeff_a)
        idx = base[:, None] + k[None, :]
        if exclude_outside:
            weight = np.where((idx < 0) | (idx >= n_in), 0.0, weight)
        weight = weight / weight.sum(1, keepdims=True)
    weight = np.where(outside[:, None], 0.0, weight)
    idx = np.clip(idx, 0, n_in - 1)   # the pixels beyond the edge repeat the edge pixel
    used = np.abs(weight).sum(0) > 0  # drop taps no output row reads (most of an antialias filter's ends)
    if not used.any():
        used[0] = True
    return idx[:, used], weight[:, used], outside
