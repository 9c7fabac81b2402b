"""Elementwise ops and constants: reference semantics against per-element Python formulas
(explicit broadcasting indexes, math module, float64), inferred types, and errors."""
from __future__ import annotations

import math
import operator
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import (FAST, FLOAT_DTYPES, INT_DTYPES, MEDIUM, NP, RTOL, all_indices, array_of, bcast_shape,
                     broadcast_pair, from_dict, infer_op, run_op, shapes, source_index)
from tdc.errors import ShapeError
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.backends.reference import run
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType

NUMERIC = INT_DTYPES + FLOAT_DTYPES
# results below a dtype's smallest subnormal round to 0 (the product of two tiny f32 values, say):
# an absolute error of up to that subnormal is exact rounding, not a wrong result
ATOL = {"f16": 6e-8, "f32": float(np.finfo(np.float32).smallest_subnormal),
        "f64": float(np.finfo(np.float64).smallest_subnormal)}


def c_div(a, b):
    """Integer division truncating toward zero, as C does."""
    q = abs(a) // abs(b)
    return -q if (a < 0) != (b < 0) else q


# name -> (python function, dtypes, (lo, hi) for a, (lo, hi) for b, b must be away from 0)
BINARY = {
    "add": (operator.add, NUMERIC, (-11, 11), (-11, 11), False),
    "sub": (operator.sub, NUMERIC, (-11, 11), (-11, 11), False),
    "mul": (operator.mul, NUMERIC, (-11, 11), (-11, 11), False),
    "div": (None, NUMERIC, (-50, 50), (-9, 9), True),
    "pow": (math.pow, FLOAT_DTYPES, (0.5, 4), (-3, 3), False),
    "maximum": (max, NUMERIC, (-3, 3), (-3, 3), False),
    "minimum": (min, NUMERIC, (-3, 3), (-3, 3), False),
}
COMPARE = {
    "equal": operator.eq, "not_equal": operator.ne, "less": operator.lt,
    "less_equal": operator.le, "greater": operator.gt, "greater_equal": operator.ge,
}


def expected_binary(fn, a, b, out_dtype):
    out_shape = bcast_shape(a.shape, b.shape)
    vals = {}
    for idx in all_indices(out_shape):
        x, y = a[source_index(idx, a.shape)].item(), b[source_index(idx, b.shape)].item()
        vals[idx] = fn(x, y)
    return out_shape, from_dict(out_shape, vals, NP[out_dtype])


@pytest.mark.parametrize("op", sorted(BINARY))
@FAST
@given(data=st.data())
def test_binary_ops_broadcast(op, data):
    fn, dtypes, (alo, ahi), (blo, bhi), away = BINARY[op]
    dt = data.draw(st.sampled_from(dtypes), label="dtype")
    sa, sb = data.draw(broadcast_pair(), label="shapes")
    a = array_of(data.draw, sa, dt, alo, ahi)
    b = array_of(data.draw, sb, dt, blo, bhi, nonzero=away, min_abs=0.5 if away else 0.0)
    if op == "div":
        fn = c_div if dt in INT_DTYPES else operator.truediv
    (out,) = run_op(op, [a, b])
    want_shape = bcast_shape(sa, sb)
    assert infer_op(op, [TensorType.of(a), TensorType.of(b)]) == [TensorType(dt, want_shape)]
    assert out.shape == want_shape and out.dtype == NP[dt]
    _, want = expected_binary(fn, a, b, "f64" if dt in FLOAT_DTYPES else dt)
    if dt in INT_DTYPES:
        np.testing.assert_array_equal(out, want)
    else:
        np.testing.assert_allclose(out.astype(np.float64), want, rtol=RTOL[dt], atol=ATOL[dt])


@pytest.mark.parametrize("op", sorted(COMPARE))
@FAST
@given(data=st.data())
def test_comparisons_give_bool(op, data):
    dt = data.draw(st.sampled_from(NUMERIC + ("bool",) if op in ("equal", "not_equal") else NUMERIC))
    sa, sb = data.draw(broadcast_pair(), label="shapes")
    a = array_of(data.draw, sa, dt, -2, 2)   # a small range so that ties are common
    b = array_of(data.draw, sb, dt, -2, 2)
    (out,) = run_op(op, [a, b])
    assert out.dtype == np.bool_
    assert infer_op(op, [TensorType.of(a), TensorType.of(b)]) == [TensorType("bool", bcast_shape(sa, sb))]
    _, want = expected_binary(COMPARE[op], a, b, "bool")
    np.testing.assert_array_equal(out, want)


@FAST
@given(data=st.data())
def test_where_broadcasts_three_ways(data):
    dt = data.draw(st.sampled_from(NUMERIC + ("bool",)))
    sc, sx, sy = data.draw(broadcast_pair(n=3), label="shapes")
    c = array_of(data.draw, sc, "bool", 0, 1)
    x = array_of(data.draw, sx, dt, -100, 100)
    y = array_of(data.draw, sy, dt, -100, 100)
    (out,) = run_op("where", [c, x, y])
    shape = bcast_shape(sc, sx, sy)
    assert out.shape == shape and out.dtype == NP[dt]
    for idx in all_indices(shape):
        pick = x if c[source_index(idx, sc)] else y
        src = sx if pick is x else sy
        assert out[idx] == pick[source_index(idx, src)], idx


def test_integer_division_truncates_toward_zero():
    for dt in INT_DTYPES:
        a = np.array([-7, 7, -7, 7, -1, 1, -6, 0, 9], NP[dt])
        b = np.array([2, -2, -2, 2, 2, -2, 3, -5, 4], NP[dt])
        (out,) = run_op("div", [a, b])
        assert out.dtype == NP[dt]
        assert out.tolist() == [-3, -3, 3, 3, 0, 0, -2, 0, 2]


def test_integer_division_is_exact_for_large_int64():
    # a float64 quotient would round these (they are beyond 2**53)
    a = np.array([2**62 + 1, -(2**62 + 3), 2**63 - 1, -(2**63) + 1], np.int64)
    b = np.array([1, 2, 3, -7], np.int64)
    (out,) = run_op("div", [a, b])
    assert out.tolist() == [c_div(int(x), int(y)) for x, y in zip(a, b)]


def test_integer_division_by_zero_gives_zero_without_warnings():
    (out,) = run_op("div", [np.array([5, -5, 0], np.int32), np.array([0, 0, 0], np.int32)])
    assert out.tolist() == [0, 0, 0]


# name -> (python function, dtypes, lo, hi)
def _sigmoid(v):
    try:
        return 1.0 / (1.0 + math.exp(-v))
    except OverflowError:          # v < -709: 1 / (1 + e^-v) == e^v to double precision
        return math.exp(v)


UNARY = {
    "neg": (lambda v: -v, NUMERIC, -100, 100),
    "abs": (abs, NUMERIC, -100, 100),
    "sign": (lambda v: (v > 0) - (v < 0), NUMERIC, -3, 3),
    "exp": (math.exp, FLOAT_DTYPES, -20, 10),
    "log": (math.log, FLOAT_DTYPES, 0.01, 100),
    "sqrt": (math.sqrt, FLOAT_DTYPES, 0, 100),
    "rsqrt": (lambda v: 1 / math.sqrt(v), FLOAT_DTYPES, 0.01, 100),
    "relu": (lambda v: v if v > 0 else 0.0, FLOAT_DTYPES, -100, 100),
    "sigmoid": (_sigmoid, FLOAT_DTYPES, -50, 50),
    "tanh": (math.tanh, FLOAT_DTYPES, -20, 20),
    "erf": (math.erf, FLOAT_DTYPES, -6, 6),
}


@pytest.mark.parametrize("op", sorted(UNARY))
@FAST
@given(data=st.data())
def test_unary_ops(op, data):
    fn, dtypes, lo, hi = UNARY[op]
    dt = data.draw(st.sampled_from(dtypes))
    x = array_of(data.draw, data.draw(shapes()), dt, lo, hi)
    (out,) = run_op(op, [x])
    assert out.shape == x.shape and out.dtype == x.dtype
    want = {idx: fn(x[idx].item()) for idx in all_indices(x.shape)}
    if dt in INT_DTYPES:
        np.testing.assert_array_equal(out, from_dict(x.shape, want, np.int64))
    else:
        np.testing.assert_allclose(out.astype(np.float64), from_dict(x.shape, want, np.float64),
                                   rtol=RTOL[dt], atol=ATOL[dt])


@FAST
@given(data=st.data())
def test_leaky_relu(data):
    dt = data.draw(st.sampled_from(FLOAT_DTYPES))
    alpha = data.draw(st.sampled_from([0.0, 0.01, 0.2, 0.5, 1.5]))
    x = array_of(data.draw, data.draw(shapes()), dt, -100, 100)
    attrs = {} if alpha == 0.01 and data.draw(st.booleans()) else {"alpha": alpha}   # 0.01 is the default
    (out,) = run_op("leaky_relu", [x], **attrs)
    want = from_dict(x.shape, {i: (v if v > 0 else alpha * v) for i in all_indices(x.shape)
                               for v in [x[i].item()]}, np.float64)
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=RTOL[dt], atol=ATOL[dt])


@pytest.mark.parametrize("dt", FLOAT_DTYPES)
def test_sigmoid_is_stable_at_extremes(dt):
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0, -np.inf, np.inf], NP[dt])
    (out,) = run_op("sigmoid", [x])   # strict: an overflow or invalid warning fails the test
    assert np.all(np.isfinite(out))
    assert out[0] == 0.0 and out[5] == 0.0      # exact limits
    assert out[3] == 1.0 and out[4] == 1.0 and out[6] == 1.0
    assert out[2] == 0.5
    np.testing.assert_allclose(out[1], _sigmoid(-50.0), rtol=RTOL[dt], atol=ATOL[dt])
    (big,) = run_op("sigmoid", [np.full((3,), -1000.0, NP[dt])])
    assert big.tolist() == [0.0] * 3


def _round_to(v: float, dt: str) -> float:
    """Round a Python float to f16/f32 with the struct module (IEEE round to nearest even)."""
    if dt == "f64":
        return v
    fmt = {"f16": "<e", "f32": "<f"}[dt]
    return struct.unpack(fmt, struct.pack(fmt, v))[0]


ALL_DTYPES = ("bool",) + NUMERIC


@pytest.mark.parametrize("src", ALL_DTYPES)
@MEDIUM
@given(data=st.data())
def test_cast_between_all_dtypes(src, data):
    to = data.draw(st.sampled_from(ALL_DTYPES), label="to")
    shape = data.draw(shapes(max_rank=3))
    x = array_of(data.draw, shape, src, -100, 100)   # fractional for floats; fits every dtype
    (out,) = run_op("cast", [x], to=to)
    assert out.dtype == NP[to] and out.shape == x.shape
    for idx in all_indices(shape):
        v = x[idx].item()
        got = out[idx].item()
        if to == "bool":
            assert got == (v != 0), (v, got)
        elif to in INT_DTYPES:
            assert got == math.trunc(v), (v, got)          # toward zero
        else:
            assert got == _round_to(float(v), to), (v, got)


def test_cast_float_to_int_truncates_toward_zero():
    x = np.array([-7.9, -2.5, -0.5, -0.0, 0.5, 2.5, 7.9, 100.99], np.float32)
    (out,) = run_op("cast", [x], to="i32")
    assert out.tolist() == [-7, -2, 0, 0, 0, 2, 7, 100]
    (b,) = run_op("cast", [x], to="bool")
    assert b.tolist() == [True, True, True, False, True, True, True, True]
    (back,) = run_op("cast", [np.array([True, False])], to="f32")
    assert back.tolist() == [1.0, 0.0] and back.dtype == np.float32


@pytest.mark.parametrize("value", [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.array(3.5), np.array([True, False]),
    np.array([[-1, 2]], np.int8), np.array(7, np.int64), np.zeros((0, 2), np.int32), np.array([1.5], np.float16),
])
def test_constant(value):
    (out,) = run_op("constant", [], value=value)
    assert out.dtype == value.dtype and out.shape == value.shape
    assert out.tolist() == value.tolist()
    before = value.copy()
    out[...] = 1     # the result is a copy: writing to it leaves the attribute alone
    np.testing.assert_array_equal(value, before)
    assert infer_op("constant", [], value=value) == [TensorType.of(value)]


def test_constant_from_python_lists():
    (out,) = run_op("constant", [], value=[[1.0, 2.0]])
    assert out.dtype == np.float64 and out.tolist() == [[1.0, 2.0]]
    with pytest.raises(ShapeError, match="complex64"):
        infer_op("constant", [], value=np.array([1], np.complex64))


@MEDIUM
@given(shape=shapes(), dt=st.sampled_from(ALL_DTYPES),
       value=st.sampled_from([0.0, 1.0, -3.0, 2.5, -2.5, 2.7, -2.7, 100.0]))
def test_full(shape, dt, value):
    (out,) = run_op("full", [], shape=list(shape), value=value, dtype=dt)
    assert out.shape == shape and out.dtype == NP[dt]
    if dt == "bool":
        want = value != 0
    elif dt in INT_DTYPES:
        want = math.trunc(value)          # like cast: toward zero
    else:
        want = _round_to(value, dt)
    for idx in all_indices(shape):
        assert out[idx].item() == want


def test_full_default_dtype_and_errors():
    (out,) = run_op("full", [], shape=[2], value=1.0)
    assert out.dtype == np.float32 and out.tolist() == [1.0, 1.0]
    with pytest.raises(ShapeError, match="negative"):
        infer_op("full", [], shape=[2, -1])
    with pytest.raises(ShapeError, match="shape"):
        infer_op("full", [], value=1.0)


# ---- errors ----------------------------------------------------------------------

@pytest.mark.parametrize("op", sorted(BINARY) + sorted(COMPARE))
def test_mismatched_dtypes_ask_for_a_cast(op):
    with pytest.raises(ShapeError, match="insert a cast") as e:
        infer_op(op, [TensorType("f32", (2,)), TensorType("i32", (2,))])
    assert op in str(e.value)


@pytest.mark.parametrize("op", sorted(BINARY) + sorted(COMPARE))
def test_non_broadcastable_shapes_name_both(op):
    with pytest.raises(ShapeError) as e:
        infer_op(op, [TensorType("f32", (2, 3)), TensorType("f32", (4,))])
    msg = str(e.value)
    assert "[2, 3]" in msg and "[4]" in msg and "broadcast" in msg


@pytest.mark.parametrize("op", ["exp", "log", "sqrt", "rsqrt", "relu", "leaky_relu", "sigmoid", "tanh", "erf"])
@pytest.mark.parametrize("dt", ["i32", "i64", "bool"])
def test_float_only_unary_ops_reject_integers(op, dt):
    with pytest.raises(ShapeError, match="float"):
        infer_op(op, [TensorType(dt, (3,))])


def test_other_type_errors():
    with pytest.raises(ShapeError, match="float"):
        infer_op("pow", [TensorType("i32", (2,)), TensorType("i32", (2,))])
    for op in ("add", "sub", "mul", "div", "maximum", "minimum"):
        with pytest.raises(ShapeError, match="bool"):
            infer_op(op, [TensorType("bool", (2,)), TensorType("bool", (2,))])
    for op in ("neg", "abs", "sign"):
        with pytest.raises(ShapeError, match="bool"):
            infer_op(op, [TensorType("bool", (2,))])
    with pytest.raises(ShapeError, match="condition must be bool"):
        infer_op("where", [TensorType("f32", (2,)), TensorType("f32", (2,)), TensorType("f32", (2,))])
    with pytest.raises(ShapeError, match="insert a cast"):
        infer_op("where", [TensorType("bool", (2,)), TensorType("f32", (2,)), TensorType("f64", (2,))])
    with pytest.raises(ShapeError, match="do not broadcast"):
        infer_op("where", [TensorType("bool", (3,)), TensorType("f32", (2,)), TensorType("f32", (2,))])
    with pytest.raises(ShapeError, match="unknown attribute 'beta'"):
        infer_op("leaky_relu", [TensorType("f32", (2,))], beta=0.1)
    with pytest.raises(ShapeError, match="takes 2 inputs"):
        infer_op("add", [TensorType("f32", (2,))])
    with pytest.raises(ShapeError):
        infer_op("cast", [TensorType("f32", (2,))], to="f128")


def test_dsl_operators_and_python_scalars():
    g = Graph("t")
    a = np.array([[1.5, -2.0, 3.0]], np.float32)
    n = np.array([7, -7, 2], np.int32)
    with Builder(g) as b:
        x = b.arg("x", TensorType.of(a), "input")
        i = b.arg("i", TensorType.of(n), "input")
        outs = [x + 1.0, 2.0 - x, x * x, x / 2.0, -x, abs(x), x > 0.0, i / 2, i * 3, F.clip(x, -1.0, 2.0),
                F.maximum(x, 0.0), F.where(x > 0.0, x, 0.0), F.square(x)]
    env = run(g, {x.value: a, i.value: n})
    got = [env[t.value] for t in outs]
    want = [a + 1, 2 - a, a * a, a / 2, -a, np.abs(a), a > 0, [3, -3, 1], n * 3,
            [[1.5, -1.0, 2.0]], [[1.5, 0.0, 3.0]], [[1.5, 0.0, 3.0]], a * a]
    for t, gv, w in zip(outs, got, want):
        assert gv.dtype == t.type.np_dtype
        np.testing.assert_allclose(np.asarray(gv, np.float64), np.asarray(w, np.float64), rtol=1e-6)
    assert got[7].dtype == np.int32 and got[6].dtype == np.bool_
