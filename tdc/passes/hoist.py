"""Weight prologues: the part of an inference graph computed from its weights alone.

A graph without updates that scales a convolution's weight by a folded batchnorm (bnfold), or
transposes or casts a weight, would redo that work on every call although the weights change
only when the caller sets new ones. `split_weight_prologue` cuts such a graph in two:

    prologue(params, consts, state) -> the weight-only values the rest reads
    main(inputs, the args it still reads, one const per prologue output) -> the graph's outputs

An executable runs the prologue once per set of weights and `main` on every call. Training
steps are left whole: their params change every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph, Node, Value

# A reshape of an argument is a view: main keeps it (the prologue copies it where it needs it),
# so holding its result as a second buffer would buy nothing.
VIEW_OPS = ("reshape",)


@dataclass
class WeightPrologue:
    graph: Graph      # the prologue: weights -> its outputs, named as the consts of `main` they become
    main: Graph       # the graph to compile instead

    @property
    def outputs(self) -> list[str]:
        return [name for name, _ in self.graph.outputs]

    @property
    def reads(self) -> list[str]:
        """The params, consts and state the prologue reads."""
        return [a.name for a in self.graph.args]

    def evaluate(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The prologue's outputs for `values` (name -> array for every arg it reads), by the ops'
        reference semantics: it runs once per set of weights, so numpy is fast enough."""
        env = {a: np.asarray(values[a.name]) for a in self.graph.args}
        for n in self.graph.nodes:
            out = n.opdef.ref(*[env[v] for v in n.inputs], **n.attrs)
            for v, x in zip(n.outputs, out if isinstance(out, tuple) else (out,)):
                env[v] = np.asarray(x, v.type.np_dtype).reshape(v.type.shape)
        return {name: env[v] for name, v in self.graph.outputs}


def _pure(n: Node) -> bool:
    od = n.opdef
    return bool(n.inputs) and not (od.side_effect or od.collective or n.op in ("recv", "dropout"))


def split_weight_prologue(graph: Graph) -> WeightPrologue | None:
    """The prologue and main graph of `graph`, or None when nothing is worth hoisting (a graph
    with updates, or whose weight-only nodes are all views of arguments)."""
    if graph.updates:
        return None
    weight_only: set[Value] = {a for a in graph.args if a.kind != "input"}
    constant_nodes: set[Node] = set()      # no inputs: copied wherever they are read
    hoisted: list[Node] = []
    views: set[Node] = set()
    for n in graph.nodes:
        if not n.inputs and not n.opdef.side_effect:
            constant_nodes.add(n)
            weight_only.update(n.outputs)
        elif _pure(n) and all(v in weight_only for v in n.inputs):
            weight_only.update(n.outputs)
            if n.op in VIEW_OPS and all(v.is_arg or v.producer in constant_nodes for v in n.inputs):
                views.add(n)
            else:
                hoisted.append(n)
    if not hoisted:
        return None
    inner = set(hoisted)
    live = {v for _, v in graph.outputs}
    kept = []
    for n in reversed(graph.nodes):    # what main still computes: the rest, without what only fed the prologue
        if n not in inner and (n.opdef.side_effect or any(v in live for v in n.outputs)):
            kept.append(n)
            live.update(n.inputs)
    kept.reverse()
    read_by_kept = {v for n in kept for v in n.inputs} | {v for _, v in graph.outputs}
    frontier = [v for n in hoisted for v in n.outputs if v in read_by_kept]

    pro = Graph(graph.name + "_weights")
    pmap: dict[Value, Value] = {}

    def bring(v: Value) -> Value:     # v's copy in the prologue, with what it is computed from
        if v not in pmap:
            if v.is_arg:
                pmap[v] = pro.add_arg(v.name, v.type, v.kind, v.attrs)
            else:
                n = v.producer
                outs = pro.emit(n.op, [bring(x) for x in n.inputs], dict(n.attrs), loc=n.loc)
                pmap.update(zip(n.outputs, outs))
        return pmap[v]

    taken = {a.name for a in graph.args}
    names = []
    for i, v in enumerate(frontier):
        name = f"{v.producer.op}.hoisted{i}"
        while name in taken:
            name += "_"
        taken.add(name)
        names.append(name)
        pro.add_output(name, bring(v))

    main = Graph(graph.name)
    mmap: dict[Value, Value] = {}
    used = read_by_kept
    for a in graph.args:
        if a in used or a.kind == "input":    # the caller feeds every input, read or not
            mmap[a] = main.add_arg(a.name, a.type, a.kind, a.attrs)
    for v, name in zip(frontier, names):
        mmap[v] = main.add_arg(name, v.type, "const")
    for n in kept:
        m = Node(n.op, [mmap[v] for v in n.inputs], dict(n.attrs), n.placement, n.loc)
        for v in n.outputs:
            mmap[v] = Value(v.type, v.name, m, v.index)
            m.outputs.append(mmap[v])
        main.nodes.append(m)
    main.outputs = [(name, mmap[v]) for name, v in graph.outputs]
    return WeightPrologue(pro, main)
