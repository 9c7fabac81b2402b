"""Pruned MLP layers (784-300-100-10) as CSR products: the LLVM runtime's sparse kernel
(tdc_sparse_linear_f32, runtime/sparse.c) against its dense linear (OpenBLAS) and numpy, at batch
1 and 64, one thread, median microseconds; dense and sparse are timed in the same run
(benchmarks/sparse_c.c, alternating rounds). Then the measured break-even density per layer and
batch (from a sweep of sparsities, interpolated), next to the sparsify pass's cost-model estimate.

Then pruned convolutions (LeNet-5's two, and a 64-channel 3x3 layer): the runtime's sparse_conv2d
against the fastest of its dense algorithms on the same input (each timed, the best reported),
median microseconds over alternating rounds through ctypes (about 1.3 us of call included in both),
the images split over the runtime's threads as in an executable; and the sparsify pass's modelled
break-even density next to the measured one.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/sparse.py
"""
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")    # numpy's BLAS on one thread, as the runtime's
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from tdc.backends import get_target  # noqa: E402
from tdc.backends.llvm.runtime import CFLAGS, build_runtime  # noqa: E402
from tdc.backends.llvm.target import library_runner  # noqa: E402
from tdc.ir.graph import Graph, Node  # noqa: E402
from tdc.ir.types import TensorType  # noqa: E402
from tdc.ops.conv import legal_algos  # noqa: E402
from tdc.ops.sparse import to_csr  # noqa: E402
from tdc.passes.sparsify import _priced, sparse_rates  # noqa: E402

TABLE = (0.5, 0.8, 0.9, 0.95)
SWEEP = tuple(round(s, 3) for s in np.arange(0.0, 1.0, 0.025))


def numpy_us(n, k, m, reps=201):
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (n, k), (n,)))
    out = np.empty((m, n), np.float32)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        np.matmul(x, w.T, out=out)
        out += b
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def run_c(sparsities):
    b = build_runtime()
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_c.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "sparse_c")
        subprocess.run(["gcc", *CFLAGS, f"-I{b.include_dir}", f"-I{b.openblas_include_dir}", src, "-o", exe,
                        *b.link_args()], check=True)
        out = subprocess.run([exe, *map(str, sparsities)], check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.strip().splitlines():
        n, k, m, s, nnz, td, ts = line.split()
        rows[(int(n), int(k), int(m), float(s))] = (int(nnz), float(td), float(ts))
    return rows


def break_even(rows, n, k, m):
    """The density at which sparse and dense take equal time (linear between sweep points)."""
    pts = sorted((1 - s, td / ts) for (nn, kk, mm, s), (_, td, ts) in rows.items() if (nn, kk, mm) == (n, k, m))
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 >= 1 > r1:
            return d0 + (d1 - d0) * (r0 - 1) / (r0 - r1)
    return 0.0 if pts[0][1] < 1 else 1.0


def main():
    rows = run_c(sorted(set(TABLE) | set(SWEEP)))
    rates = sparse_rates(get_target("llvm"))
    print("layer      batch  sparsity    nnz   dense BLAS us  numpy us  CSR us  dense/CSR")
    for n, k in ((300, 784), (100, 300), (10, 100)):
        for m in (1, 64):
            np_us = numpy_us(n, k, m)
            for s in TABLE:
                nnz, td, ts = rows[(n, k, m, s)]
                print(f"{k:>4}x{n:<4}  {m:>5}  {s:>8.2f}  {nnz:>6}  {td:>13.2f}  {np_us:>8.2f}  {ts:>6.2f}  {td / ts:>8.2f}x")
    print("\nbreak-even density (sparse faster below it): measured, and the sparsify cost model's")
    for n, k in ((300, 784), (100, 300), (10, 100)):
        for m in (1, 64):
            print(f"{k:>4}x{n:<4} batch {m:>2}: measured {break_even(rows, n, k, m):.3f}, "
                  f"model {rates.break_even(m, k, n):.3f}")


# (x shape, CO, kernel, pad) of the conv layers
CONV_LAYERS = (((1, 28, 28), 6, 5, 2), ((6, 14, 14), 16, 5, 0), ((64, 28, 28), 64, 3, 1))


def conv_node(x_shape, co, k, pad, nnz=None):
    """A conv2d node, or with `nnz` the sparse_conv2d of the same layer."""
    g = Graph("layer")
    x = g.add_arg("x", TensorType("f32", x_shape), "input")
    attrs = {"pad": (pad,) * 4}
    if nnz is None:
        args = [x, g.add_arg("w", TensorType("f32", (co, x_shape[1], k, k)), "param")]
        g.emit("conv2d", args, attrs)
    else:
        csr = [("v", "f32", nnz), ("c", "i32", nnz), ("r", "i32", co + 1)]
        args = [x] + [g.add_arg(n, TensorType(t, (size,)), "const") for n, t, size in csr]
        g.emit("sparse_conv2d", args, {**attrs, "kernel": (k, k)})
    return g.nodes[0]


def median_us(calls, rounds=15, inner=5):
    """Median microseconds per call of each of `calls`, timed in alternating rounds."""
    for c in calls:
        c()
    times = [[] for _ in calls]
    for _ in range(rounds):
        for t, c in zip(times, calls):
            for _ in range(inner):
                t0 = time.perf_counter()
                c()
                t.append(time.perf_counter() - t0)
    return [float(np.median(t)) * 1e6 for t in times]


def conv_table():
    rng = np.random.default_rng(0)
    target = get_target("llvm")
    print("\nconv layer               batch  sparsity   nnz  dense us (algo)      CSR us  dense/CSR")
    evens = []
    for (c, h, w), co, k, pad in CONV_LAYERS:
        for n in (1, 64):
            dense = conv_node((n, c, h, w), co, k, pad)
            x = rng.standard_normal((n, c, h, w)).astype(np.float32)
            wt = rng.standard_normal((co, c, k, k)).astype(np.float32)
            algos = legal_algos("conv2d", (k, k), (1, 1), (1, 1))
            runs = [library_runner(_with_algo(dense, a), [x, wt]) for a in algos]
            sweep = {}
            for s in sorted(set(TABLE) | set(np.round(np.arange(0.0, 1.0, 0.05), 2))):
                wm = wt.reshape(co, -1).copy()
                wm[np.abs(wm) < np.quantile(np.abs(wm), s)] = 0
                csr = to_csr(wm)
                sparse = library_runner(conv_node((n, c, h, w), co, k, pad, len(csr[0])), [x, *csr])
                *td, ts = median_us(runs + [sparse], rounds=5 if s not in TABLE else 15)
                best = int(np.argmin(td))
                sweep[s] = (len(csr[0]), td[best], algos[best], ts)
            for s in TABLE:
                nnz, td, algo, ts = sweep[s]
                print(f"{c:>3}->{co:<3} {k}x{k} {h}x{w:<3} pad {pad}  {n:>5}  {s:>8.2f}  {nnz:>5}  {td:>9.1f} "
                      f"({algo:<11})  {ts:>7.1f}  {td / ts:>8.2f}x")
            pts = sorted((1 - s, td / ts) for s, (_, td, _, ts) in sweep.items())
            measured = next((d0 + (d1 - d0) * (r0 - 1) / (r0 - r1) for (d0, r0), (d1, r1) in zip(pts, pts[1:])
                             if r0 >= 1 > r1), 0.0 if pts[0][1] < 1 else 1.0)
            model = _priced(dense, target, 0)[3]
            evens.append(f"{c:>3}->{co:<3} {k}x{k} {h}x{w} batch {n:>2}: measured {measured:.3f}, model {model:.3f}")
    print("\nconv break-even density: measured, and the sparsify cost model's")
    print("\n".join(evens))


def _with_algo(node, algo):
    trial = Node(node.op, node.inputs, {**node.attrs, "algo": algo}, node.placement, node.loc)
    trial.outputs = node.outputs
    return trial


if __name__ == "__main__":
    if "--conv-only" not in sys.argv:
        main()
    conv_table()
