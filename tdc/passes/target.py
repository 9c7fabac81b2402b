"""What a pass may know about the backend it compiles for: its Target.

A Target says which dtypes a backend's generated loops and its library kernels handle, how
many threads it runs, how to time one of its kernels (for --autotune), and its cost rates.
Each compiled backend defines its own (backends/numba/target.py, backends/llvm/target.py);
passes receive one and never import a backend.

The rates are not constants fitted once: the CPU differs between machines (AVX-512 on one,
AVX2 only on another), so they are measured by a short calibration the first time a target
needs them on a machine, and kept in $TDC_CACHE_DIR/targets.json (~/.cache/tdc) under the
backend and the CPU model:
  * `gemm_flops`: float32 GEMM flop/s of the backend's matrix product on one thread;
  * `copy_bytes`: bytes/s of a large memory copy (read + write);
  * `conv`: per convolution algorithm, (overhead seconds, scale, seconds per image plane) fitted
    so that the conv_algo pass's analytic model times the backend's own kernels on three probe
    layers (passes/conv_algo.py: `calibrate_conv`).
"""
from __future__ import annotations

import json
import os
import platform
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..files import atomic_write, cache_dir

CALIBRATION_VERSION = 6   # 4: conv timers run BLAS on one thread; 5: the LLVM runtime's padded-grid direct kernels;
#                           6: machines told apart by family and features, the GEMM timed at 192^3


# the vector features rates depend on most: CPUs sold under one name differ in them ("AMD EPYC"
# is a Zen 3 with AVX2 on one machine here and a Zen 4 with AVX-512 on another)
_RATE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's name, family/model/stepping and vector features (from /proc/cpuinfo's text, read
    when not given): what a measured rate is of."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if not key.strip():
            break                       # the first processor's block is enough
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" not in fields:
        return name
    flags = set(fields.get("flags", "").split())
    return (f"{name} ({fields['cpu family']}/{fields.get('model', '?')}/{fields.get('stepping', '?')}; "
            f"{' '.join(f for f in _RATE_FLAGS if f in flags) or 'no avx2'})")


def machine_id() -> str:
    """The CPU and the number of cores: what rates depend on."""
    return f"{cpu_model()} x{os.cpu_count()}"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


@dataclass
class Rates:
    gemm_flops: float
    copy_bytes: float
    conv: dict[str, tuple[float, ...]]       # algorithm -> (overhead s, scale of the modelled time, s per plane)


class Target(ABC):
    """A compiled backend as the passes see it. Subclasses set the class attributes and
    implement the timers."""
    name = "generic"
    loop_dtypes: tuple[str, ...] = ()       # dtypes its generated loops handle
    library_dtypes: tuple[str, ...] = ()    # dtypes its library kernels (GEMM, convolution, ...) handle
    caches_filter_transforms = False         # an inference executable keeps Winograd filter transforms of params
    conv_gemm_threads_all = True             # Winograd's per-point GEMMs use every thread (else one)
    conv_image_threads_ops: tuple[str, ...] = ("conv2d", "conv2d_grad_input", "conv2d_grad_weight")
    wino_f4_transform_cost = 1.6             # F(4x4)'s transform work per element, relative to F(2x2)'s
    sparse_conv_wide = False                 # its sparse_conv2d skips im2col at stride 1 (passes/sparsify.py)
    direct_padded_grid = False               # its unit-stride direct kernels compute every point of the
                                             # zero-padded plane, images split over the threads
    direct_grad_weight_cost = 1.0            # its direct weight gradient's time per flop, relative to the
                                             # forward's (the calibration times forward probes only)

    def threads(self) -> int:
        return available_cores()

    def gemm_threads(self) -> int:
        return self.threads() if self.conv_gemm_threads_all else 1

    def image_threads(self, op: str) -> int:
        """Threads that split a convolution's images (im2col runs one GEMM per image chunk)."""
        return self.threads() if op in self.conv_image_threads_ops else 1

    @abstractmethod
    def time_conv(self, node, algo: str) -> float:
        """Seconds one call of this backend's kernel for conv op `node` by `algo` takes."""

    @abstractmethod
    def time_matmul(self, m: int, k: int, n: int) -> float:
        """Seconds one float32 [m, k] x [k, n] product takes on one thread."""

    def time_linear(self, m: int, k: int, n: int) -> float:
        """Seconds one float32 linear layer (x [m, k], weight [n, k]) takes (the sparsify pass's rates)."""
        raise TdcError(f"the {self.name} target has no timer for linear layers")

    def time_sparse_linear(self, m: int, k: int, n: int, density: float) -> float:
        """Seconds one float32 sparse_linear with a random CSR weight of `density` takes."""
        raise TdcError(f"the {self.name} target has no sparse kernels to time")

    def time_sparse_conv(self, node, ins: list) -> float:
        """Seconds one call of this backend's kernel for sparse_conv2d `node` on the arrays `ins` takes."""
        raise TdcError(f"the {self.name} target has no sparse kernels to time")

    # ---- rates ------------------------------------------------------------------------------
    def cache_key(self) -> str:
        return f"{self.name}|{machine_id()}|v{CALIBRATION_VERSION}"

    def rates(self) -> Rates:
        """This machine's rates for this target: from the cache, or measured now (once)."""
        cached = getattr(self, "_rates", None)
        if cached is not None:
            return cached
        key = self.cache_key()
        entry = read_json(targets_path()).get(key)
        rates = _rates_from(entry)
        if rates is None:
            rates = self.calibrate()
            update_json(targets_path(), key, {"gemm_flops": rates.gemm_flops, "copy_bytes": rates.copy_bytes,
                                              "conv": {a: list(v) for a, v in rates.conv.items()},
                                              "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
        self._rates = rates
        return rates

    def calibrate(self) -> Rates:
        from .conv_algo import calibrate_conv   # the conv model is the pass's; it fits itself to this target
        return Rates(gemm_flops=measure_gemm(self), copy_bytes=measure_copy(), conv=calibrate_conv(self))


def _rates_from(entry) -> Rates | None:
    try:
        conv = {a: (float(o), float(s), float(t)) for a, (o, s, t) in entry["conv"].items()}
        return Rates(float(entry["gemm_flops"]), float(entry["copy_bytes"]), conv)
    except (TypeError, KeyError, ValueError):
        return None


def best_time(fn, reps: int = 5) -> float:
    """The fastest of `reps` timed calls after one warm-up call (the minimum is what a noisy,
    shared machine distorts least)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_time(call, empty, reps: int = 15, span: float = 1e-3) -> float:
    """Seconds one `call` of a compiled kernel takes, less what calling it costs from Python:
    the fastest of `reps` loops of calls (as many as fill about `span` seconds), minus the same
    for `empty` (the same kernel on zero rows, which returns at once). A graph's executable calls
    its kernels from compiled code, so the foreign-call overhead (about a microsecond, the whole
    time of a small layer) is not the layer's."""
    inner = int(np.clip(span / max(best_time(call, 3), 1e-8), 4, 4000))

    def loop(fn):
        return lambda: [fn() for _ in range(inner)]
    return max(best_time(loop(call), reps) - best_time(loop(empty), reps), 0.0) / inner


def measure_gemm(target: Target, size: int = 192) -> float:
    # 192^3 is under the C runtime's split threshold (2e7 flops), so this is one thread's rate
    return 2.0 * size ** 3 / target.time_matmul(size, size, size)


def measure_copy(nbytes: int = 1 << 25) -> float:
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    return 2.0 * nbytes / best_time(lambda: np.copyto(dst, src), reps=3)


# ---- the cache file ------------------------------------------------------------------------------

def targets_path() -> str:
    return os.path.join(cache_dir(), "targets.json")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def update_json(path: str, key: str, entry) -> None:
    """Set one key of a JSON cache file (read, update, write to a temporary file, rename)."""
    data = read_json(path)
    data[key] = entry
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode()))


def linear_probe_arrays(m: int, k: int, n: int, density: float):
    """The arrays of a probe layer the targets time: random float32 x [m, k], weight [n, k] with `density` of its entries nonzero, bias, output."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k), np.float32)
    w[rng.random((n, k)) >= density] = 0
    return (rng.standard_normal((m, k), np.float32), w, rng.standard_normal(n, np.float32),
            np.empty((m, n), np.float32))
