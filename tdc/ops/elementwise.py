"""Elementwise ops with numpy-style broadcasting, and constants."""
from __future__ import annotations

import math

import numpy as np

from ..ir.types import DTYPES, TensorType, is_float
from ..ir.opdef import Attr, defop
from .common import broadcast_shapes, fail, need_float, numel, same_dtype
from . import functional as F


def _ew_cost(flops_per_elem):
    return lambda ins, outs, **a: flops_per_elem * numel(outs[0].shape)


def _unary_infer(float_only=True):
    def infer(ins, **a):
        if float_only:
            need_float(ins[0])
        return ins[0]
    return infer


def _binary_infer(ins, **a):
    return TensorType(same_dtype(ins), broadcast_shapes(ins[0].shape, ins[1].shape))


def _compare_infer(ins, **a):
    same_dtype(ins)
    return TensorType("bool", broadcast_shapes(ins[0].shape, ins[1].shape))


def _keep_dtype(f):
    """Reference semantics computed by numpy, returned in the input dtype."""
    def ref(*xs, **a):
        return np.asarray(f(*xs, **a)).astype(xs[0].dtype, copy=False)
    return ref


# ---- binary arithmetic --------------------------------------------------------
# Gradients are reduced back to each input's shape (undoing broadcasting).

def _add_grad(ctx, a, b):
    return [F.sum_to(ctx.g, a.shape), F.sum_to(ctx.g, b.shape)]


def _sub_grad(ctx, a, b):
    return [F.sum_to(ctx.g, a.shape), F.sum_to(-ctx.g, b.shape)]


def _mul_grad(ctx, a, b):
    return [F.sum_to(ctx.g * b, a.shape), F.sum_to(ctx.g * a, b.shape)]


def _div_grad(ctx, a, b):
    ga = ctx.g / b
    return [F.sum_to(ga, a.shape), F.sum_to(-ga * ctx.out, b.shape)]


def _pow_grad(ctx, a, b):
    # d(a^b)/da = b a^(b-1); d/db = a^b log a (only where a > 0; 0 elsewhere, as frameworks do)
    ga = ctx.g * b * F.pow(a, b - 1.0)
    safe_log = F.log(F.where(a > 0.0, a, 1.0))
    gb = ctx.g * ctx.out * safe_log
    return [F.sum_to(ga, a.shape), F.sum_to(gb, b.shape)]


def _minmax_grad(pick_a_when):
    def grad(ctx, a, b):
        # ties send the gradient to the first input, as numpy-style reference frameworks do
        take_a = pick_a_when(a, b)
        zero = F.zeros_like(ctx.g)
        return [F.sum_to(F.where(take_a, ctx.g, zero), a.shape),
                F.sum_to(F.where(take_a, zero, ctx.g), b.shape)]
    return grad


def _int_safe_div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        # C semantics (truncate toward zero), as the compiled backends compute it. Computed in
        # integers (a float64 quotient is inexact beyond 2**53); x / 0 gives 0 instead of trapping.
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            q = np.floor_divide(a, b)
            r = np.remainder(a, b)
        q = q + ((r != 0) & ((a < 0) != (b < 0)))   # floor -> trunc for inexact negative quotients
        return np.where(b == 0, 0, q)
    return np.divide(a, b)


def _no_bool(name):
    def infer(ins, **a):
        t = _binary_infer(ins)
        if t.dtype == "bool":
            fail(f"{name} is not defined on bool tensors")
        return t
    return infer


defop("add", "elementwise", arity=(2, 2), infer=_no_bool("add"), ref=_keep_dtype(np.add), grad=_add_grad,
      cost=_ew_cost(1), doc="a + b")
defop("sub", "elementwise", arity=(2, 2), infer=_no_bool("sub"), ref=_keep_dtype(np.subtract), grad=_sub_grad,
      cost=_ew_cost(1), doc="a - b")
defop("mul", "elementwise", arity=(2, 2), infer=_no_bool("mul"), ref=_keep_dtype(np.multiply), grad=_mul_grad,
      cost=_ew_cost(1), doc="a * b")
defop("div", "elementwise", arity=(2, 2), infer=_no_bool("div"), ref=_keep_dtype(_int_safe_div), grad=_div_grad,
      cost=_ew_cost(1), doc="a / b (integer division truncates toward zero; integer x / 0 is 0)")


def _pow_infer(ins, **a):
    t = _binary_infer(ins)
    need_float(t, "pow's inputs")
    return t


defop("pow", "elementwise", arity=(2, 2), infer=_pow_infer, ref=_keep_dtype(np.power), grad=_pow_grad,
      cost=_ew_cost(10), doc="a ** b")
defop("maximum", "elementwise", arity=(2, 2), infer=_no_bool("maximum"), ref=_keep_dtype(np.maximum),
      grad=_minmax_grad(lambda a, b: a >= b), cost=_ew_cost(1), doc="elementwise max; ties go to a")
defop("minimum", "elementwise", arity=(2, 2), infer=_no_bool("minimum"), ref=_keep_dtype(np.minimum),
      grad=_minmax_grad(lambda a, b: a <= b), cost=_ew_cost(1), doc="elementwise min; ties go to a")

for _name, _fn in [("equal", np.equal), ("not_equal", np.not_equal), ("less", np.less),
                   ("less_equal", np.less_equal), ("greater", np.greater), ("greater_equal", np.greater_equal)]:
    defop(_name, "elementwise", arity=(2, 2), infer=_compare_infer, ref=_fn, cost=_ew_cost(1),
          doc=f"{_name}(a, b) -> bool")


def _where_infer(ins, **a):
    c, x, y = ins
    if c.dtype != "bool":
        fail(f"the condition must be bool, got {c}")
    return TensorType(same_dtype([x, y]), broadcast_shapes(c.shape, x.shape, y.shape))


def _where_grad(ctx, c, x, y):
    zero = F.zeros_like(ctx.g)
    return [None, F.sum_to(F.where(c, ctx.g, zero), x.shape), F.sum_to(F.where(c, zero, ctx.g), y.shape)]


defop("where", "elementwise", storage=True, arity=(3, 3), infer=_where_infer, ref=np.where, grad=_where_grad, nondiff=(0,),
      cost=_ew_cost(1), doc="where(cond, a, b): a where cond is true, else b")

# ---- unary ------------------------------------------------------------------


def _sigmoid(x):
    # stable for large |x|: exp of a non-positive number only
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _neg_infer(ins, **a):
    if ins[0].dtype == "bool":
        fail("neg is not defined on bool tensors")
    return ins[0]


defop("neg", "elementwise", infer=_neg_infer, ref=np.negative, grad=lambda ctx, x: [-ctx.g],
      cost=_ew_cost(1), doc="-x")
defop("abs", "elementwise", infer=_neg_infer, ref=np.abs, grad=lambda ctx, x: [ctx.g * F.sign(x)],
      cost=_ew_cost(1), doc="|x|")
defop("sign", "elementwise", infer=_neg_infer, ref=_keep_dtype(np.sign), grad=lambda ctx, x: [F.zeros_like(x)],
      cost=_ew_cost(1), doc="-1, 0 or 1")
defop("exp", "elementwise", infer=_unary_infer(), ref=_keep_dtype(np.exp), grad=lambda ctx, x: [ctx.g * ctx.out],
      cost=_ew_cost(10), doc="e^x")
defop("log", "elementwise", infer=_unary_infer(), ref=_keep_dtype(np.log), grad=lambda ctx, x: [ctx.g / x],
      cost=_ew_cost(10), doc="natural log")
defop("sqrt", "elementwise", infer=_unary_infer(), ref=_keep_dtype(np.sqrt),
      grad=lambda ctx, x: [ctx.g * 0.5 / ctx.out], cost=_ew_cost(4), doc="square root")
defop("rsqrt", "elementwise", infer=_unary_infer(), ref=_keep_dtype(lambda x: 1 / np.sqrt(x)),
      grad=lambda ctx, x: [ctx.g * -0.5 * ctx.out / x], cost=_ew_cost(5), doc="1 / sqrt(x)")
defop("relu", "elementwise", infer=_unary_infer(), ref=_keep_dtype(lambda x: np.maximum(x, 0)),
      grad=lambda ctx, x: [F.where(x > 0.0, ctx.g, F.zeros_like(ctx.g))], cost=_ew_cost(1), doc="max(x, 0)")
defop("leaky_relu", "elementwise", infer=_unary_infer(), attrs={"alpha": Attr("float", 0.01)},
      ref=_keep_dtype(lambda x, alpha: np.where(x > 0, x, alpha * x)),
      grad=lambda ctx, x: [F.where(x > 0.0, ctx.g, ctx.g * ctx.attrs["alpha"])],
      cost=_ew_cost(2), doc="x if x > 0 else alpha * x")
defop("sigmoid", "elementwise", infer=_unary_infer(), ref=_keep_dtype(_sigmoid),
      grad=lambda ctx, x: [ctx.g * ctx.out * (1.0 - ctx.out)], cost=_ew_cost(12), doc="1 / (1 + e^-x)")
defop("tanh", "elementwise", infer=_unary_infer(), ref=_keep_dtype(np.tanh),
      grad=lambda ctx, x: [ctx.g * (1.0 - ctx.out * ctx.out)], cost=_ew_cost(12), doc="tanh")

# numpy has no erf: math.erf per element, in float64 (the reference is the oracle, not the fast path)
_erf64 = np.frompyfunc(math.erf, 1, 1)
defop("erf", "elementwise", infer=_unary_infer(), ref=_keep_dtype(lambda x: np.asarray(_erf64(x.astype(np.float64)), np.float64)),
      grad=lambda ctx, x: [ctx.g * (2.0 / math.sqrt(math.pi)) * F.exp(-(x * x))], cost=_ew_cost(14),
      doc="the error function, 2/sqrt(pi) times the integral of e^(-t^2) from 0 to x")


def _cast_grad(ctx, x):
    return [F.cast(ctx.g, x.dtype)] if is_float(x.dtype) or x.dtype == "bf16" else [None]


def _cast_ref(x, to):
    dt = TensorType(to, ()).np_dtype
    if to == "bf16" or x.dtype == DTYPES["bf16"]:
        # every cast to or from bf16 goes through f32, as the compiled backends do it (their bf16 is
        # the top half of an f32): f32 -> bf16 rounds to nearest even, bf16 -> f32 is exact
        return x.astype(np.float32).astype(dt)
    return x.astype(dt)


defop("cast", "elementwise", storage=True, attrs={"to": Attr("dtype")}, infer=lambda ins, to: ins[0].with_dtype(to),
      ref=_cast_ref, grad=_cast_grad, cost=_ew_cost(1),
      doc="convert to dtype `to` (float to int truncates toward zero; to and from bf16 through f32)")

# ---- constants --------------------------------------------------------------


def _constant_infer(ins, value):
    return TensorType.of(value)   # the tensor attribute only accepts tdc dtypes


defop("constant", "elementwise", storage=True, arity=(0, 0), attrs={"value": Attr("tensor")}, infer=_constant_infer,
      ref=lambda value: value.copy(), cost=lambda ins, outs, **a: 0, doc="a literal tensor")


def _full_infer(ins, shape, value, dtype):
    if any(d < 0 for d in shape):
        fail(f"shape {list(shape)} has a negative dimension")
    return TensorType(dtype, shape)


defop("full", "elementwise", storage=True, arity=(0, 0),
      attrs={"shape": Attr("ints"), "value": Attr("float", 0.0), "dtype": Attr("dtype", "f32")},
      infer=_full_infer, ref=lambda shape, value, dtype: np.full(shape, value, TensorType(dtype, ()).np_dtype),
      cost=lambda ins, outs, **a: 0, doc="a tensor of `shape` filled with `value`")
