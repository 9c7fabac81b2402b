"""1-D Conv, ConvTranspose, MaxPool and AveragePool from ONNX, which tdc runs as 2-D over a height of
1 (importer._one_d_as_2d): against onnxruntime on every backend, and their gradients against
float64 finite differences."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import tdc
import tdc.onnx
from tdc.ops import functional as F
from tdc.ops.tensor import Builder, Tensor
from tdc.runtime.gradcheck import gradcheck

RNG = np.random.default_rng(7)
W1 = RNG.standard_normal((4, 1, 3)).astype(np.float32)      # group 2: [Cout, Cin/2, k]
B1 = RNG.standard_normal(4).astype(np.float32)
WT = RNG.standard_normal((4, 3, 2)).astype(np.float32)      # ConvTranspose: [Cin, Cout, k]


def model() -> "onnx.ModelProto":  # noqa: F821
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], strides=[2], pads=[2, 1], dilations=[2], group=2),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[3], strides=[2], pads=[1, 1], ceil_mode=1),
        helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[2], auto_pad="SAME_UPPER", count_include_pad=1),
        helper.make_node("ConvTranspose", ["a", "wt"], ["y"], strides=[2], output_padding=[1], pads=[0, 1]),
    ]
    graph = helper.make_graph(nodes, "one_d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 23])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1"),
                               numpy_helper.from_array(WT, "wt")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


X = RNG.standard_normal((2, 2, 23)).astype(np.float32)


@pytest.mark.parametrize("backend", ["reference", "numba", "llvm"])
def test_matches_onnxruntime(backend):
    proto = model()
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    m = tdc.onnx.load(proto)
    assert m.graph.inputs[0].type.shape == (2, 2, 23) and m.graph.outputs[0][1].type.rank == 3
    got = m.compile(backend)(x=X)["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_match_finite_differences():
    m = tdc.onnx.load(model())
    g = m.graph
    with Builder(g) as b:
        y = Tensor(g.output("y"), b)
        weights = b.constant(np.random.default_rng(2).standard_normal(y.shape).astype(np.float32), "f32")
        g.add_output("loss", F.sum(y * weights).value)
    errors = gradcheck(g, {"x": X, **m.params}, loss="loss", wrt=["x", "w1", "b1", "wt"], max_entries=12)
    assert set(errors) == {"x", "w1", "b1", "wt"} and max(errors.values()) < 1e-6, errors
