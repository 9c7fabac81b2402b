"""onnx's light model zoo on tdc's LLVM backend against onnxruntime, batch 1.

The zoo files carry ConstantOfShape fills for weights (every class would score the same), so each
model gets the seeded random He-scale weights of tests/onnx_zoo.py. For every model: tdc's import
and LLVM compile time, the median run time of tdc and onnxruntime (each with its default threads),
and tdc's largest error relative to the largest value of an output.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/onnx_zoo.py [--reps 5] [MODEL ...]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from onnx_zoo import MODELS, input_name, light_model  # noqa: E402

import onnxruntime as ort  # noqa: E402

import tdc.onnx  # noqa: E402


def median_time(f, reps: int) -> float:
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=MODELS, help=f"default: all of {', '.join(MODELS)}")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per model (median; default 5)")
    args = ap.parse_args(argv)
    print(f"{'model':<14}{'import+compile s':>17}{'tdc ms':>9}{'ort ms':>9}{'ort/tdc':>9}  max rel. error")
    for name in args.models:
        proto = light_model(name)
        x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
        feed = {input_name(proto): x}
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        want = dict(zip(names, sess.run(None, feed)))
        t = time.perf_counter()
        exe = tdc.onnx.load(proto).compile("llvm")
        build = time.perf_counter() - t
        got = exe(**feed)
        err = max(float(np.abs(got[k] - y).max() / np.abs(y).max()) for k, y in want.items())
        t_tdc = median_time(lambda: exe(**feed), args.reps)
        t_ort = median_time(lambda: sess.run(None, feed), args.reps)
        print(f"{name:<14}{build:>17.2f}{t_tdc * 1e3:>9.1f}{t_ort * 1e3:>9.1f}{t_ort / t_tdc:>9.2f}  {err:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
