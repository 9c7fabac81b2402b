"""Hogwild against one thread and against synchronous threads, on this machine.

For digits (examples/digits.py) and the LeNet-5 IDX set (the digits at 28x28, examples/lenet.py),
`tdc train` on the LLVM backend with

  * one thread (--threads 1);
  * synchronous threads (--threads N): each step's kernels split over N threads, so every update
    sees the whole batch, as synchronous data parallelism does;
  * Hogwild (--threads N --hogwild): N threads each run whole steps on their own batches and
    write their updates into the shared params without locks;

and the same three in the native executable (tdc compile --train, then --threads / --hogwild).
The table gives training throughput (samples per second over the run's epochs, evaluation
excluded; the executable's from its own timer) and the final test accuracy (mean over seeds;
the executable is not evaluated). Throughput ratios are against one thread.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/hogwild.py [--threads 2] [--epochs 8]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compression import ROOT, data_sets  # noqa: E402

TDC = [sys.executable, "-m", "tdc.cli"]


def train(model: str, data: str, flags: list[str], seed: int, epochs: int, tmp: Path) -> tuple[float, float]:
    metrics = tmp / "m.jsonl"
    p = subprocess.run([*TDC, "train", str(ROOT / "examples" / f"{model}.py"), "--data", data, "--epochs", str(epochs),
                        "--seed", str(seed), "--no-progress", "--metrics", str(metrics), *flags],
                       capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-500:])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rates = [float(m.group(1)) for m in re.finditer(r"(\d+) samples/s", p.stdout)]
    return float(np.median(rates)), [r for r in rows if "test_accuracy" in r][-1]["test_accuracy"]


def native(model: str, data: str, flag_sets: dict, tmp: Path, steps: int) -> dict:
    out = tmp / f"{model}-bundle"
    subprocess.run([*TDC, "compile", str(ROOT / "examples" / f"{model}.py"), "--train", "-o", str(out)], check=True,
                   capture_output=True)
    from tdc.runtime.data import load_data
    d = load_data(data)
    header = (out / "model.h").read_text()
    batch = int(re.search(r'\{"x", \w+, \d+, \{(\d+)', header).group(1))
    x = d.x_train[: len(d.x_train) // batch * batch].astype(np.float32)
    np.save(tmp / "x.npy", x)
    np.save(tmp / "y.npy", d.y_train[: len(x)].astype(np.int64))
    rates = {}
    for name, flags in flag_sets.items():
        p = subprocess.run([str(out / "model"), "--input", f"x={tmp / 'x.npy'}", "--input", f"y={tmp / 'y.npy'}",
                            "--input", "lr=0.002", "--steps", str(steps), "--save", str(tmp / "t.weights"), *flags],
                           capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-500:])
        m = re.search(r"throughput: ([\d.]+) steps/s", p.stdout)
        if m:
            rates[name] = float(m.group(1)) * batch
        else:
            med = float(re.search(r"median ([\d.]+) ms", p.stdout).group(1))
            rates[name] = batch / med * 1e3
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600, help="steps of each native run")
    args = ap.parse_args()
    n = args.threads
    configs = {"1 thread": ["--threads", "1"], f"{n} sync threads": ["--threads", str(n)],
               f"Hogwild, {n} threads": ["--threads", str(n), "--hogwild"]}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name, (model, data) in data_sets(tmp).items():
            print(f"\n{name}: {model}.py, llvm backend, {args.epochs} epochs, {args.seeds} seeds")
            print(f"{'':24s} {'samples/s':>10s} {'vs 1':>6s} {'accuracy':>16s} {'native samples/s':>17s} {'vs 1':>6s}")
            res = {c: [train(model, data, f, s, args.epochs, tmp) for s in range(args.seeds)] for c, f in configs.items()}
            nat = native(model, data, configs, tmp, args.steps)
            base = np.median([r for r, _ in res["1 thread"]])
            for c, rs in res.items():
                rate = np.median([r for r, _ in rs])
                acc = np.array([a for _, a in rs])
                print(f"{c:24s} {rate:10.0f} {rate / base:6.2f} {acc.mean():8.4f} ±{acc.std():.4f} "
                      f"{nat[c]:17.0f} {nat[c] / nat['1 thread']:6.2f}")


if __name__ == "__main__":
    main()
