"""Data movement ops against explicit index arithmetic, and DSL indexing against numpy's."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import FAST, NP, all_indices, array_of, infer_op, run_op, shapes, source_index
from tdc.backends.reference import run
from tdc.errors import ShapeError
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType


def numbered(shape, dtype=np.float64):
    """Every element distinct: element i in row-major order is i + 1."""
    n = math.prod(shape)
    return (np.arange(n) + 1).astype(dtype).reshape(shape)


def row_major(shape, idx):
    """The row-major position of idx in shape, by Horner's rule."""
    pos = 0
    for d, i in zip(shape, idx):
        pos = pos * d + i
    return pos


# ---- reshape / flatten -------------------------------------------------------------------

def factorizations(n, parts):
    """All ways to write n as an ordered product of `parts` positive ints."""
    if parts == 1:
        return [(n,)]
    return [(d,) + rest for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, parts - 1)]


@FAST
@given(data=st.data())
def test_reshape_with_minus_one(data):
    shape = data.draw(shapes(0, 4, 1, 4))
    x = numbered(shape, NP[data.draw(st.sampled_from(["i32", "f32", "f64", "bool"]))])
    n = x.size
    parts = data.draw(st.integers(1, 4))
    target = list(data.draw(st.sampled_from(factorizations(n, parts))))
    full = tuple(target)
    if data.draw(st.booleans()):
        target[data.draw(st.integers(0, parts - 1))] = -1
    (out,) = run_op("reshape", [x], shape=target)
    assert out.shape == full and out.dtype == x.dtype
    flat = [x[i].item() for i in all_indices(shape)]
    for idx in all_indices(full):
        assert out[idx].item() == flat[row_major(full, idx)]


def test_reshape_errors():
    t = TensorType("f32", (2, 3))
    with pytest.raises(ShapeError, match="more than one -1"):
        infer_op("reshape", [t], shape=[-1, -1])
    with pytest.raises(ShapeError, match="cannot reshape 6 elements"):
        infer_op("reshape", [t], shape=[4, -1])
    with pytest.raises(ShapeError, match="cannot reshape 6 elements"):
        infer_op("reshape", [t], shape=[7])
    with pytest.raises(ShapeError, match="negative"):
        infer_op("reshape", [t], shape=[-2, -3])
    with pytest.raises(ShapeError, match="cannot reshape 0 elements"):
        infer_op("reshape", [TensorType("f32", (0, 3))], shape=[0, -1])
    assert infer_op("reshape", [TensorType("f32", (0, 3))], shape=[3, 0]) == [TensorType("f32", (3, 0))]
    assert infer_op("reshape", [TensorType("f32", (1, 1))], shape=[]) == [TensorType("f32", ())]


@FAST
@given(shape=shapes(0, 4, 1, 4), data=st.data())
def test_flatten_all_axes(shape, data):
    r = len(shape)
    axis = data.draw(st.integers(-r, r)) if r else 0
    x = numbered(shape)
    (out,) = run_op("flatten", [x], axis=axis)
    a = axis + r if axis < 0 else axis       # ONNX: a negative axis counts from the back of x's dims
    want_shape = (math.prod(shape[:a]), math.prod(shape[a:]))
    assert out.shape == want_shape
    assert out.ravel().tolist() == [x[i].item() for i in all_indices(shape)]


def test_flatten_negative_axis_counts_from_the_back():
    t = TensorType("f32", (2, 3, 4))
    assert infer_op("flatten", [t], axis=-1) == [TensorType("f32", (6, 4))]
    assert infer_op("flatten", [t], axis=-3) == [TensorType("f32", (1, 24))]
    assert infer_op("flatten", [t], axis=3) == [TensorType("f32", (24, 1))]
    assert infer_op("flatten", [t]) == [TensorType("f32", (2, 12))]      # default axis 1
    for bad in (4, -4):
        with pytest.raises(ShapeError, match="out of range"):
            infer_op("flatten", [t], axis=bad)
    assert infer_op("flatten", [TensorType("f32", ())]) == [TensorType("f32", (1, 1))]


# ---- transpose / broadcast_to -------------------------------------------------------------

@FAST
@given(shape=shapes(0, 4, 1, 4), data=st.data())
def test_transpose(shape, data):
    perm = data.draw(st.permutations(range(len(shape))))
    x = numbered(shape, np.int32)
    (out,) = run_op("transpose", [x], perm=list(perm))
    assert out.shape == tuple(shape[p] for p in perm)
    for idx in all_indices(out.shape):
        src = [0] * len(shape)
        for k, p in enumerate(perm):
            src[p] = idx[k]
        assert out[idx] == x[tuple(src)]


def test_transpose_errors():
    for perm in ([0, 0, 1], [0, 1], [0, 1, 3]):
        with pytest.raises(ShapeError, match="not a permutation"):
            infer_op("transpose", [TensorType("f32", (2, 3, 4))], perm=perm)


@FAST
@given(data=st.data())
def test_broadcast_to(data):
    out_shape = data.draw(shapes(0, 4, 1, 4))
    k = data.draw(st.integers(0, len(out_shape)))
    in_shape = tuple(1 if data.draw(st.booleans()) else d for d in out_shape[len(out_shape) - k:])
    x = numbered(in_shape, np.int64)
    (out,) = run_op("broadcast_to", [x], shape=list(out_shape))
    assert out.shape == out_shape
    for idx in all_indices(out_shape):
        assert out[idx] == x[source_index(idx, in_shape)]
    out[...] = 0   # a real array, not a read-only broadcast view


def test_broadcast_to_errors():
    with pytest.raises(ShapeError, match=r"\[3\] and \[2, 4\] do not broadcast"):
        infer_op("broadcast_to", [TensorType("f32", (3,))], shape=[2, 4])
    with pytest.raises(ShapeError, match="does not broadcast"):
        infer_op("broadcast_to", [TensorType("f32", (2, 3))], shape=[3])


# ---- concat --------------------------------------------------------------------------------

@FAST
@given(data=st.data())
def test_concat(data):
    base = list(data.draw(shapes(1, 4, 1, 3)))
    r = len(base)
    axis = data.draw(st.integers(-r, r - 1))
    a = axis % r
    n = data.draw(st.integers(1, 4))
    sizes = [data.draw(st.integers(0, 3)) for _ in range(n)]
    dt = data.draw(st.sampled_from(["i8", "f32", "bool"]))
    xs = []
    for j, s in enumerate(sizes):
        sh = base.copy()
        sh[a] = s
        xs.append(array_of(data.draw, tuple(sh), dt, -100, 100))
    (out,) = run_op("concat", xs, axis=axis)
    want = base.copy()
    want[a] = sum(sizes)
    assert out.shape == tuple(want) and out.dtype == NP[dt]
    for idx in all_indices(out.shape):
        pos, j = idx[a], 0
        while pos >= sizes[j]:
            pos -= sizes[j]
            j += 1
        assert out[idx] == xs[j][idx[:a] + (pos,) + idx[a + 1:]]


def test_concat_errors():
    f = lambda *s: TensorType("f32", s)  # noqa: E731
    with pytest.raises(ShapeError, match="match except on axis"):
        infer_op("concat", [f(2, 3), f(3, 3)], axis=1)
    with pytest.raises(ShapeError, match="match except on axis"):
        infer_op("concat", [f(2, 3), f(2, 3, 1)], axis=0)
    with pytest.raises(ShapeError, match="scalars"):
        infer_op("concat", [f(), f()])
    with pytest.raises(ShapeError, match="out of range"):
        infer_op("concat", [f(2), f(2)], axis=1)
    with pytest.raises(ShapeError, match="insert a cast"):
        infer_op("concat", [f(2), TensorType("f64", (2,))])
    with pytest.raises(ShapeError, match="at least 1"):
        infer_op("concat", [])


# ---- slice / slice_grad -----------------------------------------------------------------

@st.composite
def slice_case(draw):
    shape = draw(shapes(0, 4, 0, 5))
    starts, ends, steps = [], [], []
    for d in shape:
        s = draw(st.integers(0, d))
        starts.append(s)
        ends.append(draw(st.integers(s, d)))
        steps.append(draw(st.integers(1, 3)))
    return tuple(shape), starts, ends, steps


@FAST
@given(case=slice_case())
def test_slice(case):
    shape, starts, ends, steps = case
    x = numbered(shape)
    (out,) = run_op("slice", [x], starts=starts, ends=ends, steps=steps)
    want_shape = tuple(max(0, -(-(e - s) // st)) for s, e, st in zip(starts, ends, steps))   # ceil((e-s)/st)
    assert out.shape == want_shape
    for idx in all_indices(want_shape):
        src = tuple(s + i * st for s, i, st in zip(starts, idx, steps))
        assert out[idx] == x[src]


@FAST
@given(case=slice_case(), data=st.data())
def test_slice_grad_is_the_adjoint_of_slice(case, data):
    shape, starts, ends, steps = case
    attrs = dict(starts=starts, ends=ends, steps=steps)
    x = array_of(data.draw, shape, "f64", -10, 10)
    (sx,) = run_op("slice", [x], **attrs)
    y = array_of(data.draw, sx.shape, "f64", -10, 10)
    (gy,) = run_op("slice_grad", [y], input_shape=list(shape), **attrs)
    assert gy.shape == shape and gy.dtype == y.dtype
    lhs = math.fsum(sx[i].item() * y[i].item() for i in all_indices(sx.shape))
    rhs = math.fsum(x[i].item() * gy[i].item() for i in all_indices(shape))
    assert math.isclose(lhs, rhs, rel_tol=1e-12, abs_tol=1e-12)
    # and slice_grad is zeros outside the slice, y inside it
    inside = {tuple(s + i * st for s, i, st in zip(starts, idx, steps)): y[idx] for idx in all_indices(y.shape)}
    for idx in all_indices(shape):
        assert gy[idx] == inside.get(idx, 0.0)


def test_slice_errors():
    t = TensorType("f32", (4, 5))
    with pytest.raises(ShapeError, match="one entry per dim"):
        infer_op("slice", [t], starts=[0], ends=[1], steps=[1])
    with pytest.raises(ShapeError, match="step >= 1"):
        infer_op("slice", [t], starts=[0, 0], ends=[4, 5], steps=[1, 0])
    with pytest.raises(ShapeError, match="start <= end"):
        infer_op("slice", [t], starts=[3, 0], ends=[2, 5], steps=[1, 1])
    with pytest.raises(ShapeError, match="start <= end"):
        infer_op("slice", [t], starts=[0, 0], ends=[5, 5], steps=[1, 1])
    with pytest.raises(ShapeError, match="does not match"):
        infer_op("slice_grad", [TensorType("f32", (2, 5))], input_shape=[4, 5], starts=[0, 0], ends=[4, 5],
                 steps=[1, 1])


# ---- pad -------------------------------------------------------------------------------------

@FAST
@given(data=st.data())
def test_pad(data):
    shape = data.draw(shapes(0, 3, 0, 3))
    r = len(shape)
    pads = [data.draw(st.integers(0, 2)) for _ in range(2 * r)]
    value = data.draw(st.sampled_from([0.0, -1.5, 7.0]))
    dt = data.draw(st.sampled_from(["f32", "f64", "i32"]))
    x = array_of(data.draw, shape, dt, -100, 100)
    (out,) = run_op("pad", [x], pads=pads, value=value)
    want_shape = tuple(d + pads[i] + pads[i + r] for i, d in enumerate(shape))
    fill = math.trunc(value) if dt == "i32" else value
    manual = [[fill] for _ in range(math.prod(want_shape))]   # one box per output element
    for idx in all_indices(shape):
        dst = tuple(i + pads[k] for k, i in enumerate(idx))
        manual[row_major(want_shape, dst)] = [x[idx].item()]
    assert out.shape == want_shape and out.dtype == x.dtype
    assert out.ravel().tolist() == [m[0] for m in manual]


def test_pad_errors():
    t = TensorType("f32", (2, 3))
    with pytest.raises(ShapeError, match="needs 4 entries"):
        infer_op("pad", [t], pads=[1, 1])
    with pytest.raises(ShapeError, match="negative pads"):
        infer_op("pad", [t], pads=[0, -1, 0, 0])


# ---- DSL indexing ------------------------------------------------------------------------------

def run_dsl(arr, fn):
    g = Graph("t")
    with Builder(g) as b:
        x = b.arg("x", TensorType.of(arr), "input")
        y = fn(x)
    env = run(g, {x.value: arr})
    return env[y.value], y


INDEXES = [
    (slice(1, 3), slice(None, None, 2)),
    (Ellipsis, 0),
    None,
    (None, Ellipsis, None),
    -1,
    (slice(None), None, slice(1, None)),
    (slice(None, None, 3), slice(-2, None)),
    (slice(5, 1),),
    (Ellipsis, slice(None, None, 2), 0),
    (1, 2, 3),
    (0, Ellipsis),
    (slice(-100, 100), -3),
    (np.int64(1), slice(None, -1, 2), slice(None)),
    Ellipsis,
    (),
]


@pytest.mark.parametrize("idx", INDEXES, ids=repr)
def test_getitem_matches_numpy(idx):
    arr = numbered((4, 3, 5))
    got, y = run_dsl(arr, lambda x: x[idx])
    want = arr[idx]
    assert got.shape == want.shape and y.shape == want.shape
    assert got.tolist() == want.tolist()


def test_dsl_slice_uses_python_bounds():
    arr = numbered((6, 4))
    got, _ = run_dsl(arr, lambda x: F.slice(x, [-4, 10], [100, -10], [2, 1]))
    assert got.tolist() == arr[-4:100:2, 10:-10].tolist()
    got, _ = run_dsl(arr, lambda x: F.slice(x, [1, -3], [-1, 4]))
    assert got.tolist() == arr[1:-1, -3:4].tolist()


@pytest.mark.parametrize("idx,msg", [
    ((slice(None, None, -1),), "negative steps"),
    ((0, 0, 0), "too many indices"),
    ((4,), "out of range"),
    ((-5,), "out of range"),
    ((Ellipsis, Ellipsis), "only one"),
    (("a",), "unsupported index"),
])
def test_getitem_errors(idx, msg):
    with pytest.raises(ShapeError, match=msg):
        run_dsl(numbered((4, 3)), lambda x: x[idx])
