"""Backends share one interface: `exe = tdc.compile(graph, backend=...)`, `outputs = exe(**inputs)`."""
from __future__ import annotations

from ..errors import TdcError

BACKENDS = ("reference", "numba", "llvm")


def compile(graph, backend: str = "reference", params=None, seed: int = 0):
    """Compile `graph` for `backend`. Params, consts and state come from `params` (name -> array)
    and, for any not given, from their initializers seeded with `seed`."""
    if backend == "reference":
        from .reference import ReferenceExecutable
        return ReferenceExecutable(graph, params, seed)
    if backend == "numba":
        from .numba import NumbaExecutable
        return NumbaExecutable(graph, params, seed)
    if backend == "llvm":
        from .llvm import LLVMExecutable
        return LLVMExecutable(graph, params, seed)
    raise TdcError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
