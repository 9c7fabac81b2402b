"""sparse_linear (CSR weights) and the sparsify pass: the op against a dense linear on the reference,
the C runtime and the Numba kernel (random shapes and densities, empty rows, no nonzeros), whole
graphs on every backend and in a native bundle, the cost model's choices, refusals (training,
malformed CSR arrays) and what `tdc dump --sparse` shows."""
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tdc
from tdc.backends import get_target
from tdc.cli import main
from tdc.errors import TdcError
from tdc.frontend.init import init_params
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ops.sparse import check_csr, dense_weight, to_csr
from tdc.ops.tensor import Builder
from tdc.passes.sparsify import sparse_training, sparsify

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from lenet import lenet  # noqa: E402
from mlp import mlp  # noqa: E402


def _pruned(rng, n, k, density, dtype=np.float32, empty_rows=()):
    w = rng.standard_normal((n, k)).astype(dtype)
    w[rng.random((n, k)) >= density] = 0
    for r in empty_rows:
        if r < n:
            w[r] = 0
    return w


def _bound(x2, w, dtype):
    """Float error allowed: a few ulps of the sum of |x||w| per output (the terms' rounding)."""
    eps = np.finfo(dtype).eps
    return 8 * eps * (np.abs(x2) @ np.abs(w).T) + np.finfo(dtype).tiny


def _reference_linear(x, w, b):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y + b if b is not None else y


# ---- the op's kernels against a float64 dense product ----------------------------------

def _c_kernel(x2, v, c, r, b, n):
    from tdc.backends.llvm.target import runtime_library
    lib = runtime_library()
    m, k = x2.shape
    out = np.full((m, n), np.nan, x2.dtype)
    bias = b if b is not None else np.zeros(1, x2.dtype)
    fn = lib.tdc_sparse_linear_f32 if x2.dtype == np.float32 else lib.tdc_sparse_linear_f64
    arrs = [np.ascontiguousarray(a) for a in (x2, v, c, r, bias)]
    p = [ctypes.c_void_p(a.ctypes.data) for a in arrs]
    fn(*p, ctypes.c_int64(b is not None), ctypes.c_void_p(out.ctypes.data),
       *(ctypes.c_int64(d) for d in (m, k, n)))
    return out


def _numba_kernel(x2, v, c, r, b, n):
    from tdc.backends.numba import kernels as K
    out = np.full((x2.shape[0], n), np.nan, x2.dtype)
    K.sparse_linear(x2, v, c, r, b if b is not None else np.zeros(1, x2.dtype), b is not None, out)
    return out


def _ref_op(x2, v, c, r, b, n):
    from tdc.ir.opdef import get_op
    return get_op("sparse_linear").ref(x2, v, c, r, *([b] if b is not None else []))


KERNELS = {"reference": _ref_op, "llvm": _c_kernel, "numba": _numba_kernel}


@pytest.mark.parametrize("backend", list(KERNELS))
@settings(max_examples=40, deadline=None)
@given(m=st.sampled_from([1, 2, 3, 4, 5, 8, 15, 16, 17, 31, 33, 64, 65, 130]), k=st.integers(0, 70),
       n=st.integers(0, 40), density=st.sampled_from([0.0, 0.02, 0.1, 0.5, 0.9, 1.0]), bias=st.booleans(),
       f64=st.booleans(), seed=st.integers(0, 2**31))
def test_kernel_matches_dense_linear(backend, m, k, n, density, bias, f64, seed):
    dtype = np.float64 if f64 else np.float32
    rng = np.random.default_rng(seed)
    w = _pruned(rng, n, k, density, dtype, empty_rows=(0, n // 2))
    x = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype) if bias else None
    v, c, r = to_csr(w)
    got = KERNELS[backend](x, v, c, r, b, n)
    assert got.shape == (m, n) and got.dtype == dtype
    want = _reference_linear(x, w, b)
    assert np.all(np.abs(got - want) <= _bound(x, w, dtype) + 8 * np.finfo(dtype).eps * np.abs(want))


def test_csr_round_trip_and_checks():
    rng = np.random.default_rng(0)
    w = _pruned(rng, 7, 9, 0.3, empty_rows=(0, 6))
    v, c, r = to_csr(w)
    assert c.dtype == np.int32 and r.dtype == np.int32 and r[0] == 0 and r[-1] == len(v)
    np.testing.assert_array_equal(dense_weight(v, c, r, 9), w)
    check_csr(v, c, r, 9)
    k = int(c.max())     # one column too few for the largest index
    with pytest.raises(TdcError, match=rf"column indices must lie in \[0, {k}\)"):
        check_csr(v, c, r, k)
    bad = r.copy()
    bad[3] = bad[4] + 1
    with pytest.raises(TdcError, match="never decrease"):
        check_csr(v, c, bad, 9)


# ---- whole graphs on every backend -------------------------------------------------------

def _sparse_graph(m, k, n, nnz, lead=()):
    g = Graph("s")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (*lead, m, k)), "input")
        args = [b.arg("v", TensorType("f32", (nnz,)), "const"), b.arg("c", TensorType("i32", (nnz,)), "const"),
                b.arg("r", TensorType("i32", (n + 1,)), "const"), b.arg("b", TensorType("f32", (n,)), "param")]
        y = b.apply("sparse_linear", [x, *args]).relu()
        g.add_output("y", y.value)
    return g


@pytest.mark.parametrize("backend", ["reference", "numba", "llvm"])
@pytest.mark.parametrize("m,density,lead", [(1, 0.1, ()), (64, 0.1, ()), (5, 0.0, (2,)), (33, 1.0, ())])
def test_graph_matches_dense(backend, m, density, lead):
    rng = np.random.default_rng(m)
    k, n = 37, 19
    w = _pruned(rng, n, k, density, empty_rows=(3,))
    v, c, r = to_csr(w)
    bias = rng.standard_normal(n).astype(np.float32)
    g = _sparse_graph(m, k, n, len(v), lead)
    x = rng.standard_normal((*lead, m, k)).astype(np.float32)
    got = tdc.compile(g, backend=backend, params={"v": v, "c": c, "r": r, "b": bias})(x=x)["y"]
    want = np.maximum(_reference_linear(x, w, bias), 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "numba", "llvm"])
def test_malformed_csr_is_refused_before_any_kernel_runs(backend):
    v, c, r = to_csr(np.eye(4, 6, dtype=np.float32))
    g = _sparse_graph(2, 6, 4, len(v))
    c_bad = c.copy()
    c_bad[1] = 6
    params = {"v": v, "c": c_bad, "r": r, "b": np.zeros(4, np.float32)}
    with pytest.raises(TdcError, match="column indices"):
        tdc.compile(g, backend=backend, params=params)(x=np.ones((2, 6), np.float32))
    exe = tdc.compile(g, backend=backend, params={**params, "c": c})
    if backend != "reference":
        with pytest.raises(TdcError, match="rowptr"):
            exe.set_state({"r": np.array([0, 1, 2, 3, 9], np.int32)})
        np.testing.assert_allclose(exe(x=np.ones((2, 6), np.float32))["y"], np.ones((2, 4)))   # unchanged


def test_shape_errors_are_clear():
    g = Graph("bad")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (2, 6)), "input")
        v = b.arg("v", TensorType("f32", (3,)), "const")
        c = b.arg("c", TensorType("i64", (3,)), "const")
        r = b.arg("r", TensorType("i32", (5,)), "const")
        with pytest.raises(TdcError, match="cols and rowptr must be i32"):
            b.apply("sparse_linear", [x, v, c, r])


def test_training_graphs_refused_by_the_inference_pass():
    g, params = _mlp_params(0.9, batch=2)
    step = tdc.train_step(g, loss="softmax_cross_entropy", optimizer=tdc.Optimizer("sgd", lr=0.1))
    with pytest.raises(TdcError, match="inference"):
        sparsify(step, params, mode="on")
    sg, _, _ = sparsify(g, params, mode="on")
    assert [a.name for a in sg.params] == ["fc1.bias", "fc2.bias", "fc3.bias"]   # the biases stay trainable
    with pytest.raises(TdcError, match="before train_step"):
        sparse_training(step, params)


# ---- training through CSR layers -------------------------------------------------------------

GRAD_CASES = [(1, 37, 19, 0.1), (3, 9, 5, 0.0), (64, 50, 30, 0.2), (70, 33, 17, 1.0)]   # (m, k, n, density)


def _grad_graph(op, m, k, n, nnz, dtype="f32"):
    g = Graph(op)
    with Builder(g) as b:
        first = b.arg("a", TensorType(dtype, (m, n if op.endswith("input") else k)), "input")
        second = (b.arg("v", TensorType(dtype, (nnz,)), "const") if op.endswith("input")
                  else b.arg("g", TensorType(dtype, (m, n)), "input"))
        idx = [b.arg("c", TensorType("i32", (nnz,)), "const"), b.arg("r", TensorType("i32", (n + 1,)), "const")]
        y = b.apply(op, [first, second, *idx], {"k": k} if op.endswith("input") else {})
        g.add_output("y", y.value)
    return g


@pytest.mark.parametrize("backend", ["reference", "numba", "llvm"])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradient_kernels_match_dense_products(backend, case):
    """sparse_linear's two gradient ops against float64 dense formulations: dx = g @ W and
    dv[j] = (g.T @ x)[row(j), cols[j]], within a few ulps of the sums of |terms|."""
    m, k, n, density = case
    rng = np.random.default_rng(m * k)
    w = _pruned(rng, n, k, density, empty_rows=(2,))
    v, c, r = to_csr(w)
    gy, x = rng.standard_normal((m, n)).astype(np.float32), rng.standard_normal((m, k)).astype(np.float32)
    eps = 8 * np.finfo(np.float32).eps
    dx = _run_kernel(backend, _grad_graph("sparse_linear_grad_input", m, k, n, len(v)).nodes[0], [gy, v, c, r])
    want = gy.astype(np.float64) @ w.astype(np.float64)
    assert np.all(np.abs(dx - want) <= eps * (np.abs(gy) @ np.abs(w)) + 1e-30)
    dv = _run_kernel(backend, _grad_graph("sparse_linear_grad_values", m, k, n, len(v)).nodes[0], [x, gy, c, r])
    rows = np.repeat(np.arange(n), np.diff(r))
    full = gy.astype(np.float64).T @ x.astype(np.float64)
    bound = eps * (np.abs(gy).T @ np.abs(x))[rows, c] + 1e-30
    assert dv.shape == (len(v),) and np.all(np.abs(dv - full[rows, c]) <= bound)


def test_sparse_linear_gradients_match_finite_differences():
    from tdc.runtime.gradcheck import gradcheck
    rng = np.random.default_rng(7)
    w = _pruned(rng, 6, 9, 0.4)
    v, c, r = to_csr(w)
    g = Graph("gc")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (2, 3, 9)), "input")
        args = [b.arg("v", TensorType("f32", (len(v),)), "param"), b.arg("c", TensorType("i32", (len(v),)), "const"),
                b.arg("r", TensorType("i32", (7,)), "const"), b.arg("b", TensorType("f32", (6,)), "param")]
        y = b.apply("sparse_linear", [x, *args]).tanh()
        g.add_output("loss", b.apply("reduce_sum", [y * y]).value)
    errors = gradcheck(g, {"x": rng.standard_normal((2, 3, 9)), "v": v, "c": c, "r": r,
                           "b": rng.standard_normal(6)}, loss="loss", wrt=["x", "v", "b"])
    assert set(errors) == {"x", "v", "b"} and max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("optimizer,backends", [("momentum", ("reference", "llvm")),
                                                ("adam", ("reference", "numba", "llvm"))])   # one numba step: cold, 20 s
def test_sparse_training_matches_masked_dense_training(optimizer, backends):
    """Ten steps of the MLP pruned to 90%, trained as CSR (values the param) on every backend,
    against the dense step with the prune pass's masks on the reference: the same weights within
    float32 rounding, and every pruned weight still exactly zero."""
    from tdc.passes.sparsify import dense_params
    rng = np.random.default_rng(1)
    g, p = _mlp_params(0.9, seed=2, batch=16)
    g = mlp.trace(batch=16, training=True)
    opt = tdc.Optimizer(optimizer, lr=0.01)
    sg, sp, decisions = sparse_training(g, p)
    assert [d.weight for d in decisions] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    step = tdc.train_step(sg, loss="softmax_cross_entropy", optimizer=opt)
    masked = tdc.train_step(g, loss="softmax_cross_entropy", optimizer=opt, prune=True)
    batches = [(rng.standard_normal((16, 784)).astype(np.float32), rng.integers(0, 10, 16)) for _ in range(10)]

    def run(graph, backend, params):
        exe = tdc.compile(graph, backend=backend, params={a.name: params[a.name] for a in graph.args if a.name in params})
        for x, y in batches:
            exe(x=x, y=y.astype(graph.arg("y").type.np_dtype), lr=np.float32(0.01))
        return exe.state

    masks = {k + ".mask": (p[k] != 0).astype(np.float32) for k in ("fc1.weight", "fc2.weight", "fc3.weight")}
    want = run(masked, "reference", {**p, **masks})
    for backend in backends:
        got = dense_params(step, run(step, backend, sp))
        for k in ("fc1.weight", "fc2.weight", "fc3.weight", "fc1.bias"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=f"{backend} {k}")
            if k.endswith("weight"):
                assert np.all(got[k][p[k] == 0] == 0)


def test_cli_train_sparse_retrains_pruned_weights(tmp_path, capsys):
    from tdc.runtime.data import write_digits_as_mnist
    write_digits_as_mnist(str(tmp_path / "mn"))
    data = f"mnist:{tmp_path / 'mn'}"
    pruned, out = tmp_path / "p.npz", tmp_path / "s.npz"
    assert main(["train", "examples/mlp.py", "--data", data, "--epochs", "2", "--prune", "0.9", "--backend", "llvm",
                 "--save-weights", str(pruned), "--no-progress"]) == 0
    assert main(["train", "examples/mlp.py", "--data", data, "--epochs", "1", "--weights", str(pruned),
                 "--sparse", "on", "--backend", "llvm", "--save-weights", str(out), "--no-progress"]) == 0
    a, b = np.load(pruned), np.load(out)
    assert set(b.files) == set(a.files)
    for k in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert np.all(b[k][a[k] == 0] == 0) and not np.array_equal(a[k], b[k])
    capsys.readouterr()
    assert main(["train", "examples/mlp.py", "--data", data, "--sparse", "on", "--no-progress"]) == 1
    assert "--weights FILE" in capsys.readouterr().err
    assert main(["train", "examples/mlp.py", "--data", data, "--sparse", "on", "--weights", str(pruned), "--prune",
                 "0.5", "--no-progress"]) == 1
    assert "does not combine with --prune" in capsys.readouterr().err


# ---- the pass and its cost model ----------------------------------------------------------

def _mlp_params(sparsity, seed=0, batch=1):
    g = mlp.trace(batch=batch)
    p = init_params(g, seed)
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        w = p[name]
        if sparsity:
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0
    return g, p


@pytest.mark.parametrize("batch", [1, 64])
def test_cost_model_picks_sparse_when_pruned_and_dense_when_not(batch):
    target = get_target("llvm")
    g, p = _mlp_params(0.95, batch=batch)
    _, _, decisions = sparsify(g, p, target, "auto")
    by = {d.weight: d for d in decisions}
    assert by["fc1.weight"].sparse and by["fc2.weight"].sparse, [d.line() for d in decisions]
    g0, p0 = _mlp_params(0.0, batch=batch)
    sg, sp, decisions = sparsify(g0, p0, target, "auto")
    assert not any(d.sparse for d in decisions) and "sparse_linear" not in sg.op_counts()
    assert sp.keys() == p0.keys()


def _lenet_params(sparsity, seed=0, batch=1):
    g = lenet.trace(batch=batch)
    p = init_params(g, seed)
    for name, w in p.items():
        if name.endswith("weight") and sparsity:
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0
    return g, p


@pytest.mark.parametrize("backend", ["numba", "llvm"])
def test_cost_model_prices_conv_layers(backend):
    """LeNet-5 pruned to 95% at batch 64: on llvm both convolutions go sparse (its kernel is 4-10x
    faster there, benchmarks/sparse.py; numba's dense conv model is too rough at this size to assert
    a choice); unpruned, none does on either backend. Every conv gets a decision either way."""
    target = get_target(backend)
    g, p = _lenet_params(0.95, batch=64)
    sg, _, decisions = sparsify(g, p, target, "auto")
    by = {d.weight: d for d in decisions}
    assert by["conv2.weight"].shape == (16, 150) and f"{backend} cost model at batch 64" in by["conv2.weight"].why
    if backend == "llvm":
        assert by["conv1.weight"].sparse and by["conv2.weight"].sparse, [d.line() for d in decisions]
        assert sg.op_counts()["sparse_conv2d"] == 2 and "conv2d" not in sg.op_counts()
    g0, p0 = _lenet_params(0.0, batch=64)
    _, _, decisions = sparsify(g0, p0, target, "auto")
    assert {d.weight for d in decisions} >= {"conv1.weight", "conv2.weight"} and not any(d.sparse for d in decisions)


def test_pruned_lenet_runs_sparse_on_every_backend_and_natively(tmp_path):
    from tdc.backends.llvm.bundle import write_bundle
    g, p = _lenet_params(0.9, seed=1, batch=3)
    sg, sp, _ = sparsify(g, p, mode="on")
    assert sg.op_counts()["sparse_conv2d"] == 2 and sg.op_counts()["sparse_linear"] == 3
    x = np.random.default_rng(3).standard_normal((3, 1, 28, 28)).astype(np.float32)
    want = tdc.compile(g, backend="reference", params=p)(x=x)["out"]
    for backend in ("reference", "numba", "llvm"):
        np.testing.assert_allclose(tdc.compile(sg, backend=backend, params=sp)(x=x)["out"], want, rtol=1e-4,
                                   atol=1e-5, err_msg=backend)
    b = write_bundle(sg, str(tmp_path / "bundle"), params=sp, copy_blas=False)
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([b.executable, "--input", f"x={tmp_path / 'x.npy'}", "--output", f"out={tmp_path / 'y.npy'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-4, atol=1e-5)


def test_pass_rewrites_the_graph_and_params():
    g, p = _mlp_params(0.9)
    sg, sp, decisions = sparsify(g, p, mode="on")
    assert sg.op_counts()["sparse_linear"] == 3 and "linear" not in sg.op_counts()
    assert "fc1.weight" not in sp and "fc1.weight" not in {a.name for a in sg.args}
    assert sp["fc1.weight.values"].size == np.count_nonzero(p["fc1.weight"]) == decisions[0].nnz
    x = np.random.default_rng(1).standard_normal((1, 784)).astype(np.float32)
    np.testing.assert_allclose(tdc.compile(sg, params=sp)(x=x)["out"], tdc.compile(g, params=p)(x=x)["out"],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(TdcError, match="--sparse must be one of"):
        sparsify(g, p, mode="yes")


def test_layer_with_no_nonzeros():
    g, p = _mlp_params(0.0)
    p["fc2.weight"][:] = 0
    sg, sp, _ = sparsify(g, p, mode="on")
    assert sp["fc2.weight.values"].size == 0
    x = np.random.default_rng(2).standard_normal((1, 784)).astype(np.float32)
    want = tdc.compile(g, params=p)(x=x)["out"]
    for backend in ("llvm", "numba"):
        np.testing.assert_allclose(tdc.compile(sg, backend=backend, params=sp)(x=x)["out"], want, rtol=1e-5,
                                   atol=1e-6)


# ---- native bundle and the CLI -------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("sparse")
    g, p = _mlp_params(0.9, seed=3, batch=4)
    np.savez(d / "w.npz", **p)
    x = np.random.default_rng(4).standard_normal((4, 784)).astype(np.float32)
    np.save(d / "x.npy", x)
    return d, g, p, x


def test_native_bundle_with_sparse_layers_matches_dense_model(pruned_weights):
    from tdc.backends.llvm.bundle import write_bundle
    d, g, p, x = pruned_weights
    sg, sp, _ = sparsify(g, p, mode="on")
    b = write_bundle(sg, str(d / "bundle"), params=sp, copy_blas=False)
    r = subprocess.run([b.executable, "--input", f"x={d / 'x.npy'}", "--output", f"out={d / 'y.npy'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(d / "y.npy"), tdc.compile(g, params=p)(x=x)["out"], rtol=1e-5, atol=1e-5)


def test_cli_dump_names_the_sparse_layers(pruned_weights, capsys):
    d, *_ = pruned_weights
    assert main(["dump", "examples/mlp.py", "--batch", "4", "--weights", str(d / "w.npz"), "--sparse", "on"]) == 0
    out = capsys.readouterr().out
    for layer in ("fc1", "fc2", "fc3"):
        assert f"// sparsify: {layer}.weight [" in out and "csr, density 0.1000" in out
    assert out.count("= sparse_linear(") == 3
    assert main(["dump", "examples/mlp.py", "--weights", str(d / "w.npz"), "--sparse", "off"]) == 0
    assert "sparse_linear" not in capsys.readouterr().out
    assert main(["dump", "examples/mlp.py", "--sparse", "sometimes"]) == 1
    assert "--sparse must be one of auto, on, off" in capsys.readouterr().err


def test_cli_run_sparse_matches_dense(pruned_weights, capsys):
    d, *_ = pruned_weights
    outs = {}
    for mode in ("on", "off"):
        assert main(["run", "examples/mlp.py", "--batch", "4", "--weights", str(d / "w.npz"), "--input",
                     f"x={d / 'x.npy'}", "--sparse", mode, "--output", str(d / f"{mode}.npy")]) == 0
        outs[mode] = np.load(d / f"{mode}.npy")
    np.testing.assert_allclose(outs["on"], outs["off"], rtol=1e-5, atol=1e-6)
    assert main(["run", "examples/mlp.py", "--random-inputs", "--sparse", "on"]) == 1
    assert "needs the pruned weights" in capsys.readouterr().err


def test_calibrate_recovers_the_per_call_and_rate_terms_of_a_synthetic_target():
    """calibrate fits C + work / rate per kernel: on a target whose timers follow the model
    exactly, the fitted rates are the true ones, and the per-call term moves the break-even of a
    small layer (it would not without it)."""
    from tdc.passes import sparsify as S

    true = S.SparseRates(2e-7, 4e10, 1.5e-6, 9e10, 1e-7, 1e9, 2.5e9, 5e-7, 6e9, 3e10)

    class Synthetic:
        def time_linear(self, m, k, n):
            return true.times(m, k, n, 0)[0]

        def time_sparse_linear(self, m, k, n, density):
            return true.times(m, k, n, round(density * k * n))[1]

    got = S.calibrate(Synthetic())
    for f in S.SparseRates.__dataclass_fields__:
        assert getattr(got, f) == pytest.approx(getattr(true, f), rel=0.05), f
    no_call = S.SparseRates(0.0, 4e10, 0.0, 9e10, 0.0, 1e9, 2.5e9, 0.0, 6e9, 3e10)
    assert true.break_even(64, 100, 10) > 2 * no_call.break_even(64, 100, 10)


# ---- sparse_conv2d ------------------------------------------------------------------------

CONV_CASES = [   # (n, c, h, w, co, kh, kw, stride, pad, dilation, groups, density)
    (2, 3, 9, 8, 5, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.3),
    (2, 4, 11, 10, 6, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 2, 0.5),
    (1, 3, 12, 12, 4, 3, 2, (1, 2), (2, 0, 1, 3), (2, 2), 1, 0.2),
    (3, 6, 14, 14, 16, 5, 5, (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.1),   # LeNet-5's conv2
    (2, 8, 5, 7, 6, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 2, 0.4),      # 1x1, groups 2
    (2, 3, 6, 6, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.0),      # no nonzeros: bias only
    (9, 2, 13, 11, 3, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 1.0),   # dense, columns past whole vectors
]


def _sparse_conv_graph(x_shape, co, kernel, nnz, geo, bias, dtype="f32"):
    g = Graph("sc")
    with Builder(g) as b:
        x = b.arg("x", TensorType(dtype, x_shape), "input")
        args = [b.arg("v", TensorType(dtype, (nnz,)), "const"), b.arg("c", TensorType("i32", (nnz,)), "const"),
                b.arg("r", TensorType("i32", (co + 1,)), "const")]
        if bias:
            args.append(b.arg("b", TensorType(dtype, (co,)), "param"))
        y = b.apply("sparse_conv2d", [x, *args], {"kernel": kernel, **geo}).relu()
        g.add_output("y", y.value)
    return g


def _run_kernel(backend, node, ins):
    """The backend's kernel for library op `node` on `ins`, called directly (no graph compiled:
    one kernel serves every shape, where a compiled graph is one module per shape)."""
    if backend == "reference":
        return node.opdef.ref(*ins, **node.attrs)
    if backend == "llvm":
        from tdc.backends.llvm.target import library_runner
        _, (_, outs) = library_runner(node, ins)()
        return outs[0]
    from tdc.backends.numba.codegen import LIBRARY
    outs = [np.full(v.type.shape, np.nan, v.type.np_dtype) for v in node.outputs]
    fn, args = LIBRARY[node.op](node, ins, outs)
    fn(*args)
    return outs[0]


@pytest.mark.parametrize("backend", ["reference", "numba", "llvm"])
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_conv2d_matches_dense_conv2d(backend, case, bias):
    """The op's kernel on every backend against float64 dense conv2d, within a few float32 ulps of
    the sum of |x||w| per output (the fused relu epilogue: the graph tests below)."""
    from tdc.ir.opdef import get_op
    n, c, h, w, co, kh, kw, stride, pad, dil, groups, density = case
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    k = c // groups * kh * kw
    wm = _pruned(rng, co, k, density, empty_rows=(1,))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32)
    geo = dict(stride=stride, pad=pad, dilation=dil, groups=groups)
    v, cc, r = to_csr(wm)
    node = _sparse_conv_graph(x.shape, co, (kh, kw), len(v), geo, bias).nodes[0]
    got = _run_kernel(backend, node, [x, v, cc, r] + ([b] if bias else []))
    x64, w64 = x.astype(np.float64), wm.reshape(co, c // groups, kh, kw).astype(np.float64)
    conv = get_op("conv2d").ref
    want = conv(x64, w64, *([b.astype(np.float64)] if bias else []), algo="auto", algo_note="", **geo)
    absum = conv(np.abs(x64), np.abs(w64), algo="auto", algo_note="", **geo) + (np.abs(b)[:, None, None] if bias else 0)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.all(np.abs(got - want) <= 8 * np.finfo(np.float32).eps * absum + np.finfo(np.float32).tiny)
    if density == 0.0:
        np.testing.assert_array_equal(got, np.broadcast_to((b if bias else np.zeros(co, np.float32))[:, None, None],
                                                           got.shape))


@pytest.mark.parametrize("backend", ["numba", "llvm"])
def test_sparse_conv2d_f64_and_malformed_csr(backend):
    rng = np.random.default_rng(5)
    wm = _pruned(rng, 4, 2 * 9, 0.3, np.float64)
    v, c, r = to_csr(wm)
    geo = dict(stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    g = _sparse_conv_graph((2, 2, 7, 7), 4, (3, 3), len(v), geo, False, "f64")
    x = rng.standard_normal((2, 2, 7, 7))
    got = tdc.compile(g, backend=backend, params={"v": v, "c": c, "r": r})(x=x)["y"]
    want = tdc.compile(g, backend="reference", params={"v": v, "c": c, "r": r})(x=x)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    bad = c.copy()
    bad[0] = 18                                      # one past K = C * KH * KW
    with pytest.raises(TdcError, match="sparse_conv2d.*column indices"):
        tdc.compile(g, backend=backend, params={"v": v, "c": bad, "r": r})(x=x)


def test_sparse_conv2d_infers_the_shape_and_refuses_a_bad_layer():
    from tdc.ir.opdef import get_op
    op = get_op("sparse_conv2d")
    csr = [TensorType("f32", (7,)), TensorType("i32", (7,)), TensorType("i32", (17,))]
    geo = dict(stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1), groups=1, note="")
    attrs = op.normalize_attrs({"kernel": (5, 5)})
    assert op.infer_types([TensorType("f32", (64, 6, 14, 14)), *csr], attrs)[0].shape == (64, 16, 10, 10)
    with pytest.raises(TdcError, match="does not fit"):
        op.infer_types([TensorType("f32", (1, 6, 3, 3)), *csr], attrs)
    with pytest.raises(TdcError, match="divisible"):
        op.infer_types([TensorType("f32", (1, 6, 14, 14)), *csr], {**attrs, "groups": 4})
    with pytest.raises(TdcError, match="kernel.*required"):
        op.normalize_attrs({})
    with pytest.raises(TdcError, match="column indices"):
        op.ref(np.zeros((1, 1, 3, 3), np.float32), np.ones(1, np.float32), np.array([9], np.int32),
               np.array([0, 1], np.int32), kernel=(3, 3), **geo)


def test_sparse_conv2d_has_no_gradient():
    g = Graph("sc")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (2, 6, 14, 14)), "input")
        csr = [b.arg("v", TensorType("f32", (7,)), "const"), b.arg("c", TensorType("i32", (7,)), "const"),
               b.arg("r", TensorType("i32", (17,)), "const"), b.arg("b", TensorType("f32", (16,)), "param")]
        y = b.apply("sparse_conv2d", [x, *csr], {"kernel": (5, 5)}).relu()
        g.add_output("y", b.apply("flatten", [y]).value)
    with pytest.raises(TdcError, match="no gradient rule"):
        tdc.train_step(g, loss="mse", optimizer=tdc.Optimizer("sgd", lr=0.1))
