"""The LLVM backend as the passes see it (passes/target.py)."""
from __future__ import annotations

import ctypes
import os

import numpy as np

from ...ir.graph import Node
from ...passes.target import Target, available_cores, best_time, linear_probe_arrays
from .codegen import LIBRARY_DTYPES, library_call
from .scalar import MEM


def runtime_library():
    """The C runtime, with one BLAS thread as executables run it (two spin against each other on
    2 vCPUs: a conv timed with more is an order of magnitude off)."""
    from .runtime import build_runtime
    lib = ctypes.CDLL(str(build_runtime().shared_lib_path))
    lib.tdc_runtime_set_threads(ctypes.c_int64(1))
    return lib


class LLVMTarget(Target):
    name = "llvm"
    loop_dtypes = tuple(MEM)
    library_dtypes = LIBRARY_DTYPES
    caches_filter_transforms = False       # the C Winograd transforms the filter on every call
    conv_gemm_threads_all = False          # its GEMMs run on one BLAS thread
    wino_f4_transform_cost = 3.0
    sparse_conv_wide = True                # sparse.c runs stride-1 sparse convolutions without im2col
    direct_padded_grid = True              # conv_direct.c's shifted GEMMs
    direct_grad_weight_cost = 2.0          # its dot-product tiles load two operands per FMA (the forward's
                                           # tiles one per 8 to 16): about half the rate, on LeNet's layers

    def threads(self) -> int:
        env = os.environ.get("TDC_THREADS")
        return max(1, int(env)) if env and env.isdigit() else available_cores()

    def time_conv(self, node, algo: str) -> float:
        return time_conv(node, algo)

    def time_sparse_conv(self, node, ins) -> float:
        return best_time(library_runner(node, ins))

    def time_matmul(self, m: int, k: int, n: int) -> float:
        lib = runtime_library()
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        out = np.empty((m, n), np.float32)
        ptr = [ctypes.c_void_p(x.ctypes.data) for x in (a, b, out)]
        dims = [ctypes.c_int64(d) for d in (m, k, n)]
        return best_time(lambda: lib.tdc_matmul_f32(*ptr, *dims))

    def time_linear(self, m: int, k: int, n: int) -> float:
        x, w, b, out = linear_probe_arrays(m, k, n, 1.0)
        args = [ctypes.c_void_p(a.ctypes.data) for a in (x, w, b)] + [ctypes.c_int64(1), ctypes.c_void_p(out.ctypes.data)]
        return _time_in_c(runtime_library().tdc_time_linear_f32, args + [ctypes.c_int64(d) for d in (m, k, n)])

    def time_sparse_linear(self, m: int, k: int, n: int, density: float) -> float:
        from ...ops.sparse import to_csr
        x, w, b, out = linear_probe_arrays(m, k, n, density)
        keep = [x, *to_csr(w), b, out]
        ptrs = [ctypes.c_void_p(a.ctypes.data) for a in keep]
        args = ptrs[:5] + [ctypes.c_int64(1), ptrs[5]] + [ctypes.c_int64(d) for d in (m, k, n)]
        return _time_in_c(runtime_library().tdc_time_sparse_linear_f32, args)   # keep holds the arrays


def _time_in_c(timer, args, reps: int = 7, span: float = 1e-3) -> float:
    """The fastest of `reps` runs of a timing.c loop of about `span` seconds (after a warm-up):
    seconds per kernel call, no foreign call in between."""
    timer.restype = ctypes.c_double
    once = timer(*args, ctypes.c_int64(3))
    loop = ctypes.c_int64(int(np.clip(span / max(once, 1e-9), 4, 100000)))
    return min(timer(*args, loop) for _ in range(reps))


def time_conv(node: Node, algo: str, reps: int = 3) -> float:
    """Seconds one call of the C runtime takes for conv op `node` by `algo` on random data (best of
    `reps`, after a warm-up call): what --autotune measures for this backend."""
    trial = Node(node.op, node.inputs, {**node.attrs, "algo": algo}, node.placement, node.loc)
    trial.outputs = node.outputs
    rng = np.random.default_rng(0)
    return best_time(library_runner(trial, [rng.standard_normal(v.type.shape).astype(v.type.np_dtype)
                                            for v in node.inputs]), reps)


def library_runner(node: Node, ins: list[np.ndarray]):
    """A call of the C runtime's kernel for library op `node` on the arrays `ins` (into fresh
    outputs), with its foreign-call arguments built once."""
    lib = runtime_library()
    cname, spec, _ = library_call(node)
    outs = [np.empty(v.type.shape, v.type.np_dtype) for v in node.outputs]
    keep, args = [ins, outs], []
    for kind, x in spec:
        if kind in ("in", "out"):
            args.append(ctypes.c_void_p((ins if kind == "in" else outs)[x].ctypes.data))
        elif kind == "i64":
            args.append(ctypes.c_int64(int(x)))
        elif kind == "f64":
            args.append(ctypes.c_double(float(x)))
        else:
            keep.append(np.ascontiguousarray(x))
            args.append(ctypes.c_void_p(keep[-1].ctypes.data))
    fn = getattr(lib, cname)
    return lambda: (fn(*args), keep)


TARGET = LLVMTarget()
