"""The staged runtime: a step placed on several ranks, run as compiled stages and MPI messages.

A parameter-server step, or a data-parallel step whose gradients are compressed, is cut per rank
into stages (lower/stages.py) that any backend compiles, separated by exchanges (push, pull,
allreduce) that this module carries out over MPI with mpi4py. Each message is one byte buffer
(`pack`), so the bytes counted are the bytes sent.

Workers run `StagedStep(...)(x=..., y=..., lr=...)` once per step, like any executable. A server
runs `serve()` until every worker is done, applying the gradients it gets:

  * sync: it waits for every worker's push, applies their mean once and answers all of them:
    the step equals data-parallel training;
  * async (Downpour): it applies each worker's gradient as it arrives and answers that worker at
    once; the worker goes on with the params it gets, which other workers' updates may have
    changed since it pulled (the staleness of an update: the server's version when it is
    applied minus the version the worker computed it on);
  * bounded (stale-synchronous, `staleness` K): as async, but a worker that has made K more steps
    than the slowest live worker gets its answer only when the slowest catches up.

A worker that goes silent in async or bounded mode (killed, say) is declared lost after the
timeout and a roll call; the servers and the other workers go on without it. In sync mode, and
when a server is lost, the job ends with a message naming the rank.

Compression (`--compress`): each rank keeps an encoder (ops/compress.py: error feedback, DGC)
and sends messages instead of dense gradients: to the servers in a push; to every other rank in
a compressed allreduce, an allgather of the messages, which every rank decodes and sums in rank
order (so all ranks keep identical params).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..backends import compile as compile_graph
from ..backends.comm import ROLL_GRACE, CommError, failure_notices, pack, unpack
from ..backends.executable import check_feed, initial_state
from ..errors import TdcError
from ..ir.graph import Graph, Node, Value
from ..lower.stages import RankProgram, Stage, split_rank
from ..ops.compress import parse_compression
from ..passes.data_parallel import DataParallel
from ..passes.parameter_server import ParameterServer

PUSH, PULL, DONE, FINAL, STATS, GATHER = 21, 22, 23, 24, 25, 26
POLL = 0.25          # seconds a server listens before it checks on silent workers

# ---- point-to-point byte messages on the communicator's thread ------------------------------------

class Wire:
    """Byte messages between ranks, on an MPIComm (backends/comm.py): sends are counted as they
    are posted; a receive polls against a deadline and answers roll calls while it waits."""

    def __init__(self, comm):
        self.comm = comm
        self.pending: list = []
        self.broken: set[int] = set()     # ranks a message from failed to arrive (the sender died mid-way)

    def send(self, dst: int, tag: int, buf: np.ndarray) -> None:
        def post(c):
            c.bytes_sent += buf.nbytes
            self.pending[:] = [p for p in self.pending if not p[0].Test()]    # let go of delivered buffers
            self.pending.append((c.comm.Isend(buf, dest=dst, tag=tag), dst, buf))
        self.comm.call(post)

    def flush(self, what: str, lost=()) -> None:
        """Wait until every posted send has been taken (until the timeout); sends to `lost`
        ranks are given up."""
        def done(c):
            live = [(r, d) for r, d, _ in self.pending if d not in lost]
            if live:
                c.complete([r for r, _ in live], [d for _, d in live], what)
            self.pending.clear()
        self.comm.call(done)

    def receive(self, sources, tags, timeout: float) -> tuple[int, int, np.ndarray] | None:
        """The next message from one of `sources` with one of `tags`: (source, tag, bytes), or
        None when none came within `timeout` seconds. Sources are polled in turn."""
        got = []

        def poll(c):
            MPI = c.MPI
            status = MPI.Status()
            deadline = time.monotonic() + timeout
            spins = 0
            while True:
                for src in sources:
                    if src in self.broken:
                        continue
                    for tag in tags:
                        try:
                            if not c.comm.Iprobe(source=src, tag=tag, status=status):
                                continue
                            buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
                            c.comm.Recv(buf, source=src, tag=tag)
                        except MPI.Exception:     # a rank that died while its message was copied
                            self.broken.add(src)
                            break
                        got.append((src, tag, buf))
                        return
                spins += 1
                if spins > 200:
                    time.sleep(2e-4)
                    c._answer_roll_calls()
                if time.monotonic() > deadline:
                    return
        self.comm.call(poll)           # its wait is counted as comm_wait
        return got[0] if got else None

    def silent(self, ranks) -> list[int]:
        """The ranks among `ranks` that do not answer a roll call within ROLL_GRACE seconds."""
        out = []
        self.comm.call(lambda c: out.extend(c._roll_call(sorted(ranks))))
        return out


# ---- one rank's program ---------------------------------------------------------------------------

@dataclass
class ServerStats:
    """What a server saw: how stale each update was, how far ahead of the slowest each answered
    worker was (bounded mode keeps it <= K), and the workers it lost."""
    rank: int
    updates: int = 0
    staleness: dict = field(default_factory=dict)      # staleness -> count
    lead: dict = field(default_factory=dict)           # steps ahead of the slowest live worker -> count
    lost: dict = field(default_factory=dict)           # worker rank -> its steps when it went silent

    def as_ints(self) -> list[int]:
        out = [self.rank, self.updates]
        for d in (self.staleness, self.lead, self.lost):
            out.append(len(d))
            for k, v in sorted(d.items()):
                out += [k, v]
        return out

    @staticmethod
    def from_ints(xs: list[int]) -> "ServerStats":
        s = ServerStats(xs[0], xs[1])
        i = 2
        for d in (s.staleness, s.lead, s.lost):
            n = xs[i]
            i += 1
            for _ in range(n):
                d[xs[i]] = xs[i + 1]
                i += 2
        return s


class StagedStep:
    """This rank's part of a placed training step (graph), run over MPI (comm: an MPIComm).

    cfg: the ParameterServer or DataParallel settings the graph was built with. On a worker,
    `exe(**inputs)` runs one step and returns its outputs, and `finish()` ends the run; `state`
    holds this rank's params and state. On a server, `serve()` runs until the workers are done.
    momentum: what a DGC encoder keeps on the worker (the graph's optimizer is then SGD)."""

    def __init__(self, graph: Graph, cfg, comm, backend: str = "llvm", params=None, seed: int = 0,
                 staleness_lr: bool = False, momentum: float = 0.0, conv_algo: str = "auto", autotune: bool = False,
                 progress=None):
        if comm.size != cfg.ranks:
            raise TdcError(f"this step is placed on {cfg.ranks} ranks but runs in a world of {comm.size}: "
                           f"start it with mpiexec -n {cfg.ranks} (tdc train --ranks {cfg.ranks} does)")
        self.cfg, self.comm, self.rank = cfg, comm, comm.rank
        self.ps = isinstance(cfg, ParameterServer)
        self.workers = list(cfg.worker_ranks) if self.ps else list(range(cfg.ranks))
        self.servers = list(cfg.server_ranks) if self.ps else []
        self.is_server = self.rank in self.servers
        self.mode = cfg.mode if self.ps else "sync"
        self.staleness_lr = staleness_lr
        self.timeout = comm.timeout
        self.wire = Wire(comm)
        self.prog: RankProgram = split_rank(graph, self.rank)
        full = initial_state(graph, params, seed)
        self.state = {a.name: full[a.name] for a in self.prog.args if a.kind != "input"}
        self.inputs = [a for a in self.prog.args if a.kind == "input"]
        stages = [it for it in self.prog.items if isinstance(it, Stage)]
        largest = max(stages, key=lambda st: len(st.graph.nodes), default=None)   # the one worth a progress line
        self.exes = {id(st): compile_graph(st.graph, backend=backend, seed=seed, conv_algo=conv_algo, autotune=autotune,
                                           progress=progress if st is largest else None) for st in stages}
        self.encoder = cfg.compression.encoder(momentum=momentum, workers=len(self.workers))
        self.compressors = {}        # exchange node -> its compression (from the node's attr)
        for n in self.prog.exchanges:
            spec = n.attrs.get("compress", "none")
            self.compressors[n] = parse_compression(spec).compressor
        self.key = {n: i for i, n in enumerate(graph.nodes)}     # an exchange's identity on every rank
        self.rng = np.random.default_rng([seed & 0xFFFFFFFF, self.rank, 0x5eed])
        self.clock = 0                                   # steps this worker has made
        self.versions = {s: 0 for s in self.servers}     # the version of each server's params we hold
        # the step's inputs a server reads (lr): the workers send theirs with each push
        self.server_inputs = {s: [a for a in split_rank(graph, s).args if a.kind == "input"] for s in self.servers}
        if not self.is_server:        # a worker is fed what its servers read too
            self.inputs += [a for s in self.servers for a in self.server_inputs[s] if a not in self.inputs]
        self.stats: list[ServerStats] = []     # rank 0, after finish(): what every server saw

    # ---- the executable interface (workers) -----------------------------------------------------
    def comm_stats(self) -> tuple[int, float]:
        return self.comm.bytes_sent, self.comm.wait_seconds

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        if self.is_server:
            raise TdcError(f"rank {self.rank} is a parameter server: it serves (serve()), it does not run steps")
        env = self._env(inputs)
        self._run(env, self.prog.items)
        self._update(env)
        self.encoder.next_step()
        self.clock += 1
        return {name: env[v] for name, v in self.prog.outputs}

    def _update(self, env: dict, made=None) -> None:
        """Write the step's updates (those of values in `made`, if given) into the rank's state.
        Stage outputs are fresh arrays each call and are taken as they are; an update to an arg's
        own value (an input the caller still holds) is copied."""
        for t, v in self.prog.updates:
            if made is None or v in made:
                self.state[t.name] = env[v] if v.producer is not None else np.array(env[v])

    def _env(self, inputs: dict) -> dict[Value, np.ndarray]:
        unknown = set(inputs) - {a.name for a in self.inputs}
        if unknown:
            raise TdcError(f"unknown input {sorted(unknown)[0]!r}; the step takes: "
                           + ", ".join(f"{a.name}: {a.type}" for a in self.inputs))
        env = {a: self.state[a.name] for a in self.prog.args if a.kind != "input"}
        for a in self.inputs:
            if a.name not in inputs:
                raise TdcError(f"missing input {a.name}: {a.type}")
            env[a] = check_feed(a, inputs[a.name], "input")
        return env

    def _run(self, env: dict, items: list, exchange=None) -> None:
        """Run stages and exchanges in order; a run of consecutive exchanges goes together."""
        exchange = exchange or self._exchange
        i = 0
        while i < len(items):
            it = items[i]
            if isinstance(it, Stage):
                res = self.exes[id(it)](**{name: env[v] for name, v in it.inputs})
                for name, v in it.outputs:
                    env[v] = res[name]
                i += 1
            else:
                j = i
                while j < len(items) and isinstance(items[j], Node):
                    j += 1
                exchange(items[i:j], env)
                i = j

    def _exchange(self, nodes: list[Node], env: dict) -> None:
        """A worker's exchanges: pushes out, pulls in, allreduces with every rank."""
        pushes = [n for n in nodes if n.op == "push"]
        pulls = [n for n in nodes if n.op == "pull"]
        reduces = [n for n in nodes if n.op in ("allreduce", "allreduce_start")]   # a start's wait: in a stage
        other = [n for n in nodes if n.op not in ("push", "pull", "allreduce", "allreduce_start")]
        if other:
            raise TdcError(f"the staged runtime does not run {other[0].op}: only push, pull and allreduce")
        for s in sorted({n.attrs["server"] for n in pushes}):
            mine = [n for n in pushes if n.attrs["server"] == s]
            counts, msgs = self._encode_many(mine, env)
            arrays = [env[a] for a in self.server_inputs[s]] + msgs
            self.wire.send(s, PUSH, pack([self.clock, self.versions[s], *counts], arrays))
            for n in mine:
                env[n.outputs[0]] = env[n.inputs[0]]      # a worker's push returns its own value
        if pushes:
            self.wire.flush("push to the parameter servers")
        for s in sorted({n.attrs["server"] for n in pulls}):
            got = self.wire.receive([s], [PULL], 2 * self.timeout + ROLL_GRACE)
            if got is None:
                self._gone([s], f"waiting for the params from server rank {s}")
            head, arrays = unpack(got[2])
            self.versions[s] = head[0]
            for n, x in zip((n for n in pulls if n.attrs["server"] == s), arrays):
                env[n.outputs[0]] = x.reshape(n.outputs[0].type.shape)
        if reduces:
            self._allreduce(reduces, env)

    def _encode(self, node: Node, x: np.ndarray) -> list[np.ndarray]:
        flat = np.ascontiguousarray(x, np.float32).reshape(-1)
        if self.compressors[node].name == "none":
            return [flat]
        return self.encoder.encode(self.key[node], flat, self.rng)

    def _decode(self, node: Node, msg: list[np.ndarray]) -> np.ndarray:
        return self.compressors[node].decode(msg, node.inputs[0].type.size).reshape(node.inputs[0].type.shape)

    def _encode_many(self, nodes: list[Node], env: dict) -> tuple[list[int], list[np.ndarray]]:
        """The messages of several tensors: (arrays per tensor, the arrays). Sparse ones (top-k,
        threshold) travel as one list of (index, value) pairs over the tensors laid end to end,
        so a message is 8 bytes a value and a few bytes of header, however many tensors."""
        if nodes and all(self.compressors[n].sparse for n in nodes):
            idx, val, off = [], [], 0
            for n in nodes:
                i, v = self._encode(n, env[n.inputs[0]])
                idx.append(i.astype(np.int64) + off)
                val.append(v)
                off += n.inputs[0].type.size
            if off >= 2 ** 31:
                raise TdcError(f"a sparse message over {off} values: more than int32 indices reach")
            return [-1], [np.concatenate(idx).astype(np.int32), np.concatenate(val)]
        counts, arrays = [], []
        for n in nodes:
            msg = self._encode(n, env[n.inputs[0]])
            counts.append(len(msg))
            arrays += msg
        return counts, arrays

    def _decode_many(self, nodes: list[Node], counts: list[int], arrays: list[np.ndarray]) -> list[np.ndarray]:
        if counts == [-1]:
            sizes = [n.inputs[0].type.size for n in nodes]
            flat = np.zeros(sum(sizes), np.float32)
            np.add.at(flat, arrays[0], arrays[1])
            bounds = np.cumsum([0] + sizes)
            return [flat[a:b].reshape(n.inputs[0].type.shape) for n, a, b in zip(nodes, bounds, bounds[1:])]
        out, off = [], 0
        for n, c in zip(nodes, counts):
            out.append(self._decode(n, arrays[off:off + c]))
            off += c
        return out

    def _allreduce(self, nodes: list[Node], env: dict) -> None:
        """Dense allreduces in one packed ring allreduce; compressed ones as an allgather of
        every rank's messages, decoded and summed in rank order on every rank."""
        dense = [n for n in nodes if self.compressors[n].name == "none"]
        sparse = [n for n in nodes if self.compressors[n].name != "none"]
        if dense:
            buf = np.concatenate([np.asarray(env[n.inputs[0]], np.float64 if n.inputs[0].type.dtype == "f64"
                                             else np.float32).reshape(-1) for n in dense]) \
                if len({n.inputs[0].type.dtype for n in dense}) == 1 else None
            if buf is None:
                raise TdcError("internal: a packed allreduce of mixed dtypes")
            self.comm.allreduce(buf, "sum", "ring")
            off = 0
            for n in dense:
                size = n.inputs[0].type.size
                total = buf[off:off + size].reshape(n.inputs[0].type.shape)
                off += size
                env[n.outputs[0]] = _finish(total, n, len(self.workers))
        if sparse:
            counts, mine = self._encode_many(sparse, env)
            buf = pack(counts, mine)
            others = [r for r in self.workers if r != self.rank]
            for r in others:
                self.wire.send(r, GATHER, buf)
            msgs = {self.rank: (counts, mine)}
            for r in others:
                got = self.wire.receive([r], [GATHER], 2 * self.timeout + ROLL_GRACE)
                if got is None:
                    self._gone([r], "in a compressed allreduce")
                msgs[r] = unpack(got[2])
            self.wire.flush("compressed allreduce")
            totals = {n: np.zeros(n.inputs[0].type.shape, np.float32) for n in sparse}
            for r in sorted(msgs):
                for n, x in zip(sparse, self._decode_many(sparse, *msgs[r])):
                    totals[n] += x
            for n in sparse:
                env[n.outputs[0]] = _finish(totals[n], n, len(self.workers))

    def _gone(self, ranks: list[int], what: str):
        silent = self.wire.silent(ranks) or ranks
        raise CommError(f"rank {self.rank}: no answer from rank {', '.join(map(str, silent))} within "
                        f"{2 * self.timeout:g} s ({what}); stopping the job")

    def finish(self) -> None:
        """A worker's end: tell the servers; rank 0 gets their final params and statistics."""
        for s in self.servers:
            self.wire.send(s, DONE, pack([self.clock], []))
        self.wire.flush("telling the servers this worker is done")
        if self.rank != 0 or not self.servers:
            return
        env = {a: self.state[a.name] for a in self.prog.args if a.kind != "input"}
        pulls = [n for n in self.prog.exchanges if n.op == "pull"]
        for s in self.servers:
            got = None
            for tag in (FINAL, STATS):
                got = self.wire.receive([s], [tag], 2 * self.timeout + ROLL_GRACE)
                if got is None:
                    self._gone([s], "waiting for the final params")
                head, arrays = unpack(got[2])
                if tag == FINAL:
                    for n, x in zip((n for n in pulls if n.attrs["server"] == s), arrays):
                        env[n.outputs[0]] = x.reshape(n.outputs[0].type.shape)
                else:
                    self.stats.append(ServerStats.from_ints(head))
        last_pull = max(i for i, it in enumerate(self.prog.items) if isinstance(it, Node) and it.op == "pull")
        tail = self.prog.items[last_pull + 1:]
        self._run(env, tail)
        made = {v for it in tail if isinstance(it, Stage) for _, v in it.outputs}
        made |= {n.outputs[0] for n in pulls}
        self._update(env, made)

    # ---- a server -----------------------------------------------------------------------------------
    def serve(self) -> ServerStats:
        """Apply the workers' pushes until all are done (or lost); see the module's docstring."""
        stats = ServerStats(self.rank)
        active = set(self.workers)             # neither done nor lost
        clocks = {w: 0 for w in self.workers}
        heard = {w: time.monotonic() for w in self.workers}
        deferred: list[tuple[int, np.ndarray]] = []      # (worker, answer) held back (bounded mode)
        pending: dict[int, tuple] = {}          # sync: this step's pushes so far
        version = 0
        pushes = [n for n in self.prog.exchanges if n.op == "push"]
        notices = failure_notices()
        lr = next((a for a in self.inputs if a.name == "lr"), None)     # what --staleness-lr scales

        def slowest() -> int:
            return min((clocks[w] for w in active), default=max(clocks.values()))

        def answer(w: int, buf: np.ndarray):
            lead = clocks[w] - slowest()
            stats.lead[lead] = stats.lead.get(lead, 0) + 1
            self.wire.send(w, PULL, buf)

        def release():
            for w, buf in list(deferred):
                if w in stats.lost:
                    deferred.remove((w, buf))
                elif clocks[w] - slowest() <= self.cfg.staleness:
                    deferred.remove((w, buf))
                    answer(w, buf)

        def apply(msgs: dict[int, tuple]) -> np.ndarray:
            nonlocal version
            env = {a: self.state[a.name] for a in self.prog.args if a.kind != "input"}
            first = next(iter(msgs.values()))
            head0, arrays0 = first
            for k, a in enumerate(self.inputs):
                env[a] = arrays0[k].reshape(a.type.shape)
            grads = {n: np.zeros(n.outputs[0].type.shape, np.float64) for n in pushes}
            for w, (head, arrays) in sorted(msgs.items()):
                staleness = version - head[1]
                stats.staleness[staleness] = stats.staleness.get(staleness, 0) + 1
                for n, x in zip(pushes, self._decode_many(pushes, head[2:], arrays[len(self.inputs):])):
                    grads[n] += x
            for n in pushes:
                env[n.outputs[0]] = (grads[n] / len(msgs)).astype(n.outputs[0].type.np_dtype)
            if self.staleness_lr and lr is not None:
                env[lr] = (env[lr] / (1 + max(0, version - head0[1]))).astype(env[lr].dtype)
            answers = []
            self._run(env, self.prog.items, exchange=lambda nodes, env: answers.extend(
                env[n.inputs[0]] for n in nodes if n.op == "pull"))
            self._update(env)
            version += 1
            stats.updates += 1
            return pack([version], [np.asarray(a) for a in answers])

        while active:
            got = self.wire.receive(sorted(active), [PUSH, DONE], POLL)
            now = time.monotonic()
            if got is None:
                waiting = {w for w, _ in deferred}
                told = failure_notices() > notices       # mpiexec said a rank died: look now
                notices = failure_notices()
                quiet = [w for w in active if (told or now - heard[w] > self.timeout) and w not in waiting
                         and w not in pending]
                quiet += [w for w in self.wire.broken & active if w not in quiet]
                if quiet:
                    silent = sorted(set(self.wire.silent(quiet)) | (self.wire.broken & active))
                    for w in quiet:
                        heard[w] = time.monotonic()
                    if silent and self.mode == "sync":
                        raise CommError(f"rank {self.rank}: no answer from worker rank {', '.join(map(str, silent))} "
                                        f"within {self.timeout:g} s (parameter server, sync mode); stopping the job")
                    for w in silent:
                        active.discard(w)
                        stats.lost[w] = clocks[w]
                        print(f"tdc: warning: parameter server rank {self.rank} lost worker rank {w} after its "
                              f"step {clocks[w]} (it did not answer a roll call); going on without it",
                              file=sys.stderr, flush=True)
                    release()
                continue
            w, tag, buf = got
            heard[w] = now
            if tag == DONE:
                active.discard(w)
                pending.pop(w, None)
                release()
                continue
            msg = unpack(buf)
            clocks[w] += 1
            if self.mode == "sync":
                pending[w] = msg
                if set(pending) >= active:
                    reply = apply(pending)
                    for v in pending:
                        answer(v, reply)
                    pending = {}
                continue
            reply = apply({w: msg})
            if self.mode == "bounded" and clocks[w] - slowest() > self.cfg.staleness:
                deferred.append((w, reply))
            else:
                answer(w, reply)
            release()
        self.wire.flush("answering the workers", lost=stats.lost)
        # the final params and what was seen, for rank 0 (the job's voice), unless it was lost
        if 0 not in stats.lost:
            self.wire.send(0, FINAL, pack([version], self._final_answers()))
            self.wire.send(0, STATS, pack(stats.as_ints(), []))
            self.wire.flush("sending the final params to rank 0")
        return stats

    def _final_answers(self) -> list[np.ndarray]:
        """What the pulls would send now: the current value of each pulled piece."""
        updated = {v: t for t, v in self.prog.updates}
        pulled = [n.inputs[0] for n in self.prog.exchanges if n.op == "pull"]
        if any(v not in updated for v in pulled):
            raise TdcError(f"internal: server rank {self.rank} pulls a value that is not a param's update")
        return [self.state[updated[v].name] for v in pulled]


def _finish(total: np.ndarray, node: Node, ranks: int) -> np.ndarray:
    x = total / ranks if node.attrs["op"] == "mean" else total
    return np.asarray(x).astype(node.outputs[0].type.np_dtype)


def staged(parallel) -> bool:
    """Whether a training step with these parallel settings runs on the staged runtime."""
    return isinstance(parallel, ParameterServer) or (isinstance(parallel, DataParallel) and parallel.compression.enabled)
