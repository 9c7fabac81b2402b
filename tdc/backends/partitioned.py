"""A partitioned step on a compiled backend: this process runs its rank's program.

`tdc.compile(graph, backend="numba"|"llvm")` of a graph placed on K ranks (passes/partition.py)
compiles, in each of the K processes of an MPI job, the program of that process's rank
(lower/ranks.py) and returns this wrapper: it takes the step's inputs (using those its rank
reads), returns the outputs its rank holds (rank 0 holds them all: the partition routes them
there), and `gather_state()` collects every rank's params and state at rank 0 for saving and
evaluating.
"""
from __future__ import annotations

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph
from ..lower.ranks import rank_program
from .comm import check_world, communicator
from .executable import graph_ranks, initial_state


COMPILE_TIMEOUT = 900.0      # seconds every rank may take to compile its program


class PartitionedExecutable:
    def __init__(self, graph: Graph, backend: str, params: dict | None = None, seed: int = 0,
                 autotune: bool = False, progress=None):
        from . import compile as compile_graph
        self.global_graph = graph
        self.backend = backend
        self.world = graph_ranks(graph)
        self.comm = communicator()
        check_world(self.world, self.comm)
        self.rank = self.comm.rank
        self.program = rank_program(graph, self.rank, self.world)
        full = initial_state(graph, params, seed)       # every rank draws the same values
        mine = {a.name: full[a.name] for a in self.program.graph.args if a.kind != "input"}
        self.exe = compile_graph(self.program.graph, backend=backend, params=mine, seed=seed, autotune=autotune,
                                 progress=progress)
        # the ranks' programs differ and so do their compile times (a minute for numba's, cold):
        # the step's first messages must not wait for a slower rank's compile under the step's timeout
        self.comm.barrier("compiling its part of the step", timeout=max(COMPILE_TIMEOUT, self.comm.timeout))
        self.inputs = {a.name for a in self.program.graph.inputs}
        self.graph_inputs = {a.name for a in graph.inputs}

    @property
    def state(self) -> dict[str, np.ndarray]:
        """This rank's params and state."""
        return self.exe.state

    def set_state(self, values: dict[str, np.ndarray]) -> None:
        """Replace params or state by name; each rank takes those it holds."""
        known = {a.name for a in self.global_graph.args if a.kind != "input"}
        unknown = set(values) - known
        if unknown:
            raise TdcError(f"no param or state named {sorted(unknown)[0]!r}")
        self.exe.set_state({k: v for k, v in values.items() if k in self.exe.state})

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        unknown = set(inputs) - self.graph_inputs
        if unknown:
            raise TdcError(f"unknown input {sorted(unknown)[0]!r}; the step takes: "
                           + ", ".join(f"{a.name}: {a.type}" for a in self.global_graph.inputs))
        return self.exe(**{k: v for k, v in inputs.items() if k in self.inputs})

    def comm_stats(self) -> tuple[int, float]:
        return self.exe.comm_stats()

    def gather_state(self) -> dict[str, np.ndarray] | None:
        """At rank 0: every param and state of the step, each from a rank that updates it (None on
        the other ranks). Every rank must call it."""
        updated = set(self.program.updated)
        sent = {k: v for k, v in self.exe.state.items() if k in updated or self.rank == 0}
        got = self.comm.gather_arrays(sent)
        if got is None:
            return None
        return {k: np.asarray(v).reshape(a.type.shape) for a in self.global_graph.args if a.kind != "input"
                for k, v in [(a.name, got.get(a.name))] if v is not None}
