"""One rank's part of a placed step, cut at its collectives into stages any backend compiles.

A step placed on several ranks (a parameter server, or data parallelism with compressed
gradients) runs on each rank as a sequence of

    stage, exchange, exchange, ..., stage, exchange, ..., stage

where an exchange is one collective node (push, pull, allreduce) that the runtime carries out
over MPI, and a stage is a graph of the rank's other nodes between two exchanges. A stage graph
has no params, state or updates of its own: every value it reads (an arg of the step, a value
of an earlier stage or exchange) is one of its inputs, and every value it makes that is needed
later (by a later stage or exchange, an output of the step, an update) is one of its outputs.
The runtime keeps the rank's params and state, feeds each stage, and applies the updates at the
end of the step, as the step's semantics say. Literals (constant, full) are copied into every
stage that reads them rather than passed along.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value, placed_ranks

LITERALS = ("constant", "full")


@dataclass
class Stage:
    graph: Graph
    inputs: list[tuple[str, Value]]     # (the stage graph's input name, the step's value it takes)
    outputs: list[tuple[str, Value]]    # (the stage graph's output name, the step's value it gives)


@dataclass
class RankProgram:
    rank: int
    items: list = field(default_factory=list)        # Stage or Node (an exchange), in order
    args: list[Value] = field(default_factory=list)   # the step's args this rank reads or updates
    updates: list[tuple[Value, Value]] = field(default_factory=list)
    outputs: list[tuple[str, Value]] = field(default_factory=list)

    @property
    def exchanges(self) -> list[Node]:
        return [it for it in self.items if isinstance(it, Node)]


def runs_on(node: Node, rank: int) -> bool:
    ranks = placed_ranks(node.placement)
    return ranks is None or rank in ranks


def split_rank(graph: Graph, rank: int) -> RankProgram:
    """Rank `rank`'s program of the placed step `graph` (see the module's docstring)."""
    literal = {v: n for n in graph.nodes if n.op in LITERALS for v in n.outputs}
    mine = [n for n in graph.nodes if runs_on(n, rank) and n.op not in LITERALS]
    groups: list = []
    for n in mine:
        if n.opdef.collective:
            groups.append(n)
        elif groups and isinstance(groups[-1], list):
            groups[-1].append(n)
        else:
            groups.append([n])
    made = {v for n in mine for v in n.outputs}
    read = {v for n in mine for v in n.inputs}
    outputs = [(name, v) for name, v in graph.outputs if v in made or v.producer is None]
    # an update belongs to the ranks that read its target (to every rank making it if none reads it)
    read_anywhere = {v for n in graph.nodes for v in n.inputs}
    updates = [(t, v) for t, v in graph.updates if (v in made or v.producer is None)
               and (t in read or t not in read_anywhere)]
    # values each group needs from before it
    needed_after: list[set[Value]] = [set() for _ in groups]
    later: set[Value] = {v for _, v in outputs} | {v for _, v in updates}
    for k in range(len(groups) - 1, -1, -1):
        needed_after[k] = set(later)
        nodes = groups[k] if isinstance(groups[k], list) else [groups[k]]
        for n in nodes:
            later |= set(n.inputs)
    prog = RankProgram(rank, outputs=outputs, updates=updates)
    for k, group in enumerate(groups):
        if isinstance(group, Node):
            for v in group.inputs:
                if v in literal:
                    raise TdcError(f"internal: exchange {group.op} of a literal on rank {rank}")
            prog.items.append(group)
        else:
            prog.items.append(_stage(graph, rank, len(prog.items), group, needed_after[k], literal))
    read |= {v for _, v in outputs} | {v for _, v in updates} | {t for t, _ in updates}
    prog.args = [a for a in graph.args if a in read]
    return prog


def _fresh(graph: Graph, name: str) -> str:
    taken = {a.name for a in graph.args}
    while name in taken:
        name += "_"
    return name


def _stage(graph: Graph, rank: int, index: int, nodes: list[Node], needed: set[Value],
           literal: dict[Value, Node]) -> Stage:
    g = Graph(f"{graph.name}.rank{rank}.{index}")
    vmap: dict[Value, Value] = {}
    inputs: list[tuple[str, Value]] = []

    def value(v: Value) -> Value:
        if v in vmap:
            return vmap[v]
        if v in literal:          # a copy of the literal, made here
            lit = literal[v]
            for w, c in zip(lit.outputs, g.emit(lit.op, [], dict(lit.attrs), loc=lit.loc)):
                vmap[w] = c
            return vmap[v]
        name = v.name if v.producer is None else _fresh(graph, f"carried{len(inputs)}")
        vmap[v] = g.add_arg(name, v.type, "input")
        inputs.append((name, v))
        return vmap[v]

    for n in nodes:
        ins = [value(v) for v in n.inputs]
        outs = g.emit(n.op, ins, dict(n.attrs), loc=n.loc, names=[v.name for v in n.outputs])
        for v, w in zip(n.outputs, outs):
            vmap[v] = w
    made = [v for n in nodes for v in n.outputs]
    outputs = [(f"out{i}", v) for i, v in enumerate(v for v in made if v in needed)]
    for name, v in outputs:
        g.add_output(name, vmap[v])
    if not outputs:
        raise TdcError(f"internal: stage {g.name} computes nothing that is used")
    return Stage(g, inputs, outputs)
