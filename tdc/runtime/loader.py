"""Loading models named on the command line: FILE.py[:NAME] (a Python file with @tdc.model
functions), FILE.tdc (saved IR text) or FILE.onnx (an ONNX model; its initializers are the weights)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys

import numpy as np

from ..errors import TdcError
from ..frontend.model import Model, user_error
from ..ir.graph import Graph


def _import_file(path: str):
    name = "tdc_user_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TdcError(f"{path}: cannot be imported as Python")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(mod)
    except TdcError:
        raise
    except SyntaxError as e:
        raise TdcError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:      # the model file's own mistake (an import that fails, 1 / 0): not tdc's
        raise user_error(e, "while importing the model file") from e
    finally:
        sys.path.pop(0)
    return mod


def load_model(spec: str) -> Model:
    path, _, name = spec.partition(":")
    if not os.path.exists(path):
        raise TdcError(f"{path}: no such file")
    mod = _import_file(path)
    models = {k: v for k, v in vars(mod).items() if isinstance(v, Model)}
    if not models:
        raise TdcError(f"{path} defines no @tdc.model function")
    if name:
        if name not in models:
            raise TdcError(f"{path} has no model {name!r}; it defines: {', '.join(models)}")
        return models[name]
    if len(models) > 1:
        raise TdcError(f"{path} defines several models ({', '.join(models)}): pick one with {path}:NAME")
    return next(iter(models.values()))


def parse_binds(items: list[str]) -> dict[str, np.ndarray]:
    """--bind NAME=FILE.npy or NAME=V,V,... (numbers) -> {NAME: array}."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise TdcError(f"--bind {item}: expected NAME=FILE.npy or NAME=V,V,...")
        if name in out:
            raise TdcError(f"--bind {name} is given twice")
        if value.endswith(".npy"):
            from .inputs import read_npy
            out[name] = read_npy(value)
            continue
        try:
            nums = [float(v) for v in value.split(",")]
        except ValueError:
            raise TdcError(f"--bind {item}: {value!r} is neither a .npy file nor numbers separated by commas") from None
        out[name] = np.array([int(v) for v in nums] if all(v.is_integer() for v in nums) else nums)
    return out


class Source:
    """Where a graph comes from: a traceable model, or a fixed graph read from a file.
    `params` holds the weights the file brings (an ONNX model's initializers, once `graph()`
    has imported it), else None."""

    def __init__(self, spec: str, bind: list[str] | None = None):
        self.spec = spec
        self.bind = parse_binds(bind or [])
        self.model: Model | None = None
        self.fixed: Graph | None = None
        self.onnx_path: str | None = None
        self.params: dict | None = None
        path = spec.partition(":")[0]
        if path.endswith(".onnx"):
            if not os.path.exists(path):
                raise TdcError(f"{path}: no such file")
            self.onnx_path = path   # imported by graph(): --batch may be needed to fix its batch dim
        elif self.bind:
            raise TdcError(f"--bind fixes inputs of ONNX models; {spec} is not one")
        elif path.endswith(".tdc"):
            from ..ir.parser import parse_graph
            from ..ir.verify import verify
            if not os.path.exists(path):
                raise TdcError(f"{path}: no such file")
            with open(path, encoding="utf-8", errors="replace") as f:
                self.fixed = parse_graph(f.read(), source=path)
            verify(self.fixed)
        elif path.endswith(".py"):
            self.model = load_model(spec)
        else:
            raise TdcError(f"{spec}: expected a Python model file (FILE.py[:NAME]), IR text (FILE.tdc) "
                           "or an ONNX model (FILE.onnx)")

    @property
    def name(self) -> str:
        if self.model:
            return self.model.name
        return self.fixed.name if self.fixed else os.path.basename(self.onnx_path)

    def graph(self, batch: int | None = None, training: bool = False) -> Graph:
        if self.model is not None:
            return self.model.trace(batch, training)
        if self.onnx_path:
            from ..onnx import load
            m = load(self.onnx_path, batch=batch, constants=self.bind)   # inference: training does not apply
            self.fixed, self.params = m.graph, m.params
            return self.fixed
        if batch is not None:
            raise TdcError(f"{self.spec}: --batch does not apply to an IR file (its shapes are fixed)")
        return self.fixed

    def split_batch(self, batch: int | None, parallel) -> int | None:
        """The batch to trace at: with data parallelism (`parallel`, a DataParallel) the batch of
        one rank, batch / ranks, `batch` being the global batch (by default the model's own); a
        pipeline's micro-batch. A fixed graph's batch is already that."""
        if parallel is not None and self.model is not None:
            return parallel.split_batch(batch or self.model.batch)
        return batch

    def training_graph(self, batch: int | None = None, parallel=None) -> Graph:
        """The training-mode graph one rank runs (see split_batch)."""
        return self.graph(self.split_batch(batch, parallel), training=True)
