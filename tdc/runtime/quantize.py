"""Post-training int8 quantization end to end: calibrate a float inference graph on sample
inputs, then rewrite it (tdc/passes/quantize.py)."""
from __future__ import annotations

import numpy as np

from ..backends import compile as compile_graph
from ..errors import TdcError
from ..ir.graph import Graph
from ..passes.quantize import observed, quantize_int8

DEFAULT_CALIBRATION_SAMPLES = 256


def calibrate(graph: Graph, params: dict[str, np.ndarray], x: np.ndarray, backend: str = "llvm") -> dict:
    """{value: (min, max)} of the values quantize_int8 needs, over the samples x (dim 0), run in
    batches of the graph's input batch; a last partial batch is padded with repeats of its own
    samples (which leaves the ranges unchanged)."""
    if len(graph.inputs) != 1:
        raise TdcError(f"quantize: calibration feeds one input, the graph has {len(graph.inputs)}")
    (inp,) = graph.inputs
    want = observed(graph)
    if not want:
        raise TdcError("quantize: the graph has no linear or conv2d layer with param weights to quantize")
    g, vmap = graph.map_copy()
    for i, v in enumerate(want):
        g.add_output(f"__observed{i}", vmap[v])
    exe = compile_graph(g, backend=backend, params=params)
    batch = inp.type.shape[0]
    x = np.asarray(x, inp.type.np_dtype)
    if x.ndim != inp.type.rank or x.shape[1:] != inp.type.shape[1:] or len(x) == 0:
        raise TdcError(f"quantize: calibration samples must be [n, {', '.join(map(str, inp.type.shape[1:]))}], "
                       f"got {list(x.shape)}")
    lo = np.full(len(want), np.inf)
    hi = np.full(len(want), -np.inf)
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        if len(xb) < batch:
            xb = np.concatenate([xb, xb[np.arange(batch - len(xb)) % len(xb)]])
        out = exe(**{inp.name: xb})
        for i in range(len(want)):
            o = out[f"__observed{i}"]
            lo[i], hi[i] = min(lo[i], float(o.min())), max(hi[i], float(o.max()))
    return {v: (lo[i], hi[i]) for i, v in enumerate(want)}


def quantize_model(graph: Graph, params: dict[str, np.ndarray], x: np.ndarray, backend: str = "llvm"):
    """(int8 graph, its params) calibrated on samples x."""
    return quantize_int8(graph, params, calibrate(graph, params, x, backend))
