"""Fusion: group nodes into kernels.

Rules (producer-consumer fusion, as XLA's loop and output fusion do):
  * an elementwise op joins the kernel of one of its producers when that kernel is an
    elementwise kernel or a matmul/linear/conv2d "anchor" whose output has the same shape
    (the op becomes the anchor's epilogue), and joining creates no cycle between kernels;
  * a reduction joins the elementwise kernel producing its input (same iteration shape),
    and closes it;
  * `constant` and `full` nodes are literals: they are inlined into every kernel that reads
    them and never form kernels of their own;
  * every other op is a kernel by itself;
  * communication keeps its order (sends, receives and collectives are never reordered).
Nodes get `node.group = "k<N>"`; the pass reorders nodes so each kernel is contiguous.
"""
from __future__ import annotations

import networkx as nx

from ..ir.graph import Graph, Node
from .manager import register_pass

LITERAL_OPS = ("constant", "full")
ANCHOR_OPS = ("matmul", "linear", "conv2d", "sparse_linear", "sparse_conv2d")   # matmul only in 2-D: batched ones take no epilogue
REDUCE_OPS = ("reduce_sum", "reduce_mean", "reduce_max")


def is_elementwise(node: Node) -> bool:
    return node.opdef.family == "elementwise" and node.op not in LITERAL_OPS


def is_anchor(node: Node) -> bool:
    # an FFT convolution runs at Python level (numpy.fft): no generated epilogue around it
    return node.op in ANCHOR_OPS and (node.op != "matmul" or all(v.type.rank == 2 for v in node.inputs)) \
        and not (node.op == "conv2d" and node.attrs["algo"] == "fft")


def is_literal(node: Node | None) -> bool:
    return node is not None and node.op in LITERAL_OPS


class _Group:
    def __init__(self, index: int, kind: str, shape):
        self.index, self.kind, self.shape = index, kind, shape
        self.nodes: list[Node] = []
        self.open = kind in ("elementwise", "anchor")

    @property
    def name(self) -> str:
        return f"k{self.index}"


@register_pass("fuse")
def fuse(graph: Graph) -> Graph:
    """Group nodes into kernels (elementwise chains, matmul/conv epilogues, reductions)."""
    g = graph.copy()
    groups: list[_Group] = []
    group_of: dict[Node, _Group] = {}
    deps: dict = {}   # Value -> bitset of the groups it depends on (directly or not)
    comm_groups = 0   # bitset of the groups that communicate (kept in order, below)

    def value_deps(v):
        return deps.get(v, 0)

    for node in g.nodes:
        if is_literal(node):
            for v in node.outputs:
                deps[v] = 0
            continue
        in_deps = 0
        for v in node.inputs:
            in_deps |= value_deps(v)
        target = None
        shape = node.outputs[0].type.shape if node.outputs else None
        if is_elementwise(node) or node.op in REDUCE_OPS:
            iter_shape = node.inputs[0].type.shape if node.op in REDUCE_OPS else shape
            for v in node.inputs:
                p = v.producer
                cand = group_of.get(p) if p is not None else None
                if cand is None or not cand.open or cand.shape != iter_shape:
                    continue
                if node.op in REDUCE_OPS and cand.kind != "elementwise":
                    continue
                # joining must not make the kernel depend on its own result through another kernel
                outside = 0
                for w in node.inputs:
                    if w.producer is None or group_of.get(w.producer) is not cand:
                        outside |= value_deps(w)
                # nor may it pull a kernel before a message the node waits for (messages keep their order)
                if not outside >> cand.index & 1 and not (in_deps & comm_groups) >> (cand.index + 1):
                    target = cand
                    break
            if target is None and node.op not in REDUCE_OPS:
                target = _Group(len(groups), "elementwise", shape)
                groups.append(target)
            elif target is None:
                target = _Group(len(groups), "single", shape)
                target.open = False
                groups.append(target)
            if node.op in REDUCE_OPS:
                target.open = False
        elif is_anchor(node):
            target = _Group(len(groups), "anchor", shape)
            groups.append(target)
        else:
            target = _Group(len(groups), "single", shape)
            target.open = False
            groups.append(target)
        target.nodes.append(node)
        group_of[node] = target
        if node.opdef.family == "comm":
            comm_groups |= 1 << target.index
        for v in node.outputs:
            deps[v] = in_deps | (1 << target.index)

    # Schedule kernels in a topological order of the kernel graph, each kernel contiguous.
    kg = nx.DiGraph()
    kg.add_nodes_from(range(len(groups)))
    for grp in groups:
        for n in grp.nodes:
            for v in n.inputs:
                src = group_of.get(v.producer) if v.producer is not None else None
                if src is not None and src is not grp:
                    kg.add_edge(src.index, grp.index)
    # messages keep their order: every rank posts them in one global order, which is what keeps a
    # partitioned step (lower/ranks.py) from deadlocking
    comm = [group_of[n].index for n in g.nodes if n.opdef.family == "comm"]
    kg.add_edges_from(zip(comm, comm[1:]))
    order = list(nx.lexicographical_topological_sort(kg))
    literals = [n for n in g.nodes if is_literal(n)]
    renumber = {old: new for new, old in enumerate(order)}
    scheduled = list(literals)
    for gi in order:
        grp = groups[gi]
        for n in grp.nodes:
            n.group = f"k{renumber[gi]}"
        scheduled.extend(grp.nodes)
    g.nodes = scheduled
    return g


def kernels(graph: Graph) -> list[tuple[str, list[Node]]]:
    """The kernels of a fused graph in schedule order: (name, nodes). Literal nodes are left out;
    a node without a group is a kernel of its own."""
    out: list[tuple[str, list[Node]]] = []
    for n in graph.nodes:
        if is_literal(n):
            continue
        name = n.group or f"_{len(out)}"
        if out and n.group is not None and out[-1][0] == name:
            out[-1][1].append(n)
        else:
            out.append((name, [n]))
    return out
