"""Input arrays for `tdc run`: reading .npy files and making seeded random inputs."""
from __future__ import annotations

import os

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, Value


def read_npy(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise TdcError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TdcError(f"{path}: not a valid .npy file ({e})") from None


def label_range(graph: Graph, arg: Value) -> int | None:
    """The number of classes when an integer input is used as labels/indices, else None."""
    for n in graph.nodes:
        if n.op == "softmax_cross_entropy" and n.inputs[1] is arg:
            return n.inputs[0].type.shape[1]
        if n.op == "one_hot" and n.inputs[0] is arg:
            return n.attrs["depth"]
    return None


def random_inputs(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded data of the right shape and dtype for every input: standard normal floats,
    integers in [0, classes) when used as labels (else [0, 10)), random bools."""
    rng = np.random.default_rng(seed)
    out = {}
    for a in graph.inputs:
        t = a.type
        if t.dtype.startswith("f"):
            x = rng.standard_normal(t.shape)
        elif t.dtype == "bool":
            x = rng.random(t.shape) < 0.5
        else:
            x = rng.integers(0, label_range(graph, a) or 10, t.shape)
        out[a.name] = np.asarray(x).astype(t.np_dtype)
    return out
