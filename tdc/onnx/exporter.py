"""Exporting a tdc graph as an ONNX model (opset 17).

Inputs stay inputs, params/consts/state become initializers, and each node becomes one or
a few ONNX nodes. Shape-like operands that tdc keeps as attributes (reshape's shape, slice
bounds, pads, ReduceSum axes) become int64 initializers.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, Value
from ..frontend.init import init_params
from ..files import atomic_write
from .importer import DTYPES   # first: it turns a missing onnx package into a TdcError

import onnx
from onnx import helper, numpy_helper

OPSET = 17
IR_VERSION = 8   # what opset 17 came with; onnxruntime reads it

TO_ONNX = {v: k for k, v in DTYPES.items()}

_SAME = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max", "minimum": "Min",
         "equal": "Equal", "less": "Less", "greater": "Greater", "less_equal": "LessOrEqual",
         "greater_equal": "GreaterOrEqual", "where": "Where", "neg": "Neg", "abs": "Abs", "sign": "Sign",
         "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "erf": "Erf",
         "matmul": "MatMul", "global_avgpool": "GlobalAveragePool"}


BATCH = "batch"   # the dim_param of a dynamic batch dimension
INT64_MAX = np.iinfo(np.int64).max


def save(graph: Graph, path, params: dict | None = None, seed: int = 0, dynamic_batch: bool = False) -> onnx.ModelProto:
    """Write `graph` as an ONNX model to `path` (returns the ModelProto). Param, const and state
    values come from `params`, or from the graph's initializers seeded with `seed`. With
    `dynamic_batch` the leading dim of the inputs (and of the outputs that have it) is the
    symbolic "batch", and the shapes the graph fixes are written so that any batch runs."""
    values = {**init_params(graph, seed, only_missing=params or {}), **(params or {})}
    model = to_model(graph, values, dynamic_batch)
    atomic_write(os.fspath(path), lambda f: f.write(model.SerializeToString()))
    return model


def to_model(graph: Graph, values: dict[str, np.ndarray], dynamic_batch: bool = False) -> onnx.ModelProto:
    """The checked ModelProto of `graph`, with `values` (name -> array) as its initializers."""
    model = _Exporter(graph, values, dynamic_batch).run()
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:   # an exporter bug
        raise TdcError(f"internal: the exported ONNX model of {graph.name} does not check: {e}") from None
    return model


def _batch_of(graph: Graph) -> int:
    """The batch size of a graph: the leading dim its inputs share."""
    lead = {a.type.shape[0] for a in graph.inputs if a.type.rank >= 1}
    if len(lead) != 1 or any(a.type.rank == 0 for a in graph.inputs):
        shapes = ", ".join(f"{a.name}: {a.type}" for a in graph.inputs) or "none"
        raise TdcError(f"a dynamic batch needs inputs that share their leading dim (the batch); {graph.name}'s "
                       f"inputs are {shapes}")
    return lead.pop()


class _Exporter:
    def __init__(self, graph: Graph, values: dict[str, np.ndarray], dynamic_batch: bool = False):
        self.g, self.values = graph, values
        self.batch = _batch_of(graph) if dynamic_batch else None
        self.nodes, self.inits = [], []
        self.names: dict[Value, str] = {}
        self.taken = {a.name for a in graph.args} | {name for name, _ in graph.outputs}
        self.count = 0

    def fresh(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"{hint}_{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def run(self) -> onnx.ModelProto:
        g = self.g
        if g.updates:
            raise TdcError(f"graph {g.name} updates params or state (a training step); export an inference graph")
        inputs = []
        for a in g.args:
            self.names[a] = a.name
            if a.kind == "input":
                inputs.append(self.info(a.name, a))
                continue
            if a.name not in self.values:
                raise TdcError(f"no value for {a.kind} {a.name} ({a.type})")
            arr = np.asarray(self.values[a.name])
            if arr.shape != a.type.shape or arr.dtype != a.type.np_dtype:
                raise TdcError(f"{a.kind} {a.name}: the value is {arr.dtype}{list(arr.shape)}, "
                               f"the graph needs {a.type}")
            self.inits.append(numpy_helper.from_array(arr, a.name))
        # a node's output that is a graph output takes the output's name
        out_of = {}
        for name, v in g.outputs:
            if any(a.name == name for a in g.args):
                raise TdcError(f"output {name!r} has the name of an argument: ONNX names each tensor once")
            if v.producer is not None and v not in out_of:
                out_of[v] = name
        for node in g.nodes:
            for v in node.outputs:
                self.names[v] = out_of.get(v) or self.fresh(node.op)
        for node in g.nodes:
            self.convert(node)
        outputs = []
        for name, v in g.outputs:
            if self.names[v] != name:   # an argument, or a value already output under another name
                self.add("Identity", [self.names[v]], [name])
            outputs.append(self.info(name, v))
        og = helper.make_graph(self.nodes, g.name, inputs, outputs, self.inits)
        return helper.make_model(og, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                 producer_name="tdc")

    # ---- helpers ---------------------------------------------------------------------
    def info(self, name: str, v: Value):
        dims = list(v.type.shape)
        if self.batch is not None and dims and dims[0] == self.batch:
            dims[0] = BATCH
        return helper.make_tensor_value_info(name, TO_ONNX[v.type.dtype], dims)

    def shape_of(self, node, shape) -> list[int]:
        """A shape the graph fixes (reshape's, broadcast_to's, full's), written for any batch: a
        leading dim equal to the input's is 0 (Reshape copies it) or 1 (Expand keeps it)."""
        shape = list(shape)
        if self.batch is None or not shape:
            return shape
        x = node.inputs[0] if node.inputs else None
        if x is not None and x.type.rank >= 1 and shape[0] == x.type.shape[0]:
            shape[0] = 0 if node.op == "reshape" else 1
        elif self.batch in shape or (x is not None and x.type.rank >= 1 and x.type.shape[0] == self.batch):
            where = f" ({node.loc})" if node.loc else ""
            raise TdcError(f"{node.op}{where} to {list(node.outputs[0].type.shape)} mixes the batch dim "
                           f"({self.batch}) into a fixed shape: export without --dynamic-batch")
        return shape

    def add(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", **attrs))
        return outputs[0]

    def tmp(self, op: str, inputs: list[str], **attrs) -> str:
        return self.add(op, inputs, [self.fresh(op.lower())], **attrs)

    def const(self, array, hint: str) -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, xs, hint: str) -> str:
        return self.const(np.array(list(xs), np.int64), hint)

    # ---- nodes ---------------------------------------------------------------------
    def convert(self, node):
        op, a = node.op, node.attrs
        ins = [self.names[v] for v in node.inputs]
        outs = [self.names[v] for v in node.outputs]
        out = outs[0] if outs else None
        x = node.inputs[0] if node.inputs else None
        if op in _SAME:
            self.add(_SAME[op], ins, outs)
        elif op == "not_equal":
            self.add("Not", [self.tmp("Equal", ins)], outs)
        elif op == "rsqrt":
            self.add("Reciprocal", [self.tmp("Sqrt", ins)], outs)
        elif op == "leaky_relu":
            self.add("LeakyRelu", ins, outs, alpha=a["alpha"])
        elif op == "cast":
            self.add("Cast", ins, outs, to=TO_ONNX[a["to"]])
        elif op == "constant":
            self.add("Constant", [], outs, value=numpy_helper.from_array(np.asarray(a["value"]), out))
        elif op == "full":
            fill = numpy_helper.from_array(np.full((1,), a["value"], node.outputs[0].type.np_dtype), "value")
            self.add("ConstantOfShape", [self.ints(self.shape_of(node, a["shape"]), "shape")], outs, value=fill)
        elif op == "linear":
            if x.type.rank == 2:
                self.add("Gemm", ins, outs, transB=1)
            else:
                wt = self.tmp("Transpose", [ins[1]], perm=[1, 0])
                if len(ins) == 3:
                    self.add("Add", [self.tmp("MatMul", [ins[0], wt]), ins[2]], outs)
                else:
                    self.add("MatMul", [ins[0], wt], outs)
        elif op == "conv2d":
            self.add("Conv", ins, outs, kernel_shape=list(node.inputs[1].type.shape[2:]), strides=list(a["stride"]),
                     pads=list(a["pad"]), dilations=list(a["dilation"]), group=a["groups"])
        elif op == "conv2d_grad_input":
            # a transposed convolution with the same weight layout; the rows below the last window
            # (input_shape's floor-division remainder) are ONNX's output_padding
            (kh, kw), (h, w) = node.inputs[1].type.shape[2:], a["input_shape"][2:]
            t, l, b, r = a["pad"]
            extra = [size + lo + hi - (s * (n - 1) + (k - 1) * d + 1)
                     for size, lo, hi, s, n, k, d in zip((h, w), (t, l), (b, r), a["stride"], x.type.shape[2:],
                                                         (kh, kw), a["dilation"])]
            self.add("ConvTranspose", ins, outs, kernel_shape=[kh, kw], strides=list(a["stride"]), pads=list(a["pad"]),
                     output_padding=extra, dilations=list(a["dilation"]), group=a["groups"])
        elif op == "maxpool2d":
            self.add("MaxPool", ins, outs, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                     pads=list(a["pad"]), dilations=list(a["dilation"]), ceil_mode=int(a["ceil_mode"]))
        elif op == "avgpool2d":
            self.add("AveragePool", ins, outs, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                     pads=list(a["pad"]), ceil_mode=int(a["ceil_mode"]),
                     count_include_pad=int(a["count_include_pad"]))
        elif op == "dropout":
            # ONNX's Dropout has no step input and leaves its generator to the runtime: the seed is
            # kept, the masks are the runtime's own (tdc's importer reads it back as tdc's dropout)
            ratio = self.const(np.array(a["rate"], np.float32), "ratio")
            self.add("Dropout", [ins[0], ratio, self.const(np.array(True), "training_mode")], outs, seed=a["seed"])
        elif op == "batchnorm":
            if a["training"]:
                raise TdcError(f"{op} with training=true has no ONNX export (export the inference graph)")
            self.add("BatchNormalization", ins, outs, epsilon=a["eps"], momentum=a["momentum"])
        elif op == "reshape":
            self.add("Reshape", [ins[0], self.ints(self.shape_of(node, a["shape"]), "shape")], outs)
        elif op == "flatten":
            self.add("Flatten", ins, outs, axis=a["axis"])
        elif op == "transpose":
            self.add("Transpose", ins, outs, perm=list(a["perm"]))
        elif op == "concat":
            self.add("Concat", ins, outs, axis=a["axis"])
        elif op == "gather":
            self.add("Gather", ins, outs, axis=a["axis"])
        elif op == "broadcast_to":
            self.add("Expand", [ins[0], self.ints(self.shape_of(node, a["shape"]), "shape")], outs)
        elif op == "slice":
            r = len(a["starts"])
            ends = list(a["ends"])
            if self.batch is not None and ends and ends[0] == x.type.shape[0] and a["steps"][0] > 0:
                ends[0] = INT64_MAX    # to the end, whatever the batch
            self.add("Slice", [ins[0], self.ints(a["starts"], "starts"), self.ints(ends, "ends"),
                               self.ints(range(r), "axes"), self.ints(a["steps"], "steps")], outs)
        elif op == "pad":
            value = self.const(np.array(a["value"], x.type.np_dtype), "pad_value")
            self.add("Pad", [ins[0], self.ints(a["pads"], "pads"), value], outs, mode="constant")
        elif op in ("reduce_sum", "reduce_mean", "reduce_max"):
            onnx_op = {"reduce_sum": "ReduceSum", "reduce_mean": "ReduceMean", "reduce_max": "ReduceMax"}[op]
            kw = {"keepdims": int(a["keepdims"])}
            axes = a["axes"]
            if op == "reduce_sum":   # opset 13 moved ReduceSum's axes to an input; the others follow in 18
                extra = [self.ints(axes, "axes")] if axes is not None else []
                if axes is not None and not axes:
                    kw["noop_with_empty_axes"] = 1
                self.add(onnx_op, ins + extra, outs, **kw)
            else:
                if axes is not None and not axes:   # reducing over no axes is the identity
                    self.add("Identity", ins, outs)
                else:
                    self.add(onnx_op, ins, outs, **kw, **({"axes": list(axes)} if axes is not None else {}))
        elif op in ("softmax", "log_softmax"):
            self.add("Softmax" if op == "softmax" else "LogSoftmax", ins, outs, axis=a["axis"])
        else:
            raise TdcError(f"cannot export op {op} to ONNX: it has no ONNX equivalent in tdc's exporter")
