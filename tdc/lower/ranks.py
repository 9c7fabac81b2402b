"""One rank's program of a partitioned step: what each backend compiles on each rank.

A partitioned graph (passes/partition.py) is one global graph whose nodes are placed on ranks
(`@rank:1`, `@ranks:0..3`) and whose only nodes reading values held elsewhere are `transfer`,
`concat_ranks` and `sum_ranks`. `rank_program(graph, r)` keeps the nodes rank r runs, in the
global order, and turns those three into rank r's messages:

    transfer {src, dst}      send on src, recv on dst
    concat_ranks             allgather over all ranks (or, over some of them, sends to the
                             first, which concatenates and sends the result back)
    sum_ranks                allreduce over all ranks (or, over some, the same through the first)

The result has no placements: any backend compiles it as an ordinary graph (with the send,
recv, allreduce and allgather its communicator carries out). Because every rank's program is
the global order restricted to its nodes, the messages are posted in one consistent order,
and with sends that never block (the communicators copy and post them) no schedule deadlocks.
The reference interpreter runs the global graph itself on simulated ranks: the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value, placed_ranks, upstream
from ..ops.common import norm_axis
from ..passes.data_parallel import NETWORKS, choose_allreduce

LITERALS = ("constant", "full")
PARTITION_OPS = ("transfer", "concat_ranks", "sum_ranks")
STAGED_OPS = ("push", "pull")


def is_partitioned(graph: Graph) -> bool:
    """A graph whose nodes are placed on ranks and that each rank runs as a program of its own
    (a parameter server's placed step runs on the staged runtime instead)."""
    placed = any(n.placement is not None for n in graph.nodes)
    return placed and not any(n.op in STAGED_OPS for n in graph.nodes)


def world_of(graph: Graph) -> int:
    """The ranks a placed graph runs on: one more than the highest rank any node names."""
    return 1 + max((r for n in graph.nodes for r in placed_ranks(n.placement) or ()), default=0)


def node_ranks(node: Node, world: int) -> list[int]:
    ranks = placed_ranks(node.placement)
    return sorted(ranks) if ranks is not None else list(range(world))


@dataclass
class RankGraph:
    rank: int
    world: int
    graph: Graph              # this rank's program: no placements
    updated: list[str]        # the params and state this rank computes new values of
    origin: dict              # each value of the program -> the value of the placed step it stands for


def rank_program(graph: Graph, rank: int, world: int | None = None) -> RankGraph:
    """Rank `rank`'s program of the partitioned graph `graph` (see the module's docstring)."""
    world = world or world_of(graph)
    if not 0 <= rank < world:
        raise TdcError(f"rank {rank} is outside the {world} ranks graph {graph.name} is placed on")
    g = Graph(f"{graph.name}.rank{rank}")
    vmap: dict[Value, Value] = {}
    tags: dict[tuple[int, int], int] = {}      # (src, dst) -> messages so far: each send's tag

    def value(v: Value, node: Node) -> Value:
        if v in vmap:
            return vmap[v]
        if v.producer is None:
            vmap[v] = g.add_arg(v.name, v.type, v.kind, v.attrs)
            return vmap[v]
        where = f" ({node.loc})" if node.loc else ""
        raise TdcError(f"{node.op}{where} on rank {rank} reads a value made by {v.producer.op} on "
                       f"{v.producer.placement or 'every rank'}, which rank {rank} does not hold: the partition "
                       "needs a transfer there")

    def emit(op: str, inputs: list[Value], attrs: dict, node: Node, names=None) -> list[Value]:
        return g.emit(op, inputs, attrs, loc=node.loc, names=names)

    def tag(src: int, dst: int) -> int:
        t = tags.get((src, dst), 0)
        tags[(src, dst)] = t + 1
        return t

    for n in _live_nodes(graph, rank, world):
        ranks = node_ranks(n, world)
        if n.op in LITERALS:
            out = emit(n.op, [], dict(n.attrs), n, [v.name for v in n.outputs])
            vmap[n.outputs[0]] = out[0]
            continue
        if n.op == "transfer":
            src, dst = n.attrs["src"], n.attrs["dst"]
            t = tag(src, dst)
            v = n.outputs[0]
            if rank == src:
                emit("send", [value(n.inputs[0], n)], {"dst": dst, "tag": t}, n)
                vmap[v] = vmap[n.inputs[0]]
            else:
                vmap[v] = emit("recv", [], {"src": src, "tag": t, "shape": v.type.shape, "dtype": v.type.dtype},
                               n, [v.name])[0]
            continue
        if n.op in ("concat_ranks", "sum_ranks"):
            vmap[n.outputs[0]] = _collective(g, n, rank, ranks, world, value, emit, tag)
            continue
        outs = emit(n.op, [value(v, n) for v in n.inputs], dict(n.attrs), n, [v.name for v in n.outputs])
        for v, w in zip(n.outputs, outs):
            vmap[v] = w
    updated = []
    for t, v in graph.updates:
        if v in vmap:
            target = vmap.get(t) or g.add_arg(t.name, t.type, t.kind, t.attrs)
            vmap[t] = target
            g.add_update(target, vmap[v])
            updated.append(t.name)
    for name, v in graph.outputs:
        if v in vmap and v.producer is not None:
            g.add_output(name, vmap[v])
    return RankGraph(rank, world, g, updated, {w: v for v, w in vmap.items()})


def forward_values(graph: Graph) -> set[Value]:
    """The values of a placed step's forward pass: those its outputs other than gradients depend
    on, through the messages between ranks too (a send and the recv with its source, destination
    and tag are one edge)."""
    from ..passes.autodiff import GRAD_PREFIX
    sends = {(n.placement, n.attrs["dst"], n.attrs["tag"]): n for n in graph.nodes if n.op == "send"}

    def send_of(n: Node) -> list[Node]:
        if n.op != "recv":
            return []
        found = (sends.get((f"rank:{n.attrs['src']}", dst, n.attrs["tag"])) for dst in placed_ranks(n.placement) or ())
        return [s for s in found if s is not None]
    seen = upstream([v for name, v in graph.outputs if not name.startswith(GRAD_PREFIX)], send_of)
    return {v for n in seen for v in n.outputs}


def activation_peak(graph: Graph, rank: int) -> int:
    """The most bytes of forward values (activations) rank `rank`'s program holds at once, in the
    order it runs them: what a pipeline schedule changes."""
    from .memplan import plan_memory
    forward = forward_values(graph)
    prog = rank_program(graph, rank)
    plan = plan_memory(prog.graph)
    live = [0] * (len(plan.kernels) + 2)
    for v, (a, b) in plan.intervals.items():
        if prog.origin.get(v) in forward:
            for t in range(a, b + 1):
                live[t] += v.type.nbytes
    return max(live)


def _live_nodes(graph: Graph, rank: int, world: int) -> list[Node]:
    """The nodes rank `rank` runs, without those whose results it neither needs nor sends: a node
    placed on every rank (an optimizer's scaling of a param's momentum, say) is computed only
    where the rest of that param's update runs. Communication nodes always stay: the other
    ranks wait for this one's part."""
    runs = [n for n in graph.nodes if n.op in LITERALS or rank in node_ranks(n, world)]
    mine = {v for n in runs for v in n.outputs}
    live: set[Value] = {v for _, v in graph.updates if v in mine} | {v for _, v in graph.outputs if v in mine}
    kept = []
    for n in reversed(runs):
        if n.opdef.family == "comm" or n.opdef.side_effect or any(v in live for v in n.outputs):
            kept.append(n)
            live.update(n.inputs)
    return kept[::-1]


def _collective(g: Graph, n: Node, rank: int, ranks: list[int], world: int, value, emit, tag) -> Value:
    """Rank `rank`'s part of a concat_ranks or sum_ranks node over `ranks`."""
    if len(n.inputs) != len(ranks):
        raise TdcError(f"{n.op} of {len(n.inputs)} pieces placed on ranks {ranks}: one piece per rank")
    mine = value(n.inputs[ranks.index(rank)], n)
    out = n.outputs[0]
    if ranks == list(range(world)):
        if n.op == "sum_ranks":
            algo = choose_allreduce(out.type.nbytes, world, NETWORKS["shm"])
            return emit("allreduce", [mine], {"op": "sum", "algo": algo, "world": world}, n, [out.name])[0]
        ax = norm_axis(n.attrs["axis"], out.type.rank)
        return emit("allgather", [mine], {"axis": ax, "sizes": [v.type.shape[ax] for v in n.inputs], "world": world},
                    n, [out.name])[0]
    # over some of the ranks: through the first of them, which combines the pieces in rank order
    first = ranks[0]
    if rank != first:
        emit("send", [mine], {"dst": first, "tag": tag(rank, first)}, n)
        return emit("recv", [], {"src": first, "tag": tag(first, rank), "shape": out.type.shape,
                                 "dtype": out.type.dtype}, n, [out.name])[0]
    pieces = [mine]
    for q in ranks[1:]:
        v = n.inputs[ranks.index(q)]
        pieces.append(emit("recv", [], {"src": q, "tag": tag(q, first), "shape": v.type.shape,
                                        "dtype": v.type.dtype}, n)[0])
    if n.op == "sum_ranks":
        total = pieces[0]
        for p in pieces[1:]:
            total = emit("add", [total, p], {}, n)[0]
    else:
        total = emit("concat", pieces, {"axis": n.attrs["axis"]}, n, [out.name])[0]
    for q in ranks[1:]:
        emit("send", [total], {"dst": q, "tag": tag(first, q)}, n)
    return total


# ---- a timeline of the rank programs ---------------------------------------------------------

@dataclass
class Timeline:
    """Each rank's time busy and idle in one step (seconds), and the step's end."""
    busy: list[float]
    idle: list[float]
    end: float

    @property
    def bubble(self) -> float:
        """The mean over ranks of the time idle over the step's time."""
        return sum(i / self.end for i in self.idle) / len(self.idle) if self.end > 0 else 0.0


def simulate(graph: Graph, rates, net) -> Timeline:
    """Run every rank's program of the partitioned `graph` on a model of the machine: each node
    takes its roofline time (passes/partition.op_seconds at `rates`, (GEMM flop/s, copy bytes/s)),
    a message of n bytes arrives alpha + n * beta after its send (which never blocks), a
    collective ends for every rank once the last has started it, plus the alpha-beta time of its
    algorithm. What the schedule leaves idle is what a step would wait on ideal hardware."""
    from ..passes.data_parallel import allreduce_time
    from ..passes.partition import op_seconds
    world = world_of(graph)
    progs = [rank_program(graph, r, world).graph.nodes for r in range(world)]
    at = [0] * world
    clock = [0.0] * world
    busy = [0.0] * world
    arrivals: dict[tuple[int, int, int], float] = {}     # (src, dst, tag) -> when the message is there
    started: dict[int, dict[int, float]] = {}           # k-th collective -> rank -> when it started
    done: dict[int, float] = {}
    seen_collectives = [0] * world
    while any(at[r] < len(progs[r]) for r in range(world)):
        moved = False
        for r in range(world):
            while at[r] < len(progs[r]):
                n = progs[r][at[r]]
                if n.op == "send":
                    arrivals[(r, n.attrs["dst"], n.attrs["tag"])] = clock[r] + net.alpha + \
                        n.inputs[0].type.nbytes * net.beta
                elif n.op == "recv":
                    key = (n.attrs["src"], r, n.attrs["tag"])
                    if key not in arrivals:
                        break
                    clock[r] = max(clock[r], arrivals[key])
                elif n.op in ("allreduce", "allgather"):
                    k = seen_collectives[r]
                    if k not in done:
                        started.setdefault(k, {})[r] = clock[r]
                        if len(started[k]) < world:
                            break
                        nbytes = n.outputs[0].type.nbytes
                        cost = allreduce_time("ring", nbytes, world, net) if n.op == "allreduce" else \
                            (world - 1) * (net.alpha + nbytes / world * net.beta)
                        done[k] = max(started[k].values()) + cost
                    clock[r] = max(clock[r], done[k])
                    seen_collectives[r] += 1
                else:
                    t = op_seconds(n, rates)
                    clock[r] += t
                    busy[r] += t
                at[r] += 1
                moved = True
        if not moved:
            raise TdcError("internal: the rank programs wait for each other in a cycle")
    end = max(clock)
    return Timeline(busy, [end - b for b in busy], end)
