"""Weights files (.npz) and atomic writes."""
from __future__ import annotations

import os
import tempfile
import zipfile

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph


def atomic_write(path: str, write) -> None:
    """Call write(file_object) on a temp file beside `path`, then rename it over `path`,
    so a crash never leaves a half-written file where a good one was."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path) + "-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Arrays by name from a .npz file, or from a native executable's weights file."""
    if not os.path.exists(path):
        raise TdcError(f"{path}: no such file")
    from ..backends.llvm.weights_file import is_weights_file, read_weights
    if is_weights_file(path):
        return read_weights(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise TdcError(f"{path}: not a readable .npz weights file ({e})") from None


def save_weights(path: str, values: dict[str, np.ndarray]) -> None:
    save_npz(path, values)


def load_weights(path: str, graph: Graph, strict: bool = True) -> dict[str, np.ndarray]:
    """The params, consts and state of `graph` from `path`, checked by name, shape and dtype.
    With strict=False, args missing from the file are left out (they get initialised)."""
    data = load_npz(path)
    out = {}
    for a in graph.args:
        if a.kind == "input":
            continue
        if a.name not in data:
            if strict and a.kind != "state":
                raise TdcError(f"{path}: no value for {a.kind} {a.name} ({a.type})")
            continue
        x = data[a.name]
        if x.shape != a.type.shape:
            raise TdcError(f"{path}: {a.kind} {a.name} has shape {list(x.shape)}, the model needs {list(a.type.shape)}")
        if x.dtype != a.type.np_dtype:
            raise TdcError(f"{path}: {a.kind} {a.name} has dtype {x.dtype}, the model needs {a.type.dtype}")
        out[a.name] = x
    return out
