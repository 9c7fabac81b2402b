"""gather (ONNX Gather) and its adjoint gather_grad: the reference against explicit index loops,
the compiled backends against the reference, out-of-range indices refused on each."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tdc
from helpers import FAST
from tdc.errors import ShapeError, TdcError
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ops import functional as F
from tdc.ops.tensor import Builder


def run(g, feeds):
    return tdc.compile(g, backend="reference")(**feeds)


def _graph(op, table_shape, idx, **attrs):
    g = Graph("g")
    with Builder(g) as b:
        t = b.arg("t", TensorType("f32", table_shape), "input")
        i = b.arg("i", TensorType.of(idx), "input")
        g.add_output("out", F.apply(op, t, i, **attrs).value)
    return g


@st.composite
def gather_case(draw):
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    n = shape[axis]
    idx_shape = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=2)))
    idx = np.array(draw(st.lists(st.integers(-n, n - 1), min_size=int(np.prod(idx_shape)),
                                 max_size=int(np.prod(idx_shape)))), np.int64).reshape(idx_shape)
    dtype = draw(st.sampled_from([np.int8, np.int32, np.int64]))
    return shape, axis, idx.astype(dtype)


@FAST
@given(case=gather_case())
def test_gather_reads_the_indexed_slices(case):
    shape, axis, idx = case
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    out = run(_graph("gather", shape, idx, axis=axis), {"t": data, "i": idx})["out"]
    ax = axis % len(shape)
    assert out.shape == shape[:ax] + idx.shape + shape[ax + 1:]
    for pos in itertools.product(*map(range, out.shape)):
        j = pos[ax:ax + idx.ndim]
        src = pos[:ax] + (int(idx[j]) % shape[ax],) + pos[ax + idx.ndim:]
        assert out[pos] == data[src]


@FAST
@given(case=gather_case(), seed=st.integers(0, 2**16))
def test_gather_grad_is_the_adjoint_of_gather(case, seed):
    """<gather(x), g> == <x, gather_grad(g)> for every x and g."""
    shape, axis, idx = case
    rng = np.random.default_rng(seed)
    ax = axis % len(shape)
    x = rng.standard_normal(shape)
    gy = rng.standard_normal(shape[:ax] + idx.shape + shape[ax + 1:])
    y = run(_graph("gather", shape, idx, axis=axis), {"t": x.astype(np.float32), "i": idx})["out"]
    gx = run(_graph("gather_grad", gy.shape, idx, axis=ax, size=shape[ax]), {"t": gy.astype(np.float32), "i": idx})["out"]
    assert gx.shape == shape
    np.testing.assert_allclose(np.vdot(y, gy), np.vdot(x, gx), rtol=1e-5, atol=1e-5)


CASES = [((5, 3), np.array([[0, -1], [2, 2]], np.int32), 0),
         ((2, 6, 3), np.array([5, 0, 5, -6], np.int64), 1),
         ((4, 7), np.array([3], np.int8), -1),
         ((3, 4), np.zeros((0,), np.int64), 0)]


@pytest.mark.parametrize("backend", ["numba", "llvm"])
def test_compiled_gather_and_its_gradient_match_the_reference(backend):
    """One graph per case holds gather and, through autodiff, gather_grad (a row read twice
    gets both gradients)."""
    rng = np.random.default_rng(0)
    for shape, idx, axis in CASES:
        g = Graph("g")
        with Builder(g) as b:
            t = b.arg("t", TensorType("f32", shape), "param")
            i = b.arg("i", TensorType.of(idx), "input")
            y = F.apply("gather", t, i, axis=axis)
            wts = b.arg("wts", y.type, "input")
            g.add_output("y", y.value)
            g.add_output("loss", F.sum(y * wts).value)
        from tdc.passes.autodiff import autodiff
        dg = autodiff(g, "loss")
        feeds = {"i": idx, "wts": rng.standard_normal(g.output("y").type.shape).astype(np.float32)}
        params = {"t": rng.standard_normal(shape).astype(np.float32)}
        want = tdc.compile(dg, backend="reference", params=params)(**feeds)
        got = tdc.compile(dg, backend=backend, params=params)(**feeds)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=f"{shape} {axis} {k}")


@pytest.mark.parametrize("backend", ["reference", "numba", "llvm"])
def test_an_index_out_of_range_is_a_clear_error(backend):
    exe = tdc.compile(_graph("gather", (5, 2), np.zeros(3, np.int32)), backend=backend)
    table = np.zeros((5, 2), np.float32)
    exe(t=table, i=np.array([4, -5, 0], np.int32))      # the bounds themselves are fine
    with pytest.raises(TdcError, match="out of range"):
        exe(t=table, i=np.array([0, 5, 0], np.int32))
    with pytest.raises(TdcError, match="out of range"):
        exe(t=table, i=np.array([-6, 0, 0], np.int32))


def test_llvm_gathers_integer_tables():
    """gather moves bytes, so any dtype works on the llvm backend (ONNX gathers shapes: i64)."""
    g = Graph("g")
    with Builder(g) as b:
        t = b.arg("t", TensorType("i64", (4,)), "input")
        i = b.arg("i", TensorType("i32", (2,)), "input")
        g.add_output("out", F.apply("gather", t, i).value)
    t = np.array([10, 20, 30, 2**40], np.int64)
    out = tdc.compile(g, backend="llvm")(t=t, i=np.array([3, 0], np.int32))["out"]
    np.testing.assert_array_equal(out, [2**40, 10])


def test_gather_refuses_float_indices_and_bad_axes():
    with pytest.raises(ShapeError, match="gather.*indices must be integers"):
        _graph("gather", (3,), np.zeros(2, np.float32))
    with pytest.raises(ShapeError, match="gather.*axis 2 is out of range"):
        _graph("gather", (3, 2), np.zeros(2, np.int32), axis=2)
