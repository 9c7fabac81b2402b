"""3-D convolution, pooling and transposed convolution, and dilated average pooling: compositions of
the 2-D ops (F.conv3d, F.maxpool3d, F.avgpool3d, F.conv_transpose3d, F.avgpool2d(dilation=...)),
against float64 numpy formulations written here from the definitions, their gradients against
finite differences, the LLVM backend against the reference, and the ONNX import against onnxruntime."""
import itertools

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import tdc.onnx
from tdc.backends import compile
from tdc.backends.reference import run
from tdc.errors import ShapeError
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ops import functional as F
from tdc.ops.tensor import Builder, Tensor
from tdc.runtime.gradcheck import gradcheck

SETTINGS = settings(max_examples=25, deadline=None, database=None)


# ---- float64 formulations from the definitions -------------------------------------------

def n_windows(size, k, s, d, lo, hi, ceil_mode=False):
    """ONNX's output size; with ceil_mode a window starting in the trailing padding is dropped."""
    span = size + lo + hi - (d * (k - 1) + 1)
    n = (-(-span // s) if ceil_mode else span // s) + 1
    return n - 1 if ceil_mode and (n - 1) * s >= size + lo else n


def conv_ref(x, w, b, stride, pad, dil, groups):
    r = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pad[i], pad[r + i]) for i in range(r)])
    out = [n_windows(x.shape[2 + i], w.shape[2 + i], stride[i], dil[i], pad[i], pad[r + i]) for i in range(r)]
    n, c = x.shape[:2]
    cout, cg = w.shape[0], c // groups
    y = np.zeros((n, cout, *out))
    wg = w.reshape(groups, cout // groups, cg, *w.shape[2:])
    for tap in itertools.product(*[range(k) for k in w.shape[2:]]):
        idx = tuple(builtins_slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(tap, dil, out, stride))
        xs = xp[(slice(None), slice(None)) + idx].reshape(n, groups, cg, *out)
        y += np.einsum("ngc...,goc->ngo...", xs, wg[(...,) + tap]).reshape(y.shape)
    return y if b is None else y + b.reshape((-1,) + (1,) * r)


builtins_slice = slice


def pool_ref(x, kind, kernel, stride, pad, dil, ceil_mode=False, count_include_pad=False):
    """Max or average over each window, from the taps of a padded copy that reaches past the
    padded input where ceil_mode windows do (those elements are never counted)."""
    r = x.ndim - 2
    out = [n_windows(x.shape[2 + i], kernel[i], stride[i], dil[i], pad[i], pad[r + i], ceil_mode) for i in range(r)]
    past = [max(0, (o - 1) * s + d * (k - 1) + 1 - (m + lo + hi))
            for o, s, d, k, m, lo, hi in zip(out, stride, dil, kernel, x.shape[2:], pad[:r], pad[r:])]
    widths = [(0, 0), (0, 0)] + [(pad[i], pad[r + i] + past[i]) for i in range(r)]
    xp = np.pad(x.astype(np.float64), widths, constant_values=-np.inf if kind == "max" else 0.0)
    real = np.pad(np.ones(x.shape[2:]), widths[2:])
    within = np.pad(np.ones([m + pad[i] + pad[r + i] for i, m in enumerate(x.shape[2:])]),
                    [(0, p) for p in past])
    counted = within if count_include_pad else real
    acc = np.full(x.shape[:2] + tuple(out), -np.inf if kind == "max" else 0.0)
    count = np.zeros(out)
    for tap in itertools.product(*[range(k) for k in kernel]):
        idx = tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(tap, dil, out, stride))
        v = xp[(slice(None), slice(None)) + idx]
        acc = np.maximum(acc, v) if kind == "max" else acc + v
        count += counted[idx]
    return acc if kind == "max" else acc / count


def conv_transpose_ref(x, w, b, stride, pad, extra, dil, groups):
    r = x.ndim - 2
    n, cin = x.shape[:2]
    cg, coutg = cin // groups, w.shape[1]
    full = [s * (m - 1) + d * (k - 1) + 1 + e for m, k, s, d, e in zip(x.shape[2:], w.shape[2:], stride, dil, extra)]
    buf = np.zeros((n, groups, coutg, *full))
    xg = x.reshape(n, groups, cg, *x.shape[2:])
    wg = w.reshape(groups, cg, coutg, *w.shape[2:])
    for tap in itertools.product(*[range(k) for k in w.shape[2:]]):
        idx = tuple(slice(t * d, t * d + (m - 1) * s + 1, s) for t, d, m, s in zip(tap, dil, x.shape[2:], stride))
        buf[(slice(None),) * 3 + idx] += np.einsum("ngc...,gco->ngo...", xg, wg[(...,) + tap])
    buf = buf.reshape(n, groups * coutg, *full)
    out = [f - lo - hi for f, lo, hi in zip(full, pad[:r], pad[r:])]
    y = np.zeros((n, groups * coutg, *out))
    for pos in itertools.product(*[range(o) for o in out]):   # output row o is row o + pad_begin of buf
        src = [o + lo for o, lo in zip(pos, pad[:r])]
        if all(0 <= s < f for s, f in zip(src, full)):
            y[(slice(None), slice(None)) + pos] = buf[(slice(None), slice(None)) + tuple(src)]
    return y if b is None else y + b.reshape((-1,) + (1,) * r)


# ---- graphs -------------------------------------------------------------------------------

def build(fn, arrays: dict, **attrs) -> Graph:
    """A graph computing fn(*arrays, **attrs) with every array an input (None entries stay None)."""
    g = Graph("nd3")
    args = {k: g.add_arg(k, TensorType.of(a), "input") for k, a in arrays.items() if a is not None}
    with Builder(g) as b:
        y = fn(*[Tensor(args[k], b) if k in args else None for k in arrays], **attrs)
    g.add_output("y", y.value)
    return g


def run_ref(g, arrays):
    env = run(g, {a: arrays[a.name] for a in g.args})
    return env[g.output("y")]


def with_loss(g, seed=3):
    """g with loss = sum(y * fixed random weights), so every output element matters."""
    with Builder(g) as b:
        y = Tensor(g.output("y"), b)
        wts = b.constant(np.random.default_rng(seed).standard_normal(y.shape).astype(np.float32), "f32")
        g.add_output("loss", F.sum(y * wts).value)
    return g


def close(got, want, tol=2e-5):
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---- forward against the formulations ---------------------------------------------------------

@st.composite
def window(draw, r, min_size=1):
    """Spatial sizes, kernel, stride, dilation and pads (each pad < the dilated kernel's span) that fit."""
    kernel = [draw(st.integers(1, 3)) for _ in range(r)]
    dil = [draw(st.integers(1, 2)) for _ in range(r)]
    stride = [draw(st.integers(1, 3)) for _ in range(r)]
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dil)]
    pad = [draw(st.integers(0, s - 1)) for s in span * 2]
    size = [draw(st.integers(max(min_size, s - pad[i] - pad[r + i]), s + 4)) for i, s in enumerate(span)]
    return size, kernel, stride, dil, pad


@SETTINGS
@given(geo=window(3), groups=st.sampled_from([1, 2]), cg=st.integers(1, 2), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_conv3d_matches_the_definition(geo, groups, cg, bias, seed):
    size, kernel, stride, dil, pad = geo
    rng = np.random.default_rng(seed)
    x, w = rand(rng, 2, groups * cg, *size), rand(rng, 2 * groups, cg, *kernel)
    b = rand(rng, 2 * groups) if bias else None
    g = build(F.conv3d, {"x": x, "w": w, "b": b}, stride=stride, pad=pad, dilation=dil, groups=groups)
    close(run_ref(g, {"x": x, "w": w, "b": b}), conv_ref(x, w, b, stride, pad, dil, groups))


@SETTINGS
@given(geo=window(3), ceil_mode=st.booleans(), seed=st.integers(0, 2**16))
def test_maxpool3d_matches_the_definition(geo, ceil_mode, seed):
    size, kernel, stride, dil, pad = geo
    x = rand(np.random.default_rng(seed), 2, 3, *size)
    attrs = dict(kernel=kernel, stride=stride, pad=pad, dilation=dil, ceil_mode=ceil_mode)
    try:
        g = build(F.maxpool3d, {"x": x}, **attrs)
    except ShapeError as e:   # a ceil_mode window in the padding alone: refused, as maxpool2d does
        assert "lies entirely in the padding" in str(e)
        return
    close(run_ref(g, {"x": x}), pool_ref(x, "max", kernel, stride, pad, dil, ceil_mode))


@SETTINGS
@given(r=st.sampled_from([2, 3]), data=st.data(), ceil_mode=st.booleans(), count_include_pad=st.booleans(),
       seed=st.integers(0, 2**16))
def test_avgpool_matches_the_definition(r, data, ceil_mode, count_include_pad, seed):
    size, kernel, stride, dil, pad = data.draw(window(r))
    x = rand(np.random.default_rng(seed), 2, 3, *size)
    fn = F.avgpool3d if r == 3 else F.avgpool2d
    # tdc's 2-D pads are (top, left, bottom, right): ONNX's order too
    attrs = dict(kernel=kernel, stride=stride, pad=pad, dilation=dil, ceil_mode=ceil_mode,
                 count_include_pad=count_include_pad)
    try:
        g = build(fn, {"x": x}, **attrs)
    except ShapeError as e:
        assert not count_include_pad and "lies entirely in the padding" in str(e)
        return
    close(run_ref(g, {"x": x}), pool_ref(x, "avg", kernel, stride, pad, dil, ceil_mode, count_include_pad))


@SETTINGS
@given(data=st.data(), groups=st.sampled_from([1, 2]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_transpose3d_matches_the_definition(data, groups, bias, seed):
    size = [data.draw(st.integers(1, 4)) for _ in range(3)]
    kernel = [data.draw(st.integers(1, 3)) for _ in range(3)]
    stride = [data.draw(st.integers(1, 3)) for _ in range(3)]
    dil = [data.draw(st.integers(1, 2)) for _ in range(3)]
    extra = [data.draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dil)]
    full = [s * (m - 1) + d * (k - 1) + 1 + e for m, k, s, d, e in zip(size, kernel, stride, dil, extra)]
    pad = [data.draw(st.integers(-1, f // 2)) for f in full * 2]
    if any(f - pad[i] - pad[3 + i] < 1 for i, f in enumerate(full)):
        pad = [0] * 6
    rng = np.random.default_rng(seed)
    x, w = rand(rng, 2, 2 * groups, *size), rand(rng, 2 * groups, 2, *kernel)
    b = rand(rng, 2 * groups) if bias else None
    g = build(F.conv_transpose3d, {"x": x, "w": w, "b": b}, stride=stride, pad=pad, output_padding=extra,
              dilation=dil, groups=groups)
    close(run_ref(g, {"x": x, "w": w, "b": b}), conv_transpose_ref(x, w, b, stride, pad, extra, dil, groups))


def test_bad_shapes_and_attributes_name_the_op_and_the_shapes():
    g = Graph("bad")
    x = g.add_arg("x", TensorType("f32", (1, 4, 5, 5, 5)), "input")
    w = g.add_arg("w", TensorType("f32", (2, 3, 3, 3, 3)), "input")
    x4 = g.add_arg("x4", TensorType("f32", (1, 4, 5, 5)), "input")
    wt = g.add_arg("wt", TensorType("f32", (4, 2, 3, 3, 3)), "input")
    with Builder(g) as b:
        x, w, x4, wt = Tensor(x, b), Tensor(w, b), Tensor(x4, b), Tensor(wt, b)
        with pytest.raises(ShapeError, match=r"test_nd3.py:\d+: conv3d: channel mismatch: the input f32\[1,4,5,5,5\]"):
            F.conv3d(x, w)
        with pytest.raises(ShapeError, match=r"conv3d: the input must be NCDHW \(rank 5\), got f32\[1,4,5,5\]"):
            F.conv3d(x4, w)
        with pytest.raises(ShapeError, match=r"maxpool3d: the output would be 0x2x2: kernel \[6, 2, 2\]"):
            F.maxpool3d(x, (6, 2, 2))
        with pytest.raises(ShapeError, match=r"avgpool3d: a window along spatial dim 0 lies entirely in the padding"):
            F.avgpool3d(x, 2, stride=1, pad=(2, 0, 0, 0, 0, 0))
        with pytest.raises(ShapeError, match=r"avgpool2d: stride must be 2 integers, got \[1, 1, 1\]"):
            F.avgpool2d(x4, 2, stride=(1, 1, 1), dilation=2)
        with pytest.raises(ShapeError, match=r"conv_transpose3d: output_padding \[2, 0, 0\] must be >= 0 and less"):
            F.conv_transpose3d(x, wt, stride=2, output_padding=(2, 0, 0))


# ---- gradients, the LLVM backend, onnxruntime --------------------------------------------------

RNG = np.random.default_rng(11)
X = rand(RNG, 2, 4, 5, 6, 5)
W = rand(RNG, 4, 2, 3, 2, 3)            # conv3d, groups 2: [Cout, Cin/2, kd, kh, kw]
B = rand(RNG, 4)
WT = rand(RNG, 4, 3, 2, 3, 2)           # conv_transpose3d, groups 2: [Cin, Cout/2, kd, kh, kw]


def net(x, w, b, wt):
    """Every 3-D function and a dilated 2-D average, with strides, pads, dilations, groups and ceil_mode."""
    h = F.conv3d(x, w, b, stride=(2, 1, 1), pad=(1, 0, 1, 2, 1, 0), dilation=(1, 2, 1), groups=2).relu()
    m = F.maxpool3d(h, (2, 2, 3), stride=(1, 2, 1), pad=(1, 0, 1, 0, 1, 1), dilation=(2, 1, 1), ceil_mode=True)
    a = F.avgpool3d(m, (2, 2, 2), stride=(1, 2, 2), pad=(1, 1, 0, 0, 0, 1), dilation=(1, 1, 2), ceil_mode=True)
    a = a + F.avgpool3d(m, (2, 3, 2), stride=1, pad=(0, 1, 1, 1, 1, 0), count_include_pad=True)[:, :, :a.shape[2],
                                                                                                 :a.shape[3], :a.shape[4]]
    y = F.conv_transpose3d(a, wt, None, stride=(2, 1, 2), pad=(1, 0, -1, 0, 1, 1), output_padding=(1, 0, 1),
                           dilation=(1, 2, 1), groups=2)
    n, c, d, hh, ww = y.shape
    flat = F.reshape(y, (n, c * d, hh, ww))
    return F.avgpool2d(flat, 2, stride=1, pad=(1, 0, 1, 1), dilation=(2, 1), count_include_pad=True)


def net_ref(x, w, b, wt):
    h = np.maximum(conv_ref(x, w, b, (2, 1, 1), (1, 0, 1, 2, 1, 0), (1, 2, 1), 2), 0)
    m = pool_ref(h, "max", (2, 2, 3), (1, 2, 1), (1, 0, 1, 0, 1, 1), (2, 1, 1), True)
    a = pool_ref(m, "avg", (2, 2, 2), (1, 2, 2), (1, 1, 0, 0, 0, 1), (1, 1, 2), True)
    a2 = pool_ref(m, "avg", (2, 3, 2), (1, 1, 1), (0, 1, 1, 1, 1, 0), (1, 1, 1), False, True)
    a = a + a2[:, :, :a.shape[2], :a.shape[3], :a.shape[4]]
    y = conv_transpose_ref(a, wt, None, (2, 1, 2), (1, 0, -1, 0, 1, 1), (1, 0, 1), (1, 2, 1), 2)
    n, c, d, hh, ww = y.shape
    return pool_ref(y.reshape(n, c * d, hh, ww), "avg", (2, 2), (1, 1), (1, 0, 1, 1), (2, 1), False, True)


ARRAYS = {"x": X, "w": W, "b": B, "wt": WT}


def test_a_net_of_them_matches_the_definitions():
    close(run_ref(build(net, ARRAYS), ARRAYS), net_ref(*ARRAYS.values()))


def test_gradients_match_finite_differences():
    g = with_loss(build(net, ARRAYS))
    errors = gradcheck(g, ARRAYS, loss="loss", wrt=list(ARRAYS), max_entries=10)
    assert set(errors) == set(ARRAYS) and max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("case", ["conv3d", "maxpool3d", "avgpool3d", "conv_transpose3d"])
def test_each_gradient_matches_finite_differences(case):
    x = rand(np.random.default_rng(5), 1, 2, 4, 4, 3)
    fns = {"conv3d": lambda x, w: F.conv3d(x, w, stride=(2, 1, 1), pad=(1, 1, 0, 1, 0, 1), dilation=(1, 1, 2)),
           "maxpool3d": lambda x, w: F.maxpool3d(x, 2, stride=(2, 1, 1), pad=(1, 0, 0, 0, 1, 0), ceil_mode=True),
           "avgpool3d": lambda x, w: F.avgpool3d(x, (3, 2, 2), stride=(2, 1, 2), pad=(1, 0, 0, 1, 1, 1), ceil_mode=True,
                                                 dilation=(1, 2, 1)),
           "conv_transpose3d": lambda x, w: F.conv_transpose3d(x, w, stride=(2, 1, 1), pad=(0, 1, 0, 1, 0, 1),
                                                               output_padding=(1, 0, 0))}
    arrays = {"x": x, "w": rand(np.random.default_rng(6), 2, 2, 2, 3, 2)}
    g = with_loss(build(fns[case], arrays))
    wrt = ["x", "w"] if "conv" in case else ["x"]
    errors = gradcheck(g, arrays, loss="loss", wrt=wrt, max_entries=15)
    assert set(errors) == set(wrt) and max(errors.values()) < 1e-6, errors


def _training_outputs(backend):
    from tdc.passes.autodiff import autodiff
    dg = autodiff(with_loss(build(net, ARRAYS)), "loss", list(ARRAYS))
    if backend == "reference":
        env = run(dg, {a: ARRAYS[a.name] for a in dg.args})
        return {name: env[v] for name, v in dg.outputs}
    return compile(dg, backend=backend)(**ARRAYS)


def test_llvm_matches_the_reference_forward_and_backward():
    want, got = _training_outputs("reference"), _training_outputs("llvm")
    assert set(got) == set(want) and len(want) == 1 + 1 + len(ARRAYS)
    for name in want:
        close(np.asarray(got[name]), want[name], 1e-4)


def onnx_model(nodes, inputs: dict, inits: dict, opset=19):
    graph = helper.make_graph(nodes, "nd3", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape)
                                             for k, v in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


X5 = rand(RNG, 2, 4, 6, 7, 5)
ONNX_CASES = {
    "conv": ([helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 1, 2], pads=[1, 0, 2, 1, 1, 0],
                                dilations=[1, 2, 1], group=2)], {"w": W, "b": B}),
    "conv_same": ([helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2, 1], auto_pad="SAME_LOWER")],
                  {"w": rand(RNG, 3, 4, 3, 2, 2)}),
    "maxpool": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 2, 2], strides=[2, 2, 1],
                                  pads=[1, 0, 1, 1, 1, 0], dilations=[1, 2, 1], ceil_mode=1)], {}),
    "avgpool": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 3, 2], strides=[2, 2, 2],
                                  pads=[1, 1, 0, 0, 1, 1], ceil_mode=1, count_include_pad=1)], {}),
    "avgpool_same": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 2, 3], strides=[2, 1, 2],
                                       auto_pad="SAME_UPPER")], {}),
    "avgpool_dilated": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2, 2], strides=[1, 2, 1],
                                          pads=[1, 0, 1, 0, 1, 1], dilations=[2, 1, 2])], {}),
    "convtranspose": ([helper.make_node("ConvTranspose", ["x", "wt", "b"], ["y"], strides=[2, 1, 2],
                                        pads=[1, 0, 0, 0, 1, 1], output_padding=[1, 0, 1], dilations=[1, 2, 1],
                                        group=2)], {"wt": rand(RNG, 4, 2, 2, 3, 2), "b": B}),
    "convtranspose_shape": ([helper.make_node("ConvTranspose", ["x", "wt"], ["y"], strides=[2, 2, 1],
                                              output_shape=[12, 14, 6])], {"wt": rand(RNG, 4, 3, 2, 2, 2)}),
}


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_onnx_import_matches_onnxruntime(case):
    nodes, inits = ONNX_CASES[case]
    proto = onnx_model(nodes, {"x": X5}, inits)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X5})[0]
    got = tdc.onnx.load(proto)(x=X5)["y"]
    close(got, want, 1e-5)


def test_dilated_1d_and_2d_averagepool_match_onnxruntime():
    for x, attrs in ((X5[:, :, 0, 0], dict(kernel_shape=[3], dilations=[2], pads=[2, 1], ceil_mode=1)),
                     (X5[:, :, 0], dict(kernel_shape=[2, 3], dilations=[3, 2], strides=[1, 2], pads=[1, 2, 1, 0],
                                        count_include_pad=1))):
        proto = onnx_model([helper.make_node("AveragePool", ["x"], ["y"], **attrs)], {"x": x}, {})
        want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        close(tdc.onnx.load(proto, backend="llvm")(x=np.ascontiguousarray(x))["y"], want, 1e-5)


def test_export_runs_in_onnxruntime(tmp_path):
    """The compositions export as their parts (Conv, ConvTranspose, MaxPool, AveragePool, Slice, Pad, ...)."""
    tdc.onnx.save(build(net, ARRAYS), tmp_path / "net.onnx", {})
    sess = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    close(sess.run(None, ARRAYS)[0], net_ref(*ARRAYS.values()))
