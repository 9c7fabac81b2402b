"""Loop kernels: the backend-neutral form of fused elementwise chains, their reductions,
and copies with strides (transpose, slice, pad, concat). Each backend renders them (Numba as
Python source, LLVM as IR).

A loop kernel iterates over a shape; each array operand is read or written at
`offset + sum(i_k * stride_k)` of its flat view (stride 0 = broadcast). Adjacent
dims are merged when every operand allows it, so a bias add over [N,C,H,W] becomes
a 3-deep nest with a long, vectorisable inner loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.types import TensorType


@dataclass
class Operand:
    var: str                      # flat array variable in the generated function
    strides: list[int]            # element stride per iteration dim (0: broadcast)
    offset: int = 0


@dataclass(frozen=True)
class Const:
    """A scalar literal operand of a generated loop body."""
    value: float | int | bool
    dtype: str


@dataclass
class ScalarOp:
    """`var = op(args)` computed per element; args are locals (str) or Consts."""
    var: str
    op: str
    args: list
    in_types: list[TensorType]
    out_type: TensorType
    attrs: dict


@dataclass
class Reduce:
    """A reduction closing the loop nest: acc = init; acc (+|max)= local over the reduced dims;
    operand <- acc * scale."""
    operand: Operand
    local: str
    kind: str              # sum | mean | max
    scale: float | int
    reduced: list[bool]    # per collapsed dim
    init: float | int
    acc_dtype: str


def c_strides(shape) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def broadcast_strides(shape, iter_shape) -> list[int]:
    """Strides that read an array of `shape` broadcast to `iter_shape` (numpy rules)."""
    lead = len(iter_shape) - len(shape)
    st = c_strides(shape)
    out = []
    for k, n in enumerate(iter_shape):
        j = k - lead
        out.append(0 if j < 0 or shape[j] == 1 else st[j])
    return out


def collapse(dims: list[int], operands: list[Operand], keep_apart: set[int] = frozenset()):
    """Drop size-1 dims and merge neighbours that every operand walks contiguously.
    `keep_apart` lists dims (reduced axes) that must not merge with dims outside the set."""
    keep = [k for k, n in enumerate(dims) if n != 1]
    new_dims = [dims[k] for k in keep]
    strides = [[op.strides[k] for k in keep] for op in operands]
    red = [k in keep_apart for k in keep]
    k = len(new_dims) - 2
    while k >= 0:
        ok = red[k] == red[k + 1] and all(s[k] == s[k + 1] * new_dims[k + 1] for s in strides)
        if ok:
            new_dims[k] *= new_dims[k + 1]
            for s in strides:
                s[k] = s[k + 1]
                del s[k + 1]
            del new_dims[k + 1]
            del red[k + 1]
        k -= 1
    for op, s in zip(operands, strides):
        op.strides = s
    return new_dims, red


# ---- loop nests ----------------------------------------------------------------------

@dataclass
class LoopKernel:
    """One generated function over flat operands `params`: loops over `dims`, per element the
    loads, the scalar ops of `body` and the stores, and optionally a closing reduction."""
    name: str
    params: list[str]
    dims: list[int]
    loads: list[tuple[str, Operand]] = field(default_factory=list)    # (local, operand)
    body: list[ScalarOp] = field(default_factory=list)                 # uses locals, defines locals
    stores: list[tuple[Operand, str]] = field(default_factory=list)   # operand <- local
    reduce: Reduce | None = None
