"""Run under mpiexec -n N: the data-parallel training step of each (backend, model) given on the
command line, 20 steps on N ranks with batch B / N each, against one process of the reference
backend with batch B (and the reference's own simulated N ranks). Rank 0 prints one JSON line.

    mpiexec -n 2 python dp_step.py numba:mlp llvm:lenet llvm:bn:sync
"""
import json
import os
import sys

import numpy as np

import tdc
from tdc import nn
from tdc.backends.comm import communicator
from tdc.passes.data_parallel import DataParallel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import lenet  # noqa: E402
import mlp  # noqa: E402

STEPS, BATCH = 20, 8
LR = 0.01     # a step size whose trajectory does not amplify rounding differences (0.05 does on LeNet)


@tdc.model(batch=BATCH)
def bn(x: tdc.f32["B", 1, 8, 8]):
    h = nn.conv2d(x, 4, 3, pad=1, bias=False, name="conv")
    h = nn.batchnorm(h, name="bn").relu()
    return nn.linear(h.flatten(), 10, name="fc")


MODELS = {"mlp": mlp.mlp, "lenet": lenet.lenet, "bn": bn}
comm = communicator(timeout=30)      # a rank that stops answering fails the run, not hangs it
N, rank = comm.size, comm.rank
report = []
for spec in sys.argv[1:]:
    backend, name, *flags = spec.split(":")
    model = MODELS[name]
    shape = model.input_types(BATCH)["x"].shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH * STEPS,) + shape[1:]).astype(np.float32)
    y = rng.integers(0, 10, BATCH * STEPS)
    opt = tdc.Optimizer("momentum", lr=LR)
    cfg = DataParallel(N, bucket_bytes=1 << 16, sync_bn="sync" in flags)
    exe = tdc.compile(tdc.train_step(model, optimizer=opt, batch=BATCH, parallel=cfg), backend=backend, seed=3)
    one = tdc.compile(tdc.train_step(model, optimizer=opt, batch=BATCH), backend="reference", seed=3)
    sim = tdc.compile(tdc.train_step(model, optimizer=opt, batch=BATCH, parallel=cfg), backend="reference", seed=3)
    b = BATCH // N
    loss_err = sim_err = 0.0
    for s in range(STEPS):
        xs, ys = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]
        mine = exe(x=xs[rank * b:(rank + 1) * b], y=ys[rank * b:(rank + 1) * b], lr=np.float32(LR))["loss"]
        want = one(x=xs, y=ys, lr=np.float32(LR))["loss"]
        loss_err = max(loss_err, abs(float(mine) - float(want)) / max(1.0, abs(float(want))))
        sim_err = max(sim_err, abs(float(sim(x=xs, y=ys, lr=np.float32(LR))["loss"]) - float(want)))
    param_err = max(float(np.max(np.abs(exe.state[k] - one.state[k]))) for k in one.state)
    sim_param_err = max(float(np.max(np.abs(sim.state[k] - one.state[k]))) for k in one.state)
    digests = comm.comm.allgather(b"".join(exe.state[k].tobytes() for k in sorted(exe.state)))
    report.append({"spec": spec, "loss_err": loss_err, "param_err": param_err, "sim_loss_err": sim_err,
                   "sim_param_err": sim_param_err, "same_params_on_every_rank": all(d == digests[0] for d in digests),
                   "bytes_sent": exe.comm_stats()[0]})
if rank == 0:
    print(json.dumps(report))
