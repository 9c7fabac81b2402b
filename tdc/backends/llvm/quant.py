"""How the int8 ops (tdc/ops/quant.py) and maxpool2d on i8 and u8 call the C runtime (runtime/quant.c).

Arguments follow `codegen.library_call`'s kinds. qlinear weights that are literals (`constant`
nodes) are packed here, at compile time, into the layout quant.c's GEMM reads; weights given
at run time (graph args) are packed by the kernel on every call.
"""
from __future__ import annotations

import numpy as np

from ...errors import TdcError
from ...ir.graph import Node
from ...ops.common import norm_axis
from ...ops.quant import multipliers

# op -> the dtype of its first input that the runtime implements
INT8_LIBRARY = {"quantize": "f32", "dequantize": "i8", "qlinear": "i8", "qconv2d": "i8", "maxpool2d": "i8",
                "fake_quant": "f32", "fake_quant_grad": "f32"}
QV = 16   # output channels per packed block (quant.c's QV)


def supports(node: Node) -> bool:
    dt = node.inputs[0].type.dtype
    return INT8_LIBRARY.get(node.op) == dt or (node.op == "maxpool2d" and dt == "u8")


def pack_weights(w: np.ndarray) -> np.ndarray:
    """quant.c's packed weights for w [N, K] (i8): [ceil(N/16)][ceil(K/4)][16][4] bytes (zero
    padded), then sum_k w[c, k] as int64 for each of the ceil(N/16) * 16 channels."""
    n, k = w.shape
    nv, ng = -(-n // QV), -(-max(k, 1) // 4)
    full = np.zeros((nv * QV, ng * 4), np.int8)
    full[:n, :k] = w
    packed = full.reshape(nv, QV, ng, 4).transpose(0, 2, 1, 3)
    wsum = full.astype(np.int64).sum(1)
    return np.concatenate([np.ascontiguousarray(packed).reshape(-1).view(np.uint8), wsum.view(np.uint8)])


def _literal(v) -> np.ndarray | None:
    n = v.producer
    return np.asarray(n.attrs["value"]) if n is not None and n.op == "constant" else None


def _affine_tables(node: Node):
    a = node.attrs
    x = node.inputs[0].type
    n = max(len(a["scale"]), len(a["zero_point"]))
    if n > 1:
        ax = norm_axis(a["axis"], x.rank)
        inner = int(np.prod(x.shape[ax + 1:], dtype=np.int64))
    else:
        inner = 1
    scale = np.broadcast_to(np.asarray(a["scale"], np.float32), (n,)).copy()
    zero = np.broadcast_to(np.asarray(a["zero_point"], np.int32), (n,)).copy()
    return [("i64", x.size), ("i64", inner), ("i64", n), ("table", scale), ("table", zero)]


def quant_call(node: Node, window) -> tuple[str, list]:
    """(C function, arguments) for an int8 op; `window` is codegen's pooling geometry helper."""
    a, op = node.attrs, node.op
    ins = [v.type.shape for v in node.inputs]
    I = [("in", k) for k in range(len(node.inputs))]
    bias = (I[2], ("i64", 1)) if len(ins) == 3 else (I[0], ("i64", 0))
    if op == "quantize":
        return "tdc_quantize_f32", [I[0], ("out", 0), *_affine_tables(node)]
    if op == "dequantize":
        return "tdc_dequantize_i8", [I[0], ("out", 0), *_affine_tables(node)]
    if op in ("fake_quant", "fake_quant_grad"):
        n_data = 1 if op == "fake_quant" else 2
        if len(I) == n_data:
            grid = _affine_tables(node)
        else:     # scale and zero point computed in the graph (QAT): the kernel reads their buffers
            x = node.inputs[0].type
            nc = node.inputs[n_data].type.shape[0]
            inner = int(np.prod(x.shape[norm_axis(a["axis"], x.rank) + 1:], dtype=np.int64)) if nc > 1 else 1
            grid = [("i64", x.size), ("i64", inner), ("i64", nc), *I[n_data:]]
        return f"tdc_{op}_f32", [*I[:n_data], ("out", 0), *grid, ("i64", a["qmin"]), ("i64", a["qmax"])]
    if op == "maxpool2d":
        return f"tdc_maxpool2d_{node.inputs[0].type.dtype}", [I[0], ("out", 0), *[("i64", x) for x in window(node, ins[0], node.outputs[0].type.shape)]]
    tail = [("i64", a["x_zero"]), ("i64", a["y_zero"]), ("i64", int(a["relu"])), ("i64", int(a["out"] == "f32"))]
    if op == "qlinear":
        n_out, k = ins[1]
        m = int(np.prod(ins[0][:-1], dtype=np.int64))
        w = _literal(node.inputs[1])
        packed = [("table", pack_weights(w)), ("i64", 1)] if w is not None else [I[1], ("i64", 0)]
        return "tdc_qlinear_i8", [I[0], I[1], *bias, *packed, ("table", multipliers(a, n_out)), ("out", 0),
                                  ("i64", m), ("i64", k), ("i64", n_out), *tail]
    if op == "qconv2d":
        n, c, h, wd = ins[0]
        co, _, kh, kw = ins[1]
        oh, ow = node.outputs[0].type.shape[2:]
        geo = [n, c, h, wd, co, kh, kw, oh, ow, a["stride"][0], a["stride"][1], a["pad"][0], a["pad"][1],
               a["pad"][2], a["pad"][3], a["dilation"][0], a["dilation"][1], a["groups"]]
        return "tdc_qconv2d_i8", [I[0], I[1], *bias, ("table", multipliers(a, co)), ("out", 0),
                                  *[("i64", x) for x in geo], *tail]
    raise TdcError(f"llvm backend: no int8 runtime kernel for {op}")
