"""Dead-code elimination and common-subexpression elimination."""
from __future__ import annotations

from ..ir.graph import Graph, Value
from ..ir.opdef import attrs_key
from .manager import register_pass


def _remap(g: Graph, repl: dict[Value, Value]) -> None:
    for n in g.nodes:
        n.inputs = [repl.get(v, v) for v in n.inputs]
    g.outputs = [(name, repl.get(v, v)) for name, v in g.outputs]
    g.updates = [(t, repl.get(v, v)) for t, v in g.updates]


@register_pass("dce")
def dce(graph: Graph) -> Graph:
    """Remove nodes whose results nothing uses (outputs, updates and side effects are used; a
    recv stays too: its message is on the way)."""
    g = graph.copy()
    live: set[Value] = set(g.roots())
    kept = []
    for n in reversed(g.nodes):
        if n.opdef.side_effect or n.op == "recv" or any(v in live for v in n.outputs):
            kept.append(n)
            live.update(n.inputs)
    g.nodes = kept[::-1]
    return g


@register_pass("cse")
def cse(graph: Graph) -> Graph:
    """Merge nodes that apply the same op with the same attributes to the same inputs."""
    g = graph.copy()
    repl: dict[Value, Value] = {}
    seen: dict[tuple, object] = {}
    kept = []
    for n in g.nodes:
        n.inputs = [repl.get(v, v) for v in n.inputs]
        od = n.opdef
        if not (od.side_effect or od.collective or n.op == "recv"):
            key = (n.op, tuple(id(v) for v in n.inputs), attrs_key(n.attrs), n.placement)
            if key in seen:
                repl.update(zip(n.outputs, seen[key].outputs))
                continue
            seen[key] = n
        kept.append(n)
    g.nodes = kept
    _remap(g, repl)
    return g
