"""The integer dtypes beyond i8/i32/i64 (u8, i16, u16, u32, u64): elementwise arithmetic with
wrap-around, truncating division, min/max, comparisons, casts and a reduction, on every backend,
checked against Python integers wrapped by hand (not against numpy's own arithmetic)."""
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
    want["neg"] = np.array([_wrap(-x, dt) for x in xs], npdt)
    want["to_f64"] = np.array([float(x) for x in xs], np.float64)
    want["to_i64"] = np.array([_wrap(x, "i64") for x in xs], np.int64)
    return want


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


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
