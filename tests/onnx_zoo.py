"""onnx's light model zoo (onnx/backend/test/data/light) with weights worth comparing: shared by
tests/test_onnx.py and benchmarks/onnx_zoo.py."""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
          "squeezenet", "vgg19", "zfnet512"]


def light_model(name: str) -> onnx.ModelProto:
    return with_random_weights(onnx.load(os.path.join(LIGHT, f"light_{name}.onnx")))


def input_name(proto: onnx.ModelProto) -> str:
    return next(i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer})


def with_random_weights(proto: onnx.ModelProto, seed=0) -> onnx.ModelProto:
    """A light model with seeded random He-scale weights, and its logits as a second output (when it
    ends in a Softmax). The light models' weights are ConstantOfShape fills, all equal, which give
    every class the same score (and, made at import, are constants of hundreds of MB for AlexNet,
    which the LLVM backend binds in its weights buffer). Batchnorm scales and variances, and the
    per-channel scales of the opset-9 models' Mul after batchnorm, are drawn from [0.5, 1.5): a
    variance below 0 is a NaN, and scales near 0 would shrink the activations to nothing over a
    hundred layers."""
    rng = np.random.default_rng(seed)
    g = proto.graph
    shapes = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    def is_fill(n):
        return n.op_type == "ConstantOfShape" and n.input[0] in shapes
    positive = {n.input[i] for n in g.node if n.op_type == "BatchNormalization" for i in (1, 4) if i < len(n.input)}
    positive |= {x for n in g.node if n.op_type == "Mul" for x in n.input}
    weights = []
    for n in filter(is_fill, g.node):
        shape = tuple(int(d) for d in shapes[n.input[0]])
        fan_in = int(np.prod(shape[1:]))
        w = rng.random(shape, np.float32) - np.float32(0.5)   # uniform: 5x faster to draw than normal
        if len(shape) > 1:
            w *= np.float32(2 * np.sqrt(6.0 / fan_in))       # He's uniform bound
        elif n.output[0] in positive:
            w += np.float32(1.0)
        else:
            w *= np.float32(0.2)                             # biases and means within 0.1
        weights.append(numpy_helper.from_array(w, n.output[0]))
    nodes = [n for n in g.node if not is_fill(n)]
    logits = [n.input[0] for n in nodes if n.op_type == "Softmax"][-1:]
    used = {i for n in nodes for i in n.input}   # without the fills' shapes (old models list them as inputs too)
    graph = helper.make_graph(nodes, g.name, [i for i in g.input if i.name in used],
                              list(g.output) + [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in logits],
                              [t for t in g.initializer if t.name in used] + weights)
    return helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
