"""Transposed convolution (F.conv_transpose2d, nn.conv_transpose2d, ONNX ConvTranspose): against a
scatter-add formulation in numpy on every backend, its gradients against float64 finite
differences, its build-time errors, and ONNX import and export through onnxruntime."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import tdc
import tdc.onnx
from tdc.errors import ShapeError, TdcError
from tdc.frontend import nn
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.passes.autodiff import autodiff
from tdc.runtime.gradcheck import gradcheck

from helpers import FAST


def scatter_conv_transpose(x, w, b=None, stride=(1, 1), pad=(0, 0, 0, 0), output_padding=(0, 0),
                           dilation=(1, 1), groups=1):
    """Each input pixel x[n, ci, h, w] times the kernel w[ci, co] added into the output at
    (h * sh + i * dh - top, w * sw + j * dw - left); what lands outside the output is dropped."""
    n, cin, hh, ww = x.shape
    _, cog, kh, kw = w.shape
    oh = stride[0] * (hh - 1) + (kh - 1) * dilation[0] + 1 + output_padding[0] - pad[0] - pad[2]
    ow = stride[1] * (ww - 1) + (kw - 1) * dilation[1] + 1 + output_padding[1] - pad[1] - pad[3]
    out = np.zeros((n, cog * groups, oh, ow))
    cpg = cin // groups
    for g in range(groups):
        xs = x[:, g * cpg:(g + 1) * cpg].astype(np.float64)
        ws = w[g * cpg:(g + 1) * cpg].astype(np.float64)
        for h in range(hh):
            for c in range(ww):
                contrib = np.einsum("nc,cokl->nokl", xs[:, :, h, c], ws)   # [n, cog, kh, kw]
                for i in range(kh):
                    r = h * stride[0] + i * dilation[0] - pad[0]
                    for j in range(kw):
                        q = c * stride[1] + j * dilation[1] - pad[1]
                        if 0 <= r < oh and 0 <= q < ow:
                            out[:, g * cog:(g + 1) * cog, r, q] += contrib[:, :, i, j]
    if b is not None:
        out += b[:, None, None]
    return out


# name: (x shape, w shape, attrs)
CASES = {
    "plain": ((2, 3, 4, 5), (3, 2, 3, 3), {}),
    "stride2_upsample": ((2, 3, 4, 4), (3, 4, 3, 3), dict(stride=2, pad=1, output_padding=1)),
    "asymmetric": ((1, 2, 3, 5), (2, 3, 3, 2), dict(stride=(2, 3), pad=(1, 0, 2, 1), output_padding=(1, 2))),
    "dilation2_outpad_past_stride": ((1, 2, 4, 4), (2, 2, 3, 3), dict(dilation=2, output_padding=1)),
    "groups2": ((2, 4, 3, 3), (4, 3, 2, 3), dict(groups=2, stride=(1, 2), pad=(0, 1, 1, 0))),
    "negative_pads": ((1, 2, 3, 3), (2, 2, 3, 3), dict(stride=3, pad=(-1, 0, -2, 1))),
}


def _arrays(xs, ws, groups, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32),
            rng.standard_normal(ws[1] * groups).astype(np.float32))


@pytest.fixture(scope="module")
def graph():
    g = Graph("convt")
    with Builder(g) as b:
        for name, (xs, ws, attrs) in CASES.items():
            x = b.arg(f"{name}_x", TensorType("f32", xs), "input")
            w = b.arg(f"{name}_w", TensorType("f32", ws), "input")
            bias = b.arg(f"{name}_b", TensorType("f32", (ws[1] * attrs.get("groups", 1),)), "input")
            g.add_output(name, F.conv_transpose2d(x, w, bias, **attrs).value)
    return g


def _expected(name):
    xs, ws, attrs = CASES[name]
    x, w, b = _arrays(xs, ws, attrs.get("groups", 1))
    a = dict(attrs)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    for k in ("stride", "output_padding", "dilation"):
        if k in a:
            a[k] = pair(a[k])
    if "pad" in a:
        a["pad"] = (a["pad"],) * 4 if isinstance(a["pad"], int) else tuple(a["pad"])
    return (x, w, b), scatter_conv_transpose(x, w, b, **a)


@pytest.mark.parametrize("backend", ["reference", "numba", "llvm"])
def test_matches_scatter_add_on_every_backend(graph, backend):
    feeds, want = {}, {}
    for name in CASES:
        (x, w, b), want[name] = _expected(name)
        feeds.update({f"{name}_x": x, f"{name}_w": w, f"{name}_b": b})
    out = tdc.compile(graph, backend=backend)(**feeds)
    for name in CASES:
        assert out[name].shape == want[name].shape, name
        np.testing.assert_allclose(out[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("backend, algo", [("llvm", "direct"), ("llvm", "im2col"), ("llvm", "fft"),
                                           ("llvm", "winograd"), ("numba", "fft")])
def test_every_algorithm_computes_it(graph, backend, algo):
    # winograd applies to the 3x3, stride 1, dilation 1 case only: the conv_algo pass falls back elsewhere.
    # numba's im2col, direct and Winograd kernels pass too but take half a minute to compile on a cold
    # cache; its default choices run in test_matches_scatter_add_on_every_backend.
    feeds, want = {}, {}
    for name in CASES:
        (x, w, b), want[name] = _expected(name)
        feeds.update({f"{name}_x": x, f"{name}_w": w, f"{name}_b": b})
    out = tdc.compile(graph, backend=backend, conv_algo=algo)(**feeds)
    for name in CASES:
        np.testing.assert_allclose(out[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


@FAST
@given(st.data())
def test_random_geometries_match_scatter_add(data):
    d = data.draw
    s, dil = (d(st.integers(1, 3)), d(st.integers(1, 3))), (d(st.integers(1, 2)), d(st.integers(1, 2)))
    k = (d(st.integers(1, 3)), d(st.integers(1, 3)))
    groups = d(st.sampled_from([1, 2]))
    hw = (d(st.integers(1, 4)), d(st.integers(1, 4)))
    op = tuple(d(st.integers(0, max(a, b) - 1)) for a, b in zip(s, dil))
    pad = tuple(d(st.integers(-2, 3)) for _ in range(4))
    out = [st_ * (n - 1) + (kk - 1) * dd + 1 + o - pad[i] - pad[i + 2]
           for i, (st_, n, kk, dd, o) in enumerate(zip(s, hw, k, dil, op))]
    assume(min(out) >= 1)
    x, w, b = _arrays((2, 2 * groups, *hw), (2 * groups, 2, *k), groups, seed=d(st.integers(0, 99)))
    g = Graph("t")
    with Builder(g) as bld:
        args = [bld.arg(nm, TensorType.of(a), "input") for nm, a in (("x", x), ("w", w), ("b", b))]
        g.add_output("y", F.conv_transpose2d(*args, stride=s, pad=pad, output_padding=op, dilation=dil,
                                             groups=groups).value)
    got = tdc.compile(g, backend="reference")(x=x, w=w, b=b)["y"]
    want = scatter_conv_transpose(x, w, b, s, pad, op, dil, groups)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rows_only_output_padding_reaches_are_zeros():
    # a 1x1 kernel dilated by 2 scatters into row 0 only; pad 1 on top leaves the output_padding row
    x, w, b = _arrays((1, 2, 1, 3), (2, 3, 1, 1), 1)
    g = Graph("z")
    with Builder(g) as bld:
        args = [bld.arg(nm, TensorType.of(a), "input") for nm, a in (("x", x), ("w", w), ("b", b))]
        g.add_output("y", F.conv_transpose2d(*args, dilation=(2, 1), pad=(1, 0, 0, 0), output_padding=(1, 0)).value)
    want = scatter_conv_transpose(x, w, b, (1, 1), (1, 0, 0, 0), (1, 0), (2, 1), 1)
    assert want.shape == (1, 3, 1, 3) and np.allclose(want, b[:, None, None])
    for backend in ("reference", "llvm"):
        np.testing.assert_allclose(tdc.compile(g, backend=backend)(x=x, w=w, b=b)["y"], want, rtol=1e-6)


@pytest.mark.parametrize("name", ["stride2_upsample", "asymmetric", "dilation2_outpad_past_stride", "groups2"])
def test_gradients_match_finite_differences(name):
    xs, ws, attrs = CASES[name]
    x, w, b = _arrays(xs, ws, attrs.get("groups", 1))
    g = Graph("h")
    with Builder(g) as bld:
        args = [bld.arg(nm, TensorType("f64", a.shape), "param") for nm, a in (("x", x), ("w", w), ("b", b))]
        y = F.conv_transpose2d(*args, **attrs)
        weights = bld.constant(np.random.default_rng(2).standard_normal(y.shape), "f64")   # a generic functional
        g.add_output("loss", F.sum(y * weights).value)
    errors = gradcheck(g, {"x": x, "w": w, "b": b}, loss="loss", max_entries=12)
    assert set(errors) == {"x", "w", "b"} and max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("backend", ["numba", "llvm"])
def test_gradient_graph_matches_reference(backend):
    # the backward of conv_transpose2d is conv2d and conv2d_grad_weight: compiled like any layer's
    xs, ws, attrs = CASES["asymmetric"]
    x, w, b = _arrays(xs, ws, 1)
    g = Graph("h")
    with Builder(g) as bld:
        args = [bld.arg(nm, TensorType.of(a), "param") for nm, a in (("x", x), ("w", w), ("b", b))]
        y = F.conv_transpose2d(*args, **attrs)
        weights = bld.constant(np.random.default_rng(2).standard_normal(y.shape).astype(np.float32), "f32")
        g.add_output("loss", F.sum(y * weights).value)
    d = autodiff(g, "loss")
    params = {"x": x, "w": w, "b": b}
    want = tdc.compile(d, backend="reference", params=params)()
    got = tdc.compile(d, backend=backend, params=params)()
    assert set(got) == set(want) and len(want) == 4
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_layer_params_and_shape():
    @tdc.model
    def m(x: tdc.f32[2, 4, 5, 5]):
        h = nn.conv_transpose2d(x, 6, 3, stride=2, pad=1, output_padding=1, groups=2)
        return nn.ConvTranspose2d(h, 3, (2, 1), name="up", bias=False)
    g = m.trace()
    types = {a.name: a.type for a in g.args}
    assert types["convt1.weight"].shape == (4, 3, 3, 3) and types["convt1.bias"].shape == (6,)
    assert types["up.weight"].shape == (6, 3, 2, 1) and "up.bias" not in types
    assert g.outputs[0][1].type.shape == (2, 3, 11, 10)


@pytest.mark.parametrize("kwargs, x_shape, w_shape, match", [
    ({}, (2, 3, 4), (3, 2, 3, 3), r"conv_transpose2d: the input must be NCHW \(rank 4\), got f32\[2,3,4\]"),
    ({}, (1, 3, 4, 4), (4, 2, 3, 3), r"channel mismatch: the input f32\[1,3,4,4\] has 3 channels"),
    (dict(groups=2), (1, 3, 4, 4), (3, 2, 3, 3), r"3 channels, not divisible by groups=2"),
    (dict(stride=2, output_padding=2), (1, 3, 4, 4), (3, 2, 3, 3), r"output_padding \[2, 2\] must be >= 0 and less"),
    (dict(pad=3), (1, 3, 1, 1), (3, 2, 3, 3), r"the output would be -3x-3"),
])
def test_bad_arguments_are_refused(kwargs, x_shape, w_shape, match):
    g = Graph("bad")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", x_shape), "input")
        w = b.arg("w", TensorType("f32", w_shape), "input")
        with pytest.raises(ShapeError, match=match):
            F.conv_transpose2d(x, w, **kwargs)


def test_bad_bias_is_refused():
    g = Graph("bad")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (1, 4, 3, 3)), "input")
        w = b.arg("w", TensorType("f32", (4, 3, 3, 3)), "input")
        bias = b.arg("b", TensorType("f32", (3,)), "input")
        with pytest.raises(ShapeError, match=r"the bias must be \[6\] \(one per output channel\), got f32\[3\]"):
            F.conv_transpose2d(x, w, bias, groups=2)


# ---- ONNX ---------------------------------------------------------------------------------

def _ct_model(x_shape, w, b, **attrs):
    inits = [numpy_helper.from_array(w, "W")] + ([numpy_helper.from_array(b, "B")] if b is not None else [])
    node = helper.make_node("ConvTranspose", ["X", "W"] + (["B"] if b is not None else []), ["Y"], name="ct", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


ONNX_CASES = {
    "strides_pads_output_padding_group": ((2, 4, 3, 5), (4, 3, 3, 2),
                                          dict(strides=[2, 3], pads=[1, 0, 2, 1], output_padding=[1, 2], group=2)),
    "dilations": ((1, 2, 4, 4), (2, 3, 3, 2), dict(dilations=[2, 1], pads=[0, 1, 1, 0])),
    "same_upper": ((1, 2, 4, 5), (2, 2, 3, 3), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    "same_lower": ((1, 2, 4, 5), (2, 2, 4, 3), dict(strides=[2, 3], auto_pad="SAME_LOWER")),
    "valid": ((1, 2, 3, 3), (2, 2, 2, 2), dict(strides=[2, 2], auto_pad="VALID")),
    "output_shape": ((1, 1, 3, 3), (1, 2, 3, 3), dict(strides=[3, 2], output_shape=[10, 8])),
    "output_shape_smaller": ((1, 1, 3, 3), (1, 2, 3, 3), dict(strides=[2, 2], output_shape=[6, 5])),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_import_matches_onnxruntime(case):
    xs, ws, attrs = ONNX_CASES[case]
    x, w, b = _arrays(xs, ws, attrs.get("group", 1), seed=3)
    model = _ct_model(xs, w, b, **attrs)
    want = _ort(model, {"X": x})
    m = tdc.onnx.load(model)
    assert {a.name: a.kind for a in m.graph.args} == {"X": "input", "W": "param", "B": "param"}
    got = m(X=x)["Y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_import_refuses_4d():    # 1-D runs as 2-D with a height of 1 (tests/test_onnx_1d.py), 3-D: tests/test_nd3.py
    model = _ct_model((1, 2, 3, 3, 3, 3), np.ones((2, 2, 2, 2, 2, 2), np.float32), None)
    with pytest.raises(TdcError, match=r"node 'ct' \(ConvTranspose\): only 1-D, 2-D and 3-D ConvTranspose \(NCL, "
                                       r"NCHW or NCDHW input\) is supported; this is a 4-D ConvTranspose"):
        tdc.onnx.load(model)


def test_import_errors_name_the_node():
    x, w, _ = _arrays((1, 2, 3, 3), (2, 2, 3, 3), 1)
    with pytest.raises(TdcError, match=r"node 'ct' \(ConvTranspose\): conv_transpose2d: output_padding \[3, 0\]"):
        tdc.onnx.load(_ct_model(x.shape, w, None, strides=[2, 2], output_padding=[3, 0]))
    with pytest.raises(TdcError, match=r"kernel_shape \[2, 2\] does not match the weight"):
        tdc.onnx.load(_ct_model(x.shape, w, None, kernel_shape=[2, 2]))


def test_export_runs_in_onnxruntime(tmp_path):
    rng = np.random.default_rng(4)
    params = {"w1": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
              "b1": rng.standard_normal(4).astype(np.float32),
              "w2": rng.standard_normal((4, 2, 2, 2)).astype(np.float32)}
    g = Graph("up")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (2, 4, 4, 5)), "input")
        w1, b1, w2 = (b.arg(k, TensorType.of(v), "param") for k, v in params.items())
        h = F.conv_transpose2d(x, w1, b1, stride=2, pad=(1, 0, 1, 2), output_padding=1, groups=2).relu()
        # output_padding past the stride: exported as ConvTranspose followed by Pad
        g.add_output("y", F.conv_transpose2d(h, w2, dilation=2, output_padding=(1, 0)).value)
    model = tdc.onnx.save(g, tmp_path / "up.onnx", params)
    assert [n.op_type for n in model.graph.node].count("ConvTranspose") == 2
    xv = rng.standard_normal((2, 4, 4, 5)).astype(np.float32)
    want = tdc.compile(g, backend="reference", params=params)(x=xv)["y"]
    got = _ort(model, {"x": xv})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and back into tdc
    np.testing.assert_allclose(tdc.onnx.load(tmp_path / "up.onnx")(x=xv)["y"], want, rtol=1e-5, atol=1e-5)


def test_conv2d_gradient_graph_exports():
    # a conv2d's input gradient (stride 2: a floor-division remainder row) is a ConvTranspose
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    g = Graph("gi")
    with Builder(g) as b:
        gy = b.arg("gy", TensorType("f32", (1, 4, 3, 3)), "input")
        wv = b.arg("w", TensorType.of(w), "param")
        g.add_output("dx", F.apply("conv2d_grad_input", gy, wv, input_shape=(1, 3, 6, 7), stride=(2, 2),
                                   pad=(1, 0, 1, 0)).value)
    model = tdc.onnx.exporter.to_model(g, {"w": w})
    gv = rng.standard_normal((1, 4, 3, 3)).astype(np.float32)
    want = tdc.compile(g, backend="reference", params={"w": w})(gy=gv)["dx"]
    np.testing.assert_allclose(_ort(model, {"gy": gv}), want, rtol=1e-5, atol=1e-5)
