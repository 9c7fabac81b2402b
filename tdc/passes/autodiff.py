"""Reverse-mode automatic differentiation as a graph pass.

`autodiff(graph, loss="loss", wrt=None)` returns a new graph that computes
everything the input graph did plus, for each value differentiated, an output
named "grad.<arg name>". Gradient rules are the VJPs in the op registry,
written in tdc ops, so the result is an ordinary graph: printable, optimisable
and compilable. Fan-out accumulates by addition; broadcasting is undone inside
the rules (sum_to); integer and bool values never carry gradients.
"""
from __future__ import annotations

from ..errors import TdcError
from ..ops import functional as F
from ..ops.tensor import Builder, Tensor
from ..ir.graph import Graph, Value
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


def autodiff(graph: Graph, loss: str | None = None, wrt: list[str] | None = None) -> Graph:
    """Differentiate output `loss` (a float scalar) with respect to the args named in `wrt`
    (default: every param)."""
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
    grads: dict[Value, Tensor] = {}
    with Builder(g) as b:
        grads[loss_v] = b.constant(1.0, loss_v.type.dtype)
        for node in reversed(forward):
            if node not in needed or not any(v in grads for v in node.outputs):
                continue
            if not any(v in active for v in node.inputs):
                continue
            _backprop_node(b, g, node, grads, active)
        for t in targets:
            gt = grads.get(t)
            if gt is None:   # the loss does not depend on it: its gradient is zero
                gt = F.zeros_like(Tensor(t, b))
            g.add_output(GRAD_PREFIX + t.name, gt.value)
    return g


def _backprop_node(b: Builder, g: Graph, node, grads, active):
    opdef = node.opdef
    where = f" (at {node.loc})" if node.loc else ""
    if opdef.grad is None:
        raise TdcError(f"op {node.op} has no gradient rule{where}; the loss depends on a param through it")
    first_new = len(g.nodes)
    outs = [Tensor(v, b) for v in node.outputs]
    gs = [grads.get(v) for v in node.outputs]
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
        grads[v] = grads[v] + gi if v in grads else gi
    for n in g.nodes[first_new:]:   # gradient nodes point at the forward op's source line
        n.loc = node.loc
