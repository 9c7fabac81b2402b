"""Post-training int8 quantization of an inference graph, and fake-quant nodes for
quantization-aware training.

`quantize_int8(graph, params, ranges)` rewrites every linear and conv2d whose weight (and bias)
are params or consts into qlinear / qconv2d (tdc/ops/quant.py):
  * weights per output channel, symmetric: s[o] = max|w[o]| / 127, w_q = rint(w / s) in [-127, 127];
  * biases as int32 with scale x_scale * s[o];
  * activations per tensor, affine over the calibrated [min, max] (widened to hold 0, so that
    zero-padding and relu are exact): scale = (max - min) / 255, zero point -128 - rint(min / scale).
A relu that is the only user of a layer's output is fused into the layer (its output range is
the relu's). maxpool2d, flatten and reshape of a quantized value run on its int8 codes (they
commute with an affine map of positive scale). The first layer's input gets a `quantize`; a
layer whose output no int8 op reads dequantizes in its epilogue (out="f32"); any other float
consumer of an int8 value gets a `dequantize`. Everything else is copied unchanged.

The ranges come from running the float graph on calibration inputs: `observed(graph)` names the
values whose [min, max] the rewrite needs; the caller runs the graph (any backend) and passes
{value name or Value: (min, max)} (tdc/runtime/quantize.py does this).

`insert_fake_quant(graph, ranges)` (QAT) puts fake_quant on every such activation and on the
weights of the same layers (per output channel), so training sees the rounding and clamping of
the int8 graph, with straight-through gradients.
"""
from __future__ import annotations

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, Value
from ..ir.types import TensorType
from ..ops.quant import QMAX, QMIN, WMAX

LAYERS = ("conv2d", "linear")
CODE_OPS = ("maxpool2d", "flatten", "reshape")   # run on int8 codes unchanged
GEOMETRY = ("stride", "pad", "dilation", "groups")


def _weight_args(node) -> bool:
    return all(v.is_arg and v.kind in ("param", "const") for v in node.inputs[1:])


def _fused_relu(graph: Graph, node, users):
    """The relu node that is the only user of `node`'s output, if any (and not a graph output)."""
    out = node.outputs[0]
    us = users.get(out, [])
    if len(us) == 1 and us[0].op == "relu" and all(v is not out for _, v in graph.outputs):
        return us[0]
    return None


def observed(graph: Graph) -> list[Value]:
    """The float values whose calibrated ranges quantize_int8 needs: each quantizable layer's
    input and its output (after a fused relu)."""
    users = graph.users()
    seen, out = set(), []
    for n in graph.nodes:
        if n.op in LAYERS and _weight_args(n):
            relu = _fused_relu(graph, n, users)
            for v in (n.inputs[0], (relu or n).outputs[0]):
                if v not in seen:
                    seen.add(v)
                    out.append(v)
    return out


def activation_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of the affine int8 map covering [lo, hi] and 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise TdcError(f"quantize: a calibrated range is not finite ([{lo}, {hi}])")
    if hi - lo <= 0:
        return 1.0, 0
    scale = (hi - lo) / (QMAX - QMIN)
    zero = int(np.clip(QMIN - np.rint(lo / scale), QMIN, QMAX))
    return scale, zero


def weight_params(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, per-output-channel scales) of w [out, ...], symmetric."""
    w = np.asarray(w, np.float64)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(1) if w.size else np.zeros(w.shape[0])
    scale = np.where(amax > 0, amax / WMAX, 1.0)
    q = np.clip(np.rint(w / scale.reshape((-1,) + (1,) * (w.ndim - 1))), -WMAX, WMAX).astype(np.int8)
    return q, scale


def _range(ranges: dict, v: Value):
    r = ranges.get(v, ranges.get(v.name)) if v.name is not None else ranges.get(v)
    if r is None:
        raise TdcError(f"quantize: no calibrated range for {v.name or 'a value'} {v.type}")
    return r


def quantize_int8(graph: Graph, params: dict[str, np.ndarray], ranges: dict) -> tuple[Graph, dict[str, np.ndarray]]:
    """The int8 graph and its params (the quantized weights as consts, the float params it still
    reads). `ranges` maps the values of `observed(graph)` (or their names) to (min, max)."""
    for n in graph.nodes:
        if n.opdef.family in ("quant",) or graph.updates:
            raise TdcError("quantize: the graph must be a float inference graph (no updates, no int8 ops)")
    users = graph.users()
    g = Graph(graph.name)
    new_params: dict[str, np.ndarray] = {}
    vmap: dict[Value, Value] = {}
    codes: dict[Value, tuple[Value, float, int]] = {}   # float value -> (its int8 value, scale, zero)
    deq: dict[Value, Value] = {}
    skip: set = set()                                   # relus fused into their layer

    for a in graph.args:
        if a.kind == "input":
            vmap[a] = g.add_arg(a.name, a.type, a.kind, a.attrs)

    def arg(v: Value) -> Value:
        if v not in vmap:     # a param or const still read in float
            vmap[v] = g.add_arg(v.name, v.type, v.kind, v.attrs)
            if v.name in params:
                new_params[v.name] = params[v.name]
        return vmap[v]

    def as_float(v: Value) -> Value:
        if v in vmap:
            return vmap[v]
        if v.is_arg:
            return arg(v)
        if v not in deq:
            q, s, z = codes[v]
            (deq[v],) = g.emit("dequantize", [q], {"scale": [s], "zero_point": [z]})
        return deq[v]

    def as_codes(v: Value) -> tuple[Value, float, int]:
        if v not in codes:
            s, z = activation_params(*_range(ranges, v))
            (q,) = g.emit("quantize", [as_float(v)], {"scale": [s], "zero_point": [z]})
            codes[v] = (q, s, z)
        return codes[v]

    def reads_codes(v: Value) -> bool:
        """Whether some user of v consumes int8 codes (directly or through pooling / flattening)."""
        for u in users.get(v, []):
            if (u.op in LAYERS and _weight_args(u) and u.inputs[0] is v) or \
                    (u.op in CODE_OPS and reads_codes(u.outputs[0])):
                return True
        return False

    for n in graph.nodes:
        if n in skip:
            continue
        if n.op in LAYERS and _weight_args(n):
            for v in n.inputs[1:]:
                if v.name not in params:
                    raise TdcError(f"quantize: no value for {v.name} (give the trained weights)")
            relu = _fused_relu(graph, n, users)
            last = (relu or n).outputs[0]
            xq, sx, zx = as_codes(n.inputs[0])
            wq, ws = weight_params(params[n.inputs[1].name])
            base = n.inputs[1].name.rsplit(".", 1)[0] if "." in n.inputs[1].name else n.inputs[1].name
            ins = [xq, g.add_arg(f"{base}.weight_q", _t("i8", wq.shape), "const")]
            new_params[ins[1].name] = wq
            if len(n.inputs) == 3:
                b = np.asarray(params[n.inputs[2].name], np.float64)
                bq = np.clip(np.rint(b / (sx * ws)), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
                ins.append(g.add_arg(f"{base}.bias_q", _t("i32", bq.shape), "const"))
                new_params[ins[2].name] = bq
            to_codes = reads_codes(last) and last not in [v for _, v in graph.outputs]
            attrs = {"x_scale": sx, "x_zero": zx, "w_scale": [float(s) for s in ws], "relu": relu is not None,
                     "out": "i8" if to_codes else "f32"}
            if to_codes:
                sy, zy = activation_params(*_range(ranges, last))
                attrs.update(y_scale=sy, y_zero=zy)
            if n.op == "conv2d":
                attrs.update({k: n.attrs[k] for k in GEOMETRY})
            (y,) = g.emit("qconv2d" if n.op == "conv2d" else "qlinear", ins, attrs, n.placement, n.loc)
            if to_codes:
                codes[last] = (y, sy, zy)
            else:
                vmap[last] = y
            if relu is not None:
                skip.add(relu)
            continue
        if n.op in CODE_OPS and n.inputs[0] in codes and n.inputs[0] not in vmap:
            q, s, z = codes[n.inputs[0]]
            (y,) = g.emit(n.op, [q], n.attrs, n.placement, n.loc)
            codes[n.outputs[0]] = (y, s, z)
            continue
        outs = g.emit(n.op, [as_float(v) for v in n.inputs], n.attrs, n.placement, n.loc,
                      names=[v.name for v in n.outputs])
        vmap.update(zip(n.outputs, outs))
    for name, v in graph.outputs:
        g.add_output(name, as_float(v))
    return g, new_params


def _t(dtype, shape) -> TensorType:
    return TensorType(dtype, tuple(shape))
