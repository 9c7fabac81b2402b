"""What an op is, and the registry every stage looks ops up in.

An `OpDef` holds an op's attributes (with defaults and validation), its shape
and dtype inference (which the verifier also uses), its numpy reference
semantics, its gradient rule (a VJP written in tdc ops) and its cost. The op
families in `tdc.ops` define them and fill the registry when `tdc.ops` is
imported (importing `tdc` does it); the IR only looks them up by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ShapeError, TdcError
from .types import DTYPES, TensorType, is_storage

REQUIRED = object()
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "dtype", "tensor")


@dataclass
class Attr:
    kind: str
    default: Any = REQUIRED
    choices: tuple | None = None   # allowed values for str attributes
    length: int | None = None      # fixed length for ints/floats; a scalar is repeated
    optional: bool = False         # None is a valid value (e.g. axes=None: all axes)
    doc: str = ""

    def normalize(self, value, where: str):
        if value is None:
            if self.optional:
                return None
            raise ShapeError(f"{where} must be given")
        k = self.kind
        try:
            if k == "int":
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise ValueError("an integer")
                return int(value)
            if k == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                    raise ValueError("a number")
                return float(value)
            if k == "bool":
                if not isinstance(value, (bool, np.bool_)):
                    raise ValueError("true or false")
                return bool(value)
            if k in ("str", "dtype"):
                if not isinstance(value, str):
                    raise ValueError("a string")
                allowed = tuple(DTYPES) if k == "dtype" else self.choices
                if allowed and value not in allowed:
                    raise ValueError("one of " + ", ".join(repr(c) for c in allowed))
                return value
            if k in ("ints", "floats"):
                scalar = int if k == "ints" else float
                if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                    if self.length is None:
                        raise ValueError("a list")
                    value = [value] * self.length
                if isinstance(value, np.ndarray):
                    value = value.tolist()
                if not isinstance(value, (list, tuple)):
                    raise ValueError("a list")
                out = []
                for x in value:
                    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
                        raise ValueError(f"a list of {'integers' if k == 'ints' else 'numbers'}")
                    if k == "ints" and not float(x).is_integer():
                        raise ValueError("a list of integers")
                    out.append(scalar(x))
                if self.length is not None and len(out) != self.length:
                    raise ValueError(f"a list of {self.length}")
                return tuple(out)
            if k == "tensor":
                arr = np.array(value)   # a private copy: the caller may mutate theirs
                if arr.dtype not in DTYPES.values():
                    raise ShapeError(f"{where}: unsupported dtype {arr.dtype}; tdc supports {', '.join(DTYPES)}")
                arr.flags.writeable = False
                return arr
        except ValueError as e:
            raise ShapeError(f"{where} must be {e}, got {value!r}") from None
        raise TdcError(f"internal: unknown attribute kind {k}")


def _key(v):
    # repr keeps -0.0 apart from 0.0 and makes nan equal to nan; the type tag keeps 1, 1.0 and True apart
    if isinstance(v, np.ndarray):
        return ("tensor", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, (tuple, list)):
        return tuple(_key(x) for x in v)
    if isinstance(v, float):
        return ("f", repr(v))
    return (type(v).__name__, v)


def attrs_key(attrs: dict) -> tuple:
    """A hashable form of normalized attributes (for CSE and equality)."""
    return tuple((k, _key(attrs[k])) for k in sorted(attrs))


@dataclass
class OpDef:
    name: str
    family: str
    infer: Callable                     # (in_types, **attrs) -> TensorType | list[TensorType]
    ref: Callable                       # (*arrays, **attrs) -> array | tuple of arrays
    arity: tuple[int, int | None] = (1, 1)   # (min, max); max None = variadic
    attrs: dict[str, Attr] = field(default_factory=dict)
    grad: Callable | None = None        # (ctx, *input tensors) -> list of input grads (or None)
    cost: Callable | None = None        # (in_types, out_types, **attrs) -> flops
    nondiff: tuple[int, ...] = ()       # input positions that never get a gradient (labels, keys)
    side_effect: bool = False           # never removed by DCE (send)
    collective: bool = False            # ref runs over all simulated ranks at once
    storage: bool = False               # moves or casts elements without arithmetic: takes bf16
    doc: str = ""

    def normalize_attrs(self, attrs: dict) -> dict:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            known = ", ".join(self.attrs) or "none"
            raise ShapeError(f"{self.name}: unknown attribute {sorted(unknown)[0]!r} (it takes: {known})")
        out = {}
        for name, spec in self.attrs.items():
            if name in attrs:
                out[name] = spec.normalize(attrs[name], f"{self.name}: attribute {name}")
            elif spec.default is REQUIRED:
                raise ShapeError(f"{self.name}: attribute {name!r} is required")
            else:
                out[name] = spec.default
        return out

    def infer_types(self, in_types: list[TensorType], attrs: dict) -> list[TensorType]:
        lo, hi = self.arity
        n = len(in_types)
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            raise ShapeError(f"{self.name} takes {want} inputs, got {n}")
        self._check_storage(in_types)    # before infer, whose own dtype checks would say less
        try:
            out = self.infer(in_types, **attrs)
        except ShapeError as e:
            raise ShapeError(f"{self.name}: {e} (inputs: {', '.join(map(str, in_types)) or 'none'})") from None
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        self._check_storage(out)         # one_hot(dtype=bf16): bf16 out of other dtypes
        return out

    def _check_storage(self, types: list[TensorType]):
        if self.storage:
            return
        for t in types:
            if is_storage(t.dtype):
                raise ShapeError(f"{self.name} on {t.dtype}: {t.dtype} is a storage dtype, moved and cast "
                                 f"but not computed on; cast to f32 first (tdc.cast(x, 'f32'))")

    def non_default_attrs(self, attrs: dict) -> dict:
        """The attributes that differ from their defaults (what the printer shows)."""
        out = {}
        for k, v in attrs.items():
            if k not in self.attrs:
                raise ShapeError(f"{self.name}: unknown attribute {k!r}")
            d = self.attrs[k].default
            if d is REQUIRED or attrs_key({k: v}) != attrs_key({k: d}):
                out[k] = v
        return out


_REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in _REGISTRY:
        raise TdcError(f"internal: op {opdef.name} registered twice")
    _REGISTRY[opdef.name] = opdef
    return opdef


def defop(name: str, family: str, **kw) -> OpDef:
    return register(OpDef(name=name, family=family, **kw))


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ShapeError(f"unknown op {name!r}") from None


def all_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)
