"""matmul / linear and reductions / softmax against Python loops in exact or float64 arithmetic."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import (FAST, NP, all_indices, array_of, bcast_shape, broadcast_pair, infer_op, run_op,
                     shapes, source_index)
from tdc.errors import ShapeError
from tdc.ir.types import TensorType

EPS = {"f16": 2.0 ** -11, "f32": 2.0 ** -24, "f64": 2.0 ** -53}


def assert_sum_close(out, exact, scale, dt, n_terms):
    """|out - exact| <= (n_terms + 2) * (eps * scale + smallest subnormal) elementwise, where scale
    is the sum of the magnitudes of the terms (the standard bound for a floating-point sum of n terms,
    plus the absolute rounding of results below the normal range)."""
    out = np.asarray(out, np.float64)
    exact = np.asarray(exact, np.float64)
    tiny = float(np.finfo(NP[dt]).smallest_subnormal)
    tol = (n_terms + 2) * (EPS[dt] * np.asarray(scale, np.float64) + tiny)
    bad = np.abs(out - exact) > tol
    assert not bad.any(), f"out={out[bad]} exact={exact[bad]} tol={tol[bad]}"


# ---- matmul --------------------------------------------------------------------------

@FAST
@given(data=st.data())
def test_matmul_batched_broadcast(data):
    dt = data.draw(st.sampled_from(["i32", "i64", "f32", "f64"]), label="dtype")
    ba, bb = data.draw(broadcast_pair(max_rank=2, max_side=3), label="batch shapes")
    m, k, n = (data.draw(st.integers(1, 4)) for _ in range(3))
    a = array_of(data.draw, ba + (m, k), dt, -10, 10)
    b = array_of(data.draw, bb + (k, n), dt, -10, 10)
    (out,) = run_op("matmul", [a, b])
    batch = bcast_shape(ba, bb)
    assert out.shape == batch + (m, n) and out.dtype == NP[dt]
    assert infer_op("matmul", [TensorType.of(a), TensorType.of(b)]) == [TensorType(dt, batch + (m, n))]
    exact = np.zeros(out.shape, np.float64)
    scale = np.zeros(out.shape, np.float64)
    for bi in all_indices(batch):
        ia, ib = source_index(bi, ba), source_index(bi, bb)
        for i in range(m):
            for j in range(n):
                terms = [a[ia + (i, p)].item() * b[ib + (p, j)].item() for p in range(k)]
                if dt.startswith("i"):
                    assert out[bi + (i, j)] == sum(terms)
                exact[bi + (i, j)] = math.fsum(terms)
                scale[bi + (i, j)] = math.fsum(abs(t) for t in terms)
    if dt.startswith("f"):
        assert_sum_close(out, exact, scale, dt, k)


def test_matmul_small_exact():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[5.0], [6.0]])
    (out,) = run_op("matmul", [a, b])
    assert out.tolist() == [[17.0], [39.0]]


def test_matmul_errors():
    with pytest.raises(ShapeError, match="inner dimensions differ: 3 vs 4"):
        infer_op("matmul", [TensorType("f32", (2, 3)), TensorType("f32", (4, 5))])
    for sa, sb in [((3,), (3, 2)), ((2, 3), (3,)), ((), (2, 2))]:
        with pytest.raises(ShapeError, match="rank >= 2") as e:
            infer_op("matmul", [TensorType("f32", sa), TensorType("f32", sb)])
        assert "reshape" in str(e.value)
    with pytest.raises(ShapeError, match="do not broadcast"):
        infer_op("matmul", [TensorType("f32", (2, 2, 3)), TensorType("f32", (3, 3, 4))])
    with pytest.raises(ShapeError, match="insert a cast"):
        infer_op("matmul", [TensorType("f32", (2, 3)), TensorType("f64", (3, 4))])
    with pytest.raises(ShapeError, match="bool"):
        infer_op("matmul", [TensorType("bool", (2, 3)), TensorType("bool", (3, 4))])


# ---- linear ------------------------------------------------------------------------------

@FAST
@given(data=st.data())
def test_linear(data):
    dt = data.draw(st.sampled_from(["f32", "f64"]), label="dtype")
    lead = data.draw(shapes(0, 2, 1, 3), label="leading dims")
    fin, fout = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    with_bias = data.draw(st.booleans())
    x = array_of(data.draw, lead + (fin,), dt, -10, 10)
    w = array_of(data.draw, (fout, fin), dt, -10, 10)
    bias = array_of(data.draw, (fout,), dt, -10, 10)
    ins = [x, w, bias] if with_bias else [x, w]
    (out,) = run_op("linear", ins)
    assert out.shape == lead + (fout,) and out.dtype == NP[dt]
    exact = np.zeros(out.shape)
    scale = np.zeros(out.shape)
    for li in all_indices(lead):
        for o in range(fout):
            terms = [x[li + (i,)].item() * w[o, i].item() for i in range(fin)]
            if with_bias:
                terms.append(bias[o].item())
            exact[li + (o,)] = math.fsum(terms)
            scale[li + (o,)] = math.fsum(abs(t) for t in terms)
    assert_sum_close(out, exact, scale, dt, fin + 1)


def test_linear_errors():
    f = lambda *s: TensorType("f32", s)  # noqa: E731
    with pytest.raises(ShapeError, match="4 features but w is"):
        infer_op("linear", [f(2, 4), f(3, 5)])
    with pytest.raises(ShapeError, match="bias must be"):
        infer_op("linear", [f(2, 4), f(3, 4), f(4)])
    with pytest.raises(ShapeError, match=r"\[out, in\]"):
        infer_op("linear", [f(2, 4), f(4)])
    with pytest.raises(ShapeError, match="float"):
        infer_op("linear", [TensorType("i32", (2, 4)), TensorType("i32", (3, 4))])
    with pytest.raises(ShapeError, match="insert a cast"):
        infer_op("linear", [f(2, 4), f(3, 4), TensorType("f64", (3,))])


# ---- reductions -----------------------------------------------------------------------

@st.composite
def reduce_case(draw, min_rank=0):
    shape = draw(shapes(min_rank, 4, 1, 4))
    r = len(shape)
    if r == 0 or draw(st.integers(0, 4)) == 0:
        axes = None
    else:
        chosen = draw(st.lists(st.integers(0, r - 1), unique=True, max_size=r))
        axes = [a - r if draw(st.booleans()) else a for a in chosen]   # some negative
    return shape, axes, draw(st.booleans())


def reduce_by_loops(x, axes, keepdims):
    """{output index: list of the input values reduced into it}, and the output shape."""
    r = x.ndim
    ax = set(range(r)) if axes is None else {a % r for a in axes}
    if keepdims:
        out_shape = tuple(1 if i in ax else d for i, d in enumerate(x.shape))
    else:
        out_shape = tuple(d for i, d in enumerate(x.shape) if i not in ax)
    groups = {idx: [] for idx in all_indices(out_shape)}
    for idx in all_indices(x.shape):
        if keepdims:
            key = tuple(0 if i in ax else v for i, v in enumerate(idx))
        else:
            key = tuple(v for i, v in enumerate(idx) if i not in ax)
        groups[key].append(x[idx].item())
    return out_shape, groups


@pytest.mark.parametrize("op", ["reduce_sum", "reduce_mean", "reduce_max"])
@FAST
@given(data=st.data())
def test_reductions(op, data):
    dtypes = ["f32", "f64"] if op == "reduce_mean" else ["i32", "i64", "f32", "f64"]
    dt = data.draw(st.sampled_from(dtypes), label="dtype")
    shape, axes, keepdims = data.draw(reduce_case(), label="case")
    x = array_of(data.draw, shape, dt, -100, 100)
    attrs = {"keepdims": keepdims}
    if axes is not None or data.draw(st.booleans()):
        attrs["axes"] = axes          # axes=None and no axes both mean all
    (out,) = run_op(op, [x], **attrs)
    out_shape, groups = reduce_by_loops(x, axes, keepdims)
    assert out.shape == out_shape and out.dtype == NP[dt]
    assert infer_op(op, [TensorType.of(x)], **attrs) == [TensorType(dt, out_shape)]
    for idx, vals in groups.items():
        got = out[idx].item()
        if op == "reduce_max":
            assert got == max(vals)
        elif dt.startswith("i"):
            assert got == sum(vals)
        else:
            exact = math.fsum(vals) / (len(vals) if op == "reduce_mean" else 1)
            scale = math.fsum(abs(v) for v in vals) / (len(vals) if op == "reduce_mean" else 1)
            assert_sum_close(got, exact, scale, dt, len(vals))


def test_reductions_small_explicit():
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    (s,) = run_op("reduce_sum", [x], axes=[-1, 0], keepdims=True)
    assert s.shape == (1, 3, 1)
    assert s.ravel().tolist() == [sum(range(0, 4)) + sum(range(12, 16)), sum(range(4, 8)) + sum(range(16, 20)),
                                  sum(range(8, 12)) + sum(range(20, 24))]
    (m,) = run_op("reduce_max", [x], axes=[1])
    assert m.tolist() == [[8, 9, 10, 11], [20, 21, 22, 23]]
    (a,) = run_op("reduce_mean", [x])
    assert a.shape == () and a.item() == 11.5


def test_reductions_of_scalars_and_empty_axes():
    s = np.array(3.5)
    for op in ("reduce_sum", "reduce_mean", "reduce_max"):
        for attrs in ({}, {"axes": [0]}, {"axes": []}, {"axes": [0], "keepdims": True}):
            (out,) = run_op(op, [s], **attrs)
            assert out.shape == () and out.item() == 3.5, (op, attrs)
    x = np.arange(6.0).reshape(2, 3)
    (same,) = run_op("reduce_sum", [x], axes=[])      # reducing over no axes is the identity
    assert same.tolist() == x.tolist()
    (e,) = run_op("reduce_max", [np.zeros((0, 3))], axes=[1])    # nothing is reduced over an empty axis
    assert e.shape == (0,)
    (z,) = run_op("reduce_sum", [np.zeros((0, 3), np.float32)], axes=[0])
    assert z.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ShapeError, match="empty"):
        infer_op("reduce_max", [TensorType("f32", (0, 3))], axes=[0])


def test_reduction_errors():
    t = TensorType("f32", (2, 3))
    with pytest.raises(ShapeError, match="out of range"):
        infer_op("reduce_sum", [t], axes=[2])
    with pytest.raises(ShapeError, match="out of range"):
        infer_op("reduce_sum", [t], axes=[-3])
    with pytest.raises(ShapeError, match="repeated axis"):
        infer_op("reduce_sum", [t], axes=[1, -1])
    with pytest.raises(ShapeError, match="float"):
        infer_op("reduce_mean", [TensorType("i32", (2,))])
    with pytest.raises(ShapeError, match="bool"):
        infer_op("reduce_sum", [TensorType("bool", (2,))])


def test_integer_sum_keeps_dtype():
    x = np.array([[100, 27], [1, 1]], np.int8)
    (out,) = run_op("reduce_sum", [x], axes=[1])
    assert out.dtype == np.int8 and out.tolist() == [127, 2]


# ---- softmax / log_softmax ------------------------------------------------------------

LOGITS = st.one_of(st.sampled_from([-1000.0, -999.5, -1.0, 0.0, 2.5, 999.0, 1000.0]),
                   st.floats(-1000, 1000, width=32, allow_subnormal=False))


def softmax_by_loops(x, axis):
    """float64 softmax and log_softmax along axis, one line (all other indices fixed) at a time."""
    ax = axis % x.ndim
    sm = np.zeros(x.shape)
    lsm = np.zeros(x.shape)
    other = x.shape[:ax] + x.shape[ax + 1:]
    for o in all_indices(other):
        line = [o[:ax] + (i,) + o[ax:] for i in range(x.shape[ax])]
        vals = [x[i].item() for i in line]
        m = max(vals)
        exps = [math.exp(v - m) for v in vals]
        total = math.fsum(exps)
        for i, v, e in zip(line, vals, exps):
            sm[i] = e / total
            lsm[i] = (v - m) - math.log(total)
    return sm, lsm


@FAST
@given(data=st.data())
def test_softmax_and_log_softmax(data):
    dt = data.draw(st.sampled_from(["f32", "f64"]), label="dtype")
    shape = data.draw(shapes(1, 3, 1, 5), label="shape")
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    vals = data.draw(st.lists(LOGITS, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    x = np.array(vals, NP[dt]).reshape(shape)
    sm_want, lsm_want = softmax_by_loops(x, axis)
    (sm,) = run_op("softmax", [x], axis=axis)     # strict: overflow / invalid is an error
    (lsm,) = run_op("log_softmax", [x], axis=axis)
    assert sm.dtype == NP[dt] and lsm.dtype == NP[dt] and sm.shape == shape and lsm.shape == shape
    assert np.all(np.isfinite(sm)) and np.all(np.isfinite(lsm))
    rtol = {"f32": 1e-5, "f64": 1e-6}[dt]
    np.testing.assert_allclose(sm, sm_want, rtol=rtol, atol=1e-40)
    # log(sum) is O(1); its absolute rounding error shows when the result is near 0
    np.testing.assert_allclose(lsm, lsm_want, rtol=rtol, atol=8 * EPS[dt])
    np.testing.assert_allclose(np.sum(sm.astype(np.float64), axis=axis), 1.0, rtol=0, atol=shape[axis] * 4 * EPS[dt])


@pytest.mark.parametrize("dt", ["f32", "f64"])
def test_softmax_large_logits(dt):
    x = np.array([[1000.0, -1000.0, 999.0], [-1000.0, -1000.0, -1000.0], [1000.0, 1000.0, 1000.0]], NP[dt])
    (sm,) = run_op("softmax", [x])
    e = 1 / (1 + math.exp(-1.0))
    np.testing.assert_allclose(sm, [[e, 0.0, 1 - e], [1 / 3] * 3, [1 / 3] * 3], rtol=1e-6, atol=0)
    (lsm,) = run_op("log_softmax", [x])
    np.testing.assert_allclose(lsm[0], [math.log(e), -2000.0 + math.log(e), math.log(1 - e)], rtol=1e-6)
    np.testing.assert_allclose(lsm[1], [-math.log(3)] * 3, rtol=1e-6)
    (col,) = run_op("softmax", [x], axis=0)   # along columns
    np.testing.assert_allclose(col[:, 0], [0.5, 0.0, 0.5], rtol=1e-6, atol=0)
    np.testing.assert_allclose(col[:, 1], [0.0, 0.0, 1.0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(col.sum(axis=0), 1.0, rtol=1e-6)


def test_softmax_errors():
    with pytest.raises(ShapeError, match="out of range"):
        infer_op("softmax", [TensorType("f32", (2, 3))], axis=2)
    with pytest.raises(ShapeError, match="float"):
        infer_op("log_softmax", [TensorType("i32", (2, 3))])
