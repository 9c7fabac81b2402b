"""Turning a Python function into a Graph.

    @tdc.model(batch=64)
    def lenet(x: tdc.f32["B", 1, 28, 28]):
        h = nn.conv2d(x, 6, 5, pad=2).relu()
        return nn.linear(h.flatten(), 10)

    graph = lenet.trace()              # inference graph at batch 64
    graph = lenet.trace(batch=1)       # the IR is statically shaped: one trace per batch size
    graph = lenet.trace(training=True) # batchnorm uses batch statistics, dropout is active

Each parameter annotation gives an input's dtype and shape; the string "B" is the batch size.
"""
from __future__ import annotations

import inspect

from ..errors import TdcError
from ..ir.graph import Graph
from ..ir.types import DTYPES, TensorType
from ..ops.tensor import Builder, Tensor


class InputSpec:
    def __init__(self, dtype: str, dims: tuple):
        self.dtype, self.dims = dtype, dims

    def type_for(self, batch: int, name: str) -> TensorType:
        shape = []
        for d in self.dims:
            if d == "B":
                shape.append(batch)
            elif isinstance(d, int) and not isinstance(d, bool) and d >= 0:
                shape.append(d)
            else:
                raise TdcError(f"input {name}: dimension {d!r} must be a non-negative int or \"B\" (the batch size)")
        return TensorType(self.dtype, tuple(shape))

    def __repr__(self):
        return f"{self.dtype}[{', '.join(map(repr, self.dims))}]"


class DTypeSpec:
    """`tdc.f32["B", 784]` describes an input of dtype f32 and shape [batch, 784]."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, dims) -> InputSpec:
        return InputSpec(self.name, dims if isinstance(dims, tuple) else (dims,))

    def __repr__(self):
        return self.name


DTYPE_SPECS = {name: DTypeSpec(name) for name in DTYPES}


class Model:
    def __init__(self, fn, batch: int = 1, name: str | None = None):
        self.fn = fn
        self.batch = batch
        self.name = name or fn.__name__
        self.__doc__ = fn.__doc__
        self.specs = self._input_specs()

    def _input_specs(self) -> dict[str, InputSpec]:
        specs = {}
        for p in inspect.signature(self.fn).parameters.values():
            ann = p.annotation
            if isinstance(ann, str):   # from __future__ import annotations
                ann = eval(ann, self.fn.__globals__, {**DTYPE_SPECS})
            if not isinstance(ann, InputSpec):
                raise TdcError(f"model {self.name}: parameter {p.name} needs an annotation like "
                               f"tdc.f32[\"B\", 784] giving its dtype and shape")
            specs[p.name] = ann
        return specs

    def input_types(self, batch: int | None = None) -> dict[str, TensorType]:
        b = self.batch if batch is None else batch
        return {n: s.type_for(b, n) for n, s in self.specs.items()}

    def trace(self, batch: int | None = None, training: bool = False) -> Graph:
        b = self.batch if batch is None else batch
        if not isinstance(b, int) or b < 1:
            raise TdcError(f"batch size must be a positive integer, got {b!r}")
        g = Graph(self.name)
        with Builder(g, training) as builder:
            args = [builder.arg(n, t, "input") for n, t in self.input_types(b).items()]
            try:
                result = self.fn(*args)
            except TdcError:
                raise
            except Exception as e:      # the model function's own mistake: say where, not "internal error"
                raise user_error(e, f"while tracing model {self.name}") from e
            _set_outputs(g, result, self.name)
        return g

    def __repr__(self):
        ins = ", ".join(f"{n}: {s}" for n, s in self.specs.items())
        return f"<tdc model {self.name}({ins}), batch {self.batch}>"


def user_error(e: Exception, when: str) -> TdcError:
    """A one-line error for an exception raised in the user's code: the innermost frame outside
    tdc (file:line), the exception, and when it happened."""
    import os
    import traceback
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not os.path.abspath(f.filename).startswith(pkg + os.sep) and "importlib" not in f.filename]
    where = f"{os.path.relpath(frames[-1].filename)}:{frames[-1].lineno}: " if frames else ""
    return TdcError(f"{where}{type(e).__name__}: {e} ({when}; an error in the model's code, not in tdc)")


def _set_outputs(g: Graph, result, name: str):
    if isinstance(result, Tensor):
        items = [("out", result)]
    elif isinstance(result, dict):
        items = list(result.items())
    elif isinstance(result, (tuple, list)):
        items = [(f"out{i}", r) for i, r in enumerate(result)]
    else:
        raise TdcError(f"model {name} must return a tensor, a tuple of tensors or a dict of them, "
                       f"not {type(result).__name__}")
    for out_name, t in items:
        if not isinstance(t, Tensor):
            raise TdcError(f"model {name}: output {out_name} is a {type(t).__name__}, not a tensor")
        g.add_output(str(out_name), t.value)


def model(fn=None, *, batch: int = 1, name: str | None = None):
    """Decorator: make a traceable model from a function whose parameters are annotated inputs."""
    if fn is None:
        return lambda f: Model(f, batch, name)
    return Model(fn, batch, name)
