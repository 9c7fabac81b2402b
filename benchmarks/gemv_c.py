"""Matrix-vector products (batch-1 linear layers and their input gradients) in C: OpenBLAS's
sgemm and sgemv, the LLVM runtime's tdc_linear_f32 / tdc_matmul_f32, and two vectorised C loops
(benchmarks/gemv_c.c, built with the runtime's flags). Median microseconds, one BLAS thread.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/gemv_c.py
    env -u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=Haswell .venv/bin/python benchmarks/gemv_c.py   # AVX2 kernels
"""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tdc.backends.llvm.runtime import CFLAGS, build_runtime  # noqa: E402


def main():
    b = build_runtime()
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemv_c.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "gemv_c")
        subprocess.run(["gcc", *CFLAGS, f"-I{b.include_dir}", f"-I{b.openblas_include_dir}", src, "-o", exe,
                        *b.link_args()], check=True)
        subprocess.run([exe], check=True)


if __name__ == "__main__":
    main()
