"""Backends share one interface: `exe = tdc.compile(graph, backend=...)`, `outputs = exe(**inputs)`."""
from __future__ import annotations

from ..errors import TdcError

BACKENDS = ("reference", "numba", "llvm")


def compile(graph, backend: str = "reference", params=None, seed: int = 0, conv_algo: str = "auto",
            autotune: bool = False, progress=None, profile: bool = False):
    """Compile `graph` for `backend`; the executable is ready to run when this returns (every
    kernel compiled, or loaded from the on-disk cache). Params, consts and state come from `params`
    (name -> array) and, for any not given, from their initializers seeded with `seed`. `conv_algo`
    asks for a convolution algorithm wherever a layer asks for none (the conv_algo pass resolves
    it); `autotune` times the candidates on the backend instead of using the cost model.
    `progress(done, total)` hears how the numba backend's kernel compilation goes. `profile`
    (llvm only) times every kernel of the step: see `kernel_times()` and tdc.runtime.profile."""
    if profile and backend != "llvm":
        raise TdcError(f"profiling times the kernels of the llvm backend, not the {backend} backend: "
                       "use --backend llvm (the default)")
    if conv_algo != "auto":
        from ..passes.conv_algo import request_conv_algo
        graph = request_conv_algo(graph, conv_algo)
    if backend in ("numba", "llvm"):
        from ..lower.ranks import is_partitioned
        if is_partitioned(graph):     # this process runs its rank's program (an MPI job of K ranks)
            if profile:
                raise TdcError("profiling times one process's step; a partitioned step runs on several ranks")
            from .partitioned import PartitionedExecutable
            return PartitionedExecutable(graph, backend, params, seed, autotune=autotune, progress=progress)
    if backend == "reference":
        from .reference import ReferenceExecutable
        return ReferenceExecutable(graph, params, seed)
    if backend == "numba":
        from .numba import NumbaExecutable
        return NumbaExecutable(graph, params, seed, autotune=autotune, progress=progress)
    if backend == "llvm":
        from .llvm import LLVMExecutable
        return LLVMExecutable(graph, params, seed, autotune=autotune, profile=profile)
    raise TdcError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")


def get_target(backend: str):
    """The Target of a compiled backend (numba or llvm): what the compile pipeline's passes
    know of it (passes/target.py)."""
    if backend == "numba":
        from .numba.target import TARGET
        return TARGET
    if backend == "llvm":
        from .llvm.target import TARGET
        return TARGET
    raise TdcError(f"no compile target for backend {backend!r}; choose numba or llvm")
