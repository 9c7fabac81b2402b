"""Tensor parallelism: a linear layer's weight split across the ranks (Megatron-LM's MLP split).

Every rank runs the whole step (its nodes are placed on all ranks), except the linear layers
the cost model splits. A layer y = x W^T + b (W is [out, in]) is split

  * by output columns: rank r holds rows r of W (and b), computes its slice of y from the whole
    x; the slices stay on their ranks ("split" layout) or are gathered (concat_ranks);
  * by input rows: rank r holds columns r of W and computes x_r W_r^T from its slice of x (its
    piece of a split value, or a slice of a whole one); the partial sums are added (sum_ranks)
    and b is added to the total.

So a column split followed by elementwise ops and a row split needs one message in the forward
pass (the row split's sum) and one in the backward pass (the column split's input gradient,
summed by autodiff over the ranks), as Megatron's MLP does. Which layers split, and how, is a
dynamic program over each chain of linear and elementwise ops with two layouts of the value
between them (whole on every rank, or split by columns), pricing compute (fwd + bwd, from the
cost model, divided by K where split) and each message (alpha-beta: a ring allgather or
allreduce). A layer too small to pay for its messages stays whole.

The pieces are params of their own, `fc1.weight[0:150]` (rows) or `fc1.weight[:,0:392]`
(columns), each initialised as that part of the whole param (init="piece"), so a split run
starts from the same values as one process; frontend/init.py puts them back together.
"""
from __future__ import annotations

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value, ranks_placement
from ..ir.types import TensorType
from ..ops import functional as F
from ..ops.tensor import Builder, Tensor
from .partition import LITERALS, Partition, forward_costs, placed

WHOLE, SPLIT = "whole", "split"


def _allgather_seconds(nbytes: int, k: int, net) -> float:
    return (k - 1) * net.alpha + (k - 1) / k * nbytes * net.beta


def _allreduce_seconds(nbytes: int, k: int, net) -> float:
    return 2 * (k - 1) * net.alpha + 2 * (k - 1) / k * nbytes * net.beta


def _column_local(n: Node, prev: Value) -> bool:
    """An elementwise op that works on each column piece alone: its other inputs are scalars."""
    if n.opdef.family != "elementwise" or n.op in LITERALS or not n.outputs or n.inputs[0] is not prev:
        return False
    if n.outputs[0].type.shape != prev.type.shape:
        return False
    return all(v.type.shape == () and v.producer is not None and v.producer.op in LITERALS for v in n.inputs[1:])


def linear_chains(graph: Graph) -> list[list[Node]]:
    """Maximal runs linear -> (elementwise | linear)* where each value feeds only the next node and
    every linear takes a matrix [batch, features]."""
    users = graph.users()
    roots = set(graph.roots())
    in_chain: set[Node] = set()
    chains = []
    for n in graph.nodes:
        if n in in_chain or n.op != "linear" or n.inputs[0].type.rank != 2:
            continue
        chain = [n]
        while True:
            v = chain[-1].outputs[0]
            us = users.get(v, [])
            if len(us) != 1 or v in roots:
                break
            c = us[0]
            if (c.op == "linear" and c.inputs[0] is v and c.inputs[0].type.rank == 2) or _column_local(c, v):
                chain.append(c)
            else:
                break
        while chain[-1].op != "linear":        # a chain ends at a layer: trailing ops run whole
            chain.pop()
        in_chain.update(chain)
        chains.append(chain)
    return chains


def plan_layouts(chain: list[Node], costs: dict[Node, float], cfg: Partition, needs_grad: bool) -> list[str]:
    """For each node of the chain, how it runs: "whole", "columns" or "rows" for a linear,
    "split" or "whole" for an elementwise op. The cheapest by the dynamic program above."""
    k, net = cfg.ranks, cfg.net
    INF = float("inf")
    # state: the layout of the value the previous node made -> (seconds, choices)
    best = {WHOLE: (0.0, [])}
    grad_in = needs_grad          # whether the chain's input needs a gradient (messages backward)
    for n in chain:
        t = costs.get(n, 0.0)
        nxt: dict[str, tuple[float, list]] = {}

        def offer(layout, secs, choices):
            if secs < nxt.get(layout, (INF, None))[0]:
                nxt[layout] = (secs, choices)
        for layout, (secs, choices) in best.items():
            x = n.inputs[0]
            gather = _allgather_seconds(x.type.nbytes, k, net) if layout == SPLIT else 0.0
            if n.op == "linear":
                out = n.outputs[0].type.nbytes
                back = _allreduce_seconds(x.type.nbytes, k, net) if grad_in else 0.0
                offer(WHOLE, secs + gather + t, choices + ["whole"])
                # every rank's column piece reads the whole x: autodiff sums their input gradients
                offer(SPLIT, secs + gather + t / k + back, choices + ["columns"])
                rows_back = back if layout == WHOLE else 0.0
                offer(WHOLE, secs + t / k + _allreduce_seconds(out, k, net) + rows_back, choices + ["rows"])
            else:
                offer(layout, secs + (t / k if layout == SPLIT else t), choices + [layout])
        best = nxt
        grad_in = True
    end = {lay: secs + (_allgather_seconds(chain[-1].outputs[0].type.nbytes, k, net) if lay == SPLIT else 0.0)
           for lay, (secs, _) in best.items()}
    return best[min(end, key=end.get)][1]


def describe_layouts(graph: Graph, cfg: Partition, training: bool = True) -> str:
    """Each chain's plan: how every linear layer runs, and what the cost model priced."""
    costs = forward_costs(graph, cfg.target, training)
    active = _active(graph)
    lines = []
    for chain in linear_chains(graph):
        plan = plan_layouts(chain, costs, cfg, training and chain[0].inputs[0] in active)
        for n, how in zip(chain, plan):
            w = f" {list(n.inputs[1].type.shape)}" if n.op == "linear" else ""
            lines.append(f"  {n.op}{w} ({n.outputs[0].name or n.loc or ''}): {how}, "
                         f"{costs.get(n, 0.0) * 1e3:.3f} ms on one rank")
    return "\n".join(lines) or "  (no chain of linear layers)"


def _bounds(n: int, k: int) -> list[tuple[int, int]]:
    cuts = [n * r // k for r in range(k + 1)]
    return list(zip(cuts, cuts[1:]))


def tensor_parallel(graph: Graph, cfg: Partition, training: bool = True) -> Graph:
    """Place `graph` on cfg.ranks ranks with its linear layers split where the cost model says
    (see the module's docstring). Every other node runs on every rank."""
    k = cfg.ranks
    every = ranks_placement(range(k))
    costs = forward_costs(graph, cfg.target, training)
    active = _active(graph)
    plans: dict[Node, str] = {}
    for chain in linear_chains(graph):
        for n, how in zip(chain, plan_layouts(chain, costs, cfg, training and chain[0].inputs[0] in active)):
            plans[n] = how
    if not any(v in ("columns", "rows") for v in plans.values()):
        raise TdcError(f"--parallel tensor: no linear layer of {graph.name} is worth splitting over {k} ranks by "
                       "the cost model (its messages would cost more than the compute they save); try fewer ranks or "
                       "--parallel model")
    g = Graph(graph.name)
    vmap: dict[Value, Value] = {a: g.add_arg(a.name, a.type, a.kind, a.attrs) for a in graph.args}
    pieces: dict[Value, list[Value]] = {}       # a split value: its piece on each rank
    with Builder(g) as b:
        def whole(v: Value) -> Value:
            if v in vmap:
                return vmap[v]
            with placed(g, every):
                vmap[v] = F.apply("concat_ranks", *[Tensor(p, b) for p in pieces[v]], axis=1).value
            return vmap[v]

        for n in graph.nodes:
            how = plans.get(n)
            if how in ("columns", "rows"):
                _split_linear(g, b, n, how, k, whole, pieces, vmap)
            elif how == "split":
                outs = []
                for r, p in enumerate(pieces[n.inputs[0]]):
                    with placed(g, f"rank:{r}"):
                        (o,) = g.emit(n.op, [p] + [vmap[v] for v in n.inputs[1:]], dict(n.attrs), loc=n.loc)
                    outs.append(o)
                pieces[n.outputs[0]] = outs
            else:
                with placed(g, every):
                    outs = g.emit(n.op, [whole(v) for v in n.inputs], dict(n.attrs), loc=n.loc,
                                  names=[v.name for v in n.outputs])
                vmap.update(zip(n.outputs, outs))
        for name, v in graph.outputs:
            g.add_output(name, whole(v))
        for t, v in graph.updates:
            g.add_update(vmap[t], whole(v))
    return g


def _active(graph: Graph) -> set[Value]:
    """Values that depend on a param (they carry gradients)."""
    active: set[Value] = set(graph.params)
    for n in graph.nodes:
        if any(v in active for v in n.inputs):
            active.update(n.outputs)
    return active


def piece_arg(b: Builder, whole: Value, axis: int, lo: int, hi: int) -> Tensor:
    """The param holding elements [lo, hi) of `whole` along `axis`, initialised as that part."""
    shape = list(whole.type.shape)
    shape[axis] = hi - lo
    name = f"{whole.name}[{lo}:{hi}]" if axis == 0 else f"{whole.name}[{':,' * axis}{lo}:{hi}]"
    return b.arg(name, TensorType(whole.type.dtype, tuple(shape)), whole.kind, init="piece", of=whole.name,
                 axis=axis, start=lo, stop=hi, whole_init=whole.attrs.get("init", "zeros"),
                 whole_shape=list(whole.type.shape))


def _split_linear(g: Graph, b: Builder, n: Node, how: str, k: int, whole, pieces, vmap) -> None:
    x, w = n.inputs[0], n.inputs[1]
    bias = n.inputs[2] if len(n.inputs) > 2 else None
    if not w.is_arg or (bias is not None and not bias.is_arg):
        raise TdcError(f"--parallel tensor: linear{' at ' + n.loc if n.loc else ''} computes its weight; only "
                       "params are split")
    out_f, in_f = w.type.shape
    if how == "columns":
        parts = []
        xw = Tensor(whole(x), b)
        for r, (lo, hi) in enumerate(_bounds(out_f, k)):
            with placed(g, f"rank:{r}"):
                wr = piece_arg(b, w, 0, lo, hi)
                br = piece_arg(b, bias, 0, lo, hi) if bias is not None else None
                parts.append(F.linear(xw, wr, br).value)
        pieces[n.outputs[0]] = parts
        return
    partial = []
    for r, (lo, hi) in enumerate(_bounds(in_f, k)):
        with placed(g, f"rank:{r}"):
            if x in pieces:
                xr = Tensor(pieces[x][r], b)
                if xr.shape[1] != hi - lo:
                    raise TdcError("internal: a row split of a value split differently")
            else:
                xr = F.slice(Tensor(vmap[x], b), [0, lo], [x.type.shape[0], hi])
            partial.append(F.linear(xr, piece_arg(b, w, 1, lo, hi)))
    with placed(g, ranks_placement(range(k))):
        y = F.apply("sum_ranks", *partial)
        if bias is not None:
            y = y + Tensor(vmap[bias], b)
    vmap[n.outputs[0]] = y.value

