"""Convolution algorithms on single batch-1 layers: tdc's numba kernels (direct, im2col + GEMM, FFT,
Winograd F(2x2,3x3) and F(4x4,3x3)) against onnxruntime's Conv and PyTorch's conv2d.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/conv.py

Prints, per layer and implementation, the median time (ms) and GFLOP/s counted as a direct
convolution (2 * Cout * Cin * kh * kw * oh * ow, the same count for every algorithm), each result's
error against a float64 reference, and how often the conv_algo pass's cost model picks an
algorithm within 10% of the fastest measured one. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tdc.backends.numba import prepare_runtime  # noqa: E402  (sets OMP_WAIT_POLICY before numba loads)
from tdc.backends.numba import conv_algos as CA  # noqa: E402
from tdc.backends.numba.codegen import LIBRARY  # noqa: E402
from tdc.ir.graph import Graph  # noqa: E402
from tdc.ir.types import TensorType  # noqa: E402
from tdc.ops.conv import ALGORITHMS, legal_algos  # noqa: E402
from tdc.passes import conv_algo as P  # noqa: E402

# (name, Cin, Cout, H, W, k, pad)
LAYERS = [
    ("3x3 64x56", 64, 64, 56, 56, 3, 1),
    ("3x3 128x28", 128, 128, 28, 28, 3, 1),
    ("3x3 256x14", 256, 256, 14, 14, 3, 1),
    ("3x3 512x7", 512, 512, 7, 7, 3, 1),
    ("5x5 32x28", 32, 32, 28, 28, 5, 2),
    ("1x1 256>64x56", 256, 64, 56, 56, 1, 0),
]


def conv_node(cin, cout, h, w, k, pad, algo="auto"):
    g = Graph("layer")
    x = g.add_arg("x", TensorType("f32", (1, cin, h, w)), "input")
    wt = g.add_arg("w", TensorType("f32", (cout, cin, k, k)), "param")
    b = g.add_arg("b", TensorType("f32", (cout,)), "param")
    (y,) = g.emit("conv2d", [x, wt, b], {"pad": [pad] * 4, "algo": algo})
    g.add_output("y", y)
    return g, g.nodes[-1]


def tdc_runner(node, algo, x, w, b, out):
    """A call of the numba kernel for `algo`, bound as the executable binds it. Winograd's filter
    transform is computed on the first call and kept (an inference graph's params)."""
    g, trial = conv_node(x.shape[1], w.shape[0], x.shape[2], x.shape[3], w.shape[2], node.attrs["pad"][0], algo)
    if algo == "fft":
        step = CA.fft_step(trial)
        return lambda: step(x, w, b, out)
    fn, args = LIBRARY["conv2d"](trial, [x, w, b], [out], None)
    if algo in CA.WINOGRAD_M:
        args[-1][0] = 1
    return lambda: fn(*args)


def ort_runner(x, w, b, pad, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[pad] * 4, kernel_shape=list(w.shape[2:]))
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"x": x}
    return lambda: sess.run(None, feed)[0]


def torch_runner(x, w, b, pad, threads):
    import torch
    torch.set_num_threads(threads)
    tx, tw, tb = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)

    def run():
        with torch.no_grad():
            return torch.nn.functional.conv2d(tx, tw, tb, padding=pad).numpy()
    return run


def timeit(fn, reps, min_time=0.2):
    """Median seconds of one call over `reps` calls (more when a call is short)."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(reps, int(min_time / one))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="timed calls per implementation and round (default 15)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all implementations; the median of "
                    "the rounds' medians is reported (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="threads for onnxruntime and torch (default 2)")
    ap.add_argument("--only", help="run only layers whose name contains this")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    prepare_runtime()
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs; timings will be noisy")
    rng = np.random.default_rng(0)
    rows, within, counted, summary = [], 0, 0, []
    for name, cin, cout, h, w_, k, pad in LAYERS:
        if args.only and args.only not in name:
            continue
        x = rng.standard_normal((1, cin, h, w_)).astype(np.float32)
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        b = rng.standard_normal(cout).astype(np.float32)
        from tdc.ops.conv import _conv2d_ref
        ref = _conv2d_ref(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), stride=(1, 1),
                          pad=(pad,) * 4, dilation=(1, 1), groups=1, algo="auto", algo_note="")
        flops = 2 * cout * cin * k * k * h * w_
        g, node = conv_node(cin, cout, h, w_, k, pad)
        impls = {}
        for algo in legal_algos("conv2d", (k, k), (1, 1), (1, 1)):
            out = np.empty(ref.shape, np.float32)
            impls[algo] = (tdc_runner(node, algo, x, w, b, out), out)
        try:
            impls["onnxruntime"] = (ort_runner(x, w, b, pad, args.threads), None)
        except ImportError as e:
            print(f"onnxruntime not timed: {e}")
        if not args.no_torch:
            try:
                impls["torch"] = (torch_runner(x, w, b, pad, args.threads), None)
            except ImportError:
                pass
        errors = {}
        for key, (fn, out) in impls.items():
            res = fn()
            res = out if out is not None else res
            errors[key] = float(np.abs(res - ref).max() / np.abs(ref).max())
        times = {key: [] for key in impls}
        for _ in range(args.rounds):
            for key, (fn, _) in impls.items():
                times[key].append(timeit(fn, args.reps))
        med = {key: float(np.median(v)) for key, v in times.items()}
        tdc_algos = [a for a in ALGORITHMS if a in med]
        fastest = min(tdc_algos, key=med.get)
        p = P.conv_problem(node)
        model_pick = min(tdc_algos, key=lambda a: P.estimate(p, a, filter_cached=True))
        ok = med[model_pick] <= 1.10 * med[fastest]
        within += ok
        counted += 1
        for key in impls:
            rows.append((name, key, med[key] * 1e3, flops / med[key] / 1e9, errors[key],
                         "fastest tdc" if key == fastest else ("model's pick" if key == model_pick else "")))
            if key == model_pick and key == fastest:
                rows[-1] = rows[-1][:-1] + ("fastest tdc, model's pick",)
        summary.append((name, fastest, med[fastest] * 1e3, model_pick, ok, med.get("onnxruntime"), med.get("torch"),
                        med.get("im2col"), min(med.get("winograd_f2", np.inf), med.get("winograd_f4", np.inf))))
    print(f"\n{'layer':15s} {'implementation':12s} {'ms':>8s} {'GFLOP/s':>8s} {'rel err':>9s}")
    last = None
    for name, key, ms, gf, err, note in rows:
        if last is not None and name != last:
            print()
        last = name
        print(f"{name:15s} {key:12s} {ms:8.3f} {gf:8.1f} {err:9.1e}  {note}")
    print(f"\n{'layer':15s} {'best tdc':12s} {'ms':>7s} {'ort ms':>7s} {'torch ms':>8s} {'wino/im2col':>11s}  model's pick")
    for name, best, ms, pick, ok, ort_s, torch_s, im2col, wino in summary:
        ratio = f"{im2col / wino:.2f}x" if np.isfinite(wino) else "-"
        print(f"{name:15s} {best:12s} {ms:7.3f} {ort_s * 1e3 if ort_s else float('nan'):7.3f} "
              f"{torch_s * 1e3 if torch_s else float('nan'):8.3f} {ratio:>11s}  {pick}{'' if ok else ' (> 10% slower)'}")
    print(f"\ncost model's choice within 10% of the fastest measured tdc algorithm: {within}/{counted} layers")


if __name__ == "__main__":
    main()
