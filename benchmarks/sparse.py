"""Pruned MLP layers (784-300-100-10) as CSR products: the LLVM runtime's sparse kernel
(tdc_sparse_linear_f32, runtime/sparse.c) against its dense linear (OpenBLAS) and numpy, at batch
1 and 64, one thread, median microseconds; dense and sparse are timed in the same run
(benchmarks/sparse_c.c, alternating rounds). Then the measured break-even density per layer and
batch (from a sweep of sparsities, interpolated), next to the sparsify pass's cost-model estimate.

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
from tdc.passes.sparsify import sparse_rates  # noqa: E402

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


if __name__ == "__main__":
    main()
