"""Input arrays for `tdc run`: reading .npy files and making seeded random inputs."""
from __future__ import annotations

import os

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, Value


def read_npy(path: str) -> np.ndarray:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise TdcError(f"{path}: no such file")
    if os.path.isdir(path):
        raise TdcError(f"{path}: is a directory, not a .npy file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:4] == b"PK\x03\x04":
        raise TdcError(f"{path}: is a .npz archive (several arrays); an input is one .npy file (np.save)")
    if magic != b"\x93NUMPY":
        raise TdcError(f"{path}: not a .npy file (it does not start with the .npy magic)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TdcError(f"{path}: not a valid .npy file ({e})") from None


def read_input(path: str, arg: Value) -> np.ndarray:
    """An input file for `arg`, checked as the native executable checks it: the dtype exactly, and
    the shape, or a whole file of samples (any number of rows, the other dims as the input's),
    which `run_in_batches` runs batch by batch."""
    x = read_npy(path)
    t = arg.type
    if t.dtype == "bf16" and x.dtype == np.dtype("V2"):
        x = x.view(t.np_dtype)    # .npy has no bfloat16: np.save writes its two bytes as '<V2'
    if x.dtype != t.np_dtype:
        raise TdcError(f"input {arg.name}: expected {t}, got {x.dtype} {list(x.shape)} from {path} "
                       f"(convert it: np.save(..., x.astype({'ml_dtypes' if t.dtype == 'bf16' else 'np'}."
                       f"{t.np_dtype.name})))")
    if x.shape != t.shape and not (t.rank >= 1 and x.ndim == t.rank and x.shape[1:] == t.shape[1:] and len(x)):
        raise TdcError(f"input {arg.name}: expected {t}, got {list(x.shape)} from {path}"
                       + (" (dim 0 may hold any number of samples)" if t.rank >= 1 else ""))
    return x


def run_in_batches(exe, graph: Graph, given: dict) -> tuple[dict, int]:
    """Run `exe` on inputs that may hold more (or fewer) samples than the graph's batch: batch by
    batch, the last one padded with zeros, the per-sample outputs joined and the padding dropped.
    Returns (outputs, number of batches)."""
    whole = {a.name for a in graph.inputs if a.type.rank >= 1 and np.shape(given[a.name]) != a.type.shape}
    if not whole:
        return exe(**given), 1
    rows = {len(given[n]) for n in whole}
    if len(rows) > 1:
        raise TdcError(f"inputs {', '.join(sorted(whole))} hold different numbers of samples ({sorted(rows)})")
    n = rows.pop()
    batch = {a.name: a.type.shape[0] for a in graph.inputs if a.name in whole}
    if len(set(batch.values())) > 1:
        raise TdcError(f"inputs {', '.join(sorted(whole))} have different batch sizes: run them one batch at a time")
    b = next(iter(batch.values()))
    not_per_sample = [name for name, v in graph.outputs if v.type.rank == 0 or v.type.shape[0] != b]
    if not_per_sample:
        raise TdcError(f"output {not_per_sample[0]} is not per sample (its dim 0 is not the batch {b}): "
                       f"give inputs of exactly one batch")
    parts: dict[str, list] = {name: [] for name, _ in graph.outputs}
    for start in range(0, n, b):
        feed = dict(given)
        for name in whole:
            chunk = np.asarray(given[name][start:start + b])
            if len(chunk) < b:
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            feed[name] = chunk
        for name, x in exe(**feed).items():
            parts[name].append(x[:min(b, n - start)])
    return {name: np.concatenate(xs) for name, xs in parts.items()}, -(-n // b)


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
        if t.dtype.startswith("f") or t.dtype == "bf16":
            x = rng.standard_normal(t.shape)
        elif t.dtype == "bool":
            x = rng.random(t.shape) < 0.5
        else:
            x = rng.integers(0, label_range(graph, a) or 10, t.shape)
        out[a.name] = np.asarray(x).astype(t.np_dtype)
    return out
