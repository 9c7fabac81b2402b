"""Graphviz DOT rendering of a graph, for looking at it (`dot -Tsvg`)."""
from __future__ import annotations

from .graph import Graph, Value

KIND_COLORS = {"input": "lightblue", "param": "palegreen", "const": "lightgrey", "state": "lightpink"}


def _q(s: str) -> str:
    """A DOT quoted string; backslashes are escaped too, since DOT labels give `\\n`, `\\l`... a meaning."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g: Graph) -> str:
    lines = [f"digraph {_q(g.name)} {{", '  node [fontname="monospace"];', '  edge [fontname="monospace"];']
    ids: dict[Value, str] = {}

    def source(v: Value) -> str:
        if v not in ids:  # a broken graph: show the dangling value instead of failing
            ids[v] = f"x{len(ids)}"
            lines.append(f"  {ids[v]} [shape=ellipse, style=dashed, label={_q('undefined ' + str(v.type))}];")
        return ids[v]

    def edge(v: Value, dst: str, extra: str = ""):
        label = str(v.type)
        if v.producer is not None and len(v.producer.outputs) > 1:
            label = f"#{v.index} {label}"
        lines.append(f"  {source(v)} -> {dst} [label={_q(label)}{extra}];")

    for i, a in enumerate(g.args):
        ids[a] = f"a{i}"
        color = KIND_COLORS.get(a.kind, "white")
        label = f"%{a.name}\n{a.type}\n{a.kind}"
        lines.append(f"  a{i} [shape=ellipse, style=filled, fillcolor={_q(color)}, label={_q(label)}];")
    clusters: dict[str, list[str]] = {}    # fused kernel -> its nodes (drawn as a box around them)
    for i, node in enumerate(g.nodes):
        label = node.op + (f" @{node.placement}" if node.placement is not None else "")
        label += "".join(f"\n{v.type}" for v in node.outputs)
        decl = f"n{i} [shape=box, label={_q(label)}];"
        if node.group is not None:
            clusters.setdefault(node.group, []).append(decl)
        else:
            lines.append("  " + decl)
        for v in node.inputs:
            edge(v, f"n{i}")
        for v in node.outputs:
            ids.setdefault(v, f"n{i}")
    for k, (kernel, decls) in enumerate(clusters.items()):
        lines.append(f"  subgraph cluster_{k} {{ label={_q('kernel ' + kernel)}; style=rounded; color=\"steelblue\";")
        lines += [f"    {d}" for d in decls]
        lines.append("  }")
    for k, (name, v) in enumerate(g.outputs):
        lines.append(f"  o{k} [shape=house, style=filled, fillcolor=\"lightyellow\", label={_q(name)}];")
        edge(v, f"o{k}")
    for k, (target, v) in enumerate(g.updates):
        lines.append(f"  u{k} [shape=cds, label={_q('update %' + str(target.name))}];")
        edge(v, f"u{k}")
        if target in ids:
            lines.append(f"  u{k} -> {ids[target]} [style=dashed, constraint=false];")
    lines.append("}")
    return "\n".join(lines)
