"""Partitioning a training step over K ranks: the partitioner's choice, measured steps, pipelines,
and a projection to clusters.

1. The cost model's stages against a naive split of equal layer counts (model and pipeline
   parallelism), for LeNet-5, the MLP and the VGG-style net at K = 2 and 4: bytes each step sends
   (activations forward and their gradients back, from the cut), the balance (max / mean stage
   compute) and the cost the partitioner minimises (the slowest stage's compute + communication).
2. Measured: the LLVM backend's step of each strategy (data, model, pipeline, tensor, spatial) on
   K = 1, 2, 4 ranks under mpiexec, one thread each (4 ranks oversubscribe a 2-core machine: those
   times are not scaling), the global batch the same for every K (strong scaling): the median
   time per step, the bytes all ranks sent per step (counted where the messages leave).
3. Pipelines: the bubble measured on 2 real ranks (benchmarks/pipeline_bubble.py: each rank's
   wait for messages over the step's wall time) beside (K-1)/(M+K-1) and the timeline model's,
   for M = 1, 4, 8 and both schedules; and each stage's peak of activations held (bytes) for
   GPipe and 1F1B.
4. Projected to 8-64 devices: every rank's program run on the timeline model (lower/ranks.simulate:
   each node its roofline time at this machine's calibrated rates, messages alpha + n beta on
   10 Gb Ethernet), beside data parallelism (compute / K plus the allreduce of the gradients,
   MPICH's algorithm). A strategy with fewer layers (or rows, or columns) than devices is "-".

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/partition.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

MODELS = {"lenet": 64, "mlp": 128, "vgg": 32}          # model -> global batch
STRATEGIES = ("data", "model", "pipeline", "tensor", "spatial")


def _model(name):
    import importlib
    return getattr(importlib.import_module(name), name)


def _parallel(strategy: str, k: int):
    from tdc.passes.data_parallel import DataParallel
    from tdc.passes.partition import Partition
    if k == 1:
        return None
    if strategy == "data":
        return DataParallel(k)
    return Partition(strategy, k, microbatches=2 * k if strategy == "pipeline" else 1)


def worker(name: str, strategy: str, batch: int, steps: int) -> None:
    """One rank of a measurement (under mpiexec): rank 0 prints a JSON line."""
    import tdc
    from tdc.backends.comm import communicator
    comm = communicator(120)
    k = comm.size
    model = _model(name)
    parallel = _parallel(strategy, k)
    step = tdc.train_step(model, optimizer=tdc.Optimizer("momentum", lr=0.01), batch=batch, parallel=parallel)
    exe = tdc.compile(step, backend="llvm", seed=0)
    local = batch // k if strategy == "data" and k > 1 else batch
    shape = model.input_types(local)["x"].shape
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 10, local)
    for _ in range(3):
        exe(x=x, y=y, lr=np.float32(0.01))
    sent0, _ = exe.comm_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        exe(x=x, y=y, lr=np.float32(0.01))
        times.append(time.perf_counter() - t0)
    sent = (exe.comm_stats()[0] - sent0) / steps
    total = comm.comm.allreduce(sent) if k > 1 else 0
    med = float(np.median(times)) if k == 1 else comm.comm.allreduce(float(np.median(times)), op=comm.MPI.MAX)
    if comm.rank == 0:
        print(json.dumps({"ms": med * 1e3, "bytes": total}))


def measure(name: str, strategy: str, k: int, steps: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, strategy, str(MODELS[name]), str(steps)]
    if k > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(k), *cmd]
    env = {**os.environ, "TDC_THREADS": "1", "TDC_BLAS_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if p.returncode != 0:
        last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1:] or ["failed"]
        return {"error": last[0].split("Error: ")[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def partitioner_table(target) -> list[str]:
    from tdc.passes.partition import Partition, plan_stages
    from tdc.passes.training import add_loss
    lines = ["", "1. stages: the cost model's against equal layer counts (per step; costs at this machine's rates)",
             f"{'model':<6} {'K':>2} | {'chosen: cost ms':>15} {'balance':>7} {'bytes':>8} | "
             f"{'equal: cost ms':>14} {'balance':>7} {'bytes':>8} | {'equal / chosen':>14}"]
    for name, batch in MODELS.items():
        graph = add_loss(_model(name).trace(batch, training=True))
        for k in (2, 4):
            chosen, naive = plan_stages(graph, Partition("model", k, target=target))
            eq = (f"{naive.cost * 1e3:>14.3f} {naive.balance:>7.2f} {naive.bytes_per_step:>8} | "
                  f"{naive.cost / chosen.cost:>14.2f}") if naive else f"{'(3 layers)':>14} {'':>7} {'':>8} | {'':>14}"
            lines.append(f"{name:<6} {k:>2} | {chosen.cost * 1e3:>15.3f} {chosen.balance:>7.2f} "
                         f"{chosen.bytes_per_step:>8} | {eq}")
    return lines


def measured_table(steps: int, quick: bool) -> list[str]:
    lines = ["", "2. measured, LLVM backend, one thread per rank, the same global batch on every K "
             "(4 ranks share 2 cores)",
             f"{'model':<6} {'strategy':<9} | {'K=1 ms':>8} | {'K=2 ms':>8} {'bytes/step':>11} | "
             f"{'K=4 ms':>8} {'bytes/step':>11}"]
    for name in MODELS:
        one = measure(name, "data", 1, steps)
        for strategy in STRATEGIES:
            row, errors = f"{name:<6} {strategy:<9} | {one['ms']:>8.2f} |", set()
            for k in (2,) if quick else (2, 4):
                r = measure(name, strategy, k, steps)
                row += f" {r['ms']:>8.2f} {r['bytes']:>11.0f} |" if "ms" in r else f" {'-':>8} {'-':>11} |"
                errors |= {r["error"][:70]} if "error" in r else set()
            lines.append(row + "".join(f" ({e})" for e in sorted(errors)))
    return lines


def pipeline_tables(target) -> list[str]:
    import tdc
    from tdc.lower.ranks import activation_peak, simulate
    from tdc.passes.data_parallel import NETWORKS
    from tdc.passes.partition import Partition
    sys.path.insert(0, str(ROOT / "benchmarks"))
    specs = [f"{s}:{m}" for s in ("gpipe", "1f1b") for m in (1, 4, 8)]
    p = subprocess.run([str(Path(sys.executable).parent / "mpiexec"), "-n", "2", sys.executable,
                        str(ROOT / "benchmarks" / "pipeline_bubble.py"), *specs], capture_output=True, text=True,
                       env={**os.environ, "TDC_THREADS": "1"}, timeout=1200)
    measured = {(r["schedule"], r["m"]): r for r in json.loads(p.stdout.strip().splitlines()[-1])} \
        if p.returncode == 0 else {}
    import pipeline_bubble as pb
    rates = (target.rates().gemm_flops, target.rates().copy_bytes)
    lines = ["", f"3. pipeline bubble, 2 stages of {pb.LAYERS // 2} equal layers ({pb.WIDTH} wide, batch {pb.BATCH}), "
             "LLVM, one thread per rank",
             f"{'schedule':<8} {'M':>2} | {'measured':>8} {'model':>6} {'theory':>6} | {'ms/step':>8}"]
    for (schedule, m), r in sorted(measured.items()):
        step = tdc.train_step(pb.chain, optimizer=tdc.Optimizer("sgd", lr=1e-3), batch=pb.BATCH,
                              parallel=Partition("pipeline", 2, microbatches=m, schedule=schedule))
        sim = simulate(step, rates, NETWORKS["shm"])
        lines.append(f"{schedule:<8} {m:>2} | {r['bubble']:>8.3f} {sim.bubble:>6.3f} {r['theory']:>6.3f} | "
                     f"{r['ms_per_step']:>8.1f}")
    if not measured:
        lines.append(f"  (the measurement failed: {p.stderr.strip()[-300:]})")
    lines += ["", "   peak activations held per stage (KB), LeNet-5, micro-batches of 8",
              f"{'K':>2} {'M':>2} | {'GPipe':>30} | {'1F1B':>30}"]
    for k, m in ((2, 4), (2, 8), (4, 4), (4, 8)):
        row = f"{k:>2} {m:>2} |"
        for schedule in ("gpipe", "1f1b"):
            step = tdc.train_step(_model("lenet"), optimizer=tdc.Optimizer("sgd"), batch=8 * m,
                                  parallel=Partition("pipeline", k, microbatches=m, schedule=schedule))
            row += f" {' '.join(f'{activation_peak(step, r) / 1024:.0f}' for r in range(k)):>30} |"
        lines.append(row)
    return lines


def projection_table(target) -> list[str]:
    import tdc
    from tdc.errors import TdcError
    from tdc.lower.ranks import simulate
    from tdc.passes.data_parallel import NETWORKS, DataParallel, allreduce_time
    from tdc.passes.partition import Partition, op_seconds
    net = NETWORKS["10gbe"]
    rates = (target.rates().gemm_flops, target.rates().copy_bytes)
    lines = ["", f"4. projected ms per step on {net.name} (alpha {net.alpha * 1e6:g} us, {1 / net.beta / 1e9:g} GB/s), "
             "the same global batch, compute at this machine's rates",
             f"{'model':<6} {'strategy':<9} | " + " ".join(f"{'K=' + str(k):>8}" for k in (1, 8, 16, 32, 64))]
    for name, batch in MODELS.items():
        model = _model(name)
        single = tdc.train_step(model, optimizer=tdc.Optimizer("momentum"), batch=batch)
        one = sum(op_seconds(n, rates) for n in single.nodes)
        for strategy in STRATEGIES:
            row = f"{name:<6} {strategy:<9} | {one * 1e3:>8.2f}"
            for k in (8, 16, 32, 64):
                try:
                    if strategy == "data":
                        if batch % k:
                            raise TdcError("batch")
                        step = tdc.train_step(model, optimizer=tdc.Optimizer("momentum"), batch=batch,
                                              parallel=DataParallel(k, overlap=False))
                        comm = sum(allreduce_time("mpi", n.inputs[0].type.nbytes, k, net) for n in step.nodes
                                   if n.op == "allreduce")
                        t = sum(op_seconds(n, rates) for n in step.nodes) + comm
                    else:
                        step = tdc.train_step(model, optimizer=tdc.Optimizer("momentum"), batch=batch,
                                              parallel=Partition(strategy, k, microbatches=2 * k if
                                                                 strategy == "pipeline" else 1, network="10gbe"))
                        t = simulate(step, rates, net).end
                    row += f" {t * 1e3:>8.2f}"
                except TdcError:
                    row += f" {'-':>8}"
            lines.append(row)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="K = 2 only in the measured table")
    ap.add_argument("--tables", default="1,2,3,4", help="which tables to print (default 1,2,3,4)")
    args = ap.parse_args()
    if args.worker:
        name, strategy, batch, steps = args.worker
        worker(name, strategy, int(batch), int(steps))
        return
    from tdc.backends import get_target
    from tdc.passes.target import machine_id
    target = get_target("llvm")
    r = target.rates()
    print(f"machine: {machine_id()}; LLVM rates: GEMM {r.gemm_flops / 1e9:.1f} GFLOP/s, copy "
          f"{r.copy_bytes / 1e9:.1f} GB/s (one thread)")
    tables = {"1": partitioner_table, "3": pipeline_tables, "4": projection_table,
              "2": lambda _: measured_table(args.steps, args.quick)}
    if not set(args.tables.split(",")) <= set(tables):
        ap.error(f"--tables: a comma-separated list of 1, 2, 3 and 4, not {args.tables!r}")
    for key in sorted(args.tables.split(","), key=lambda k: "1342".index(k)):
        print("\n".join(tables[key](target)), flush=True)


if __name__ == "__main__":
    main()
