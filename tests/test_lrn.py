"""nn.lrn (F.lrn): local response normalization as a composite of existing ops, against a
per-channel loop of ONNX's formula, on every backend, with its gradient and its errors.
The ONNX side (import, export, the model zoo) is in test_onnx.py."""
import numpy as np
import pytest

import tdc
from tdc import nn
from tdc.errors import TdcError
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.passes.autodiff import autodiff
from tdc.runtime.gradcheck import gradcheck

from helpers import lrn_loop


def lrn_graph(shape, size, dtype="f32", kind="input", **attrs):
    g = Graph("lrn")
    with Builder(g) as b:
        x = b.arg("x", TensorType(dtype, shape), kind)
        g.add_output("out", F.lrn(x, size, **attrs).value)
    return g


# alpha large enough that the window sum moves the result far from x / bias^beta
ATTRS = dict(alpha=0.5, beta=0.6, bias=1.5)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])   # even sizes look one channel further ahead; 8 > C
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (1, 5, 7), (2, 3, 2, 2, 3)])
@pytest.mark.parametrize("backend", ["reference", "llvm"])
def test_lrn_matches_the_onnx_formula(backend, shape, size):
    x = np.random.default_rng(size).standard_normal(shape).astype(np.float32) * 3
    got = tdc.compile(lrn_graph(shape, size, **ATTRS), backend=backend)(x=x)["out"]
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, lrn_loop(x, size, **ATTRS), rtol=2e-6, atol=1e-7)


def test_lrn_on_numba_and_in_f64():
    x = np.random.default_rng(0).standard_normal((2, 7, 3, 3)) * 3
    got = tdc.compile(lrn_graph(x.shape, 4, "f64", **ATTRS), backend="numba")(x=x)["out"]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, lrn_loop(x, 4, **ATTRS), rtol=1e-12)


def test_lrn_defaults_are_onnxs():
    x = np.random.default_rng(1).standard_normal((1, 6, 4, 4)).astype(np.float32) * 40   # LRN matters at this scale
    got = tdc.compile(lrn_graph(x.shape, 5))(x=x)["out"]
    np.testing.assert_allclose(got, lrn_loop(x, 5, 1e-4, 0.75, 1.0), rtol=2e-6)
    assert not np.allclose(got, x, rtol=1e-2)


@pytest.mark.parametrize("size,shape", [(2, (2, 5, 3, 2)), (5, (1, 6, 2, 3)), (3, (2, 4, 5))])
def test_lrn_gradient_matches_finite_differences(size, shape):
    g = Graph("lrn")
    rng = np.random.default_rng(size)
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", shape), "param")
        y = F.lrn(x, size, **ATTRS)
        weights = b.constant(rng.standard_normal(shape), "f32")   # a generic linear functional of y
        g.add_output("loss", F.sum(y * weights).value)
    errors = gradcheck(g, {"x": rng.standard_normal(shape) * 2}, loss="loss", max_entries=40)
    assert errors["x"] < 1e-6, errors


def test_lrn_gradient_on_llvm_matches_the_reference():
    # the backward graph has avgpool2d_grad with the asymmetric channel padding and pow's rule
    g = lrn_graph((2, 6, 3, 3), 4, kind="param", **ATTRS)
    with Builder(g) as b:
        g.add_output("loss", F.sum(tdc.Tensor(g.output("out"), b) ** 2.0).value)
    dg = autodiff(g, "loss")
    x = np.random.default_rng(2).standard_normal((2, 6, 3, 3)).astype(np.float32) * 2
    want = tdc.compile(dg, params={"x": x})()["grad.x"]
    got = tdc.compile(dg, backend="llvm", params={"x": x})()["grad.x"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nn_lrn_in_a_model():
    @tdc.model(batch=2)
    def net(x: tdc.f32["B", 3, 8, 8]):
        return nn.lrn(nn.conv2d(x, 6, 3, pad=1).relu(), 3, alpha=1e-3, beta=0.75, bias=2.0)
    g = net.trace()
    assert g.op_counts()["avgpool2d"] == 1 and "lrn" not in g.op_counts()
    assert tuple(g.outputs[0][1].type.shape) == (2, 6, 8, 8)


@pytest.mark.parametrize("shape,size,attrs,msg", [
    ((2, 6, 4, 4), 0, {}, r"size must be an integer >= 1, got 0 \(input: f32\[2,6,4,4\]\)"),
    ((2, 6, 4, 4), 2.5, {}, r"size must be an integer >= 1, got 2.5"),
    ((2, 6), 3, {}, r"the input must be \[N, C, D1, ...\] \(rank >= 3\), got rank 2 \(input: f32\[2,6\]\)"),
    ((2, 6, 4), 3, {"beta": float("nan")}, r"beta must be a finite number, got nan"),
])
def test_lrn_errors_name_the_op_the_shape_and_the_source_line(shape, size, attrs, msg):
    @tdc.model()
    def net(x: tdc.f32[shape]):
        return nn.lrn(x, size, **attrs)
    with pytest.raises(TdcError, match=rf"test_lrn.py:{net.fn.__code__.co_firstlineno + 2}: lrn: {msg}"):
        net.trace()


def test_lrn_of_integers_is_an_error():
    g = Graph("t")
    with Builder(g) as b:
        x = b.arg("x", TensorType("i32", (1, 3, 2, 2)), "input")
        with pytest.raises(TdcError, match=r"test_lrn.py:\d+: lrn: the input must be a float tensor "
                                           r"\(input: i32\[1,3,2,2\]\)"):
            F.lrn(x, 3)
