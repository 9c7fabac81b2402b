"""Algebraic simplification (`simplify`) and batchnorm folding for inference (`bnfold`).

`simplify` is a table of small rules. A rule looks at one node and returns a
value to use instead of the node's output, or None. The replacement always has
exactly the node's type; new nodes a rule needs are emitted as it goes, so they
land before the node's users. The graph is swept forward, each node rewritten
until no rule fires, and the sweep repeated until nothing changes. Nodes left
unused at the end are dropped (as `dce` would).

Float caveats, accepted on purpose:
  - x + 0 -> x and x - 0 -> x can keep a -0.0 that the addition would have
    turned into +0.0 (only the sign of a zero differs).
  - (x * c1) * c2 -> x * (c1 * c2) rounds once instead of twice.
  - log(softmax(x)) -> log_softmax(x) is the more accurate form, so it differs
    in the last bits (and gives finite results where softmax underflows to 0).
  - x * 0 is left alone: it is nan for inf and nan, not 0.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value
from ..ops.reduce import reduced_shape
from ..ir.opdef import get_op
from .fold import constant_array, is_constant, uniform_value
from .manager import register_pass
from .simplify import _remap, dce

Rule = Callable[[Node, "Rewriter"], "Value | None"]
RULES: dict[str, list[Rule]] = {}
MAX_SWEEPS = 50


def rule(*ops: str):
    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES.setdefault(op, []).append(fn)
        return fn
    return deco


class Rewriter:
    """What a rule works with: the graph being rebuilt, the node being rewritten, and use counts."""

    def __init__(self, g: Graph):
        self.g = g
        self.node: Node | None = None
        self.uses: Counter = Counter(v for n in g.nodes for v in n.inputs)
        self.uses.update(g.roots())
        self.fresh: set[Node] = set()   # nodes emitted while rewriting the current node

    @property
    def out(self) -> Value:
        return self.node.output

    def emit(self, op: str, inputs: list[Value], attrs: dict | None = None) -> Value:
        (v,) = self.g.emit(op, inputs, attrs, placement=self.node.placement, loc=self.node.loc)
        self.uses.update(inputs)
        self.fresh.add(v.producer)
        return v

    def producer(self, v: Value, *ops: str) -> Node | None:
        """v's producer if it is one of `ops` and runs where the current node runs."""
        p = v.producer
        if p is not None and p.op in ops and p.placement == self.node.placement:
            return p
        return None

    def single_use(self, v: Value) -> bool:
        return self.uses[v] == 1

    def as_output(self, v: Value) -> Value | None:
        """v with the current node's type: v itself, or v broadcast up to the node's shape."""
        t = self.out.type
        if v.type == t:
            return v
        if v.type.dtype == t.dtype:
            return self.emit("broadcast_to", [v], {"shape": t.shape})
        return None


def _is(v: Value, k) -> bool:
    u = uniform_value(v)
    return u is not None and u == k


def _is_scalar_constant(v: Value) -> bool:
    return is_constant(v) and v.type.shape == ()


# ---- identities: x + 0, x - 0, x * 1, x / 1, where(c, x, x) ---------------------

def _identity(op: str, neutral: int, commutes: bool):
    """x op neutral -> x (and neutral op x -> x when op commutes)."""
    @rule(op)
    def drop_neutral(n, rw):
        a, b = n.inputs
        if _is(b, neutral):
            return rw.as_output(a)
        if commutes and _is(a, neutral):
            return rw.as_output(b)
        return None
    drop_neutral.__name__ = f"{op}_{neutral}"
    return drop_neutral


add_zero = _identity("add", 0, commutes=True)
sub_zero = _identity("sub", 0, commutes=False)
mul_one = _identity("mul", 1, commutes=True)
div_one = _identity("div", 1, commutes=False)


@rule("where")
def where_same(n, rw):
    _, a, b = n.inputs
    return rw.as_output(a) if a is b else None


# ---- negation ---------------------------------------------------------------------

@rule("neg")
def neg_neg(n, rw):
    p = rw.producer(n.inputs[0], "neg")
    return p.inputs[0] if p else None


@rule("sub")
def sub_neg(n, rw):
    a, b = n.inputs
    p = rw.producer(b, "neg")
    return rw.emit("add", [a, p.inputs[0]]) if p else None


@rule("add")
def add_neg(n, rw):
    a, b = n.inputs
    for x, y in ((a, b), (b, a)):
        p = rw.producer(y, "neg")
        if p:
            return rw.emit("sub", [x, p.inputs[0]])
    return None


# ---- constant scalars: (x * c1) * c2 -> x * (c1 * c2) --------------------------------

def _split_scalar(n: Node) -> tuple[Value, Value] | None:
    """(x, c) when one input of n is a scalar constant c and the other is not a constant."""
    a, b = n.inputs
    if _is_scalar_constant(b) and not is_constant(a):
        return a, b
    if _is_scalar_constant(a) and not is_constant(b):
        return b, a
    return None


@rule("mul")
def mul_scalars(n, rw):
    outer = _split_scalar(n)
    if outer is None:
        return None
    y, c2 = outer
    p = rw.producer(y, "mul")
    inner = _split_scalar(p) if p and rw.single_use(y) else None
    if inner is None:
        return None
    x, c1 = inner
    value = get_op("mul").ref(constant_array(c1), constant_array(c2))
    c = rw.emit("constant", [], {"value": np.asarray(value, n.output.type.np_dtype)})
    return rw.emit("mul", [x, c])


# ---- shape ops ------------------------------------------------------------------------

@rule("reshape", "flatten")
def reshape_chain(n, rw):
    x, shape = n.inputs[0], n.output.type.shape
    if x.type.shape == shape:
        return x
    p = rw.producer(x, "reshape", "flatten")
    if p is None:
        return None
    src = p.inputs[0]
    return src if src.type.shape == shape else rw.emit("reshape", [src], {"shape": shape})


@rule("transpose")
def transpose_chain(n, rw):
    x, perm = n.inputs[0], n.attrs["perm"]
    p = rw.producer(x, "transpose")
    if p is not None:
        # out[i] = x[perm[i]] = src[inner[perm[i]]]
        x, perm = p.inputs[0], tuple(p.attrs["perm"][i] for i in perm)
    if perm == tuple(range(len(perm))):
        return x
    return rw.emit("transpose", [x], {"perm": perm}) if p is not None else None


@rule("broadcast_to")
def broadcast_chain(n, rw):
    x = n.inputs[0]
    if x.type == n.output.type:
        return x
    p = rw.producer(x, "broadcast_to")
    return rw.emit("broadcast_to", [p.inputs[0]], {"shape": n.attrs["shape"]}) if p else None


@rule("cast")
def cast_same(n, rw):
    x = n.inputs[0]
    return x if x.type == n.output.type else None


@rule("reshape")
def sum_to(n, rw):
    """reshape(reduce_sum(x, axes, keepdims=true)) dropping exactly the reduced dims: one reduce_sum."""
    r = n.inputs[0]
    p = rw.producer(r, "reduce_sum")
    if p is None or not p.attrs["keepdims"] or not rw.single_use(r):
        return None
    x, axes = p.inputs[0], p.attrs["axes"]
    if reduced_shape(x.type.shape, axes, False) != n.output.type.shape:
        return None
    return rw.emit("reduce_sum", [x], {"axes": axes, "keepdims": False})


# ---- activations --------------------------------------------------------------------

@rule("relu")
def relu_relu(n, rw):
    x = n.inputs[0]
    return x if rw.producer(x, "relu") else None


@rule("log")
def log_of_softmax(n, rw):
    p = rw.producer(n.inputs[0], "softmax")
    return rw.emit("log_softmax", [p.inputs[0]], {"axis": p.attrs["axis"]}) if p else None


# ---- the pass ---------------------------------------------------------------------------

def _check(new: Value, old: Value, rule_fn) -> None:
    if new.type != old.type:
        raise TdcError(f"internal: simplify rule {rule_fn.__name__} replaced {old.type} by {new.type}")


def _rewrite(n: Node, rw: Rewriter) -> Value | None:
    """The value to use for n's output after applying rules to a fixpoint, or None if none fired."""
    result = None
    rw.fresh = set()
    while n is not None:
        rw.node = n
        for fn in RULES.get(n.op, ()):
            new = fn(n, rw)
            if new is not None:
                _check(new, n.output, fn)
                break
        else:
            break
        result = new
        n = new.producer if new.producer in rw.fresh else None   # the rules may apply again to it
    return result


def _sweep(g: Graph) -> bool:
    """Rewrite g in place in one forward pass; True if any rule fired."""
    rw = Rewriter(g)
    nodes, g.nodes = g.nodes, []
    repl: dict[Value, Value] = {}
    for n in nodes:
        n.inputs = [repl.get(v, v) for v in n.inputs]
        new = _rewrite(n, rw) if len(n.outputs) == 1 and n.op in RULES else None
        if new is None:
            g.nodes.append(n)
            continue
        repl[n.output] = new
        rw.uses[new] += rw.uses[n.output]
        rw.uses.subtract(n.inputs)
    _remap(g, repl)
    return bool(repl)


@register_pass("simplify")
def simplify(graph: Graph) -> Graph:
    """Algebraic simplification: identities, double negation, reshape/transpose chains, and the like."""
    g = graph.copy()
    for _ in range(MAX_SWEEPS):
        if not _sweep(g):
            return dce(g)   # drop what the rewrites left unused
    raise TdcError(f"internal: simplify did not settle after {MAX_SWEEPS} sweeps")


# ---- bnfold ---------------------------------------------------------------------------

def _known_ahead(v: Value) -> bool:
    """A param, state or const argument, or a constant: fixed for inference."""
    return v.kind in ("param", "state", "const") if v.is_arg else is_constant(v)


def _bn_of_conv(n: Node, uses: Counter) -> Node | None:
    """The conv2d feeding inference batchnorm n, when the pair can become one conv2d."""
    if n.op != "batchnorm" or n.attrs["training"]:
        return None
    conv = n.inputs[0].producer
    if conv is None or conv.op != "conv2d" or conv.placement != n.placement or uses[n.inputs[0]] != 1:
        return None
    if not all(_known_ahead(v) for v in n.inputs[1:]):
        return None
    return conv


@register_pass("bnfold")
def bnfold(graph: Graph) -> Graph:
    """Fold inference batchnorm into the conv2d before it (new weights and bias computed from params)."""
    g = graph.copy()
    uses = Counter(v for n in g.nodes for v in n.inputs)
    uses.update(g.roots())
    pairs = {n: conv for n in g.nodes if (conv := _bn_of_conv(n, uses)) is not None}
    folded = set(pairs.values())
    nodes, g.nodes = g.nodes, []
    repl: dict[Value, Value] = {}
    for n in nodes:
        if n in folded:
            continue   # emitted, with new weights, where its batchnorm was
        if n not in pairs:
            g.nodes.append(n)
            continue
        conv = pairs[n]
        x, w = conv.inputs[0], conv.inputs[1]
        gamma, beta, mean, var = n.inputs[1:]
        t = n.output.type

        def emit(op, inputs, attrs=None):
            return g.emit(op, inputs, attrs, placement=n.placement, loc=n.loc)[0]

        # scale = gamma / sqrt(var + eps), per output channel
        eps = emit("constant", [], {"value": np.asarray(n.attrs["eps"], t.np_dtype)})
        scale = emit("mul", [gamma, emit("rsqrt", [emit("add", [var, eps])])])
        w2 = emit("mul", [w, emit("reshape", [scale], {"shape": (w.type.shape[0], 1, 1, 1)})])
        if len(conv.inputs) == 3:
            b2 = emit("add", [emit("mul", [emit("sub", [conv.inputs[2], mean]), scale]), beta])
        else:
            b2 = emit("sub", [beta, emit("mul", [mean, scale])])
        (y,) = g.emit("conv2d", [x, w2, b2], dict(conv.attrs), placement=conv.placement, loc=conv.loc,
                      names=[n.output.name])
        if y.type != t:
            raise TdcError(f"internal: bnfold made {y.type} for a batchnorm of {t}")
        repl[n.output] = y
    _remap(g, repl)
    return g
