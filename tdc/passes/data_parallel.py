"""Synchronous data parallelism: a training step rewritten for N ranks.

Every rank runs the same step (SPMD) on its shard of the global batch: the step is traced at
batch B/N, so its `x` and `y` inputs are one rank's shard. After autodiff, `data_parallel` makes
every gradient the average over the ranks before the optimizer uses it, so all ranks apply the
same update and keep identical params:

  * Bucketing: gradients are packed, in the order backprop produces them, into buckets of about
    `bucket_bytes` (flatten, concat), so one message carries many small tensors.
  * Overlap: each bucket's allreduce is split into allreduce_start, placed right after the
    bucket's last gradient is computed, and allreduce_wait, placed right before the first use
    of its result (`schedule_comm`, run again before fusion), so the messages of late layers
    travel while earlier layers' gradients are computed. Without overlap each bucket is one
    blocking allreduce right after its last gradient.
  * The average is the allreduced sum times 1/N; the `loss` output is averaged too (what a
    single process with batch B reports), the model's other outputs stay per rank.
  * Each allreduce gets an algorithm (ring, recursive doubling, binomial tree or the MPI
    library's own) by an alpha-beta cost for its message size and N, unless one is asked for.

  * Compression (`compress`, ops/compress.py): each gradient gets an allreduce of its own with
    the compressor in its `compress` attribute, unless a dense ring allreduce would send fewer
    bytes than the allgather of compressed messages (`dense_cheaper`); all of them follow the
    backward pass, where the staged runtime (runtime/staged.py) sends them as one message.

Batchnorm keeps per-rank batch statistics unless `sync_batchnorm` (which runs before autodiff,
so the gradient goes through the same allreduces) replaces each training-mode batchnorm by its
definition with the batch mean and variance averaged over the ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value
from ..ops import functional as F
from ..ops.comm import ALLREDUCE_ALGOS
from ..ops.compress import dense_cheaper, parse_compression
from ..ops.tensor import Builder, Tensor
from .autodiff import GRAD_PREFIX
from .manager import register_pass

PACK_OPS = ("reshape", "flatten", "concat")


@dataclass(frozen=True)
class Network:
    """An alpha-beta model of a network: a message of n bytes takes alpha + n * beta seconds."""
    name: str
    alpha: float       # latency, seconds
    beta: float        # seconds per byte (1 / bandwidth)
    gamma: float = 1.0 / 4e9   # seconds per byte reduced (a float add per 4 bytes, memory-bound)


NETWORKS = {
    "shm": Network("shared memory (one machine)", 1e-6, 1 / 5e9),
    "10gbe": Network("10 Gb Ethernet", 30e-6, 1 / 1.25e9),
    "ib100": Network("100 Gb InfiniBand", 2e-6, 1 / 12.5e9),
}


def allreduce_time(algo: str, nbytes: int, ranks: int, net: Network) -> float:
    """Seconds an allreduce of nbytes over `ranks` ranks takes by `algo` (the classic analyses:
    Thakur, Rabenseifner and Gropp 2005). `mpi` is taken to be what MPICH does: recursive doubling
    for short messages, Rabenseifner's reduce-scatter + allgather for long ones."""
    p, n = ranks, nbytes
    if p <= 1:
        return 0.0
    a, b, c = net.alpha, net.beta, net.gamma
    lg = math.ceil(math.log2(p))
    extra = 0 if p & (p - 1) == 0 else 2 * (a + n * b) + n * c   # fold the ranks beyond a power of two
    if algo == "ring":      # reduce-scatter then allgather: each moves (p-1)/p of the data per rank
        return 2 * (p - 1) * a + 2 * (p - 1) / p * n * b + (p - 1) / p * n * c
    if algo == "doubling":  # log p exchanges of the whole vector
        return lg * (a + n * b + n * c) + extra
    if algo == "tree":      # binomial reduce to rank 0, then binomial broadcast
        return lg * (2 * a + 2 * n * b + n * c)
    if algo == "mpi":
        rabenseifner = 2 * lg * a + 2 * (p - 1) / p * n * b + (p - 1) / p * n * c + extra
        return min(allreduce_time("doubling", nbytes, ranks, net), rabenseifner)
    raise TdcError(f"unknown allreduce algorithm {algo!r}; choose from {', '.join(ALLREDUCE_ALGOS)}")


def choose_allreduce(nbytes: int, ranks: int, net: Network) -> str:
    """The cheapest algorithm for this message (tdc's own first on a tie)."""
    return min(("ring", "doubling", "tree", "mpi"), key=lambda a: allreduce_time(a, nbytes, ranks, net))


@dataclass
class DataParallel:
    """How the training step is split: `tdc train/compile --ranks N [--bucket-mb M] [--no-overlap]
    [--allreduce ALGO] [--sync-bn]`."""
    ranks: int
    bucket_bytes: int = 1 << 20
    overlap: bool = True
    algo: str = "auto"
    sync_bn: bool = False
    network: str = "shm"
    compress: str = "none"        # --compress: each gradient compressed on the wire (ops/compress.py)

    def __post_init__(self):
        self.compression = parse_compression(self.compress)
        if self.ranks < 1:
            raise TdcError(f"--ranks must be >= 1, got {self.ranks}")
        if self.bucket_bytes < 0:
            raise TdcError(f"the bucket size must be >= 0 bytes, got {self.bucket_bytes}")
        if self.algo not in ALLREDUCE_ALGOS:
            raise TdcError(f"unknown allreduce algorithm {self.algo!r}; choose from {', '.join(ALLREDUCE_ALGOS)}")
        if self.network not in NETWORKS:
            raise TdcError(f"unknown network {self.network!r}; choose from {', '.join(NETWORKS)}")

    def split_batch(self, batch: int) -> int:
        """The per-rank batch of global batch `batch` (it must divide evenly)."""
        if batch % self.ranks:
            raise TdcError(f"a batch of {batch} does not split evenly over {self.ranks} ranks: choose a batch "
                           f"that is a multiple of {self.ranks} (each rank takes batch / ranks samples)")
        return batch // self.ranks


def _algo_for(cfg: DataParallel, nbytes: int) -> str:
    return cfg.algo if cfg.algo != "auto" else choose_allreduce(nbytes, cfg.ranks, NETWORKS[cfg.network])


def data_parallel(graph: Graph, cfg: DataParallel) -> Graph:
    """Average every gradient output over `cfg.ranks` ranks (bucketed, split into start and wait),
    and the loss."""
    g, _ = graph.map_copy()
    grads = [(name, v) for name, v in g.outputs if name.startswith(GRAD_PREFIX)]
    if not grads:
        raise TdcError(f"data_parallel: graph {g.name} has no gradient outputs: run autodiff before it")
    if cfg.ranks == 1:
        return g
    position = {n: i for i, n in enumerate(g.nodes)}
    # gradients the loss does not reach are zeros on every rank: nothing to average
    live = [(name, v) for name, v in grads if v.producer is not None and v.producer.op not in ("full", "constant")]
    live.sort(key=lambda nv: position[nv[1].producer])
    compressed = cfg.compression.enabled
    buckets: list[list[tuple[str, Value]]] = []
    for name, v in live:
        b = buckets[-1] if buckets else None
        if b is None or sum(w.type.nbytes for _, w in b) >= cfg.bucket_bytes or b[0][1].type.dtype != v.type.dtype \
                or compressed:      # compression is per tensor
            buckets.append([])
        buckets[-1].append((name, v))
    overlap = cfg.overlap and not compressed    # the staged runtime runs a compressed step's exchanges

    n_before = len(g.nodes)
    after: dict[Node, list[Node]] = {}    # nodes to place right after a node of the original step
    tail: list[Node] = []                 # waits and unpacking, after everything else
    replace: dict[str, Value] = {}
    scale = 1.0 / cfg.ranks
    with Builder(g) as b:
        for k, bucket in enumerate(buckets):
            mark = len(g.nodes)
            parts = [Tensor(v, b) for _, v in bucket]
            flat = [F.reshape(t, (t.value.type.size,)) for t in parts]
            packed = flat[0] if len(flat) == 1 else F.concat(flat, 0)
            nbytes = packed.value.type.nbytes
            attrs = {"op": "sum", "algo": _algo_for(cfg, nbytes), "world": cfg.ranks}
            if compressed and packed.value.type.dtype == "f32" and not dense_cheaper(
                    cfg.compression.compressor, packed.value.type.size, cfg.ranks):
                attrs["compress"] = cfg.compress
            if overlap:
                total = F.apply("allreduce_start", packed, **attrs)
            else:
                total = F.apply("allreduce", packed, **attrs)
            last = max((v.producer for _, v in bucket), key=position.get)
            after.setdefault(last, []).extend(g.nodes[mark:])
            mark = len(g.nodes)
            if overlap:
                total = F.apply("allreduce_wait", total)
            total = total * scale
            off = 0
            for (name, v), t in zip(bucket, parts):
                n = v.type.size
                piece = total if len(parts) == 1 else F.slice(total, [off], [off + n])
                replace[name] = F.reshape(piece, v.type.shape).value
                off += n
            (after.setdefault(last, []) if not overlap else tail).extend(g.nodes[mark:])
        if any(name == "loss" for name, _ in g.outputs):
            mark = len(g.nodes)
            loss = g.output("loss")
            mean = F.apply("allreduce", Tensor(loss, b), op="mean", algo=_algo_for(cfg, loss.type.nbytes),
                           world=cfg.ranks)
            replace["loss"] = mean.value
            tail.extend(g.nodes[mark:])
    order = []
    for n in g.nodes[:n_before]:
        order.append(n)
        order.extend(after.get(n, []))
    g.nodes = order + tail
    if compressed:       # the staged runtime sends all of a step's messages at once, after the backward pass
        g.nodes = _exchanges_together(g.nodes)
    g.outputs = [(name, replace.get(name, v)) for name, v in g.outputs]
    return schedule_comm(g)


def _exchanges_together(nodes: list[Node]) -> list[Node]:
    """The same nodes with every collective in one run: what does not depend on a collective
    first, then the collectives, then what depends on them."""
    late: set[Value] = set()
    for n in nodes:
        if n.opdef.collective or any(v in late for v in n.inputs):
            late.update(n.outputs)
    after = [n for n in nodes if not n.opdef.collective and any(v in late for v in n.outputs)]
    exchanges = [n for n in nodes if n.opdef.collective]
    moved = set(after) | set(exchanges)
    before = [n for n in nodes if n not in moved]
    return before + exchanges + after


@register_pass("schedule_comm")
def schedule_comm(graph: Graph) -> Graph:
    """Each allreduce_start as early as its input allows (right after the last node its packing
    reads), each allreduce_wait and the values computed from it alone as late as their first use
    allows (right before the first other node that reads them). Other nodes keep their order."""
    if not any(n.op in ("allreduce_start", "allreduce_wait") for n in graph.nodes):
        return graph
    g = graph.copy()
    # literals (constant, full) first: they depend on nothing, and moved chains may read them
    g.nodes = [n for n in g.nodes if not n.inputs and n.op in ("constant", "full")] + \
              [n for n in g.nodes if n.inputs or n.op not in ("constant", "full")]
    for n in [n for n in g.nodes if n.op == "allreduce_start"]:
        chain = _pack_chain(n)
        rest = [m for m in g.nodes if m not in chain]
        deps = {v.producer for m in chain for v in m.inputs if v.producer is not None and v.producer not in chain}
        at = max((rest.index(d) + 1 for d in deps), default=0)
        g.nodes = rest[:at] + [m for m in g.nodes if m in chain] + rest[at:]
    roots = set(g.roots())
    for n in [n for n in g.nodes if n.op == "allreduce_wait"]:
        chain = _unpack_chain(g, n)
        rest = [m for m in g.nodes if m not in chain]
        produced = {v for m in chain for v in m.outputs}
        users = [i for i, m in enumerate(rest) if any(v in produced for v in m.inputs)]
        at = users[0] if users else len(rest)
        if not users and produced & roots:
            at = len(rest)
        g.nodes = rest[:at] + [m for m in g.nodes if m in chain] + rest[at:]
    return g


def _pack_chain(start: Node) -> set[Node]:
    """The start and the views and concat that only feed it."""
    chain, frontier = {start}, [start]
    while frontier:
        m = frontier.pop()
        for v in m.inputs:
            p = v.producer
            if p is not None and p.op in PACK_OPS and p not in chain:
                chain.add(p)
                frontier.append(p)
    return chain


UNPACK_OPS = ("mul", "slice", "reshape")


def _unpack_chain(g: Graph, wait: Node) -> set[Node]:
    """The wait and what unpacks its result: the scaling by 1/N, slices and reshapes computed from
    it and literals alone."""
    chain = {wait}
    made = set(wait.outputs)
    for m in g.nodes[g.nodes.index(wait) + 1:]:
        if m.op in UNPACK_OPS and any(v in made for v in m.inputs) and \
                all(v in made or (v.producer is not None and v.producer.op in ("constant", "full")) for v in m.inputs):
            chain.add(m)
            made.update(m.outputs)
    return chain


# ---- synchronized batchnorm ---------------------------------------------------------------------

def sync_batchnorm(graph: Graph, cfg: DataParallel) -> Graph:
    """Replace every training-mode batchnorm by its definition with the batch statistics averaged
    over the ranks: mean = allreduce_mean(local mean), var = allreduce_mean(local mean of
    (x - mean)^2). With equal shards these are the statistics of the global batch, and autodiff
    differentiates through the allreduces."""
    if cfg.ranks == 1 or not any(n.op == "batchnorm" and n.attrs["training"] for n in graph.nodes):
        return graph
    g, _ = graph.map_copy()
    old = list(g.nodes)
    g.nodes = []
    replaced: dict[Value, Value] = {}
    with Builder(g) as b:
        for n in old:
            n.inputs = [replaced.get(v, v) for v in n.inputs]
            if n.op != "batchnorm" or not n.attrs["training"]:
                g.nodes.append(n)
                continue
            x, gamma, beta, mean, var = (Tensor(v, b) for v in n.inputs)
            eps, momentum = n.attrs["eps"], n.attrs["momentum"]
            nd = x.ndim
            axes = (0,) + tuple(range(2, nd))
            cshape = (1, x.shape[1]) + (1,) * (nd - 2)

            def global_mean(t):
                return F.apply("allreduce", F.mean(t, axes), op="mean",
                               algo=_algo_for(cfg, x.value.type.np_dtype.itemsize * x.shape[1]), world=cfg.ranks)
            bmean = global_mean(x)
            xc = x - F.reshape(bmean, cshape)
            bvar = global_mean(xc * xc)
            y = xc * F.rsqrt(F.reshape(bvar, cshape) + eps) * F.reshape(gamma, cshape) + F.reshape(beta, cshape)
            new_mean = mean * momentum + bmean * (1.0 - momentum)
            new_var = var * momentum + bvar * (1.0 - momentum)
            for v, t in zip(n.outputs, (y, new_mean, new_var)):
                replaced[v] = t.value
    g.outputs = [(name, replaced.get(v, v)) for name, v in g.outputs]
    g.updates = [(t, replaced.get(v, v)) for t, v in g.updates]
    return g
