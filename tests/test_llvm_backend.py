"""The LLVM JIT backend against the reference interpreter: every op forward and backward in
float32 and float64, the example models (inference and training steps), random fused graphs,
integer and bool elementwise code, and what the generated code looks like."""
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tdc
from tdc.errors import TdcError
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from test_autodiff import CASES  # noqa: E402
from test_numba_backend import _compare, _random_graph, _values, check_op_case  # noqa: E402


def _check(graph, values, rtol, atol=1e-6):
    return _compare(graph, values, rtol, atol, backend="llvm")


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("op,inputs,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_op_forward_and_backward_match_reference(op, inputs, attrs, dtype):
    check_op_case(op, inputs, attrs, dtype, "llvm")


@pytest.mark.parametrize("model,batch,opt", [("mlp", 8, "adam"), ("lenet", 4, "momentum"), ("digits", 8, "sgd"),
                                             ("vgg", 2, "sgd")])
def test_training_steps_match_reference(model, batch, opt):
    mod = __import__(model)
    g = tdc.train_step(getattr(mod, model), optimizer=tdc.Optimizer(opt, lr=0.01, eps=1e-4), batch=batch)
    vals = _values(g)
    vals["y"] = np.arange(batch) % 10
    vals["lr"] = np.float32(0.01)
    exe = _check(g, vals, rtol=1e-4, atol=1e-5)
    # a second step starts from the updated weights held by the executable
    ref = tdc.compile(g, params={a.name: vals[a.name] for a in g.args if a.kind != "input"})
    feed = {a.name: vals[a.name] for a in g.inputs}
    ref(**feed)
    r2, l2 = ref(**feed), exe(**feed)
    np.testing.assert_allclose(l2["loss"], r2["loss"], rtol=1e-4)


@tdc.model
def _one_output(x: tdc.f32["B", 20]):
    h = tdc.nn.linear(x, 16, name="fc1").relu()
    return tdc.nn.sigmoid(tdc.nn.linear(h, 1, name="fc2"))    # one column, with an epilogue


@pytest.mark.parametrize("batch", [1, 5])
def test_matrix_vector_products_in_training_steps(batch):
    """Single-row and single-column products (the runtime's gemv path) in forward and backward:
    at batch 1 every layer is one row and its weight gradient an outer product; a layer with
    one output is one column, and its weight gradient one row at any batch."""
    mlp = __import__("mlp").mlp
    g = tdc.train_step(mlp, optimizer=tdc.Optimizer("sgd", lr=0.01), batch=batch)
    vals = _values(g)
    vals["y"], vals["lr"] = np.arange(batch) % 10, np.float32(0.01)
    _check(g, vals, rtol=1e-4, atol=1e-5)
    g = tdc.train_step(_one_output, loss="mse", optimizer=tdc.Optimizer("sgd", lr=0.01), batch=batch)
    vals = _values(g)
    vals["y"], vals["lr"] = np.linspace(0, 1, batch, dtype=np.float32).reshape(batch, 1), np.float32(0.01)
    _check(g, vals, rtol=1e-4, atol=1e-5)
    _check(_one_output.trace(batch=batch), _values(_one_output.trace(batch=batch)), rtol=1e-5, atol=1e-6)


def test_inference_graphs_match_reference():
    for model in ("mlp", "lenet", "digits", "vgg"):
        mod = __import__(model)
        for batch in (1, 3):
            g = getattr(mod, model).trace(batch=batch)
            _check(g, _values(g), rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_random_graph())
def test_random_fused_graphs_match_reference(g):
    _check(g, _values(g), rtol=1e-5, atol=1e-5)


_UNARY_ANY = ["neg", "abs", "sign"]
_INT_BINARY = ["add", "sub", "mul", "div", "maximum", "minimum"]
_CMP = ["equal", "not_equal", "less", "less_equal", "greater", "greater_equal"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["i8", "i32", "i64", "f32", "f64"]), st.data())
def test_elementwise_ops_on_every_dtype(dtype, data):
    """Integer wrap-around, division toward zero (and by zero), comparisons into bools, where,
    casts both ways, NaN and infinities through maximum/minimum/relu."""
    shape = (3, 5)
    g = Graph("dtypes")
    with Builder(g) as b:
        x = b.arg("x", TensorType(dtype, shape), "input")
        y = b.arg("y", TensorType(dtype, shape), "input")
        outs = {}
        for op in data.draw(st.lists(st.sampled_from(_UNARY_ANY + (["relu", "exp", "sigmoid"] if dtype[0] == "f" else [])), min_size=1, max_size=3)):
            outs[f"u_{op}"] = F.apply(op, x)
        for op in data.draw(st.lists(st.sampled_from(_INT_BINARY), min_size=1, max_size=4)):
            outs[f"b_{op}"] = F.apply(op, x, y)
        for op in data.draw(st.lists(st.sampled_from(_CMP), min_size=1, max_size=3)):
            c = F.apply(op, x, y)
            outs[f"c_{op}"] = c
            outs[f"w_{op}"] = F.apply("where", c, x, y)
        to = data.draw(st.sampled_from(["i8", "i32", "i64", "f32", "f64", "bool"]))
        outs["cast"] = F.apply("cast", x, to=to)
        outs["sum"] = F.sum(x, 1)
        outs["max"] = F.max(y, 0)
        for k, v in outs.items():
            g.add_output(k, v.value)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    np_dt = TensorType(dtype, ()).np_dtype
    if dtype.startswith("i"):
        info = np.iinfo(np_dt)
        x = rng.integers(info.min, info.max, shape, dtype=np_dt, endpoint=True)
        y = rng.integers(-3, 4, shape).astype(np_dt)      # zeros and -1 included
        x[0, :3] = [info.min, info.max, 0]
        y[0, :3] = [-1, -1, 0]
    else:
        x = (rng.standard_normal(shape) * 100).astype(np_dt)
        y = rng.standard_normal(shape).astype(np_dt)
        x[0, :4] = [np.nan, np.inf, -np.inf, 0.5]
        y[0, :4] = [1.0, np.nan, 2.0, 0.5]
    ref = tdc.compile(g)(x=x, y=y)
    out = tdc.compile(g, backend="llvm")(x=x, y=y)
    for k in ref:
        assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape, k
        if k in ("cast",) and dtype.startswith("f") and to.startswith("i"):
            ok = np.isfinite(x) & (np.abs(x) < 100)     # NaN/overflow casts are platform-defined
            np.testing.assert_array_equal(out[k][ok], ref[k][ok], err_msg=k)
        elif k.startswith("b_div") and dtype.startswith("i"):
            np.testing.assert_array_equal(out[k][y != 0], ref[k][y != 0], err_msg=k)
        elif k == "sum" and dtype.startswith("f"):   # tdc accumulates in float64, numpy pairwise in f32
            scale = np.abs(x.astype(np.float64)).sum(1)
            atol = 1e-6 * float(scale[np.isfinite(scale)].max(initial=0))
            np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=atol, err_msg=k)
        else:   # exp and sigmoid may land on subnormals, where one ulp is a large relative error
            tiny = float(np.finfo(out[k].dtype).tiny) if out[k].dtype.kind == "f" else 0
            np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=tiny, err_msg=k)


def test_bad_labels_are_a_clear_error():
    import mlp
    g = tdc.train_step(mlp.mlp, batch=4)
    exe = tdc.compile(g, backend="llvm")
    x = np.zeros((4, 784), np.float32)
    with pytest.raises(TdcError, match="label is out of range .element 3"):
        exe(x=x, y=np.array([0, 1, 2, 10]), lr=np.float32(0.1))
    # the executable still works after the error
    out = exe(x=x, y=np.array([0, 1, 2, 3]), lr=np.float32(0.1))
    assert np.isfinite(out["loss"])


def test_ir_has_one_function_per_kernel_and_vectorises_for_this_cpu():
    import lenet
    from tdc.backends.llvm.bundle import assembly
    g = lenet.lenet.trace(batch=2)
    exe = tdc.compile(g, backend="llvm")
    ir_text = exe.source()
    assert "define i64 @\"tdc_graph_run\"" in ir_text
    assert ir_text.count("define internal void") == exe.module_builder.n_kernels >= 3
    from tdc.backends.llvm.codegen import conv_algorithm
    for n in exe.graph.nodes:
        if n.op == "conv2d":     # the algorithm the conv_algo pass chose is the runtime function called
            assert f'call void @"tdc_conv2d_{conv_algorithm(n)}_f32"' in ir_text
    asm = assembly(g)
    assert "tdc_graph_run" in asm
    import llvmlite.binding as llvm
    if "+avx512f" in llvm.get_host_cpu_features().flatten():
        assert "zmm" in asm


@tdc.model
def _large_loops(x: tdc.f32[16, 6, 24, 24], b: tdc.f32[6, 1, 1]):
    h = (x * 2.0 + b).relu()                          # elementwise, 55296 elements: split
    s = F.sum(h, axes=(0, 2, 3))                       # the outer (kept) channel axis split
    t = F.sum(x * x)                                   # a full reduction: never split
    m = F.max(h, axes=(1,))                            # kept axes outside and inside the reduced one
    return h, s, t, m


def test_large_loop_kernels_run_on_the_pool_with_the_results_of_one_thread(monkeypatch):
    """Loop kernels of 2^15 iterations or more run their outer (not reduced) loop on the
    runtime's pool: every output equals the reference's and, bit for bit, the unsplit kernel's."""
    from tdc.backends.llvm import codegen
    g = _large_loops.trace()
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((16, 6, 24, 24)).astype(np.float32),
            "b": rng.standard_normal((6, 1, 1)).astype(np.float32)}
    exe = tdc.compile(g, backend="llvm")
    assert exe.source().count('call void @"tdc_parallel_for"') == 2   # relu+sum fused; max
    split = exe(**feed)
    want = tdc.compile(g, backend="reference")(**feed)
    for k in want:
        np.testing.assert_allclose(split[k], want[k], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(codegen, "PARALLEL_MIN_ITERATIONS", 1 << 40)
    whole = tdc.compile(g, backend="llvm")
    assert "tdc_parallel_for" not in whole.source()
    for k, v in whole(**feed).items():
        assert np.array_equal(v, split[k]), k


@pytest.mark.parametrize("dt", ["f32", "f64"])
def test_reductions_within_the_bound_of_any_summation_order(dt):
    """Sums in one register are reassociated (LLVM keeps vector lanes of partial sums); column
    sums run their reduced loop outside the kept inner one, one accumulator per column. Either
    way each output is within gamma_{n-1} * sum|x| of the exact sum, accumulated in f64 (plus
    the final rounding to f32), and a max is exact."""
    npdt = np.float32 if dt == "f32" else np.float64
    spec = tdc.f32 if dt == "f32" else tdc.f64

    @tdc.model
    def reductions(x: spec[64, 6, 784], c: spec[128, 300]):
        return (F.sum(x, axes=(0, 2)), F.sum(x * x), F.sum(c, axes=(0,)), F.mean(c, axes=(0,)),
                F.max(c, axes=(0,)), F.sum(x, axes=(0,)))

    g = reductions.trace()
    rng = np.random.default_rng(1)
    feed = {"x": (rng.standard_normal((64, 6, 784)) + 0.5).astype(npdt),
            "c": (rng.standard_normal((128, 300)) * 3).astype(npdt)}
    got = list(tdc.compile(g, backend="llvm")(**feed).values())
    x, c = (feed[k].astype(np.float64) for k in ("x", "c"))
    u64 = np.finfo(np.float64).eps / 2
    final = np.finfo(npdt).eps / 2 if dt == "f32" else 0.0
    for out, terms, axes, scale in [(got[0], x, (0, 2), 1), (got[1], x * x, None, 1), (got[2], c, (0,), 1),
                                    (got[3], c, (0,), 1 / 128), (got[5], x, (0,), 1)]:
        n = terms.size // np.asarray(out).size
        exact = terms.sum(axis=axes) * scale
        bound = (n - 1) * u64 / (1 - n * u64) * np.abs(terms).sum(axis=axes) * scale + final * np.abs(exact)
        assert np.all(np.abs(np.asarray(out, np.float64) - exact) <= bound * 1.0001 + 1e-300), (n, axes)
    assert np.array_equal(got[4], feed["c"].max(axis=0))


def test_point_to_point_in_a_world_of_one_is_refused_with_the_op_named():
    g = Graph("comm")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (4,)), "input")
        F.apply("send", x, dst=1)
        g.add_output("y", F.relu(x).value)
    with pytest.raises(TdcError, match="llvm backend: send needs several processes"):
        tdc.compile(g, backend="llvm")


@pytest.mark.parametrize("algo", ["direct", "im2col", "fft", "winograd_f2", "winograd_f4"])
def test_every_conv_algorithm_is_honoured_forward_and_backward(algo):
    """A small CNN's training step with every convolution forced to `algo`: the generated code calls
    that algorithm's runtime functions (Winograd only where it is legal: 3x3, stride 1) and the
    step matches the reference."""
    from tdc.backends.llvm.codegen import conv_algorithm
    from tdc import nn

    @tdc.model(batch=3)
    def net(x: tdc.f32["B", 3, 9, 9]):
        h = nn.conv2d(x, 4, 3, pad=1, name="c1").relu()                  # Winograd-legal
        h = nn.conv2d(h, 5, 3, stride=2, pad=(0, 1, 1, 0), name="c2")     # strided: never Winograd
        return nn.linear(h.flatten(), 10, name="fc")

    g = tdc.train_step(net, optimizer=tdc.Optimizer("sgd", lr=0.1))
    vals = _values(g)
    vals["y"] = np.arange(3) % 10
    vals["lr"] = np.float32(0.1)
    from tdc.passes.conv_algo import request_conv_algo
    exe = _check(request_conv_algo(g, algo), vals, rtol=2e-4, atol=2e-5)
    called = {conv_algorithm(n) for n in exe.graph.nodes if n.op.startswith("conv2d")}
    assert algo in called
    for n in exe.graph.nodes:
        if n.op.startswith("conv2d"):
            assert f'@"tdc_{n.op}_{conv_algorithm(n)}_f32"' in exe.source()
            if tuple(n.attrs["stride"]) != (1, 1):
                assert not conv_algorithm(n).startswith("winograd")


@pytest.mark.parametrize("backend", ["reference", "numba", "llvm"])
def test_set_state_replaces_params_on_every_backend(backend):
    import mlp
    g = mlp.mlp.trace(batch=2)
    a, b = _values(g, seed=1), _values(g, seed=2)
    x = a["x"]
    params_b = {k: v for k, v in b.items() if k != "x"}
    exe = tdc.compile(g, backend=backend, params={k: v for k, v in a.items() if k != "x"})
    exe.set_state(params_b)
    want = tdc.compile(g, params=params_b)(x=x)["out"]
    np.testing.assert_allclose(exe(x=x)["out"], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TdcError, match="no param or state named 'nope'"):
        exe.set_state({"nope": np.zeros(1)})


def test_autotune_times_the_c_kernels_and_caches_per_backend(tmp_path, monkeypatch):
    """--autotune on the LLVM backend measures the C runtime's candidates (not Numba's), keeps them
    under their own cache key, and picks the fastest measured one."""
    import json
    from tdc.backends.llvm.target import TARGET
    from tdc.passes.conv_algo import conv_choices, select_conv_algos
    monkeypatch.setenv("TDC_CACHE_DIR", str(tmp_path))
    g = Graph("c")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (2, 8, 12, 12)), "input")
        w = b.arg("w", TensorType("f32", (8, 8, 3, 3)), "param")
        g.add_output("y", F.conv2d(x, w, pad=1).value)
    chosen = conv_choices(select_conv_algos(g, TARGET, autotune=True))
    cache = json.loads((tmp_path / "autotune.json").read_text())
    (key, entry), = cache.items()
    assert key.endswith("|llvm")
    assert set(entry["ms"]) == {"direct", "im2col", "fft", "winograd_f2", "winograd_f4"}
    assert chosen[0][1] == entry["algo"] == min(entry["ms"], key=entry["ms"].get)
    exe = tdc.compile(g, backend="llvm", autotune=True, params={"w": np.ones((8, 8, 3, 3), np.float32)})
    assert f'tdc_conv2d_{entry["algo"]}_f32' in exe.source()


def large_constant_graph():
    """x @ C * w with C a 1 MB constant, above codegen.BOUND_LITERAL_BYTES, and a view of C as an
    output: C goes into the weights buffer after the param w, not into the module."""
    rng = np.random.default_rng(0)
    g = Graph("bigconst")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (2, 256)), "input")
        w = b.arg("w", TensorType("f32", (1024,)), "param")
        c = b.constant(rng.standard_normal((256, 1024)), "f32")
        g.add_output("y", (F.matmul(x, c) * w).value)
        g.add_output("c", F.reshape(c, (1024, 256)).value)
    return g, {"w": rng.standard_normal(1024).astype(np.float32)}, {"x": rng.standard_normal((2, 256)).astype(np.float32)}


def test_large_constant_is_bound_in_the_weights_buffer_not_the_module():
    from tdc.backends.llvm.codegen import BOUND_LITERAL_BYTES
    g, params, feed = large_constant_graph()
    assert 256 * 1024 * 4 > BOUND_LITERAL_BYTES
    exe = tdc.compile(g, backend="llvm", params=params)
    assert exe.module_builder.weights.literals and len(exe.source()) < 100_000
    assert set(exe.state) == {"w"}
    ref = tdc.compile(g, params=params)(**feed)
    got = exe(**feed)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got["c"], ref["c"])
