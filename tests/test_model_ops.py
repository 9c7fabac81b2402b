"""The DSL composites real models use (gelu, layer_norm, min, argmax, split): against numpy
formulations of their own, on every backend, and their gradients against float64 finite
differences."""
from __future__ import annotations

import math

import numpy as np
import pytest

import tdc
from tdc.errors import ShapeError
from tdc.ops import functional as F
from tdc.runtime.gradcheck import gradcheck

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 4, 5)).astype(np.float32)
X[0, 1, 2] = X[0, 1, 4] = 9.0          # a tie: argmax's first or last index


def _normal_cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _numpy_layer_norm(x, axis):
    axes = tuple(range(axis % x.ndim, x.ndim))
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + 1e-5)


CASES = {
    "gelu": (lambda x: F.gelu(x), lambda x: x * _normal_cdf(x.astype(np.float64))),
    "gelu_tanh": (lambda x: F.gelu(x, "tanh"),
                  lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))),
    "layer_norm": (lambda x: F.layer_norm(x, axis=1), lambda x: _numpy_layer_norm(x.astype(np.float64), 1)),
    "min": (lambda x: F.min(x, (0, 2)), lambda x: x.min((0, 2))),
    "argmax": (lambda x: F.argmax(x, 2, keepdims=False), lambda x: x.argmax(2)),
    "argmax_last": (lambda x: F.argmax(x, -1, select_last_index=True),
                    lambda x: (x.shape[-1] - 1 - x[..., ::-1].argmax(-1))[..., None]),
    "split": (lambda x: F.split(x, [1, 3, 0, 1], axis=2)[1], lambda x: x[:, :, 1:4]),
}


@pytest.fixture(scope="module")
def graph():
    @tdc.model
    def m(x: tdc.f32[3, 4, 5]):
        return {k: f(x) for k, (f, _) in CASES.items()}
    return m.trace()


@pytest.mark.parametrize("backend", ["reference", "numba", "llvm"])
def test_composites_match_numpy(graph, backend):
    out = tdc.compile(graph, backend=backend)(x=X)
    for k, (_, want) in CASES.items():
        expected = want(X)
        assert out[k].shape == expected.shape, k
        if k.startswith("argmax"):
            assert out[k].dtype == np.int64 and np.array_equal(out[k], expected), k
        else:
            np.testing.assert_allclose(out[k], expected, rtol=2e-5, atol=2e-6, err_msg=k)


def test_integer_min_does_not_overflow():
    @tdc.model
    def m(x: tdc.i8[4]):
        return F.min(x, 0)
    exe = tdc.compile(m.trace(), backend="llvm")
    assert exe(x=np.array([5, -128, 127, 0], np.int8))["out"] == -128


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "layer_norm", "min", "split"])
def test_composite_gradients_match_finite_differences(name):
    f = CASES[name][0]

    from tdc.ir.graph import Graph
    from tdc.ir.types import TensorType
    from tdc.ops.tensor import Builder
    h = Graph("h")
    with Builder(h) as b:
        p = b.arg("x", TensorType("f64", (3, 4, 5)), "param")
        y = f(p)
        weights = b.constant(np.random.default_rng(2).standard_normal(y.shape), "f64")   # a generic functional of y
        h.add_output("loss", F.sum(y * weights).value)
    errors = gradcheck(h, {"x": np.random.default_rng(1).standard_normal((3, 4, 5))}, loss="loss")
    assert errors and max(errors.values()) < 1e-6, errors


def test_bad_arguments_are_refused():
    @tdc.model
    def m(x: tdc.f32[3, 4]):
        return F.split(x, [2, 3], axis=1)[0]
    with pytest.raises(ShapeError, match="add up to 4"):
        m.trace()

    @tdc.model
    def n(x: tdc.f32[3, 4]):
        return F.gelu(x, "erf")
    with pytest.raises(ShapeError, match="approximate must be"):
        n.trace()
