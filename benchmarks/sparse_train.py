"""One training step of the pruned MLP (784-300-100-10), batch 64: dense, dense with the prune
pass's masks (how `tdc train --prune` and `tdc compress` retrain), and with its pruned linear layers
trained as CSR products (`tdc train --weights W --sparse on`), on the numba and LLVM backends.
Median ms per step over alternating rounds, and the masked step's time over the CSR step's.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/sparse_train.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import numpy as np  # noqa: E402

import tdc  # noqa: E402
from tdc.frontend.init import init_params  # noqa: E402
from tdc.passes.sparsify import sparse_training  # noqa: E402
from mlp import mlp  # noqa: E402

BATCH = 64
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
WEIGHTS = ("fc1.weight", "fc2.weight", "fc3.weight")


def pruned_params(sparsity, seed=0):
    p = init_params(mlp.trace(batch=BATCH), seed)
    for k in WEIGHTS:
        w = p[k]
        w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0
    return p


def step_runner(graph, backend, params):
    exe = tdc.compile(graph, backend=backend, params={a.name: params[a.name] for a in graph.args if a.name in params})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 784)).astype(np.float32)
    y = rng.integers(0, 10, BATCH).astype(graph.arg("y").type.np_dtype)
    lr = np.float32(0.01)
    return lambda: exe(x=x, y=y, lr=lr)


def median_ms(runs, rounds=7, inner=20):
    for r in runs:
        r()
    times = [[] for _ in runs]
    for _ in range(rounds):
        for t, r in zip(times, runs):
            for _ in range(inner):
                t0 = time.perf_counter()
                r()
                t.append(time.perf_counter() - t0)
    return [float(np.median(t)) * 1e3 for t in times]


def main():
    opt = tdc.Optimizer("momentum", lr=0.01)
    train = mlp.trace(batch=BATCH, training=True)
    dense_step = tdc.train_step(train, loss="softmax_cross_entropy", optimizer=opt)
    masked_step = tdc.train_step(train, loss="softmax_cross_entropy", optimizer=opt, prune=True)
    print(f"MLP 784-300-100-10, batch {BATCH}, momentum; median ms per training step")
    print("backend  sparsity    dense  masked     CSR  masked/CSR")
    for backend in ("numba", "llvm"):
        for s in SPARSITIES:
            p = pruned_params(s)
            masks = {k + ".mask": (p[k] != 0).astype(np.float32) for k in WEIGHTS}
            sg, sp, _ = sparse_training(train, p)
            csr_step = tdc.train_step(sg, loss="softmax_cross_entropy", optimizer=opt)
            dense, masked, csr = median_ms([step_runner(dense_step, backend, p),
                                            step_runner(masked_step, backend, {**p, **masks}),
                                            step_runner(csr_step, backend, sp)])
            print(f"{backend:<7}  {s:>8.2f}  {dense:>7.3f}  {masked:>6.3f}  {csr:>6.3f}  {masked / csr:>9.2f}x")


if __name__ == "__main__":
    main()
