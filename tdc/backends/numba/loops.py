"""Rendering loop kernels (tdc/lower/loops.py) as the Python source of Numba functions."""
from __future__ import annotations

import math

import numpy as np

from ...errors import TdcError
from ...ir.types import DTYPES, TensorType
from ...lower.loops import Const, LoopKernel, Operand

PARALLEL_MIN = 1 << 15


# ---- scalar expressions ------------------------------------------------------------

NUMBA_TYPES = {"f32": "np.float32", "f64": "np.float64", "i8": "np.int8", "i16": "np.int16", "i32": "np.int32",
               "i64": "np.int64", "u8": "np.uint8", "u16": "np.uint16", "u32": "np.uint32", "u64": "np.uint64",
               "bool": "np.bool_", "bf16": "np.uint16"}     # Numba has no bfloat16: its bits


def literal(value, dtype: str) -> str:
    if dtype == "bf16":
        return f"np.uint16({int(np.array(value, DTYPES['bf16']).view(np.uint16))})"
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
              "sigmoid": "K.sigmoid({0})", "tanh": "np.tanh({0})", "erf": "math.erf({0})", "broadcast_to": "{0}"}
    if op == "div":
        expr = "K.idiv({0}, {1})" if dt.startswith("i") else ("K.udiv({0}, {1})" if dt.startswith("u") else "({0} / {1})")
    elif op == "rsqrt":
        expr = f"({literal(1, dt)} / np.sqrt({{0}}))"
    elif op == "leaky_relu":
        expr = f"({{0}} if {{0}} > 0 else {literal(attrs['alpha'], dt)} * {{0}})"
    elif op == "cast":
        src = in_types[0].dtype
        if src == "bf16":
            return _cast(f"K.bf16_to_f32({a[0]})", "f32") if dt == "f32" else \
                scalar_expr(op, [f"K.bf16_to_f32({a[0]})"], [in_types[0].with_dtype("f32")], out, attrs)
        if dt == "bf16":
            return f"K.f32_to_bf16({_cast(a[0], 'f32')})"
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

def loop_source(lk: LoopKernel, extra_params: list[str] = (), prologue: list[str] = ()) -> str:
    """`def name(params + extra_params): <prologue>; <loops>`; the kernel's own params are flattened."""
    dims = lk.dims
    total = int(np.prod(dims)) if dims else 1
    lines = [f"@njit(cache=True, parallel={total >= PARALLEL_MIN})",
             f"def {lk.name}({', '.join(list(lk.params) + list(extra_params))}):"]
    ind = "    "
    lines += [ind + s for s in prologue]
    for p in lk.params:
        lines.append(f"{ind}{p}_ = {p}.reshape(-1)")

    def index(op: Operand) -> str:
        terms = [f"i{k} * {s}" if s != 1 else f"i{k}" for k, s in enumerate(op.strides) if s]
        if op.offset:
            terms.insert(0, str(op.offset))
        return " + ".join(terms) or "0"

    if lk.reduce is None:
        order = list(range(len(dims)))
        red = [False] * len(dims)
    else:
        red = lk.reduce.reduced
        order = [k for k in range(len(dims)) if not red[k]] + [k for k in range(len(dims)) if red[k]]
    depth = 0
    par_used = False
    acc_opened = False
    for k in order:
        if lk.reduce is not None and red[k] and not acc_opened:
            lines.append(ind * (depth + 1) + f"acc = {literal(lk.reduce.init, lk.reduce.acc_dtype)}")
            acc_opened = True
        use_prange = total >= PARALLEL_MIN and not par_used and not red[k] and dims[k] > 1
        rng = "prange" if use_prange else "range"
        par_used = par_used or use_prange
        lines.append(ind * (depth + 1) + f"for i{k} in {rng}({dims[k]}):")
        depth += 1
    if lk.reduce is not None and not acc_opened:
        lines.append(ind * (depth + 1) + f"acc = {literal(lk.reduce.init, lk.reduce.acc_dtype)}")
    pad = ind * (depth + 1)
    for local, op in lk.loads:
        lines.append(f"{pad}{local} = {op.var}_[{index(op)}]")
    for b in lk.body:
        args = [literal(a.value, a.dtype) if isinstance(a, Const) else a for a in b.args]
        lines.append(f"{pad}{b.var} = {scalar_expr(b.op, args, b.in_types, b.out_type, b.attrs)}")
    for op, local in lk.stores:
        lines.append(f"{pad}{op.var}_[{index(op)}] = {local}")
    if lk.reduce is not None:
        r = lk.reduce
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
    if not dims and lk.reduce is None and not lk.loads and not lk.stores and not lk.body:
        lines.append(ind + "pass")
    return "\n".join(lines) + "\n"
