"""Parameter servers: synchronous, asynchronous and bounded-staleness training, compared.

`tdc train --ranks 3 --ps 1` (one server, two workers, LLVM backend, Adam on the server) on
digits (examples/digits.py) and the LeNet-5 IDX set (the digits at 28x28, examples/lenet.py),
in each mode: sync, async, async with staleness-aware lr, bounded staleness K=1 and K=4. The
table gives the final test accuracy (mean over seeds), the wall time, the updates the server
applied (sync: one per step, the workers' mean; the others: one per worker's gradient), and the
staleness of those updates (mean and largest). The plot shows test accuracy and test loss after
each epoch against wall time and against the updates applied so far (each epoch is the same
number of worker steps, so the updates at epoch e are e / epochs of the run's updates).

    .venv/bin/python benchmarks/parameter_server.py [--epochs 10] [--seeds 2] [--plot benchmarks/parameter_server.png]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compression import ROOT, data_sets  # noqa: E402

MODES = {"sync": [], "async": ["--mode", "async"], "async, staleness lr": ["--mode", "async", "--staleness-lr"],
         "bounded K=1": ["--staleness", "1"], "bounded K=4": ["--staleness", "4"]}


def run(model: str, data: str, flags: list[str], seed: int, epochs: int, tmp: Path) -> dict:
    metrics = tmp / "m.jsonl"
    cmd = [sys.executable, "-m", "tdc.cli", "train", str(ROOT / "examples" / f"{model}.py"), "--data", data,
           "--ranks", "3", "--ps", "1", "--epochs", str(epochs), "--seed", str(seed), "--no-progress",
           "--metrics", str(metrics), *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [r for r in rows if "test_accuracy" in r]
    ps = [r for r in rows if "staleness_histogram" in r][0]
    hist = {int(k): v for k, v in ps["staleness_histogram"].items()}
    return {"accuracy": evals[-1]["test_accuracy"], "seconds": evals[-1]["seconds"], "updates": ps["updates"],
            "curve": [(r["seconds"], r["epoch"] / epochs * ps["updates"], r["test_accuracy"], r["test_loss"])
                      for r in evals],
            "staleness_mean": sum(k * v for k, v in hist.items()) / max(1, sum(hist.values())),
            "staleness_max": max(hist), "lead_max": max(int(k) for k in ps["lead_histogram"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--only", choices=("digits", "lenet"))
    ap.add_argument("--plot", metavar="FILE.png")
    args = ap.parse_args()
    curves = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name, (model, data) in data_sets(tmp).items():
            if args.only and name != args.only:
                continue
            print(f"\n{name}: {model}.py, 1 server + 2 workers, {args.epochs} epochs, {args.seeds} seeds")
            print(f"{'mode':22s} {'accuracy':>16s} {'seconds':>8s} {'updates':>8s} {'staleness':>10s} "
                  f"{'max':>4s} {'max lead':>8s}")
            for mode, flags in MODES.items():
                rs = [run(model, data, flags, s, args.epochs, tmp) for s in range(args.seeds)]
                acc = np.array([r["accuracy"] for r in rs])
                print(f"{mode:22s} {acc.mean():8.4f} ±{acc.std():.4f} {np.median([r['seconds'] for r in rs]):8.1f} "
                      f"{rs[0]['updates']:8d} {np.mean([r['staleness_mean'] for r in rs]):10.2f} "
                      f"{max(r['staleness_max'] for r in rs):4d} {max(r['lead_max'] for r in rs):8d}")
                curves[(name, mode)] = rs[0]["curve"]
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = sorted({n for n, _ in curves})
        fig, axes = plt.subplots(len(names), 4, figsize=(20, 4 * len(names)), squeeze=False)
        for row, name in zip(axes, names):
            for (n, mode), c in curves.items():
                if n != name:
                    continue
                for ax, (x, y) in zip(row, ((0, 2), (1, 2), (0, 3), (1, 3))):
                    ax.plot([p[x] for p in c], [p[y] for p in c], "o-", ms=3, label=mode)
            for ax, (x, y) in zip(row, (("wall time (s)", "test accuracy"), ("updates applied", "test accuracy"),
                                        ("wall time (s)", "test loss"), ("updates applied", "test loss"))):
                ax.set(xlabel=x, ylabel=y, title=f"{name}: {y} vs {x.split(' (')[0]}")
            row[2].set_yscale("log")
            row[3].set_yscale("log")
            row[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=80)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
