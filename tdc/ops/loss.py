"""Losses (scalar outputs) and one_hot."""
from __future__ import annotations

import numpy as np

from ..errors import TdcError
from ..ir.types import TensorType
from . import functional as F
from ..ir.opdef import Attr, defop
from .common import fail, need_float, numel


def _check_labels(labels, n_classes):
    bad = (labels < 0) | (labels >= n_classes)
    if np.any(bad):
        raise TdcError(f"label {int(labels[bad][0])} is out of range: labels must be in [0, {n_classes})")


def _sce_infer(ins):
    logits, labels = ins
    need_float(logits, "logits")
    if logits.rank != 2:
        fail("logits must be [N, C]")
    if labels.dtype not in ("i32", "i64") or labels.shape != logits.shape[:1]:
        fail(f"labels must be integers of shape [{logits.shape[0]}], got {labels}")
    return TensorType(logits.dtype, ())


def _sce_ref(logits, labels):
    _check_labels(labels, logits.shape[1])
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.asarray(-logp[np.arange(len(labels)), labels].mean(), logits.dtype)


def _sce_grad(ctx, logits, labels):
    n, c = logits.shape
    onehot = F.apply("one_hot", labels, depth=c, dtype=logits.dtype)
    return [(F.softmax(logits, 1) - onehot) * (ctx.g * (1.0 / n)), None]


defop("softmax_cross_entropy", "loss", arity=(2, 2), infer=lambda ins: _sce_infer(ins), ref=_sce_ref,
      grad=_sce_grad, nondiff=(1,), cost=lambda ins, outs: 6 * numel(ins[0].shape),
      doc="mean over the batch of -log softmax(logits)[label]; labels in [0, C)")


def _one_hot_infer(ins, depth, dtype):
    if ins[0].dtype not in ("i8", "i32", "i64"):
        fail(f"one_hot needs integer indices, got {ins[0]}")
    if depth < 1:
        fail(f"depth must be >= 1, got {depth}")
    return TensorType(dtype, ins[0].shape + (depth,))


def _one_hot_ref(idx, depth, dtype):
    _check_labels(idx, depth)
    return (idx[..., None] == np.arange(depth)).astype(TensorType(dtype, ()).np_dtype)


defop("one_hot", "loss", attrs={"depth": Attr("int"), "dtype": Attr("dtype", "f32")}, infer=_one_hot_infer,
      ref=_one_hot_ref, nondiff=(0,), grad=lambda ctx, idx: [None],
      cost=lambda ins, outs, **a: numel(outs[0].shape), doc="1 at [..., index], 0 elsewhere")


def _mse_infer(ins):
    p, t = ins
    need_float(p)
    if p != t:
        fail("prediction and target must have the same shape and dtype")
    return TensorType(p.dtype, ())


def _mse_grad(ctx, p, t):
    d = (p - t) * (ctx.g * (2.0 / max(numel(p.shape), 1)))
    return [d, -d]


defop("mse", "loss", arity=(2, 2), infer=lambda ins: _mse_infer(ins),
      ref=lambda p, t: np.asarray(np.mean((p.astype(np.float64) - t) ** 2), p.dtype),
      grad=_mse_grad, cost=lambda ins, outs: 3 * numel(ins[0].shape), doc="mean of (pred - target)^2")
