"""Partitioning a step across ranks: model, pipeline, tensor and spatial parallelism.

Every strategy is a placement of the graph's nodes on ranks with the communication made
explicit (DESIGN.md, "Distribution"): a node runs on the ranks of its placement (`@rank:1`,
`@ranks:0..3`), a value lives where its producer runs, and the only nodes that read values held
elsewhere are `transfer`, `concat_ranks` and `sum_ranks` (ops/comm.py). Autodiff places each
gradient node where its forward node runs and adds gradients made on different ranks with a
`sum_ranks`, so the backward pass's messages follow from the forward pass's; `place_rest`
then puts the optimizer's nodes where their inputs are. lower/ranks.py cuts the result into one
program per rank; the reference interpreter runs it on simulated ranks (the oracle).

This module holds what the strategies share: the settings (`Partition`), the cost model, the
split of a chain of layers into stages (`split_stages`, a dynamic program) and its naive
baseline, placing a graph by stages with transfers at the cuts, and routing the outputs to
rank 0. Pipelines (micro-batches, GPipe and 1F1B schedules) are in pipeline.py, tensor
parallelism in tensor_parallel.py, spatial partitioning in spatial.py.

Why a dynamic program over a topological order and not a min-cut: the stages of a pipeline
must be contiguous in the order the step runs (a stage that took a later layer and gave up an
earlier one would send activations backwards and idle), and for the chains and near-chains of
layers that networks are, the DP over contiguous segments finds the exact optimum of the
bottleneck objective in O(K N^2); Kernighan-Lin bisection optimises a cut size, not the slowest
stage, and would need repair to keep stages contiguous. For graphs with branches the DP still
gives contiguous segments of one topological order (what PipeDream does on its layer graph).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value, held_on, placed_ranks, ranks_placement
from ..ir.types import is_float
from ..ops import functional as F
from ..ops.tensor import Builder, Tensor
from .autodiff import autodiff, pick_loss
from .data_parallel import NETWORKS, Network

STRATEGIES = ("model", "pipeline", "tensor", "spatial")
SCHEDULES = ("gpipe", "1f1b")
PARTITIONERS = ("auto", "equal")
LITERALS = ("constant", "full")
COMM_OPS = ("transfer", "concat_ranks", "sum_ranks")


@dataclass
class Partition:
    """`tdc train/compile/dump --ranks K --parallel model|pipeline|tensor|spatial`.

    microbatches: a pipeline's M (the batch is split into M micro-batches, gradients summed over
    them); schedule: gpipe (all forwards, then all backwards) or 1f1b (one forward, one backward
    in the steady state); partitioner: auto (the cost model's optimal stages) or equal (the
    same number of layers per stage, the naive baseline); network: what communication costs.
    target: the compiled backend's Target, whose calibrated rates price the nodes (None: the
    relative costs of FLOPs and bytes at nominal rates)."""
    strategy: str
    ranks: int
    microbatches: int = 1
    schedule: str = "1f1b"
    partitioner: str = "auto"
    network: str = "shm"
    target: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise TdcError(f"unknown partitioning {self.strategy!r}; choose from {', '.join(STRATEGIES)} (or data)")
        if self.ranks < 2:
            raise TdcError(f"--parallel {self.strategy} needs --ranks K with K >= 2, got {self.ranks}")
        if self.microbatches < 1:
            raise TdcError(f"--microbatches must be >= 1, got {self.microbatches}")
        if self.microbatches > 1 and self.strategy != "pipeline":
            raise TdcError("--microbatches splits the batch of a pipeline: use it with --parallel pipeline")
        if self.schedule not in SCHEDULES:
            raise TdcError(f"unknown pipeline schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.partitioner not in PARTITIONERS:
            raise TdcError(f"unknown partitioner {self.partitioner!r}; choose from {', '.join(PARTITIONERS)}")
        if self.network not in NETWORKS:
            raise TdcError(f"unknown network {self.network!r}; choose from {', '.join(NETWORKS)}")

    @property
    def net(self) -> Network:
        return NETWORKS[self.network]

    def split_batch(self, batch: int) -> int:
        """The batch a model is traced at: a pipeline's micro-batch; every other strategy has
        every rank work on the whole batch."""
        if self.strategy != "pipeline":
            return batch
        if batch % self.microbatches:
            raise TdcError(f"a batch of {batch} does not split into {self.microbatches} micro-batches: choose a "
                           f"batch that is a multiple of {self.microbatches}")
        return batch // self.microbatches


# ---- the cost model -----------------------------------------------------------------------------

NOMINAL_FLOPS, NOMINAL_BYTES = 1e10, 1e10   # with no target: FLOPs and bytes weigh alike


def _rates(target) -> tuple[float, float]:
    if target is None:
        return NOMINAL_FLOPS, NOMINAL_BYTES
    r = target.rates()
    return r.gemm_flops, r.copy_bytes


def node_flops(node: Node) -> float:
    """The registry's FLOP count of one node (one per output element where an op gives none)."""
    ins, outs = [v.type for v in node.inputs], [v.type for v in node.outputs]
    return node.opdef.cost(ins, outs, **node.attrs) if node.opdef.cost else sum(t.size for t in outs)


def op_seconds(node: Node, rates: tuple[float, float]) -> float:
    """A roofline estimate of one node: its FLOPs (the registry's cost) at the target's measured
    GEMM rate or its bytes read and written at the measured copy rate, whichever takes longer.
    Views (reshape, flatten), literals and communication cost nothing here."""
    if node.op in LITERALS or node.op in ("reshape", "flatten") or node.opdef.family == "comm":
        return 0.0
    nbytes = sum(v.type.nbytes for v in node.inputs + node.outputs)
    return max(node_flops(node) / rates[0], nbytes / rates[1])


def forward_costs(graph: Graph, target=None, training: bool = True) -> dict[Node, float]:
    """Seconds per node of `graph`, each charged also with the gradient nodes autodiff makes for
    it (the backward pass runs where its forward node runs)."""
    rates = _rates(target)
    costs = {n: op_seconds(n, rates) for n in graph.nodes}
    if training and any(a.kind == "param" for a in graph.args) and _has_loss(graph):
        origins: dict[Node, int] = {}
        autodiff(graph, origins=origins)
        for n, i in origins.items():
            costs[graph.nodes[i]] += op_seconds(n, rates)
    return costs


def _has_loss(graph: Graph) -> bool:
    try:
        pick_loss(graph, None)
        return True
    except TdcError:
        return False


# ---- stages: contiguous segments of the forward order -------------------------------------------

@dataclass
class Stages:
    """A split of `nodes` (the forward nodes in order) at `cuts` (cuts[s] is the index of stage
    s's first node; cuts[0] = 0), priced: compute seconds and communication seconds per stage,
    and the bytes each cut sends per step (activations forward, their gradients backward)."""
    nodes: list[Node]
    cuts: list[int]
    compute: list[float]
    comm: list[float]
    cut_bytes: list[int]

    @property
    def ranks(self) -> int:
        return len(self.cuts)

    def rank_of(self, i: int) -> int:
        return max(s for s, c in enumerate(self.cuts) if c <= i)

    @property
    def cost(self) -> float:
        """The slowest stage's compute plus communication: what bounds a step."""
        return max(c + m for c, m in zip(self.compute, self.comm))

    @property
    def balance(self) -> float:
        """max / mean of the stages' compute (1 is perfect balance)."""
        mean = sum(self.compute) / len(self.compute)
        return max(self.compute) / mean if mean > 0 else 1.0

    @property
    def bytes_per_step(self) -> int:
        return sum(self.cut_bytes)


class ChainCosts:
    """Prefix sums of node costs and the price of cutting the order before each position."""

    def __init__(self, nodes: list[Node], costs: dict[Node, float], net: Network, training: bool):
        self.nodes, self.net = nodes, net
        self.prefix = [0.0]
        for n in nodes:
            self.prefix.append(self.prefix[-1] + costs.get(n, 0.0))
        pos = {n: i for i, n in enumerate(nodes)}
        last_use: dict[Value, int] = {}
        for i, n in enumerate(nodes):
            for v in n.inputs:
                if v.producer in pos:
                    last_use[v] = max(last_use.get(v, -1), i)
        self.bytes = [0] * (len(nodes) + 1)      # bytes crossing a cut before position c, both directions
        self.messages = [0] * (len(nodes) + 1)
        for v, last in last_use.items():
            made = pos[v.producer]
            back = 2 if training and is_float(v.type.dtype) else 1     # its gradient comes back
            for c in range(made + 1, last + 1):
                self.bytes[c] += back * v.type.nbytes
                self.messages[c] += back

    def compute(self, i: int, j: int) -> float:
        return self.prefix[j] - self.prefix[i]

    def cut_seconds(self, c: int) -> float:
        if c <= 0 or c >= len(self.nodes):
            return 0.0
        return self.messages[c] * self.net.alpha + self.bytes[c] * self.net.beta

    def stage(self, i: int, j: int) -> float:
        return self.compute(i, j) + self.cut_seconds(i) + self.cut_seconds(j)

    def priced(self, cuts: list[int]) -> Stages:
        ends = cuts[1:] + [len(self.nodes)]
        return Stages(self.nodes, list(cuts), [self.compute(i, j) for i, j in zip(cuts, ends)],
                      [self.cut_seconds(i) + self.cut_seconds(j) for i, j in zip(cuts, ends)],
                      [self.bytes[c] for c in cuts[1:]])


def split_stages(chain: ChainCosts, k: int) -> Stages:
    """The split of the chain into k contiguous non-empty stages whose slowest stage (compute plus
    the communication at its two cuts) is fastest; ties go to fewer bytes on the wire. Dynamic
    programming over (stages so far, end position): O(k N^2)."""
    n = len(chain.nodes)
    if n < k:
        raise TdcError(f"the step has {n} nodes to place, fewer than the {k} ranks")
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(k + 1)]      # best[s][j]: (cost, bytes) of nodes [0, j) in s stages
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = (0.0, 0)
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            for i in range(s - 1, j):
                prev = best[s - 1][i]
                if prev[0] == float("inf"):
                    continue
                cand = (max(prev[0], chain.stage(i, j)), prev[1] + (chain.bytes[i] if i > 0 else 0))
                if cand < best[s][j]:
                    best[s][j], back[s][j] = cand, i
    cuts, j = [], n
    for s in range(k, 0, -1):
        j = back[s][j]
        cuts.append(j)
    return chain.priced(cuts[::-1])


def equal_layer_stages(chain: ChainCosts, k: int) -> Stages:
    """The naive split: the same number of layers (nodes with params) per stage, each layer taking
    the nodes after it up to the next layer."""
    layers = [i for i, n in enumerate(chain.nodes) if any(v.is_arg and v.kind == "param" for v in n.inputs)]
    if len(layers) < k:
        raise TdcError(f"the model has {len(layers)} layers with params, fewer than the {k} ranks to give them to")
    cuts = [0] + [layers[len(layers) * s // k] for s in range(1, k)]
    return chain.priced(cuts)


def forward_nodes(graph: Graph) -> list[Node]:
    """The nodes to place, in order: all but the literals (every rank has those)."""
    return [n for n in graph.nodes if n.op not in LITERALS]


def plan_stages(graph: Graph, cfg: Partition, training: bool = True) -> tuple[Stages, Stages | None]:
    """(the partition cfg asks for, the equal-layer baseline or None when the model has fewer
    layers than ranks) of `graph`'s forward nodes."""
    nodes = forward_nodes(graph)
    chain = ChainCosts(nodes, forward_costs(graph, cfg.target, training), cfg.net, training)
    if cfg.partitioner == "equal":
        naive = equal_layer_stages(chain, cfg.ranks)
        return naive, naive
    layers = sum(1 for n in nodes if any(v.is_arg and v.kind == "param" for v in n.inputs))
    return split_stages(chain, cfg.ranks), equal_layer_stages(chain, cfg.ranks) if layers >= cfg.ranks else None


# ---- placing a graph --------------------------------------------------------------------------------

@contextmanager
def placed(g: Graph, placement: str | None):
    """Place the nodes built in the block (literals stay unplaced: every rank has them)."""
    mark = len(g.nodes)
    yield
    for n in g.nodes[mark:]:
        if n.op not in LITERALS:
            n.placement = placement


def holders(v: Value, world: int) -> set[int] | None:
    """The ranks holding value v (None: any rank can have it, as args and literals)."""
    if v.producer is None or v.producer.op in LITERALS:
        return None
    ranks = held_on(v)
    return set(ranks) if ranks is not None else set(range(world))


def place_by_stages(graph: Graph, stages: Stages) -> Graph:
    """Each forward node on its stage's rank, with a transfer wherever a value crosses to
    another rank."""
    g = graph.copy()
    for i, n in enumerate(forward_nodes(g)):      # the same order as stages.nodes
        n.placement = f"rank:{stages.rank_of(i)}"
    return insert_transfers(g)


def insert_transfers(g: Graph) -> Graph:
    """A transfer before every node that reads a value from a single other rank (in place).
    Nodes placed on several ranks must already hold their inputs there."""
    world = world_size(g)
    order: list[Node] = []
    moved: dict[tuple[Value, int], Value] = {}
    for n in list(g.nodes):
        ranks = placed_ranks(n.placement)
        if n.op in LITERALS or ranks is None or n.opdef.collective:
            order.append(n)
            continue
        for i, v in enumerate(n.inputs):
            held = holders(v, world)
            if held is None or ranks <= held:
                continue
            if len(ranks) != 1 or len(held) < 1:
                raise TdcError(f"internal: {n.op} on ranks {sorted(ranks)} reads a value held on {sorted(held)}")
            (dst,) = ranks
            key = (v, dst)
            if key not in moved:
                (out,) = g.emit("transfer", [v], {"src": min(held), "dst": dst},
                                placement=ranks_placement({min(held), dst}), loc=n.loc)
                order.append(g.nodes.pop())
                moved[key] = out
            n.inputs[i] = moved[key]
        order.append(n)
    g.nodes = order
    return g


def world_size(g: Graph) -> int:
    return 1 + max((r for n in g.nodes for r in placed_ranks(n.placement) or ()), default=0)


def route_outputs(graph: Graph, root: int = 0) -> Graph:
    """Every output where rank `root` (the rank that reports and evaluates) holds it: a transfer
    at the end of the step for an output made elsewhere."""
    g, _ = graph.map_copy()
    world = world_size(g)
    outs = []
    with Builder(g):
        for name, v in g.outputs:
            held = holders(v, world)
            if held is not None and root not in held:
                src = min(held)
                with placed(g, ranks_placement({src, root})):
                    v = F.apply("transfer", Tensor(v, Builder.current()), src=src, dst=root).value
            outs.append((name, v))
    g.outputs = outs
    return g


def place_rest(graph: Graph) -> Graph:
    """Place the nodes passes added without a placement (the optimizer's) where their inputs are:
    on the ranks holding all of them. A node reading only args and literals (a momentum times
    its factor) goes where the nodes reading it run; one that nothing reads (the step counter's
    increment) runs everywhere."""
    g = graph.copy()
    world = world_size(g)
    if world < 2:
        return g
    free = []
    for n in g.nodes:
        if n.placement is not None or n.op in LITERALS:
            continue
        where: set[int] | None = None
        for v in n.inputs:
            held = holders(v, world)
            if held is not None:
                where = held if where is None else where & held
        if where is not None and not where:
            raise TdcError(f"internal: {n.op} reads values that no single rank holds together")
        if where is None:
            free.append(n)
        elif where != set(range(world)):
            n.placement = ranks_placement(where)
    users = g.users()
    roots = set(g.roots())
    for n in reversed(free):
        readers = [u for v in n.outputs for u in users.get(v, [])]
        if readers and all(u.placement is not None for u in readers) and not roots & set(n.outputs):
            n.placement = ranks_placement(set().union(*(placed_ranks(u.placement) for u in readers)))
    return g


def stages_report(chosen: Stages, naive: Stages | None) -> str:
    """The two partitions side by side (tdc dump --ranks K --parallel model|pipeline shows it)."""
    lines = [f"{'partition':<10} {'stage':>5} {'nodes':>6} {'compute ms':>11} {'comm ms':>8} {'bytes out':>10}"]
    for name, st in (("chosen", chosen), ("equal", naive)):
        if st is None:
            lines.append("equal      (fewer layers than ranks: no equal-layer split)")
            continue
        ends = st.cuts[1:] + [len(st.nodes)]
        for s, (a, b) in enumerate(zip(st.cuts, ends)):
            sent = st.cut_bytes[s] if s < len(st.cut_bytes) else 0
            lines.append(f"{name if s == 0 else '':<10} {s:>5} {b - a:>6} {st.compute[s] * 1e3:>11.3f} "
                         f"{st.comm[s] * 1e3:>8.3f} {sent:>10}")
        lines.append(f"{'':<10} {'':>5} cost {st.cost * 1e3:.3f} ms (slowest stage), balance {st.balance:.2f} "
                     f"(max/mean compute), {st.bytes_per_step} bytes per step")
    return "\n".join(lines)
