"""The profiler: where a compiled step's time goes, kernel by kernel.

An executable compiled with profile=True (the llvm backend) reads a clock around each of its
kernels and sums the seconds per kernel. `profile_table` prints them with each kernel's ops, its
share of the step, the GFLOP/s and GB/s it reached (FLOPs from the op registry, bytes of the
arrays it reads and writes), and that rate as a fraction of the host's FMA peak, which
`host_peak` measures once per CPU model and thread count and caches in $TDC_CACHE_DIR/peak.json.
"""
from __future__ import annotations

import os
import time

from ..backends.executable import KernelTime
from ..files import cache_dir
from ..passes.target import cpu_model, read_json, update_json


def peak_path() -> str:
    return os.path.join(cache_dir(), "peak.json")


def host_peak(threads: int | None = None) -> tuple[float, int]:
    """(GFLOP/s, threads): the FMA peak of `threads` cores (default: those this process may use)."""
    from ..backends.llvm import fma_peak_gflops
    threads = threads or len(os.sched_getaffinity(0))
    path = peak_path()
    key = f"{cpu_model()} x{threads}"
    cached = read_json(path).get(key)
    if isinstance(cached, (int, float)) and cached > 0:
        return float(cached), threads
    peak = fma_peak_gflops(threads)
    update_json(path, key, peak)
    return peak, threads


def run_profiled(exe, inputs: dict, min_seconds: float = 0.5, min_calls: int = 5) -> int:
    """Call a profiling executable on `inputs` until it has run `min_seconds` and `min_calls`,
    after one warm-up call that is not counted; returns the calls counted."""
    exe(**inputs)
    exe.reset_times()
    start = time.perf_counter()
    while exe.calls < min_calls or time.perf_counter() - start < min_seconds:
        exe(**inputs)
    return exe.calls


def profile_table(times: list[KernelTime], peak: tuple[float, int] | None = None, top: int | None = 15) -> str:
    """The `top` kernels by time spent (all with None), one line each, then the rest and the step's total."""
    calls = max((t.calls for t in times), default=0)
    if calls == 0:
        return "profile: no calls were timed"
    total = sum(t.seconds for t in times)
    flops = sum(t.flops for t in times)
    rows = sorted(times, key=lambda t: -t.seconds)
    shown = rows if top is None else rows[:top]
    lines = [f"profile: {calls} calls, {total / calls * 1e3:.3f} ms per call in {len(times)} kernels"
             + (f"; host FMA peak {peak[0]:.0f} GFLOP/s on {peak[1]} core{'s' * (peak[1] > 1)}" if peak else ""),
             f"{'kernel':<14} {'ops':<34} {'us/call':>9} {'share':>6} {'GFLOP/s':>8} {'GB/s':>7}"
             + (f" {'%peak':>6}" if peak else "")]
    for t in shown:
        secs = t.seconds / calls
        ops = ",".join(dict.fromkeys(t.ops)) or "copy"
        ops = ops if len(ops) <= 34 else ops[:31] + "..."
        rate = t.flops / secs * 1e-9 if secs > 0 else 0.0
        line = (f"{t.name:<14} {ops:<34} {secs * 1e6:9.1f} {t.seconds / total if total else 0:6.1%} "
                f"{rate:8.2f} {t.bytes / secs * 1e-9 if secs > 0 else 0:7.2f}")
        lines.append(line + (f" {rate / peak[0]:6.1%}" if peak else ""))
    if len(shown) < len(rows):
        rest = sum(t.seconds for t in rows[len(shown):])
        lines.append(f"{'(' + str(len(rows) - len(shown)) + ' more)':<49} {rest / calls * 1e6:9.1f} {rest / total:6.1%}")
    step_rate = flops / (total / calls) * 1e-9 if total else 0.0
    lines.append(f"{'step':<49} {total / calls * 1e6:9.1f} {1:6.1%} {step_rate:8.2f}"
                 + (f" {'':>7} {step_rate / peak[0]:6.1%}" if peak else ""))
    return "\n".join(lines)
