"""Hogwild on one machine (Recht, Re, Wright and Niu 2011): several threads run the compiled
training step on different mini-batches at once and write their updates into the same params
without locks. Each thread calls its own copy of the LLVM executable (`for_thread`: scratch and
input buffers of its own, the weights shared), so the only races are on the params themselves,
and a sparse-enough problem barely notices them.

    runners = [exe] + [exe.for_thread() for _ in range(threads - 1)]
    outputs = run_steps(runners, feeds)      # feeds[i]: the inputs of step i
"""
from __future__ import annotations

import threading

from ..errors import TdcError


def run_steps(runners: list, feeds: list[dict]) -> list[dict]:
    """Run step i on thread i mod len(runners), all threads at once; the outputs in step order.
    An error in any thread is raised here once all have stopped."""
    n = len(runners)
    results: list = [None] * len(feeds)
    errors: list[BaseException] = []

    def work(t: int):
        try:
            for i in range(t, len(feeds), n):
                if errors:
                    return
                results[i] = runners[t](**feeds[i])
        except BaseException as e:      # reported by the caller
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,), name=f"tdc-hogwild-{t}") for t in range(1, n)]
    for th in threads:
        th.start()
    work(0)
    for th in threads:
        th.join()
    if errors:
        raise errors[0] if isinstance(errors[0], TdcError) else TdcError(f"a Hogwild thread failed: {errors[0]}")
    return results


def make_runners(exe, threads: int) -> list:
    if threads < 1:
        raise TdcError(f"--threads must be >= 1, got {threads}")
    if not hasattr(exe, "for_thread"):
        raise TdcError(f"Hogwild runs on the llvm backend (threads sharing one compiled step's weights); "
                       f"the {exe.backend} backend has no such copies: use --backend llvm")
    return [exe] + [exe.for_thread() for _ in range(threads - 1)]
