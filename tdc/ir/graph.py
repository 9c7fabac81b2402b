"""The IR: a typed SSA DAG.

A `Graph` has a signature of arguments (each an input, param, const or state),
a list of `Node`s in a valid execution order, named outputs, and updates: pairs
(param or state arg, new value) that a training step writes back. Every `Value`
has exactly one producer (a node, or the signature) and a `TensorType`.
Values are identified by object identity; names are only for printing.
"""
from __future__ import annotations


import networkx as nx

from ..errors import ShapeError, TdcError
from .opdef import get_op
from .types import TensorType

ARG_KINDS = ("input", "param", "const", "state")


def placed_ranks(placement: str | None) -> set[int] | None:
    """The ranks a node placed at `placement` runs on: "rank:2", "ranks:1..3" (1, 2, 3) or
    "ranks:0..2,5" (0, 1, 2, 5); None (no placement) means every rank. Other placements (a
    device name) are not ranks: None."""
    if placement is None:
        return None
    kind, _, spec = placement.partition(":")
    try:
        if kind == "rank":
            return {int(spec)}
        if kind == "ranks":
            ranks = set()
            for item in spec.split(","):
                lo, _, hi = item.partition("..")
                ranks.update(range(int(lo), int(hi or lo) + 1))
            return ranks
    except ValueError:
        pass
    else:
        return None
    raise TdcError(f"bad placement {placement!r}: expected rank:N or ranks:A..B,C,...")


def upstream(roots, extra=None) -> set["Node"]:
    """The nodes the values `roots` depend on, their producers included; `extra(node)` may name
    more nodes a node depends on than its inputs' producers (a recv: its send)."""
    seen: set[Node] = set()
    stack = [v.producer for v in roots if v.producer is not None]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(v.producer for v in n.inputs if v.producer is not None)
        if extra is not None:
            stack.extend(extra(n))
    return seen


def held_on(v: "Value") -> set[int] | None:
    """The ranks holding value v in a partitioned graph: where its producer runs (None: every rank,
    as for args and unplaced nodes), except that a transfer's result is its destination's."""
    p = v.producer
    if p is None:
        return None
    if p.op == "transfer":
        return {p.attrs["dst"]}
    return placed_ranks(p.placement)


def ranks_placement(ranks) -> str:
    """The placement text of a set of ranks (the inverse of placed_ranks)."""
    rs = sorted(set(ranks))
    if len(rs) == 1:
        return f"rank:{rs[0]}"
    runs: list[list[int]] = []
    for r in rs:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return "ranks:" + ",".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


class Value:
    __slots__ = ("type", "name", "producer", "index", "kind", "attrs")

    def __init__(self, type: TensorType, name: str | None = None, producer: "Node | None" = None,
                 index: int = 0, kind: str | None = None, attrs: dict | None = None):
        self.type = type
        self.name = name          # user-visible name; None means "print as a number"
        self.producer = producer  # Node, or None for a graph argument
        self.index = index        # which output of the producer
        self.kind = kind          # for arguments: one of ARG_KINDS
        self.attrs = attrs or {}  # for arguments: e.g. {"init": "he_normal"}

    @property
    def is_arg(self) -> bool:
        return self.producer is None

    def __repr__(self) -> str:
        return f"Value({self.name or '?'}: {self.type})"


class Node:
    __slots__ = ("op", "inputs", "attrs", "outputs", "placement", "loc", "group")

    def __init__(self, op: str, inputs: list[Value], attrs: dict, placement: str | None = None,
                 loc: str | None = None):
        self.op = op
        self.inputs = list(inputs)
        self.attrs = attrs
        self.outputs: list[Value] = []
        self.placement = placement
        self.loc = loc            # "file.py:12" of the user's source line, when known
        self.group: str | None = None   # the fused kernel this node belongs to (set by the fuse pass)

    @property
    def opdef(self):
        return get_op(self.op)

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise TdcError(f"{self.op} has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    def __repr__(self) -> str:
        return f"Node({self.op}, {len(self.inputs)} in, {len(self.outputs)} out)"


class Graph:
    def __init__(self, name: str = "main"):
        self.name = name
        self.args: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: list[tuple[str, Value]] = []
        self.updates: list[tuple[Value, Value]] = []

    # ---- construction -------------------------------------------------
    def add_arg(self, name: str, type: TensorType, kind: str = "input", attrs: dict | None = None) -> Value:
        if kind not in ARG_KINDS:
            raise TdcError(f"argument kind must be one of {', '.join(ARG_KINDS)}, not {kind!r}")
        if any(a.name == name for a in self.args):
            raise TdcError(f"graph {self.name} already has an argument named {name!r}")
        v = Value(type, name=name, kind=kind, attrs=dict(attrs or {}))
        self.args.append(v)
        return v

    def emit(self, op: str, inputs: list[Value], attrs: dict | None = None, placement: str | None = None,
             loc: str | None = None, names: list[str | None] | None = None) -> list[Value]:
        """Append a node, checking its inputs and attributes and inferring its output types."""
        opdef = get_op(op)
        attrs = opdef.normalize_attrs(attrs or {})
        in_types = [v.type for v in inputs]
        out_types = opdef.infer_types(in_types, attrs)
        node = Node(op, inputs, attrs, placement, loc)
        for i, t in enumerate(out_types):
            node.outputs.append(Value(t, name=names[i] if names else None, producer=node, index=i))
        self.nodes.append(node)
        return node.outputs

    def add_output(self, name: str, value: Value) -> None:
        if any(n == name for n, _ in self.outputs):
            raise TdcError(f"graph {self.name} already has an output named {name!r}")
        self.outputs.append((name, value))

    def add_update(self, target: Value, value: Value) -> None:
        if target.kind not in ("param", "state"):
            raise TdcError(f"only params and state can be updated; {target.name} is {target.kind}")
        if target.type != value.type:
            raise ShapeError(f"update of {target.name}: new value is {value.type}, the {target.kind} is {target.type}")
        if any(t is target for t, _ in self.updates):
            raise TdcError(f"{target.name} is updated twice")
        self.updates.append((target, value))

    # ---- queries --------------------------------------------------------
    def args_of(self, kind: str) -> list[Value]:
        return [a for a in self.args if a.kind == kind]

    @property
    def inputs(self) -> list[Value]:
        return self.args_of("input")

    @property
    def params(self) -> list[Value]:
        return self.args_of("param")

    @property
    def state(self) -> list[Value]:
        return self.args_of("state")

    @property
    def consts(self) -> list[Value]:
        return self.args_of("const")

    def arg(self, name: str) -> Value:
        for a in self.args:
            if a.name == name:
                return a
        raise TdcError(f"graph {self.name} has no argument {name!r}; it has: {', '.join(a.name for a in self.args)}")

    def output(self, name: str) -> Value:
        for n, v in self.outputs:
            if n == name:
                return v
        raise TdcError(f"graph {self.name} has no output {name!r}; it has: {', '.join(n for n, _ in self.outputs)}")

    def roots(self) -> list[Value]:
        """Values the graph must compute: outputs and updates."""
        return [v for _, v in self.outputs] + [v for _, v in self.updates]

    def users(self) -> dict[Value, list[Node]]:
        uses: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                uses.setdefault(v, []).append(n)
        return uses

    def to_networkx(self) -> nx.DiGraph:
        """Nodes and arguments as graph vertices, edges from producer to consumer."""
        g = nx.DiGraph()
        for a in self.args:
            g.add_node(a)
        for n in self.nodes:
            g.add_node(n)
            for v in n.inputs:
                g.add_edge(v.producer if v.producer is not None else v, n)
        return g

    def toposort(self) -> None:
        """Reorder nodes into a valid execution order, keeping the current order where it is valid."""
        g = nx.DiGraph()
        position = {n: i for i, n in enumerate(self.nodes)}
        g.add_nodes_from(self.nodes)
        for n in self.nodes:
            for v in n.inputs:
                if v.producer is not None:
                    g.add_edge(v.producer, n)
        try:
            self.nodes = list(nx.lexicographical_topological_sort(g, key=position.__getitem__))
        except nx.NetworkXUnfeasible:
            raise TdcError(f"graph {self.name} has a cycle") from None

    def copy(self) -> "Graph":
        """A deep copy of the structure (types and attribute values are shared: they are immutable)."""
        new, _ = self.map_copy()
        return new

    def map_copy(self) -> tuple["Graph", dict[Value, Value]]:
        g = Graph(self.name)
        vmap: dict[Value, Value] = {}
        for a in self.args:
            vmap[a] = g.add_arg(a.name, a.type, a.kind, a.attrs)
        for n in self.nodes:
            m = Node(n.op, [vmap[v] for v in n.inputs], dict(n.attrs), n.placement, n.loc)
            m.group = n.group
            for v in n.outputs:
                vmap[v] = Value(v.type, v.name, m, v.index)
                m.outputs.append(vmap[v])
            g.nodes.append(m)
        g.outputs = [(name, vmap[v]) for name, v in self.outputs]
        g.updates = [(vmap[t], vmap[v]) for t, v in self.updates]
        return g, vmap

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def __str__(self) -> str:
        from .printer import print_graph
        return print_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.args)} args, {len(self.nodes)} nodes>"
