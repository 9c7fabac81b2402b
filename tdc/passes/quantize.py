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

`insert_fake_quant(graph)` (quantization-aware training) puts fake_quant on the training-mode
forward graph, before autodiff, wherever the int8 graph rounds: on the weights of the same layers
(per output channel, symmetric, the scales recomputed in the graph from the current weights every
step) and on the activations the int8 graph quantizes (`quant_points`), per tensor over a range
kept as state: an exponential moving average of the batches' min and max (PyTorch's moving-average
observer; the first batch sets it), updated by the step like batchnorm's running statistics.
Training thus sees the int8 graph's rounding and clamping, with straight-through gradients.
The learned ranges are saved with the weights (LAYER.in_range, LAYER.out_range: f32[2] lo, hi);
`learned_ranges(graph, params)` gives quantize_int8 its ranges from them instead of calibration.
"""
from __future__ import annotations

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, Value
from ..ir.types import TensorType
from ..ops.quant import QMAX, QMIN, WMAX
from ..ops.tensor import Builder, Tensor

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


def layer_name(node) -> str:
    """A layer's name: its weight param's, without the last component (conv1.weight -> conv1)."""
    w = node.inputs[1].name
    return w.rsplit(".", 1)[0] if "." in w else w


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
            base = layer_name(n)
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


# ---- the activations the int8 graph quantizes, and quantization-aware training ------------------

RANGE_SUFFIXES = (".in_range", ".out_range")
OBSERVED = "qat.observed"    # state: 0 before the first step (which sets the ranges), then 1
EMA = 0.01                    # weight of each batch in the running ranges (PyTorch's averaging constant)


def quant_points(graph: Graph) -> list[tuple[Value, str, list | None]]:
    """(value, the name of its range, the layers reading it in int8 or None for every reader) of
    each activation quantize_int8 rounds: a layer's input quantized from float (only that layer
    reads the codes) and a layer's output requantized to i8 (every reader sees the codes), in
    graph order. Values reached from codes through maxpool, flatten or reshape keep their scale."""
    users = graph.users()
    outputs = {v for _, v in graph.outputs}
    coded: set = set()
    points: dict[Value, tuple[str, list | None]] = {}

    def reads_codes(v: Value) -> bool:
        return any((u.op in LAYERS and _weight_args(u) and u.inputs[0] is v)
                   or (u.op in CODE_OPS and reads_codes(u.outputs[0])) for u in users.get(v, []))

    for n in graph.nodes:
        if n.op in CODE_OPS and n.inputs[0] in coded:
            coded.add(n.outputs[0])
        if not (n.op in LAYERS and _weight_args(n)):
            continue
        x = n.inputs[0]
        if x not in coded:
            points.setdefault(x, (layer_name(n) + RANGE_SUFFIXES[0], []))[1].append(n)
        relu = _fused_relu(graph, n, users)
        last = (relu or n).outputs[0]
        if reads_codes(last) and last not in outputs:
            coded.add(last)
            points[last] = (layer_name(n) + RANGE_SUFFIXES[1], None)
    return [(v, name, readers) for v, (name, readers) in points.items()]


def learned_ranges(graph: Graph, params: dict) -> dict | None:
    """{value: (lo, hi)} for quantize_int8 from the ranges QAT saved with the weights, or None
    when the weights hold none of them."""
    points = quant_points(graph)
    have = [name in params for _, name, _ in points]
    if not any(have):
        return None
    if not all(have):
        missing = ", ".join(name for (_, name, _), h in zip(points, have) if not h)
        raise TdcError(f"quantize: the weights hold QAT ranges but not {missing} (trained on another model?)")
    ranges = {}
    for v, name, _ in points:
        r = np.asarray(params[name], np.float64).reshape(-1)
        if r.shape != (2,) or not np.isfinite(r).all():
            raise TdcError(f"quantize: {name} must be two finite numbers (lo, hi), got {r.tolist()}")
        ranges[v] = (float(r[0]), float(r[1]))
    return ranges


def _fake_weight(w: Tensor) -> Tensor:
    """w fake-quantized per output channel (dim 0), symmetric in [-127, 127], with the scales of
    the current values (weight_params' rule, in float32)."""
    b = w.builder
    amax = b.apply("reduce_max", [abs(w)], {"axes": list(range(1, w.ndim))})
    scale = b.apply("where", [amax > 0.0, amax / float(WMAX), 1.0])
    zero = b.constant(np.zeros(w.shape[0], np.int32))
    return b.apply("fake_quant", [w, scale, zero], {"axis": 0, "qmin": -WMAX, "qmax": WMAX})


def _fake_activation(x: Tensor, state: Tensor, first: Tensor, ema: float) -> tuple[Tensor, Tensor]:
    """(x fake-quantized per tensor over the running range, the range's new value): the range
    is the batch's [min, max] at the first step, then moves by `ema` towards each batch's, and
    scale and zero point follow activation_params' rule (the range widened to hold 0)."""
    b = x.builder
    lo_b = b.apply("neg", [b.apply("reduce_max", [-x], {"axes": None})])
    hi_b = b.apply("reduce_max", [x], {"axes": None})
    batch = b.apply("concat", [b.apply("reshape", [lo_b], {"shape": [1]}),
                               b.apply("reshape", [hi_b], {"shape": [1]})], {"axis": 0})
    new = b.apply("where", [first, batch, state * (1.0 - ema) + batch * ema])
    lo = b.apply("minimum", [new[0:1], 0.0])
    hi = b.apply("maximum", [new[1:2], 0.0])
    width = hi - lo
    scale = b.apply("where", [width > 0.0, width / float(QMAX - QMIN), 1.0])
    # QMIN - round(lo / scale), lo <= 0: the cast truncates the non-negative 0.5 - lo / scale
    up = b.apply("cast", [b.apply("minimum", [0.5 - lo / scale, float(QMAX - QMIN)])], {"to": "i32"})
    zero = up + QMIN
    return b.apply("fake_quant", [x, scale, zero], {"qmin": QMIN, "qmax": QMAX}), new


def insert_fake_quant(graph: Graph, ema: float = EMA) -> Graph:
    """The training-mode forward graph with fake_quant on the weights of every linear and conv2d
    with param weights and on the activations quant_points names, and the updates of their
    running ranges (state LAYER.in_range / LAYER.out_range, and qat.observed)."""
    if not 0 < ema <= 1:
        raise TdcError(f"QAT: the moving average's weight must be in (0, 1], got {ema}")
    g, _ = graph.map_copy()
    layers = [n for n in g.nodes if n.op in LAYERS and _weight_args(n) and n.inputs[1].kind == "param"]
    if not layers:
        raise TdcError(f"QAT: graph {g.name} has no linear or conv2d layer with param weights to quantize")
    points = quant_points(g)
    original = set(g.nodes)
    with Builder(g, training=True) as b:
        observed = b.arg(OBSERVED, TensorType("f32", ()), "state", init="zeros")
        first = observed.eq(0.0)
        fake: dict[Value, Value] = {}
        for n in layers:
            w = n.inputs[1]
            if w not in fake:
                fake[w] = _fake_weight(Tensor(w, b)).value
            n.inputs[1] = fake[w]
        for v, name, readers in points:
            state = b.arg(name, TensorType("f32", (2,)), "state", init="zeros")
            fq, new = _fake_activation(Tensor(v, b), state, first, ema)
            g.add_update(state.value, new.value)
            for n in (readers if readers is not None else original):
                if n in original:
                    n.inputs = [fq.value if u is v else u for u in n.inputs]
        g.add_update(observed.value, b.constant(np.float32(1.0)).value)
    g.toposort()
    return g
