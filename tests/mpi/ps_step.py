"""Run under mpiexec -n S+W: the parameter-server training step on the staged runtime, S servers
and W workers, for each backend given on the command line, STEPS steps with batch B split over
the workers; against one process training on the whole batch on the same backend (what
data-parallel training equals, test_data_parallel) and against the reference's simulation of the
placed step itself. With a
compression spec (no servers, N data-parallel ranks) the same for a compressed allreduce, which
is checked for identical params on every rank. Rank 0 prints one JSON line.

    mpiexec -n 3 python ps_step.py 1 sync llvm reference numba
    mpiexec -n 2 python ps_step.py 0 topk:0.1 llvm
"""
import json
import os
import sys

import numpy as np

import tdc
from tdc.backends.comm import communicator
from tdc.passes.data_parallel import DataParallel
from tdc.passes.parameter_server import ParameterServer
from tdc.runtime.staged import StagedStep

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import mlp  # noqa: E402

STEPS, BATCH, LR = 8, 12, np.float32(0.01)
servers, mode, backends = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
comm = communicator(timeout=30)
workers = comm.size - servers
rng = np.random.default_rng(0)
x = rng.standard_normal((BATCH * STEPS, 784)).astype(np.float32)
y = rng.integers(0, 10, BATCH * STEPS)
opt = tdc.Optimizer("momentum", lr=float(LR))    # Adam's 1/sqrt(v) would magnify last-bit differences
if servers:
    cfg = ParameterServer(servers, workers, mode=mode)
else:
    cfg = DataParallel(workers, compress=mode)
b = BATCH // workers
report = []
for backend in backends:
    exe = StagedStep(tdc.train_step(mlp.mlp, batch=BATCH, optimizer=opt, parallel=cfg), cfg, comm,
                     backend=backend, seed=5)
    if exe.is_server:
        exe.serve()
        continue
    losses = []
    for s in range(STEPS):
        w = comm.rank
        rows = slice(s * BATCH + w * b, s * BATCH + (w + 1) * b)
        losses.append(float(exe(x=x[rows], y=y[rows], lr=LR)["loss"]))
    exe.finish()
    params = {k: exe.state[k] for k in exe.state if not k.endswith((".m", ".v")) and k != "step"}
    digests = comm.comm.gather(b"".join(params[k].tobytes() for k in sorted(params)), root=0) \
        if not servers else None
    if comm.rank != 0:
        continue
    # the oracles: one process on the same backend, and the placed step on simulated ranks
    one = tdc.compile(tdc.train_step(mlp.mlp, batch=BATCH, optimizer=opt), backend=backend, seed=5)
    sim = tdc.compile(tdc.train_step(mlp.mlp, batch=BATCH, optimizer=opt, parallel=cfg), seed=5) if servers \
        else None
    for s in range(STEPS):
        one(x=x[s * BATCH:(s + 1) * BATCH], y=y[s * BATCH:(s + 1) * BATCH], lr=LR)
        if sim is not None:
            sim(x=x[s * BATCH:(s + 1) * BATCH], y=y[s * BATCH:(s + 1) * BATCH], lr=LR)
    report.append({
        "backend": backend,
        "one_err": max(float(np.max(np.abs(params[k] - one.state[k]))) for k in params),
        "sim_err": max(float(np.max(np.abs(params[k] - sim.state[k]))) for k in params) if sim else None,
        "same_on_every_rank": len(set(digests)) == 1 if digests else None,
        "bytes_sent": exe.comm_stats()[0], "losses": losses,
        "staleness": {str(k): v for st in exe.stats for k, v in st.staleness.items()},
    })
if comm.rank == 0:
    print(json.dumps(report))
