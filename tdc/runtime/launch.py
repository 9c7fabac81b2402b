"""Running a training job on several ranks: the command-line settings of data parallelism, and
the launcher that starts `tdc train --ranks N` under the venv's mpiexec.

`tdc train MODEL --ranks N ...` re-executes itself as `mpiexec -n N python -m tdc.cli train ...`
(under an existing mpiexec with N ranks it just runs). The launcher reads what the ranks print
on stderr: a rank's own error line is passed on; when a rank dies (a crash, a kill), MPICH's
hydra ends the job and the launcher says which rank died, in one line.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ..backends.comm import launched_ranks, survive_lost_ranks
from ..errors import TdcError
from ..ops.comm import ALLREDUCE_ALGOS
from ..ops.compress import COMPRESS_HELP, parse_compression
from ..passes.data_parallel import NETWORKS, DataParallel
from ..passes.parameter_server import MODES, ParameterServer
from ..passes.partition import PARTITIONERS, SCHEDULES, STRATEGIES, Partition

LAUNCHED = "TDC_LAUNCHED_RANKS"
LOST = "lost worker rank"      # in a parameter server's warning that it goes on without a worker


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (the step on several ranks, over MPI)")
    g.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="run the step on N ranks (default 1); how is --parallel's choice")
    g.add_argument("--parallel", default="data", choices=("data",) + STRATEGIES,
                   help="data: each rank takes batch / N samples, gradients are averaged with allreduce (the "
                        "default); model: the layers in N stages chosen by the cost model, activations and "
                        "gradients sent at the cuts; pipeline: those stages fed with --microbatches micro-batches; "
                        "tensor: large linear layers' weights split over the ranks; spatial: each image's rows split "
                        "over the ranks, halos exchanged")
    g.add_argument("--microbatches", type=int, metavar="M",
                   help="pipeline: split each batch into M micro-batches, gradients summed over them (default 2N)")
    g.add_argument("--pipeline-schedule", default="1f1b", choices=SCHEDULES,
                   help="pipeline: 1f1b (one forward, one backward: at most N micro-batches' activations held; the "
                        "default) or gpipe (all forwards, then all backwards)")
    g.add_argument("--partitioner", default="auto", choices=PARTITIONERS,
                   help="model and pipeline stages: auto (the cost model's best split; the default) or equal (the "
                        "same number of layers per stage, the naive baseline)")
    g.add_argument("--allreduce", default="auto", choices=ALLREDUCE_ALGOS,
                   help="allreduce algorithm: ring, doubling (recursive doubling), tree (binomial), mpi (the "
                        "library's), or auto: the cheapest by an alpha-beta cost for each message (default)")
    g.add_argument("--bucket-mb", type=float, default=1.0, metavar="MB",
                   help="pack gradients into buckets of about MB megabytes per allreduce (default 1; 0: one per tensor)")
    g.add_argument("--no-overlap", action="store_true",
                   help="wait for each bucket's allreduce at once instead of overlapping it with the backward pass")
    g.add_argument("--sync-bn", action="store_true",
                   help="batchnorm statistics over the global batch (allreduced) instead of per rank")
    g.add_argument("--network", default="shm", choices=list(NETWORKS),
                   help="the network the auto algorithm choice prices: " +
                        ", ".join(f"{k} ({v.name})" for k, v in NETWORKS.items()) + " (default shm)")
    g.add_argument("--comm-timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for another rank before ending the job with a message (default 30)")
    g.add_argument("--compress", default="none", metavar="SPEC",
                   help="compress the gradients on the wire (allreduce and parameter-server push): " + COMPRESS_HELP)
    ps = p.add_argument_group("parameter servers (tdc train; the last S of the --ranks N ranks)")
    ps.add_argument("--ps", type=int, default=0, metavar="S",
                    help="S server ranks keep the params, sharded by size, and the optimizer state; the other N - S "
                         "ranks are workers that push gradients and pull params")
    ps.add_argument("--mode", choices=MODES,
                    help="sync: servers wait for every worker each step (equals data parallelism); async: apply each "
                         "worker's gradient as it comes (Downpour); bounded: async, but no worker more than "
                         "--staleness steps ahead of the slowest (default sync, or bounded with --staleness)")
    ps.add_argument("--staleness", type=int, metavar="K", help="bounded mode's K (default 0 with --mode bounded)")
    ps.add_argument("--staleness-lr", action="store_true",
                    help="servers divide lr by 1 + the staleness of each update (Zhang et al. 2016)")
    ps.add_argument("--momentum-correction", action="store_true",
                    help="async modes: lower the momentum by the 1 - 1/workers that asynchrony adds")


def parallel_config(args) -> DataParallel | ParameterServer | Partition | None:
    """The DataParallel, ParameterServer or Partition settings of the command line, or None for
    one rank."""
    if args.comm_timeout <= 0:
        raise TdcError(f"--comm-timeout must be > 0 seconds, got {args.comm_timeout:g}")
    strategy = getattr(args, "parallel", "data")
    if strategy != "data" or args.microbatches is not None:
        return _partition_config(args, strategy)
    ps = getattr(args, "ps", 0)
    mode, staleness = getattr(args, "mode", None), getattr(args, "staleness", None)
    if not ps:
        if mode or staleness is not None or getattr(args, "staleness_lr", False):
            raise TdcError("--mode, --staleness and --staleness-lr are settings of parameter servers: add --ps S")
    elif ps < 0 or args.ranks <= ps:
        raise TdcError(f"--ps {ps} needs --ranks N with N > {ps} (the servers, and at least one worker)")
    if args.ranks == 1:
        if args.compress != "none":
            parse_compression(args.compress)
            raise TdcError("--compress compresses what ranks send each other: it needs --ranks N with N > 1")
        return None
    if ps:
        if mode == "async" and staleness is not None:
            raise TdcError("--staleness bounds the bounded mode: use --mode bounded (async has no bound)")
        mode = mode or ("bounded" if staleness is not None else "sync")
        if args.sync_bn:
            raise TdcError("--sync-bn averages batch statistics over data-parallel ranks; it does not combine "
                           "with --ps")
        return ParameterServer(ps, args.ranks - ps, mode=mode, staleness=staleness or 0, compress=args.compress)
    return DataParallel(args.ranks, bucket_bytes=int(args.bucket_mb * (1 << 20)), overlap=not args.no_overlap,
                        algo=args.allreduce, sync_bn=args.sync_bn, network=args.network, compress=args.compress)


def _partition_config(args, strategy: str) -> Partition:
    if strategy == "data":
        raise TdcError("--microbatches splits a pipeline's batch: add --parallel pipeline")
    if args.ranks < 2:
        raise TdcError(f"--parallel {strategy} splits the step over ranks: add --ranks N with N >= 2")
    taken = [flag for flag, on in (("--ps", getattr(args, "ps", 0)), ("--compress", args.compress != "none"),
                                   ("--sync-bn", args.sync_bn), ("--no-overlap", args.no_overlap),
                                   ("--allreduce", args.allreduce != "auto")) if on]
    if taken:
        raise TdcError(f"{taken[0]} is a setting of data parallelism; --parallel {strategy} does not take it")
    if args.microbatches is not None and strategy != "pipeline":
        raise TdcError("--microbatches splits a pipeline's batch: use it with --parallel pipeline")
    m = args.microbatches if args.microbatches is not None else (2 * args.ranks if strategy == "pipeline" else 1)
    return Partition(strategy, args.ranks, microbatches=m, schedule=args.pipeline_schedule,
                     partitioner=args.partitioner, network=args.network)


def mpiexec() -> str:
    """The venv's mpiexec (the mpich package's hydra), beside the Python running tdc."""
    for d in (Path(sys.executable).parent, Path(sys.prefix) / "bin"):
        if (d / "mpiexec").exists():
            return str(d / "mpiexec")
    raise TdcError("mpiexec not found beside this Python: install the mpich package (pip install mpich mpi4py)")


def needs_launch(ranks: int) -> bool:
    """Whether `tdc train --ranks N` must start the ranks itself (it is not one of them yet)."""
    world = launched_ranks()
    if world > 1:
        if world != ranks:
            raise TdcError(f"--ranks {ranks}, but mpiexec started {world} ranks: give the same number to both")
        return False
    return ranks > 1


# MPICH's hydra, when a rank dies, prints on stdout: "=   PID 1234 RUNNING AT host", "=   EXIT CODE: 9",
# "YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)". Each rank tells the launcher
# its pid on stderr first ("tdc-rank: R pid P"), so the launcher can name it.
RANK_LINE = "tdc-rank:"
_RANK_PID = re.compile(r"tdc-rank: (\d+) pid (\d+)\n?")
_HYDRA_PID = re.compile(r"PID (\d+) RUNNING AT")
_HYDRA_EXIT = re.compile(r"EXIT CODE: (\d+)")
_HYDRA_STRING = re.compile(r"EXIT STRING: (.*)")
_HYDRA_BANNER = ("=", "YOUR APPLICATION", "This typically", "Please see", "[proxy", "Abort(", "[mpiexec")


def announce_rank(rank: int) -> None:
    """In a rank started by `launch`: tell the launcher which pid runs this rank."""
    if os.environ.get(LAUNCHED):
        print(f"{RANK_LINE} {rank} pid {os.getpid()}", file=sys.stderr, flush=True)


RANK_OUTPUT = "TDC_RANK_OUTPUT"


def attach_rank_output() -> None:
    """In a rank started by `launch(..., survivable=True)`: write stdout and stderr to the
    launcher's pipes for this rank. When a rank dies, hydra stops passing on the others' output
    (and a write to it ends the writer), so ranks that go on without a lost one talk to the
    launcher directly."""
    d, rank = os.environ.get(RANK_OUTPUT), os.environ.get("PMI_RANK")
    if not d or rank is None:
        return
    survive_lost_ranks()
    for fd, stream, name in ((1, sys.stdout, "out"), (2, sys.stderr, "err")):
        stream.flush()
        w = os.open(os.path.join(d, f"{rank}.{name}"), os.O_WRONLY)
        os.dup2(w, fd)
        os.close(w)
        stream.reconfigure(line_buffering=True)


def rank_threads(ranks: int) -> dict[str, str]:
    """Threads per rank when `ranks` ranks share this machine: its cores split between them (the
    LLVM runtime's pool and Numba's), unless the environment says otherwise."""
    from ..passes.target import available_cores
    n = str(max(1, available_cores() // ranks))
    return {"TDC_THREADS": n, "NUMBA_NUM_THREADS": n}


def launch(ranks: int, argv: list[str], survivable: bool = False) -> int:
    """Run `tdc <argv>` on `ranks` ranks under mpiexec and return its exit status; errors become
    one line naming the rank. survivable: a rank that dies does not end the others (an
    asynchronous parameter server goes on without a lost worker)."""
    rank_cmd = [sys.executable, "-m", "tdc.cli", *argv]
    if survivable:
        rank_cmd = [sys.executable, str(Path(__file__).with_name("supervisor.py")), *rank_cmd]
    cmd = [mpiexec(), *(["-disable-auto-cleanup"] if survivable else []), "-n", str(ranks), *rank_cmd]
    env = {**rank_threads(ranks), **os.environ, LAUNCHED: str(ranks)}
    pipes = []
    if survivable:       # each rank's output through a pipe of its own (attach_rank_output)
        tmp = tempfile.mkdtemp(prefix="tdc-ranks-")
        env[RANK_OUTPUT] = tmp
        for r in range(ranks):
            for name in ("out", "err"):
                pipes.append(os.path.join(tmp, f"{r}.{name}"))
                os.mkfifo(pipes[-1])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    ours: list[str] = []         # the ranks' own error lines
    hydra: list[str] = []        # hydra's report of a rank that died
    pids: dict[int, int] = {}    # pid -> rank

    def pump(stream, out):
        blank = False       # hydra's report starts with an empty line: hold empty lines back
        for line in stream:
            if not line.strip():
                blank = True
                continue
            if blank and not line.startswith(_HYDRA_BANNER):
                print(file=out, flush=True)
            blank = False
            if RANK_LINE in line:     # two ranks' lines may arrive run together
                for r, pid in _RANK_PID.findall(line):
                    pids[int(pid)] = int(r)
                line = _RANK_PID.sub("", line)
                if not line.strip():
                    continue
            if line.startswith("tdc: "):
                if line.rstrip("\n") not in ours:      # every rank may find the same mistake
                    print(line, end="", file=out, flush=True)
                ours.append(line.rstrip("\n"))
            elif line.startswith(_HYDRA_BANNER):
                hydra.append(line)
            else:
                print(line, end="", file=out, flush=True)   # the ranks' own output
    def pump_pipe(path, out):
        with open(path, encoding="utf-8", errors="replace") as f:   # waits for the rank to open it
            pump(f, out)
    readers = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, sys.stderr), daemon=True)]
    readers += [threading.Thread(target=pump_pipe, args=(p, sys.stdout if p.endswith(".out") else sys.stderr),
                                 daemon=True) for p in pipes]
    for t in readers:
        t.start()
    try:
        code = proc.wait()
        for p in pipes:          # a rank that died before opening its pipe: end the reader's wait
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        for t in readers:
            t.join()
        if pipes:
            shutil.rmtree(os.path.dirname(pipes[0]), ignore_errors=True)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        print("tdc: interrupted", file=sys.stderr)
        return 130
    text = "".join(hydra)
    pid, why = _HYDRA_PID.search(text), _HYDRA_STRING.search(text) or _HYDRA_EXIT.search(text)
    rank = pids.get(int(pid.group(1))) if pid else None
    who = (f"rank {rank} (pid {pid.group(1)})" if rank is not None
           else f"the rank with pid {pid.group(1)}" if pid else "a rank")
    status = why.group(1) if why else str(code)
    what = (f"died: {status.strip()}" if not status.isdigit()
            else f"died: signal {int(status) - 128}" if int(status) > 128     # 128 + N: through supervisor.py
            else f"exited with status {status}")
    if survivable and code != 0 and any(LOST in line for line in ours) \
            and not any(line.startswith("tdc: error") for line in ours) and rank != 0:
        print(f"tdc: note: {who} {what}; the other ranks finished without it", file=sys.stderr)
        return 0
    if code == 0 or ours:
        return code
    print(f"tdc: error: {who} {what}; the job was stopped (the last checkpoint, if any, is intact: "
          "rerun with --resume to continue)", file=sys.stderr)
    return code or 1
