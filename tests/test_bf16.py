"""bf16 (bfloat16) as a storage dtype: casts checked against the rounding written with numpy
integer ops here and against ml_dtypes' own cast, data movement bit for bit, the build-time
refusal of arithmetic, native .npy I/O and ONNX."""
import subprocess

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import tdc
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType as T

# f32 values beyond bf16's largest finite round to inf, and NaN/inf to i32 is undefined: numpy says so
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast", "ignore:invalid value encountered in cast")
BF16 = np.dtype(ml_dtypes.bfloat16)
N = 64


def _from_bits(bits):
    return np.array(bits, np.uint32).view(np.float32)


# ties at one half with an even and an odd kept half, one above/below a half, the largest finite
# f32 (rounds to inf), the largest value that stays finite, subnormals, NaNs with payloads in
# either half, signed zeros and infinities
EDGES = np.concatenate([_from_bits([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F7FFF,
                                    0x00000001, 0x00008000, 0x00018000, 0x807FFFFF, 0x7FC00000, 0xFFC00001,
                                    0x7F800001, 0x7FFF0000, 0x80000000]),
                        np.array([0.0, np.inf, -np.inf, 1.0, -3.5, 1e-40], np.float32)])


def _rne_bits(x: np.ndarray) -> np.ndarray:
    """The oracle: f32 bits plus 0x7FFF plus the kept half's lowest bit, shifted (in uint64, so
    nothing wraps); NaN lanes are compared as NaN, not by bits."""
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _check_bf16(got: np.ndarray, x: np.ndarray):
    assert got.dtype == BF16
    nan = np.isnan(x)
    assert np.isnan(got.astype(np.float32)[nan]).all()
    bits = got.view(np.uint16)
    assert np.array_equal(bits[~nan], _rne_bits(x)[~nan])
    assert np.array_equal(bits[~nan], x.astype(BF16).view(np.uint16)[~nan])   # ml_dtypes agrees


def _cast_graph() -> Graph:
    g = Graph("bf16_casts")
    x = g.add_arg("x", T("f32", (N,)), "input")
    i = g.add_arg("i", T("i32", (N,)), "input")
    (b,) = g.emit("cast", [x], {"to": "bf16"})
    g.add_output("b", b)
    g.add_output("back", g.emit("cast", [b], {"to": "f32"})[0])
    g.add_output("f16", g.emit("cast", [b], {"to": "f16"})[0])
    g.add_output("f64", g.emit("cast", [b], {"to": "f64"})[0])
    g.add_output("nonzero", g.emit("cast", [b], {"to": "bool"})[0])
    (bi,) = g.emit("cast", [i], {"to": "bf16"})
    g.add_output("from_i32", bi)
    g.add_output("to_i32", g.emit("cast", [bi], {"to": "i32"})[0])
    return g


@pytest.fixture(scope="module", params=("reference", "llvm"))
def cast_exe(request):
    return tdc.compile(_cast_graph(), backend=request.param)


def _check_casts(out, x, i):
    _check_bf16(out["b"], x)
    bx = x.astype(BF16)
    exact = bx.astype(np.float32)      # bf16 -> f32 is exact: ml_dtypes' widening is the oracle
    assert np.array_equal(out["back"], exact, equal_nan=True)
    assert np.array_equal(out["back"].view(np.uint32)[~np.isnan(x)],
                          (out["b"].view(np.uint16).astype(np.uint32) << 16)[~np.isnan(x)])
    assert np.array_equal(out["f16"], exact.astype(np.float16), equal_nan=True)
    assert np.array_equal(out["f64"], exact.astype(np.float64), equal_nan=True)
    assert np.array_equal(out["nonzero"], exact != 0)
    _check_bf16(out["from_i32"], i.astype(np.float32))
    assert np.array_equal(out["to_i32"], out["from_i32"].astype(np.float32).astype(np.int32))


# 257 and 2**24 + 2**16 are ties that round to even (down), 259 rounds up; 2**30 + 3 * 2**22 is exact
_INTS = np.array([0, 1, -1, 257, 259, 2**24 + 2**16, -(2**20) - 3, 2**30 + 3 * 2**22] * 8, np.int32)


def test_cast_edges(cast_exe):
    x = np.resize(EDGES, N)
    with np.errstate(invalid="ignore"):
        _check_casts(cast_exe(x=x, i=_INTS), x, _INTS)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, N, elements=st.floats(width=32, allow_nan=True, allow_infinity=True,
                                                 allow_subnormal=True)),
       arrays(np.int32, N, elements=st.integers(-(2**31), 2**31 - 1)))
def test_cast_hypothesis(cast_exe, x, i):
    # integers within 2**23 of the i32 limits round to +-2**31 in bf16, and bf16 -> i32 of 2**31
    # is out of range (undefined, as for f32): keep the round trip's integers inside
    i = np.where(np.abs(i.astype(np.int64)) >= 2**31 - 2**24, 7, i).astype(np.int32)
    _check_casts(cast_exe(x=x, i=i), x, i)


def _moves_graph() -> Graph:
    g = Graph("bf16_moves")
    a = g.add_arg("a", T("bf16", (6, 4)), "input")
    idx = g.add_arg("idx", T("i64", (4,)), "input")
    c = g.add_arg("c", T("bool", (6, 4)), "input")
    g.add_output("t", g.emit("transpose", [a], {"perm": [1, 0]})[0])
    g.add_output("s", g.emit("slice", [a], {"starts": [1, 0], "ends": [6, 4], "steps": [2, 3]})[0])
    g.add_output("cat", g.emit("concat", [a, a], {"axis": 1})[0])
    g.add_output("p", g.emit("pad", [a], {"pads": [1, 0, 0, 2], "value": 1.5})[0])
    g.add_output("g", g.emit("gather", [a, idx], {"axis": 0})[0])
    g.add_output("r", g.emit("reshape", [a], {"shape": [3, 8]})[0])
    g.add_output("bc", g.emit("broadcast_to", [g.emit("reshape", [a], {"shape": [1, 6, 4]})[0]],
                              {"shape": [2, 6, 4]})[0])
    (k,) = g.emit("constant", [], {"value": np.array(-0.0078125, BF16)})
    g.add_output("w", g.emit("where", [c, a, g.emit("broadcast_to", [k], {"shape": [6, 4]})[0]])[0])
    return g


def _moves_expected(x, idx, c):
    padded = np.full((7, 6), 1.5, BF16)
    padded[1:, :4] = x
    return {"t": x.T, "s": x[1:6:2, 0:4:3], "cat": np.concatenate([x, x], 1), "p": padded, "g": x[idx],
            "r": x.reshape(3, 8), "bc": np.broadcast_to(x, (2, 6, 4)), "w": np.where(c, x, np.array(-0.0078125, BF16))}


@pytest.mark.parametrize("backend", ("reference", "llvm", "numba"))
def test_data_movement_keeps_every_bit(backend):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, (6, 4), np.uint16)
    bits[0, :3] = [0x7FC1, 0xFF80, 0x8000]     # a NaN payload, -inf, -0.0
    x = bits.view(BF16)
    idx, c = np.array([3, 0, -1, 5], np.int64), rng.random((6, 4)) < 0.5
    # a's bytes as np.load gives a bfloat16 .npy back: 2-byte voids, taken as bf16
    out = tdc.compile(_moves_graph(), backend=backend)(a=x.view("V2"), idx=idx, c=c)
    for name, w in _moves_expected(x, idx, c).items():
        assert out[name].dtype == BF16 and np.array_equal(out[name].view(np.uint16), w.view(np.uint16)), name


def test_numba_casts():
    """One numba case (it compiles slowly): the bit-operation casts on the edge values."""
    x = np.resize(EDGES, N)
    with np.errstate(invalid="ignore"):
        _check_casts(tdc.compile(_cast_graph(), backend="numba")(x=x, i=_INTS), x, _INTS)


@pytest.mark.parametrize("op, build", [
    ("add", lambda x: x + x),
    ("matmul", lambda x: tdc.matmul(x, tdc.transpose(x))),
    ("relu", tdc.relu),
    ("reduce_sum", lambda x: tdc.sum(x)),
    ("one_hot", lambda x: tdc.apply("one_hot", tdc.cast(x, "i64"), depth=4, dtype="bf16")),   # bf16 out only
])
def test_arithmetic_is_refused_at_build_time(op, build):
    @tdc.model
    def f(x: tdc.bf16[2, 3]):
        return build(x)
    with pytest.raises(tdc.ShapeError, match=rf"{op} on bf16: .* cast to f32"):
        f.trace()


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    from tdc.backends.llvm.bundle import write_bundle
    d = tmp_path_factory.mktemp("bf16_native")
    g = Graph("native_bf16")
    x = g.add_arg("x", T("f32", (N,)), "input")
    h = g.add_arg("h", T("bf16", (N,)), "input")
    w = g.add_arg("w", T("bf16", (N,)), "const")
    s = g.add_arg("s", T("bf16", ()), "input")
    g.add_output("sf", g.emit("cast", [s], {"to": "f32"})[0])
    g.add_output("hb", g.emit("cast", [x], {"to": "bf16"})[0])
    g.add_output("hf", g.emit("cast", [h], {"to": "f32"})[0])
    g.add_output("wt", g.emit("concat", [h, w], {"axis": 0})[0])
    weights = np.linspace(-3, 3, N).astype(BF16)
    return write_bundle(g, str(d / "b"), params={"w": weights}, copy_blas=False), weights, d


def test_native_executable_npy_io(native):
    bundle, weights, d = native
    x = np.resize(EDGES, N)
    h = np.random.default_rng(3).standard_normal(N).astype(BF16)
    np.save(d / "x.npy", x)
    np.save(d / "h.npy", h)
    assert np.load(d / "h.npy").dtype == np.dtype("V2")     # what np.save writes for bfloat16
    # a bf16 scalar given on the command line rounds as the cast does: this tie has an even
    # kept half and rounds down
    args = [bundle.executable, "--input", f"x={d}/x.npy", "--input", f"h={d}/h.npy", "--input", "s=1.00390625"]
    for name in ("hb", "hf", "wt", "sf"):
        args += ["--output", f"{name}={d}/{name}.npy"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    hb = np.load(d / "hb.npy")
    assert hb.dtype == np.dtype("V2")
    _check_bf16(hb.view(BF16), x)
    assert np.array_equal(np.load(d / "hf.npy"), h.astype(np.float32))
    wt = np.load(d / "wt.npy").view(BF16)
    assert np.array_equal(wt.view(np.uint16), np.concatenate([h, weights]).view(np.uint16))
    assert np.load(d / "sf.npy") == 1.0
    wrong = subprocess.run(args[:3] + ["--input", f"h={d}/x.npy"] + args[5:], capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode != 0 and "'h'" in wrong.stderr


def test_onnx_export_import_through_onnxruntime(tmp_path):
    """A BFLOAT16 input, initializer and output, and Casts both ways, in onnxruntime and back in tdc."""
    import onnxruntime as ort     # the test extra installs it (pyproject.toml)
    import tdc.onnx
    g = Graph("onnx_bf16")
    x = g.add_arg("x", T("f32", (4, 3)), "input")
    h = g.add_arg("h", T("bf16", (3, 4)), "input")
    w = g.add_arg("w", T("bf16", (3, 4)), "const")
    (xb,) = g.emit("cast", [x], {"to": "bf16"})
    g.add_output("xb", xb)
    (cat,) = g.emit("concat", [g.emit("transpose", [xb], {"perm": [1, 0]})[0], h, w], {"axis": 0})
    g.add_output("cat", cat)
    g.add_output("catf", g.emit("cast", [cat], {"to": "f32"})[0])
    g.add_output("hf", g.emit("cast", [h], {"to": "f32"})[0])
    weights = np.arange(12, dtype=np.float32).reshape(3, 4).astype(BF16) / BF16.type(3)
    path = tmp_path / "m.onnx"
    tdc.onnx.save(g, path, params={"w": weights})
    xs = np.resize(EDGES[~np.isnan(EDGES)], (4, 3))
    hs = np.random.default_rng(4).standard_normal((3, 4)).astype(BF16)
    want = {"xb": xs.astype(BF16), "cat": np.concatenate([xs.astype(BF16).T, hs, weights]), "hf": hs.astype(np.float32)}
    want["catf"] = want["cat"].astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # onnxruntime's Python API neither takes nor returns ml_dtypes arrays: the bf16 input goes in
    # as its bits typed BFLOAT16, and only the f32 outputs come back
    h_ort = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(hs.view(np.uint16), 16)
    ort_out = dict(zip(("catf", "hf"), sess.run(["catf", "hf"], {"x": xs, "h": h_ort})))
    m = tdc.onnx.load(str(path))
    assert {v.name: v.type.dtype for v in m.graph.args if v.name in ("h", "w")} == {"h": "bf16", "w": "bf16"}
    got = m(x=xs, h=hs)
    for name, w_ in want.items():
        for out in (ort_out.get(name), got[name]):
            if out is not None:
                assert out.dtype == w_.dtype and np.array_equal(out.view(np.uint8), w_.view(np.uint8)), name


def test_cli_run_reads_and_writes_bf16_npy(capsys, tmp_path):
    """`tdc run --input` takes the '<V2' file np.save writes for bfloat16, as the executable does."""
    from helpers import cli
    (tmp_path / "m.py").write_text('import tdc\n\n\n@tdc.model\ndef m(h: tdc.bf16[4]):\n'
                                   '    return {"f": tdc.cast(h, "f32"), "t": tdc.reshape(h, (2, 2))}\n')
    h = np.array([1.5, -0.0078125, np.inf, 3.140625], BF16)
    np.save(tmp_path / "h.npy", h)
    code, out, err = cli(capsys, "run", tmp_path / "m.py", "--input", f"h={tmp_path}/h.npy", "--backend", "reference",
                         "--output", f"f={tmp_path}/f.npy", "--output", f"t={tmp_path}/t.npy")
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "f.npy"), h.astype(np.float32))
    assert np.array_equal(np.load(tmp_path / "t.npy").view(BF16), h.reshape(2, 2))
    np.save(tmp_path / "x.npy", h.astype(np.float32))
    code, _, err = cli(capsys, "run", tmp_path / "m.py", "--input", f"h={tmp_path}/x.npy", "--backend", "reference")
    assert code != 0 and "ml_dtypes.bfloat16" in err


def _onnx_moves_model():
    from onnx import TensorProto as TP
    from onnx import helper as H
    from onnx import numpy_helper as NH
    nodes = [H.make_node("Identity", ["x"], ["id"]), H.make_node("Expand", ["x", "eshape"], ["ex"]),
             H.make_node("Where", ["c", "x", "k"], ["wh"]), H.make_node("Pad", ["x", "pads", "k"], ["pd"]),
             H.make_node("Gather", ["x", "idx"], ["ga"], axis=0), H.make_node("Unsqueeze", ["x", "ax"], ["us"]),
             H.make_node("Flatten", ["us"], ["fl"], axis=2)]
    inits = [NH.from_array(np.array([2, 3, 4], np.int64), "eshape"), NH.from_array(np.array(1.5, BF16), "k"),
             NH.from_array(np.array([1, 0, 0, 1], np.int64), "pads"), NH.from_array(np.array([2, 0], np.int64), "idx"),
             NH.from_array(np.array([0], np.int64), "ax")]
    outs = ["id", "ex", "wh", "pd", "ga", "fl"]
    g = H.make_graph(nodes, "moves", [H.make_tensor_value_info("x", TP.BFLOAT16, [3, 4]),
                                      H.make_tensor_value_info("c", TP.BOOL, [3, 4])],
                     [H.make_tensor_value_info(o, TP.BFLOAT16, None) for o in outs], inits)
    return H.make_model(g, opset_imports=[H.make_opsetid("", 18)])


@pytest.mark.parametrize("backend", ("reference", "llvm"))
def test_onnx_data_movement_imports(backend):
    import tdc.onnx
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(BF16)
    c = np.arange(12).reshape(3, 4) % 3 == 0
    k = np.array(1.5, BF16)
    padded = np.full((4, 5), k)
    padded[1:, :4] = x
    want = {"id": x, "ex": np.broadcast_to(x, (2, 3, 4)), "wh": np.where(c, x, k), "pd": padded, "ga": x[[2, 0]],
            "fl": x.reshape(3, 4)}
    got = tdc.onnx.load(_onnx_moves_model(), backend=backend)(x=x, c=c)
    for name, w in want.items():
        assert got[name].dtype == BF16 and np.array_equal(got[name].view(np.uint16), w.view(np.uint16)), name


def test_onnx_arithmetic_on_bf16_is_refused_at_import():
    import tdc.onnx
    from onnx import TensorProto as TP
    from onnx import helper as H
    g = H.make_graph([H.make_node("Add", ["x", "x"], ["y"])], "add", [H.make_tensor_value_info("x", TP.BFLOAT16, [3])],
                     [H.make_tensor_value_info("y", TP.BFLOAT16, [3])])
    with pytest.raises(tdc.TdcError, match=r"\(Add\): add on bf16: .* cast to f32"):
        tdc.onnx.load(H.make_model(g, opset_imports=[H.make_opsetid("", 18)]))


def test_comm_moves_bf16_between_simulated_ranks():
    """Broadcast, allgather and send/recv take bf16 (they move bytes); reductions refuse it."""
    from helpers import run_ranks
    g = Graph("bf16_ranks")
    x = g.add_arg("x", T("bf16", (2, 3)), "input")
    (b,) = g.emit("broadcast", [x], {"root": 1})
    (ag,) = g.emit("allgather", [x], {"axis": 0, "sizes": [2, 2], "world": 2})
    g.emit("send", [x], {"dst": 1}, placement="rank:0")
    (y,) = g.emit("recv", [], {"src": 0, "shape": [2, 3], "dtype": "bf16"}, placement="rank:1")
    pieces = [(np.arange(6, dtype=np.uint16).reshape(2, 3) + np.uint16(0x7F80 + 0x40 * r)).view(BF16) for r in range(2)]
    envs = run_ranks(g, [{x: p} for p in pieces])
    for env in envs:
        assert env[b].dtype == BF16 and np.array_equal(env[b].view(np.uint16), pieces[1].view(np.uint16))
        assert np.array_equal(env[ag].view(np.uint16), np.concatenate(pieces).view(np.uint16))
    assert np.array_equal(envs[1][y].view(np.uint16), pieces[0].view(np.uint16))
    with pytest.raises(tdc.ShapeError, match="allreduce on bf16"):
        g.emit("allreduce", [x], {"op": "sum"})


def test_comm_moves_bf16_between_mpi_ranks():
    """The same moves in a real 2-rank MPI job, on LLVM (comm.c moves bytes) and numba (mpi4py,
    which takes no ml_dtypes buffer: the bits go as uint16)."""
    import json
    import sys
    from pathlib import Path
    here = Path(__file__).parent
    p = subprocess.run([str(Path(sys.executable).parent / "mpiexec"), "-n", "2", sys.executable,
                        str(here / "mpi" / "bf16_comm.py"), "llvm", "numba"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    reports = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]   # one per rank
    assert sorted(r["rank"] for r in reports) == [0, 1] and all(r["ok"] == ["llvm", "numba"] for r in reports)


def test_text_ir_and_npz_weights_keep_bf16(tmp_path):
    from tdc.ir.parser import parse_graph
    from tdc.ir.printer import print_graph
    from tdc.ir.weights import load_weights, save_weights
    g = Graph("bf16_text")
    w = g.add_arg("w", T("bf16", (4,)), "param")
    k = np.array([1.0078125, -0.0, np.inf, 9.183549615799121e-41], BF16)
    (c,) = g.emit("constant", [], {"value": k})
    g.add_output("y", g.emit("concat", [w, c], {"axis": 0})[0])
    text = print_graph(g)
    assert "%w: bf16[4] param" in text
    g2 = parse_graph(text)
    assert print_graph(g2) == text
    assert np.array_equal(g2.nodes[0].attrs["value"].view(np.uint16), k.view(np.uint16))
    finite = np.where(np.isfinite(k), k, np.array(2.5, BF16))
    save_weights(str(tmp_path / "w.npz"), {"w": finite})
    got = load_weights(str(tmp_path / "w.npz"), g2)["w"]
    assert got.dtype == BF16 and np.array_equal(got.view(np.uint16), finite.view(np.uint16))
    save_weights(str(tmp_path / "bad.npz"), {"w": k})
    with pytest.raises(tdc.TdcError, match="1 NaN or infinite"):
        load_weights(str(tmp_path / "bad.npz"), g2)


@pytest.mark.parametrize("backend", ("reference", "llvm"))
def test_onnx_bf16_weights_cast_for_a_matmul(backend):
    """Weights stored in bfloat16 and cast to float for the product: a param of the model (the
    LLVM weight prologue casts it once per set of weights), replaced by set_state."""
    import tdc.onnx
    from onnx import TensorProto as TP
    from onnx import helper as H
    from onnx import numpy_helper as NH
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 16)).astype(BF16)
    g = H.make_graph([H.make_node("Cast", ["w"], ["wf"], to=TP.FLOAT), H.make_node("MatMul", ["x", "wf"], ["y"])],
                     "bf16_weights", [H.make_tensor_value_info("x", TP.FLOAT, [4, 8])],
                     [H.make_tensor_value_info("y", TP.FLOAT, None)], [NH.from_array(w, "w")])
    m = tdc.onnx.load(H.make_model(g, opset_imports=[H.make_opsetid("", 18)]), backend=backend)
    assert {a.name: str(a.type) for a in m.graph.args if a.kind == "param"} == {"w": "bf16[8,16]"}
    x = rng.standard_normal((4, 8)).astype(np.float32)
    exe = m.compile()
    for weights in (w, -w * BF16.type(4)):
        exe.set_state({"w": weights})
        np.testing.assert_allclose(exe(x=x)["y"], x.astype(np.float64) @ weights.astype(np.float64), rtol=1e-5, atol=1e-5)
