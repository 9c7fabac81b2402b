"""The conv_algo pass: an algorithm for every convolution (conv2d and its two backward ops).

Each conv node's `algo` attribute is what was asked for: "auto" (nothing: pick the cheapest),
"winograd" (F(2x2,3x3) or F(4x4,3x3), whichever is cheaper) or one algorithm (direct, im2col,
fft, winograd_f2, winograd_f4), set per layer in the DSL (`nn.conv2d(..., algo="fft")`) or for
every layer that asks for nothing by `--conv-algo` (`request_conv_algo`). The pass replaces it by
the algorithm to run. An algorithm that cannot compute the node (Winograd needs a 3x3 kernel,
stride 1 and dilation 1) is replaced by the cheapest legal one, and `algo_note` says so.

"Cheapest" is the analytic cost model below (arithmetic from the lecture's table, plus transform
and memory work, with rates measured on this machine), or with autotune=True the measured time
of each candidate on the numba backend, cached on disk per (op, shapes, stride, pad, dilation,
groups, dtype, machine) in `autotune.json` under the cache directory (~/.cache/tdc, or
$TDC_CACHE_DIR).
"""
from __future__ import annotations

import json
import math
import os
import platform

from ..errors import TdcError
from ..ir.graph import Graph, Node
from ..ops.conv import ALGORITHMS, CONV_ALGOS, legal_algos
from .manager import register_pass

CONV_OPS = ("conv2d", "conv2d_grad_input", "conv2d_grad_weight")
WINOGRAD = {"winograd_f2": 2, "winograd_f4": 4}

# Rates measured on this machine (2 cores, AVX-512; batch-1 layers of benchmarks/conv.py, BLAS on one
# thread per Numba thread). Seconds = work / rate + a fixed overhead. The ranking is what matters.
RATES = {
    "gemm": 40e9,          # flop/s of one thread's BLAS GEMM (im2col runs min(N, 2) chunks in parallel;
                           # Winograd's per-point GEMMs run on both threads)
    "weights": 1.0e9,      # elements/s of GEMM operands packed once per call (filters, transformed filters)
    "direct": 8e9,         # flop/s of the direct loop nest
    "im2col": 1.2e9,       # elements/s gathered into (or scattered from) im2col columns
    "wino": 1.0e9,         # transformed elements/s (tiles in, products out, filters)
    "fft": 1.5e9,          # flop/s of numpy.fft (5 n log2 n per complex transform, half for real)
    "cgemm": 20e9,         # flop/s of the complex per-frequency products (numpy matmul)
}
THREADS = 2
OVERHEAD = {"direct": 20e-6, "im2col": 20e-6, "fft": 300e-6, "winograd_f2": 40e-6, "winograd_f4": 40e-6}

# The LLVM backend's C runtime (benchmarks/conv_c.py, BLAS on one thread): GEMMs run on one core,
# except that a forward im2col convolution splits its images over the runtime's threads; the
# Winograd transforms are slower than Numba's (F(4x4)'s especially) and the filter is transformed
# on every call. Fitted to 3x3 layers of 64-512 channels: im2col 3.7 ms, F2 4.7, F4 7.4, direct
# 22 ms at 64x56x56.
LLVM_RATES = {**RATES, "gemm": 80e9, "direct": 10e9, "im2col": 2e9, "wino": 0.5e9, "fft": 5e9, "cgemm": 5e9}
BACKENDS = ("numba", "llvm")


def conv_problem(node: Node) -> dict:
    """The sizes of a conv op, whichever of the three it is: x [N, C, H, W], w [Co, cg, kh, kw],
    y (the forward output) [N, Co, oh, ow]."""
    a = node.attrs
    if node.op == "conv2d":
        x, w, y = node.inputs[0].type.shape, node.inputs[1].type.shape, node.outputs[0].type.shape
    elif node.op == "conv2d_grad_input":
        x, w, y = a["input_shape"], node.inputs[1].type.shape, node.inputs[0].type.shape
    else:
        x, w, y = node.inputs[0].type.shape, a["weight_shape"], node.inputs[1].type.shape
    return {"op": node.op, "x": tuple(x), "w": tuple(w), "y": tuple(y), "stride": tuple(a["stride"]),
            "pad": tuple(a["pad"]), "dilation": tuple(a["dilation"]), "groups": a["groups"],
            "dtype": node.inputs[0].type.dtype}


def legal(node: Node) -> tuple[str, ...]:
    a = node.attrs
    return legal_algos(node.op, conv_problem(node)["w"][2:], a["stride"], a["dilation"])


def macs(p: dict) -> int:
    n, co, oh, ow = p["y"]
    _, cg, kh, kw = p["w"]
    return n * co * oh * ow * cg * kh * kw


def estimate(p: dict, algo: str, filter_cached: bool = False, backend: str = "numba") -> float:
    """Estimated seconds for conv problem `p` (see conv_problem) by `algo` on `backend`."""
    n, c, h, w = p["x"]
    co, cg, kh, kw = p["w"]
    _, _, oh, ow = p["y"]
    g = p["groups"]
    flops = 2 * macs(p)
    t = OVERHEAD[algo]
    llvm = backend == "llvm"
    rates = LLVM_RATES if llvm else RATES
    gemm_threads = 1 if llvm else THREADS                     # Winograd's per-point GEMMs
    image_threads = (THREADS if p["op"] == "conv2d" else 1) if llvm else THREADS   # im2col's images
    if algo == "direct":
        return t + flops / rates["direct"]
    if algo == "im2col":
        cols = n * c * kh * kw * oh * ow      # elements of the column matrices
        return t + flops / (rates["gemm"] * min(n, image_threads)) + cols / rates["im2col"] \
            + co * cg * kh * kw / rates["weights"]
    if algo in WINOGRAD:
        m = WINOGRAD[algo]
        a2 = (m + 2) ** 2
        tiles = n * math.ceil((h if p["op"] == "conv2d_grad_input" else oh) / m) \
            * math.ceil((w if p["op"] == "conv2d_grad_input" else ow) / m)
        gemm = 2 * a2 * (co // g) * cg * g * tiles
        moved = a2 * tiles * (c + co)          # input tiles and products (or gradient tiles)
        if not filter_cached or p["op"] == "conv2d_grad_weight":
            moved += a2 * co * cg
        # F(4x4) transforms do more arithmetic per element than F(2x2)'s; every call streams the
        # transformed filters through the GEMMs (alpha^2 of them: what makes F(4x4) lose on 7x7)
        return t + gemm / (rates["gemm"] * gemm_threads) + a2 * co * cg / rates["weights"] \
            + moved * (1.0 if m == 2 else (3.0 if llvm else 1.6)) / rates["wino"]
    if algo == "fft":
        ph, pw = h + p["pad"][0] + p["pad"][2], w + p["pad"][1] + p["pad"][3]
        f = ph * pw
        spectra = n * c + co * cg + n * co
        transforms = spectra * 2.5 * f * math.log2(max(f, 2))
        products = 8 * n * co * cg * ph * (pw // 2 + 1)
        return t + transforms / rates["fft"] + products / rates["cgemm"]
    raise TdcError(f"internal: no cost for conv algorithm {algo!r}")


# ---- autotuning -------------------------------------------------------------------------------

def machine_id() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def cache_path() -> str:
    base = os.environ.get("TDC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tdc")
    return os.path.join(base, "autotune.json")


def cache_key(p: dict) -> str:
    return "|".join([p["op"], "x" + "x".join(map(str, p["x"])), "w" + "x".join(map(str, p["w"])),
                     f"s{p['stride']}", f"p{p['pad']}", f"d{p['dilation']}", f"g{p['groups']}", p["dtype"],
                     machine_id()]).replace(" ", "")


def read_cache(path: str | None = None) -> dict:
    path = path or cache_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_cache_entry(key: str, entry: dict, path: str | None = None) -> None:
    """Add one decision to the cache file (read, update, write to a temporary file, rename)."""
    from ..runtime.weights import atomic_write
    path = path or cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = read_cache(path)
    data[key] = entry
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode()))


def autotune_choice(node: Node, candidates: tuple[str, ...], backend: str = "numba") -> str:
    """The fastest of `candidates` for this node, measured on `backend` once and cached."""
    p = conv_problem(node)
    key = cache_key(p) + ("" if backend == "numba" else f"|{backend}")
    entry = read_cache().get(key)
    if entry and entry.get("algo") in candidates and all(c in entry.get("ms", {}) for c in candidates):
        return entry["algo"]
    if backend == "llvm":
        from ..backends.llvm.codegen import time_conv
    else:
        from ..backends.numba.conv_algos import time_conv
    times = dict(entry.get("ms", {})) if entry else {}
    for algo in candidates:
        if algo not in times:
            times[algo] = time_conv(node, algo) * 1e3
    best = min(candidates, key=lambda c: times[c])
    write_cache_entry(key, {"algo": best, "ms": times})
    return best


# ---- the pass ---------------------------------------------------------------------------------

def choose(node: Node, request: str, autotune: bool = False, filter_cached: bool = False,
           backend: str = "numba") -> tuple[str, str]:
    """(algorithm, note) for conv node `node` asked to use `request`, on `backend`."""
    ok = legal(node)
    if request in ok:
        return request, ""
    wino = tuple(a for a in ok if a in WINOGRAD)
    note = ""
    if request == "auto":
        wanted = ok
    elif request == "winograd" and wino:
        wanted = wino
    elif request in CONV_ALGOS:
        wanted = ok
        kh, kw = conv_problem(node)["w"][2:]
        a = node.attrs
        note = (f"{request} cannot compute a {kh}x{kw} kernel with stride {list(a['stride'])}, dilation "
                f"{list(a['dilation'])} (Winograd needs 3x3, stride 1, dilation 1)")
    else:
        raise TdcError(f"unknown conv algorithm {request!r}; choose from {', '.join(CONV_ALGOS)}")
    if autotune:
        best = autotune_choice(node, wanted, backend)
    else:
        p = conv_problem(node)
        best = min(wanted, key=lambda c: estimate(p, c, filter_cached and backend == "numba", backend))
    return best, (f"{note}; using {best}" if note else "")


def _filter_cached(graph: Graph, node: Node) -> bool:
    w = node.inputs[1] if node.op != "conv2d_grad_weight" else None
    return w is not None and w.is_arg and w.kind in ("param", "const") and not any(t is w for t, _ in graph.updates)


def select_conv_algos(graph: Graph, default: str = "auto", autotune: bool = False, backend: str = "numba") -> Graph:
    """Set `algo` on every conv node: its own request, else `default`, resolved as described above
    for `backend` (numba or llvm: their kernels differ, and so do their costs)."""
    if default not in CONV_ALGOS:
        raise TdcError(f"unknown conv algorithm {default!r}; choose from {', '.join(CONV_ALGOS)}")
    if backend not in BACKENDS:
        raise TdcError(f"conv_algo: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    g = graph.copy()
    for n in g.nodes:
        if n.op not in CONV_OPS:
            continue
        request = n.attrs["algo"] if n.attrs["algo"] != "auto" else default
        algo, note = choose(n, request, autotune, _filter_cached(g, n), backend)
        n.attrs = {**n.attrs, "algo": algo, "algo_note": note or n.attrs.get("algo_note", "")}
    return g


@register_pass("conv_algo")
def conv_algo(graph: Graph) -> Graph:
    """Pick an algorithm for every convolution (cost model; --autotune measures)."""
    return select_conv_algos(graph)


def request_conv_algo(graph: Graph, algo: str) -> Graph:
    """Ask for `algo` on every conv node that asks for nothing ("auto"); `--conv-algo ALGO`."""
    if algo not in CONV_ALGOS:
        raise TdcError(f"unknown conv algorithm {algo!r}; choose from {', '.join(CONV_ALGOS)}")
    if algo == "auto":
        return graph
    g = graph.copy()
    for n in g.nodes:
        if n.op in CONV_OPS and n.attrs["algo"] == "auto":
            n.attrs = {**n.attrs, "algo": algo}
    return g


def conv_choices(graph: Graph) -> list[tuple[str, str, str]]:
    """(op, algorithm, note) of every conv node, in order (for reports)."""
    return [(n.op, n.attrs["algo"], n.attrs.get("algo_note", "")) for n in graph.nodes if n.op in CONV_OPS]


__all__ = ["ALGORITHMS", "select_conv_algos", "request_conv_algo", "estimate", "choose", "conv_problem"]
