"""Tracing: `Tensor`s record the ops applied to them into a `Graph` through a `Builder`.

Shapes and dtypes are checked as each op is recorded; an error names the op,
the input types and the user's source line.
"""
from __future__ import annotations

import os
import sys
import zlib

import numpy as np

from ..errors import ShapeError, TdcError
from ..ir.graph import Graph, Value
from ..ir.types import TensorType, dtype_name

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_builders: list["Builder"] = []


def user_location() -> str | None:
    """file:line of the innermost stack frame outside the tdc package."""
    f = sys._getframe(1)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if not fn.startswith(_PKG_DIR + os.sep) and "importlib" not in fn:
            return f"{os.path.relpath(fn) if not fn.startswith('<') else fn}:{f.f_lineno}"
        f = f.f_back
    return None


class Builder:
    """Builds one Graph. Knows whether it traces training or inference, and names layers."""

    def __init__(self, graph: Graph, training: bool = False):
        self.graph = graph
        self.training = training
        self._counters: dict[str, int] = {}
        self._consts: dict[tuple, Value] = {}

    # The builder in use by nn helpers and constants; set by `with builder:`.
    @staticmethod
    def current() -> "Builder":
        if not _builders:
            raise TdcError("no graph is being built: call tdc ops inside a @tdc.model function or `with Builder(...)`")
        return _builders[-1]

    def __enter__(self):
        _builders.append(self)
        return self

    def __exit__(self, *exc):
        _builders.pop()

    def fresh_name(self, kind: str) -> str:
        """conv1, conv2, ... per layer kind, for layers the user did not name."""
        k = self._counters.get(kind, 0) + 1
        self._counters[kind] = k
        return f"{kind}{k}"

    def arg(self, name: str, type: TensorType, kind: str, **attrs) -> "Tensor":
        if kind != "input" and any(a.name == name for a in self.graph.args):
            loc = user_location()
            layer = name.rsplit(".", 1)[0]
            raise TdcError(f"{loc + ': ' if loc else ''}layer name {layer!r} is used twice in model "
                           f"{self.graph.name} (it already has {kind} {name}): give each layer its own name=")
        return Tensor(self.graph.add_arg(name, type, kind, attrs), self)

    def find_arg(self, name: str) -> "Tensor | None":
        for a in self.graph.args:
            if a.name == name:
                return Tensor(a, self)
        return None

    def param(self, name: str, shape, init: str, dtype: str = "f32", kind: str = "param") -> "Tensor":
        return self.arg(name, TensorType(dtype, tuple(shape)), kind, init=init)

    def step(self) -> "Tensor":
        """The training step counter (i64 state named `step`), created on first use."""
        found = self.find_arg("step")
        return found if found is not None else self.arg("step", TensorType("i64", ()), "state", init="zeros")

    def seed_for(self, name: str) -> int:
        """A stable per-layer seed, so adding a layer does not change the others' randomness."""
        return zlib.crc32(name.encode()) & 0x7FFFFFFF

    def apply(self, op: str, inputs, attrs: dict | None = None) -> "Tensor | tuple[Tensor, ...]":
        vals = [self.value_of(x, i, inputs) for i, x in enumerate(inputs)]
        loc = user_location()
        try:
            outs = self.graph.emit(op, vals, attrs or {}, loc=loc)
        except ShapeError as e:
            raise ShapeError(f"{loc}: {e}" if loc else str(e)) from None
        ts = tuple(Tensor(v, self) for v in outs)
        return ts[0] if len(ts) == 1 else ts

    def constant(self, value, dtype: str | None = None) -> "Tensor":
        arr = np.asarray(value, dtype=None if dtype is None else TensorType(dtype, ()).np_dtype)
        if dtype is None and arr.dtype == np.float64:
            arr = arr.astype(np.float32)   # Python floats are f32 unless asked otherwise
        dtype_name(arr.dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            (v,) = self.graph.emit("constant", [], {"value": arr}, loc=user_location())
            self._consts[key] = v
        return Tensor(self._consts[key], self)

    def value_of(self, x, i: int = 0, peers=()) -> Value:
        """The IR value for an op input; Python numbers take the dtype of a tensor beside them."""
        if isinstance(x, Tensor):
            if x.builder.graph is not self.graph:
                raise TdcError("a tensor from another graph was used here")
            return x.value
        if isinstance(x, Value):
            return x
        # prefer a non-bool neighbour: in where(cond, x, 0.0) the 0.0 takes x's dtype
        tensors = [p for p in peers if isinstance(p, Tensor)]
        like = next((p for p in tensors if p.dtype != "bool"), tensors[0] if tensors else None)
        if isinstance(x, (bool, int, float, np.number)) and like is not None:
            dt = like.dtype
            if isinstance(x, float) and not dt.startswith("f"):
                dt = "f32"
            return self.constant(x, dt).value
        if isinstance(x, (bool, int, float, np.number, np.ndarray, list)):
            return self.constant(x).value
        raise TdcError(f"cannot use {type(x).__name__} as a tensor")


class Tensor:
    """A value in the graph being traced, with operators and methods for the ops."""
    __slots__ = ("value", "builder")
    __array_priority__ = 1000   # make numpy scalars defer to our operators

    def __init__(self, value: Value, builder: Builder):
        self.value = value
        self.builder = builder

    @property
    def type(self) -> TensorType:
        return self.value.type

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.type.shape

    @property
    def dtype(self) -> str:
        return self.value.type.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def name(self) -> str | None:
        return self.value.name

    def __repr__(self) -> str:
        return f"Tensor({self.name or '?'}: {self.type})"

    def __bool__(self):
        loc = user_location()
        raise TdcError(f"{loc + ': ' if loc else ''}a traced tensor has no truth value (its value is known only "
                       "when the graph runs): use tdc.where(cond, a, b) instead of `if`, `and`, `or`")

    def _ap(self, op, *others, **attrs):
        return self.builder.apply(op, [self, *others], attrs)

    def _rap(self, op, other):
        return self.builder.apply(op, [other, self])

    # arithmetic
    def __add__(self, o): return self._ap("add", o)
    def __radd__(self, o): return self._rap("add", o)
    def __sub__(self, o): return self._ap("sub", o)
    def __rsub__(self, o): return self._rap("sub", o)
    def __mul__(self, o): return self._ap("mul", o)
    def __rmul__(self, o): return self._rap("mul", o)
    def __truediv__(self, o): return self._ap("div", o)
    def __rtruediv__(self, o): return self._rap("div", o)
    def __pow__(self, o): return self._ap("pow", o)
    def __rpow__(self, o): return self._rap("pow", o)
    def __matmul__(self, o): return self._ap("matmul", o)
    def __rmatmul__(self, o): return self._rap("matmul", o)
    def __neg__(self): return self._ap("neg")
    def __pos__(self): return self
    def __abs__(self): return self._ap("abs")

    # comparisons give bool tensors
    def __lt__(self, o): return self._ap("less", o)
    def __le__(self, o): return self._ap("less_equal", o)
    def __gt__(self, o): return self._ap("greater", o)
    def __ge__(self, o): return self._ap("greater_equal", o)
    def eq(self, o): return self._ap("equal", o)
    def ne(self, o): return self._ap("not_equal", o)
    __hash__ = object.__hash__

    # methods: thin wrappers over tdc.ops.functional
    def __getattr__(self, name):
        from . import functional as F
        fn = getattr(F, name, None)
        if fn is None or name.startswith("_") or not callable(fn):
            raise AttributeError(f"Tensor has no attribute {name!r}")
        return lambda *a, **k: fn(self, *a, **k)

    def __getitem__(self, idx):
        from . import functional as F
        return F.getitem(self, idx)

    @property
    def T(self):
        from . import functional as F
        return F.transpose(self, tuple(range(self.ndim))[::-1])
