"""The numba backend as the passes see it (passes/target.py)."""
from __future__ import annotations

import numpy as np

from ...passes.target import Target, best_time, kernel_time, linear_probe_arrays
from .codegen import SUPPORTED_DTYPES


class NumbaTarget(Target):
    name = "numba"
    loop_dtypes = SUPPORTED_DTYPES
    library_dtypes = SUPPORTED_DTYPES
    caches_filter_transforms = True        # inference keeps the Winograd filter transforms of params
    conv_gemm_threads_all = True           # each Numba thread runs its own BLAS GEMMs
    wino_f4_transform_cost = 1.6

    def threads(self) -> int:
        import numba
        return numba.get_num_threads()

    def time_conv(self, node, algo: str) -> float:
        from .conv_algos import time_conv
        return time_conv(node, algo)

    def time_sparse_conv(self, node, ins) -> float:
        from . import prepare_runtime
        from .codegen import LIBRARY
        prepare_runtime()
        outs = [np.empty(v.type.shape, v.type.np_dtype) for v in node.outputs]
        fn, args = LIBRARY[node.op](node, ins, outs)
        return best_time(lambda: fn(*args))

    def time_matmul(self, m: int, k: int, n: int) -> float:
        from . import kernels as K
        from . import prepare_runtime
        prepare_runtime()      # BLAS on one thread, as the kernels run it
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        out = np.empty((m, n), np.float32)
        return best_time(lambda: K.matmul2d(a, b, out))

    def time_linear(self, m: int, k: int, n: int) -> float:
        from . import kernels as K
        from . import prepare_runtime
        prepare_runtime()
        x, w, b, out = linear_probe_arrays(m, k, n, 1.0)
        x0, out0 = x[:0], out[:0]
        return kernel_time(lambda: K.linear(x, w, b, True, out), lambda: K.linear(x0, w, b, True, out0))

    def time_sparse_linear(self, m: int, k: int, n: int, density: float) -> float:
        from ...ops.sparse import to_csr
        from . import kernels as K
        x, w, b, out = linear_probe_arrays(m, k, n, density)
        v, c, r = to_csr(w)
        x0, out0 = x[:0], out[:0]
        return kernel_time(lambda: K.sparse_linear(x, v, c, r, b, True, out),
                           lambda: K.sparse_linear(x0, v, c, r, b, True, out0))


TARGET = NumbaTarget()
