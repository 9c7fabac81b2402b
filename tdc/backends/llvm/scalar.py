"""LLVM IR for one element of an elementwise op: the LLVM twin of loops.scalar_expr.

Values are computed in the op's output dtype (bool as i1 in registers, i8 in memory), with
the same semantics as the reference: NaN wins in maximum/minimum, integer division truncates
toward zero (and gives 0 for a zero divisor instead of trapping), casts truncate toward zero.
LLVM's integers are signless: the dtype says whether a division, comparison, widening or
int/float conversion is the signed or the unsigned instruction.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...errors import TdcError
from ...ir.types import DTYPES, TensorType, is_unsigned

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32, F64 = ir.HalfType(), ir.FloatType(), ir.DoubleType()
REG = {"f16": F16, "f32": F32, "f64": F64, "i8": I8, "i16": I16, "i32": I32, "i64": I64,
       "u8": I8, "u16": I16, "u32": I32, "u64": I64, "bool": I1,
       "bf16": I16}     # bf16's bits: LLVM's bfloat type has no portable conversions
MEM = {**REG, "bool": I8}       # numpy stores a bool in one byte


FLOAT_BITS = {"f16": 16, "f32": 32, "f64": 64}


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_BITS


def icmp(b: ir.IRBuilder, dtype: str, op: str, x, y):
    """An integer comparison, unsigned for bool and the u* dtypes."""
    return (b.icmp_unsigned if dtype == "bool" or is_unsigned(dtype) else b.icmp_signed)(op, x, y)


def const(dtype: str, value) -> ir.Constant:
    if dtype == "bool":
        return ir.Constant(I1, int(bool(value)))
    if is_float(dtype):
        return ir.Constant(REG[dtype], float(value))
    if dtype == "bf16":
        return ir.Constant(I16, int(np.array(value, DTYPES["bf16"]).view(np.uint16)))
    return ir.Constant(REG[dtype], int(value))


def load(b: ir.IRBuilder, ptr, dtype: str):
    v = b.load(ptr, typ=MEM[dtype])
    return b.icmp_unsigned("!=", v, ir.Constant(I8, 0)) if dtype == "bool" else v


def store(b: ir.IRBuilder, value, ptr, dtype: str):
    if dtype == "bool":
        value = b.zext(value, I8)
    b.store(value, ptr)


def intrinsic(module: ir.Module, name: str, dtype: str, n_args: int = 1) -> ir.Function:
    """llvm.<name>.f32 / .f64, or a libm function (tanhf / tanh, erff / erf) when LLVM has no intrinsic."""
    t = REG[dtype]
    libm = name in ("tanh", "erf")
    if libm and dtype == "f16":
        raise TdcError(f"llvm backend: {name} on f16 is not supported")
    full = f"llvm.{name}.f{FLOAT_BITS[dtype]}" if not libm else (name + "f" if dtype == "f32" else name)
    fn = module.globals.get(full)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(t, [t] * n_args), name=full)
    return fn


def convert(b: ir.IRBuilder, v, src: str, dst: str):
    """numpy astype for one element: float -> int truncates toward zero; x -> bool is x != 0."""
    if src == dst:
        return v
    if src == "bf16":
        return convert(b, bf16_to_f32(b, v), "f32", dst)
    if dst == "bf16":
        return f32_to_bf16(b, convert(b, v, src, "f32"))
    if dst == "bool":
        return b.fcmp_unordered("!=", v, const(src, 0)) if is_float(src) else b.icmp_signed("!=", v, const(src, 0))
    if src == "bool":
        return b.uitofp(v, REG[dst]) if is_float(dst) else b.zext(v, REG[dst])
    if is_float(src) and is_float(dst):
        return b.fpext(v, REG[dst]) if FLOAT_BITS[dst] > FLOAT_BITS[src] else b.fptrunc(v, REG[dst])
    if is_float(src):
        return (b.fptoui if is_unsigned(dst) else b.fptosi)(v, REG[dst])
    if is_float(dst):
        return (b.uitofp if is_unsigned(src) else b.sitofp)(v, REG[dst])
    if REG[dst].width == REG[src].width:
        return v            # i32 <-> u32: the same bits
    if REG[dst].width < REG[src].width:
        return b.trunc(v, REG[dst])
    return (b.zext if is_unsigned(src) else b.sext)(v, REG[dst])


def bf16_to_f32(b: ir.IRBuilder, v):
    """Exact: bf16 is the top half of an f32."""
    return b.bitcast(b.shl(b.zext(v, I32), ir.Constant(I32, 16)), F32)


def f32_to_bf16(b: ir.IRBuilder, x):
    """Round to nearest even: adding 0x7FFF plus the kept half's lowest bit carries into it
    exactly when the dropped half is above one half, or at one half with an odd kept half.
    A NaN keeps its sign and top payload with the quiet bit set, so that no NaN rounds to inf."""
    bits = b.bitcast(x, I32)
    lsb = b.and_(b.lshr(bits, ir.Constant(I32, 16)), ir.Constant(I32, 1))
    rounded = b.lshr(b.add(bits, b.add(lsb, ir.Constant(I32, 0x7FFF))), ir.Constant(I32, 16))
    quiet = b.or_(b.lshr(bits, ir.Constant(I32, 16)), ir.Constant(I32, 0x40))
    return b.trunc(b.select(_isnan(b, x), quiet, rounded), I16)


def _isnan(b, x):
    return b.fcmp_unordered("uno", x, x)


def fmax(b, x, y, dtype, smaller=False):
    """numpy maximum / minimum: NaN wins."""
    if not is_float(dtype):
        return b.select(icmp(b, dtype, "<=" if smaller else ">=", x, y), x, y)
    pick = b.select(b.fcmp_ordered("<=" if smaller else ">=", x, y), x, y)
    return b.select(_isnan(b, x), x, b.select(_isnan(b, y), y, pick))


_CMP = {"equal": "==", "not_equal": "!=", "less": "<", "less_equal": "<=", "greater": ">", "greater_equal": ">="}


def emit(b: ir.IRBuilder, op: str, args: list, in_types: list[TensorType], out: TensorType, attrs: dict):
    """LLVM instructions computing one element of `op`."""
    m = b.module
    dt = out.dtype
    fl = is_float(dt)
    x = args[0] if args else None
    if op in _CMP:
        t = in_types[0].dtype
        if is_float(t):
            return (b.fcmp_unordered if op == "not_equal" else b.fcmp_ordered)(_CMP[op], args[0], args[1])
        return icmp(b, t, _CMP[op], args[0], args[1])
    if op == "where":
        return b.select(args[0], args[1], args[2])
    if op in ("broadcast_to",):
        return x
    if op == "cast":
        return convert(b, x, in_types[0].dtype, attrs["to"])
    if dt == "bool" and op in ("add", "mul", "maximum", "minimum", "sub"):
        # numpy on bools: add/maximum = or, mul/minimum = and
        return (b.or_ if op in ("add", "maximum") else b.and_)(args[0], args[1]) if op != "sub" else b.xor(args[0], args[1])
    if op == "add":
        return b.fadd(*args) if fl else b.add(*args)
    if op == "sub":
        return b.fsub(*args) if fl else b.sub(*args)
    if op == "mul":
        return b.fmul(*args) if fl else b.mul(*args)
    if op == "div":
        if fl:
            return b.fdiv(*args)
        zero, one = const(dt, 0), const(dt, 1)
        y = args[1]
        bad = b.icmp_signed("==", y, zero)
        if is_unsigned(dt):
            return b.select(bad, zero, b.udiv(x, b.select(bad, one, y)))
        minus_one = b.icmp_signed("==", y, const(dt, -1))
        safe = b.select(b.or_(bad, minus_one), one, y)          # no trap on /0 or MIN / -1
        q = b.sdiv(x, safe)
        q = b.select(minus_one, b.neg(x), q)
        return b.select(bad, zero, q)
    if op == "pow":
        if fl:
            return b.call(intrinsic(m, "pow", dt, 2), args)
        xd, yd = convert(b, args[0], dt, "f64"), convert(b, args[1], dt, "f64")
        return convert(b, b.call(intrinsic(m, "pow", "f64", 2), [xd, yd]), "f64", dt)
    if op in ("maximum", "minimum"):
        return fmax(b, args[0], args[1], dt, smaller=(op == "minimum"))
    if op == "neg":
        return b.fneg(x) if fl else b.neg(x)
    if op == "abs":
        if fl:
            return b.call(intrinsic(m, "fabs", dt), [x])
        return x if is_unsigned(dt) else b.select(b.icmp_signed("<", x, const(dt, 0)), b.neg(x), x)
    if op == "sign":
        zero = const(dt, 0)
        if fl:
            pos, negv = b.fcmp_ordered(">", x, zero), b.fcmp_ordered("<", x, zero)
        else:
            pos, negv = icmp(b, dt, ">", x, zero), icmp(b, dt, "<", x, zero)
        return b.select(pos, const(dt, 1), b.select(negv, const(dt, -1), x if fl else zero))
    if op in ("exp", "log", "sqrt", "tanh", "erf"):
        return b.call(intrinsic(m, op, dt), [x])
    if op == "rsqrt":
        return b.fdiv(const(dt, 1), b.call(intrinsic(m, "sqrt", dt), [x]))
    if op == "relu":
        if not fl:
            return b.select(icmp(b, dt, ">", x, const(dt, 0)), x, const(dt, 0))
        keep = b.or_(b.fcmp_ordered(">", x, const(dt, 0)), _isnan(b, x))
        return b.select(keep, x, const(dt, 0))
    if op == "leaky_relu":
        return b.select(b.fcmp_ordered(">", x, const(dt, 0)), x, b.fmul(const(dt, attrs["alpha"]), x))
    if op == "sigmoid":
        # exp of a non-positive number only: no overflow for large |x|
        e = b.call(intrinsic(m, "exp", dt), [b.fneg(b.call(intrinsic(m, "fabs", dt), [x]))])
        den = b.fadd(const(dt, 1), e)
        return b.select(b.fcmp_ordered(">=", x, const(dt, 0)), b.fdiv(const(dt, 1), den), b.fdiv(e, den))
    raise TdcError(f"llvm backend: no scalar lowering for {op} on {dt}")
