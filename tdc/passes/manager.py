"""Passes and pipelines.

A pass is a named function Graph -> Graph that must not mutate its input. A
pipeline is a list of passes, printable as text ("pipeline(dce,cse)") and
parsed from "dce,cse". `PassContext` verifies after every pass when asked,
times each pass, and dumps the IR after a named pass or after all of them
(LLVM's -print-after / -print-after-all).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import TdcError
from ..ir.graph import Graph


@dataclass
class Pass:
    name: str
    fn: Callable[[Graph], Graph]
    doc: str = ""

    def __call__(self, graph: Graph) -> Graph:
        return self.fn(graph)


PASSES: dict[str, Pass] = {}


def register_pass(name: str, doc: str = ""):
    def deco(fn):
        PASSES[name] = Pass(name, fn, doc or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


def get_pass(name: str) -> Pass:
    _load_passes()
    if name not in PASSES:
        raise TdcError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def _load_passes():
    from . import simplify  # noqa: F401  (registers dce, cse)
    from . import algebra, data_parallel, fold, fuse  # noqa: F401  (registers simplify, bnfold, schedule_comm, fold, fuse)


@dataclass
class PassContext:
    verify: bool = True
    dump_after: set[str] | str = field(default_factory=set)  # pass names, or "all"
    dump: Callable[[str, Graph], None] | None = None            # called with (pass name, graph)
    timings: list[tuple[str, float]] = field(default_factory=list)

    def wants_dump(self, name: str) -> bool:
        return self.dump is not None and (self.dump_after == "all" or name in self.dump_after)


class Pipeline:
    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    @staticmethod
    def parse(text: str) -> "Pipeline":
        """'dce,cse' or 'pipeline(dce,cse)'."""
        t = text.strip()
        if t.startswith("pipeline(") and t.endswith(")"):
            t = t[len("pipeline("):-1]
        names = [n.strip() for n in t.split(",") if n.strip()]
        return Pipeline([get_pass(n) for n in names])

    def __str__(self) -> str:
        return f"pipeline({','.join(p.name for p in self.passes)})"

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        for p in self.passes:
            t0 = time.perf_counter()
            graph = p(graph)
            ctx.timings.append((p.name, time.perf_counter() - t0))
            if ctx.verify:
                from ..ir.verify import verify
                try:
                    verify(graph)
                except TdcError as e:
                    raise TdcError(f"after pass {p.name}: {e}") from None
            if ctx.wants_dump(p.name):
                ctx.dump(p.name, graph)
        return graph
