"""conv2d, pooling and their backward ops: against explicit loops, finite differences
and adjoint identities, plus shape errors and dtypes."""
import math
import time
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tdc.backends.reference import run
from tdc.errors import ShapeError
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ir.opdef import get_op

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rng(seed=0):
    return np.random.default_rng(seed)


def graph_of(fn, *arrays):
    """Trace fn over one input arg per array; returns (graph, feed, output tensor)."""
    g = Graph("t")
    with Builder(g) as b:
        args = [b.arg(f"a{i}", TensorType.of(a), "input") for i, a in enumerate(arrays)]
        y = fn(*args)
    return g, {t.value: a for t, a in zip(args, arrays)}, y


def run_fn(fn, *arrays):
    g, feed, y = graph_of(fn, *arrays)
    return run(g, feed)[y.value]


def run_op(op, *arrays, **attrs):
    return run_fn(lambda *ts: F.apply(op, *ts, **attrs), *arrays)


def ref(op, *arrays, **attrs):
    """The op's reference semantics called directly (attributes normalized as the IR would)."""
    opdef = get_op(op)
    return opdef.ref(*arrays, **opdef.normalize_attrs(attrs))


# ---- independent loop implementations --------------------------------------------------

def out_len(n, k, s, d, lo, hi, ceil_mode=False):
    q = (n + lo + hi - (d * (k - 1) + 1)) / s
    o = (math.ceil(q) if ceil_mode else math.floor(q)) + 1
    if ceil_mode and (o - 1) * s >= n + lo:
        o -= 1
    return o


def conv_loops(x, w, b, stride, pad, dilation, groups):
    N, C, H, W = x.shape
    Co, Cg, kh, kw = w.shape
    t, l, bo, r = pad
    OH = out_len(H, kh, stride[0], dilation[0], t, bo)
    OW = out_len(W, kw, stride[1], dilation[1], l, r)
    cog = Co // groups
    out = np.zeros((N, Co, OH, OW))
    for n in range(N):
        for co in range(Co):
            grp = co // cog
            for oy in range(OH):
                for ox in range(OW):
                    acc = 0.0 if b is None else b[co]
                    for ci in range(Cg):
                        for i in range(kh):
                            for j in range(kw):
                                y = oy * stride[0] + i * dilation[0] - t
                                xx = ox * stride[1] + j * dilation[1] - l
                                if 0 <= y < H and 0 <= xx < W:
                                    acc += x[n, grp * Cg + ci, y, xx] * w[co, ci, i, j]
                    out[n, co, oy, ox] = acc
    return out


def pool_loops(x, kind, kernel, stride, pad, dilation=(1, 1), ceil_mode=False, count_include_pad=False):
    N, C, H, W = x.shape
    t, l, bo, r = pad
    OH = out_len(H, kernel[0], stride[0], dilation[0], t, bo, ceil_mode)
    OW = out_len(W, kernel[1], stride[1], dilation[1], l, r, ceil_mode)
    out = np.zeros((N, C, OH, OW))
    for n in range(N):
        for c in range(C):
            for oy in range(OH):
                for ox in range(OW):
                    vals, count = [], 0
                    for i in range(kernel[0]):
                        for j in range(kernel[1]):
                            py = oy * stride[0] + i * dilation[0]   # in padded coordinates
                            px = ox * stride[1] + j * dilation[1]
                            if py >= H + t + bo or px >= W + l + r:
                                continue   # past the padded input (ceil_mode): never counted
                            real = t <= py < t + H and l <= px < l + W
                            if real:
                                vals.append(x[n, c, py - t, px - l])
                            if real or count_include_pad:
                                count += 1
                    out[n, c, oy, ox] = max(vals) if kind == "max" else sum(vals) / count
    return out


# ---- gradient checking ----------------------------------------------------------------------

def numeric_vjp(f, arrays, i, h, eps=1e-4):
    """Central differences of <f(arrays), h> w.r.t. arrays[i]."""
    x = arrays[i]
    grad = np.zeros_like(x)
    for k in np.ndindex(x.shape):
        plus = [a.copy() for a in arrays]
        minus = [a.copy() for a in arrays]
        plus[i][k] += eps
        minus[i][k] -= eps
        grad[k] = (np.vdot(f(*plus), h) - np.vdot(f(*minus), h)) / (2 * eps)
    return grad


def check_grad_rule(op, arrays, attrs, seed=0, eps=1e-4):
    """Apply op's grad rule in a graph and compare each input gradient with finite differences."""
    opdef = get_op(op)
    g = Graph("grad")
    with Builder(g) as b:
        args = [b.arg(f"a{i}", TensorType.of(a), "input") for i, a in enumerate(arrays)]
        y = F.apply(op, *args, **attrs)
        gy = b.arg("gy", y.type, "input")
        node = y.value.producer
        ctx = types.SimpleNamespace(g=gy, gs=[gy], out=y, outs=[y], attrs=node.attrs)
        grads = opdef.grad(ctx, *args)
    assert len(grads) == len(arrays)
    h = rng(seed).standard_normal(y.shape)
    feed = {t.value: a for t, a in zip(args, arrays)}
    feed[gy.value] = h
    env = run(g, feed)
    f = lambda *xs: opdef.ref(*xs, **node.attrs)  # noqa: E731
    for i, gr in enumerate(grads):
        if gr is None:
            assert i in opdef.nondiff, f"{op}: no gradient for input {i}"
            continue
        assert gr.shape == arrays[i].shape and gr.dtype == "f64"
        np.testing.assert_allclose(env[gr.value], numeric_vjp(f, arrays, i, h, eps), rtol=1e-6, atol=1e-7,
                                   err_msg=f"{op}: gradient of input {i}")


# ---- conv2d forward ------------------------------------------------------------------------

@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    cg, cog = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    # smallest image the (dilated) kernel fits into, so every drawn case is valid
    hw = [max(1, dil[a] * (k[a] - 1) + 1 - pad[a] - pad[a + 2]) for a in (0, 1)]
    hw = [m + draw(st.integers(0, 5)) for m in hw]
    n = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    r = rng(draw(st.integers(0, 2 ** 16)))
    x = r.standard_normal((n, groups * cg, *hw))
    w = r.standard_normal((groups * cog, cg, *k))
    b = r.standard_normal(groups * cog) if bias else None
    return x, w, b, dict(stride=stride, pad=pad, dilation=dil, groups=groups)


def conv_dsl(x, w, b, attrs):
    if b is None:
        return run_fn(lambda x_, w_: F.conv2d(x_, w_, None, **attrs), x, w)
    return run_fn(lambda x_, w_, b_: F.conv2d(x_, w_, b_, **attrs), x, w, b)


@FAST
@given(conv_cases())
def test_conv2d_matches_loops(case):
    x, w, b, attrs = case
    got = conv_dsl(x, w, b, attrs)
    want = conv_loops(x, w, b, **attrs)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attrs", [
    dict(groups=4),                                                      # depthwise
    dict(groups=4, stride=(2, 1), pad=(1, 0, 2, 1), dilation=(1, 2)),
    dict(groups=2, stride=(2, 2), pad=(0, 2, 1, 0)),
])
def test_conv2d_depthwise_and_grouped(attrs):
    r = rng(1)
    x = r.standard_normal((2, 4, 7, 6))
    cout = 8 if attrs["groups"] == 4 else 6
    w = r.standard_normal((cout, 4 // attrs["groups"], 3, 3))
    b = r.standard_normal(cout)
    full = {"stride": (1, 1), "pad": (0, 0, 0, 0), "dilation": (1, 1), **attrs}
    np.testing.assert_allclose(conv_dsl(x, w, b, attrs), conv_loops(x, w, b, **full), rtol=1e-12, atol=1e-12)


def test_conv2d_algo_is_ignored_by_reference():
    r = rng(2)
    x, w = r.standard_normal((1, 2, 6, 6)), r.standard_normal((3, 2, 3, 3))
    base = conv_dsl(x, w, None, {})
    for algo in ("direct", "im2col", "fft", "winograd_f2", "winograd_f4"):
        np.testing.assert_array_equal(conv_dsl(x, w, None, {"algo": algo}), base)


def test_conv2d_cost():
    assert get_op("conv2d").cost([TensorType("f32", (2, 4, 8, 8)), TensorType("f32", (6, 2, 3, 3))],
                                 [TensorType("f32", (2, 6, 6, 6))], groups=2) == 2 * 2 * 6 * 6 * 6 * 2 * 3 * 3


# ---- conv2d backward ------------------------------------------------------------------------

@FAST
@given(conv_cases())
def test_conv2d_backward_ops_are_adjoints(case):
    x, w, _, attrs = case
    y = ref("conv2d", x, w, **attrs)
    G = rng(3).standard_normal(y.shape)
    gx = run_op("conv2d_grad_input", G, w, input_shape=x.shape, **attrs)
    gw = run_op("conv2d_grad_weight", x, G, weight_shape=w.shape, **attrs)
    lhs = np.vdot(y, G)
    assert np.isclose(lhs, np.vdot(x, gx), rtol=1e-10, atol=1e-10)
    assert np.isclose(lhs, np.vdot(w, gw), rtol=1e-10, atol=1e-10)


# Cases with rows no window reaches (stride > kernel, floor-truncated padding) and dilation.
BACKWARD_CASES = [
    ((1, 2, 5, 5), (3, 2, 3, 3), dict()),
    ((2, 2, 6, 7), (2, 2, 2, 2), dict(stride=(3, 3))),                       # uncovered rows and columns
    ((1, 4, 7, 6), (4, 2, 3, 2), dict(stride=(2, 3), pad=(2, 0, 1, 1), dilation=(2, 1), groups=2)),
    ((1, 3, 5, 5), (6, 1, 3, 3), dict(pad=(1, 1, 1, 1), groups=3)),          # depthwise, multiplier 2
]


@pytest.mark.parametrize("xs,ws,attrs", BACKWARD_CASES)
def test_conv2d_grad_rules_by_finite_differences(xs, ws, attrs):
    r = rng(4)
    x, w, b = r.standard_normal(xs), r.standard_normal(ws), r.standard_normal(ws[0])
    check_grad_rule("conv2d", [x, w, b], attrs)
    y = ref("conv2d", x, w, **attrs)
    G = r.standard_normal(y.shape)
    check_grad_rule("conv2d_grad_input", [G, w], dict(input_shape=xs, **attrs))
    check_grad_rule("conv2d_grad_weight", [x, G], dict(weight_shape=ws, **attrs))


def test_conv2d_grad_input_leaves_uncovered_rows_zero():
    x = np.zeros((1, 1, 5, 5))
    w = np.ones((1, 1, 2, 2))
    G = np.ones((1, 1, 2, 2))
    gx = run_op("conv2d_grad_input", G, w, input_shape=x.shape, stride=(3, 3))
    want = np.zeros((5, 5))
    want[np.ix_([0, 1, 3, 4], [0, 1, 3, 4])] = 1
    np.testing.assert_array_equal(gx[0, 0], want)


# ---- pooling forward -------------------------------------------------------------------------

@st.composite
def pool_cases(draw, kind):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if kind == "max" else (1, 1)
    # pads smaller than the kernel, as ONNX exporters and PyTorch produce
    pad = tuple(draw(st.integers(0, k[a % 2] - 1)) for a in range(4))
    hw = [max(1, dil[a] * (k[a] - 1) + 1 - pad[a] - pad[a + 2]) + draw(st.integers(0, 5)) for a in (0, 1)]
    x = rng(draw(st.integers(0, 2 ** 16))).permutation(2 * 2 * hw[0] * hw[1]).reshape(2, 2, *hw) * 0.1 - 3.0
    attrs = dict(kernel=k, stride=stride, pad=pad, ceil_mode=draw(st.booleans()))
    if kind == "max":
        attrs["dilation"] = dil
    else:
        attrs["count_include_pad"] = draw(st.booleans())
    return x, attrs


def pool_valid(op, x, attrs):
    """Hypothesis cases may put a whole dilated window in the padding: that must be refused."""
    try:
        get_op(op).infer_types([TensorType.of(x)], get_op(op).normalize_attrs(attrs))
        return True
    except ShapeError as e:
        assert "entirely in the padding" in str(e)
        return False


@FAST
@given(pool_cases("max"))
def test_maxpool_matches_loops(case):
    x, attrs = case
    if not pool_valid("maxpool2d", x, attrs):
        return
    got = run_fn(lambda t: F.maxpool2d(t, **attrs), x)
    np.testing.assert_array_equal(got, pool_loops(x, "max", **attrs))


@FAST
@given(pool_cases("avg"))
def test_avgpool_matches_loops(case):
    x, attrs = case
    if not pool_valid("avgpool2d", x, attrs):
        return
    got = run_fn(lambda t: F.avgpool2d(t, **attrs), x)
    np.testing.assert_allclose(got, pool_loops(x, "avg", **attrs), rtol=1e-12, atol=1e-12)


def test_ceil_mode_sizes_follow_onnx():
    x = np.arange(25.0).reshape(1, 1, 5, 5)
    # 5 wide, k2 s2: floor gives 2 windows, ceil keeps the partial third one
    assert run_fn(lambda t: F.maxpool2d(t, 2, 2), x).shape == (1, 1, 2, 2)
    y = run_fn(lambda t: F.maxpool2d(t, 2, 2, ceil_mode=True), x)
    assert y.shape == (1, 1, 3, 3) and y[0, 0, 2, 2] == 24
    # 6 wide, k2 s2, pad 1: ceil would add a window starting in the right padding; it is dropped
    x6 = np.arange(36.0).reshape(1, 1, 6, 6)
    assert run_fn(lambda t: F.maxpool2d(t, 2, 2, pad=1, ceil_mode=True), x6).shape == (1, 1, 4, 4)
    # avg in ceil mode: the part of the last window past the padded input is not counted
    a = run_fn(lambda t: F.avgpool2d(t, 2, 2, ceil_mode=True, count_include_pad=True), x)
    assert a[0, 0, 2, 2] == 24 and a[0, 0, 0, 2] == (4 + 9) / 2
    a = run_fn(lambda t: F.avgpool2d(t, 3, 2, pad=1, count_include_pad=True), x)
    assert a[0, 0, 0, 0] == (0 + 1 + 5 + 6) / 9
    a = run_fn(lambda t: F.avgpool2d(t, 3, 2, pad=1), x)
    assert a[0, 0, 0, 0] == (0 + 1 + 5 + 6) / 4


def test_global_avgpool():
    x = rng(5).standard_normal((2, 3, 4, 5))
    y = run_fn(F.global_avgpool, x)
    assert y.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(y, x.mean(axis=(2, 3), keepdims=True))


# ---- pooling backward --------------------------------------------------------------------------

def distinct(shape, seed):
    """Values 0.1 apart, so finite differences never change an argmax."""
    return rng(seed).permutation(int(np.prod(shape))).reshape(shape) * 0.1 - 1.0


MAX_CASES = [
    dict(kernel=(2, 2), stride=(2, 2)),
    dict(kernel=(3, 3), stride=(1, 1)),                                       # overlapping windows
    dict(kernel=(3, 2), stride=(2, 1), pad=(1, 0, 1, 1), dilation=(1, 2)),
    dict(kernel=(2, 2), stride=(2, 2), pad=(1, 1, 0, 0), ceil_mode=True),
    dict(kernel=(3, 3), stride=(2, 2), pad=(1, 1, 1, 1), ceil_mode=True),
]


@pytest.mark.parametrize("attrs", MAX_CASES)
def test_maxpool_grad_rules(attrs):
    x = distinct((1, 2, 5, 6), 6)
    check_grad_rule("maxpool2d", [x], attrs)
    y = ref("maxpool2d", x, **attrs)
    g = rng(7).standard_normal(y.shape)
    h = rng(8).standard_normal(x.shape)
    check_grad_rule("maxpool2d_grad", [g, x], attrs)
    check_grad_rule("maxpool2d_gather", [h, x], attrs)
    gx = run_op("maxpool2d_grad", g, x, **attrs)
    assert np.isclose(np.vdot(gx, h), np.vdot(g, run_op("maxpool2d_gather", h, x, **attrs)))


def test_maxpool_grad_ties_and_overlaps():
    # ties: the first maximum in row-major window order takes the gradient
    x = np.zeros((1, 1, 2, 2))
    gx = run_op("maxpool2d_grad", np.ones((1, 1, 1, 1)), x, kernel=(2, 2), stride=(2, 2))
    np.testing.assert_array_equal(gx[0, 0], [[1, 0], [0, 0]])
    # overlapping windows that share a maximum accumulate at it
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = 5.0
    gx = run_op("maxpool2d_grad", np.ones((1, 1, 2, 2)), x, kernel=(3, 3), stride=(1, 1))
    assert gx[0, 0, 1, 2] == 4 and gx.sum() == 4


AVG_CASES = [
    dict(kernel=(2, 2), stride=(2, 2)),
    dict(kernel=(3, 3), stride=(1, 1), pad=(1, 1, 1, 1)),
    dict(kernel=(3, 3), stride=(1, 1), pad=(1, 1, 1, 1), count_include_pad=True),
    dict(kernel=(3, 2), stride=(2, 3), pad=(1, 0, 2, 1), ceil_mode=True),
    dict(kernel=(3, 2), stride=(2, 3), pad=(1, 0, 2, 1), ceil_mode=True, count_include_pad=True),
]


@pytest.mark.parametrize("attrs", AVG_CASES)
def test_avgpool_grad_rules(attrs):
    x = rng(9).standard_normal((1, 2, 6, 7))
    check_grad_rule("avgpool2d", [x], attrs)
    y = ref("avgpool2d", x, **attrs)
    g = rng(10).standard_normal(y.shape)
    check_grad_rule("avgpool2d_grad", [g], dict(input_shape=x.shape, **attrs))
    gx = run_op("avgpool2d_grad", g, input_shape=x.shape, **attrs)
    assert np.isclose(np.vdot(y, g), np.vdot(x, gx))


@FAST
@given(pool_cases("avg"))
def test_avgpool_adjoint_identity(case):
    x, attrs = case
    if not pool_valid("avgpool2d", x, attrs):
        return
    y = ref("avgpool2d", x, **attrs)
    g = rng(11).standard_normal(y.shape)
    gx = ref("avgpool2d_grad", g, input_shape=x.shape, **attrs)
    assert np.isclose(np.vdot(y, g), np.vdot(x, gx), rtol=1e-10, atol=1e-10)


@FAST
@given(pool_cases("max"))
def test_maxpool_adjoint_identity(case):
    x, attrs = case
    if not pool_valid("maxpool2d", x, attrs):
        return
    y = ref("maxpool2d", x, **attrs)
    g = rng(12).standard_normal(y.shape)
    h = rng(13).standard_normal(x.shape)
    gx = ref("maxpool2d_grad", g, x, **attrs)
    assert np.isclose(np.vdot(gx, h), np.vdot(g, ref("maxpool2d_gather", h, x, **attrs)))
    # and maxpool2d_grad is the derivative: with distinct values, y changes by g . dy exactly
    assert np.isclose(np.vdot(gx, h) * 1e-6,
                      np.vdot(ref("maxpool2d", x + 1e-6 * h, **attrs) - y, g), rtol=1e-5, atol=1e-12)


def test_global_avgpool_grad_rule():
    check_grad_rule("global_avgpool", [rng(14).standard_normal((2, 3, 4, 5))], {})


# ---- dtypes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dt,tol", [("f32", 1e-5), ("f16", 2e-2)])
def test_lower_precision_dtypes(dt, tol):
    npdt = TensorType(dt, ()).np_dtype
    r = rng(15)
    x = r.standard_normal((2, 4, 8, 8))
    w = r.standard_normal((6, 2, 3, 3))
    b = r.standard_normal(6)
    attrs = dict(stride=2, pad=1, groups=2)
    full = dict(stride=(2, 2), pad=(1, 1, 1, 1), dilation=(1, 1), groups=2)
    cases = [
        (lambda x_, w_, b_: F.conv2d(x_, w_, b_, **attrs), (x, w, b), conv_loops(x, w, b, **full)),
        (lambda x_: F.maxpool2d(x_, 3, 2, pad=1), (x,),
         pool_loops(x, "max", (3, 3), (2, 2), (1, 1, 1, 1))),
        (lambda x_: F.avgpool2d(x_, 2, ceil_mode=True), (x[:, :, :7, :7],),
         pool_loops(x[:, :, :7, :7], "avg", (2, 2), (2, 2), (0, 0, 0, 0), ceil_mode=True)),
        (F.global_avgpool, (x,), x.mean(axis=(2, 3), keepdims=True)),
    ]
    for fn, arrays, want in cases:
        got = run_fn(fn, *[a.astype(npdt) for a in arrays])
        assert got.dtype == npdt
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 10)
    xs, ws = x.astype(npdt), w.astype(npdt)
    G = r.standard_normal((2, 6, 4, 4)).astype(npdt)
    assert run_op("conv2d_grad_input", G, ws, input_shape=x.shape, **full).dtype == npdt
    assert run_op("conv2d_grad_weight", xs, G, weight_shape=w.shape, **full).dtype == npdt
    Gp = G[:, :4]   # the pooled shape of x
    assert run_op("maxpool2d_grad", Gp, xs, kernel=(2, 2), stride=(2, 2)).dtype == npdt
    assert run_op("avgpool2d_grad", Gp, input_shape=x.shape, kernel=(2, 2), stride=(2, 2)).dtype == npdt


# ---- errors -------------------------------------------------------------------------------------

def emit_error(fn, *types_):
    g = Graph("err")
    with Builder(g) as b:
        args = [b.arg(f"a{i}", t, "input") for i, t in enumerate(types_)]
        with pytest.raises(ShapeError) as e:
            fn(*args)
    return str(e.value)


T = lambda *shape, dt="f32": TensorType(dt, shape)  # noqa: E731


def test_conv2d_errors():
    msg = emit_error(lambda x, w: F.conv2d(x, w), T(1, 3, 8, 8), T(4, 2, 3, 3))
    assert "conv2d" in msg and "channel" in msg and "[1, 3, 8, 8]" in msg and "[4, 2, 3, 3]" in msg
    msg = emit_error(lambda x, w: F.conv2d(x, w), T(1, 1, 3, 3), T(1, 1, 5, 5))
    assert "-1x-1" in msg and "5x5" in msg
    msg = emit_error(lambda x, w: F.conv2d(x, w, pad=1, dilation=3), T(1, 1, 4, 4), T(1, 1, 3, 3))
    assert "0x0" in msg and "dilation" in msg
    msg = emit_error(lambda x, w: F.conv2d(x, w, groups=2), T(1, 3, 8, 8), T(4, 1, 3, 3))
    assert "3 channels" in msg and "groups=2" in msg
    msg = emit_error(lambda x, w: F.conv2d(x, w, groups=2), T(1, 4, 8, 8), T(3, 2, 3, 3))
    assert "3 output channels" in msg
    msg = emit_error(lambda x, w, b: F.conv2d(x, w, b), T(1, 3, 8, 8), T(4, 3, 3, 3), T(3))
    assert "bias" in msg and "[4]" in msg
    assert "dtypes differ" in emit_error(lambda x, w: F.conv2d(x, w), T(1, 3, 8, 8), T(4, 3, 3, 3, dt="f64"))
    assert "float" in emit_error(lambda x, w: F.conv2d(x, w), T(1, 3, 8, 8, dt="i32"), T(4, 3, 3, 3, dt="i32"))
    assert "rank 4" in emit_error(lambda x, w: F.conv2d(x, w), T(3, 8, 8), T(4, 3, 3, 3))
    assert "stride" in emit_error(lambda x, w: F.conv2d(x, w, stride=0), T(1, 3, 8, 8), T(4, 3, 3, 3))
    assert "pad" in emit_error(lambda x, w: F.conv2d(x, w, pad=(0, -1, 0, 0)), T(1, 3, 8, 8), T(4, 3, 3, 3))
    assert "winograd_f2" in emit_error(lambda x, w: F.conv2d(x, w, algo="magic"), T(1, 3, 8, 8), T(4, 3, 3, 3))
    msg = emit_error(lambda g, w: F.apply("conv2d_grad_input", g, w, input_shape=(1, 3, 8, 8)),
                     T(1, 4, 5, 5), T(4, 3, 3, 3))
    assert "[1, 4, 6, 6]" in msg


def test_pool_errors():
    msg = emit_error(lambda x: F.maxpool2d(x, 5), T(1, 1, 3, 3))
    assert "maxpool2d" in msg and "5x5" in msg and "3x3" in msg
    msg = emit_error(lambda x: F.maxpool2d(x, 2, 1, pad=1, dilation=2), T(1, 1, 1, 1))
    assert "entirely in the padding" in msg
    assert "rank 4" in emit_error(lambda x: F.avgpool2d(x, 2), T(1, 4, 4))
    assert "kernel" in emit_error(lambda x: F.avgpool2d(x, 0), T(1, 1, 4, 4))
    assert "float" in emit_error(F.global_avgpool, T(1, 1, 4, 4, dt="i64"))
    msg = emit_error(lambda g, x: F.apply("maxpool2d_grad", g, x, kernel=(2, 2), stride=(2, 2)),
                     T(1, 1, 3, 3), T(1, 1, 4, 4))
    assert "f32[1,1,2,2]" in msg


# ---- speed ----------------------------------------------------------------------------------------

def test_lenet_sized_forward_and_backward_is_fast():
    """The reference runs training loops: LeNet-5's convolutions and pools at batch 64."""
    r = rng(16)
    x = r.standard_normal((64, 1, 28, 28)).astype(np.float32)
    w1 = r.standard_normal((6, 1, 5, 5)).astype(np.float32)
    w2 = r.standard_normal((16, 6, 5, 5)).astype(np.float32)
    start = time.perf_counter()
    for _ in range(3):
        y1 = ref("conv2d", x, w1, pad=(2, 2, 2, 2))
        p1 = ref("maxpool2d", y1, kernel=(2, 2), stride=(2, 2))
        y2 = ref("conv2d", p1, w2)
        p2 = ref("avgpool2d", y2, kernel=(2, 2), stride=(2, 2))
        g2 = ref("avgpool2d_grad", np.ones_like(p2), input_shape=y2.shape, kernel=(2, 2), stride=(2, 2))
        ref("conv2d_grad_weight", p1, g2, weight_shape=w2.shape)
        gp1 = ref("conv2d_grad_input", g2, w2, input_shape=p1.shape)
        g1 = ref("maxpool2d_grad", gp1, y1, kernel=(2, 2), stride=(2, 2))
        ref("conv2d_grad_weight", x, g1, weight_shape=w1.shape, pad=(2, 2, 2, 2))
    # generous (the machine may be busy); per-pixel Python loops would take tens of seconds
    assert (time.perf_counter() - start) / 3 < 1.0
