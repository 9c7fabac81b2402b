"""A sharded parameter server as a placement of the training step.

`parameter_server` takes the step after autodiff (the gradients as outputs) and places it on
W worker ranks (0 .. W-1) and S server ranks (W .. W+S-1):

  * the forward and backward nodes run on the workers (SPMD: each on its shard of the batch),
    each reading its own copy of the params;
  * the params are cut into S shards of about equal bytes, in order, a large tensor split
    between servers where a boundary falls inside it (`plan_shards`);
  * the workers `push` each piece's gradient to its server, which gets their mean (in the
    synchronous mode) and runs the optimizer's update on its pieces (the optimizer state lives
    there only); the workers `pull` the new values and write them into their copies.

The result is one graph that `tdc dump` shows with every node's placement (@ranks:0..1,
@rank:2) and the push and pull between them. The reference backend runs it on simulated
ranks, which makes it the oracle of the synchronous mode; lower/stages.py cuts it into the
per-rank programs that runtime/ps.py runs over MPI, synchronously or not.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, ranks_placement
from ..ir.types import TensorType
from ..ops import functional as F
from ..ops.compress import parse_compression
from ..ops.tensor import Builder, Tensor
from .autodiff import GRAD_PREFIX
from .optimizer import Optimizer, rule


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of param `name` (flattened), kept by one server."""
    name: str
    start: int
    stop: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def arg(self) -> str:
        """The server's arg holding this piece (its optimizer slots add .m, .velocity, ...)."""
        return f"{self.name}[{self.start}:{self.stop}]"


def plan_shards(params: list[tuple[str, tuple[int, ...], int]], servers: int) -> list[list[Piece]]:
    """Params (name, shape, itemsize) cut into `servers` shards of about equal bytes, in order;
    a param is split where a shard's share ends inside it."""
    sizes = [(n, tuple(s), int(np.prod(s, dtype=np.int64)), b) for n, s, b in params]
    total = sum(size * b for _, _, size, b in sizes)
    shards: list[list[Piece]] = [[] for _ in range(servers)]
    done = 0       # bytes placed so far
    for name, shape, size, itemsize in sizes:
        start = 0
        while start < size:
            s = min(servers - 1, int(done * servers // max(total, 1)))
            end_bytes = (s + 1) * total // servers            # where shard s's share ends
            room = max(1, -(-(end_bytes - done) // itemsize)) if s < servers - 1 else size - start
            stop = min(size, start + room)
            shards[s].append(Piece(name, start, stop, shape))
            done += (stop - start) * itemsize
            start = stop
    return shards


@dataclass
class ParameterServer:
    """`tdc train --ranks N --ps S`: N - S workers (ranks 0 .. N-S-1) and S servers (the last S
    ranks). Workers come first so that rank 0, which speaks and evaluates for the job, holds a
    whole copy of the params."""
    servers: int
    workers: int
    mode: str = "sync"            # sync | async | bounded
    staleness: int = 0            # bounded: how many steps a worker may run ahead of the slowest
    compress: str = "none"

    def __post_init__(self):
        if self.servers < 1 or self.workers < 1:
            raise TdcError(f"a parameter server needs at least one server and one worker, got {self.servers} "
                           f"server(s) and {self.workers} worker(s) (--ps S with --ranks N > S)")
        if self.mode not in MODES:
            raise TdcError(f"unknown parameter-server mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.staleness < 0:
            raise TdcError(f"--staleness must be >= 0, got {self.staleness}")
        self.compression = parse_compression(self.compress)    # a bad spec fails here, before any work

    @property
    def ranks(self) -> int:
        return self.servers + self.workers

    @property
    def worker_ranks(self) -> range:
        return range(self.workers)

    @property
    def server_ranks(self) -> range:
        return range(self.workers, self.ranks)

    def split_batch(self, batch: int) -> int:
        if batch % self.workers:
            raise TdcError(f"a batch of {batch} does not split evenly over {self.workers} workers: choose a "
                           f"multiple of {self.workers}")
        return batch // self.workers


MODES = ("sync", "async", "bounded")


def parameter_server(graph: Graph, cfg: ParameterServer, opt: Optimizer) -> Graph:
    """Place the autodiff output `graph` (gradient outputs grad.NAME) on workers and servers, with
    the optimizer `opt` on the servers (see the module's docstring)."""
    g, _ = graph.map_copy()
    grads = {n[len(GRAD_PREFIX):]: v for n, v in g.outputs if n.startswith(GRAD_PREFIX)}
    if not grads:
        raise TdcError(f"parameter_server: graph {g.name} has no gradient outputs: run autodiff before it")
    workers = ranks_placement(cfg.worker_ranks)
    for n in g.nodes:
        n.placement = workers
    params = [p for p in g.params if p.name in grads]
    shards = plan_shards([(p.name, p.type.shape, p.type.np_dtype.itemsize) for p in params], cfg.servers)
    pieces = [(cfg.workers + s, pc) for s, shard in enumerate(shards) for pc in shard]
    with_server = {r: ranks_placement({r, *cfg.worker_ranks}) for r in cfg.server_ranks}
    attrs = {"workers": cfg.workers, "world": cfg.ranks}
    with Builder(g) as b:
        lr = b.arg("lr", TensorType("f32", ()), "input")
        step = b.step()
        t = step + 1            # every rank counts steps (a server's Adam needs the count)
        g.add_update(step.value, t.value)
        with _placed(g, workers):
            flat = {p.name: F.reshape(Tensor(grads[p.name], b), (p.type.size,)) for p in params}
            sent = [flat[pc.name] if pc.size == flat[pc.name].shape[0] else F.slice(flat[pc.name], [pc.start], [pc.stop])
                    for _, pc in pieces]
        got = []
        for (server, pc), x in zip(pieces, sent):
            with _placed(g, with_server[server]):
                got.append(F.apply("push", x, server=server, compress=cfg.compress, **attrs))
        new = []
        for (server, pc), grad in zip(pieces, got):
            with _placed(g, f"rank:{server}"):
                dtype = grads[pc.name].type.dtype
                arg = b.arg(pc.arg, TensorType(dtype, (pc.size,)), "param", init="piece", of=pc.name,
                            start=pc.start, stop=pc.stop)
                lr_p = F.cast(lr, dtype) if dtype != "f32" else lr
                slots = {k: b.arg(f"{pc.arg}.{k}", arg.type, "state", init="zeros") for k in opt.slots}
                new_p, new_slots = rule(opt, arg, grad, lr_p, t, slots, decay=opt.decays(len(pc.shape)))
                g.add_update(arg.value, new_p.value)
                for k, v in new_slots.items():
                    g.add_update(slots[k].value, v.value)
                new.append(new_p)
        pulled: dict[str, list[Tensor]] = {p.name: [] for p in params}
        for (server, pc), x in zip(pieces, new):
            with _placed(g, with_server[server]):
                pulled[pc.name].append(F.apply("pull", x, server=server, **attrs))
        with _placed(g, workers):
            for p in params:          # every worker's copy takes the servers' new values
                parts = pulled[p.name]
                whole = parts[0] if len(parts) == 1 else F.concat(parts, 0)
                g.add_update(p, F.reshape(whole, p.type.shape).value)
    g.outputs = [(n, v) for n, v in g.outputs if not n.startswith(GRAD_PREFIX)]
    return g


@contextmanager
def _placed(g: Graph, placement: str):
    """Place the nodes built in the block (literals stay unplaced: every rank has them)."""
    mark = len(g.nodes)
    yield
    for n in g.nodes[mark:]:
        if n.op not in ("constant", "full"):
            n.placement = placement
