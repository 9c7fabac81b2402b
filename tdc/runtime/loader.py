"""Loading models named on the command line: FILE.py[:NAME] (a Python file with @tdc.model
functions) or FILE.tdc (saved IR text)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys

from ..errors import TdcError
from ..frontend.model import Model
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


class Source:
    """Where a graph comes from: a traceable model, or a fixed graph read from a file."""

    def __init__(self, spec: str):
        self.spec = spec
        self.model: Model | None = None
        self.fixed: Graph | None = None
        path = spec.partition(":")[0]
        if path.endswith(".tdc"):
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
            raise TdcError(f"{spec}: expected a Python model file (FILE.py[:NAME]) or IR text (FILE.tdc)")

    @property
    def name(self) -> str:
        return self.model.name if self.model else self.fixed.name

    def graph(self, batch: int | None = None, training: bool = False) -> Graph:
        if self.model is not None:
            return self.model.trace(batch, training)
        if batch is not None:
            raise TdcError(f"{self.spec}: --batch does not apply to an IR file (its shapes are fixed)")
        return self.fixed
