"""Run under mpiexec -n K: the training step of each (backend, model, strategy) given on the command
line, partitioned over the K ranks, 10 steps against one process of the reference backend (and the
reference's own simulated K ranks). Rank 0 prints one JSON line.

    mpiexec -n 2 python partition_step.py llvm:lenet:model numba:tiny:pipeline:gpipe:m=2 llvm:mlp:tensor
"""
import json
import os
import sys
import time

import numpy as np

import tdc
from tdc import nn
from tdc.backends.comm import communicator
from tdc.frontend.init import whole_params
from tdc.passes.partition import Partition

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import digits  # noqa: E402
import lenet  # noqa: E402
import mlp  # noqa: E402
import vgg  # noqa: E402

STEPS, BATCH, LR = 10, 8, 0.01


@tdc.model(batch=BATCH)
def tiny(x: tdc.f32["B", 1, 8, 8]):
    """Small enough for the numba backend's compile in a test: a convolution, pooling, two layers."""
    h = tdc.maxpool2d(nn.conv2d(x, 4, 3, pad=1, name="conv").relu(), 2)
    h = nn.linear(h.flatten(), 32, name="fc1").relu()
    return nn.linear(h, 10, name="fc2")


MODELS = {"tiny": tiny, "digits": digits.digits, "lenet": lenet.lenet, "mlp": mlp.mlp, "vgg": vgg.vgg}
comm = communicator(timeout=30)      # a rank that stops answering fails the run, not hangs it
K, rank = comm.size, comm.rank
report = []
for spec in sys.argv[1:]:
    backend, name, strategy, *flags = spec.split(":")     # flags: a schedule, m=M micro-batches (default 4)
    model = MODELS[name]
    m = int(next((f[2:] for f in flags if f.startswith("m=")), 4)) if strategy == "pipeline" else 1
    schedule = next((f for f in flags if f in ("gpipe", "1f1b")), "1f1b")
    cfg = Partition(strategy, K, microbatches=m, schedule=schedule)
    shape = model.input_types(BATCH)["x"].shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH * STEPS,) + shape[1:]).astype(np.float32)
    y = rng.integers(0, 10, BATCH * STEPS)
    opt = tdc.Optimizer("momentum", lr=LR)
    t0 = time.perf_counter()
    step = tdc.train_step(model, optimizer=opt, batch=BATCH, parallel=cfg)
    exe = tdc.compile(step, backend=backend, seed=3)
    compiled = time.perf_counter() - t0
    one = tdc.compile(tdc.train_step(model, optimizer=opt, batch=BATCH), backend="reference", seed=3)
    sim = tdc.compile(step, backend="reference", seed=3)
    loss_err = sim_err = 0.0
    for s in range(STEPS):
        xs, ys = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]
        got = exe(x=xs, y=ys, lr=np.float32(LR))
        want = one(x=xs, y=ys, lr=np.float32(LR))["loss"]
        if rank == 0:
            loss_err = max(loss_err, abs(float(got["loss"]) - float(want)) / max(1.0, abs(float(want))))
            sim_err = max(sim_err, abs(float(sim(x=xs, y=ys, lr=np.float32(LR))["loss"]) - float(want)))
    state = exe.gather_state()
    if rank == 0:
        mine = whole_params(step, state)
        ref = whole_params(step, sim.gather_state())
        param_err = max(float(np.max(np.abs(mine[k] - one.state[k]) / (1 + np.abs(one.state[k]))))
                        for k in one.state)
        sim_param_err = max(float(np.max(np.abs(ref[k] - one.state[k]) / (1 + np.abs(one.state[k]))))
                            for k in one.state)
        report.append({"spec": spec, "loss_err": loss_err, "param_err": param_err, "sim_loss_err": sim_err,
                       "sim_param_err": sim_param_err, "bytes_sent": exe.comm_stats()[0], "compile_s": compiled})
if rank == 0:
    print(json.dumps(report))
