"""The reference interpreter: runs any graph with numpy, op by op, from the registry's
reference semantics. It is the oracle every backend and pass is tested against.

Communication ops run over simulated ranks: `run_ranks` executes the graph for
every rank in lockstep (node by node), so a collective sees all ranks' inputs.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, Value, placed_ranks
from ..ir.types import TensorType
from .executable import check_feed, graph_ranks, initial_state


class Mailbox:
    """Point-to-point messages between simulated ranks: (src, dst, tag) -> FIFO of arrays."""

    def __init__(self):
        self.queues: dict[tuple[int, int, int], list[np.ndarray]] = {}

    def put(self, src, dst, tag, x):
        self.queues.setdefault((src, dst, tag), []).append(np.array(x))

    def take(self, src, dst, tag, want: TensorType):
        q = self.queues.get((src, dst, tag))
        if not q:
            raise TdcError(f"recv on rank {dst} from rank {src} (tag {tag}): no matching send was executed before it")
        x = q.pop(0)
        if TensorType.of(x) != want:
            raise TdcError(f"recv on rank {dst} from rank {src} (tag {tag}): expected {want}, got {TensorType.of(x)}")
        return x


def _placed_on(node, rank: int) -> bool:
    """A node placed at rank:N runs only on rank N, at ranks:A..B on those; without a placement,
    on every rank."""
    ranks = placed_ranks(node.placement)
    return ranks is None or rank in ranks


def run_ranks(graph: Graph, feeds: list[dict[Value, np.ndarray]]) -> list[dict[Value, np.ndarray]]:
    """Run the graph on len(feeds) simulated ranks. feeds[r] maps every argument to its array.
    Returns each rank's environment (all computed values)."""
    world = len(feeds)
    envs = [dict(f) for f in feeds]
    mailbox = Mailbox()
    for node in graph.nodes:
        opdef = node.opdef
        ranks = [r for r in range(world) if _placed_on(node, r)]
        if opdef.collective:   # a value a participant does not hold (computed elsewhere) is None
            per_rank = [[envs[r].get(v) for v in node.inputs] for r in ranks]
            results = opdef.ref(per_rank, ranks=ranks, **node.attrs)
            for r, out in zip(ranks, results):
                _store(envs[r], node, out)
            continue
        for r in ranks:
            missing = [v for v in node.inputs if v not in envs[r]]
            if missing:
                where = f" ({node.loc})" if node.loc else ""
                raise TdcError(f"{node.op}{where} on rank {r} reads a value rank {r} does not hold (made by "
                               f"{missing[0].producer.op if missing[0].producer else 'an argument'} on "
                               f"{missing[0].producer.placement if missing[0].producer else 'no rank'})")
            ins = [envs[r][v] for v in node.inputs]
            if node.op == "send":
                mailbox.put(r, node.attrs["dst"], node.attrs["tag"], ins[0])
                continue
            if node.op == "recv":
                out = mailbox.take(node.attrs["src"], r, node.attrs["tag"], node.outputs[0].type)
            else:
                out = opdef.ref(*ins, **node.attrs)
            _store(envs[r], node, out)
    return envs


def _readers(graph: Graph, arg: Value, world: int) -> list[int]:
    """The ranks on which some node reads `arg`, in order."""
    ranks: set[int] = set()
    for n in graph.nodes:
        if arg in n.inputs:
            placed = placed_ranks(n.placement)
            ranks |= set(range(world)) if placed is None else placed
    return sorted(ranks) or list(range(world))


def _store(env, node, out):
    outs = out if isinstance(out, tuple) else (out,)
    if len(outs) != len(node.outputs):
        raise TdcError(f"internal: {node.op} reference returned {len(outs)} values, expected {len(node.outputs)}")
    for v, x in zip(node.outputs, outs):
        x = np.asarray(x)
        if x.shape != v.type.shape or x.dtype != v.type.np_dtype:
            raise TdcError(f"internal: {node.op} reference gave {TensorType.of(x) if x.dtype.kind in 'biuf' else x.dtype}, "
                           f"inferred {v.type}")
        env[v] = x


def run(graph: Graph, feed: dict[Value, np.ndarray]) -> dict[Value, np.ndarray]:
    return run_ranks(graph, [feed])[0]


def run_placed(graph: Graph, feed: dict[Value, np.ndarray]) -> dict[Value, np.ndarray]:
    """Run a graph placed on ranks (or not) with every rank fed `feed`: every value computed,
    from the lowest rank holding it."""
    world = graph_ranks(graph)
    if world == 1:
        return run(graph, feed)
    merged: dict[Value, np.ndarray] = {}
    for env in reversed(run_ranks(graph, [feed] * world)):
        merged.update(env)
    return merged


_controller = None


def blas_threads():
    """numpy's BLAS on TDC_BLAS_THREADS threads (default 1, as the compiled backends run theirs)
    for the duration of a call: on a shared 2-core machine, BLAS threads spinning against another
    process made the reference's training 6x slower. The caller's setting is restored after."""
    global _controller
    from threadpoolctl import ThreadpoolController
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=int(os.environ.get("TDC_BLAS_THREADS", "1")), user_api="blas")


class ReferenceExecutable:
    """`exe(**inputs)` -> {output name: array}. Params, consts and state are held by the
    executable (set from a dict or initialised from a seed); updates are written back after each call.

    A step compiled for N ranks (data_parallel, parameter_server) runs on N simulated ranks: each
    input whose first dim is k times the graph's, where k ranks read it, is the global batch, cut
    into one shard per reader (`shard`); the others go to every rank. Outputs and `state` are
    rank 0's (the averaged loss and the params are the same on every rank; with a parameter
    server rank 0 is a worker, and the servers' pieces of the params are in `rank_states`)."""

    backend = "reference"

    def __init__(self, graph: Graph, params: dict[str, np.ndarray] | None = None, seed: int = 0):
        self.graph = graph
        self.ranks = graph_ranks(graph)
        self.state: dict[str, np.ndarray] = initial_state(graph, params, seed)
        self.rank_states = [dict(self.state) for _ in range(self.ranks - 1)]   # ranks 1.. (0 is `state`)
        self.readers = {a: _readers(graph, a, self.ranks) for a in graph.inputs}

    def set_state(self, values: dict[str, np.ndarray]) -> None:
        """Replace params or state by name (every backend has this; see NumbaExecutable.set_state)."""
        args = {a.name: a for a in self.graph.args if a.kind != "input"}
        for name, x in values.items():
            if name not in args:
                raise TdcError(f"no param or state named {name!r}")
            self.state[name] = np.array(check_feed(args[name], x, args[name].kind))
            for st in self.rank_states:
                st[name] = self.state[name]

    def gather_state(self) -> dict[str, np.ndarray]:
        """Every param and state of the step, each from the first rank that computes its update
        (rank 0's value for the others): what the ranks hold together. Every backend has this."""
        states = [self.state] + self.rank_states
        out = dict(self.state)
        for target, v in self.graph.updates:
            if v.producer is not None:
                ranks = placed_ranks(v.producer.placement)
                out[target.name] = states[min(ranks) if ranks else 0][target.name]
        return out

    def feed(self, inputs: dict, state: dict | None = None) -> dict[Value, np.ndarray]:
        names = {a.name for a in self.graph.inputs}
        unknown = set(inputs) - names
        if unknown:
            raise TdcError(f"unknown input {sorted(unknown)[0]!r}; the graph takes: "
                           + ", ".join(f"{a.name}: {a.type}" for a in self.graph.inputs))
        feed = {}
        for a in self.graph.args:
            if a.kind == "input":
                if a.name not in inputs:
                    raise TdcError(f"missing input {a.name}: {a.type}; the graph takes: "
                                   + ", ".join(f"{x.name}: {x.type}" for x in self.graph.inputs))
                feed[a] = check_feed(a, inputs[a.name], "input")
            else:
                feed[a] = (self.state if state is None else state)[a.name]
        return feed

    def comm_stats(self) -> tuple[int, float]:
        """(bytes sent, seconds waited): the simulated ranks send nothing over a wire."""
        return 0, 0.0

    def shard(self, inputs: dict, rank: int) -> dict:
        """Rank `rank`'s part of global inputs: of each input whose first dim is k * b for the
        graph's b, where k ranks read it (every rank in data parallelism, the workers with a
        parameter server), the i-th reader gets rows [i * b, (i + 1) * b). A rank that does not
        read an input gets the first part (unused)."""
        out = {}
        for a in self.graph.inputs:
            x = np.asarray(inputs[a.name]) if a.name in inputs else None
            shape = a.type.shape
            readers = self.readers[a]
            if x is not None and shape and x.ndim == len(shape) and x.shape[0] == len(readers) * shape[0] \
                    and x.shape[1:] == shape[1:]:
                i = readers.index(rank) if rank in readers else 0
                x = x[i * shape[0]:(i + 1) * shape[0]]
            if x is not None:
                out[a.name] = x
        return {**{k: v for k, v in inputs.items() if k not in out}, **out}

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        with blas_threads():
            return self._run(inputs)

    def _run(self, inputs: dict) -> dict[str, np.ndarray]:
        if self.ranks == 1:
            envs = [run(self.graph, self.feed(inputs))]
        else:
            states = [self.state] + self.rank_states
            envs = run_ranks(self.graph, [self.feed(self.shard(inputs, r), states[r]) for r in range(self.ranks)])
        for st, env in zip([self.state] + self.rank_states, envs):
            for target, v in self.graph.updates:
                if v in env:     # computed on this rank
                    st[target.name] = env[v]
        return {name: envs[0][v] for name, v in self.graph.outputs}
