"""The DSL: tracing, operators, layers, initializers, and build-time errors naming the user's line."""
import os
import sys

import numpy as np
import pytest

import tdc
from tdc import nn
from tdc.errors import ShapeError, TdcError
from tdc.frontend.init import init_params

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
sys.path.insert(0, EXAMPLES)


def _line_of(text):
    with open(__file__) as f:
        for i, line in enumerate(f, 1):
            if text in line and "_line_of" not in line:
                return i
    raise AssertionError(text)


def test_operators_build_the_expected_ops():
    @tdc.model
    def f(a: tdc.f32[2, 3], b: tdc.f32[3]):
        return {"r": (-a + b) * 2.0 - a / b, "m": a @ tdc.reshape(b, (3, 1)), "c": a > b, "p": abs(a) ** 2.0}
    g = f.trace()
    ops = g.op_counts()
    for op in ("neg", "add", "mul", "sub", "div", "matmul", "greater", "abs", "pow", "reshape"):
        assert ops.get(op), op
    assert g.output("c").type == tdc.TensorType("bool", (2, 3))
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, 2, 4], np.float32)
    out = tdc.compile(g)(a=a, b=b)
    np.testing.assert_allclose(out["r"], (-a + b) * 2 - a / b, rtol=1e-6)
    np.testing.assert_allclose(out["m"], a @ b.reshape(3, 1), rtol=1e-6)
    np.testing.assert_array_equal(out["c"], a > b)


def test_batch_symbol_sets_the_traced_shape():
    from mlp import mlp
    assert mlp.trace().arg("x").type.shape == (128, 784)
    assert mlp.trace(batch=7).output("out").type.shape == (7, 10)


def test_shape_error_names_op_shapes_and_user_line():
    @tdc.model
    def bad(x: tdc.f32["B", 4]):
        return nn.linear(x, 3) @ x   # MISMATCH-LINE
    with pytest.raises(ShapeError) as e:
        bad.trace(batch=2)
    msg = str(e.value)
    assert f"test_dsl.py:{_line_of('MISMATCH-LINE')}" in msg
    assert "matmul" in msg and "f32[2,3]" in msg and "f32[2,4]" in msg


def test_dtype_mismatch_says_insert_a_cast():
    @tdc.model
    def bad(x: tdc.f32[3], n: tdc.i64[3]):
        return x + n   # DTYPE-LINE
    with pytest.raises(ShapeError, match=rf"test_dsl.py:{_line_of('DTYPE-LINE')}: add: dtypes differ.*insert a cast"):
        bad.trace()


def test_conv_channel_mismatch_is_refused_at_build_time():
    @tdc.model
    def bad(x: tdc.f32["B", 3, 8, 8], w: tdc.f32[4, 2, 3, 3]):
        return tdc.conv2d(x, w)
    with pytest.raises(ShapeError, match=r"conv2d.*f32\[1,3,8,8\].*f32\[4,2,3,3\]"):
        bad.trace()


def test_missing_annotation_and_bad_outputs():
    def f(x):
        return x
    with pytest.raises(TdcError, match="needs an annotation"):
        tdc.model(f)

    @tdc.model
    def g(x: tdc.f32[2]):
        return 3
    with pytest.raises(TdcError, match="must return a tensor"):
        g.trace()


def test_indexing_and_methods():
    @tdc.model
    def f(x: tdc.f32[4, 5]):
        return {"a": x[1:3, ::2], "b": x[..., -1], "c": x.relu().sum(1), "d": x.T, "e": x[None, 2]}
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    out = tdc.compile(f.trace())(x=x)
    np.testing.assert_array_equal(out["a"], x[1:3, ::2])
    np.testing.assert_array_equal(out["b"], x[..., -1])
    np.testing.assert_allclose(out["c"], np.maximum(x, 0).sum(1), rtol=1e-6)
    np.testing.assert_array_equal(out["d"], x.T)
    np.testing.assert_array_equal(out["e"], x[None, 2])


def test_layers_name_params_and_initializers_are_seeded():
    from lenet import lenet
    g = lenet.trace()
    names = [a.name for a in g.params]
    assert names[:2] == ["conv1.weight", "conv1.bias"] and "fc3.weight" in names
    p0, p0b, p1 = init_params(g, 0), init_params(g, 0), init_params(g, 1)
    for k in p0:
        np.testing.assert_array_equal(p0[k], p0b[k])
    assert not np.array_equal(p0["conv1.weight"], p1["conv1.weight"])
    # He normal: std sqrt(2 / fan_in), fan_in = 6*5*5 for conv2
    w = p0["conv2.weight"]
    assert w.dtype == np.float32 and abs(w.std() - np.sqrt(2 / 150)) < 0.1 * np.sqrt(2 / 150)
    assert not p0["conv1.bias"].any()


def test_unnamed_layers_get_numbered_names():
    @tdc.model
    def f(x: tdc.f32["B", 3]):
        return nn.linear(nn.linear(x, 4), 2)
    assert [a.name for a in f.trace().params] == ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]


def test_training_trace_adds_batchnorm_updates_and_dropout():
    from vgg import vgg
    inf = vgg.trace(batch=2)
    tr = vgg.trace(batch=2, training=True)
    assert not inf.updates and "dropout" not in inf.op_counts()
    assert tr.op_counts()["dropout"] == 1
    assert {t.name for t, _ in tr.updates} == {a.name for a in tr.state if a.name != "step"}
    assert tr.arg("step").kind == "state"


def test_examples_run_on_the_reference():
    from digits import digits
    from lenet import lenet
    from mlp import mlp
    from vgg import vgg
    for m in (mlp, lenet, digits, vgg):
        g = m.trace(batch=2)
        x = np.random.default_rng(0).standard_normal(g.inputs[0].type.shape).astype(np.float32)
        out = tdc.compile(g)(**{g.inputs[0].name: x})["out"]
        assert out.shape == (2, 10) and np.isfinite(out).all(), m.name


def test_run_checks_input_shape_and_dtype():
    from mlp import mlp
    exe = tdc.compile(mlp.trace(batch=2))
    with pytest.raises(TdcError, match=r"input x: expected shape \[2, 784\]"):
        exe(x=np.zeros((3, 784), np.float32))
    with pytest.raises(TdcError, match="expected dtype f32"):
        exe(x=np.zeros((2, 784), np.complex64))
    with pytest.raises(TdcError, match="missing input x"):
        exe()
