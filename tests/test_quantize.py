"""int8 quantization: the ops' numpy references against independent formulations with stated
bounds, the C kernels (runtime/quant.c, on the path this host's CPU has) bit for bit against the
references, post-training quantization of LeNet-5 (accuracy bound, JIT and native executable
against the reference), and fake_quant's straight-through gradient."""
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tdc
from tdc.errors import ShapeError
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ops.quant import multipliers

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from helpers import FAST, MEDIUM  # noqa: E402
from test_train_conv_models import _to_lenet  # noqa: E402


def _graph(op, arrays, attrs):
    g = Graph("t")
    args = [g.add_arg(f"x{i}", TensorType.of(a), "input") for i, a in enumerate(arrays)]
    (y,) = g.emit(op, args, attrs)
    g.add_output("y", y)
    return g


def _c_call(op, arrays, attrs):
    """Run the C runtime's kernel for one op node directly (ctypes), as codegen would call it."""
    from tdc.backends.llvm.codegen import library_call
    from tdc.backends.llvm.target import runtime_library
    g = _graph(op, arrays, attrs)
    node = g.nodes[0]
    cname, spec, _ = library_call(node)
    out = np.empty(node.outputs[0].type.shape, node.outputs[0].type.np_dtype)
    keep, args = [], []
    for kind, x in spec:
        if kind == "in":
            keep.append(np.ascontiguousarray(arrays[x]))
            args.append(ctypes.c_void_p(keep[-1].ctypes.data))
        elif kind == "out":
            args.append(ctypes.c_void_p(out.ctypes.data))
        elif kind == "i64":
            args.append(ctypes.c_int64(int(x)))
        elif kind == "f64":
            args.append(ctypes.c_double(float(x)))
        else:
            keep.append(np.ascontiguousarray(x))
            args.append(ctypes.c_void_p(keep[-1].ctypes.data))
    getattr(runtime_library(), cname)(*args)
    return out


def _ref(op, arrays, attrs):
    g = _graph(op, arrays, attrs)
    return g.nodes[0].opdef.ref(*arrays, **g.nodes[0].attrs)


def test_host_path_is_the_best_the_cpu_has():
    lib = __import__("tdc.backends.llvm.target", fromlist=["x"]).runtime_library()
    lib.tdc_quant_path.restype = ctypes.c_char_p
    path = lib.tdc_quant_path().decode()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512_vnni" in flags and " avx512f" in flags:
        assert path == "avx512-vnni"
    elif " avx_vnni" in flags:
        assert path == "avx-vnni"
    elif " avx2" in flags:
        assert path == "avx2"


# ---- quantize / dequantize ------------------------------------------------------------

@FAST
@given(st.integers(0, 2**31), st.floats(1e-4, 10), st.integers(-128, 127))
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(seed, scale, zero):
    rng = np.random.default_rng(seed)
    lo, hi = scale * (-128 - zero), scale * (127 - zero)     # the representable range
    x = rng.uniform(lo, hi, 200).astype(np.float32)
    a = {"scale": [scale], "zero_point": [zero]}
    q = _ref("quantize", [x], a)
    back = _ref("dequantize", [q], a)
    # scale/2 from rounding, plus float32 rounding of x / scale and of (q - z) * scale
    bound = scale / 2 + 4 * np.finfo(np.float32).eps * max(abs(lo), abs(hi))
    assert np.abs(back - x).max() <= bound
    # outside the range: clamped to the end codes
    assert _ref("quantize", [np.array([lo - 10 * scale, hi + 10 * scale], np.float32)], a).tolist() == [-128, 127]
    np.testing.assert_array_equal(_c_call("quantize", [x], a), q)
    np.testing.assert_array_equal(_c_call("dequantize", [q], a), back)


def test_per_channel_quantize_uses_each_channels_scale():
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    a = {"scale": [0.01, 0.1, 1.0], "zero_point": [0, 5, -5], "axis": 1}
    q = _ref("quantize", [x], a)
    for c, (s, z) in enumerate(zip(a["scale"], a["zero_point"])):
        np.testing.assert_array_equal(q[:, c], np.clip(np.rint(x[:, c] / np.float32(s)) + z, -128, 127))
    np.testing.assert_array_equal(_c_call("quantize", [x], a), q)
    with pytest.raises(ShapeError, match="2 scales for axis 1 of 3 channels"):
        _graph("quantize", [x], {"scale": [1.0, 2.0], "zero_point": [0], "axis": 1})


# ---- qlinear / qconv2d: references against independent integer math -------------------------

def _qattrs(rng, n_out, out, relu):
    return {"x_scale": float(rng.uniform(0.01, 0.1)), "x_zero": int(rng.integers(-128, 128)),
            "w_scale": [float(s) for s in rng.uniform(1e-3, 1e-2, n_out)], "y_scale": float(rng.uniform(0.05, 2)),
            "y_zero": int(rng.integers(-128, 128)), "relu": relu, "out": out}


def _independent_output(acc, a, axis):
    """float64 requantization of exact int64 accumulators: the reference's float32 steps may
    differ from it by one code (i8) or by float32 rounding (f32)."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    m = (a["x_scale"] * np.asarray(a["w_scale"], np.float64)).reshape(shape)
    y = acc * m
    if a["out"] == "f32":
        return np.maximum(y, 0) if a["relu"] else y
    q = np.rint(y / a["y_scale"]) + a["y_zero"]
    return np.clip(q, a["y_zero"] if a["relu"] else -128, 127)


def _check_against_independent(got, acc, a, axis):
    want = _independent_output(acc.astype(np.float64), a, axis)
    if a["out"] == "f32":
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)   # two float32 roundings
    else:
        assert np.abs(got.astype(np.int64) - want).max() <= 1          # one code at a rounding tie


@MEDIUM
@given(st.integers(0, 2**31), st.integers(1, 70), st.integers(1, 300), st.integers(1, 40),
       st.sampled_from(["i8", "f32"]), st.booleans(), st.booleans())
def test_qlinear_reference_and_kernel(seed, m, k, n, out, relu, bias):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)      # -128 too: the kernels stay exact
    b = rng.integers(-20000, 20000, n).astype(np.int32)
    a = _qattrs(rng, n, out, relu)
    ins = [x, w, b] if bias else [x, w]
    ref = _ref("qlinear", ins, a)
    acc = np.einsum("mk,nk->mn", x.astype(np.int64) - a["x_zero"], w.astype(np.int64)) + (b if bias else 0)
    _check_against_independent(ref, acc, a, 1)
    np.testing.assert_array_equal(_c_call("qlinear", ins, a), ref)


def _conv_acc(x, w, b, a, stride, pad, dilation, groups):
    """The accumulators by explicit loops over taps (int64)."""
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    oh = (h + pad[0] + pad[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + pad[1] + pad[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    xp = np.zeros((n, c, h + pad[0] + pad[2], wd + pad[1] + pad[3]), np.int64)
    xp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd] = x.astype(np.int64) - a["x_zero"]
    acc = np.zeros((n, co, oh, ow), np.int64)
    cog = co // groups
    for o in range(co):
        gi = o // cog
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, gi * cg:(gi + 1) * cg, i * dilation[0]:i * dilation[0] + stride[0] * (oh - 1) + 1:stride[0],
                           j * dilation[1]:j * dilation[1] + stride[1] * (ow - 1) + 1:stride[1]]
                acc[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, i, j].astype(np.int64))
    return acc + (b.astype(np.int64)[:, None, None] if b is not None else 0)


@MEDIUM
@given(st.integers(0, 2**31), st.integers(1, 3), st.integers(1, 2), st.integers(1, 4), st.integers(1, 20),
       st.integers(1, 5), st.integers(1, 2), st.integers(0, 2), st.integers(1, 2),
       st.sampled_from(["i8", "f32"]), st.booleans())
def test_qconv2d_reference_and_kernel(seed, n, groups, cpg, copg, k, stride, pad, dil, out, relu):
    rng = np.random.default_rng(seed)
    c, co = groups * cpg, groups * copg
    h, wd = int(rng.integers(k * dil, k * dil + 9)), int(rng.integers(k * dil, k * dil + 9))
    pads = [int(p) for p in rng.integers(0, pad + 1, 4)]
    x = rng.integers(-128, 128, (n, c, h, wd)).astype(np.int8)
    w = rng.integers(-127, 128, (co, cpg, k, k)).astype(np.int8)
    b = rng.integers(-20000, 20000, co).astype(np.int32)
    a = {**_qattrs(rng, co, out, relu), "stride": [stride, int(rng.integers(1, 3))], "pad": pads,
         "dilation": [dil, int(rng.integers(1, 3))], "groups": groups}
    try:
        ref = _ref("qconv2d", [x, w, b], a)
    except ShapeError:
        return    # the kernel does not fit this input (the op refuses it at build time)
    acc = _conv_acc(x, w, b, a, a["stride"], pads, a["dilation"], groups)
    _check_against_independent(ref, acc, a, 1)
    np.testing.assert_array_equal(_c_call("qconv2d", [x, w, b], a), ref)


def test_maxpool_on_codes_and_build_time_refusals():
    x = np.random.default_rng(1).integers(-128, 128, (2, 3, 9, 8)).astype(np.int8)
    for a in ({"kernel": [3, 2], "stride": [2, 2], "pad": [1, 0, 1, 1]},     # clipped windows
              {"kernel": [2, 2], "stride": [2, 2]},                           # the tiled 2x2 path, odd height
              {"kernel": [2, 3], "stride": [1, 2], "dilation": [2, 1], "pad": [0, 1, 2, 1]}):
        np.testing.assert_array_equal(_c_call("maxpool2d", [x], a), _ref("maxpool2d", [x], a), err_msg=str(a))
    with pytest.raises(ShapeError, match="qlinear: the bias must be i32"):
        _graph("qlinear", [np.zeros((2, 3), np.int8), np.zeros((4, 3), np.int8), np.zeros(4, np.float32)],
               {"x_scale": 1.0, "w_scale": [1.0]})
    with pytest.raises(ShapeError, match="qconv2d: channel mismatch"):
        _graph("qconv2d", [np.zeros((1, 3, 5, 5), np.int8), np.zeros((2, 2, 3, 3), np.int8)],
               {"x_scale": 1.0, "w_scale": [1.0]})
    with pytest.raises(ShapeError, match="overflow the int32 accumulator"):
        _graph("qlinear", [np.zeros((1, 70000), np.int8), np.zeros((1, 70000), np.int8)],
               {"x_scale": 1.0, "w_scale": [1.0]})


def test_multipliers_are_float64_products_rounded_once():
    a = {"x_scale": 0.1, "w_scale": [0.3, 0.7], "y_scale": 0.9, "out": "i8"}
    np.testing.assert_array_equal(multipliers(a, 2), np.float32([0.1 * 0.3 / 0.9, 0.1 * 0.7 / 0.9]))


def test_prepacked_literal_weights_give_the_same_result():
    """A qlinear whose weights are a literal is packed at compile time (backends/llvm/quant.py);
    the kernel's own packing of run-time weights must agree with it."""
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, (5, 37)).astype(np.int8)
    w = rng.integers(-127, 128, (19, 37)).astype(np.int8)
    a = _qattrs(rng, 19, "i8", False)
    g = Graph("t")
    xa = g.add_arg("x", TensorType.of(x), "input")
    (wl,) = g.emit("constant", [], {"value": w})
    (y,) = g.emit("qlinear", [xa, wl], a)
    g.add_output("y", y)
    got = tdc.compile(g, backend="llvm")(x=x)["y"]
    np.testing.assert_array_equal(got, _ref("qlinear", [x, w], a))


# ---- post-training quantization of LeNet-5 -------------------------------------------------

@pytest.fixture(scope="module")
def lenet_int8():
    from lenet import lenet
    from tdc.runtime.data import Dataset, load_digits
    from tdc.runtime.quantize import quantize_model
    from tdc.runtime.trainer import train
    d = load_digits(0)
    up = lambda x: _to_lenet(x[:, 0])[:, None]  # noqa: E731
    ds = Dataset("digits28", up(d.x_train), d.y_train, up(d.x_test), d.y_test, 10)
    res = train(lenet, ds, epochs=3, backend="llvm", optimizer=tdc.Optimizer("momentum", lr=0.05),
                verbose=False, progress=False, out=lambda *a, **k: None)
    g = lenet.trace(batch=64)
    qg, qp = quantize_model(g, dict(res.state), ds.x_train[:256])
    return g, dict(res.state), qg, qp, ds


def _accuracy(exe, ds):
    n = len(ds.x_test) // 64 * 64
    pred = np.concatenate([exe(x=ds.x_test[s:s + 64])["out"].argmax(1) for s in range(0, n, 64)])
    return float((pred == ds.y_test[:n]).mean())


def test_ptq_graph_is_int8_end_to_end(lenet_int8):
    _, _, qg, qp, _ = lenet_int8
    ops = qg.op_counts()
    assert ops.get("qconv2d") == 2 and ops.get("qlinear") == 3 and ops.get("quantize") == 1
    assert "dequantize" not in ops and "relu" not in ops and "conv2d" not in ops   # fc3 dequantizes itself
    assert qp["fc1.weight_q"].dtype == np.int8 and np.abs(qp["fc1.weight_q"]).max() == 127
    assert qp["fc1.bias_q"].dtype == np.int32


def test_ptq_accuracy_within_two_points_of_float(lenet_int8):
    g, params, qg, qp, ds = lenet_int8
    f = _accuracy(tdc.compile(g, backend="llvm", params=params), ds)
    q = _accuracy(tdc.compile(qg, backend="llvm", params=qp), ds)
    assert f > 0.85
    assert abs(q - f) <= 0.02, (f, q)


def test_jit_native_and_numba_match_the_reference(lenet_int8, tmp_path):
    from tdc.backends.llvm.bundle import write_bundle
    _, _, qg, qp, ds = lenet_int8
    x = np.ascontiguousarray(ds.x_test[:64])
    ref = tdc.compile(qg, params=qp)(x=x)["out"]
    np.testing.assert_array_equal(tdc.compile(qg, backend="llvm", params=qp)(x=x)["out"], ref)
    np.testing.assert_array_equal(tdc.compile(qg, backend="numba", params=qp)(x=x)["out"], ref)
    b = write_bundle(qg, str(tmp_path / "b"), params=qp)
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([b.executable, "--input", f"x={tmp_path / 'x.npy'}", "--output", f"out={tmp_path / 'y.npy'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), ref)


# ---- fake_quant: straight-through gradient ----------------------------------------------------

def test_fake_quant_forward_and_straight_through_gradient():
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, (3, 4, 5)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    a = {"scale": [0.01, 0.02, 0.005, 0.01], "zero_point": [0, 10, -3, 0], "axis": 1, "qmin": -127, "qmax": 127}
    y = _ref("fake_quant", [x], a)
    s = np.float32(a["scale"]).reshape(1, 4, 1)
    z = np.int32(a["zero_point"]).reshape(1, 4, 1)
    code = np.rint(x / s) + z
    np.testing.assert_array_equal(y, ((np.clip(code, -127, 127) - z) * s).astype(np.float32))
    inside = (code >= -127) & (code <= 127)
    assert 0 < inside.mean() < 1
    np.testing.assert_array_equal(_ref("fake_quant_grad", [g, x], a), np.where(inside, g, 0))
    np.testing.assert_array_equal(_c_call("fake_quant", [x], a), y)
    np.testing.assert_array_equal(_c_call("fake_quant_grad", [g, x], a), np.where(inside, g, 0))


@pytest.mark.parametrize("flags", [["-mno-avx512f"], ["-mno-avx2", "-mno-avx512f"]], ids=["avx2", "scalar"])
def test_other_isa_paths_match_the_reference(flags, tmp_path):
    """quant.c built as for an AVX2-only CPU (Zen 3) and for one with neither: the same integers."""
    from tdc.backends.llvm.runtime import RUNTIME_DIR, build_runtime
    rt = build_runtime()
    so = tmp_path / "q.so"
    r = subprocess.run(["gcc", "-O3", "-march=native", *flags, "-fPIC", "-shared", "-std=c11", f"-I{RUNTIME_DIR}",
                        f"-I{rt.openblas_include_dir}", str(RUNTIME_DIR / "quant.c"), str(RUNTIME_DIR / "common.c"),
                        "-o", str(so), "-lpthread", "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(so))
    lib.tdc_quant_path.restype = ctypes.c_char_p
    assert lib.tdc_quant_path().decode() == ("avx2" if flags == ["-mno-avx512f"] else "scalar")
    rng = np.random.default_rng(7)
    for m, k, n in [(1, 1, 1), (7, 33, 17), (64, 400, 120)]:
        x = rng.integers(-128, 128, (m, k)).astype(np.int8)
        w = rng.integers(-128, 128, (n, k)).astype(np.int8)
        b = rng.integers(-20000, 20000, n).astype(np.int32)
        a = _qattrs(rng, n, "i8", True)
        mult = multipliers(a, n)
        out = np.empty((m, n), np.int8)
        p = lambda arr: ctypes.c_void_p(arr.ctypes.data)  # noqa: E731
        i = ctypes.c_int64
        lib.tdc_qlinear_i8(p(x), p(w), p(b), i(1), p(w), i(0), p(mult), p(out), i(m), i(k), i(n),
                           i(a["x_zero"]), i(a["y_zero"]), i(1), i(0))
        np.testing.assert_array_equal(out, _ref("qlinear", [x, w, b], a))
