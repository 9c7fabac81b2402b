"""Batch normalization and dropout."""
from __future__ import annotations

import numpy as np

from . import functional as F
from ..ir.opdef import Attr, defop
from .common import fail, need_float, numel, same_dtype

# ---- batchnorm --------------------------------------------------------------------
# Channels are dim 1; statistics are taken over every other dim. Training mode normalizes
# with the batch statistics (biased variance) and also returns the new running statistics:
#   running = momentum * running + (1 - momentum) * batch      (ONNX's convention)


def _bn_infer(ins, eps, momentum, training):
    x = ins[0]
    need_float(x)
    same_dtype(ins)
    if x.rank < 2:
        fail("batchnorm needs [N, C, ...] input")
    c = x.shape[1]
    for name, t in zip(("scale", "bias", "mean", "var"), ins[1:]):
        if t.shape != (c,):
            fail(f"{name} must be [{c}] (one per channel), got {list(t.shape)}")
    if not 0.0 <= momentum <= 1.0:
        fail(f"momentum must be in [0, 1], got {momentum}")
    if training:
        if numel(x.shape) == 0:
            fail("training-mode batchnorm needs at least one value per channel")
        return [x, ins[3], ins[4]]
    return x


def _stat_axes(ndim):
    return (0,) + tuple(range(2, ndim))


def _chan(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _bn_ref(x, gamma, beta, mean, var, eps, momentum, training):
    ax = _stat_axes(x.ndim)
    if training:
        bmean = x.mean(axis=ax, dtype=np.float64)
        bvar = x.var(axis=ax, dtype=np.float64)
        y = (x - _chan(bmean, x.ndim)) / np.sqrt(_chan(bvar, x.ndim) + eps) * _chan(gamma, x.ndim) + _chan(beta, x.ndim)
        new_mean = momentum * mean + (1 - momentum) * bmean
        new_var = momentum * var + (1 - momentum) * bvar
        dt = x.dtype
        return y.astype(dt), new_mean.astype(dt), new_var.astype(dt)
    y = (x - _chan(mean, x.ndim)) / np.sqrt(_chan(var, x.ndim) + eps) * _chan(gamma, x.ndim) + _chan(beta, x.ndim)
    return y.astype(x.dtype)


def _bn_grad(ctx, x, gamma, beta, mean, var):
    eps, nd = ctx.attrs["eps"], x.ndim
    ax = _stat_axes(nd)
    cshape = (1, x.shape[1]) + (1,) * (nd - 2)
    ch = lambda v: F.reshape(v, cshape)  # noqa: E731
    g = ctx.g
    if ctx.attrs["training"]:
        m = numel(x.shape) // x.shape[1]
        mu = F.mean(x, ax, keepdims=True)
        xc = x - mu
        rstd = F.rsqrt(F.mean(xc * xc, ax, keepdims=True) + eps)
        xhat = xc * rstd
        dxhat = g * ch(gamma)
        s1 = F.sum(dxhat, ax, keepdims=True)
        s2 = F.sum(dxhat * xhat, ax, keepdims=True)
        gx = rstd * (1.0 / m) * (dxhat * float(m) - s1 - xhat * s2)
        return [gx, F.sum(g * xhat, ax), F.sum(g, ax), None, None]
    rstd = F.rsqrt(ch(var) + eps)
    xc = x - ch(mean)
    g_gamma = g * ch(gamma)
    return [g_gamma * rstd,
            F.sum(g * xc * rstd, ax),
            F.sum(g, ax),
            -F.sum(g_gamma * rstd, ax),
            F.sum(g_gamma * xc, ax) * F.reshape(rstd * rstd * rstd, (x.shape[1],)) * -0.5]


defop("batchnorm", "norm", arity=(5, 5),
      attrs={"eps": Attr("float", 1e-5), "momentum": Attr("float", 0.9), "training": Attr("bool", False)},
      infer=_bn_infer, ref=_bn_ref, grad=_bn_grad,
      cost=lambda ins, outs, **a: 8 * numel(ins[0].shape),
      doc="(x - mean) / sqrt(var + eps) * scale + bias per channel (dim 1); "
          "training=true uses batch statistics and also returns the updated running mean and var")

# ---- dropout -----------------------------------------------------------------------
# The mask is a counter-based hash of (seed, key, element index), so every backend
# computes the same mask bit for bit, and each training step (key = step) gets a new one.

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = 0xFFFFFFFFFFFFFFFF   # seeds and keys are taken modulo 2**64 (so negative ones work)


def splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def dropout_keep(shape, rate: float, seed: int, key: int) -> np.ndarray:
    """True where an element is kept: the top 24 bits of the hash, as a fraction, are >= rate."""
    with np.errstate(over="ignore"):   # uint64 arithmetic wraps around on purpose
        base = splitmix64(np.array([np.uint64(seed & _MASK64) * _GOLDEN + np.uint64(key & _MASK64)], np.uint64))[0]
        idx = np.arange(numel(shape), dtype=np.uint64)
        h = splitmix64(idx + base)
    u = (h >> np.uint64(40)).astype(np.float64) * (1.0 / (1 << 24))
    return (u >= rate).reshape(shape)


def _dropout_infer(ins, rate, seed):
    x, key = ins
    need_float(x)
    if key.shape != () or key.dtype not in ("i32", "i64"):
        fail(f"key must be an integer scalar (the step counter), got {key}")
    if not 0.0 <= rate < 1.0:
        fail(f"rate must be in [0, 1), got {rate}")
    return x


def _dropout_ref(x, key, rate, seed):
    keep = dropout_keep(x.shape, rate, seed, int(key))
    return np.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


defop("dropout", "norm", arity=(2, 2), attrs={"rate": Attr("float", 0.5), "seed": Attr("int", 0)},
      infer=_dropout_infer, ref=_dropout_ref, nondiff=(1,),
      grad=lambda ctx, x, key: [F.dropout(ctx.g, key, **ctx.attrs), None],
      cost=lambda ins, outs, **a: 4 * numel(ins[0].shape),
      doc="training-time dropout: zero with probability rate, scale the rest by 1/(1-rate); "
          "mask = hash(seed, key, index)")
