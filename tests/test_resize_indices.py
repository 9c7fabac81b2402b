"""F.resize / F.upsample (ONNX Resize and Upsample) and MaxPool's Indices output
(F.maxpool2d(return_indices=True)): against onnxruntime and independent numpy loops, with
gradients, errors, import and export. The ONNX backend cases are in test_onnx_conformance.py."""
import math

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import tdc
import tdc.onnx
from tdc.errors import ShapeError, TdcError
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.passes.autodiff import autodiff
from tdc.runtime.gradcheck import gradcheck


def graph_of(fn, shape, dtype="f32", kind="input"):
    g = Graph("g")
    with Builder(g) as b:
        out = fn(b.arg("x", TensorType(dtype, shape), kind))
        for i, y in enumerate(out if isinstance(out, tuple) else (out,)):
            g.add_output(f"y{i}", y.value)
    return g


def run(fn, x, backend="reference"):
    got = tdc.compile(graph_of(fn, x.shape, TensorType.of(x).dtype), backend=backend)(x=x)
    return [got[f"y{i}"] for i in range(len(got))]


def ort_run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# ---- resize: an independent formulation, one output element at a time -----------------------

def cubic_weight(t, a):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0


def resize_1d(v, n_out, scale, mode, ctm, nearest_mode, a=-0.75, exclude_outside=False):
    n, out = len(v), np.empty(n_out)
    length = scale * n
    for i in range(n_out):
        if ctm == "half_pixel":
            s = (i + 0.5) / scale - 0.5
        elif ctm == "pytorch_half_pixel":
            s = (i + 0.5) / scale - 0.5 if length > 1 else 0.0
        elif ctm == "align_corners":
            s = 0.0 if length == 1 else i * (n - 1) / (length - 1)
        else:
            s = i / scale
        f = math.floor(s)
        frac = s - f
        if mode == "nearest":
            if frac == 0 or nearest_mode == "floor":
                j = f
            elif nearest_mode == "ceil":
                j = f + 1
            else:
                j = f + (frac > 0.5 or (frac == 0.5 and nearest_mode == "round_prefer_ceil"))
            out[i] = v[min(max(j, 0), n - 1)]
        elif mode == "linear":
            out[i] = (1 - frac) * v[min(max(f, 0), n - 1)] + frac * v[min(max(f + 1, 0), n - 1)]
        else:
            taps = [(j, cubic_weight(s - j, a)) for j in range(f - 1, f + 3)
                    if not exclude_outside or 0 <= j < n]
            total = sum(w for _, w in taps)
            out[i] = sum(w * v[min(max(j, 0), n - 1)] for j, w in taps) / total
    return out


def resize_loop(x, sizes, scales, **kw):
    y = x.astype(np.float64)
    for axis in range(x.ndim):
        n_out, scale = sizes[axis], scales[axis]
        if n_out == x.shape[axis] and scale == 1:
            continue
        y = np.apply_along_axis(resize_1d, axis, y, n_out, scale, **kw)
    return y


def resize_model(shape, mode, opset=19, scales=None, sizes=None, **attrs):
    inits = [numpy_helper.from_array(np.array([], np.float32), "roi")]
    ins = ["x", "roi"]
    if scales is not None:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
        ins.append("scales")
    else:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        ins += ["", "sizes"]
    node = helper.make_node("Resize", ins, ["y"], mode=mode, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]   # exact in binary: floor(n * scale) is the same everywhere


@st.composite
def resize_cases(draw):
    rank = draw(st.integers(3, 4))
    shape = tuple(draw(st.integers(1, 2)) for _ in range(2)) + tuple(draw(st.integers(1, 5))
                                                                        for _ in range(rank - 2))
    mode = draw(st.sampled_from(["nearest", "linear", "cubic"]))
    ctm = draw(st.sampled_from(["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]))
    nearest_mode = draw(st.sampled_from(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]))
    if draw(st.booleans()):
        scales = [1.0, 1.0] + [draw(st.sampled_from(SCALES)) for _ in range(rank - 2)]
        assume(all(math.floor(n * s) >= 1 for n, s in zip(shape, scales)))
        sizes = None
    else:
        sizes = list(shape[:2]) + [draw(st.integers(1, 7)) for _ in range(rank - 2)]
        scales = None
    exclude = mode == "cubic" and draw(st.booleans())
    return shape, dict(mode=mode, coordinate_transformation_mode=ctm, nearest_mode=nearest_mode,
                       exclude_outside=int(exclude)), scales, sizes


@settings(max_examples=40, deadline=None)
@given(resize_cases(), st.integers(0, 2 ** 31))
def test_resize_matches_onnxruntime_and_a_loop(case, seed):
    shape, attrs, scales, sizes = case
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    model = resize_model(shape, scales=scales, sizes=sizes, **attrs)
    got = tdc.onnx.load(model)(x=x)["y"]
    # onnxruntime's cubic takes 4-D inputs only; its align_corners and pytorch_half_pixel use the
    # integer output length where ONNX's formulas (and its reference, and tdc) use dim * scale; and it
    # copies an input whose shape the scales keep (2 * 1.25 -> 2) where the formulas still resample
    fractional = scales is not None and any(n * s != math.floor(n * s) for n, s in zip(shape, scales))
    kept = scales is not None and all(math.floor(n * s) == n for n, s in zip(shape, scales))
    if (attrs["mode"] != "cubic" or len(shape) == 4) and not kept and not (
            fractional and attrs["coordinate_transformation_mode"] in ("align_corners", "pytorch_half_pixel")):
        (want,) = ort_run(model, {"x": x})
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    out = got.shape
    eff = scales or [o / n for o, n in zip(out, shape)]
    loop = resize_loop(x, out, eff, mode=attrs["mode"], ctm=attrs["coordinate_transformation_mode"],
                       nearest_mode=attrs["nearest_mode"], exclude_outside=bool(attrs["exclude_outside"]))
    np.testing.assert_allclose(got, loop, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attrs,sizes", [
    (dict(mode="linear", antialias=1), [1, 1, 3, 2]),
    (dict(mode="cubic", antialias=1), [1, 1, 2, 5]),
    (dict(mode="linear", coordinate_transformation_mode="half_pixel_symmetric"), [1, 1, 3, 7]),
    (dict(mode="nearest", keep_aspect_ratio_policy="not_larger"), [1, 1, 4, 9]),
    (dict(mode="linear", keep_aspect_ratio_policy="not_smaller"), [1, 1, 3, 3]),
])
def test_resize_antialias_symmetric_and_aspect_ratio_match_onnxruntime(attrs, sizes):
    x = np.random.default_rng(0).standard_normal((1, 1, 6, 5)).astype(np.float32)
    model = resize_model(x.shape, sizes=sizes, **attrs)
    (want,) = ort_run(model, {"x": x})
    np.testing.assert_allclose(tdc.onnx.load(model)(x=x)["y"], want, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.tuples(st.integers(1, 6), st.integers(1, 6)), st.tuples(st.integers(1, 8), st.integers(1, 8)),
       st.sampled_from(["nearest", "linear", "cubic"]), st.sampled_from(["antialias", "symmetric", "crop"]),
       st.lists(st.floats(-0.3, 0.5), min_size=2, max_size=2), st.lists(st.floats(0.5, 1.3), min_size=2, max_size=2),
       st.integers(0, 2 ** 31))
def test_resize_antialias_symmetric_and_crop_over_random_sizes(hw, out, mode, kind, lo, hi, seed):
    assume(not (kind == "antialias" and mode == "nearest"))
    x = np.random.default_rng(seed).standard_normal((1, 1) + hw).astype(np.float32)
    sizes = [1, 1, *out]
    if kind == "crop":
        roi = np.array([0, 0, *lo, 1, 1, *hi], np.float32)
        # a coordinate on (or within rounding of) the input's edge: onnx's reference rounds its
        # float32 arithmetic to either side of it (tdc computes in float64), so it may extrapolate
        for n_in, n_out, a, b in zip(hw, out, roi[2:4].astype(np.float64), roi[6:8].astype(np.float64)):
            src = (np.arange(n_out) * (b - a) * (n_in - 1) / (n_out - 1) if n_out > 1
                   else np.array([(b - a) * (n_in - 1) / 2])) + a * (n_in - 1)
            assume(n_in == 1 or min(np.abs(src).min(), np.abs(src - (n_in - 1)).min()) > 1e-5)
        node = helper.make_node("Resize", ["x", "roi", "", "sizes"], ["y"], mode=mode, extrapolation_value=1.5,
                                coordinate_transformation_mode="tf_crop_and_resize")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(roi, "roi"),
                                   numpy_helper.from_array(np.array(sizes, np.int64), "sizes")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
        # onnx's reference: onnxruntime's crop differs from the spec's formulas (and the reference) often
        (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    else:
        attrs = {"antialias": 1} if kind == "antialias" else {"coordinate_transformation_mode": "half_pixel_symmetric"}
        model = resize_model(x.shape, mode=mode, sizes=sizes, **attrs)
        (want,) = ort_run(model, {"x": x})
    np.testing.assert_allclose(tdc.onnx.load(model)(x=x)["y"], want, rtol=1e-4, atol=1e-5)


def test_resize_axes_and_llvm():
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)
    model = resize_model(x.shape, mode="linear", scales=[2.0, 0.5], axes=[3, 2])
    (want,) = ort_run(model, {"x": x})
    got = tdc.onnx.load(model, backend="llvm")(x=x)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    dsl = run(lambda t: F.resize(t, scales=[0.5, 2.0], mode="linear", axes=[2, -1]), x, "llvm")[0]
    np.testing.assert_allclose(dsl, want, rtol=1e-5, atol=1e-6)


def test_resize_on_numba():
    x = np.random.default_rng(2).standard_normal((1, 2, 3, 3)).astype(np.float32)
    want = resize_loop(x, (1, 2, 5, 4), (1, 1, 5 / 3, 4 / 3), mode="cubic", ctm="half_pixel",
                       nearest_mode="floor")
    got = run(lambda t: F.resize(t, sizes=[5, 4], axes=[2, 3], mode="cubic"), x, "numba")[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# before opset 11 there is no nearest_mode: onnxruntime rounds down upsampling, up downsampling
@pytest.mark.parametrize("opset,op,scales", [(10, "Resize", [1, 1, 2, 3]), (10, "Resize", [1, 1, 0.6, 1.3]),
                                             (9, "Upsample", [1, 1, 2, 1.5]),
                                             (7, "Upsample", [1.0, 1.0, 3.0, 2.0])])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_old_resize_and_upsample_match_onnxruntime(opset, op, scales, mode):
    x = np.random.default_rng(3).standard_normal((1, 2, 5, 4)).astype(np.float32)
    if opset == 7:
        node, inits = helper.make_node(op, ["x"], ["y"], mode=mode, scales=scales), []
    else:
        node = helper.make_node(op, ["x", "s"], ["y"], mode=mode)
        inits = [numpy_helper.from_array(np.array(scales, np.float32), "s")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    (want,) = ort_run(model, {"x": x})
    np.testing.assert_allclose(tdc.onnx.load(model)(x=x)["y"], want, rtol=1e-5, atol=1e-6)


def test_resize_scales_from_a_graph_input_are_fixed_at_the_call():
    x = np.random.default_rng(4).standard_normal((1, 1, 2, 3)).astype(np.float32)
    node = helper.make_node("Resize", ["x", "", "s"], ["y"], mode="nearest")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape),
                                            helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = tdc.onnx.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7))
    assert isinstance(model, tdc.onnx.SpecializingOnnxModel)
    s = np.array([1, 1, 2, 2], np.float32)
    np.testing.assert_array_equal(model(x=x, s=s)["y"], x.repeat(2, 2).repeat(2, 3))


def test_upsample_is_pytorchs():
    x = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    np.testing.assert_array_equal(run(lambda t: F.upsample(t, 2), x)[0], x.repeat(2, 2).repeat(2, 3))
    got = run(lambda t: F.upsample(t, (1, 2), mode="linear"), x)[0]
    np.testing.assert_allclose(got[0, 0, 0], [0, 0.25, 0.75, 1.25, 1.75, 2])


@pytest.mark.parametrize("kw", [dict(mode="nearest", sizes=[3, 7]), dict(mode="linear", scales=[0.75, 1.5]),
                                dict(mode="cubic", sizes=[2, 5], exclude_outside=True),
                                dict(mode="linear", sizes=[2, 2], antialias=True),
                                dict(mode="linear", sizes=[4, 6], coordinate_transformation_mode="tf_crop_and_resize",
                                     roi=[0.1, -0.2, 0.8, 1.3], extrapolation_value=2.0)])
def test_resize_gradient_matches_finite_differences(kw):
    rng = np.random.default_rng(5)
    g = Graph("g")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (2, 1, 4, 5)), "param")
        y = F.resize(x, axes=[2, 3], **kw)
        g.add_output("loss", F.sum(y * b.constant(rng.standard_normal(y.shape), "f32")).value)
    errors = gradcheck(g, {"x": rng.standard_normal((2, 1, 4, 5))}, loss="loss", max_entries=40)
    assert errors["x"] < 1e-6, errors


def test_resize_gradient_on_llvm_matches_the_reference():
    g = graph_of(lambda t: F.sum(F.resize(t, scales=[1.5, 0.5], axes=[2, 3], mode="linear") ** 2.0),
                 (1, 2, 4, 6), kind="param")
    dg = autodiff(g, "y0")
    x = np.random.default_rng(6).standard_normal((1, 2, 4, 6)).astype(np.float32)
    want = tdc.compile(dg, params={"x": x})()["grad.x"]
    got = tdc.compile(dg, backend="llvm", params={"x": x})()["grad.x"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,msg", [
    (dict(scales=[2.0]), r"resize: 1 scales \[2.0\] for the 4 resized axes .*f32\[1,2,3,4\]"),
    (dict(sizes=[1, 2, 0, 4]), r"resize: sizes \[1, 2, 0, 4\] must be > 0"),
    (dict(scales=[1, 1, -2, 1]), r"must be > 0"),
    (dict(), "exactly one of sizes and scales"),
    (dict(scales=[1, 1, 2, 2], antialias=True), "antialias applies to linear and cubic"),
    (dict(scales=[1, 1, 2, 2], mode="bicubic"), "mode must be one of nearest, linear, cubic, not 'bicubic'"),
    (dict(scales=[1, 1, 0.1, 1]), "empty dim"),
])
def test_resize_errors_name_the_op_and_the_shapes(kw, msg):
    with pytest.raises(ShapeError, match=msg):
        graph_of(lambda t: F.resize(t, **kw), (1, 2, 3, 4))


def test_linear_resize_of_integers_is_refused():
    with pytest.raises(ShapeError, match="linear mode interpolates"):
        graph_of(lambda t: F.resize(t, scales=[2, 2], axes=[2, 3], mode="linear"), (1, 1, 2, 2), "u8")
    x = np.arange(4, dtype=np.uint8).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(run(lambda t: F.resize(t, scales=[2, 2], axes=[2, 3]), x)[0],
                                  x.repeat(2, 2).repeat(2, 3))


def test_import_names_the_node_and_the_attribute():
    bad = resize_model((1, 1, 2, 2), mode="nearest", scales=[1, 1, 2, 2], nearest_mode="nearest")
    with pytest.raises(TdcError, match=r"\(Resize\): nearest_mode must be one of .*not 'nearest'"):
        tdc.onnx.load(bad)
    bad = resize_model((1, 1, 2, 2), mode="nearest", scales=[2, 2], axes=[2, 4])
    with pytest.raises(TdcError, match=r"\(Resize\): axes \[2, 4\] must be distinct dims of the rank-4 input"):
        tdc.onnx.load(bad)


def test_resize_and_indices_export_and_run_in_onnxruntime(tmp_path):
    x = np.random.default_rng(7).standard_normal((1, 2, 5, 6)).astype(np.float32)

    def net(t):
        # the padding (-inf) and a ceil_mode window past the input export as a Pad
        y, idx = F.maxpool2d(F.resize(t, scales=[1.5, 0.75], axes=[2, 3], mode="linear"), 3, stride=2, pad=1,
                             ceil_mode=True, return_indices=True)
        return y, idx

    g = graph_of(net, x.shape)
    want = tdc.compile(g)(x=x)
    model = tdc.onnx.save(g, tmp_path / "m.onnx")
    got = ort_run(model, {"x": x})
    np.testing.assert_allclose(got[0], want["y0"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1], want["y1"])


# ---- MaxPool indices ---------------------------------------------------------------------

def maxpool_loop(x, kernel, stride, pad, dilation, out_hw, storage_order):
    n, c, h, w = x.shape
    y = np.empty((n, c) + out_hw, x.dtype)
    idx = np.empty((n, c) + out_hw, np.int64)
    for b in range(n):
        for ch in range(c):
            for i in range(out_hw[0]):
                for j in range(out_hw[1]):
                    best = None
                    for p in range(kernel[0]):
                        for q in range(kernel[1]):
                            r, s = i * stride[0] + p * dilation[0] - pad[0], j * stride[1] + q * dilation[1] - pad[1]
                            if 0 <= r < h and 0 <= s < w and (best is None or x[b, ch, r, s] > best):
                                best = x[b, ch, r, s]
                                at = r * w + s if storage_order == 0 else s * h + r
                    y[b, ch, i, j], idx[b, ch, i, j] = best, (b * c + ch) * h * w + at
    return y, idx


def maxpool_model(shape, kernel, stride, pads, dilation, ceil_mode, storage_order):
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=kernel, strides=stride, pads=pads,
                            dilations=dilation, ceil_mode=ceil_mode, storage_order=storage_order)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("i", TensorProto.INT64, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)


@st.composite
def pool_cases(draw):
    rank = draw(st.sampled_from([3, 4]))
    d = rank - 2
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3))) + tuple(draw(st.integers(1, 6)) for _ in range(d))
    kernel = [draw(st.integers(1, 3)) for _ in range(d)]
    stride = [draw(st.integers(1, 3)) for _ in range(d)]
    dilation = [draw(st.integers(1, 2)) for _ in range(d)]
    pads = [draw(st.integers(0, k - 1)) for k in kernel] + [draw(st.integers(0, k - 1)) for k in kernel]
    assume(all((k - 1) * dl + 1 <= n + lo + hi
               for n, k, dl, lo, hi in zip(shape[2:], kernel, dilation, pads[:d], pads[d:])))
    return shape, kernel, stride, pads, dilation, int(draw(st.booleans())), int(draw(st.booleans()))


@settings(max_examples=40, deadline=None)
@given(pool_cases(), st.integers(0, 2 ** 31), st.booleans())
def test_maxpool_indices_match_onnxruntime_and_a_loop(case, seed, ties):
    shape, kernel, stride, pads, dilation, ceil_mode, order = case
    rng = np.random.default_rng(seed)
    # small integers make ties, where the first maximum in the window wins
    x = (rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)).astype(np.float32)
    model = maxpool_model(shape, kernel, stride, pads, dilation, ceil_mode, order)
    try:
        imported = tdc.onnx.load(model)
    except TdcError as e:   # a window entirely in the padding: tdc refuses it, onnxruntime makes -inf
        assume("lies entirely in the padding" not in str(e))
        raise
    got = imported(x=x)
    want_y, want_i = ort_run(model, {"x": x})
    np.testing.assert_array_equal(got["y"], want_y)
    np.testing.assert_array_equal(got["i"], want_i)
    out_hw = tuple(want_y.shape[2:]) if len(shape) == 4 else (1, want_y.shape[2])
    if len(shape) == 3:   # the loop is 2-D: a height of 1
        shape, kernel, stride, dilation = shape[:2] + (1,) + shape[2:], [1] + kernel, [1] + stride, [1] + dilation
        pads, x = [0, pads[0], 0, pads[1]], x[:, :, None]
    loop_y, loop_i = maxpool_loop(x, kernel, stride, pads, dilation, out_hw, order)
    np.testing.assert_array_equal(loop_y.reshape(want_y.shape), want_y)
    np.testing.assert_array_equal(loop_i.reshape(want_i.shape), want_i)


def test_maxpool_indices_of_int8_on_llvm_and_the_gradient_of_y():
    x = np.random.default_rng(8).integers(-128, 127, (2, 3, 5, 5)).astype(np.int8)
    y, idx = run(lambda t: F.maxpool2d(t, 3, stride=2, pad=1, ceil_mode=True, return_indices=True), x, "llvm")
    want_y, want_i = maxpool_loop(x, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), y.shape[2:], 0)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(idx, want_i)
    g = Graph("g")
    rng = np.random.default_rng(9)
    with Builder(g) as b:
        t = b.arg("x", TensorType("f32", (1, 2, 4, 4)), "param")
        y, idx = F.maxpool2d(t, 2, stride=1, return_indices=True)
        g.add_output("loss", F.sum(y * b.constant(rng.standard_normal(y.shape), "f32")).value)
        g.add_output("idx", idx.value)
    errors = gradcheck(g, {"x": rng.permutation(32).reshape(1, 2, 4, 4) * 0.1}, loss="loss")
    assert errors["x"] < 1e-6, errors


def test_maxpool_storage_order_is_checked():
    with pytest.raises(ShapeError, match="maxpool2d: storage_order must be 0 or 1, not 2"):
        graph_of(lambda t: F.maxpool2d(t, 2, return_indices=True, storage_order=2), (1, 1, 4, 4))


def test_maxpool_indices_on_llvm_match_onnxruntime():
    # dilation, asymmetric pads and a ceil_mode window past the input, column-major indices
    x = np.random.default_rng(10).standard_normal((2, 3, 7, 6)).astype(np.float32)
    model = maxpool_model(x.shape, [3, 2], [2, 1], [1, 0, 2, 1], [2, 1], 1, 1)
    got = tdc.onnx.load(model, backend="llvm")(x=x)
    want_y, want_i = ort_run(model, {"x": x})
    np.testing.assert_array_equal(got["y"], want_y)
    np.testing.assert_array_equal(got["i"], want_i)
