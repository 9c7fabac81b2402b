"""Matrix products: batched matmul and linear (x @ w.T + b)."""
from __future__ import annotations

import numpy as np

from ..ir.types import TensorType
from . import functional as F
from ..ir.opdef import defop
from .common import broadcast_shapes, fail, need_float, numel, same_dtype


def _swap_last(x):
    perm = list(range(x.ndim))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return F.transpose(x, perm)


def _matmul_infer(ins):
    a, b = ins
    dt = same_dtype(ins)
    if dt == "bool":
        fail("matmul is not defined on bool tensors")
    if a.rank < 2 or b.rank < 2:
        fail("both inputs need rank >= 2 (reshape a vector to [1,k] or [k,1])")
    if a.shape[-1] != b.shape[-2]:
        fail(f"inner dimensions differ: {a.shape[-1]} vs {b.shape[-2]}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return TensorType(dt, batch + (a.shape[-2], b.shape[-1]))


def _matmul_grad(ctx, a, b):
    return [F.sum_to(F.matmul(ctx.g, _swap_last(b)), a.shape),
            F.sum_to(F.matmul(_swap_last(a), ctx.g), b.shape)]


defop("matmul", "linalg", arity=(2, 2), infer=lambda ins: _matmul_infer(ins),
      ref=lambda a, b: np.matmul(a, b), grad=_matmul_grad,
      cost=lambda ins, outs: 2 * numel(outs[0].shape) * ins[0].shape[-1],
      doc="batched matrix product with numpy broadcasting over leading dims")


def _linear_infer(ins):
    x, w = ins[0], ins[1]
    dt = same_dtype(ins)
    need_float(x)
    if x.rank < 1 or w.rank != 2:
        fail("x needs rank >= 1 and w must be [out, in]")
    if x.shape[-1] != w.shape[1]:
        fail(f"x has {x.shape[-1]} features but w is [out={w.shape[0]}, in={w.shape[1]}]")
    if len(ins) == 3 and ins[2].shape != (w.shape[0],):
        fail(f"bias must be [{w.shape[0]}], got {list(ins[2].shape)}")
    return TensorType(dt, x.shape[:-1] + (w.shape[0],))


def _linear_ref(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def _linear_grad(ctx, x, w, b=None):
    g = ctx.g
    gx = F.reshape(F.matmul(F.reshape(g, (-1, w.shape[0])), w), x.shape)
    g2 = F.reshape(g, (-1, w.shape[0]))
    x2 = F.reshape(x, (-1, w.shape[1]))
    gw = F.matmul(F.transpose(g2, (1, 0)), x2)
    grads = [gx, gw]
    if b is not None:
        grads.append(F.sum(g2, 0))
    return grads


defop("linear", "linalg", arity=(2, 3), infer=lambda ins: _linear_infer(ins), ref=_linear_ref,
      grad=_linear_grad, cost=lambda ins, outs: 2 * numel(outs[0].shape) * ins[1].shape[1],
      doc="x @ w.T + b; w is [out, in] (PyTorch Linear, ONNX Gemm transB=1)")
