"""Pipeline parallelism: stages fed with micro-batches, scheduled GPipe or 1F1B.

    placed = place_by_stages(graph_at_microbatch, stages)      # passes/partition.py
    step = microbatch(placed, M)                                 # M copies of the forward pass
    step = autodiff(step)                                        # the backward, placed alike
    step = schedule_pipeline(step, M, K, "1f1b")                 # each rank's order

`microbatch` repeats a placed forward graph (traced at the micro-batch size) for M slices of the
batch: the params are shared, so autodiff sums their gradients over the micro-batches (gradient
accumulation); state such as batchnorm's running statistics is threaded from one micro-batch to
the next; the loss is the mean of the micro-batch losses (the full batch's mean when the
micro-batches are equal), the other batched outputs are concatenated.

`schedule_pipeline` orders the step so that each rank runs its units (F_k: the forward of
micro-batch k, B_k: its backward) in the schedule's order:
  * GPipe (Huang et al. 2019): F_0 .. F_{M-1}, then B_{M-1} .. B_0; every stage holds the
    activations of all M micro-batches at the turn;
  * 1F1B (PipeDream-flush, Narayanan et al. 2021): stage s runs min(K - 1 - s, M) forwards,
    then alternates one forward and one backward, then drains the backwards; a stage holds at
    most K - s micro-batches' activations.
Both have the same bubble, (K - 1) / (M + K - 1) of a step for equal stages. The order is
a topological order of the whole placed graph whose restriction to each rank is that rank's
schedule (a list scheduler builds it); messages then go out in one global order. The sums of
each param's gradient over the micro-batches are regrouped to follow the rank's backward
order, so a micro-batch's gradient is added as soon as it is made instead of being held.
"""
from __future__ import annotations

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value, placed_ranks, ranks_placement, upstream
from ..ir.types import TensorType, is_float
from ..ops import functional as F
from ..ops.tensor import Builder, Tensor
from .autodiff import GRAD_PREFIX
from .partition import LITERALS, Partition, place_by_stages, placed, plan_stages, world_size


def place_stages(graph: Graph, cfg: Partition, training: bool = True) -> Graph:
    """Model parallelism (cfg.strategy "model") or a pipeline: the forward graph's nodes split into
    cfg.ranks stages by the cost model (partition.plan_stages), with transfers at the cuts; a
    pipeline then repeats the placed forward pass for cfg.microbatches micro-batches."""
    chosen, _ = plan_stages(graph, cfg, training)
    placed_graph = place_by_stages(graph, chosen)
    return microbatch(placed_graph, cfg.microbatches) if cfg.strategy == "pipeline" else placed_graph


def _batched_inputs(graph: Graph) -> tuple[int, list[Value]]:
    if not graph.inputs or graph.inputs[0].type.rank < 1:
        raise TdcError(f"graph {graph.name}: micro-batches split the batch dimension of the inputs; the first "
                       "input has none")
    b = graph.inputs[0].type.shape[0]
    return b, [a for a in graph.inputs if a.type.rank >= 1 and a.type.shape[0] == b]


def microbatch(graph: Graph, m: int) -> Graph:
    """M copies of `graph` (traced at the micro-batch size b), each on rows [k*b, (k+1)*b) of the
    batched inputs (see the module's docstring)."""
    if m < 1:
        raise TdcError(f"the number of micro-batches must be >= 1, got {m}")
    if m == 1:
        return graph.copy()
    b, batched = _batched_inputs(graph)
    g = Graph(graph.name)
    args: dict[Value, Value] = {}
    for a in graph.args:
        t = TensorType(a.type.dtype, (m * b,) + a.type.shape[1:]) if a in batched else a.type
        args[a] = g.add_arg(a.name, t, a.kind, a.attrs)
    readers: dict[Value, set] = {a: set() for a in batched}
    world = world_size(graph)
    for n in graph.nodes:
        for v in n.inputs:
            if v in readers:
                readers[v] |= placed_ranks(n.placement) or set(range(world))
    copies: list[dict[str, Value]] = []
    carried: dict[Value, Value] = {}        # state arg -> the previous micro-batch's new value
    with Builder(g) as bld:
        for k in range(m):
            vmap: dict[Value, Value] = {**args, **carried}
            for a in batched:
                with placed(g, ranks_placement(readers[a]) if readers[a] else None):
                    lo, hi = [k * b] + [0] * (a.type.rank - 1), [(k + 1) * b] + list(a.type.shape[1:])
                    vmap[a] = F.slice(Tensor(args[a], bld), lo, hi).value
            for n in graph.nodes:
                outs = g.emit(n.op, [vmap[v] for v in n.inputs], dict(n.attrs), placement=n.placement, loc=n.loc)
                vmap.update(zip(n.outputs, outs))
            copies.append({name: vmap[v] for name, v in graph.outputs})
            carried = {t: vmap[v] for t, v in graph.updates}
        for name, v in graph.outputs:
            vals = [Tensor(c[name], bld) for c in copies]
            with placed(g, vals[0].value.producer.placement if vals[0].value.producer is not None else None):
                if v.type.shape == () and is_float(v.type.dtype):       # a loss: the mean over micro-batches
                    total = vals[0]
                    for t in vals[1:]:
                        total = total + t
                    out = total * (1.0 / m)
                elif v.type.rank >= 1 and v.type.shape[0] == b:
                    out = F.concat(vals, 0)
                else:
                    out = vals[-1]
            g.add_output(name, out.value)
    for t, _ in graph.updates:
        g.add_update(args[t], carried[t])
    return g


# ---- the schedule ---------------------------------------------------------------------------------

def unit_order(schedule: str, stage: int, stages: int, m: int) -> list[tuple[str, int]]:
    """The units stage `stage` of `stages` runs, in order: ("F", k) and ("B", k)."""
    if schedule == "gpipe":
        return [("F", k) for k in range(m)] + [("B", k) for k in reversed(range(m))]
    if schedule != "1f1b":
        raise TdcError(f"unknown pipeline schedule {schedule!r}; choose gpipe or 1f1b")
    warm = min(stages - 1 - stage, m)
    order = [("F", k) for k in range(warm)]
    for i in range(m - warm):
        order += [("F", warm + i), ("B", i)]
    return order + [("B", k) for k in range(m - warm, m)]


def schedule_pipeline(graph: Graph, m: int, schedule: str = "1f1b") -> Graph:
    """Order the micro-batched, differentiated step by the pipeline schedule on every rank (see
    the module's docstring). Run after autodiff, before the optimizer."""
    g = graph.copy()
    world = world_size(g)
    if m == 1 or world == 1:
        return g
    _, batched = _batched_inputs(g)
    micro = _micro_batches(g, batched)
    forward = _forward_nodes(g)
    seqs = {r: unit_order(schedule, r, world, m) + [("END", 0)] for r in range(world)}
    pos = {r: {u: i for i, u in enumerate(units)} for r, units in seqs.items()}

    def last_backward(r: int, ks: set[int]) -> tuple[str, int]:
        return max((("B", k) for k in ks), key=lambda u: pos[r][u])

    _regroup_sums(g, micro, forward, lambda r, k: pos[r][("B", k)])
    micro = _micro_batches(g, batched)

    def ranks_of(n: Node) -> list[int]:
        rk = placed_ranks(n.placement)
        return sorted(rk) if rk is not None else list(range(world))

    label: dict[Node, tuple[str, int]] = {}
    users = g.users()
    for n in reversed(g.nodes):
        if n.op in LITERALS:
            continue
        r0 = ranks_of(n)[0]
        ks = micro[n]
        if ks and n in forward:
            label[n] = ("F", max(ks))
        elif ks:
            label[n] = last_backward(r0, ks)
        else:       # made from params and literals alone: just before the first node that reads it
            after = [label[u] for v in n.outputs for u in users.get(v, []) if u in label]
            label[n] = min(after, key=lambda u: pos[r0][u], default=("END", 0))
    sent_by = _split_transfers(g, label)
    index = {n: i for i, n in enumerate(g.nodes)}
    sequenced = [n for n in g.nodes if n in label and (len(ranks_of(n)) == 1 or n.opdef.collective)]
    free = [n for n in g.nodes if n not in set(sequenced)]
    queue = {r: sorted((n for n in sequenced if r in ranks_of(n)), key=lambda n: (pos[r][label[n]], index[n]))
             for r in range(world)}
    at = {r: 0 for r in range(world)}
    done: set[Node] = set()
    order: list[Node] = []

    def ready(n: Node) -> bool:
        return all(v.producer is None or v.producer in done for v in n.inputs) and \
            (n not in sent_by or sent_by[n] in done)

    while len(order) < len(g.nodes):
        progress = False
        for n in free:
            if n not in done and ready(n):
                done.add(n)
                order.append(n)
                progress = True
        for r in range(world):
            while at[r] < len(queue[r]):
                n = queue[r][at[r]]
                if n in done:
                    at[r] += 1
                    continue
                if not ready(n) or any(queue[q][at[q]] is not n for q in ranks_of(n)):
                    break
                done.add(n)
                order.append(n)
                at[r] += 1
                progress = True
        if not progress:
            stuck = {r: queue[r][at[r]].op for r in range(world) if at[r] < len(queue[r])}
            raise TdcError(f"internal: the {schedule} schedule of {m} micro-batches cannot be ordered "
                           f"(each rank's next node: {stuck})")
    g.nodes = order
    return g


def _split_transfers(g: Graph, label: dict) -> dict[Node, Node]:
    """Each transfer as a send on its source and a recv on its destination (in place), each in
    the transfer's unit: in a pipeline the two ranks reach the two halves at different points of
    their schedules (1F1B's stage 0 sends micro-batch 1 forward before it receives micro-batch
    0's gradient, which its successor sends before it receives micro-batch 1), so one node could
    not stand in both orders. Every send gets a tag of its own. Returns recv -> its send."""
    sent_by: dict[Node, Node] = {}
    replaced: dict[Value, Value] = {}
    order: list[Node] = []
    for n in g.nodes:
        n.inputs = [replaced.get(v, v) for v in n.inputs]
        if n.op != "transfer":
            order.append(n)
            continue
        src, dst, v = n.attrs["src"], n.attrs["dst"], n.outputs[0]
        tag = len(sent_by)
        g.emit("send", [n.inputs[0]], {"dst": dst, "tag": tag}, placement=f"rank:{src}", loc=n.loc)
        (got,) = g.emit("recv", [], {"src": src, "tag": tag, "shape": v.type.shape, "dtype": v.type.dtype},
                        placement=f"rank:{dst}", loc=n.loc, names=[v.name])
        send, recv = g.nodes[-2], g.nodes[-1]
        del g.nodes[-2:]
        label[send] = label[recv] = label[n]
        sent_by[recv] = send
        replaced[v] = got
        order += [send, recv]
    g.nodes = order
    g.outputs = [(name, replaced.get(v, v)) for name, v in g.outputs]
    g.updates = [(t, replaced.get(v, v)) for t, v in g.updates]
    return sent_by


def _micro_batches(g: Graph, batched: list[Value]) -> dict[Node, set[int]]:
    """For each node, the micro-batches whose rows it depends on."""
    of: dict[Value, set[int]] = {}
    out: dict[Node, set[int]] = {}
    for n in g.nodes:
        ks: set[int] = set()
        for v in n.inputs:
            ks |= of.get(v, set())
        if n.op == "slice" and n.inputs[0] in batched:     # a micro-batch's rows, b of them
            ks = {n.attrs["starts"][0] // max(1, n.attrs["ends"][0] - n.attrs["starts"][0])}
        out[n] = ks
        for v in n.outputs:
            of[v] = ks
    return out


def _forward_nodes(g: Graph) -> set[Node]:
    """The nodes the step's forward results need (its outputs other than gradients, and its
    updates); the others are the backward pass."""
    return upstream([v for name, v in g.outputs if not name.startswith(GRAD_PREFIX)] + [v for _, v in g.updates])


def _regroup_sums(g: Graph, micro: dict, forward: set, backward_pos) -> None:
    """Rebuild each chain of adds that sums per-micro-batch gradients (autodiff adds them in the
    reverse of the forward order) in the order the rank makes them (in place)."""
    users = g.users()
    roots = set(g.roots())

    def chained(v: Value) -> bool:    # v is an add's result read only by the next add of its chain
        p = v.producer
        us = users.get(v, [])
        return p is not None and p.op == "add" and len(us) == 1 and us[0].op == "add" and v not in roots \
            and us[0].placement == p.placement and us[0].outputs[0].type == v.type

    replaced: dict[Value, Value] = {}
    drop: set[Node] = set()
    insert: dict[Node, list[Node]] = {}
    for n in g.nodes:
        if n.op != "add" or n in forward or (chained(n.outputs[0])):
            continue
        leaves, inner, stack = [], [], [n]
        while stack:
            a = stack.pop()
            inner.append(a)
            for v in a.inputs:
                (stack.append(v.producer) if chained(v) else leaves.append(v))
        ks = [micro.get(v.producer, set()) if v.producer is not None else set() for v in leaves]
        if len(leaves) < 3 or any(len(k) != 1 for k in ks) or len({next(iter(k)) for k in ks}) != len(ks) \
                or any(v.type != n.outputs[0].type for v in leaves):
            continue
        rank = min(placed_ranks(n.placement) or {0})
        leaves = [v for _, v in sorted(zip(ks, leaves), key=lambda kv: backward_pos(rank, next(iter(kv[0]))))]
        mark = len(g.nodes)
        total = leaves[0]
        for v in leaves[1:]:
            (total,) = g.emit("add", [total, v], placement=n.placement, loc=n.loc)
        insert[n] = g.nodes[mark:]
        del g.nodes[mark:]
        drop.update(inner)
        replaced[n.outputs[0]] = total
    if not replaced:
        return
    order = []
    for n in g.nodes:
        if n in insert:
            order.extend(insert[n])
        if n not in drop:
            order.append(n)
    g.nodes = order
    for n in g.nodes:
        n.inputs = [replaced.get(v, v) for v in n.inputs]
    g.outputs = [(name, replaced.get(v, v)) for name, v in g.outputs]
    g.updates = [(t, replaced.get(v, v)) for t, v in g.updates]
