"""int8 LeNet-5 inference: tdc int8 (LLVM JIT, runtime/quant.c) against tdc float32 (LLVM JIT),
onnxruntime float32 and onnxruntime int8 (QLinearConv / QGemm via quantize_static, QOperator
format, per-channel weights, calibrated on the same samples), at batch 64 and 1, in one run.

LeNet-5 is trained here for a few epochs on the 8x8 digits scaled to 28x28 (each pixel 3x3, a
2-pixel border), as tests/test_train_conv_models.py does; both int8 models are calibrated on
256 training images; accuracy is measured on the whole test split (359 images).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/int8.py [--epochs 4] [--reps 300]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import tdc  # noqa: E402
import tdc.onnx  # noqa: E402
from tdc.runtime.data import Dataset, load_digits  # noqa: E402
from tdc.runtime.quantize import quantize_model  # noqa: E402
from tdc.runtime.trainer import train  # noqa: E402
from inference_latency import median_ms  # noqa: E402  (this directory's own timing rule)


def to_lenet(x):
    return np.pad(np.kron(x, np.ones((3, 3), np.float32)), ((0, 0), (0, 0), (2, 2), (2, 2)))


def accuracy(run, x, y, batch) -> float:
    n = len(x)
    pad = (-n) % batch
    xs = np.concatenate([x, x[:pad]]) if pad else x
    pred = np.concatenate([run(xs[s:s + batch]).argmax(1) for s in range(0, len(xs), batch)])[:n]
    return float((pred == y).mean())


def ort_int8(path_f32: str, path_i8: str, calib: np.ndarray, batch: int):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": calib[s:s + batch]} for s in range(0, len(calib) - batch + 1, batch)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(path_f32, path_i8, Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime's intra-op threads (default 2)")
    args = ap.parse_args()
    import onnxruntime as ort
    from lenet import lenet

    d = load_digits(0)
    ds = Dataset("digits28", to_lenet(d.x_train), d.y_train, to_lenet(d.x_test), d.y_test, 10)
    res = train(lenet, ds, epochs=args.epochs, backend="llvm", optimizer=tdc.Optimizer("momentum", lr=0.05),
                verbose=False, progress=False, out=lambda *a, **k: None)
    params = dict(res.state)
    calib = ds.x_train[:256]
    rows, accs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (64, 1):
            g = lenet.trace(batch=batch)
            qg, qp = quantize_model(g, params, calib)
            f32 = tdc.compile(g, backend="llvm", params=params)
            i8 = tdc.compile(qg, backend="llvm", params=qp)
            p32, p8 = os.path.join(tmp, f"f32_{batch}.onnx"), os.path.join(tmp, f"i8_{batch}.onnx")
            tdc.onnx.save(g, p32, params=params)
            ort_int8(p32, p8, calib, batch)
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            s32 = ort.InferenceSession(p32, so, providers=["CPUExecutionProvider"])
            s8 = ort.InferenceSession(p8, so, providers=["CPUExecutionProvider"])
            ops8 = sorted({n.op_type for n in __import__("onnx").load(p8).graph.node})
            impls = {
                "tdc f32": lambda xb: f32(x=xb)["out"],
                "tdc int8": lambda xb: i8(x=xb)["out"],
                "onnxruntime f32": lambda xb: s32.run(None, {"x": xb})[0],
                "onnxruntime int8": lambda xb: s8.run(None, {"x": xb})[0],
            }
            xb = np.ascontiguousarray(ds.x_test[:batch])
            times = {name: median_ms(lambda fn=fn: fn(xb), args.reps) for name, fn in impls.items()}
            rows.append((batch, times))
            if batch == 64:
                accs = {name: accuracy(fn, ds.x_test, ds.y_test, batch) for name, fn in impls.items()}
    print(f"LeNet-5 on digits (28x28), {args.epochs} epochs; onnxruntime int8 ops: {', '.join(ops8)}")
    print(f"median ms per inference over {args.reps} calls; onnxruntime on {args.threads} threads; "
          "in brackets: time / tdc int8's")
    names = list(rows[0][1])
    print(f"{'batch':>6} " + " ".join(f"{n:>22}" for n in names))
    for batch, t in rows:
        base = t["tdc int8"]
        print(f"{batch:>6} " + " ".join(f"{t[n]:>13.4f} ({t[n] / base:4.2f}x)" for n in names))
    print(f"test accuracy ({len(ds.y_test)} images): " +
          ", ".join(f"{n} {a:.4f}" for n, a in accs.items()))
    print(f"int8 - float32 accuracy: tdc {accs['tdc int8'] - accs['tdc f32']:+.4f}, "
          f"onnxruntime {accs['onnxruntime int8'] - accs['onnxruntime f32']:+.4f}")


if __name__ == "__main__":
    main()
