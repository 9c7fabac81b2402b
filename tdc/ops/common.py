"""Helpers the op families share: shape and dtype checks, axis normalisation."""
from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..ir.types import TensorType


def fail(msg: str):
    raise ShapeError(msg)


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        dims = {s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0}
        dims.discard(1)
        if len(dims) > 1:
            fail("shapes " + " and ".join(str(list(s)) for s in shapes) + " do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def same_dtype(types: list[TensorType]) -> str:
    dts = {t.dtype for t in types}
    if len(dts) != 1:
        fail("dtypes differ: " + ", ".join(sorted(dts)) + " (insert a cast)")
    return dts.pop()


def need_float(t: TensorType, what: str = "input"):
    if t.dtype not in ("f16", "f32", "f64"):
        fail(f"{what} must be a float tensor, got {t}")


def norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        fail(f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def norm_axes(axes, rank: int) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(rank))
    out = tuple(sorted({norm_axis(a, rank) for a in axes}))
    if len(out) != len(axes):
        fail(f"repeated axis in {list(axes)}")
    return out


def numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
