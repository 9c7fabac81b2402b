"""Reverse-mode automatic differentiation as a graph pass.

`autodiff(graph, loss="loss", wrt=None)` returns a new graph that computes
everything the input graph did plus, for each value differentiated, an output
named "grad.<arg name>". Gradient rules are the VJPs in the op registry,
written in tdc ops, so the result is an ordinary graph: printable, optimisable
and compilable. Fan-out accumulates by addition; broadcasting is undone inside
the rules (sum_to); integer and bool values never carry gradients.

In a partitioned graph (nodes placed on ranks, passes/partition.py) each gradient node runs
where its forward node runs, and the contributions to one value's gradient that were made on
different ranks are added by a `sum_ranks` over the ranks that hold the value: the
communication of the backward pass is made explicit like that of the forward pass.
"""
from __future__ import annotations

from ..errors import TdcError
from ..ops import functional as F
from ..ops.tensor import Builder, Tensor
from ..ir.graph import Graph, Value, held_on, placed_ranks, ranks_placement
from ..ir.types import is_float

GRAD_PREFIX = "grad."


class GradContext:
    """What a gradient rule sees besides the op's inputs."""

    def __init__(self, node, outs, gs, attrs):
        self.node, self.outs, self.gs, self.attrs = node, outs, gs, attrs

    @property
    def out(self) -> Tensor:
        return self.outs[0]

    @property
    def g(self) -> Tensor:
        return self.gs[0]


def pick_loss(graph: Graph, loss: str | None) -> str:
    names = [n for n, _ in graph.outputs]
    if loss is not None:
        graph.output(loss)   # raises with the list of outputs
        return loss
    if "loss" in names:
        return "loss"
    scalars = [n for n, v in graph.outputs if v.type.shape == () and is_float(v.type.dtype)]
    if len(scalars) == 1:
        return scalars[0]
    raise TdcError(f"graph {graph.name}: say which output is the loss (outputs: {', '.join(names)})")


def autodiff(graph: Graph, loss: str | None = None, wrt: list[str] | None = None,
             origins: dict | None = None) -> Graph:
    """Differentiate output `loss` (a float scalar) with respect to the args named in `wrt`
    (default: every param). `origins`, if given, gets for every gradient node the position (in
    graph.nodes) of the forward node whose rule made it: what a cost model charges it to."""
    g, vmap = graph.map_copy()
    loss = pick_loss(g, loss)
    loss_v = g.output(loss)
    if loss_v.type.shape != () or not is_float(loss_v.type.dtype):
        raise TdcError(f"the loss {loss!r} must be a float scalar, it is {loss_v.type}")
    targets = [g.arg(n) for n in wrt] if wrt is not None else g.params
    if not targets:
        raise TdcError(f"graph {g.name} has no params to differentiate (pass wrt=[...] to name inputs)")
    for t in targets:
        if not is_float(t.type.dtype):
            raise TdcError(f"cannot differentiate with respect to {t.name}: it is {t.type}, not a float tensor")

    # Values that depend on a target through float values, and nodes the loss depends on.
    active: set[Value] = set(targets)
    for n in g.nodes:
        if any(v in active for v in n.inputs):
            active.update(v for v in n.outputs if is_float(v.type.dtype))
    needed: set = set()
    frontier = [loss_v]
    while frontier:
        v = frontier.pop()
        if v.producer is not None and v.producer not in needed:
            needed.add(v.producer)
            frontier.extend(v.producer.inputs)

    forward = list(g.nodes)
    world = 1 + max((r for n in forward for r in placed_ranks(n.placement) or ()), default=0)
    grads = Gradients(g, world)
    with Builder(g) as b:
        seed = b.constant(1.0, loss_v.type.dtype)
        grads.add(loss_v, seed, loss_v.producer.placement if loss_v.producer is not None else None)
        for node in reversed(forward):
            if node not in needed or not any(grads.has(v) for v in node.outputs):
                continue
            if not any(v in active for v in node.inputs):
                continue
            mark = len(g.nodes)
            _backprop_node(b, g, node, grads, active)
            if origins is not None:
                at = forward.index(node)
                origins.update((n, at) for n in g.nodes[mark:])
        for t in targets:
            gt = grads.total(t)
            if gt is None:   # the loss does not depend on it: its gradient is zero
                gt = F.zeros_like(Tensor(t, b))
            g.add_output(GRAD_PREFIX + t.name, gt.value)
    return g


class Gradients:
    """The contributions to each value's gradient, summed per placement as they come; `total`
    adds the sums of different placements with a sum_ranks over the ranks holding the value."""

    def __init__(self, graph: Graph, world: int):
        self.graph, self.world = graph, world
        self.parts: dict[Value, dict] = {}
        self.totals: dict[Value, Tensor | None] = {}

    def has(self, v: Value) -> bool:
        return v in self.parts

    def add(self, v: Value, gi: Tensor, placement) -> None:
        parts = self.parts.setdefault(v, {})
        key = frozenset(placed_ranks(placement) or range(self.world))
        parts[key] = parts[key] + gi if key in parts else gi   # placed with the node being differentiated

    def total(self, v: Value) -> Tensor | None:
        if v not in self.totals:
            self.totals[v] = self._total(v)
        return self.totals[v]

    def _total(self, v: Value) -> Tensor | None:
        parts = self.parts.get(v)
        if not parts:
            return None
        held = held_on(v)
        if len(parts) == 1 and (held is None or held <= next(iter(parts))):
            return next(iter(parts.values()))
        # made on several ranks, or on fewer than hold the value (whose copies all need it)
        ranks = sorted(set(held) if held is not None else set().union(*parts))
        mine: dict[int, Tensor] = {}
        for key, t in sorted(parts.items(), key=lambda kv: sorted(kv[0])):
            owners = sorted(key & set(ranks))
            if not owners:
                raise TdcError(f"internal: a gradient of a value held on ranks {ranks} was made on ranks {sorted(key)}")
            q = owners[0]     # a sum made on several ranks is counted once, on the first
            mine[q] = self._placed(lambda: mine[q] + t, f"rank:{q}") if q in mine else t
        if len(ranks) == 1:         # all made where the value is: a local sum
            return mine[ranks[0]]
        pieces = [mine[q] if q in mine else F.zeros_like(next(iter(parts.values()))) for q in ranks]
        return self._placed(lambda: F.apply("sum_ranks", *pieces), ranks_placement(ranks))

    def _placed(self, build, placement: str) -> Tensor:
        mark = len(self.graph.nodes)
        t = build()
        for n in self.graph.nodes[mark:]:
            if n.op not in ("constant", "full"):
                n.placement = placement
        return t


def _backprop_node(b: Builder, g: Graph, node, grads, active):
    opdef = node.opdef
    where = f" (at {node.loc})" if node.loc else ""
    if opdef.grad is None:
        raise TdcError(f"op {node.op} has no gradient rule{where}; the loss depends on a param through it")
    first_new = len(g.nodes)
    outs = [Tensor(v, b) for v in node.outputs]
    gs = [grads.total(v) for v in node.outputs]
    if gs[0] is None:
        gs[0] = F.zeros_like(outs[0])
    ctx = GradContext(node, outs, gs, node.attrs)
    ins = [Tensor(v, b) for v in node.inputs]
    try:
        in_grads = opdef.grad(ctx, *ins)
    except TdcError as e:
        raise TdcError(f"gradient of {node.op}{where}: {e}") from None
    if len(in_grads) != len(node.inputs):
        raise TdcError(f"internal: gradient rule of {node.op} returned {len(in_grads)} values "
                       f"for {len(node.inputs)} inputs")
    for i, (v, gi) in enumerate(zip(node.inputs, in_grads)):
        if gi is None or v not in active or i in opdef.nondiff:
            continue
        if gi.type != v.type:
            raise TdcError(f"internal: gradient rule of {node.op} gave {gi.type} for input {i} of type {v.type}")
        grads.add(v, gi, node.placement)
    for n in g.nodes[first_new:]:   # gradient nodes point at the forward op's source line and run where it runs
        n.loc = node.loc
        if node.placement is not None and n.placement is None and n.op not in ("constant", "full"):
            n.placement = node.placement
