"""Constant folding: evaluate nodes whose inputs are all constants at compile time.

Only `constant` and `full` nodes count as constants. Graph arguments never do,
not even consts: their values are given when the graph is compiled, not known
to the passes.
"""
from __future__ import annotations

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType
from .manager import register_pass
from .simplify import _remap

# Results above this many elements stay as the nodes that compute them, so the IR
# stays readable and small (a big `full` is already cheap to describe).
MAX_FOLD_ELEMENTS = 4096
# A small result can come from a huge `full` (a sum of it, say): past this many input
# elements, evaluating would cost more memory and time than the fold is worth.
MAX_INPUT_ELEMENTS = 1 << 20

CONSTANT_OPS = ("constant", "full")


def is_constant(v: Value) -> bool:
    return v.producer is not None and v.producer.op in CONSTANT_OPS


def constant_array(v: Value) -> np.ndarray:
    """The value of a `constant` or `full` node's output."""
    n = v.producer
    return n.opdef.ref(**n.attrs)


def uniform_value(v: Value):
    """The single value every element of a constant has (a numpy scalar of its dtype), else None."""
    if not is_constant(v):
        return None
    n = v.producer
    if n.op == "full":   # read the attribute: the array may be large
        return np.asarray(n.attrs["value"]).astype(v.type.np_dtype)[()]
    a = n.attrs["value"]
    if a.size == 0 or not np.all(a == a.flat[0]):
        return None
    return a.flat[0]


def _foldable(n: Node) -> bool:
    od = n.opdef
    if not n.inputs or od.side_effect or od.collective or n.op == "recv":
        return False
    if not all(is_constant(v) and v.type.size <= MAX_INPUT_ELEMENTS for v in n.inputs):
        return False
    return all(v.type.size <= MAX_FOLD_ELEMENTS for v in n.outputs)


def _evaluate(n: Node) -> list[np.ndarray] | None:
    """The node's results by its reference semantics, or None to leave it to run time."""
    try:
        # inf and nan are what the node would compute at run time too: no warnings here
        with np.errstate(all="ignore"):
            out = n.opdef.ref(*[constant_array(v) for v in n.inputs], **n.attrs)
    except (TdcError, ValueError, ArithmeticError):
        return None   # e.g. an out-of-range label: the error belongs to run time, with its context
    outs = [np.array(x) for x in (out if isinstance(out, tuple) else (out,))]
    if len(outs) != len(n.outputs) or any(TensorType.of(x) != v.type for x, v in zip(outs, n.outputs)):
        return None
    return outs


@register_pass("fold")
def fold(graph: Graph) -> Graph:
    """Replace nodes whose inputs are all constants by constants of their (small) results."""
    g = graph.copy()
    nodes, g.nodes = g.nodes, []
    repl: dict[Value, Value] = {}
    for n in nodes:
        n.inputs = [repl.get(v, v) for v in n.inputs]
        results = _evaluate(n) if _foldable(n) else None
        if results is None:
            g.nodes.append(n)
            continue
        for v, x in zip(n.outputs, results):
            (c,) = g.emit("constant", [], {"value": x}, placement=n.placement, loc=n.loc, names=[v.name])
            repl[v] = c
    _remap(g, repl)
    return g
