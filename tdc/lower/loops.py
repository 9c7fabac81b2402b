"""Generating loop nests: the Python source of Numba kernels for fused elementwise chains,
their reductions, and copies with strides (transpose, slice, pad, concat).

A loop kernel iterates over a shape; each array operand is read or written at
`offset + sum(i_k * stride_k)` of its flat view (stride 0 = broadcast). Adjacent
dims are merged when every operand allows it, so a bias add over [N,C,H,W] becomes
a 3-deep nest with a long, vectorisable inner loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ...errors import TdcError
from ...ir.types import TensorType

PARALLEL_MIN = 1 << 15


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


# ---- scalar expressions ------------------------------------------------------------

NUMBA_TYPES = {"f32": "np.float32", "f64": "np.float64", "i8": "np.int8", "i32": "np.int32",
               "i64": "np.int64", "bool": "np.bool_"}


def literal(value, dtype: str) -> str:
    if dtype == "bool":
        return "True" if bool(value) else "False"
    if dtype.startswith("f"):
        v = float(value)
        text = "np.nan" if math.isnan(v) else ("np.inf" if v == math.inf else ("-np.inf" if v == -math.inf else repr(v)))
        return f"{NUMBA_TYPES[dtype]}({text})"
    return f"{NUMBA_TYPES[dtype]}({int(value)})"


def _cast(expr: str, dtype: str) -> str:
    return f"{NUMBA_TYPES[dtype]}({expr})" if dtype != "bool" else f"({expr})"


def scalar_expr(op: str, args: list[str], in_types: list[TensorType], out: TensorType, attrs: dict) -> str:
    """A Numba expression computing one element of an elementwise op."""
    a = args
    dt = out.dtype
    simple = {"add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "pow": "({0} ** {1})",
              "maximum": "K.fmax({0}, {1})", "minimum": "K.fmin({0}, {1})",
              "equal": "({0} == {1})", "not_equal": "({0} != {1})", "less": "({0} < {1})",
              "less_equal": "({0} <= {1})", "greater": "({0} > {1})", "greater_equal": "({0} >= {1})",
              "where": "({1} if {0} else {2})", "neg": "(-{0})", "abs": "abs({0})", "sign": "np.sign({0})",
              "exp": "np.exp({0})", "log": "np.log({0})", "sqrt": "np.sqrt({0})", "relu": "K.relu({0})",
              "sigmoid": "K.sigmoid({0})", "tanh": "np.tanh({0})", "broadcast_to": "{0}"}
    if op == "div":
        expr = "K.idiv({0}, {1})" if dt.startswith("i") else "({0} / {1})"
    elif op == "rsqrt":
        expr = f"({literal(1, dt)} / np.sqrt({{0}}))"
    elif op == "leaky_relu":
        expr = f"({{0}} if {{0}} > 0 else {literal(attrs['alpha'], dt)} * {{0}})"
    elif op == "cast":
        if attrs["to"] == "bool":
            return f"({a[0]} != 0)"
        expr = "{0}"   # the conversion below does it; float -> int truncates toward zero like astype
    elif op in simple:
        expr = simple[op]
    else:
        raise TdcError(f"internal: no scalar lowering for {op}")
    text = expr.format(*a)
    if dt == "bool":
        return text
    return _cast(text, dt)


# ---- loop nests ----------------------------------------------------------------------

@dataclass
class LoopKernel:
    """One generated function: `def name(params): <loops>`."""
    name: str
    params: list[str]
    dims: list[int]
    loads: list[tuple[str, Operand]] = field(default_factory=list)    # (local, operand)
    body: list[ScalarOp] = field(default_factory=list)                 # uses locals, defines locals
    stores: list[tuple[Operand, str]] = field(default_factory=list)   # operand <- local
    reduce: Reduce | None = None
    prologue: list[str] = field(default_factory=list)                  # statements before the loops (Numba only)
    flat: list[str] = field(default_factory=list)                      # params to flatten

    def source(self) -> str:
        dims = self.dims
        total = int(np.prod(dims)) if dims else 1
        lines = [f"@njit(cache=True, parallel={total >= PARALLEL_MIN})",
                 f"def {self.name}({', '.join(self.params)}):"]
        ind = "    "
        lines += [ind + s for s in self.prologue]
        for p in self.flat:
            lines.append(f"{ind}{p}_ = {p}.reshape(-1)")

        def index(op: Operand) -> str:
            terms = [f"i{k} * {s}" if s != 1 else f"i{k}" for k, s in enumerate(op.strides) if s]
            if op.offset:
                terms.insert(0, str(op.offset))
            return " + ".join(terms) or "0"

        if self.reduce is None:
            order = list(range(len(dims)))
            red = [False] * len(dims)
        else:
            red = self.reduce.reduced
            order = [k for k in range(len(dims)) if not red[k]] + [k for k in range(len(dims)) if red[k]]
        depth = 0
        par_used = False
        acc_opened = False
        for k in order:
            if self.reduce is not None and red[k] and not acc_opened:
                lines.append(ind * (depth + 1) + f"acc = {literal(self.reduce.init, self.reduce.acc_dtype)}")
                acc_opened = True
            use_prange = total >= PARALLEL_MIN and not par_used and not red[k] and dims[k] > 1
            rng = "prange" if use_prange else "range"
            par_used = par_used or use_prange
            lines.append(ind * (depth + 1) + f"for i{k} in {rng}({dims[k]}):")
            depth += 1
        if self.reduce is not None and not acc_opened:
            lines.append(ind * (depth + 1) + f"acc = {literal(self.reduce.init, self.reduce.acc_dtype)}")
        pad = ind * (depth + 1)
        for local, op in self.loads:
            lines.append(f"{pad}{local} = {op.var}_[{index(op)}]")
        for b in self.body:
            args = [literal(a.value, a.dtype) if isinstance(a, Const) else a for a in b.args]
            lines.append(f"{pad}{b.var} = {scalar_expr(b.op, args, b.in_types, b.out_type, b.attrs)}")
        for op, local in self.stores:
            lines.append(f"{pad}{op.var}_[{index(op)}] = {local}")
        if self.reduce is not None:
            r = self.reduce
            op, local, kind, scale, acc_dt = r.operand, r.local, r.kind, r.scale, r.acc_dtype
            if isinstance(local, Const):
                local = literal(local.value, local.dtype)
            if kind == "max":
                lines.append(f"{pad}acc = K.fmax(acc, {NUMBA_TYPES[acc_dt]}({local}))")
            else:
                lines.append(f"{pad}acc += {local}")
            n_red = sum(red)
            out_pad = ind * (depth + 1 - n_red)
            val = "acc" if scale == 1 else f"acc * {scale!r}"
            lines.append(f"{out_pad}{op.var}_[{index(op)}] = {val}")
        if not dims and self.reduce is None and not self.loads and not self.stores and not self.body:
            lines.append(ind + "pass")
        return "\n".join(lines) + "\n"
