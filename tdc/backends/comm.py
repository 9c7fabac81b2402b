"""Communicators: how a compiled step's collectives reach the other ranks.

One small interface, three implementations: the reference interpreter's simulated ranks
(reference.py: a collective sees every rank's inputs at once), `MPIComm` here (mpi4py, arrays
passed as buffers, never pickled), used by the numba backend, and the same algorithms in C
(backends/llvm/runtime/comm.c) for the LLVM JIT and native executables.

    comm = communicator(timeout=30)          # MPIComm under mpiexec with several ranks, else World1
    job = comm.start(buf, "sum", "ring")     # reduce buf in place over all ranks, in the background
    ...                                      # other work overlaps with the messages
    comm.wait(job)                           # buf now holds the sum

Jobs run one after another on a communication thread, in the order they were started, which is
the same on every rank (the step is the same program), so collectives never interleave. Each
algorithm is written on non-blocking point-to-point messages polled against a deadline: a rank
that stops answering does not hang the others; the waiting rank asks every rank to answer a roll
call and names the ones that do not. Bytes are counted as they are sent, wait time as it is spent.
"""
from __future__ import annotations

import atexit
import os
import queue
import sys
import threading
import time

import numpy as np

from ..errors import TdcError

DATA_TAG, ROLL_TAG = 11, 12
P2P_TAG = 1000            # send/recv of a partitioned step: P2P_TAG + the op's tag (mod 30000)
ROLL_GRACE = 2.0          # seconds the live ranks have to answer a roll call
REDUCE = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}


class CommError(TdcError):
    """A rank did not answer in time."""


def launched_ranks() -> int:
    """The world size mpiexec (MPICH's hydra, or Open MPI) started this process in; 1 if none."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


class Job:
    """One collective for the communication thread: reduce `buf` in place by `op` with `algo`, or
    (op None) call `algo(comm)`."""
    __slots__ = ("buf", "op", "algo", "done", "error")

    def __init__(self, buf, op, algo):
        self.buf, self.op, self.algo = buf, op, algo
        self.done = threading.Event()
        self.error: Exception | None = None


class World1:
    """A world of one rank: every reduction is its input."""
    rank, size = 0, 1
    bytes_sent, wait_seconds = 0, 0.0

    def start(self, buf: np.ndarray, op: str, algo: str):
        return None

    def wait(self, job) -> None:
        return None

    def agree(self, value: str, what: str) -> None:
        return None


class MPIComm:
    """The ranks of an MPI job (mpi4py), on a communicator of tdc's own."""

    def __init__(self, timeout: float = 30.0):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()   # tdc's messages never match the caller's
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = float(timeout)
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        # how long a wait yields before it sleeps: see complete()
        self._yield_s = 0.05 if local.Get_size() <= (os.cpu_count() or 1) else 0.0
        local.Free()
        self.bytes_sent = 0
        self.wait_seconds = 0.0
        self._jobs: queue.Queue = queue.Queue()
        self._token = np.zeros(1, np.uint8)
        self._sends: list = []        # (request, private copy, dst) of sends not yet taken
        self._thread = threading.Thread(target=self._serve, name="tdc-comm", daemon=True)
        self._thread.start()
        atexit.register(self.stop)    # registered after mpi4py's finalizer: runs before it

    # ---- the interface ------------------------------------------------------------------------
    def start(self, buf: np.ndarray, op: str, algo: str) -> Job:
        """Reduce the C-contiguous array `buf` in place over all ranks by `op` (sum, mean, max, min)
        with `algo` (ring, doubling, tree or mpi), on the communication thread."""
        if algo not in ALGORITHMS:
            raise TdcError(f"unknown allreduce algorithm {algo!r}; choose from {', '.join(ALGORITHMS)}")
        job = Job(buf.reshape(-1), op, algo)
        self._jobs.put(job)
        return job

    def wait(self, job: Job | None) -> None:
        if job is None:          # nothing in flight
            return
        t0 = time.perf_counter()
        job.done.wait()
        self.wait_seconds += time.perf_counter() - t0
        if job.error is not None:
            raise job.error

    def allreduce(self, buf: np.ndarray, op: str = "sum", algo: str = "ring") -> None:
        self.wait(self.start(buf, op, algo))

    def call(self, fn) -> None:
        """Run fn(self) on the communication thread, in order with the collectives, and wait."""
        job = Job(None, None, fn)
        self._jobs.put(job)
        self.wait(job)

    def agree(self, value: str, what: str) -> None:
        """Refuse to go on unless every rank has the same `value` (a program's fingerprint, a
        setting): the ranks would otherwise deadlock or compute nonsense."""
        values = self.comm.allgather(value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise TdcError(f"the ranks disagree on {what}: rank 0 has {values[0]}, rank {odd[0]} has {values[odd[0]]}")

    # ---- the communication thread ---------------------------------------------------------------
    def stop(self) -> None:
        """Finish the queued jobs and the sends in flight, and end the communication thread (it
        polls MPI while idle, which must stop before MPI is finalized)."""
        if self._thread.is_alive():
            try:
                self.call(lambda c: c.flush_sends())
            except TdcError as e:
                print(f"tdc: error: {e}", file=sys.stderr, flush=True)
            self._jobs.put(None)
            self._thread.join()

    # ---- point to point (a partitioned step's send and recv) ------------------------------------
    def post_send(self, x: np.ndarray, dst: int, tag: int) -> None:
        """Send a copy of x to rank dst without waiting for it to be taken (on the communication
        thread, in order with the collectives): a send never blocks, so no schedule of sends
        and receives that follows one order on every rank can deadlock."""
        buf = np.array(x, order="C")

        def post(c):
            c._sends = [s for s in c._sends if not s[0].Test()]
            c.bytes_sent += buf.nbytes
            c._sends.append((c.comm.Isend(buf, dest=dst, tag=P2P_TAG + tag % 30000), buf, dst))
        self.call(post)

    def receive(self, out: np.ndarray, src: int, tag: int) -> None:
        self.call(lambda c: c.complete([c.comm.Irecv(out, source=src, tag=P2P_TAG + tag % 30000)], [src],
                                       f"receiving from rank {src}"))

    def flush_sends(self) -> None:
        """Wait (until the timeout) for every send in flight to be taken."""
        if self._sends:
            self.complete([s[0] for s in self._sends], [s[2] for s in self._sends], "sends in flight")
            self._sends = []

    def allgather(self, x: np.ndarray, out: np.ndarray, axis: int, sizes) -> None:
        """out = the concatenation along `axis` of every rank's x (rank r's extent: sizes[r])."""
        def run(c):
            ring_allgather(c, np.ascontiguousarray(x), out, axis, list(sizes))
        self.call(run)

    def gather_arrays(self, arrays: dict[str, np.ndarray], root: int = 0) -> dict[str, np.ndarray] | None:
        """Every rank's named arrays at rank `root` (a partitioned step's params, for saving and
        evaluating): root gets them all (its own where names repeat), the others None."""
        if self.rank != root:
            names = list(arrays)
            blob = np.frombuffer("\0".join(names).encode(), np.uint8)
            buf = pack([len(names)], [blob] + [np.ascontiguousarray(arrays[k]).reshape(-1) for k in names])
            self.call(lambda c: c.complete([c.comm.Isend(buf, dest=root, tag=GATHER_TAG)], [root],
                                           f"sending the params to rank {root}"))
            return None
        got = dict(arrays)
        for q in range(self.size):
            if q == root:
                continue
            holder = []

            def take(c, q=q):
                st = c.MPI.Status()
                deadline = time.monotonic() + c.timeout
                while not c.comm.Iprobe(source=q, tag=GATHER_TAG, status=st):
                    if time.monotonic() > deadline:
                        raise CommError(f"rank {c.rank}: no answer from rank {q} within {c.timeout:g} s "
                                        "(gathering the params); stopping the job")
                    time.sleep(1e-4)
                    c._answer_roll_calls()
                buf = np.empty(st.Get_count(c.MPI.BYTE), np.uint8)
                c.comm.Recv(buf, source=q, tag=GATHER_TAG)
                holder.append(buf)
            self.call(take)
            head, parts = unpack(holder[0])
            names = bytes(parts[0]).decode().split("\0") if head[0] else []
            for name, x in zip(names, parts[1:]):
                got.setdefault(name, x)
        return got

    def _serve(self):
        while True:
            try:
                job = self._jobs.get(timeout=0.05)
            except queue.Empty:
                self._answer_roll_calls()
                continue
            if job is None:
                return
            try:
                if job.op is None:
                    job.algo(self)
                else:
                    ALGORITHMS[job.algo](self, job.buf, REDUCE[job.op])
                if job.op == "mean":
                    job.buf /= job.buf.dtype.type(self.size)
            except Exception as e:   # reported by wait() in the thread that runs the step
                job.error = e if isinstance(e, TdcError) else TdcError(f"rank {self.rank}: {type(e).__name__}: {e}")
            job.done.set()

    def send(self, x: np.ndarray, dst: int):
        self.bytes_sent += x.nbytes
        return self.comm.Isend(x, dest=dst, tag=DATA_TAG)

    def recv(self, x: np.ndarray, src: int):
        return self.comm.Irecv(x, source=src, tag=DATA_TAG)

    def complete(self, reqs, peers, what: str, timeout: float | None = None) -> None:
        """Wait for requests `reqs` (messages with the ranks `peers`) until the deadline (the
        communicator's timeout unless given)."""
        MPI = self.MPI
        timeout = self.timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = start + timeout
        spins = 0
        while not MPI.Request.Testall(reqs):
            spins += 1
            if spins > 2000:
                # a large message moves only while its ranks poll: with a core per rank, yield
                # for the first 50 ms; when ranks outnumber cores (a yielding rank still takes its
                # share of the core) or in a long wait, sleep between polls
                if time.monotonic() - start < self._yield_s:
                    os.sched_yield()
                else:
                    time.sleep(1e-4)
                self._answer_roll_calls()
            if time.monotonic() > deadline:
                silent = self._roll_call()
                who = ", ".join(map(str, silent or sorted(set(peers))))
                raise CommError(f"rank {self.rank}: no answer from rank {who} within {timeout:g} s "
                                f"({what}); stopping the job")

    def barrier(self, what: str, timeout: float) -> None:
        """Wait until every rank is here, for at most `timeout` seconds (then name the absent)."""
        self.call(lambda c: c.complete([c.comm.Ibarrier()], range(c.size), what, timeout))

    def _answer_roll_calls(self):
        MPI = self.MPI
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=ROLL_TAG):
            self.comm.Recv(self._token, source=MPI.ANY_SOURCE, tag=ROLL_TAG)

    def _roll_call(self, ranks=None) -> list[int]:
        """The ranks (of `ranks`, by default all others) that do not receive a synchronous
        message within ROLL_GRACE seconds."""
        others = [q for q in (range(self.size) if ranks is None else ranks) if q != self.rank]
        reqs = [self.comm.Issend(self._token, dest=q, tag=ROLL_TAG) for q in others]
        deadline = time.monotonic() + ROLL_GRACE
        while time.monotonic() < deadline and not all(r.Test() for r in reqs):
            self._answer_roll_calls()
            time.sleep(1e-3)
        return [q for q, r in zip(others, reqs) if not r.Test()]


# ---- allreduce algorithms on point-to-point messages (in place on a flat buffer) ----------------

def ring(c: MPIComm, buf: np.ndarray, reduce) -> None:
    """Reduce-scatter then allgather around the ring: each rank sends 2 (p - 1) / p of the data.
    Chunk k is reduced in the order k+1, k+2, ... around the ring, then copied to everyone, so
    every rank ends with the same bits."""
    p, r = c.size, c.rank
    right, left = (r + 1) % p, (r - 1) % p
    bounds = [len(buf) * i // p for i in range(p + 1)]
    chunk = lambda i: buf[bounds[i % p]:bounds[i % p + 1]]  # noqa: E731
    tmp = np.empty(bounds[1] - bounds[0] + 1, buf.dtype)
    for step in range(p - 1):                  # reduce-scatter: r ends holding chunk r + 1
        out, inc = chunk(r - step), chunk(r - step - 1)
        reqs = [c.recv(tmp[:len(inc)], left), c.send(out, right)]
        c.complete(reqs, [left], "ring allreduce")
        reduce(inc, tmp[:len(inc)], out=inc)
    for step in range(p - 1):                  # allgather
        reqs = [c.recv(chunk(r - step), left), c.send(chunk(r + 1 - step), right)]
        c.complete(reqs, [left], "ring allreduce")


def doubling(c: MPIComm, buf: np.ndarray, reduce) -> None:
    """Recursive doubling: log2 p exchanges of the whole vector. With p not a power of two, the
    first 2 * (p - p2) ranks pair up first (odd ones keep the pair's sum) and get it back after."""
    p, r = c.size, c.rank
    p2 = 1 << (p.bit_length() - 1)
    rem = p - p2
    tmp = np.empty_like(buf)
    if r < 2 * rem:
        if r % 2 == 0:
            c.complete([c.send(buf, r + 1)], [r + 1], "recursive-doubling allreduce")
            c.complete([c.recv(buf, r + 1)], [r + 1], "recursive-doubling allreduce")
            return
        c.complete([c.recv(tmp, r - 1)], [r - 1], "recursive-doubling allreduce")
        reduce(tmp, buf, out=buf)
        me = r // 2
    else:
        me = r - rem
    mask = 1
    while mask < p2:
        peer = me ^ mask
        q = peer * 2 + 1 if peer < rem else peer + rem
        c.complete([c.recv(tmp, q), c.send(buf, q)], [q], "recursive-doubling allreduce")
        lo, hi = (tmp, buf) if q < r else (buf, tmp)      # the same operand order on both ranks
        reduce(lo, hi, out=buf)
        mask <<= 1
    if r < 2 * rem:
        c.complete([c.send(buf, r - 1)], [r - 1], "recursive-doubling allreduce")


def tree(c: MPIComm, buf: np.ndarray, reduce) -> None:
    """Binomial tree: reduce to rank 0, then broadcast from it (2 log2 p steps)."""
    p, r = c.size, c.rank
    tmp = np.empty_like(buf)
    mask = 1
    while mask < p:                            # reduce
        if r & mask:
            c.complete([c.send(buf, r - mask)], [r - mask], "tree allreduce")
            break
        if r + mask < p:
            c.complete([c.recv(tmp, r + mask)], [r + mask], "tree allreduce")
            reduce(buf, tmp, out=buf)
        mask <<= 1
    mask = 1
    while mask < p:
        mask <<= 1
    mask >>= 1
    while mask:                                # broadcast, the reduce's steps backwards
        if r % (2 * mask) == 0 and r + mask < p:
            c.complete([c.send(buf, r + mask)], [r + mask], "tree allreduce")
        elif r % (2 * mask) == mask:
            c.complete([c.recv(buf, r - mask)], [r - mask], "tree allreduce")
        mask >>= 1


def library(c: MPIComm, buf: np.ndarray, reduce) -> None:
    """The MPI library's own allreduce (MPI_Iallreduce, polled against the deadline)."""
    MPI = c.MPI
    op = {np.add: MPI.SUM, np.maximum: MPI.MAX, np.minimum: MPI.MIN}[reduce]
    c.bytes_sent += buf.nbytes * 2 * (c.size - 1) // c.size   # what a bandwidth-optimal allreduce sends
    c.complete([c.comm.Iallreduce(MPI.IN_PLACE, buf, op=op)], range(c.size), "MPI_Allreduce")


ALGORITHMS = {"ring": ring, "doubling": doubling, "tree": tree, "mpi": library}


def ring_allgather(c: MPIComm, x: np.ndarray, out: np.ndarray, axis: int, sizes: list[int]) -> None:
    """Around the ring, p - 1 steps: at step s rank r passes on the piece of rank r - s. The
    pieces are gathered whole, then laid into `out` along `axis`."""
    p, r = c.size, c.rank
    outer = int(np.prod(out.shape[:axis], dtype=np.int64))
    inner = int(np.prod(out.shape[axis + 1:], dtype=np.int64))
    pieces = [np.empty(outer * sizes[q] * inner, out.dtype) for q in range(p)]
    pieces[r][...] = x.reshape(-1)
    right, left = (r + 1) % p, (r - 1) % p
    for step in range(p - 1):
        send, take = (r - step) % p, (r - step - 1) % p
        reqs = [c.recv(pieces[take], left), c.send(pieces[send], right)]
        c.complete(reqs, [left], "ring allgather")
    flat = out.reshape(outer, -1)
    off = 0
    for q in range(p):
        flat[:, off:off + sizes[q] * inner] = pieces[q].reshape(outer, sizes[q] * inner)
        off += sizes[q] * inner


# ---- messages: a header of int64s and arrays, in one byte buffer ----------------------------------

GATHER_TAG = 14
_DTYPES = [np.dtype(t) for t in ("float32", "int32", "uint8", "uint16", "float16", "int8", "float64", "int64",
                                 "bool")]
_CODE = {d: i for i, d in enumerate(_DTYPES)}


def pack(head: list[int], arrays: list[np.ndarray]) -> np.ndarray:
    """One uint8 buffer holding the ints `head` and the arrays (flattened)."""
    meta = [len(head), *head, len(arrays)]
    for a in arrays:
        meta += [_CODE[a.dtype], a.size]
    parts = [np.asarray(meta, np.int64).view(np.uint8)] + [np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                                                           for a in arrays]
    return np.concatenate(parts)


def unpack(buf: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    ints = np.frombuffer(buf, np.int64, count=1)
    nh = int(ints[0])
    ints = np.frombuffer(buf, np.int64, count=nh + 2)
    head, count = [int(x) for x in ints[1:nh + 1]], int(ints[nh + 1])
    meta = np.frombuffer(buf, np.int64, count=nh + 2 + 2 * count)[nh + 2:].reshape(count, 2)
    off = (nh + 2 + 2 * count) * 8
    arrays = []
    for code, size in meta:
        dt = _DTYPES[code]
        arrays.append(np.frombuffer(buf, dt, count=int(size), offset=off).copy())
        off += int(size) * dt.itemsize
    return head, arrays


# ---- the comm ops of a step, run at Python level --------------------------------------------------

RUNTIME_ALGO = {"auto": "mpi"}    # an allreduce the data_parallel pass did not place: the library's


def comm_step(node, comm, pending: dict):
    """A function of (input arrays..., output arrays...) running comm op `node` on `comm`.
    `pending` maps an allreduce_start's output value to its job until the allreduce_wait."""
    fn = _comm_step(node, comm, pending)
    if all(v.type.dtype != "bf16" for v in node.inputs + node.outputs):
        return fn
    # numpy exports no buffer of an ml_dtypes array, which mpi4py needs: bf16 (moved, never
    # reduced) travels as its uint16 bits, through views that write into the bf16 buffers
    return lambda *arrays: fn(*(a.view(np.uint16) for a in arrays))


def _comm_step(node, comm, pending: dict):
    op, attrs = node.op, node.attrs
    if op in ("allreduce", "allreduce_start"):
        algo = RUNTIME_ALGO.get(attrs["algo"], attrs["algo"])
        out_value = node.outputs[0]

        def reduce(x, out):
            out[...] = x
            job = comm.start(out, attrs["op"], algo)
            if op == "allreduce":
                comm.wait(job)
            else:
                pending[out_value] = job
        return reduce
    if op == "allreduce_wait":
        handle = node.inputs[0]

        def wait(h, out):
            comm.wait(pending.pop(handle, None))
            out[...] = h
        return wait
    if comm.size == 1:    # a world of one rank: broadcast, reduce_to and allgather return their input
        if op in ("send", "recv"):
            raise TdcError(f"{op} needs several processes; this one runs alone (rank 0 of 1)")

        def alone(x, out):
            out[...] = x
        return alone
    if op == "allgather":
        def gather(x, out):
            comm.allgather(x, out, attrs["axis"], attrs["sizes"])
        return gather
    if op == "broadcast":
        def bcast(x, out):
            out[...] = x
            comm.call(lambda c: c.complete([c.comm.Ibcast(out, root=attrs["root"])], [attrs["root"]], "broadcast"))
        return bcast
    if op == "reduce_to":
        def reduce_to(x, out):
            src = np.ascontiguousarray(x)
            root = attrs["root"]
            comm.call(lambda c: c.complete([c.comm.Ireduce(src, out, op=c.MPI.SUM, root=root)],
                                           range(c.size), "reduce"))
            if comm.rank != root:
                out[...] = 0
        return reduce_to
    if op == "send":
        def send(x):
            comm.post_send(x, attrs["dst"], attrs["tag"])
        return send
    if op == "recv":
        def recv(out):
            comm.receive(out, attrs["src"], attrs["tag"])
        return recv
    raise TdcError(f"internal: no runtime for comm op {op}")


def check_world(graph_world: int, comm) -> None:
    """Refuse to run a step compiled for `graph_world` ranks in a world of another size."""
    if graph_world > 1 and comm.size != graph_world:
        raise TdcError(f"this step was compiled for {graph_world} ranks but runs in a world of {comm.size}: "
                       f"start it with mpiexec -n {graph_world} (tdc train --ranks {graph_world} does)")


# ---- one communicator per process -----------------------------------------------------------------

_world = None


def communicator(timeout: float | None = None):
    """This process's communicator: MPIComm when mpiexec started several ranks, else World1.
    `timeout` (seconds; default 30) sets how long a rank waits for another."""
    global _world
    if _world is None:
        _world = MPIComm(timeout or 30.0) if launched_ranks() > 1 else World1()
    elif timeout is not None and isinstance(_world, MPIComm):
        _world.timeout = float(timeout)
    return _world


_failure_notices = [0]


def survive_lost_ranks() -> None:
    """Go on when another rank of the job dies. mpiexec -disable-auto-cleanup leaves the other
    ranks running, and MPICH's hydra tells each of them with SIGUSR1, whose default action would
    end them too: count the notices instead (`failure_notices`), so a server can look for the
    lost rank at once."""
    import signal

    def notice(signum, frame):
        _failure_notices[0] += 1
    signal.signal(signal.SIGUSR1, notice)


def failure_notices() -> int:
    """How many times this process was told that another rank died (see survive_lost_ranks)."""
    return _failure_notices[0]


def fail_job(message: str, code: int = 3) -> None:
    """Print one line and end every rank of the job (a rank that exits alone would leave the others
    waiting for it until their timeout)."""
    print(f"tdc: error: {message}", file=sys.stderr, flush=True)
    if launched_ranks() > 1:
        import time
        from mpi4py import MPI
        # hydra forwards a rank's stderr asynchronously and the abort tears its forwarding down:
        # on a loaded machine the line was lost (the job then ended with no reason given)
        time.sleep(0.5)
        MPI.COMM_WORLD.Abort(code)
    sys.exit(code)
