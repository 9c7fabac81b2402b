"""Run under mpiexec: every allreduce algorithm of both communicators (mpi4py in
tdc/backends/comm.py, C in runtime/comm.c) against MPI_Allreduce on the same data.
Rank 0 prints one JSON line: the largest error per (implementation, algorithm, size) and the bound."""
import ctypes
import json
import sys

import numpy as np
from mpi4py import MPI

from tdc.backends.comm import communicator
from tdc.backends.llvm.runtime import build_comm

SIZES = [int(s) for s in sys.argv[1].split(",")]
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
py = communicator(timeout=20)        # a rank that stops answering fails the run, not hangs it
lib = ctypes.CDLL(str(build_comm().shared_lib_path))
lib.tdc_comm_init(ctypes.c_double(20))
ALGOS = {"ring": 1, "doubling": 2, "tree": 3, "mpi": 0}
OPS = {"sum": 0, "max": 2, "min": 3, "mean": 1}
report = []
for n in SIZES:
    x = np.random.default_rng(1000 * n + rank).standard_normal(n).astype(np.float32)
    for op, mpi_op in (("sum", MPI.SUM), ("max", MPI.MAX), ("min", MPI.MIN), ("mean", MPI.SUM)):
        want = np.empty_like(x)
        world.Allreduce(x, want, op=mpi_op)
        if op == "mean":
            want /= np.float32(size)
        # two float32 sums of p terms in different orders differ by at most 2 (p - 1) u sum|x|
        # (u = eps / 2) to first order; the bound allows p eps sum|x| (divided by p for the mean)
        absx = np.empty_like(x)
        world.Allreduce(np.abs(x), absx, op=MPI.SUM)
        bound = size * np.finfo(np.float32).eps * absx / (size if op == "mean" else 1) + 1e-30
        for algo, code in ALGOS.items():
            got_py = x.copy()
            py.allreduce(got_py, op, algo)
            got_c = np.empty_like(x)
            lib.tdc_comm_allreduce_f32(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(got_c.ctypes.data),
                                       ctypes.c_int64(n), ctypes.c_int64(OPS[op]), ctypes.c_int64(code))
            for impl, got in (("python", got_py), ("c", got_c)):
                ratio = float(np.max(np.abs(got - want) / bound)) if op in ("sum", "mean") else \
                    float(np.max(np.abs(got - want)))
                everywhere = world.allgather(got.tobytes())      # every rank ends with the same bits
                same = all(b == everywhere[0] for b in everywhere)
                report.append({"impl": impl, "algo": algo, "op": op, "n": n, "error_over_bound": ratio,
                               "same_on_every_rank": same})
if rank == 0:
    print(json.dumps(report))
lib.tdc_comm_stop()
