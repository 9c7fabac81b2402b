"""ONNX models in and out of tdc.

    import tdc.onnx
    m = tdc.onnx.load("model.onnx", batch=1)     # m.graph: a tdc Graph, m.params: its initializers
    out = m(input=x)                              # {ONNX output name: array}, reference backend
    tdc.onnx.save(graph, "out.onnx", params)      # a tdc graph as an ONNX model (opset 17)

tdc graphs are statically shaped, so an imported model's symbolic dims must be fixed at
import (`dims=` or `batch=`), and inputs that ONNX ops read as shapes or attributes
(Reshape's shape, Pad's pads, reduction axes, ...) must be constants or initializers.
See docs/onnx.md.
"""
from .exporter import OPSET, save  # noqa: F401
from .importer import STATIC_INPUTS, OnnxModel, SpecializingOnnxModel, load  # noqa: F401
