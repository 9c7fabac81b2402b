"""The integer dtypes beyond i8/i32/i64 (u8, i16, u16, u32, u64): elementwise arithmetic with
wrap-around, truncating division, min/max, comparisons, casts and a reduction, on every backend,
checked against Python integers wrapped by hand (not against numpy's own arithmetic)."""
import subprocess

import numpy as np
import pytest

import tdc
from tdc.ir.graph import Graph
from tdc.ir.parser import parse_graph
from tdc.ir.printer import print_graph
from tdc.ir.types import TensorType as T

NEW = ("u8", "i16", "u16", "u32", "u64")
BACKENDS = ("reference", "numba", "llvm")
N = 64
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")
COMPARE = ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")


def _bits(dt):
    return np.dtype(T(dt, ()).np_dtype).itemsize * 8


def _wrap(v: int, dt: str) -> int:
    """v modulo 2**bits, read back as the dtype's signed or unsigned value."""
    bits = _bits(dt)
    v %= 1 << bits
    return v - (1 << bits) if dt.startswith("i") and v >= 1 << (bits - 1) else v


def _trunc_div(x: int, y: int) -> int:
    if y == 0:
        return 0
    q = abs(x) // abs(y)
    return q if (x < 0) == (y < 0) else -q


PY = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y, "div": _trunc_div,
      "maximum": max, "minimum": min, "equal": lambda x, y: x == y, "not_equal": lambda x, y: x != y,
      "less": lambda x, y: x < y, "less_equal": lambda x, y: x <= y, "greater": lambda x, y: x > y,
      "greater_equal": lambda x, y: x >= y}


def _operands(dt: str):
    """Random values plus the edges: sums and products that wrap, the extremes, values above
    2**63 for u64, and divisors that leave a remainder (truncation shows) or are zero."""
    info = np.iinfo(T(dt, ()).np_dtype)
    rng = np.random.default_rng(_bits(dt) + (info.min < 0))
    lo, hi = int(info.min), int(info.max)
    edge_a = [hi, hi - 5, lo, lo + 1, 250 % (hi + 1), 7, 0, 1, hi // 2 + 3, 100]
    edge_b = [10, hi, 1, hi, 10, 2, 3, 0, 2, 7]
    if lo < 0:
        edge_a += [-7, -7, 7, -1, lo]
        edge_b += [2, -2, -2, 3, -1]
    if dt == "u64":
        edge_a += [2**63 + 5, 2**64 - 1, 2**63]
        edge_b += [2**63, 3, 2**63 + 1]
    k = N - len(edge_a)
    a = np.concatenate([np.array(edge_a, info.dtype), rng.integers(lo, hi, k, info.dtype, endpoint=True)])
    b = np.concatenate([np.array(edge_b, info.dtype), rng.integers(lo, hi, k, info.dtype, endpoint=True)])
    b[-4:] = [3, 5, 0, 1]          # small divisors: truncation is visible on random dividends
    return a, b


def _graph(dt: str) -> Graph:
    g = Graph(f"ints_{dt}")
    a = g.add_arg("a", T(dt, (N,)), "input")
    b = g.add_arg("b", T(dt, (N,)), "input")
    for op in BINARY + COMPARE:
        (y,) = g.emit(op, [a, b])
        g.add_output(op, y)
    (s,) = g.emit("reduce_sum", [a], {"axes": [0], "keepdims": False})
    g.add_output("sum", s)
    (m,) = g.emit("reduce_max", [a], {"axes": [0], "keepdims": False})
    g.add_output("max", m)
    (top,) = g.emit("constant", [], {"value": np.array(np.iinfo(T(dt, ()).np_dtype).max, T(dt, ()).np_dtype)})
    g.add_output("plus_max", g.emit("add", [a, top])[0])      # a scalar literal in the generated code
    g.add_output("neg", g.emit("neg", [a])[0])
    g.add_output("to_f64", g.emit("cast", [a], {"to": "f64"})[0])
    g.add_output("to_i64", g.emit("cast", [a], {"to": "i64"})[0])
    (back,) = g.emit("cast", [g.emit("cast", [a], {"to": "f32"})[0]], {"to": dt})
    g.add_output("via_f32", back)
    return g


def _expected(dt: str, a, b) -> dict:
    xs, ys = [int(v) for v in a], [int(v) for v in b]
    npdt = T(dt, ()).np_dtype
    want = {}
    for op in BINARY:
        want[op] = np.array([_wrap(PY[op](x, y), dt) for x, y in zip(xs, ys)], npdt)
    for op in COMPARE:
        want[op] = np.array([PY[op](x, y) for x, y in zip(xs, ys)], bool)
    want["sum"] = np.array(_wrap(sum(xs), dt), npdt)
    want["max"] = np.array(max(xs), npdt)
    want["plus_max"] = np.array([_wrap(x + int(np.iinfo(npdt).max), dt) for x in xs], npdt)
    want["neg"] = np.array([_wrap(-x, dt) for x in xs], npdt)
    want["to_f64"] = np.array([float(x) for x in xs], np.float64)
    want["to_i64"] = np.array([_wrap(x, "i64") for x in xs], np.int64)
    return want


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")   # u32/u64 max rounds up in f32
@pytest.mark.parametrize("dt", NEW)
def test_elementwise_matches_python_integers(dt, backend):
    a, b = _operands(dt)
    out = tdc.compile(_graph(dt), backend=backend)(a=a, b=b)
    want = _expected(dt, a, b)
    for name, w in want.items():
        got = np.asarray(out[name])
        assert got.dtype == w.dtype, (name, got.dtype)
        assert np.array_equal(got, w), (dt, backend, name, a[got != w][:4], b[got != w][:4] if got.shape else b,
                                         got[got != w][:4] if got.shape else got, w[got != w][:4] if w.shape else w)
    # f32 holds 24 bits: the round trip is exact below 2**24 and saturating-free float rounding above
    small = np.abs(a.astype(np.float64)) < 2**24
    assert np.array_equal(np.asarray(out["via_f32"])[small], a[small])


@pytest.mark.parametrize("dt", NEW)
def test_text_ir_roundtrip(dt):
    g = _graph(dt)
    info = np.iinfo(T(dt, ()).np_dtype)
    (k,) = g.emit("constant", [], {"value": np.array([info.min, info.max], info.dtype)})
    g.add_output("k", k)
    text = print_graph(g)
    assert f"%a: {dt}[{N}] input" in text
    g2 = parse_graph(text)
    assert print_graph(g2) == text
    assert g2.nodes[-1].attrs["value"].tolist() == [info.min, info.max]


def test_native_executable_reads_and_writes_every_new_dtype(tmp_path):
    """One executable for all five dtypes: .npy inputs and outputs in each (|u1, <i2, <u2, <u4, <u8),
    a u16 const in the weights file, and a u64 scalar given on the command line above 2**63."""
    from tdc.backends.llvm.bundle import write_bundle
    g = Graph("native_ints")
    feeds, want, vals = {}, {}, {}
    for dt in NEW:
        a, b = _operands(dt)
        feeds[f"a_{dt}"], feeds[f"b_{dt}"] = a, b
        va = g.add_arg(f"a_{dt}", T(dt, (N,)), "input")
        vb = g.add_arg(f"b_{dt}", T(dt, (N,)), "input")
        vals[dt] = va
        exp = _expected(dt, a, b)
        for op in ("add", "div", "less", "maximum"):
            g.add_output(f"{op}_{dt}", g.emit(op, [va, vb])[0])
            want[f"{op}_{dt}"] = exp[op]
    w = g.add_arg("w", T("u16", (N,)), "const")
    weights = np.arange(N, dtype=np.uint16) * 1000
    g.add_output("shifted", g.emit("sub", [vals["u16"], w])[0])
    want["shifted"] = np.array([_wrap(int(x) - int(y), "u16") for x, y in zip(feeds["a_u16"], weights)], np.uint16)
    k = g.add_arg("k", T("u64", ()), "input")
    g.add_output("k_plus", g.emit("add", [k, g.emit("constant", [], {"value": np.array(1, np.uint64)})[0]])[0])
    want["k_plus"] = np.array(2**64 - 1, np.uint64)
    bundle = write_bundle(g, str(tmp_path / "b"), params={"w": weights}, copy_blas=False)
    args = [bundle.executable, "--input", "k=18446744073709551614"]
    for name, a in feeds.items():
        np.save(tmp_path / f"{name}.npy", a)
        args += ["--input", f"{name}={tmp_path / name}.npy"]
    for name in want:
        args += ["--output", f"{name}={tmp_path / name}.npy"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name, w_ in want.items():
        got = np.load(tmp_path / f"{name}.npy")
        assert got.dtype == w_.dtype and np.array_equal(got, w_), name
    bad = subprocess.run(args[:2] + ["k=-1"] + args[3:], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "'k'" in bad.stderr


@pytest.mark.parametrize("dt", NEW)
def test_onnx_export_import_keeps_the_dtype(dt, tmp_path):
    import tdc.onnx
    g = Graph(f"onnx_{dt}")
    a, b = g.add_arg("a", T(dt, (N,)), "input"), g.add_arg("b", T(dt, (N,)), "input")
    for op in ("add", "div", "less", "maximum"):
        g.add_output(op, g.emit(op, [a, b])[0])
    tdc.onnx.save(g, tmp_path / "m.onnx")
    m = tdc.onnx.load(str(tmp_path / "m.onnx"))
    assert {v.type.dtype for v in m.graph.args} == {dt}
    x, y = _operands(dt)
    got, want = m(a=x, b=y), _expected(dt, x, y)
    for op in ("add", "div", "less", "maximum"):
        assert got[op].dtype == want[op].dtype and np.array_equal(got[op], want[op]), op


@pytest.mark.parametrize("dt", ("u8", "u64"))
def test_data_movement_keeps_every_bit(dt, backend):
    """transpose, slice, concat, pad, gather and reshape move the new dtypes' bytes unchanged."""
    info = np.iinfo(T(dt, ()).np_dtype)
    x = np.random.default_rng(1).integers(info.max // 2, info.max, (6, 4), info.dtype, endpoint=True)   # top bit set
    idx = np.array([3, 0, 5, 5], np.int64)
    g = Graph(f"moves_{dt}")
    a = g.add_arg("a", T(dt, (6, 4)), "input")
    i = g.add_arg("i", T("i64", (4,)), "input")
    g.add_output("t", g.emit("transpose", [a], {"perm": [1, 0]})[0])
    g.add_output("s", g.emit("slice", [a], {"starts": [1, 0], "ends": [6, 4], "steps": [2, 3]})[0])
    g.add_output("c", g.emit("concat", [a, a], {"axis": 1})[0])
    g.add_output("p", g.emit("pad", [a], {"pads": [1, 0, 0, 2]})[0])
    g.add_output("g", g.emit("gather", [a, i], {"axis": 0})[0])
    g.add_output("r", g.emit("reshape", [a], {"shape": [3, 8]})[0])
    out = tdc.compile(g, backend=backend)(a=x, i=idx)
    padded = np.zeros((7, 6), info.dtype)
    padded[1:, :4] = x
    want = {"t": x.T, "s": x[1:6:2, 0:4:3], "c": np.concatenate([x, x], 1), "p": padded,
            "g": x[idx], "r": x.reshape(3, 8)}
    for name, w in want.items():
        assert out[name].dtype == w.dtype and np.array_equal(out[name], w), name


@pytest.mark.parametrize("dt", ("u8", "i16", "u64"))
def test_integer_matmul_wraps_on_numba_and_is_refused_clearly_on_llvm(dt):
    """No LLVM library kernel multiplies integers: a one-line error, not a call into nothing
    (alone, and as the anchor of a fused epilogue). Numba's integer kernel wraps like numpy."""
    npdt = T(dt, ()).np_dtype
    rng = np.random.default_rng(2)
    x = rng.integers(0, np.iinfo(npdt).max // 2, (2, 3, 5), npdt)
    y = rng.integers(0, np.iinfo(npdt).max // 2, (5, 4), npdt)
    want = np.array([[[_wrap(sum(int(x[b, i, p]) * int(y[p, j]) for p in range(5)), dt) for j in range(4)]
                      for i in range(3)] for b in range(2)], npdt)
    for fused in (False, True):
        g = Graph("mm")
        a, b = g.add_arg("a", T(dt, (2, 3, 5)), "input"), g.add_arg("b", T(dt, (5, 4)), "input")
        (m,) = g.emit("matmul", [a, b])
        g.add_output("y", g.emit("add", [m, m])[0] if fused else m)
        w = np.array([_wrap(2 * int(v), dt) for v in want.ravel()], npdt).reshape(want.shape) if fused else want
        assert np.array_equal(tdc.compile(g, backend="numba")(a=x, b=y)["y"], w)
        with pytest.raises(tdc.TdcError, match=f"^llvm backend: matmul on {dt} is not supported"):
            tdc.compile(g, backend="llvm")


def test_dsl_names_and_python_scalars():
    """tdc.u8 ... tdc.u64 annotate inputs; a Python int beside a tensor takes its dtype."""
    @tdc.model
    def f(a: tdc.u8[3], b: tdc.i16[3], c: tdc.u16[3], d: tdc.u32[3], e: tdc.u64[3]):
        return {"a": a + 10, "b": b - 1, "c": c * 2, "d": d / 3, "e": tdc.min(e)}
    g = f.trace()
    assert [v.type.dtype for v in g.inputs] == list(NEW)
    out = tdc.compile(g)(a=np.array([250, 1, 2], np.uint8), b=np.array([-32768, 0, 5], np.int16),
                         c=np.array([40000, 1, 0], np.uint16), d=np.array([7, 1, 2**32 - 1], np.uint32),
                         e=np.array([2**63 + 1, 2**64 - 1, 2**63], np.uint64))
    assert out["a"].tolist() == [4, 11, 12] and out["b"].tolist() == [32767, -1, 4]
    assert out["c"].tolist() == [14464, 2, 0] and out["d"].tolist() == [2, 0, 1431655765]
    assert out["e"].dtype == np.uint64 and int(out["e"]) == 2**63


def test_maxpool_on_u8_images(backend):
    """Values above 127 win (an i8 comparison would lose them), padding never does (u8's lowest is 0)."""
    x = np.random.default_rng(3).integers(0, 256, (2, 3, 5, 5), np.uint8)
    x[0, 0, 0, 0] = 255
    g = Graph("pool_u8")
    a = g.add_arg("x", T("u8", x.shape), "input")
    g.add_output("y", g.emit("maxpool2d", [a], {"kernel": [2, 2], "stride": [2, 2], "pad": [1, 1, 1, 1]})[0])
    y = tdc.compile(g, backend=backend)(x=x)["y"]
    xp = np.zeros((2, 3, 7, 7), np.uint8)
    xp[:, :, 1:6, 1:6] = x
    want = xp[:, :, :6, :6].reshape(2, 3, 3, 2, 3, 2).max(axis=(3, 5))
    assert y.dtype == np.uint8 and np.array_equal(y, want)
