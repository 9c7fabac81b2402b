"""Importing an ONNX model as a tdc graph.

Every ONNX tensor name maps to one of three things while the nodes are converted in order:
  - a tdc Value (computed at run time: graph inputs and what depends on them);
  - a static numpy array, known at import: Constant outputs, non-float initializers, Shape
    of a tdc value, and any node whose inputs are all static (evaluated with onnx's
    reference evaluator, which covers the Shape/Gather/Unsqueeze/Concat plumbing of
    exported models);
  - a float initializer, which becomes a `param`, `state` or `const` argument (keeping its ONNX
    name; which one depends on the ops that read it, see _initializer_kinds) the first time a
    node uses it as data, and whose value can also be read where a constant is needed.
A static array used as data becomes a `constant` node.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from ..errors import ShapeError, TdcError
from ..ir.graph import Graph, Value
from ..ir.types import TensorType
from ..ops import functional as F
from ..ops.common import broadcast_shapes
from ..ops.functional import _conv3d_problem, _conv_transpose_problem, _lrn_problem, _pool_problem, _resize_problem
from ..ops.tensor import Builder, Tensor

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as e:   # a declared extra: pip install 'tdc[onnx]'
    raise TdcError("ONNX support needs the onnx package: pip install 'tdc[onnx]'") from e

DTYPES = {TensorProto.FLOAT: "f32", TensorProto.DOUBLE: "f64", TensorProto.FLOAT16: "f16",
          TensorProto.INT8: "i8", TensorProto.INT32: "i32", TensorProto.INT64: "i64", TensorProto.BOOL: "bool",
          TensorProto.UINT8: "u8", TensorProto.INT16: "i16", TensorProto.UINT16: "u16", TensorProto.UINT32: "u32",
          TensorProto.UINT64: "u64", TensorProto.BFLOAT16: "bf16"}

# Inputs that tdc needs at import time (they become shapes or attributes). Graph inputs feeding
# them can be fixed with load(..., constants={name: array}).
STATIC_INPUTS = {"Reshape": (1,), "Pad": (1, 2, 3), "Squeeze": (1,), "Unsqueeze": (1,), "ReduceSum": (1,),
                 "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "Slice": (1, 2, 3, 4), "Expand": (1,),
                 "Dropout": (1, 2), "Split": (1,), "Resize": (1, 2, 3), "Upsample": (1,)}

# never evaluated at import even when their inputs are known
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
               "Dropout"}


# What a float initializer becomes depends on what reads it. A weight or bias of a differentiable op
# is a `param` (trained by `tdc compile --train`); BatchNormalization's running statistics are
# `state`; everything else (epsilons, clip bounds, exponents, scales) is a `const`.
_WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
                  "BatchNormalization": (1, 2), "LayerNormalization": (1, 2)}
_STATE_INPUTS = {"BatchNormalization": (3, 4)}
# Exporters also write biases and scales as elementwise arithmetic (PyTorch's MatMul + Add, a
# decomposed LayerNorm's Mul and Add): a weight there unless it is a scalar (an epsilon, GELU's 0.5).
_ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Sum"}
# Ops that only move data (the input at index 0; Concat: every input): a weight read through them is
# still a weight (DenseNet's Unsqueeze before Mul, a transposed MatMul operand, ViT's class token).
_MOVES = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Cast", "Expand", "Slice", "Pad",
          "Dropout", "Concat"}


_BF16 = TensorType("bf16", ()).np_dtype


def _is_weight(a: np.ndarray) -> bool:
    """Float initializers are the model's weights (args); the others are values fixed at import
    (shapes, indices). bf16 counts as a float: models store weights in it."""
    return a.dtype.kind == "f" or a.dtype == _BF16


def _initializer_kinds(graph, initializers: dict[str, np.ndarray]) -> dict[str, str]:
    """param, state or const for each initializer, from the ops that read it (see _WEIGHT_INPUTS)."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    uses: dict[str, set] = {}   # tensor -> how it is read: "weight", "state", "arithmetic", "other"

    def read_as(name: str) -> set:
        if name not in uses:
            uses[name] = found = set()
            for node, i in readers.get(name, ()):
                op = node.op_type if _default_domain(node) else None
                if i in _WEIGHT_INPUTS.get(op, ()):
                    found.add("weight")
                elif i in _STATE_INPUTS.get(op, ()):
                    found.add("state")
                elif op in _ARITHMETIC:
                    found.add("arithmetic")
                elif op in _MOVES and (i == 0 or op == "Concat"):
                    found.update(*(read_as(out) for out in node.output if out))
                else:
                    found.add("other")
        return uses[name]

    kinds = {}
    for name, a in initializers.items():
        how = read_as(name)
        if "weight" in how or ("arithmetic" in how and a.size > 1):
            kinds[name] = "param"
        else:
            kinds[name] = "state" if "state" in how else "const"
    return kinds


def dtype_of(elem_type: int, what: str) -> str:
    if elem_type not in DTYPES:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type
        raise TdcError(f"{what}: ONNX dtype {name} is not supported "
                       "(tdc has " + ", ".join(TensorProto.DataType.Name(k).lower() for k in DTYPES) + ")")
    return DTYPES[elem_type]


class OnnxModel:
    """An imported model: `.graph` (a tdc Graph), `.params` (initializer name -> array, for the
    graph's params, state and consts) and `model(**inputs)` -> {output name: array}."""

    def __init__(self, graph: Graph, params: dict[str, np.ndarray], backend: str = "reference"):
        self.graph, self.params, self.backend = graph, params, backend
        self._exes = {}

    def compile(self, backend: str | None = None):
        from ..backends import compile
        backend = backend or self.backend
        if backend not in self._exes:
            self._exes[backend] = compile(self.graph, backend=backend, params=self.params)
        return self._exes[backend]

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        return self.compile()(**inputs)

    def __repr__(self):
        ins = ", ".join(f"{a.name}: {a.type}" for a in self.graph.inputs)
        g = self.graph
        return f"<OnnxModel {g.name}({ins}), {len(g.params)} params, {len(g.state)} state, {len(g.consts)} consts>"


def load(source, *, dims: dict | None = None, batch: int | None = None, constants: dict | None = None,
         backend: str = "reference"):
    """Import an ONNX model (a path, bytes or a ModelProto).

    dims: values for symbolic input dims, by dim_param name or as "input:axis".
    batch: the value of every still-unknown leading (axis 0) dim.
    constants: graph inputs to fix to a value (for inputs tdc needs at import, e.g. a Reshape shape).

    A model whose shapes are all known is imported at once (an OnnxModel). One that still has
    symbolic dims, or graph inputs that set shapes (a Reshape's shape, reduction axes: see
    STATIC_INPUTS), is a SpecializingOnnxModel: calling it with its inputs imports and compiles the
    static graph for those values and input shapes, and keeps it for the next call like them.
    """
    if isinstance(source, onnx.ModelProto):
        proto = source
    elif isinstance(source, bytes):
        proto = onnx.load_from_string(source)
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise TdcError(f"{path}: no such file")
        try:
            proto = onnx.load(path)
        except Exception as e:   # protobuf's DecodeError and friends
            raise TdcError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    where = None if isinstance(source, (onnx.ModelProto, bytes)) else os.fspath(source)
    dims, constants = dict(dims or {}), dict(constants or {})
    unknown = sorted(set(constants) - {vi.name for vi in proto.graph.input})
    if unknown:
        raise TdcError(f"{where + ': ' if where else ''}constants: the model has no input {unknown[0]!r}")
    bind, free = value_inputs(proto, constants), free_dims(proto, dims, batch, constants)
    if bind or free:
        unsupported = _unsupported_ops(proto, {*bind, *constants})
        if unsupported:     # now, not at the first call
            raise TdcError((f"{where}: " if where else "") + _unsupported_message(unsupported))
        return SpecializingOnnxModel(proto, dims, batch, constants, backend, bind, free, where)
    return _import(proto, dims, batch, constants, backend, where)


def _import(proto, dims, batch, constants, backend, where) -> OnnxModel:
    try:
        graph, params = _Importer(proto, dims, batch, constants).run()
    except TdcError as e:
        if where is None:
            raise
        raise TdcError(f"{where}: {e}") from None
    return OnnxModel(graph, params, backend)


def _graph_inputs(proto, constants) -> list:
    inits = {t.name for t in proto.graph.initializer}
    return [vi for vi in proto.graph.input if vi.name not in inits and vi.name not in constants]


def value_inputs(proto, constants: dict) -> list[str]:
    """The graph inputs whose values tdc needs at import: those a shape-like operand (STATIC_INPUTS)
    is computed from. A Shape reads only its input's shape, which is known once the dims are."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    inputs = {vi.name for vi in _graph_inputs(proto, constants)}
    stack = [n.input[i] for n in proto.graph.node for i in STATIC_INPUTS.get(n.op_type, ())
             if i < len(n.input) and n.input[i]]
    seen, need = set(), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            need.add(name)
        elif name in producer and producer[name].op_type not in ("Shape", "Size"):
            stack.extend(x for x in producer[name].input if x)
    return sorted(need)


def free_dims(proto, dims: dict, batch: int | None, constants: dict) -> list[tuple[str, int]]:
    """(input, axis) of every input dim that is symbolic and not fixed by `dims` or `batch`."""
    free = []
    for vi in _graph_inputs(proto, constants):
        tt = vi.type.tensor_type
        for axis, d in enumerate(tt.shape.dim if tt.HasField("shape") else ()):
            keys = ([d.dim_param] if d.dim_param else []) + [f"{vi.name}:{axis}"]
            if not d.HasField("dim_value") and not any(k in dims for k in keys) and not (axis == 0 and batch):
                free.append((vi.name, axis))
    return free


def _unsupported_ops(proto, bound: set[str]) -> dict[str, list[str]]:
    """The unsupported ops of a model imported later (as _Importer.is_unsupported would find them):
    an op without a converter counts unless its inputs are all known at import."""
    static = {t.name for t in proto.graph.initializer if not _is_weight(numpy_helper.to_array(t))} | bound
    found: dict[str, list[str]] = {}
    for i, p in enumerate(proto.graph.node):
        ins = [x for x in p.input if x]
        known = p.op_type in ("Shape", "Size", "Constant") or (bool(ins) and p.op_type not in _RANDOM_OPS
                                                               and all(x in static for x in ins))
        if known and _default_domain(p):
            static.update(p.output)
        elif not _default_domain(p) or p.op_type not in CONVERTERS:
            op = p.op_type if _default_domain(p) else f"{p.domain}.{p.op_type}"
            found.setdefault(op, []).append(p.name or f"#{i}")
    return found


class SpecializingOnnxModel:
    """An ONNX model with symbolic dims or shape-setting inputs: `model(**inputs)` imports the static
    graph for the inputs' shapes and the values of `bind`, compiles it, keeps it keyed by them, and
    runs it. `model.specialize(**inputs)` returns that static OnnxModel (values for `bind`, arrays
    or shapes for the inputs with symbolic dims)."""

    def __init__(self, proto, dims, batch, constants, backend, bind: list[str], free: list[tuple[str, int]],
                 where: str | None):
        self.proto, self.dims, self.batch, self.constants = proto, dims, batch, constants
        self.backend, self.bind, self.free, self.where = backend, bind, free, where
        self.specializations: dict[tuple, OnnxModel] = {}

    def needs(self) -> str:
        parts = []
        if self.bind:
            parts.append("the values of " + ", ".join(repr(n) for n in self.bind) + " (they set shapes tdc fixes at "
                         "import: constants={...} in load, or --bind NAME=FILE.npy|V,V,... on the command line)")
        if self.free:
            parts.append("the symbolic dims " + ", ".join(f"{n}:{a}" for n, a in self.free) + " (dims={...} or "
                         "batch=N in load, or --batch N on the command line)")
        return " and ".join(parts)

    @property
    def graph(self) -> Graph:
        raise TdcError(f"{self.where or self.proto.graph.name}: the graph depends on {self.needs()}; call the model "
                       "with its inputs, or model.specialize(**inputs) for the static model")

    params = graph

    def specialize(self, **inputs) -> OnnxModel:
        missing = [n for n in self.bind if n not in inputs]
        if missing:
            raise TdcError(f"missing input {', '.join(missing)}: tdc needs its value to fix the model's shapes")
        dims = dict(self.dims)
        for name, axis in self.free:
            if name not in inputs:
                raise TdcError(f"missing input {name}: its dim {axis} is symbolic, fixed by the array given")
            shape = np.shape(inputs[name]) if not isinstance(inputs[name], tuple) else inputs[name]
            if axis >= len(shape):
                raise TdcError(f"input {name}: a rank-{len(shape)} array, the model's has more than {axis} dims")
            dims[f"{name}:{axis}"] = int(shape[axis])
        values = {n: np.asarray(inputs[n]) for n in self.bind}
        key = (tuple((n, a, dims[f"{n}:{a}"]) for n, a in self.free)
               + tuple((n, v.dtype.str, v.shape, v.tobytes()) for n, v in values.items()))
        if key not in self.specializations:
            self.specializations[key] = _import(self.proto, dims, self.batch, {**self.constants, **values},
                                                self.backend, self.where)
        return self.specializations[key]

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        model = self.specialize(**inputs)
        return model(**{k: v for k, v in inputs.items() if k not in self.bind})

    def __repr__(self):
        return f"<SpecializingOnnxModel {self.proto.graph.name}: needs {self.needs()}>"


class _Node:
    """An ONNX node being converted, with the lookups converters need."""

    def __init__(self, imp: "_Importer", proto, index: int):
        self.imp, self.proto, self.op = imp, proto, proto.op_type
        self.label = proto.name or f"#{index}"
        self.where = f"node {proto.name!r} ({proto.op_type})" if proto.name else f"node #{index} ({proto.op_type})"
        self.attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}

    def fail(self, msg: str):
        raise TdcError(f"{self.where}: {msg}")

    def attr(self, name: str, default=None):
        v = self.attrs.get(name, default)
        return v.decode() if isinstance(v, bytes) else v

    def has(self, i: int) -> bool:
        return i < len(self.proto.input) and self.proto.input[i] != ""

    def x(self, i: int = 0) -> Value | None:
        """Input i as a tdc value (None when absent)."""
        return self.imp.value(self.proto.input[i]) if self.has(i) else None

    def xs(self) -> list[Value]:
        return [self.x(i) for i in range(len(self.proto.input)) if self.has(i)]

    def const(self, i: int, what: str) -> np.ndarray | None:
        """Input i's value, which tdc needs at import (None when absent)."""
        if not self.has(i):
            return None
        name = self.proto.input[i]
        got = self.imp.static.get(name, self.imp.weights.get(name))
        if got is None:
            self.fail(f"input {i} ({what}, {name!r}) must be a constant or initializer: tdc fixes shapes and "
                      "attributes at import (a graph input can be fixed with load(..., constants={...}))")
        return got

    def axes(self, i: int = 1) -> list[int] | None:
        """`axes` as an attribute (older opsets) or as input i (newer ones)."""
        if "axes" in self.attrs:
            return list(self.attrs["axes"])
        a = self.const(i, "axes")
        return None if a is None else [int(v) for v in a.reshape(-1)]

    def wants(self, i: int) -> bool:
        """Whether output i exists and something reads it."""
        return i < len(self.proto.output) and self.proto.output[i] in self.imp.used

    def emit(self, op: str, inputs: list[Value], **attrs) -> Value:
        return self.imp.graph.emit(op, inputs, attrs)[0]

    def scalar(self, value, like: Value) -> Value:
        return self.emit("constant", [], value=np.array(value, like.type.np_dtype))


class _Importer:
    def __init__(self, proto, dims: dict, batch: int | None, constants: dict):
        self.proto, self.dims, self.batch, self.constants = proto, dims, batch, constants
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.graph = Graph(proto.graph.name or "onnx")
        self.values: dict[str, Value] = {}
        self.static: dict[str, np.ndarray] = {}
        self.weights: dict[str, np.ndarray] = {}   # float initializers
        self.kinds: dict[str, str] = {}            # what each becomes: param, state or const
        self.params: dict[str, np.ndarray] = {}    # the weights used as data: the graph's params, state and consts
        self.used: set[str] = set()
        self.unsupported: dict[str, list[str]] = {}   # op -> the nodes using it, to list them all in one error
        self.missing: set[str] = set()                 # outputs of nodes that could not be converted

    def run(self) -> tuple[Graph, dict[str, np.ndarray]]:
        g = self.proto.graph
        if len(g.sparse_initializer):
            raise TdcError(f"sparse initializer {g.sparse_initializer[0].values.name!r} is not supported")
        for t in g.initializer:
            a = numpy_helper.to_array(t)
            (self.weights if _is_weight(a) else self.static)[t.name] = a
        self.kinds = _initializer_kinds(g, self.weights)
        inputs = {i.name: i for i in g.input}
        for name, value in self.constants.items():
            if name not in inputs:
                raise TdcError(f"constants: the model has no input {name!r}")
            tt = inputs[name].type.tensor_type
            self.static[name] = np.asarray(value, helper.tensor_dtype_to_np_dtype(tt.elem_type))
        for vi in g.input:
            if vi.name not in self.static and vi.name not in self.weights:   # old models list initializers as inputs
                self.values[vi.name] = self.graph.add_arg(vi.name, self.input_type(vi), "input")
        self.used = {name for n in g.node for name in n.input} | {o.name for o in g.output}
        failed = None   # the first error in a supported op; the nodes that do not depend on it go on
        for i, p in enumerate(g.node):
            n = _Node(self, p, i)
            if self.is_unsupported(n):
                self.unsupported.setdefault(p.op_type if _default_domain(p) else f"{p.domain}.{p.op_type}",
                                            []).append(n.label)
            elif self.missing.isdisjoint(p.input):
                try:
                    self.convert(n)
                    continue
                except TdcError as e:
                    failed = failed or e
            self.missing.update(name for name in p.output if name)
        if self.unsupported:
            raise TdcError(_unsupported_message(self.unsupported) + (f"; also {failed}" if failed else ""))
        if failed:
            raise failed
        for vi in g.output:
            v = self.value(vi.name)
            self.check_declared(vi, v)
            self.graph.add_output(vi.name, v)
        return self.graph, self.params

    def input_type(self, vi) -> TensorType:
        name = vi.name
        if not vi.type.HasField("tensor_type"):
            raise TdcError(f"input {name!r}: only tensor inputs are supported (not {vi.type.WhichOneof('value')})")
        tt = vi.type.tensor_type
        dtype = dtype_of(tt.elem_type, f"input {name!r}")
        if not tt.HasField("shape"):
            raise TdcError(f"input {name!r} has no shape (unknown rank): tdc needs static shapes")
        shape = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                if axis == 0 and self.batch is not None and d.dim_value != self.batch:
                    raise TdcError(f"input {name!r} has a fixed batch of {d.dim_value} in the file: --batch "
                                   f"{self.batch} cannot change it (run it at batch {d.dim_value}, or export the "
                                   f"model with a dynamic batch dim)")
                shape.append(d.dim_value)
                continue
            keys = ([d.dim_param] if d.dim_param else []) + [f"{name}:{axis}"]
            fixed = next((self.dims[k] for k in keys if k in self.dims), None)
            if fixed is None and axis == 0:
                fixed = self.batch
            if fixed is None:
                raise TdcError(f"input {name!r}: dim {axis} is dynamic ({d.dim_param or 'unnamed'}); tdc needs static "
                               f"shapes: fix it with dims={{{keys[0]!r}: N}}"
                               + (" or batch=N (--batch N on the command line)" if axis == 0 else ""))
            shape.append(int(fixed))
        return TensorType(dtype, tuple(shape))

    def check_declared(self, vi, v: Value):
        """The output type the model declares (where it does) must be what tdc inferred."""
        tt = vi.type.tensor_type
        if tt.elem_type and tt.elem_type in DTYPES and DTYPES[tt.elem_type] != v.type.dtype:
            raise TdcError(f"output {vi.name!r}: the model declares {DTYPES[tt.elem_type]}, tdc computed {v.type}")
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if len(dims) != v.type.rank or any(d is not None and d != s for d, s in zip(dims, v.type.shape)):
                raise TdcError(f"output {vi.name!r}: the model declares shape {dims}, tdc computed {v.type}")

    # ---- values --------------------------------------------------------------------
    def value(self, name: str) -> Value:
        if name in self.values:
            return self.values[name]
        if name in self.weights:
            a = self.weights[name]
            dtype = dtype_of(_onnx_dtype(a), f"initializer {name!r}")
            v = self.graph.add_arg(name, TensorType(dtype, a.shape), self.kinds[name])
            self.params[name] = a
        elif name in self.static:
            a = self.static[name]
            dtype_of(_onnx_dtype(a), f"constant {name!r}")
            v = self.graph.emit("constant", [], {"value": a})[0]
        else:
            raise TdcError(f"tensor {name!r} is used before it is computed (are the nodes in order?)")
        self.values[name] = v
        return v

    def foldable(self, p) -> bool:
        """Whether node p is evaluated at import: all its inputs are known then (and it is not random)."""
        ins = [name for name in p.input if name]
        # onnx's reference evaluator has no Resize before opset 11: its converter computes it then
        evaluable = not (p.op_type == "Resize" and self.opset < 11)
        return bool(ins) and evaluable and p.op_type not in _RANDOM_OPS and _default_domain(p) and all(
            name in self.static for name in ins)

    def is_unsupported(self, n: _Node) -> bool:
        return not _default_domain(n.proto) or (n.op not in CONVERTERS and not self.foldable(n.proto))

    def convert(self, n: _Node):
        p = n.proto
        if self.foldable(p):
            outs = self.fold(n)
        else:
            fn, allowed = CONVERTERS[p.op_type]
            for a in n.attrs:
                if a not in allowed:
                    n.fail(f"attribute {a!r} of {p.op_type} is not supported")
            try:
                outs = fn(n)
            except TdcError as e:
                if str(e).startswith(n.where):
                    raise
                raise TdcError(f"{n.where}: {e}") from None
        for name, out in zip(p.output, outs):
            if not name or out is None:
                continue
            if isinstance(out, Value):
                self.values[name] = out
            else:
                self.static[name] = np.asarray(out)
        for i, name in enumerate(p.output):
            if name and name in self.used and name not in self.values and name not in self.static:
                n.fail(f"output {i} ({name!r}) is not supported")

    def fold(self, n: _Node) -> list[np.ndarray]:
        from onnx.reference import ReferenceEvaluator
        node, feeds = n.proto, {name: self.static[name] for name in n.proto.input if name}
        if n.op == "Upsample" and "scales" in n.attrs:   # opset 7: the evaluator has opset 9's, with scales an input
            scales = node.input[0] + "_scales"
            feeds[scales] = np.array(n.attrs["scales"], np.float32)
            node = helper.make_node("Upsample", [node.input[0], scales], node.output, mode=n.attr("mode", "nearest"))
        outs = [name for name in node.output if name]
        # a one-node graph, not the bare node: the evaluator ignores `opsets` for a NodeProto and runs
        # the newest version of the op, which reads as inputs what older opsets give as attributes
        # (Unsqueeze's axes before opset 13, Pad's pads before 11, ...)
        graph = helper.make_graph([node], "fold", [helper.make_empty_tensor_value_info(k) for k in feeds],
                                  [helper.make_empty_tensor_value_info(k) for k in outs])
        try:
            got = dict(zip(outs, ReferenceEvaluator(graph, opsets={"": self.opset}).run(outs, feeds)))
        except Exception as e:
            n.fail(f"evaluating it at import failed ({type(e).__name__}: {e})")
        return [got.get(name) for name in n.proto.output]


def _default_domain(p) -> bool:
    return p.domain in ("", "ai.onnx")


def _unsupported_message(nodes: dict[str, list[str]]) -> str:
    """One line: each op with its node count and the first few node names."""
    def listed(labels):
        names = ", ".join(labels[:3]) + (", ..." if len(labels) > 3 else "")
        return f"{len(labels)} node{'s' if len(labels) > 1 else ''}: {names}"
    msg = "ONNX ops not supported by tdc: " + ", ".join(f"{op} ({listed(labels)})" for op, labels in nodes.items())
    if any("." in op for op in nodes):
        msg += "; tdc converts the ops of the default ONNX domain only"
    return msg


def _onnx_dtype(a: np.ndarray) -> int:
    try:
        return helper.np_dtype_to_tensor_dtype(a.dtype)
    except (KeyError, ValueError, TypeError):
        return TensorProto.UNDEFINED


# ---- converters -----------------------------------------------------------------------
# Each takes a _Node and returns its outputs (Values, static arrays, or None for outputs
# nobody reads). CONVERTERS: ONNX op -> (converter, the attributes it understands).

CONVERTERS: dict[str, tuple] = {}


def converter(*ops: str, attrs: tuple = ()):
    def deco(fn):
        for op in ops:
            CONVERTERS[op] = (fn, set(attrs))
        return fn
    return deco


_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Equal": "equal", "Less": "less",
           "Greater": "greater", "LessOrEqual": "less_equal", "GreaterOrEqual": "greater_equal"}
_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
          "Neg": "neg", "Abs": "abs", "Sign": "sign", "Erf": "erf"}


@converter(*_BINARY)
def _binary(n):
    return [n.emit(_BINARY[n.op], [n.x(0), n.x(1)])]


@converter(*_UNARY)
def _unary(n):
    return [n.emit(_UNARY[n.op], [n.x(0)])]


@converter("And", "Or", "Xor", "Not")
def _logical(n):
    # tdc has no bool arithmetic: min/max of bools as int8 are and/or; xor is "differ"; not is "== false"
    xs = n.xs()
    if n.op == "Not":
        return [n.emit("equal", [xs[0], n.scalar(False, xs[0])])]
    if n.op == "Xor":
        return [n.emit("not_equal", xs)]
    op = "minimum" if n.op == "And" else "maximum"
    y = n.emit(op, [n.emit("cast", [x], to="i8") for x in xs])
    return [n.emit("cast", [y], to="bool")]


@converter("Reciprocal")
def _reciprocal(n):
    x = n.x(0)
    return [n.emit("div", [n.scalar(1, x), x])]


@converter("Identity")
def _identity(n):
    return [n.x(0)]


@converter("LeakyRelu", attrs=("alpha",))
def _leaky_relu(n):
    return [n.emit("leaky_relu", [n.x(0)], alpha=n.attr("alpha", 0.01))]


@converter("Where")
def _where(n):
    return [n.emit("where", [n.x(0), n.x(1), n.x(2)])]


@converter("Max", "Min", "Sum", "Mean")
def _variadic(n):
    op = {"Max": "maximum", "Min": "minimum", "Sum": "add", "Mean": "add"}[n.op]
    xs = n.xs()
    y = xs[0]
    for x in xs[1:]:
        y = n.emit(op, [y, x])
    if n.op == "Mean" and len(xs) > 1:
        y = n.emit("div", [y, n.scalar(len(xs), y)])
    return [y]


@converter("Pow")
def _pow(n):
    x, e = n.x(0), n.x(1)
    if x.type.dtype not in ("f16", "f32", "f64"):
        # integer powers through f64 (exact while the results fit in 53 bits)
        y = n.emit("pow", [n.emit("cast", [x], to="f64"), n.emit("cast", [e], to="f64")])
        return [n.emit("cast", [y], to=x.type.dtype)]
    if e.type.dtype != x.type.dtype:
        e = n.emit("cast", [e], to=x.type.dtype)
    return [n.emit("pow", [x, e])]


@converter("Clip", attrs=("min", "max"))
def _clip(n):
    x = n.x(0)
    lo = n.scalar(n.attrs["min"], x) if "min" in n.attrs else n.x(1)
    hi = n.scalar(n.attrs["max"], x) if "max" in n.attrs else n.x(2)
    # max then min: when min > max every element becomes max, as ONNX specifies
    if lo is not None:
        x = n.emit("maximum", [x, lo])
    if hi is not None:
        x = n.emit("minimum", [x, hi])
    return [x]


@converter("Cast", attrs=("to", "saturate", "round_mode"))   # saturate, round_mode: only for float8/float4
def _cast(n):
    return [n.emit("cast", [n.x(0)], to=dtype_of(n.attr("to"), "Cast to"))]


@converter("CastLike", attrs=("saturate", "round_mode"))
def _cast_like(n):
    name = n.proto.input[1]
    if name in n.imp.static:
        to = dtype_of(_onnx_dtype(n.imp.static[name]), "CastLike target")
    else:
        to = n.x(1).type.dtype
    return [n.emit("cast", [n.x(0)], to=to)]


@converter("Constant", attrs=("value", "value_float", "value_floats", "value_int", "value_ints"))
def _constant(n):
    (name, v), = n.attrs.items()
    if name == "value":
        return [numpy_helper.to_array(v)]
    return [np.array(v, np.float32 if "float" in name else np.int64)]


@converter("Shape", attrs=("start", "end"))
def _shape(n):
    shape = n.x(0).type.shape
    end = n.attr("end", len(shape))
    return [np.array(shape[n.attr("start", 0):end], np.int64)]


@converter("Dropout", attrs=("ratio", "seed", "is_test"))
def _dropout(n):
    x = n.x(0)
    ratio = n.attr("ratio", 0.5)
    if n.has(1):
        ratio = float(n.const(1, "ratio"))
    training = bool(n.const(2, "training_mode")) if n.has(2) else False
    if n.imp.opset < 7 and not n.attr("is_test", 0):
        training = True
    if not training or ratio == 0.0:
        mask = n.emit("full", [], shape=x.type.shape, value=1.0, dtype="bool") if n.wants(1) else None
        return [x, mask]
    # tdc's dropout hashes (seed, step, index): ONNX leaves the generator to the runtime, so the
    # masks differ from other runtimes' but are the same on every tdc backend. The step counter
    # is the graph's `step` state, which training advances; plain calls reuse step 0's mask.
    seed = n.attr("seed", None)
    b = Builder(n.imp.graph)
    key = b.step().value
    if key.name not in n.imp.params:
        n.imp.params[key.name] = np.zeros((), np.int64)
    attrs = {"rate": float(ratio), "seed": int(seed) if seed is not None else b.seed_for(n.label)}
    y = n.emit("dropout", [x, key], **attrs)
    mask = None
    if n.wants(1):   # the kept elements: where dropout of ones is not zero
        ones = n.emit("full", [], shape=x.type.shape, value=1.0, dtype=x.type.dtype)
        kept = n.emit("dropout", [ones, key], **attrs)
        mask = n.emit("not_equal", [kept, n.scalar(0, kept)])
    return [y, mask]


# ---- linear algebra ---------------------------------------------------------------------

@converter("MatMul")
def _matmul(n):
    a, b = n.x(0), n.x(1)
    sa, sb = a.type.shape, b.type.shape
    if a.type.rank == 0 or b.type.rank == 0:
        n.fail("MatMul inputs must have rank >= 1")
    # numpy semantics: a vector is a [1,k] row on the left, a [k,1] column on the right, and
    # that dim is dropped from the result
    out = list(broadcast_shapes(sa[:-2], sb[:-2])) + list(sa[-2:-1]) + list(sb[-1:] if len(sb) >= 2 else [])
    a2 = n.emit("reshape", [a], shape=(1,) + sa) if a.type.rank == 1 else a
    b2 = n.emit("reshape", [b], shape=sb + (1,)) if b.type.rank == 1 else b
    y = n.emit("matmul", [a2, b2])
    return [y if y.type.shape == tuple(out) else n.emit("reshape", [y], shape=out)]


@converter("Gemm", attrs=("alpha", "beta", "transA", "transB"))
def _gemm(n):
    a, b, c = n.x(0), n.x(1), n.x(2)
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    ta, tb = n.attr("transA", 0), n.attr("transB", 0)
    if a.type.rank != 2 or b.type.rank != 2:
        n.fail(f"Gemm needs 2-D A and B, got {a.type} and {b.type}")
    out_features = b.type.shape[0] if tb else b.type.shape[1]
    if not ta and tb and alpha == 1.0 and (c is None or (beta == 1.0 and c.type.shape == (out_features,))):
        return [n.emit("linear", [a, b] + ([c] if c is not None else []))]
    if ta:
        a = n.emit("transpose", [a], perm=(1, 0))
    if tb:
        b = n.emit("transpose", [b], perm=(1, 0))
    y = n.emit("matmul", [a, b])
    if alpha != 1.0:
        y = n.emit("mul", [y, n.scalar(alpha, y)])
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = n.emit("mul", [c, n.scalar(beta, c)])
        y = n.emit("add", [y, c])
    return [y]


# ---- convolution and pooling ----------------------------------------------------------------

def _spatial_rank(n, x: Value, what: str) -> int:
    """2 or 3: the spatial dims of a window op's input (1-D inputs arrive lifted to 2-D)."""
    if x.type.rank not in (4, 5):
        d = x.type.rank - 2
        n.fail(f"only 1-D, 2-D and 3-D {what} (NCL, NCHW or NCDHW input) is supported; this is a {d}-D {what} "
               f"(input {x.type})")
    return x.type.rank - 2


# A 1-D window attribute as its 2-D form over a height of 1.
_LIFT_1D = {"kernel_shape": lambda v: [1] + v, "strides": lambda v: [1] + v, "dilations": lambda v: [1] + v,
            "output_padding": lambda v: [0] + v, "pads": lambda v: [0, v[0], 0, v[1]] if len(v) == 2 else v,
            "output_shape": lambda v: v[:-1] + [1] + v[-1:]}


def _one_d_as_2d(fn):
    """1-D convolution and pooling run as 2-D with a height of 1: the input [N, C, L] (and a
    convolution's weight [., ., k]) gets a unit dim before its last, each window attribute a
    leading 1 (pads 0), and the result loses the unit dim again. Gradients and every backend
    come with the 2-D ops."""
    @functools.wraps(fn)
    def run(n):
        if not n.has(0) or n.x(0).type.rank != 3:
            return fn(n)
        lifted = {}
        for i in (0, 1) if n.op in ("Conv", "ConvTranspose") else (0,):
            v = n.x(i)
            if v is not None and v.type.rank == 3:
                lifted[i] = n.emit("reshape", [v], shape=v.type.shape[:2] + (1,) + v.type.shape[2:])
        plain_x, plain_attrs = n.x, n.attrs
        n.x = lambda i=0: lifted[i] if i in lifted else plain_x(i)
        n.attrs = {k: _LIFT_1D[k](list(v)) if k in _LIFT_1D else v for k, v in plain_attrs.items()}
        try:
            outs = fn(n)
        finally:
            n.x, n.attrs = plain_x, plain_attrs
        return [n.emit("reshape", [y], shape=y.type.shape[:2] + y.type.shape[3:]) if y is not None else None
                for y in outs]
    return run


def _ints(n, name, default) -> tuple[int, ...]:
    return tuple(int(v) for v in n.attr(name, default))


def _window_pads(n, hw, kernel, strides, dilations) -> tuple[int, ...]:
    """The begins then the ends of the spatial dims from auto_pad and pads: ONNX's order, which is
    tdc's (top, left, bottom, right) in 2-D and the 3-D functions' (d, h, w) begins then ends."""
    auto = n.attr("auto_pad", "NOTSET")
    if auto == "NOTSET":
        return _ints(n, "pads", (0,) * (2 * len(hw)))
    if auto == "VALID":
        return (0,) * (2 * len(hw))
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        n.fail(f"auto_pad {auto!r} is not supported")
    lo, hi = [], []
    for size, k, s, d in zip(hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        lo.append(small if auto == "SAME_UPPER" else big)   # SAME_UPPER puts the odd pixel at the end
        hi.append(total - lo[-1])
    return tuple(lo + hi)


@converter("Conv", attrs=("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"))
@_one_d_as_2d
def _conv(n):
    x, w, b = n.x(0), n.x(1), n.x(2)
    r = _spatial_rank(n, x, "Conv")
    kernel = w.type.shape[2:]
    if "kernel_shape" in n.attrs and _ints(n, "kernel_shape", ()) != kernel:
        n.fail(f"kernel_shape {list(n.attrs['kernel_shape'])} does not match the weight {w.type}")
    strides, dil = _ints(n, "strides", (1,) * r), _ints(n, "dilations", (1,) * r)
    pad = _window_pads(n, x.type.shape[2:], kernel, strides, dil)
    if r == 3:
        geo = dict(stride=strides, pad=pad, dilation=dil, groups=n.attr("group", 1))
        problem = _conv3d_problem(x.type, w.type, None if b is None else b.type, **geo)
        if problem:
            n.fail(f"conv3d: {problem}")
        return [_composite(n, F.conv3d, x, w, b, **geo)]
    return [n.emit("conv2d", [x, w] + ([b] if b is not None else []), stride=strides, pad=pad, dilation=dil,
                   groups=n.attr("group", 1))]


@converter("ConvTranspose", attrs=("auto_pad", "dilations", "group", "kernel_shape", "output_padding",
                                  "output_shape", "pads", "strides"))
@_one_d_as_2d
def _conv_transpose(n):
    x, w, b = n.x(0), n.x(1), n.x(2)
    r = _spatial_rank(n, x, "ConvTranspose")
    if w.type.rank != r + 2:
        n.fail(f"the weight must be [Cin, Cout/group, {'kd, ' if r == 3 else ''}kh, kw], got {w.type}")
    kernel = w.type.shape[2:]
    if "kernel_shape" in n.attrs and _ints(n, "kernel_shape", ()) != kernel:
        n.fail(f"kernel_shape {list(n.attrs['kernel_shape'])} does not match the weight {w.type}")
    strides, dil = _ints(n, "strides", (1,) * r), _ints(n, "dilations", (1,) * r)
    extra = _ints(n, "output_padding", (0,) * r)
    auto = n.attr("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        n.fail(f"auto_pad {auto!r} is not supported")
    want = _ints(n, "output_shape", ())
    if len(want) == r + 2:   # some writers include N and C, which the spec leaves out
        want = want[2:]
    if want or auto in ("SAME_UPPER", "SAME_LOWER"):
        if not want:   # SAME: the output is the input times the stride
            want = tuple(size * s for size, s in zip(x.type.shape[2:], strides))
        if len(want) != r or len(strides) != r or len(dil) != r or len(extra) != r:
            n.fail(f"output_shape {list(want)}, strides, dilations and output_padding need {r} values each")
        lo, hi = [], []
        for size, k, s, d, e, out in zip(x.type.shape[2:], kernel, strides, dil, extra, want):
            # the spec's split; a negative total (an output past the scattered rows) adds zero rows
            total = s * (size - 1) + e + (k - 1) * d + 1 - out
            lo.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
            hi.append(total - lo[-1])
        pad = tuple(lo + hi)
    elif auto == "VALID":
        pad = (0,) * (2 * r)
    else:
        pad = _ints(n, "pads", (0,) * (2 * r))
        if min(pad, default=0) < 0:
            n.fail(f"pads {list(pad)} must be >= 0")
    geo = dict(stride=strides, pad=pad, output_padding=extra, dilation=dil, groups=n.attr("group", 1))
    problem = _conv_transpose_problem(x.type, w.type, None if b is None else b.type, **geo, rank=r + 2)
    fn = F.conv_transpose2d if r == 2 else F.conv_transpose3d
    if problem:
        n.fail(f"{fn.__name__}: {problem}")
    return [_composite(n, fn, x, w, b, **geo)]


_POOL_ATTRS = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides")


def _pool_geometry(n, x):
    r = x.type.rank - 2
    kernel = _ints(n, "kernel_shape", ())
    strides, dil = _ints(n, "strides", (1,) * r), _ints(n, "dilations", (1,) * r)
    pad = _window_pads(n, x.type.shape[2:], kernel, strides, dil)
    return dict(kernel=kernel, stride=strides, pad=pad, ceil_mode=bool(n.attr("ceil_mode", 0))), dil


@converter("MaxPool", attrs=_POOL_ATTRS + ("storage_order",))
@_one_d_as_2d
def _maxpool(n):
    x = n.x(0)
    r = _spatial_rank(n, x, "MaxPool")
    order = n.attr("storage_order", 0)
    if order not in (0, 1):
        n.fail(f"storage_order must be 0 or 1, not {order!r}")
    geo, dil = _pool_geometry(n, x)
    if n.wants(1):
        if r == 3:
            n.fail("the Indices output of a 3-D MaxPool is not supported (1-D and 2-D are)")
        return _composite(n, F.maxpool2d, x, dilation=dil, return_indices=True, storage_order=order, **geo)
    if r == 3:
        problem = _pool_problem(x.type, geo["kernel"], geo["stride"], geo["pad"], dil, geo["ceil_mode"], True, 5,
                                ints=True)
        if problem:
            n.fail(f"maxpool3d: {problem}")
        return [_composite(n, F.maxpool3d, x, dilation=dil, **geo)]
    return [n.emit("maxpool2d", [x], dilation=dil, **geo)]


@converter("AveragePool", attrs=_POOL_ATTRS + ("count_include_pad",))
@_one_d_as_2d
def _avgpool(n):
    x = n.x(0)
    r = _spatial_rank(n, x, "AveragePool")
    geo, dil = _pool_geometry(n, x)
    include = bool(n.attr("count_include_pad", 0))
    if r == 2 and dil == (1, 1):
        return [n.emit("avgpool2d", [x], count_include_pad=include, **geo)]
    # 3-D or dilated: a composite of slices, adds and a constant divisor
    problem = _pool_problem(x.type, geo["kernel"], geo["stride"], geo["pad"], dil, geo["ceil_mode"], not include,
                            r + 2)
    fn = F.avgpool2d if r == 2 else F.avgpool3d
    if problem:
        n.fail(f"{fn.__name__}: {problem}")
    return [_composite(n, fn, x, dilation=dil, count_include_pad=include, **geo)]


@converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(n):
    x = n.x(0)
    if n.op == "GlobalAveragePool" and x.type.rank == 4:
        return [n.emit("global_avgpool", [x])]
    op = "reduce_mean" if n.op == "GlobalAveragePool" else "reduce_max"
    return [n.emit(op, [x], axes=tuple(range(2, x.type.rank)), keepdims=True)]


@converter("BatchNormalization", attrs=("epsilon", "momentum", "training_mode", "spatial"))
def _batchnorm(n):
    if n.attr("spatial", 1) != 1:
        n.fail("spatial=0 is not supported")
    training = bool(n.attr("training_mode", 0))
    if not training and any(n.wants(i) for i in range(1, 5)):
        n.fail("the running/saved statistics outputs exist only in training mode (training_mode=1, opset >= 14)")
    attrs = dict(eps=n.attr("epsilon", 1e-5), momentum=n.attr("momentum", 0.9))
    ins = [n.x(i) for i in range(5)]
    if training:
        return n.imp.graph.emit("batchnorm", ins, dict(attrs, training=True))
    return [n.emit("batchnorm", ins, **attrs)]


@converter("LRN", attrs=("alpha", "beta", "bias", "size"))
def _lrn(n):
    x = n.x(0)
    if "size" not in n.attrs:
        n.fail("attribute 'size' is required")
    a = dict(size=n.attr("size"), alpha=n.attr("alpha", 1e-4), beta=n.attr("beta", 0.75), bias=n.attr("bias", 1.0))
    problem = _lrn_problem(x.type, **a)
    if problem:
        n.fail(f"{problem} (input {x.type})")
    return [_composite(n, F.lrn, x, **a)]


def _composite(n, fn, *xs, **attrs):
    """The outputs of the DSL composite fn (F.lrn, F.gelu, ...) on input values xs, recorded in the
    graph being imported; a shape error becomes the node's."""
    g = n.imp.graph
    first = len(g.nodes)
    try:
        with Builder(g) as b:
            out = fn(*[Tensor(x, b) if isinstance(x, Value) else x for x in xs], **attrs)
    except ShapeError as e:
        n.fail(str(e))
    for node in g.nodes[first:]:
        node.loc = None   # the Builder saw the caller of load(); these nodes come from the file
    return [t.value for t in out] if isinstance(out, (list, tuple)) else out.value


@converter("Gelu", attrs=("approximate",))
def _gelu(n):
    approximate = n.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        n.fail(f"approximate must be 'none' or 'tanh', not {approximate!r}")
    return [_composite(n, F.gelu, n.x(0), approximate=approximate)]


@converter("LayerNormalization", attrs=("axis", "epsilon", "stash_type"))
def _layer_norm(n):
    # stash_type=1 (float32 statistics) is what tdc computes for f32; f64 inputs keep f64
    y, mean, inv = _composite(n, F.layer_norm, n.x(0), n.x(1), n.x(2), axis=n.attr("axis", -1),
                              eps=n.attr("epsilon", 1e-5), stats=True)
    return [y, mean, inv]


# ---- resizing ---------------------------------------------------------------------------------

_RESIZE_ATTRS = ("antialias", "axes", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside",
                 "extrapolation_value", "keep_aspect_ratio_policy", "mode", "nearest_mode")


def _floats(a) -> list[float] | None:
    """An optional float input's values; an empty tensor (how exporters skip roi or scales) is absent."""
    return None if a is None or a.size == 0 else [float(v) for v in a.reshape(-1)]


@converter("Resize", "Upsample", attrs=_RESIZE_ATTRS + ("scales",))
def _resize(n):
    x = n.x(0)
    old = n.op == "Upsample" or n.imp.opset < 11   # Resize-10 is Upsample: asymmetric, scales only
    if n.op == "Upsample" and "scales" in n.attrs:
        scales, sizes, roi = [float(v) for v in n.attrs["scales"]], None, None
    elif old:
        scales, sizes, roi = _floats(n.const(1, "scales")), None, None
    else:
        roi, scales = _floats(n.const(1, "roi")), _floats(n.const(2, "scales"))
        sizes = n.const(3, "sizes")
        sizes = None if sizes is None or sizes.size == 0 else [int(v) for v in sizes.reshape(-1)]
    mode = n.attr("mode", "nearest")
    if n.op == "Upsample" and mode == "bilinear":   # opset 7's name for it
        mode = "linear"
    axes = n.attr("axes", None)
    axes = list(range(x.type.rank)) if axes is None else [int(a) + x.type.rank * (a < 0) for a in axes]
    ctm = "asymmetric" if old else n.attr("coordinate_transformation_mode", "half_pixel")
    if ctm != "tf_crop_and_resize":
        roi = None   # the spec: roi only matters there
    elif roi is not None and len(roi) == 2 * x.type.rank and len(axes) < x.type.rank:
        roi = [roi[a] for a in axes] + [roi[x.type.rank + a] for a in axes]
    elif roi is None:
        n.fail("tf_crop_and_resize needs the roi input")
    a = dict(sizes=sizes, scales=scales, mode=mode, axes=axes, coordinate_transformation_mode=ctm,
             nearest_mode="floor" if old else n.attr("nearest_mode", "round_prefer_floor"),
             cubic_coeff_a=n.attr("cubic_coeff_a", -0.75), exclude_outside=bool(n.attr("exclude_outside", 0)),
             antialias=bool(n.attr("antialias", 0)),
             keep_aspect_ratio_policy=n.attr("keep_aspect_ratio_policy", "stretch"), roi=roi,
             extrapolation_value=n.attr("extrapolation_value", 0.0))
    problem = _resize_problem(x.type, sizes, scales, axes, mode, ctm, a["nearest_mode"],
                              a["keep_aspect_ratio_policy"], a["antialias"], roi)
    if problem:
        n.fail(f"{problem} (input {x.type})")
    if old and mode == "nearest":
        # no nearest_mode before opset 11: onnxruntime rounds down where it upsamples and up where it
        # downsamples; the axes are independent, so that is two resizes
        for up in (True, False):
            picked = [j for j, s in enumerate(scales) if (s >= 1) == up]
            if picked:
                x = _composite(n, F.resize, x, **dict(a, scales=[scales[j] for j in picked],
                                                      axes=[axes[j] for j in picked],
                                                      nearest_mode="floor" if up else "ceil"))
        return [x]
    return [_composite(n, F.resize, x, **a)]


# ---- reductions and softmax ---------------------------------------------------------------

@converter("ReduceSum", "ReduceMean", "ReduceMax", attrs=("axes", "keepdims", "noop_with_empty_axes"))
def _reduce(n):
    x = n.x(0)
    axes = n.axes(1)
    if not axes:
        if n.attr("noop_with_empty_axes", 0):
            return [x]
        axes = None
    keep = bool(n.attr("keepdims", 1))
    op = {"ReduceSum": "reduce_sum", "ReduceMean": "reduce_mean", "ReduceMax": "reduce_max"}[n.op]
    if op == "reduce_max" and x.type.dtype == "bool":
        # the max of bools is their "any"; tdc reduces numbers only
        y = n.emit(op, [n.emit("cast", [x], to="i8")], axes=axes, keepdims=keep)
        return [n.emit("cast", [y], to="bool")]
    return [n.emit(op, [x], axes=axes, keepdims=keep)]


@converter("ReduceMin", attrs=("axes", "keepdims", "noop_with_empty_axes"))
def _reduce_min(n):
    x = n.x(0)
    axes = n.axes(1)
    if not axes and n.attr("noop_with_empty_axes", 0):
        return [x]
    keep = bool(n.attr("keepdims", 1))
    if x.type.dtype == "bool":     # the min of bools is their "all"
        y = _composite(n, F.min, n.emit("cast", [x], to="i8"), axes or None, keep)
        return [n.emit("cast", [y], to="bool")]
    return [_composite(n, F.min, x, axes or None, keep)]


@converter("ArgMax", attrs=("axis", "keepdims", "select_last_index"))
def _argmax(n):
    return [_composite(n, F.argmax, n.x(0), n.attr("axis", 0), bool(n.attr("keepdims", 1)),
                       bool(n.attr("select_last_index", 0)))]


@converter("Softmax", "LogSoftmax", attrs=("axis",))
def _softmax(n):
    x = n.x(0)
    op = "softmax" if n.op == "Softmax" else "log_softmax"
    if n.imp.opset >= 13:
        return [n.emit(op, [x], axis=n.attr("axis", -1))]
    # before opset 13 the input is coerced to 2-D [prod(dims < axis), prod(dims >= axis)]
    y = n.emit(op, [n.emit("flatten", [x], axis=n.attr("axis", 1))], axis=1)
    return [n.emit("reshape", [y], shape=x.type.shape)]


# ---- shapes ------------------------------------------------------------------------------

@converter("Flatten", attrs=("axis",))
def _flatten(n):
    return [n.emit("flatten", [n.x(0)], axis=n.attr("axis", 1))]


@converter("Reshape", attrs=("allowzero", "shape"))
def _reshape(n):
    x = n.x(0)
    shape = list(n.attrs["shape"]) if "shape" in n.attrs else [int(d) for d in n.const(1, "shape")]
    if not n.attr("allowzero", 0):   # 0 copies the input's dim
        if any(d == 0 for d in shape[x.type.rank:]):
            n.fail(f"shape {shape} copies (0) a dim that the input {x.type} does not have")
        shape = [x.type.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [n.emit("reshape", [x], shape=shape)]


@converter("Transpose", attrs=("perm",))
def _transpose(n):
    x = n.x(0)
    return [n.emit("transpose", [x], perm=n.attr("perm", tuple(reversed(range(x.type.rank)))))]


@converter("Concat", attrs=("axis",))
def _concat(n):
    return [n.emit("concat", n.xs(), axis=n.attr("axis"))]


@converter("Squeeze", attrs=("axes",))
def _squeeze(n):
    x = n.x(0)
    shape = x.type.shape
    axes = n.axes(1)
    drop = {a % len(shape) for a in axes} if axes else {i for i, d in enumerate(shape) if d == 1}
    if any(shape[a] != 1 for a in drop):
        n.fail(f"cannot squeeze axes {axes} of {x.type}: their size is not 1")
    return [n.emit("reshape", [x], shape=[d for i, d in enumerate(shape) if i not in drop])]


@converter("Unsqueeze", attrs=("axes",))
def _unsqueeze(n):
    x = n.x(0)
    axes = n.axes(1)
    if axes is None:
        n.fail("axes is required")
    rank = x.type.rank + len(axes)
    new = {a % rank for a in axes}
    dims = iter(x.type.shape)
    return [n.emit("reshape", [x], shape=[1 if i in new else next(dims) for i in range(rank)])]


@converter("Split", attrs=("axis", "split", "num_outputs"))
def _split(n):
    x = n.x(0)
    axis = n.attr("axis", 0)
    if not -x.type.rank <= axis < x.type.rank:
        n.fail(f"axis {axis} is out of range for {x.type}")
    d = x.type.shape[axis]
    if "split" in n.attrs:
        sizes = list(n.attrs["split"])
    elif n.has(1):
        sizes = [int(v) for v in n.const(1, "split")]
    else:      # equal parts: one per output (opset < 18), or num_outputs, the last one smaller
        parts = n.attr("num_outputs", len(n.proto.output))
        step = -(-d // parts)
        sizes = [min(step, d - i * step) for i in range(parts)]
    return _composite(n, F.split, x, sizes, axis)


@converter("Gather", attrs=("axis",))
def _gather(n):
    return [n.emit("gather", [n.x(0), n.x(1)], axis=n.attr("axis", 0))]


@converter("Expand")
def _expand(n):
    x = n.x(0)
    shape = broadcast_shapes(x.type.shape, tuple(int(d) for d in n.const(1, "shape")))
    return [n.emit("broadcast_to", [x], shape=shape)]


def _slice_axis(n, x: Value, axis: int, start: int, end: int) -> Value:
    starts, ends = [0] * x.type.rank, list(x.type.shape)
    starts[axis], ends[axis] = start, end
    return n.emit("slice", [x], starts=starts, ends=ends, steps=[1] * x.type.rank)


@converter("Slice", attrs=("starts", "ends", "axes"))
def _slice(n):
    x = n.x(0)
    shape = x.type.shape
    if "starts" in n.attrs:   # opset < 10
        starts, ends, axes, steps = n.attr("starts"), n.attr("ends"), n.attr("axes"), None
    else:
        starts, ends = n.const(1, "starts"), n.const(2, "ends")
        axes, steps = n.const(3, "axes"), n.const(4, "steps")
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    lo, hi, st = [0] * len(shape), list(shape), [1] * len(shape)
    backwards = {}   # axis -> the indices a negative step picks, in order
    for a, s, e, step in zip(axes, starts, ends, steps):
        a, s, e, step = int(a) % len(shape), int(s), int(e), int(step)
        d = shape[a]
        if step == 0:
            n.fail(f"step 0 on axis {a}")
        if step < 0:   # the spec clamps start to [0, d-1] and end to [-1, d-1] going backwards
            picked = range(min(max(s + d if s < 0 else s, 0), d - 1), min(max(e + d if e < 0 else e, -1), d - 1), step)
            if not picked:
                n.fail(f"the slice of axis {a} (of {d}) from {s} to {e} by {step} is empty: tdc has no empty tensors")
            backwards[a] = np.array(picked, np.int64)
            continue
        s = min(max(s + d if s < 0 else s, 0), d)
        e = min(max(e + d if e < 0 else e, 0), d)
        lo[a], hi[a], st[a] = s, max(s, e), step
    y = x if (lo, hi, st) == ([0] * len(shape), list(shape), [1] * len(shape)) else \
        n.emit("slice", [x], starts=lo, ends=hi, steps=st)
    for a, picked in backwards.items():   # reversed order is a gather (its gradient a scatter-add)
        y = n.emit("gather", [y, n.emit("constant", [], value=picked)], axis=a)
    return [y]


@converter("Pad", attrs=("mode", "pads", "value", "paddings"))
def _pad(n):
    x = n.x(0)
    r = x.type.rank
    if "pads" in n.attrs or "paddings" in n.attrs:   # opset < 11
        pads, value, axes = list(n.attrs.get("pads", n.attrs.get("paddings"))), n.attr("value", 0.0), None
    else:
        pads = [int(p) for p in n.const(1, "pads")]
        v = n.const(2, "constant_value")
        value = 0.0 if v is None or v.size == 0 else v.reshape(-1)[0].item()
        axes = n.const(3, "axes")
    if axes is not None:   # pads given for these axes only
        full = [0] * (2 * r)
        for j, a in enumerate(int(a) % r for a in axes):
            full[a], full[a + r] = pads[j], pads[j + len(axes)]
        pads = full
    if len(pads) != 2 * r:
        n.fail(f"pads has {len(pads)} entries; a rank-{r} input needs {2 * r}")
    if any(p < 0 for p in pads):   # negative pads crop
        starts = [max(0, -p) for p in pads[:r]]
        ends = [d - max(0, -p) for d, p in zip(x.type.shape, pads[r:])]
        x = n.emit("slice", [x], starts=starts, ends=ends, steps=[1] * r)
        pads = [max(0, p) for p in pads]
    mode = n.attr("mode", "constant")
    if mode == "constant":
        return [n.emit("pad", [x], pads=pads, value=float(value)) if any(pads) else x]
    if mode not in ("reflect", "edge", "wrap"):
        n.fail(f"mode {mode!r} is not supported")
    for a in range(r):   # tdc's pad is constant-only: the other modes concatenate slices of x, axis by axis
        if pads[a] or pads[a + r]:
            x = _pad_axis(n, x, a, pads[a], pads[a + r], mode)
    return [x]


def _pad_axis(n, x: Value, a: int, before: int, after: int, mode: str) -> Value:
    d = x.type.shape[a]
    if d == 0 or (mode == "reflect" and max(before, after) >= d) or (mode == "wrap" and max(before, after) > d):
        n.fail(f"{mode} pads {before},{after} do not fit axis {a} of {x.type}")
    if mode == "edge":
        def repeat(i, k):
            return n.emit("broadcast_to", [_slice_axis(n, x, a, i, i + 1)],
                          shape=x.type.shape[:a] + (k,) + x.type.shape[a + 1:])
        head = [repeat(0, before)] if before else []
        tail = [repeat(d - 1, after)] if after else []
    elif mode == "reflect":   # mirrored around the edge elements, which are not repeated
        head = [_slice_axis(n, x, a, i, i + 1) for i in range(before, 0, -1)]
        tail = [_slice_axis(n, x, a, d - 1 - i, d - i) for i in range(1, after + 1)]
    else:
        head = [_slice_axis(n, x, a, d - before, d)] if before else []
        tail = [_slice_axis(n, x, a, 0, after)] if after else []
    return n.emit("concat", head + [x] + tail, axis=a)
