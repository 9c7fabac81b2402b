"""The Numba backend against the reference interpreter: every op forward and backward,
the example training steps, and random fused graphs."""
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
from tdc.passes.autodiff import autodiff
from tdc.passes.retype import retype
from tdc.frontend.init import init_params

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from test_autodiff import CASES, _graph_for  # noqa: E402


def _values(g, seed=0):
    rng = np.random.default_rng(seed)
    vals = init_params(g, seed)
    for a in g.inputs:
        if a.type.dtype.startswith("f"):
            vals[a.name] = rng.standard_normal(a.type.shape).astype(a.type.np_dtype)
    return vals


def _compare(graph, values, rtol, atol=1e-6, backend="numba"):
    inputs = {a.name: values[a.name] for a in graph.inputs}
    params = {a.name: values[a.name] for a in graph.args if a.kind != "input"}
    ref = tdc.compile(graph, params=params)
    nb = tdc.compile(graph, backend=backend, params=params)
    r, n = ref(**inputs), nb(**inputs)
    assert r.keys() == n.keys()
    for k in r:
        assert n[k].dtype == r[k].dtype and n[k].shape == r[k].shape, k
        np.testing.assert_allclose(n[k], r[k], rtol=rtol, atol=atol, err_msg=f"output {k}")
    for k in ref.state:
        np.testing.assert_allclose(nb.state[k], ref.state[k], rtol=rtol, atol=atol, err_msg=f"state {k}")
    return nb


# float32 is what models use; every op is checked in it. float64 is checked too, except for the
# convolution and pooling kernels, whose parallel float64 variants cost a minute of cold compile.
_F64 = [c for c in CASES if c[0].split("_")[0] not in ("conv2d", "maxpool2d", "avgpool2d")]


def check_op_case(op, inputs, attrs, dtype, backend):
    """One autodiff case (forward and gradients) on `backend` against the reference, in `dtype`."""
    g, values = _graph_for(op, inputs, attrs)
    if dtype == "f64":
        _compare(autodiff(g, "loss"), values, rtol=1e-9, atol=1e-10, backend=backend)
        return
    g32 = retype(g, "f64", "f32")
    vals32 = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in values.items()}
    _compare(autodiff(g32, "loss"), vals32, rtol=1e-4, atol=1e-5, backend=backend)


@pytest.mark.parametrize("op,inputs,attrs", _F64, ids=[f"{c[0]}-{i}" for i, c in enumerate(_F64)])
def test_op_forward_and_backward_match_reference_f64(op, inputs, attrs):
    check_op_case(op, inputs, attrs, "f64", "numba")


@pytest.mark.parametrize("op,inputs,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_op_forward_and_backward_match_reference_f32(op, inputs, attrs):
    check_op_case(op, inputs, attrs, "f32", "numba")


# VGG's step (batchnorm, 13 layers) trains on the LLVM backend's tests; on numba its cold compile
# alone took a minute of the suite, and its ops are checked one by one above.
@pytest.mark.parametrize("model,batch,opt", [("mlp", 8, "adam"), ("lenet", 4, "momentum"), ("digits", 8, "sgd")])
def test_training_steps_match_reference(model, batch, opt):
    mod = __import__(model)
    # eps well above float32 noise in tiny gradients: Adam divides by |g| + eps
    g = tdc.train_step(getattr(mod, model), optimizer=tdc.Optimizer(opt, lr=0.01, eps=1e-4), batch=batch)
    vals = _values(g)
    vals["y"] = np.arange(batch) % 10
    vals["lr"] = np.float32(0.01)
    _compare(g, vals, rtol=1e-4, atol=1e-5)


def test_inference_graphs_match_reference():
    for model in ("mlp", "lenet", "digits", "vgg"):
        mod = __import__(model)
        g = getattr(mod, model).trace(batch=3)
        _compare(g, _values(g), rtol=1e-4, atol=1e-5)


def test_fused_kernels_are_fewer_than_ops_and_source_is_shown():
    import lenet
    g = tdc.train_step(lenet.lenet, batch=4)
    exe = tdc.compile(g, backend="numba")
    n_ops = sum(1 for n in g.nodes if n.op not in ("constant", "full"))
    assert len(exe.program.steps) < n_ops
    src = exe.source()
    assert "@njit" in src and "prange" in src or "range" in src


def test_bad_labels_are_a_clear_error():
    import mlp
    g = tdc.train_step(mlp.mlp, batch=4)
    exe = tdc.compile(g, backend="numba")
    x = np.zeros((4, 784), np.float32)
    with pytest.raises(TdcError, match="label out of range"):
        exe(x=x, y=np.array([0, 1, 2, 10]), lr=np.float32(0.1))


_UNARY = ["relu", "exp", "tanh", "sigmoid", "neg", "abs"]
_BINARY = ["add", "sub", "mul", "maximum", "minimum"]


def _broadcasts(s, t):
    try:
        np.broadcast_shapes(s, t)
        return True
    except ValueError:
        return False


@st.composite
def _random_graph(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    g = Graph("rand")
    with Builder(g) as b:
        vals = [b.arg("x0", TensorType("f32", shape), "input")]
        small = tuple(d if draw(st.booleans()) else 1 for d in shape)
        vals.append(b.arg("x1", TensorType("f32", small), "input"))
        for i in range(draw(st.integers(1, 6))):
            kind = draw(st.sampled_from(["u", "b", "r"]))
            a = draw(st.sampled_from(vals))
            if kind == "u":
                vals.append(F.apply(draw(st.sampled_from(_UNARY)), a))
            elif kind == "b":
                partners = [v for v in vals if _broadcasts(v.shape, a.shape)]
                vals.append(F.apply(draw(st.sampled_from(_BINARY)), a, draw(st.sampled_from(partners))))
            elif a.ndim:
                axes = draw(st.lists(st.integers(0, a.ndim - 1), min_size=1, max_size=a.ndim, unique=True))
                vals.append(F.apply(draw(st.sampled_from(["reduce_sum", "reduce_max", "reduce_mean"])), a,
                                    axes=tuple(axes), keepdims=draw(st.booleans())))
        for j, v in enumerate(vals[2:] or vals[:1]):
            g.add_output(f"o{j}", v.value)
    return g


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_random_graph())
def test_random_fused_graphs_match_reference(g):
    _compare(g, _values(g), rtol=1e-5, atol=1e-5)


def test_second_run_loads_from_the_cache_and_gives_the_same_result(tmp_path):
    """A cache hit (a new process, same graph) must work and be fast: it once crashed because
    cached drivers call parallel kernels before Numba's thread pool was started."""
    import subprocess
    env = {**os.environ, "TDC_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "tdc.cli", "run", os.path.join(os.path.dirname(__file__), "..", "examples",
                                                                  "mlp.py"), "--batch", "2", "--random-inputs"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-500:]
    assert first.stdout == second.stdout and first.stdout.startswith("out: f32[2,10]")


def test_integer_reductions():
    g = Graph("ints")
    with Builder(g) as b:
        x = b.arg("x", TensorType("i32", (3, 4)), "input")
        g.add_output("max", F.max(x, 1).value)
        g.add_output("sum", F.sum(x, 0).value)
    x = np.array([[-5, -7, -9, -1], [3, 0, 2, 1], [-100, 4, 4, -3]], np.int32)
    out = tdc.compile(g, backend="numba")(x=x)
    np.testing.assert_array_equal(out["max"], x.max(1))
    np.testing.assert_array_equal(out["sum"], x.sum(0))
