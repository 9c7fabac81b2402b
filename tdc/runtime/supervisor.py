"""Run one rank of a job whose ranks may be lost (`launch(..., survivable=True)`):

    mpiexec -disable-auto-cleanup -n N python .../supervisor.py python -m tdc.cli train ...

MPICH's hydra ends every rank of a job when one of them is killed by a signal, even with
-disable-auto-cleanup. Run as the parent of the real rank, this script turns the rank's death
by a signal into an ordinary exit (status 128 + the signal), so hydra only tells the other
ranks (SIGUSR1) and they go on. It is run by path, so it imports nothing of tdc.
"""
import os
import signal
import subprocess
import sys


def main() -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)    # hydra's notice of a lost rank: for the rank itself
    if os.environ.get("PMI_RANK"):    # hydra reports this pid when the rank ends badly: let the launcher name it
        print(f"tdc-rank: {os.environ['PMI_RANK']} pid {os.getpid()}", file=sys.stderr, flush=True)
    child = subprocess.Popen(sys.argv[1:], close_fds=False)   # the PMI socket hydra handed us is the rank's
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: child.send_signal(s))
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
