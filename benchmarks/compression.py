"""Gradient compression: bytes on the wire, accuracy and time per step, against dense training.

Every method trains the same model for the same epochs with data parallelism on 2 ranks
(`tdc train --ranks 2 --compress METHOD`, LLVM backend, momentum SGD), for several seeds, on

  * digits: scikit-learn's 8x8 digits with examples/digits.py;
  * lenet: the LeNet-5 IDX set: the same digits drawn at 28x28 (each pixel 3x3 and a 2-pixel
    border), written as MNIST IDX files, with examples/lenet.py.

A method written METHOD@OPTIMIZER:LR trains with that optimizer and lr instead. The compression
ratio is the median bytes a rank sent per step in dense training over the same for the method,
both counted from the MPI messages (indices included): the steady state, as Deep Gradient
Compression reports it; "mean ratio" divides the means over the whole run instead (a sparsity
warm-up sends more early on). Accuracy is the final
test accuracy, mean and spread over the seeds; "vs dense" is the difference in points. Time is
the median wall time per step (the staged runtime's stages and messages; dense training runs
its allreduces inside the compiled step).

    .venv/bin/python benchmarks/compression.py [--epochs 10] [--seeds 5] [--only digits] [--methods none,dgc:0.001]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["none", "dgc:0.001", "dgc:0.001,warmup=88", "dgc:0.001,ef=0", "topk:0.001", "topk:0.01", "topk:0.01,ef=0",
           "threshold:0.01", "sign", "sign@sgd:0.1", "none@sgd:0.1", "terngrad", "qsgd:16", "fp16", "bf16", "bf16:sr"]
LR = {"digits": 0.03, "lenet": 0.02}


def data_sets(tmp: Path) -> dict[str, tuple[str, str]]:
    """name -> (example model, tdc train --data): digits, and the LeNet-5 IDX set written in tmp."""
    (tmp / "idx").mkdir()
    return {"digits": ("digits", "digits"), "lenet": ("lenet", lenet_idx(tmp / "idx"))}


def lenet_idx(directory: Path) -> str:
    """The digits at 28x28 as IDX files (what tdc train --data mnist:DIR reads)."""
    from tdc.runtime.data import load_digits, write_idx
    d = load_digits(0)
    for split, x, y in (("train", d.x_train, d.y_train), ("t10k", d.x_test, d.y_test)):
        big = np.pad(np.kron(x[:, 0], np.ones((3, 3), np.float32)), ((0, 0), (2, 2), (2, 2)))
        write_idx(str(directory / f"{split}-images-idx3-ubyte"), np.clip(big * 255, 0, 255).astype(np.uint8))
        write_idx(str(directory / f"{split}-labels-idx1-ubyte"), y.astype(np.uint8))
    return f"mnist:{directory}"


def run(model: str, data: str, method: str, seed: int, epochs: int, lr: float, tmp: Path) -> dict:
    metrics = tmp / "m.jsonl"
    method, _, opt = method.partition("@")
    optimizer, _, opt_lr = opt.partition(":") if opt else ("momentum", "", "")
    cmd = [sys.executable, "-m", "tdc.cli", "train", str(ROOT / "examples" / f"{model}.py"), "--data", data,
           "--ranks", "2", "--epochs", str(epochs), "--seed", str(seed), "--optimizer", optimizer,
           "--lr", opt_lr or str(lr), "--no-progress", "--metrics", str(metrics), "--compress", method]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in rows if "bytes_sent" in r and "test_accuracy" not in r]
    times = np.diff([r["seconds"] for r in steps])
    return {"accuracy": [r for r in rows if "test_accuracy" in r][-1]["test_accuracy"],
            "bytes": float(np.median([r["bytes_sent"] for r in steps])),
            "mean_bytes": float(np.mean([r["bytes_sent"] for r in steps])),
            "ms": float(np.median(times)) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--only", choices=("digits", "lenet"))
    ap.add_argument("--methods", help="comma-separated (default: all); write a method's own options after ';' "
                                      "(dgc:0.001;ef=0)")
    args = ap.parse_args()
    methods = [m.replace(";", ",") for m in args.methods.split(",")] if args.methods else METHODS
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name, (model, data) in data_sets(tmp).items():
            if args.only and name != args.only:
                continue
            results = {m: [run(model, data, m, s, args.epochs, LR[name], tmp) for s in range(args.seeds)]
                       for m in methods}
            dense = results.get("none")
            dense_bytes = np.median([r["bytes"] for r in dense]) if dense and not any("error" in r for r in dense) \
                else None
            dense_mean = np.mean([r["mean_bytes"] for r in dense]) if dense_bytes else None
            dense_acc = np.mean([r["accuracy"] for r in dense]) if dense_bytes else None
            print(f"\n{name}: {model}.py, 2 ranks, {args.epochs} epochs, momentum SGD lr {LR[name]}, "
                  f"{args.seeds} seeds")
            print(f"{'method':22s} {'bytes/step':>11s} {'ratio':>8s} {'mean ratio':>10s} {'accuracy':>16s} "
                  f"{'vs dense':>9s} {'ms/step':>8s}")
            for m, rs in results.items():
                failed = [r["error"] for r in rs if "error" in r]
                if failed:
                    print(f"{m:22s} failed ({len(failed)} of {len(rs)} seeds): {failed[0]}")
                    continue
                b = np.median([r["bytes"] for r in rs])
                acc = np.array([r["accuracy"] for r in rs])
                ratio = f"{dense_bytes / b:7.0f}x" if dense_bytes else "-"
                mean_ratio = f"{dense_mean / np.mean([r['mean_bytes'] for r in rs]):9.0f}x" if dense_mean else "-"
                vs = f"{(acc.mean() - dense_acc) * 100:+8.2f}" if dense_acc is not None else "-"
                print(f"{m:22s} {b:11.0f} {ratio:>8s} {mean_ratio:>10s} {acc.mean():8.4f} ±{acc.std():.4f} {vs:>9s} "
                      f"{np.median([r['ms'] for r in rs]):8.2f}")


if __name__ == "__main__":
    main()
