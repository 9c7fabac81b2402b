"""The conv_algo pass: an algorithm for every convolution (conv2d and its two backward ops).

Each conv node's `algo` attribute is what was asked for: "auto" (nothing: pick the cheapest),
"winograd" (F(2x2,3x3) or F(4x4,3x3), whichever is cheaper) or one algorithm (direct, im2col,
fft, winograd_f2, winograd_f4), set per layer in the DSL (`nn.conv2d(..., algo="fft")`) or for
every layer that asks for nothing by `--conv-algo` (`request_conv_algo`). The pass replaces it by
the algorithm to run. An algorithm that cannot compute the node (Winograd needs a 3x3 kernel,
stride 1 and dilation 1) is replaced by the cheapest legal one, and `algo_note` says so.

"Cheapest" is for the target the graph is compiled for (its kernels differ, so do their costs):
the analytic cost model below (arithmetic from the lecture's table, plus transform and memory
work), calibrated on this machine against the target's own kernels; or with autotune=True the
measured time of each candidate on the target, cached on disk per (op, shapes, stride, pad,
dilation, groups, dtype, machine, target) in `autotune.json` under the cache directory
(~/.cache/tdc, or $TDC_CACHE_DIR).
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..errors import TdcError
from ..files import cache_dir
from ..ir.graph import Graph, Node
from ..ir.types import TensorType
from ..ops.conv import ALGORITHMS, CONV_ALGOS, legal_algos
from .target import Target, machine_id, read_json, update_json

CONV_OPS = ("conv2d", "conv2d_grad_input", "conv2d_grad_weight")
WINOGRAD = {"winograd_f2": 2, "winograd_f4": 4}

# The model's structure: relative costs of the work each algorithm does. Seconds = work / rate;
# each target's calibration then fits, per algorithm, a scale of this modelled time and a fixed
# overhead to its own kernels on this machine (calibrate_conv), so only the ratios inside one
# algorithm's formula come from here.
NOMINAL = {
    "gemm": 40e9,          # flop/s of one thread's BLAS GEMM
    "weights": 1.0e9,      # elements/s of GEMM operands packed once per call (filters, transformed filters)
    "direct": 8e9,         # flop/s of the direct loop nest
    "im2col": 1.2e9,       # elements/s gathered into (or scattered from) im2col columns
    "wino": 1.0e9,         # transformed elements/s (tiles in, products out, filters)
    "fft": 1.5e9,          # flop/s of the transforms (5 n log2 n per complex transform, half for real)
    "cgemm": 20e9,         # flop/s of the complex per-frequency products
}
# The conv2d layers the calibration times every algorithm on (3x3, stride 1: every algorithm can
# compute them): one where fixed costs dominate, one where the arithmetic does, and one of many
# small planes, where the per-plane work of transforms and loop setup does.
PROBES = (((1, 4, 8, 8), (4, 4, 3, 3)), ((1, 64, 28, 28), (64, 64, 3, 3)), ((16, 16, 8, 8), (16, 16, 3, 3)))


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


def modelled(p: dict, algo: str, target: Target, filter_cached: bool = False) -> float:
    """The analytic time of conv problem `p` (see conv_problem) by `algo` on `target`, before
    calibration: arithmetic from the lecture's table plus transform and memory work."""
    n, c, h, w = p["x"]
    co, cg, kh, kw = p["w"]
    _, _, oh, ow = p["y"]
    g = p["groups"]
    flops = 2 * macs(p)
    r = NOMINAL
    if algo == "direct":
        if not (target.direct_padded_grid and tuple(p["stride"]) == (1, 1) and tuple(p["dilation"]) == (1, 1)):
            return flops / r["direct"]
        # every point of the padded plane is computed (the gradient's: of the input plane padded
        # by the kernel), and the images are split over the threads
        pt, pl, pb, pr = p["pad"]
        if p["op"] == "conv2d_grad_input":
            grid = h * (w + kw - 1) / (h * w)
        else:
            grid = max(h + pt + pb, oh + kh - 1) * max(w + pl + pr, ow + kw - 1) / (oh * ow)
        cost = target.direct_grad_weight_cost if p["op"] == "conv2d_grad_weight" else 1.0
        return flops * grid * cost / r["direct"] / min(n, target.threads())
    if algo == "im2col":
        cols = n * c * kh * kw * oh * ow      # elements of the column matrices
        # images are split over threads: each gathers its columns and runs its GEMM
        return (flops / r["gemm"] + cols / r["im2col"]) / min(n, target.image_threads(p["op"])) \
            + co * cg * kh * kw / r["weights"]
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
        return gemm / (r["gemm"] * target.gemm_threads()) + a2 * co * cg / r["weights"] \
            + moved * (1.0 if m == 2 else target.wino_f4_transform_cost) / r["wino"]
    if algo == "fft":
        ph, pw = h + p["pad"][0] + p["pad"][2], w + p["pad"][1] + p["pad"][3]
        f = ph * pw
        spectra = n * c + co * cg + n * co
        transforms = spectra * 2.5 * f * math.log2(max(f, 2))
        products = 8 * n * co * cg * ph * (pw // 2 + 1)
        return transforms / r["fft"] + products / r["cgemm"]
    raise TdcError(f"internal: no cost for conv algorithm {algo!r}")


def planes(p: dict) -> int:
    """Image planes the kernels visit (input and output channels of every image): what per-task
    costs scale with."""
    n, c = p["x"][:2]
    return n * (c + p["y"][1])


def estimate(p: dict, algo: str, target: Target, filter_cached: bool = False) -> float:
    """Estimated seconds for conv problem `p` by `algo` on `target`: the modelled time, scaled and
    offset by what the target's calibration on this machine found."""
    overhead, scale, per_plane = target.rates().conv[algo]
    return overhead + scale * modelled(p, algo, target, filter_cached and target.caches_filter_transforms) \
        + per_plane * planes(p)


def probe_node(x_shape, w_shape) -> Node:
    g = Graph("probe")
    x = g.add_arg("x", TensorType("f32", x_shape), "input")
    w = g.add_arg("w", TensorType("f32", w_shape), "param")
    g.emit("conv2d", [x, w], {"pad": (1, 1, 1, 1)})
    return g.nodes[0]


def calibrate_conv(target: Target) -> dict[str, tuple[float, float, float]]:
    """(overhead, scale, per-plane seconds) per algorithm: the non-negative coefficients for which
    overhead + scale * modelled time + per_plane * planes best matches (in relative error) the
    target's kernels timed on the probe layers."""
    nodes = [probe_node(*shapes) for shapes in PROBES]
    fits = {}
    for algo in ALGORITHMS:
        rows = [(1.0, modelled(conv_problem(n), algo, target), planes(conv_problem(n))) for n in nodes]
        measured = [target.time_conv(n, algo) for n in nodes]
        fits[algo] = nonnegative_fit(rows, measured)
    return fits


def nonnegative_fit(rows, measured) -> tuple[float, ...]:
    """Non-negative coefficients c minimising sum((rows . c - m) / m)^2: least squares over every
    subset of the columns, keeping the best fit whose coefficients are all >= 0."""
    a = np.array(rows, float) / np.array(measured, float)[:, None]
    ones = np.ones(len(measured))
    best, best_err = None, float("inf")
    k = a.shape[1]
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        c, *_ = np.linalg.lstsq(a[:, cols], ones, rcond=None)
        if (c < 0).any():
            continue
        err = float(np.sum((a[:, cols] @ c - ones) ** 2))
        if err < best_err:
            full = np.zeros(k)
            full[cols] = c
            best, best_err = full, err
    return tuple(float(x) for x in best)


# ---- autotuning -------------------------------------------------------------------------------

def cache_path() -> str:
    return os.path.join(cache_dir(), "autotune.json")


def cache_key(p: dict) -> str:
    return "|".join([p["op"], "x" + "x".join(map(str, p["x"])), "w" + "x".join(map(str, p["w"])),
                     f"s{p['stride']}", f"p{p['pad']}", f"d{p['dilation']}", f"g{p['groups']}", p["dtype"],
                     machine_id()]).replace(" ", "")


def read_cache(path: str | None = None) -> dict:
    return read_json(path or cache_path())


def autotune_choice(node: Node, candidates: tuple[str, ...], target: Target) -> str:
    """The fastest of `candidates` for this node, measured on `target` once and cached."""
    p = conv_problem(node)
    key = cache_key(p) + ("" if target.name == "numba" else f"|{target.name}")
    entry = read_cache().get(key)
    if entry and entry.get("algo") in candidates and all(c in entry.get("ms", {}) for c in candidates):
        return entry["algo"]
    times = dict(entry.get("ms", {})) if entry else {}
    for algo in candidates:
        if algo not in times:
            times[algo] = target.time_conv(node, algo) * 1e3
    best = min(candidates, key=lambda c: times[c])
    update_json(cache_path(), key, {"algo": best, "ms": times})
    return best


# ---- the pass ---------------------------------------------------------------------------------

def choose(node: Node, request: str, target: Target, autotune: bool = False,
           filter_cached: bool = False) -> tuple[str, str]:
    """(algorithm, note) for conv node `node` asked to use `request`, on `target`."""
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
        best = autotune_choice(node, wanted, target)
    else:
        p = conv_problem(node)
        best = min(wanted, key=lambda c: estimate(p, c, target, filter_cached))
    return best, (f"{note}; using {best}" if note else "")


def _filter_cached(graph: Graph, node: Node) -> bool:
    w = node.inputs[1] if node.op != "conv2d_grad_weight" else None
    return w is not None and w.is_arg and w.kind in ("param", "const") and not any(t is w for t, _ in graph.updates)


def select_conv_algos(graph: Graph, target: Target, default: str = "auto", autotune: bool = False) -> Graph:
    """Set `algo` on every conv node: its own request, else `default`, resolved as described above
    for `target`."""
    if default not in CONV_ALGOS:
        raise TdcError(f"unknown conv algorithm {default!r}; choose from {', '.join(CONV_ALGOS)}")
    g = graph.copy()
    for n in g.nodes:
        if n.op not in CONV_OPS:
            continue
        request = n.attrs["algo"] if n.attrs["algo"] != "auto" else default
        algo, note = choose(n, request, target, autotune, _filter_cached(g, n))
        n.attrs = {**n.attrs, "algo": algo, "algo_note": note or n.attrs.get("algo_note", "")}
    return g


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


__all__ = ["ALGORITHMS", "select_conv_algos", "request_conv_algo", "estimate", "choose", "conv_problem",
           "calibrate_conv", "machine_id"]
