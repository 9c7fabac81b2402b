"""Seeded initialisation of params, consts and state from the `init` attribute of each argument.

Each argument gets its own random stream, derived from (seed, its name), so the
values of one param do not depend on which other params the model has.
"""
from __future__ import annotations

import zlib

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, Value
from ..ir.types import TensorType


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) for a weight laid out [out, in, *kernel] (linear and conv alike)."""
    if len(shape) < 2:
        n = shape[0] if shape else 1
        return n, n
    receptive = int(np.prod(shape[2:], dtype=np.int64))
    return shape[1] * receptive, shape[0] * receptive


def _he_normal(rng, shape):
    return rng.normal(0.0, np.sqrt(2.0 / fans(shape)[0]), shape)


def _he_uniform(rng, shape):
    lim = np.sqrt(6.0 / fans(shape)[0])
    return rng.uniform(-lim, lim, shape)


def _glorot_uniform(rng, shape):
    fi, fo = fans(shape)
    lim = np.sqrt(6.0 / (fi + fo))
    return rng.uniform(-lim, lim, shape)


def _glorot_normal(rng, shape):
    fi, fo = fans(shape)
    return rng.normal(0.0, np.sqrt(2.0 / (fi + fo)), shape)


def _lecun_uniform(rng, shape):
    # PyTorch's default for Linear and Conv layers (kaiming_uniform with a=sqrt(5) is this)
    lim = np.sqrt(1.0 / fans(shape)[0])
    return rng.uniform(-lim, lim, shape)


INITIALIZERS = {
    "he_normal": _he_normal,
    "he_uniform": _he_uniform,
    "glorot_uniform": _glorot_uniform,
    "glorot_normal": _glorot_normal,
    "lecun_uniform": _lecun_uniform,
    "normal": lambda rng, shape: rng.normal(0.0, 0.01, shape),
    "uniform": lambda rng, shape: rng.uniform(-0.05, 0.05, shape),
    "zeros": lambda rng, shape: np.zeros(shape),
    "ones": lambda rng, shape: np.ones(shape),
}


def init_value(arg: Value, seed: int) -> np.ndarray:
    init = arg.attrs.get("init", "zeros" if arg.kind == "state" else None)
    if init is None:
        raise TdcError(f"{arg.kind} {arg.name} has no initializer and no value was given (load weights for it)")
    if init not in INITIALIZERS:
        raise TdcError(f"{arg.kind} {arg.name}: unknown initializer {init!r}; known: {', '.join(INITIALIZERS)}")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(arg.name.encode())])
    return np.asarray(INITIALIZERS[init](rng, arg.type.shape)).astype(arg.type.np_dtype)


def init_params(graph: Graph, seed: int = 0, only_missing: dict | None = None) -> dict[str, np.ndarray]:
    """Values for every non-input argument (params, consts, state) not in `only_missing`. An arg
    with init="piece" is part of param `of`, whether given or drawn: elements [start, stop) of
    its flattened value (a parameter server's piece) or, with `axis`, of that axis (a tensor-
    parallel piece; a whole param not in the graph is drawn from its `whole_init` and
    `whole_shape`, as one process would draw it)."""
    have = only_missing or {}
    out = {a.name: init_value(a, seed) for a in graph.args
           if a.kind != "input" and a.name not in have and a.attrs.get("init") != "piece"}
    wholes: dict[str, np.ndarray] = {}
    for a in graph.args:
        if a.name in have or a.attrs.get("init") != "piece":
            continue
        of = a.attrs["of"]
        whole = have.get(of, out.get(of, wholes.get(of)))
        if whole is None and "whole_shape" in a.attrs:
            whole = wholes[of] = init_value(Value(TensorType(a.type.dtype, tuple(a.attrs["whole_shape"])), name=of,
                                                  kind=a.kind, attrs={"init": a.attrs["whole_init"]}), seed)
        if whole is None:
            raise TdcError(f"{a.kind} {a.name} is a piece of {a.attrs['of']}, which has no value")
        whole = np.asarray(whole)
        if "axis" in a.attrs:
            part = np.take(whole, np.arange(a.attrs["start"], a.attrs["stop"]), axis=a.attrs["axis"])
        else:
            part = whole.reshape(-1)[a.attrs["start"]:a.attrs["stop"]]
        out[a.name] = part.astype(a.type.np_dtype)
    return out


def whole_params(graph: Graph, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`values` (by arg name) with the tensor-parallel pieces of each param put back together
    under the param's own name (their optimizer state too, as NAME.m, ...), the pieces dropped:
    what one process would hold."""
    groups: dict[str, list[Value]] = {}
    for a in graph.args:
        if a.attrs.get("init") == "piece" and "axis" in a.attrs:
            groups.setdefault(a.attrs["of"], []).append(a)
    out = dict(values)
    for of, parts in groups.items():
        parts.sort(key=lambda a: a.attrs["start"])
        axis = parts[0].attrs["axis"]
        suffixes = {""} | {k[len(parts[0].name):] for k in values if k.startswith(parts[0].name + ".")}
        for suffix in suffixes:
            names = [p.name + suffix for p in parts]
            if all(n in values for n in names):
                out[of + suffix] = np.concatenate([np.asarray(values[n]) for n in names], axis=axis)
                for n in names:
                    out.pop(n, None)
    return out
