"""ONNX import and export: round trips through onnxruntime, a PyTorch-style export, older opsets'
semantics, errors, and the CLI on .onnx files. onnx and onnxruntime are test dependencies (the
onnx extra): these tests fail, not skip, without them."""
import os
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import tdc
import tdc.onnx
from tdc.cli import main
from tdc.errors import TdcError
from tdc.ir.graph import Graph
from tdc.ir.parser import parse_graph
from tdc.ir.types import TensorType
from tdc.frontend.init import init_params
from tdc.ops.norm import dropout_keep
from tdc.runtime.loader import load_model

from helpers import lrn_loop
from onnx_zoo import LIGHT, input_name, light_model, with_random_weights

ROOT = os.path.join(os.path.dirname(__file__), "..")
EX = os.path.join(ROOT, "examples")
F = TensorProto.FLOAT


def ort_run(model: onnx.ModelProto, feeds: dict) -> dict:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def example_params(graph, seed=0):
    """Initialised params, with biases and batchnorm statistics moved off their 0/1 defaults."""
    params = init_params(graph, seed)
    rng = np.random.default_rng(seed)
    for k, v in params.items():
        if k.endswith((".bias", ".running_mean", ".running_var")):
            params[k] = (v + rng.uniform(0.1, 0.5, v.shape)).astype(v.dtype)
    return params


# ---- export: tdc models -> ONNX -> onnxruntime ---------------------------------------------

@pytest.mark.parametrize("example", ["mlp", "lenet", "digits", "vgg"])
def test_examples_round_trip(example, tmp_path):
    g = load_model(os.path.join(EX, f"{example}.py")).trace(batch=2)   # inference: dropout is the identity
    params = example_params(g)
    path = tmp_path / f"{example}.onnx"
    tdc.onnx.save(g, path, params)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert {t.name for t in model.graph.initializer} >= set(params)
    x = np.random.default_rng(1).standard_normal(g.inputs[0].type.shape).astype(np.float32)
    want = tdc.compile(g, params=params)(x=x)["out"]
    np.testing.assert_allclose(ort_run(model, {"x": x})["out"], want, rtol=1e-4, atol=1e-5)
    # and back: the initializers are the imported model's params
    back = tdc.onnx.load(path)
    assert set(back.params) == set(params)
    assert {a.name: a.kind for a in back.graph.args} == {a.name: a.kind for a in g.args}   # vgg: BN stats are state
    np.testing.assert_allclose(back(x=x)["out"], want, rtol=1e-5, atol=1e-6)


def test_save_without_params_uses_initializers(tmp_path):
    g = load_model(os.path.join(EX, "mlp.py")).trace(batch=3)
    model = tdc.onnx.save(g, tmp_path / "m.onnx", seed=7)
    x = np.ones((3, 784), np.float32)
    want = tdc.compile(g, seed=7)(x=x)["out"]
    np.testing.assert_allclose(ort_run(model, {"x": x})["out"], want, rtol=1e-4, atol=1e-5)


def _many_ops_graph() -> Graph:
    g = Graph("many")
    x = g.add_arg("x", TensorType("f32", (2, 3, 6, 6)), "input")
    v = g.add_arg("v", TensorType("f32", (4, 5)), "input")
    w = g.add_arg("w", TensorType("f32", (7, 5)), "param", {"init": "glorot_uniform"})
    b = g.add_arg("b", TensorType("f32", (7,)), "param", {"init": "normal"})

    def e(op, ins, **attrs):
        return g.emit(op, ins, attrs)[0]
    p = e("avgpool2d", [x], kernel=(3, 3), stride=(2, 2), pad=(1, 1, 1, 1), count_include_pad=True)   # 2,3,3,3
    q = e("maxpool2d", [x], kernel=(2, 2), stride=(2, 2), ceil_mode=True)                               # 2,3,3,3
    s = e("concat", [p, q], axis=1)
    s = e("leaky_relu", [e("sub", [s, e("global_avgpool", [s])])], alpha=0.2)
    s = e("transpose", [e("pad", [s], pads=(0, 0, 1, 0, 0, 0, 0, 2), value=0.5)], perm=(0, 2, 3, 1))
    s = e("slice", [s], starts=(0, 0, 1, 0), ends=(2, 4, 5, 6), steps=(1, 2, 2, 3))
    g.add_output("sliced", s)
    r = e("reshape", [x], shape=(2, -1))
    g.add_output("sum", e("reduce_sum", [r], axes=(1,), keepdims=True))
    g.add_output("mean", e("reduce_mean", [x], axes=(1, 3)))
    g.add_output("max", e("reduce_max", [x]))
    g.add_output("smax", e("softmax", [r], axis=0))
    g.add_output("lsm", e("log_softmax", [x], axis=1))
    lin = e("linear", [e("reshape", [v], shape=(2, 2, 5)), w, b])                                      # 3-D linear
    lin2 = e("linear", [v, w])
    g.add_output("lin", lin)
    big = e("greater", [lin2, e("full", [], shape=(4, 7), value=0.1)])
    g.add_output("where", e("where", [big, e("rsqrt", [e("abs", [lin2])]), e("neg", [lin2])]))
    g.add_output("ne", e("not_equal", [e("cast", [e("sign", [lin2])], to="i32"),
                                       e("constant", [], value=np.array(1, np.int32))]))
    g.add_output("bcast", e("broadcast_to", [e("flatten", [v], axis=1)], shape=(3, 4, 5)))
    g.add_output("mm", e("matmul", [e("exp", [e("tanh", [v])]), e("transpose", [w], perm=(1, 0))]))
    g.add_output("same", lin)   # one value under two output names
    g.add_output("x_again", x)  # an input as an output
    return g


def test_export_op_coverage():
    g = _many_ops_graph()
    params = init_params(g, 3)
    model = tdc.onnx.exporter.to_model(g, params)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32),
             "v": rng.standard_normal((4, 5)).astype(np.float32)}
    want = tdc.compile(g, params=params)(**feeds)
    got = ort_run(model, feeds)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # importing the export gives the same graph results again
    back = tdc.onnx.load(model)
    for k, y in back(**feeds).items():
        np.testing.assert_allclose(y, want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_export_errors(tmp_path):
    g = Graph("comm")
    x = g.add_arg("x", TensorType("f32", (4,)), "input")
    g.add_output("y", g.emit("allreduce", [x])[0])
    with pytest.raises(TdcError, match="cannot export op allreduce"):
        tdc.onnx.save(g, tmp_path / "c.onnx")
    training = load_model(os.path.join(EX, "vgg.py")).trace(batch=2, training=True)
    with pytest.raises(TdcError, match="updates params or state"):
        tdc.onnx.save(training, tmp_path / "t.onnx")
    assert not os.listdir(tmp_path)


# ---- import: a model shaped like a PyTorch export ------------------------------------------

def torch_like_model() -> onnx.ModelProto:
    """Conv+BN+Relu+MaxPool, then torch.flatten's Shape/Gather/Unsqueeze/Concat/Reshape plumbing,
    then Gemm; ONNX-style names and a symbolic batch dim."""
    rng = np.random.default_rng(0)

    def w(*shape, lo=-0.5, hi=0.5):
        return rng.uniform(lo, hi, shape).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("onnx::Conv_20", w(4, 3, 3, 3)), ("onnx::Conv_21", w(4)),
        ("bn.weight", w(4, lo=0.5, hi=1.5)), ("bn.bias", w(4)),
        ("bn.running_mean", w(4)), ("bn.running_var", w(4, lo=0.5, hi=2.0)),
        ("fc.weight", w(5, 64)), ("fc.bias", w(5))]]
    C = "Constant"
    nodes = [
        helper.make_node("Conv", ["input.1", "onnx::Conv_20", "onnx::Conv_21"], ["/conv/Conv_output_0"],
                         name="/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1],
                         group=1),
        helper.make_node("BatchNormalization", ["/conv/Conv_output_0", "bn.weight", "bn.bias", "bn.running_mean",
                                                "bn.running_var"], ["/bn/BatchNormalization_output_0"],
                         name="/bn/BatchNormalization", epsilon=1e-5, momentum=0.9),
        helper.make_node("Relu", ["/bn/BatchNormalization_output_0"], ["/relu/Relu_output_0"], name="/relu/Relu"),
        helper.make_node("MaxPool", ["/relu/Relu_output_0"], ["/pool/MaxPool_output_0"], name="/pool/MaxPool",
                         kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0], ceil_mode=0),
        helper.make_node("Shape", ["/pool/MaxPool_output_0"], ["/Shape_output_0"], name="/Shape"),
        helper.make_node(C, [], ["/Constant_output_0"], name="/Constant",
                         value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", ["/Shape_output_0", "/Constant_output_0"], ["/Gather_output_0"], name="/Gather",
                         axis=0),
        helper.make_node(C, [], ["/Constant_1_output_0"], name="/Constant_1", value_ints=[0]),
        helper.make_node("Unsqueeze", ["/Gather_output_0", "/Constant_1_output_0"], ["/Unsqueeze_output_0"],
                         name="/Unsqueeze"),
        helper.make_node(C, [], ["/Constant_2_output_0"], name="/Constant_2",
                         value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Concat", ["/Unsqueeze_output_0", "/Constant_2_output_0"], ["/Concat_output_0"],
                         name="/Concat", axis=0),
        helper.make_node("Reshape", ["/pool/MaxPool_output_0", "/Concat_output_0"], ["/Reshape_output_0"],
                         name="/Reshape"),
        helper.make_node("Gemm", ["/Reshape_output_0", "fc.weight", "fc.bias"], ["output"], name="/fc/Gemm",
                         alpha=1.0, beta=1.0, transB=1),
    ]
    graph = helper.make_graph(nodes, "main_graph",
                              [helper.make_tensor_value_info("input.1", F, ["batch_size", 3, 8, 8])],
                              [helper.make_tensor_value_info("output", F, ["batch_size", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_import_torch_like_export(backend):
    proto = torch_like_model()
    m = tdc.onnx.load(proto, batch=3, backend=backend)
    ops = m.graph.op_counts()
    assert ops == {"conv2d": 1, "batchnorm": 1, "relu": 1, "maxpool2d": 1, "reshape": 1, "linear": 1}, ops
    assert set(m.params) == {"onnx::Conv_20", "onnx::Conv_21", "bn.weight", "bn.bias", "bn.running_mean",
                             "bn.running_var", "fc.weight", "fc.bias"}
    assert {a.name for a in m.graph.state} == {"bn.running_mean", "bn.running_var"}
    assert len(m.graph.params) == 6
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    got = m(**{"input.1": x})["output"]
    np.testing.assert_allclose(got, ort_run(proto, {"input.1": x})["output"], rtol=1e-4, atol=1e-5)
    # dims= fixes the same dim by its name
    m2 = tdc.onnx.load(proto, dims={"batch_size": 3})
    np.testing.assert_allclose(m2(**{"input.1": x})["output"], got, rtol=1e-6, atol=1e-6)


def test_import_from_file_keeps_initializers(tmp_path):
    path = tmp_path / "t.onnx"
    onnx.save(torch_like_model(), path)
    m = tdc.onnx.load(str(path), dims={"input.1:0": 1})
    assert m.graph.inputs[0].type == TensorType("f32", (1, 3, 8, 8))
    np.testing.assert_array_equal(m.params["fc.bias"], numpy_helper.to_array(torch_like_model().graph.initializer[-1]))
    assert "input.1" in repr(m)


# ---- import: single nodes against onnxruntime, incl. older opsets' semantics ----------------

def node_model(op, inputs: dict, opset: int, inits: dict | None = None, out_type=F, n_out=1, **attrs):
    names = list(inputs) + list(inits or {})
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, name="n0", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                      for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, out_type, None) for o in outs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


R = np.random.default_rng(5)
X3 = R.standard_normal((2, 3, 4)).astype(np.float32)
X4 = R.standard_normal((1, 2, 7, 7)).astype(np.float32)
I64 = lambda *v: np.array(v, np.int64)  # noqa: E731
NODE_CASES = {
    "softmax_opset11_coerces_to_2d": ("Softmax", {"x": X3}, 11, None, dict(axis=1)),
    "logsoftmax_opset11_default_axis": ("LogSoftmax", {"x": X3}, 11, None, {}),
    "reducemean_axes_attr": ("ReduceMean", {"x": X3}, 13, None, dict(axes=[1], keepdims=0)),
    "reducesum_axes_attr": ("ReduceSum", {"x": X3}, 11, None, dict(axes=[0, -1])),
    "reducemax_axes_input_opset18": ("ReduceMax", {"x": X3}, 18, {"axes": I64(1)}, dict(keepdims=1)),
    "reducesum_noop_empty_axes": ("ReduceSum", {"x": X3}, 13, {"axes": I64()}, dict(noop_with_empty_axes=1)),
    "squeeze_axes_attr": ("Squeeze", {"x": X3.reshape(1, 6, 1, 4)}, 11, None, dict(axes=[0, 2])),
    "unsqueeze_axes_attr": ("Unsqueeze", {"x": X3}, 11, None, dict(axes=[0, -1])),
    "pad_opset10_reflect": ("Pad", {"x": X4}, 10, None, dict(mode="reflect", pads=[0, 0, 1, 3, 0, 0, 2, 1])),
    "pad_opset10_constant": ("Pad", {"x": X4}, 10, None, dict(pads=[0, 1, 1, 0, 0, 0, 2, 1], value=1.5)),
    "pad_edge_negative": ("Pad", {"x": X4}, 13, {"pads": I64(0, 0, -2, 2, 0, 0, 3, -1)}, dict(mode="edge")),
    "clip_opset10_attrs": ("Clip", {"x": X3}, 10, None, dict(min=-0.5, max=0.3)),
    "slice_opset9_attrs": ("Slice", {"x": X3}, 9, None, dict(starts=[1, -3], ends=[100, -1], axes=[1, 2])),
    "dropout_opset10_inference": ("Dropout", {"x": X3}, 10, None, dict(ratio=0.3)),
    "batchnorm_opset9": ("BatchNormalization", {"x": X4}, 9,
                         {"s": np.array([1.0, 2.0], np.float32), "b": np.array([0.5, -1.0], np.float32),
                          "m": np.array([0.1, 0.2], np.float32), "v": np.array([1.5, 0.5], np.float32)},
                         dict(epsilon=1e-3)),
    "gemm_general": ("Gemm", {"a": R.standard_normal((4, 3)).astype(np.float32),
                              "b": R.standard_normal((5, 4)).astype(np.float32),
                              "c": R.standard_normal((3, 5)).astype(np.float32)}, 13, None,
                     dict(alpha=0.5, beta=2.0, transA=1, transB=1)),
    "gemm_scalar_c": ("Gemm", {"a": R.standard_normal((2, 3)).astype(np.float32)}, 13,
                      {"b": R.standard_normal((3, 4)).astype(np.float32), "c": np.array(0.25, np.float32)}, {}),
    "matmul_1d_3d": ("MatMul", {"a": R.standard_normal(4).astype(np.float32),
                                "b": R.standard_normal((2, 4, 3)).astype(np.float32)}, 13, None, {}),
    "matmul_3d_1d": ("MatMul", {"a": R.standard_normal((2, 3, 4)).astype(np.float32),
                                "b": R.standard_normal(4).astype(np.float32)}, 13, None, {}),
    "conv_same_lower_stride2": ("Conv", {"x": X4}, 13, {"w": R.standard_normal((3, 2, 3, 3)).astype(np.float32)},
                                dict(auto_pad="SAME_LOWER", strides=[2, 2])),
    "conv_group_dilation": ("Conv", {"x": X4}, 13, {"w": R.standard_normal((4, 1, 2, 2)).astype(np.float32)},
                            dict(group=2, dilations=[2, 1], pads=[1, 0, 0, 2])),
    "maxpool_same_upper": ("MaxPool", {"x": X4}, 13, None, dict(auto_pad="SAME_UPPER", kernel_shape=[2, 3],
                                                                strides=[2, 2])),
    "averagepool_count_include_pad": ("AveragePool", {"x": X4}, 13, None,
                                      dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                           count_include_pad=1, ceil_mode=1)),
    "mean_three_inputs": ("Mean", {"a": X3, "b": X3 * 2, "c": X3[:1] - 1}, 13, None, {}),
    "pow_float_int_exponent": ("Pow", {"x": np.abs(X3) + 0.5}, 13, {"e": np.array([1, 2, 3, 0], np.int64)}, {}),
}


@pytest.mark.parametrize("case", sorted(NODE_CASES))
def test_node_matches_onnxruntime(case):
    op, inputs, opset, inits, attrs = NODE_CASES[case]
    model = node_model(op, inputs, opset, inits, **attrs)
    want = ort_run(model, inputs)["y0"]
    got = tdc.onnx.load(model)(**inputs)["y0"]
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-7, 7), st.integers(-9, 9), st.sampled_from([-3, -2, -1, 1, 2, 3])),
                min_size=3, max_size=3))
def test_slice_with_any_steps_matches_onnxruntime(bounds):
    x = np.arange(5 * 6 * 4, dtype=np.float32).reshape(5, 6, 4)
    starts, ends, steps = (I64(*[b[i] for b in bounds]) for i in range(3))
    picked = [range(*slice(*b).indices(d)) for b, d in zip(bounds, x.shape)]
    if not all(picked):   # tdc has no empty tensors; onnxruntime gives one
        return
    model = node_model("Slice", {"x": x}, 13, {"s": starts, "e": ends, "a": I64(0, 1, 2), "t": steps})
    want = ort_run(model, {"x": x})["y0"]
    np.testing.assert_array_equal(want, x[tuple(slice(*b) for b in bounds)])   # numpy agrees with the spec
    m = tdc.onnx.load(model)
    np.testing.assert_array_equal(m(x=x)["y0"], want)


def test_dropout_mask_and_training_with_zero_ratio():
    model = node_model("Dropout", {"x": X3}, 13, {"r": np.array(0.0, np.float32), "t": np.array(True)}, n_out=2)
    model.graph.output[1].type.tensor_type.elem_type = TensorProto.BOOL
    out = tdc.onnx.load(model)(x=X3)
    np.testing.assert_array_equal(out["y0"], X3)
    assert out["y1"].dtype == np.bool_ and out["y1"].all()


@pytest.mark.parametrize("backend", ["reference", "llvm"])
def test_training_mode_dropout_imports_as_tdc_dropout(backend):
    x = R.standard_normal((4, 50)).astype(np.float32)
    model = node_model("Dropout", {"x": x}, 13, {"r": np.array(0.3, np.float32), "t": np.array(True)},
                       n_out=2, seed=7)
    model.graph.output[1].type.tensor_type.elem_type = TensorProto.BOOL
    m = tdc.onnx.load(model, backend=backend)
    assert [a.name for a in m.graph.state] == ["step"]
    out = m(x=x)
    y, mask = out["y0"], out["y1"]
    keep = dropout_keep(x.shape, 0.3, 7, 0)   # tdc's mask at step 0, computed independently of the graph
    np.testing.assert_array_equal(mask, keep)
    np.testing.assert_allclose(y, np.where(keep, x / 0.7, 0), rtol=1e-6)
    assert 0.5 < mask.mean() < 0.9


def test_dropout_exports_as_training_mode_dropout_and_back(tmp_path):
    g = Graph("drop")
    x = g.add_arg("x", TensorType("f32", (3, 40)), "input")
    key = g.add_arg("step", TensorType("i64", ()), "state", {"init": "zeros"})
    g.add_output("y", g.emit("dropout", [x, key], {"rate": 0.25, "seed": 11})[0])
    model = tdc.onnx.save(g, tmp_path / "d.onnx")
    (node,) = [n for n in model.graph.node if n.op_type == "Dropout"]
    assert helper.get_attribute_value(node.attribute[0]) == 11
    xs = R.standard_normal((3, 40)).astype(np.float32)
    y = ort_run(model, {"x": xs})["y"]   # onnxruntime draws its own mask: check only what it must keep
    assert np.all((y == 0) | np.isclose(y, xs / 0.75, rtol=1e-6))
    back = tdc.onnx.load(tmp_path / "d.onnx")
    np.testing.assert_allclose(back(x=xs)["y"], np.where(dropout_keep(xs.shape, 0.25, 11, 0), xs / 0.75, 0),
                               rtol=1e-6)


def test_batchnorm_training_mode_outputs():
    stats = {"s": np.ones(2, np.float32), "b": np.zeros(2, np.float32),
             "m": np.array([0.1, 0.2], np.float32), "v": np.array([1.5, 0.5], np.float32)}
    model = node_model("BatchNormalization", {"x": X4}, 15, stats, n_out=3, training_mode=1, momentum=0.8)
    got = tdc.onnx.load(model)(x=X4)   # against numpy: onnxruntime's inference build has no training mode
    mean, var = X4.mean(axis=(0, 2, 3)), X4.var(axis=(0, 2, 3))
    np.testing.assert_allclose(got["y1"], 0.8 * stats["m"] + 0.2 * mean, rtol=1e-5)
    np.testing.assert_allclose(got["y2"], 0.8 * stats["v"] + 0.2 * var, rtol=1e-5)
    np.testing.assert_allclose(got["y0"], (X4 - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5),
                               rtol=1e-4, atol=1e-5)


# ---- LRN: a composite of tdc ops (F.lrn) -----------------------------------------------------

LRN_X = R.standard_normal((2, 7, 4, 5)).astype(np.float32) * 3


@pytest.mark.parametrize("size,attrs", [(1, {}), (3, dict(alpha=0.5, beta=0.6, bias=1.5)), (5, {}),
                                        (5, dict(alpha=2e-3, beta=1.0, bias=0.5)), (9, dict(alpha=0.3))])
def test_lrn_matches_onnxruntime(size, attrs):
    model = node_model("LRN", {"x": LRN_X * 20}, 13, size=size, **attrs)   # x ~ 60: the window sum matters
    want = ort_run(model, {"x": LRN_X * 20})["y0"]
    got = tdc.onnx.load(model)(x=LRN_X * 20)["y0"]
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,shape", [(2, (2, 7, 4, 5)), (4, (2, 7, 4, 5)), (3, (2, 7, 4)), (2, (1, 3, 2, 3, 2))])
def test_lrn_even_sizes_and_other_ranks_follow_the_spec(size, shape):
    # onnxruntime's LRN takes odd sizes and 4-D inputs only; the spec has neither limit
    x = R.standard_normal(shape).astype(np.float32) * 3
    model = node_model("LRN", {"x": x}, 13, size=size, alpha=0.5, beta=0.6, bias=1.5)
    got = tdc.onnx.load(model, backend="llvm")(x=x)["y0"]
    np.testing.assert_allclose(got, lrn_loop(x, size, 0.5, 0.6, 1.5), rtol=2e-6, atol=1e-7)


def test_lrn_import_errors():
    with pytest.raises(TdcError, match=r"^node 'n0' \(LRN\): attribute 'size' is required$"):
        tdc.onnx.load(node_model("LRN", {"x": LRN_X}, 13))
    with pytest.raises(TdcError, match=r"^node 'n0' \(LRN\): size must be an integer >= 1, got 0 "
                                       r"\(input f32\[2,7,4,5\]\)$"):
        tdc.onnx.load(node_model("LRN", {"x": LRN_X}, 13, size=0))
    with pytest.raises(TdcError, match=r"node 'n0' \(LRN\): the input must be \[N, C, D1, ...\] \(rank >= 3\), "
                                       r"got rank 2 \(input f32\[2,7\]\)"):
        tdc.onnx.load(node_model("LRN", {"x": LRN_X[:, :, 0, 0]}, 13, size=3))
    with pytest.raises(TdcError, match=r"attribute 'axis' of LRN is not supported"):
        tdc.onnx.load(node_model("LRN", {"x": LRN_X}, 13, size=3, axis=1))


def test_lrn_exports_as_its_parts(tmp_path):
    # tdc's graph holds the composite, so the export is Mul, Reshape, AveragePool, Pow, ...: which
    # onnxruntime runs for an even size too, which its own LRN rejects
    model = node_model("LRN", {"x": LRN_X}, 13, size=4, alpha=0.5, beta=0.6, bias=1.5)
    m = tdc.onnx.load(model)
    tdc.onnx.save(m.graph, tmp_path / "lrn.onnx", m.params)
    exported = onnx.load(tmp_path / "lrn.onnx")
    assert {n.op_type for n in exported.graph.node} >= {"AveragePool", "Pow"}
    got = ort_run(exported, {"x": LRN_X})["y0"]
    np.testing.assert_allclose(got, lrn_loop(LRN_X, 4, 0.5, 0.6, 1.5), rtol=1e-5, atol=1e-6)


# ---- import: nodes evaluated at import run at the model's opset ---------------------------

def folded_model(op, opset, attrs, extra=(), out=0, n_out=1):
    """y = x * op(C, *extra) for a scalar input x: C (a Constant) and extra (Constants) are known at
    import, so tdc evaluates op then, with the attributes older opsets give it."""
    consts = [("c", X4)] + [(f"k{i}", a) for i, a in enumerate(extra)]
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(a)) for k, a in consts]
    outs = [f"o{i}" for i in range(n_out)]
    nodes += [helper.make_node(op, [k for k, _ in consts], outs, name="n0", **attrs),
              helper.make_node("Mul", ["x", outs[out]], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [])],
                              [helper.make_tensor_value_info("y", F, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


FOLDED_CASES = {   # op, opset, attributes: what moved from attributes to inputs, before it moved
    "unsqueeze_opset9": ("Unsqueeze", 9, dict(axes=[0, 3])),
    "unsqueeze_opset11_negative": ("Unsqueeze", 11, dict(axes=[-1])),
    "squeeze_opset11": ("Squeeze", 11, dict(axes=[0])),
    "reducesum_opset11": ("ReduceSum", 11, dict(axes=[1], keepdims=0)),
    "reducemean_opset13": ("ReduceMean", 13, dict(axes=[1, 2])),
    "reducemin_opset13": ("ReduceMin", 13, dict(axes=[-1], keepdims=0)),
    "reducel2_opset11": ("ReduceL2", 11, dict(axes=[0, 3])),
    "split_opset11": ("Split", 11, dict(axis=3, split=[2, 5]), (), 1, 2),
    "pad_opset9": ("Pad", 9, dict(pads=[0, 1, 2, 0, 0, 0, 1, 3], value=1.5)),
    "pad_opset9_reflect": ("Pad", 9, dict(pads=[0, 0, 2, 1, 0, 0, 1, 2], mode="reflect")),
    "slice_opset9": ("Slice", 9, dict(starts=[1, -5], ends=[100, -1], axes=[1, 3])),
    "clip_opset10": ("Clip", 10, dict(min=-0.2, max=0.4)),
    "topk_opset9": ("TopK", 9, dict(k=3), (), 0, 2),
    "upsample_opset7": ("Upsample", 7, dict(scales=[1.0, 1.0, 2.0, 3.0])),
    "upsample_opset9": ("Upsample", 9, dict(mode="nearest"), (np.array([1, 1, 3, 2], np.float32),)),
}


@pytest.mark.parametrize("case", sorted(FOLDED_CASES))
def test_folded_node_at_old_opset_matches_onnxruntime(case):
    op, opset, attrs, *rest = FOLDED_CASES[case]
    model = folded_model(op, opset, attrs, *rest)
    x = np.array(1.5, np.float32)
    want = ort_run(model, {"x": x})["y"]
    m = tdc.onnx.load(model)
    assert m.graph.op_counts() == {"constant": 1, "mul": 1}   # evaluated at import
    got = m(x=x)["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_resize_before_opset_11_of_constants_is_computed_by_its_converter():
    # onnx's reference evaluator has no Resize-10, so tdc does not fold it: F.resize computes it
    model = folded_model("Resize", 10, {}, (np.array([1, 1, 2, 2], np.float32),))
    x = np.array(1.5, np.float32)
    m = tdc.onnx.load(model)
    assert "gather" in m.graph.op_counts()
    np.testing.assert_allclose(m(x=x)["y"], ort_run(model, {"x": x})["y"], rtol=1e-6)




@pytest.mark.parametrize("name", ["densenet121", "inception_v2"])
def test_light_models_with_opset9_unsqueeze_import(name):
    # their batchnorms are followed by Unsqueeze(axes=...) of weights that ConstantOfShape makes,
    # evaluated at import at opset 9 (the numbers are checked on small models above)
    proto = onnx.load(os.path.join(LIGHT, f"light_{name}.onnx"))
    m = tdc.onnx.load(proto)
    bns = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert m.graph.op_counts()["batchnorm"] == bns > 10


@pytest.mark.parametrize("name", ["bvlc_alexnet", "inception_v1", "zfnet512"])
def test_light_models_with_lrn_match_onnxruntime(name):
    proto = with_random_weights(onnx.load(os.path.join(LIGHT, f"light_{name}.onnx")))
    inp = next(i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer})
    # pixel-like values (the caffe models take mean-subtracted 0-255 images): LRN's window sums matter
    x = (np.random.default_rng(1).standard_normal((1, 3, 224, 224)) * 50).astype(np.float32)
    want = ort_run(proto, {inp.name: x})
    m = tdc.onnx.load(proto)
    assert m.graph.op_counts()["pow"] == sum(n.op_type == "LRN" for n in proto.graph.node) == 2
    for backend in ("reference", "llvm"):
        got = m.compile(backend)(**{inp.name: x})
        for k, y in want.items():   # probabilities and logits, within 1e-4 of their largest
            err = np.abs(got[k] - y).max() / np.abs(y).max()
            assert err < 1e-4, f"{name} on {backend}: {k} off by {err:.1e} (relative to its largest)"


@pytest.mark.parametrize("name", ["densenet121", "inception_v2", "resnet50", "shufflenet", "squeezenet"])
def test_light_models_match_onnxruntime_on_llvm(name):
    """The zoo models without LRN (VGG-19 too, in benchmarks/onnx_zoo.py only: 548 MB of weights and
    10 s) on the LLVM backend: every output within 1e-4 of its largest, and the logits spread out
    (a NaN, or equal scores, would make the comparison say nothing)."""
    proto = light_model(name)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = ort_run(proto, {input_name(proto): x})
    got = tdc.onnx.load(proto).compile("llvm")(**{input_name(proto): x})
    for k, y in want.items():
        assert np.isfinite(y).all() and y.std() > 1e-3 * np.abs(y).max(), (k, y)
        err = np.abs(got[k] - y).max() / np.abs(y).max()
        assert err < 1e-4, f"{name}: {k} off by {err:.1e} (relative to its largest)"


def test_a_zoo_model_compiles_to_a_native_executable_matching_onnxruntime(tmp_path):
    proto = light_model("squeezenet")
    onnx.save(proto, tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "b")]) == 0
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = proto.graph.output[0].name
    r = subprocess.run([str(tmp_path / "b" / "model"), "--input", f"{input_name(proto)}={tmp_path / 'x.npy'}",
                        "--output", f"{out}={tmp_path / 'y.npy'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = ort_run(proto, {input_name(proto): x})[out]
    assert np.abs(np.load(tmp_path / "y.npy") - want).max() < 1e-4 * np.abs(want).max()


# ---- import: which initializers are params, state and consts ------------------------------

def kinds_model() -> onnx.ModelProto:
    """Conv, BN, Clip (opset 11: bounds as inputs), a MatMul on a transposed weight, a bias through
    Unsqueeze, and scalar constants: every kind of initializer."""
    rng = np.random.default_rng(3)

    def w(*shape):
        return rng.uniform(-0.5, 0.5, shape).astype(np.float32)
    inits = {"conv.w": w(4, 3, 3, 3), "conv.b": w(4), "bn.scale": w(4) + 1, "bn.bias": w(4), "bn.mean": w(4),
             "bn.var": w(4) + 1, "lo": np.array(-0.3, np.float32), "hi": np.array(0.6, np.float32),
             "fc.wt": w(5, 4), "fc.b": w(5), "half": np.array(0.5, np.float32), "eps": np.array([1e-3], np.float32)}
    nodes = [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n"]),
             helper.make_node("Clip", ["n", "lo", "hi"], ["k"]),
             helper.make_node("GlobalAveragePool", ["k"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Transpose", ["fc.wt"], ["fc.w"]),
             helper.make_node("MatMul", ["f", "fc.w"], ["m"]),
             helper.make_node("Unsqueeze", ["fc.b"], ["b2"], axes=[0]),
             helper.make_node("Add", ["m", "b2"], ["a"]),
             helper.make_node("Mul", ["a", "half"], ["h"]),
             helper.make_node("Add", ["h", "eps"], ["out"])]
    graph = helper.make_graph(nodes, "kinds", [helper.make_tensor_value_info("x", F, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info("out", F, [2, 5])],
                              [numpy_helper.from_array(a, k) for k, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)


def names(args):
    return {a.name for a in args}


def test_initializers_become_params_state_and_consts(tmp_path):
    proto = kinds_model()
    m = tdc.onnx.load(proto)
    assert names(m.graph.params) == {"conv.w", "conv.b", "bn.scale", "bn.bias", "fc.wt", "fc.b"}
    assert names(m.graph.state) == {"bn.mean", "bn.var"}
    assert names(m.graph.consts) == {"lo", "hi", "half", "eps"}
    assert set(m.params) == names(m.graph.args) - {"x"}
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 6)).astype(np.float32)
    want = ort_run(proto, {"x": x})["out"]
    np.testing.assert_allclose(m(x=x)["out"], want, rtol=1e-5, atol=1e-6)
    # exported, state and consts are initializers again, and import as the same kinds
    tdc.onnx.save(m.graph, tmp_path / "k.onnx", m.params)
    assert {t.name for t in onnx.load(tmp_path / "k.onnx").graph.initializer} >= set(m.params)
    back = tdc.onnx.load(tmp_path / "k.onnx")
    for kind in ("params", "state", "consts"):
        assert names(getattr(back.graph, kind)) == names(getattr(m.graph, kind)), kind
    np.testing.assert_allclose(back(x=x)["out"], want, rtol=1e-5, atol=1e-6)


def test_a_training_step_of_an_imported_model_updates_only_its_weights():
    from tdc.passes.training import training_pipeline
    m = tdc.onnx.load(kinds_model())
    step = training_pipeline().run(m.graph)
    weights = {"conv.w", "conv.b", "bn.scale", "bn.bias", "fc.wt", "fc.b"}
    assert {t.name for t, _ in step.updates} == weights | {"step"}
    exe = tdc.compile(step, params=m.params)
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 6)).astype(np.float32)
    exe(x=x, y=np.array([1, 3]), lr=np.float32(0.1))
    for a in m.graph.args[1:]:
        changed = not np.array_equal(exe.state[a.name], m.params[a.name])
        assert changed == (a.name in weights), a.name


# ---- import errors ---------------------------------------------------------------------------

def test_unsupported_op_names_node_and_op():
    model = node_model("Softsign", {"x": X3}, 13, None)
    with pytest.raises(TdcError, match=r"^ONNX ops not supported by tdc: Softsign \(1 node: n0\)$"):
        tdc.onnx.load(model)
    model.graph.node[0].name = ""
    with pytest.raises(TdcError, match=r"Softsign \(1 node: #0\)$"):
        tdc.onnx.load(model)


def test_every_unsupported_op_is_listed_in_one_error(capsys, tmp_path):
    def hardmax(i, src):
        return helper.make_node("Hardmax", [src], [f"l{i}"], name=f"fc{i}_hardmax", axis=1)
    nodes = [hardmax(1, "x"), helper.make_node("Relu", ["l1"], ["r1"]),   # after an unsupported op: skipped
             hardmax(2, "r1"), hardmax(3, "x"), hardmax(4, "x"),
             helper.make_node("Softsign", ["l2"], ["e"], name="softsign"),   # after one too: listed
             helper.make_node("Softplus", ["x"], ["s"]),                # no name: its index
             helper.make_node("ConstantOfShape", ["shape"], ["c"]),   # unsupported, but evaluated at import
             helper.make_node("Add", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info(o, F, None) for o in ("e", "l3", "l4", "s", "y")],
                              [numpy_helper.from_array(I64(1, 2, 3, 3), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    listing = "ONNX ops not supported by tdc: Hardmax (4 nodes: fc1_hardmax, fc2_hardmax, fc3_hardmax, ...), " \
              "Softsign (1 node: softsign), Softplus (1 node: #6)"
    with pytest.raises(TdcError) as e:
        tdc.onnx.load(model)
    assert str(e.value) == listing
    # an error in a supported op is added to the list (the nodes that do not depend on it still count)
    model.graph.node.insert(0, helper.make_node("Reshape", ["x", "five_by_five"], ["bad"], name="reshape"))
    model.graph.initializer.append(numpy_helper.from_array(I64(5, 5), "five_by_five"))   # 18 elements do not fit
    model.graph.output.append(helper.make_tensor_value_info("bad", F, None))
    with pytest.raises(TdcError, match=r"Softplus \(1 node: #7\); also node 'reshape' \(Reshape\): reshape: cannot reshape 18"):
        tdc.onnx.load(model)
    # a model imported at its first call (a shape-setting graph input) lists them at load too
    spec = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape_in"], ["r"]), helper.make_node("Softplus", ["r"], ["out"])], "g",
        [helper.make_tensor_value_info("x", F, [1, 2, 3, 3]), helper.make_tensor_value_info("shape_in", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("out", F, None)]), opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(TdcError, match=r"^ONNX ops not supported by tdc: Softplus \(1 node: #1\)$"):
        tdc.onnx.load(spec)
    # the command line prints it as one line
    onnx.save(model, tmp_path / "m.onnx")
    code, out, err = run_cli(capsys, "dump", tmp_path / "m.onnx")
    assert code == 1 and err.count("\n") == 1 and "Hardmax (4 nodes: fc1_hardmax" in err


def test_unsupported_attributes_name_the_attribute():
    model = node_model("Gemm", {"a": np.ones((2, 3), np.float32), "b": np.ones((3, 2), np.float32)}, 6,
                       broadcast=1)
    with pytest.raises(TdcError, match=r"node 'n0' \(Gemm\): attribute 'broadcast' of Gemm is not supported"):
        tdc.onnx.load(model)
    model = node_model("MaxPool", {"x": X4}, 13, kernel_shape=[2, 2], storage_order=2)
    with pytest.raises(TdcError, match=r"node 'n0' \(MaxPool\): storage_order must be 0 or 1, not 2"):
        tdc.onnx.load(model)
    model = node_model("AveragePool", {"x": X4}, 19, kernel_shape=[3, 3], dilations=[4, 4])
    with pytest.raises(TdcError, match=r"node 'n0' \(AveragePool\): avgpool2d: the output would be -1x-1: kernel \[3, 3\] \(dilation \[4, 4\]\)"):
        tdc.onnx.load(model)
    model = node_model("Pad", {"x": X4}, 13, {"p": I64(0, 0, 1, 1, 0, 0, 1, 1)}, mode="mirror")
    with pytest.raises(TdcError, match="mode 'mirror'"):
        tdc.onnx.load(model)


def test_4d_convolution_and_pooling_are_rejected():    # 1-D: tests/test_onnx_1d.py, 3-D: tests/test_nd3.py
    x = np.ones((1, 2, 3, 3, 3, 3), np.float32)
    model = node_model("Conv", {"x": x}, 13, {"w": np.ones((3, 2, 2, 2, 2, 2), np.float32)})
    with pytest.raises(TdcError, match="only 1-D, 2-D and 3-D Conv .* 4-D Conv"):
        tdc.onnx.load(model)
    model = node_model("MaxPool", {"x": x}, 13, kernel_shape=[2, 2, 2, 2])
    with pytest.raises(TdcError, match="only 1-D, 2-D and 3-D MaxPool .* 4-D MaxPool"):
        tdc.onnx.load(model)


def test_dynamic_shape_inputs():
    # a Reshape whose shape is a graph input: bound at call time, one static graph per value
    model = node_model("Reshape", {"x": X3, "shape": I64(6, 4)}, 13)
    m = tdc.onnx.load(model)
    assert isinstance(m, tdc.onnx.SpecializingOnnxModel) and m.bind == ["shape"]
    with pytest.raises(TdcError, match=r"the graph depends on the values of 'shape' .*constants=.*--bind"):
        m.graph
    np.testing.assert_array_equal(m(x=X3, shape=I64(4, -1))["y0"], X3.reshape(4, 6))
    np.testing.assert_array_equal(m(x=X3, shape=I64(4, -1))["y0"], X3.reshape(4, 6))
    np.testing.assert_array_equal(m(x=X3, shape=I64(2, 12))["y0"], X3.reshape(2, 12))
    assert len(m.specializations) == 2
    with pytest.raises(TdcError, match="missing input shape: tdc needs its value"):
        m(x=X3)
    got = tdc.onnx.load(model, constants={"shape": I64(4, -1)})(x=X3)["y0"]   # fixed at import
    np.testing.assert_array_equal(got, X3.reshape(4, 6))
    # symbolic and unknown input dims: fixed at import, or by the arrays given
    model = node_model("Relu", {"x": X3}, 13)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param = "N"
    m = tdc.onnx.load(model)
    with pytest.raises(TdcError, match=r"the graph depends on the symbolic dims x:0 .*batch=N.*--batch N"):
        m.graph
    for n in (1, 7):
        x = np.random.default_rng(n).standard_normal((n, 3, 4)).astype(np.float32)
        np.testing.assert_array_equal(m(x=x)["y0"], np.maximum(x, 0))
    assert m.specialize(x=(5, 3, 4)).graph.inputs[0].type.shape == (5, 3, 4)
    assert tdc.onnx.load(model, batch=5).graph.inputs[0].type.shape == (5, 3, 4)
    dims[2].Clear()
    assert tdc.onnx.load(model, dims={"N": 2}).free == [("x", 2)]
    assert tdc.onnx.load(model, dims={"N": 2, "x:2": 4}).graph.inputs[0].type.shape == (2, 3, 4)


def test_pytorch_flatten_with_a_dynamic_batch_runs_at_any_batch():
    """The acceptance case: torch.flatten's Shape -> Gather -> Unsqueeze -> Concat -> Reshape with a
    symbolic batch, called at batch 1 and 7 in one process (the native executable with --batch is
    test_native_bundle's test_onnx_model_compiles_to_an_executable_matching_onnxruntime)."""
    proto = torch_like_model()
    m = tdc.onnx.load(proto, backend="llvm")
    assert m.free == [("input.1", 0)] and m.bind == []
    for n in (1, 7):
        x = np.random.default_rng(n).standard_normal((n, 3, 8, 8)).astype(np.float32)
        got = m(**{"input.1": x})["output"]
        np.testing.assert_allclose(got, ort_run(proto, {"input.1": x})["output"], rtol=1e-4, atol=1e-5)
    assert len(m.specializations) == 2


def test_cli_binds_shape_inputs(capsys, tmp_path):
    path = tmp_path / "reshape.onnx"
    onnx.save(node_model("Reshape", {"x": X3, "shape": I64(6, 4)}, 13), path)
    code, out, err = run_cli(capsys, "run", path, "--random-inputs", "--backend", "reference")
    assert code == 1 and "the values of 'shape'" in err and "--bind NAME=FILE.npy" in err, err
    code, out, err = run_cli(capsys, "run", path, "--random-inputs", "--backend", "reference", "--bind", "shape=4,-1")
    assert code == 0 and out.startswith("y0: f32[4,6]"), err
    np.save(tmp_path / "s.npy", I64(2, 12))
    code, out, err = run_cli(capsys, "dump", path, "--bind", f"shape={tmp_path / 's.npy'}")
    assert code == 0 and "f32[2,12]" in out, err
    for bad, msg in (("shape", "expected NAME=FILE.npy"), ("shape=a,b", "neither a .npy file nor numbers"),
                     ("nothere=1", "the model has no input 'nothere'")):
        code, out, err = run_cli(capsys, "run", path, "--random-inputs", "--bind", bad)
        assert code == 1 and msg in err, (bad, err)
    code, out, err = run_cli(capsys, "run", os.path.join(EX, "mlp.py"), "--random-inputs", "--bind", "x=1")
    assert code == 1 and "--bind fixes inputs of ONNX models" in err


def test_other_import_errors(tmp_path):
    model = node_model("Relu", {"x": np.ones(3, np.complex64)}, 13, out_type=TensorProto.COMPLEX64)
    with pytest.raises(TdcError, match="input 'x': ONNX dtype COMPLEX64 is not supported"):
        tdc.onnx.load(model)
    model = node_model("Relu", {"x": X3}, 13)
    model.graph.node[0].domain = "com.microsoft"
    with pytest.raises(TdcError, match=r"com.microsoft.Relu \(1 node: n0\); tdc converts the ops of the default ONNX"):
        tdc.onnx.load(model)
    with pytest.raises(TdcError, match="no such file"):
        tdc.onnx.load(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff not a model")
    with pytest.raises(TdcError, match="bad.onnx: not a readable ONNX model"):
        tdc.onnx.load(bad)


# ---- the CLI on .onnx files --------------------------------------------------------------------

def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_dump_and_run_onnx(capsys, tmp_path):
    g = load_model(os.path.join(EX, "lenet.py")).trace(batch=2)
    params = example_params(g, seed=4)
    path = tmp_path / "lenet.onnx"
    tdc.onnx.save(g, path, params)
    code, out, err = run_cli(capsys, "dump", path)
    assert code == 0, err
    assert "conv2d(" in out and "%conv1.weight: f32[6,1,5,5] param" in out
    assert parse_graph(out).output("out").type.shape == (2, 10)
    # run uses the file's initializers as weights
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli(capsys, "run", path, "--input", f"x={tmp_path / 'x.npy'}", "--backend", "reference",
                             "--output", tmp_path / "y.npy")
    assert code == 0, err
    assert out.startswith("out: f32[2,10]")
    want = tdc.compile(g, params=params)(x=x)["out"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-6, atol=1e-6)
    code, out, err = run_cli(capsys, "run", path, "--random-inputs", "--backend", "reference")
    assert code == 0 and "out: f32[2,10]" in out, err


def test_cli_onnx_with_dynamic_batch(capsys, tmp_path):
    path = tmp_path / "torch.onnx"
    onnx.save(torch_like_model(), path)
    code, out, err = run_cli(capsys, "run", path, "--random-inputs", "--backend", "reference")
    assert code == 1 and "torch.onnx: the graph depends on the symbolic dims input.1:0" in err and "--batch N" in err
    code, out, err = run_cli(capsys, "run", path, "--random-inputs", "--backend", "reference", "--batch", "4")
    assert code == 0 and out.startswith("output: f32[4,5]"), err
    code, out, err = run_cli(capsys, "dump", path, "--batch", "1")
    assert code == 0 and '%input.1: f32[1,3,8,8] input' in out and '%"onnx::Conv_20"' in out
    code, out, err = run_cli(capsys, "dump", tmp_path / "nope.onnx")
    assert code == 1 and "no such file" in err
