"""Run under mpiexec -n K: the pipeline bubble of a chain of equal layers, measured. For each
(schedule, M) on the command line, a K-stage pipeline of M micro-batches runs STEPS steps on the
LLVM backend; each rank's bubble is the time it waited for messages over the step's wall time
(a rank's recv waits are its idle time: sends never block). Rank 0 prints one JSON line with the
mean over ranks beside (K-1)/(M+K-1).

    TDC_THREADS=1 mpiexec -n 2 python benchmarks/pipeline_bubble.py 1f1b:1 1f1b:4 gpipe:8 (benchmarks/partition.py runs it)
"""
import json
import sys
import time

import numpy as np

import tdc
from tdc import nn
from tdc.backends.comm import communicator
from tdc.passes.partition import Partition

LAYERS, WIDTH, BATCH, STEPS, WARMUP = 8, 384, 512, 8, 3


@tdc.model(batch=BATCH)
def chain(x: tdc.f32["B", WIDTH]):
    h = x
    for i in range(LAYERS):
        h = nn.linear(h, WIDTH, name=f"fc{i}").tanh()
    return nn.linear(h, 10, name="out")


def main():
    comm = communicator(timeout=60)
    K, rank = comm.size, comm.rank
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, WIDTH)).astype(np.float32)
    y = rng.integers(0, 10, BATCH)
    report = []
    for spec in sys.argv[1:]:
        schedule, m = spec.split(":")
        m = int(m)
        cfg = Partition("pipeline", K, microbatches=m, schedule=schedule)
        exe = tdc.compile(tdc.train_step(chain, optimizer=tdc.Optimizer("sgd", lr=1e-3), batch=BATCH, parallel=cfg),
                          backend="llvm")
        for _ in range(WARMUP):
            exe(x=x, y=y, lr=np.float32(1e-3))
        _, w0 = exe.comm_stats()
        comm.comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(STEPS):
            exe(x=x, y=y, lr=np.float32(1e-3))
        wall = time.perf_counter() - t0
        _, w1 = exe.comm_stats()
        bubbles = comm.comm.allgather((w1 - w0) / wall)
        report.append({"schedule": schedule, "m": m, "bubble": float(np.mean(bubbles)), "per_rank": bubbles,
                       "theory": (K - 1) / (m + K - 1), "ms_per_step": wall / STEPS * 1e3})
    if rank == 0:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
