"""Time the LLVM runtime's conv algorithms in C (tdc_<op>_<algo>_f32) at batch 1, 3x3 kernels, pad 1:
median milliseconds and GFLOP/s (2*N*Cout*OH*OW*Cin*9 / time) per op, shape and algorithm.
Run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/conv_c.py [algo ...]"""
import ctypes
import statistics
import sys
import time

import numpy as np

from tdc.backends.llvm.runtime import build_runtime

SHAPES = [(64, 64, 56, 56), (128, 128, 28, 28), (256, 256, 14, 14), (512, 512, 7, 7)]
ALGOS = ["im2col", "direct", "winograd_f2", "winograd_f4", "fft"]
OPS = ["conv2d", "conv2d_grad_input", "conv2d_grad_weight"]


def main():
    algos = sys.argv[1:] or ALGOS
    lib = ctypes.CDLL(str(build_runtime().shared_lib_path))
    P, I = ctypes.c_void_p, ctypes.c_int64
    rng = np.random.default_rng(0)
    print(f"{'op':20s} {'Cin,Cout,H,W':18s} " + " ".join(f"{a:>18s}" for a in algos))
    for op in OPS:
        for (c, co, h, w) in SHAPES:
            x = rng.standard_normal((1, c, h, w)).astype(np.float32)
            wt = rng.standard_normal((co, c, 3, 3)).astype(np.float32)
            b = rng.standard_normal(co).astype(np.float32)
            gy = rng.standard_normal((1, co, h, w)).astype(np.float32)
            out = np.empty((1, co, h, w), np.float32)
            dx = np.empty_like(x)
            dw = np.empty_like(wt)
            dims = (1, c, h, w, co, 3, 3, h, w, 1, 1, 1, 1, 1, 1, 1)
            flop = 2 * c * co * h * w * 9
            cells = []
            for a in algos:
                fn = getattr(lib, f"tdc_{op}_{a}_f32")
                if op == "conv2d":
                    fn.argtypes = [P, P, P, I, P] + [I] * 16
                    args = (x.ctypes.data, wt.ctypes.data, b.ctypes.data, 1, out.ctypes.data) + dims
                elif op == "conv2d_grad_input":
                    fn.argtypes = [P, P, P] + [I] * 16
                    args = (gy.ctypes.data, wt.ctypes.data, dx.ctypes.data) + dims
                else:
                    fn.argtypes = [P, P, P] + [I] * 16
                    args = (x.ctypes.data, gy.ctypes.data, dw.ctypes.data) + dims
                fn(*args)
                ts = []
                t_end = time.perf_counter() + 1.0
                while len(ts) < 5 or (time.perf_counter() < t_end and len(ts) < 50):
                    t0 = time.perf_counter()
                    fn(*args)
                    ts.append(time.perf_counter() - t0)
                t = statistics.median(ts)
                cells.append(f"{t * 1e3:7.2f}ms {flop / t / 1e9:6.1f}GF")
            print(f"{op:20s} {f'{c},{co},{h},{w}':18s} " + " ".join(f"{s:>18s}" for s in cells))


if __name__ == "__main__":
    main()
