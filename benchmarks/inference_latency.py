"""Inference latency: LeNet-5 at batch 1 and 64, the MLP at batch 1 and its first two layers alone
(linear 784->300 and 300->100 at batch 1: matrix-vector products), on

  native      the executable from `tdc compile` (its own --repeat timer: in-process, no process start)
  llvm-jit    tdc.compile(graph, backend="llvm"), called from Python
  numba       tdc.compile(graph, backend="numba"), called from Python
  onnxruntime the same model exported with tdc.onnx.save, run by onnxruntime      (if installed)
  torch       the same model in PyTorch functional ops under torch.inference_mode  (if installed)

Every implementation's output is checked against the reference interpreter before timing. Times
are medians over many calls; ratios are against onnxruntime (>1: slower than onnxruntime).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/inference_latency.py \
        [--only mlp,fc784] [--impl native,llvm-jit]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import tdc  # noqa: E402
import tdc.onnx  # noqa: E402
from tdc.frontend.init import init_params  # noqa: E402

IMPLS = ["native", "llvm-jit", "numba", "onnxruntime", "torch"]


# The MLP's first two layers alone (bias, no activation), named so that torch_forward reads them.
@tdc.model
def fc784(x: tdc.f32["B", 784]):
    return tdc.nn.linear(x, 300, name="fc1")


@tdc.model
def fc300(x: tdc.f32["B", 300]):
    return tdc.nn.linear(x, 100, name="fc1")


MODELS = {"lenet": lambda: __import__("lenet").lenet, "mlp": lambda: __import__("mlp").mlp,
          "fc784": lambda: fc784, "fc300": lambda: fc300}
WORKLOADS = [("lenet", 1), ("lenet", 64), ("mlp", 1), ("fc784", 1), ("fc300", 1)]
LABELS = {"fc784": "fc 784-300", "fc300": "fc 300-100"}


def median_ms(fn, reps: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def torch_forward(torch, model, params):
    F = torch.nn.functional
    p = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}

    def lin(h, name, relu=True):
        h = F.linear(h, p[f"{name}.weight"], p[f"{name}.bias"])
        return F.relu(h) if relu else h

    def forward(x):
        if model == "mlp":
            return lin(lin(lin(x, "fc1"), "fc2"), "fc3", relu=False)
        if model.startswith("fc"):
            return lin(x, "fc1", relu=False)
        h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=2)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"])), 2)
        return lin(lin(lin(torch.flatten(h, 1), "fc1"), "fc2"), "fc3", relu=False)
    return forward


def run(model: str, batch: int, reps: int, threads: int, tmp: str, impls) -> dict[str, float]:
    from tdc.backends.llvm.bundle import write_bundle
    g = MODELS[model]().trace(batch=batch)
    params = init_params(g, 0)
    x = np.random.default_rng(0).standard_normal(g.inputs[0].type.shape).astype(np.float32)
    want = tdc.compile(g, params=params)(x=x)["out"]
    results: dict[str, float] = {}

    def check(name, got):
        if not np.allclose(got, want, rtol=1e-3, atol=1e-4):
            raise SystemExit(f"{name} disagrees with the reference on {model} b{batch}")

    if "native" in impls:
        out_dir = os.path.join(tmp, f"{model}_b{batch}")
        bundle = write_bundle(g, out_dir, params=params)
        np.save(os.path.join(tmp, "x.npy"), x)
        r = subprocess.run([bundle.executable, "--input", f"x={tmp}/x.npy", "--output", f"{tmp}/y.npy",
                            "--repeat", str(reps)], capture_output=True, text=True, check=True,
                           env=os.environ)
        check("native", np.load(f"{tmp}/y.npy"))
        results["native"] = float(re.search(r"median ([0-9.]+) ms", r.stdout).group(1))

    for backend, name in (("llvm", "llvm-jit"), ("numba", "numba")):
        if name in impls:
            exe = tdc.compile(g, backend=backend, params=params)
            check(backend, exe(x=x)["out"])
            results[name] = median_ms(lambda: exe(x=x), reps)

    try:
        if "onnxruntime" not in impls:
            raise ImportError
        import onnxruntime as ort
        path = os.path.join(tmp, f"{model}.onnx")
        tdc.onnx.save(g, path, params=params)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        check("onnxruntime", sess.run(None, {name: x})[0])
        results["onnxruntime"] = median_ms(lambda: sess.run(None, {name: x}), reps)
    except ImportError:
        pass
    try:
        if "torch" not in impls:
            raise ImportError
        import torch
        torch.set_num_threads(threads)
        fwd = torch_forward(torch, model, params)
        tx = torch.from_numpy(x)
        with torch.inference_mode():
            check("torch", fwd(tx).numpy())
            results["torch"] = median_ms(lambda: fwd(tx), reps)
    except ImportError:
        pass
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=300, help="timed calls per implementation (default 300)")
    ap.add_argument("--threads", type=int, default=2, help="threads for BLAS, onnxruntime and torch (default 2)")
    ap.add_argument("--only", default="", help="comma-separated models to run (lenet, mlp, fc784, fc300; default all)")
    ap.add_argument("--impl", default=",".join(IMPLS), help=f"comma-separated implementations (default {','.join(IMPLS)})")
    args = ap.parse_args()
    only, impls = [m for m in args.only.split(",") if m], args.impl.split(",")
    if not set(only) <= set(MODELS) or not set(impls) <= set(IMPLS):
        ap.error(f"--only takes {', '.join(MODELS)}; --impl takes {', '.join(IMPLS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, batch in WORKLOADS:
            if only and model not in only:
                continue
            reps = args.reps if batch == 1 else max(args.reps // 5, 20)
            rows.append((f"{LABELS.get(model, model)} b{batch}", run(model, batch, reps, args.threads, tmp, impls)))
    names = [n for n in IMPLS if any(n in r for _, r in rows)]
    print(f"median ms per inference; onnxruntime and torch on {args.threads} threads, tdc with its defaults "
          "(1 BLAS thread; numba kernels on 2); in brackets: time / onnxruntime's")
    print(f"{'workload':14s}" + "".join(f"{n:>20s}" for n in names))
    for label, r in rows:
        base = r.get("onnxruntime")
        cells = []
        for n in names:
            if n not in r:
                cells.append(f"{'-':>20s}")
                continue
            ratio = f" ({r[n] / base:.2f}x)" if base else ""
            cells.append(f"{r[n]:>12.4f}{ratio:>8s}")
        print(f"{label:14s}" + "".join(cells))


if __name__ == "__main__":
    main()
