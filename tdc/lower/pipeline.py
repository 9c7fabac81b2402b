"""The compile pipeline every compiled backend runs before it renders a kernel plan.

    graph -> bnfold, fold, simplify, cse, dce -> conv_algo (for the target) -> schedule_comm -> fuse
          -> build_plan (kernels) + plan_memory (buffers) -> the backend renders them
"""
from __future__ import annotations

from functools import partial

from ..ir.graph import Graph
from ..passes.conv_algo import select_conv_algos
from ..passes.hoist import WeightPrologue, split_weight_prologue
from ..passes.manager import Pass, Pipeline, get_pass
from ..passes.target import Target
from ..passes.training import SIMPLIFY


def conv_algo_pass(target: Target, conv_algo: str = "auto", autotune: bool = False) -> Pass:
    """The conv_algo pass for `target`, asking for `conv_algo` where a layer asks for nothing
    (see passes/conv_algo.py)."""
    how = ("measured" if autotune else "cost model") + f" of the {target.name} backend" \
        + (f", {conv_algo} asked" if conv_algo != "auto" else "")
    return Pass("conv_algo", partial(select_conv_algos, target=target, default=conv_algo, autotune=autotune),
                f"pick a convolution algorithm per layer ({how})")


def compile_pipeline(target: Target, conv_algo: str = "auto", autotune: bool = False) -> Pipeline:
    """Fold inference batchnorm into its convolution, simplify, pick convolution algorithms (by
    `target`'s costs), put each allreduce start and wait where they overlap most, then fuse into
    kernels."""
    return Pipeline([get_pass(n) for n in ("bnfold",) + SIMPLIFY]
                    + [conv_algo_pass(target, conv_algo, autotune), get_pass("schedule_comm"), get_pass("fuse")])


def optimize_for_target(graph: Graph, target: Target, autotune: bool = False) -> Graph:
    """The graph a backend renders: `graph` after the compile pipeline."""
    return compile_pipeline(target, autotune=autotune).run(graph)


def weight_prologue(graph: Graph) -> WeightPrologue | None:
    """The weight prologue of an inference graph after bnfold and simplification, or None (a
    training step, or nothing weight-only worth keeping)."""
    if graph.updates:
        return None
    folded = Pipeline([get_pass(n) for n in ("bnfold",) + SIMPLIFY]).run(graph)
    return split_weight_prologue(folded)
