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
import subprocess
import sys
import threading
from pathlib import Path

from ..backends.comm import launched_ranks
from ..errors import TdcError
from ..ops.comm import ALLREDUCE_ALGOS
from ..passes.data_parallel import NETWORKS, DataParallel

LAUNCHED = "TDC_LAUNCHED_RANKS"


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data parallelism (the training step on several ranks, over MPI)")
    g.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="split each batch over N ranks; gradients are averaged with allreduce every step (default 1)")
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


def parallel_config(args) -> DataParallel | None:
    """The DataParallel settings of the command line, or None for one rank."""
    if args.comm_timeout <= 0:
        raise TdcError(f"--comm-timeout must be > 0 seconds, got {args.comm_timeout:g}")
    if args.ranks == 1:
        return None
    return DataParallel(args.ranks, bucket_bytes=int(args.bucket_mb * (1 << 20)), overlap=not args.no_overlap,
                        algo=args.allreduce, sync_bn=args.sync_bn, network=args.network)


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


def rank_threads(ranks: int) -> dict[str, str]:
    """Threads per rank when `ranks` ranks share this machine: its cores split between them (the
    LLVM runtime's pool and Numba's), unless the environment says otherwise."""
    from ..passes.target import available_cores
    n = str(max(1, available_cores() // ranks))
    return {"TDC_THREADS": n, "NUMBA_NUM_THREADS": n}


def launch(ranks: int, argv: list[str]) -> int:
    """Run `tdc <argv>` on `ranks` ranks under mpiexec and return its exit status; errors become
    one line naming the rank."""
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "tdc.cli", *argv]
    env = {**rank_threads(ranks), **os.environ, LAUNCHED: str(ranks)}
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
    readers = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, sys.stderr), daemon=True)]
    for t in readers:
        t.start()
    try:
        code = proc.wait()
        for t in readers:
            t.join()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        print("tdc: interrupted", file=sys.stderr)
        return 130
    if code == 0 or ours:
        return code
    text = "".join(hydra)
    pid, why = _HYDRA_PID.search(text), _HYDRA_STRING.search(text) or _HYDRA_EXIT.search(text)
    who = (f"rank {pids[int(pid.group(1))]} (pid {pid.group(1)})" if pid and int(pid.group(1)) in pids
           else f"the rank with pid {pid.group(1)}" if pid else "a rank")
    what = (f"died: {why.group(1).strip()}" if why and not why.group(1).isdigit()
            else f"exited with status {why.group(1)}" if why else "failed")
    print(f"tdc: error: {who} {what}; the job was stopped (the last checkpoint, if any, is intact: "
          "rerun with --resume to continue)", file=sys.stderr)
    return code or 1
