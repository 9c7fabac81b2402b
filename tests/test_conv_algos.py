"""Convolution algorithms (direct, im2col, FFT, Winograd F(2x2,3x3) and F(4x4,3x3)) against a
float64 direct convolution, forward and both backward passes; the conv_algo pass (legality,
forced algorithms and their fallback, the autotune cache); --conv-algo on the command line.

Everything runs in float32 (one Numba specialization per kernel) and compares with the float64
reference; the error is max|got - ref| / max|ref| with a bound per algorithm (README: "Convolution
algorithms")."""
import json
import os
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tdc
from tdc.backends.numba import conv_algos as CA
from tdc.backends.numba import kernels as K
from tdc.cli import main
from tdc.ir.graph import Graph
from tdc.ir.parser import parse_graph as parse
from tdc.ir.printer import print_graph
from tdc.ir.types import TensorType
from tdc.ops.conv import ALGORITHMS, legal_algos
from tdc.backends.numba.target import TARGET as NUMBA
from tdc.passes import conv_algo as P
from tdc.passes.target import Rates, Target

from helpers import FAST


class FixedTarget(Target):
    """The numba target's structure with given rates: the pass's logic, free of this machine's
    noise. By default the model as written (no overhead, scale 1, nothing per plane)."""
    name = "fixed"
    caches_filter_transforms = True

    def __init__(self, conv=None, threads=2):
        self._threads = threads
        self._rates = Rates(1e11, 1e10, conv or {a: (0.0, 1.0, 0.0) for a in ALGORITHMS})

    def threads(self):
        return self._threads

    def time_conv(self, node, algo):
        return NUMBA.time_conv(node, algo)

    def time_matmul(self, m, k, n):
        return NUMBA.time_matmul(m, k, n)


MODEL = FixedTarget()

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")

# Relative error bounds in float32 (max abs error over max |reference|). Winograd F(4x4) multiplies
# by larger transform coefficients (up to 8 in A^T, 5 in B^T), so its rounding errors are larger.
BOUND = {"direct": 1e-5, "im2col": 1e-5, "fft": 2e-5, "winograd_f2": 2e-5, "winograd_f4": 1e-4}
OPS = ("conv2d", "conv2d_grad_input", "conv2d_grad_weight")


def reference(x, w, b, gy, geo):
    """float64 direct convolution (loops over the kernel, numpy over the rest) and its adjoints."""
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    (sh, sw), (t, l, bo, r), (dh, dw), g = geo
    oh, ow = gy.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
    y = np.zeros((n, co, oh, ow))
    dxp = np.zeros_like(xp)
    dwt = np.zeros(w.shape)
    cog = co // g
    for grp in range(g):
        os_, cs = slice(grp * cog, (grp + 1) * cog), slice(grp * cg, (grp + 1) * cg)
        for i in range(kh):
            for j in range(kw):
                win = xp[:, cs, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                y[:, os_] += np.einsum("nchw,oc->nohw", win, w[os_, :, i, j])
                dxp[:, cs, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw] += \
                    np.einsum("nohw,oc->nchw", gy[:, os_], w[os_, :, i, j])
                dwt[os_, :, i, j] = np.einsum("nohw,nchw->oc", gy[:, os_], win)
    return y + b[:, None, None], dxp[:, :, t:t + h, l:l + wd], dwt


def run_algo(algo, op, x, w, b, gy, geo):
    """Run one algorithm's kernel for `op` on float32 copies; returns the float32 result."""
    (sh, sw), pad, (dh, dw), g = geo
    x32, w32, b32, g32 = (a.astype(np.float32) for a in (x, w, b, gy))
    flat = (sh, sw, pad[0], pad[1], dh, dw, g)
    if op == "conv2d":
        out = np.empty(gy.shape, np.float32)
        if algo == "fft":
            CA.fft_conv2d(x32, w32, b32, (sh, sw), pad, (dh, dw), g, out)
        elif algo in CA.WINOGRAD_M:
            s = CA.winograd_scratch(op, algo, x.shape, w.shape, gy.shape, g, np.float32)
            CA.winograd_conv2d(x32, w32, b32, True, out, pad[0], pad[1], *s)
        else:
            (CA.direct_conv2d if algo == "direct" else K.conv2d)(x32, w32, b32, True, out, *flat)
        return out
    if op == "conv2d_grad_input":
        out = np.empty(x.shape, np.float32)
        if algo == "fft":
            CA.fft_conv2d_grad_input(g32, w32, out, (sh, sw), pad, (dh, dw), g)
        elif algo in CA.WINOGRAD_M:
            s = CA.winograd_scratch(op, algo, gy.shape, w.shape, x.shape, g, np.float32)
            CA.winograd_conv2d_grad_input(g32, w32, out, pad[0], pad[1], *s)
        else:
            (CA.direct_conv2d_grad_input if algo == "direct" else K.conv2d_grad_input)(g32, w32, out, *flat)
        return out
    out = np.empty(w.shape, np.float32)
    if algo == "fft":
        CA.fft_conv2d_grad_weight(x32, g32, out, (sh, sw), pad, (dh, dw), g)
    elif algo in CA.WINOGRAD_M:
        s = CA.winograd_scratch(op, algo, x.shape, w.shape, gy.shape, g, np.float32)
        CA.winograd_conv2d_grad_weight(x32, g32, out, pad[0], pad[1], *s)
    else:
        (CA.direct_conv2d_grad_weight if algo == "direct" else K.conv2d_grad_weight)(x32, g32, out, *flat)
    return out


def check_all(n, c, co, hw, k, stride, pad, dil, groups, seed=0, algos=ALGORITHMS):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c) + hw)
    w = rng.standard_normal((co, c // groups) + k)
    b = rng.standard_normal(co)
    oh = (hw[0] + pad[0] + pad[2] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (hw[1] + pad[1] + pad[3] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    gy = rng.standard_normal((n, co, oh, ow))
    geo = (stride, pad, dil, groups)
    refs = dict(zip(OPS, reference(x, w, b, gy, geo)))
    legal = legal_algos("conv2d", k, stride, dil)
    errors = {}
    for algo in algos:
        if algo not in legal:
            continue
        for op in OPS:
            got = run_algo(algo, op, x, w, b, gy, geo)
            err = np.abs(got - refs[op]).max() / np.abs(refs[op]).max()
            errors[algo, op] = err
            assert err <= BOUND[algo], f"{algo} {op}: relative error {err:.2e} > {BOUND[algo]:.0e}"
    return errors


GEOMETRIES = [
    # (n, c, co, (h, w), (kh, kw), stride, pad, dilation, groups)
    (2, 3, 5, (9, 11), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 4, 6, (12, 10), (3, 3), (1, 1), (3, 0, 0, 4), (1, 1), 2),     # pads > 2: negative pads backward
    (2, 6, 4, (7, 8), (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    (1, 8, 8, (14, 14), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8),     # depthwise
    (2, 4, 6, (13, 11), (5, 5), (2, 3), (1, 2, 0, 2), (2, 1), 2),
    (1, 3, 4, (10, 9), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    (3, 2, 3, (8, 8), (3, 2), (1, 2), (2, 1, 0, 1), (3, 2), 1),
]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[f"g{i}" for i in range(len(GEOMETRIES))])
def test_every_algorithm_matches_float64_reference(geo):
    errors = check_all(*geo)
    k, s, d = geo[4], geo[5], geo[7]
    want = len(legal_algos("conv2d", k, s, d)) * 3
    assert len(errors) == want


def test_wide_layers_within_bounds():
    # longer reductions (more channels) grow the rounding error; the bounds still hold
    check_all(1, 64, 32, (12, 12), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)


@FAST
@given(n=st.integers(1, 2), cg=st.integers(1, 3), cog=st.integers(1, 3), groups=st.integers(1, 2),
       h=st.integers(3, 9), w=st.integers(3, 9), k=st.sampled_from([(3, 3), (1, 1), (2, 3), (3, 3)]),
       stride=st.sampled_from([(1, 1), (1, 1), (2, 1), (2, 2)]), dil=st.sampled_from([(1, 1), (1, 1), (2, 1)]),
       pad=st.tuples(*[st.integers(0, 3)] * 4), seed=st.integers(0, 1000))
def test_random_geometries_match_reference(n, cg, cog, groups, h, w, k, stride, dil, pad, seed):
    ek = [(k[i] - 1) * dil[i] + 1 for i in range(2)]
    if h + pad[0] + pad[2] < ek[0] or w + pad[1] + pad[3] < ek[1]:
        return
    check_all(n, cg * groups, cog * groups, (h, w), k, stride, pad, dil, groups, seed)


def test_winograd_matrices_compute_1d_correlation():
    rng = np.random.default_rng(0)
    for m in (2, 4):
        AT, G, BT = CA.winograd_matrices(m)
        d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
        want = np.array([d[i:i + 3] @ g for i in range(m)])
        np.testing.assert_allclose(AT @ ((G @ g) * (BT @ d)), want, rtol=1e-12, atol=1e-12)


def test_fft_sizes_are_smooth_and_large_enough():
    for n in (1, 7, 11, 13, 58, 97, 225, 1000):
        s = CA.fast_size(n)
        assert s >= n and s < 2 * n + 2
        for p in (2, 3, 5, 7):
            while s % p == 0:
                s //= p
        assert s == 1


# ---- the conv_algo pass ------------------------------------------------------------------------

def _conv_graph(x_shape, w_shape, training=False, **attrs):
    g = Graph("c")
    x = g.add_arg("x", TensorType("f32", x_shape), "input")
    w = g.add_arg("w", TensorType("f32", w_shape), "param", {"init": "he_normal"})
    (y,) = g.emit("conv2d", [x, w], attrs)
    if training:
        from tdc.ops import functional as F
        from tdc.ops.tensor import Builder, Tensor
        with Builder(g) as b:
            loss = F.apply("reduce_sum", Tensor(y, b) * Tensor(y, b), axes=None)
        g.add_output("loss", loss.value)
        from tdc.passes.autodiff import autodiff
        return autodiff(g, "loss")
    g.add_output("y", y)
    return g


@FAST
@given(k=st.sampled_from([(1, 1), (3, 3), (5, 5), (3, 1)]), stride=st.sampled_from([(1, 1), (2, 2), (1, 2)]),
       dil=st.sampled_from([(1, 1), (2, 2)]), request=st.sampled_from(("auto",) + tuple(P.CONV_ALGOS[1:])),
       c=st.sampled_from([1, 8, 64]))
def test_selector_never_picks_an_illegal_algorithm(k, stride, dil, request, c):
    g = _conv_graph((2, c, 12, 12), (c, c) + k, training=True, stride=stride, dilation=dil, algo=request)
    out = P.select_conv_algos(g, MODEL)
    for n in out.nodes:
        if n.op in P.CONV_OPS:
            legal = legal_algos(n.op, k, stride, dil)
            assert n.attrs["algo"] in legal
            if request in legal:
                assert n.attrs["algo"] == request and not n.attrs["algo_note"]
            elif request == "winograd" and "winograd_f2" in legal:
                assert n.attrs["algo"] in ("winograd_f2", "winograd_f4")
            elif request not in ("auto", "winograd"):
                assert request in n.attrs["algo_note"]


def test_forced_algorithm_falls_back_and_the_dump_says_so():
    g = _conv_graph((1, 4, 9, 9), (4, 4, 3, 3), stride=2, pad=1, algo="winograd_f4")
    out = P.select_conv_algos(g, MODEL)
    (n,) = [n for n in out.nodes if n.op == "conv2d"]
    assert n.attrs["algo"] in ("direct", "im2col", "fft")
    text = print_graph(out)
    assert 'algo_note="winograd_f4 cannot compute' in text and f'algo="{n.attrs["algo"]}"' in text
    assert print_graph(parse(text)) == text
    # asked globally: the same, and a legal request is kept as is
    g2 = P.request_conv_algo(_conv_graph((1, 4, 9, 9), (4, 4, 3, 3), pad=1), "winograd_f4")
    assert [n.attrs["algo"] for n in P.select_conv_algos(g2, MODEL).nodes if n.op == "conv2d"] == ["winograd_f4"]


def test_backward_ops_inherit_the_layer_choice():
    g = _conv_graph((2, 4, 8, 8), (4, 4, 3, 3), training=True, pad=1, algo="fft")
    assert {n.attrs["algo"] for n in g.nodes if n.op in P.CONV_OPS} == {"fft"}


def test_cost_model_prefers_winograd_on_wide_3x3_and_never_fft_on_small_kernels():
    for c, hw in ((64, 56), (128, 28), (256, 14)):
        g = _conv_graph((1, c, hw, hw), (c, c, 3, 3), pad=1)
        (n,) = [n for n in P.select_conv_algos(g, MODEL).nodes if n.op == "conv2d"]
        assert n.attrs["algo"].startswith("winograd"), (c, n.attrs["algo"])
    g = _conv_graph((1, 256, 56, 56), (64, 256, 1, 1))
    (n,) = [n for n in P.select_conv_algos(g, MODEL).nodes if n.op == "conv2d"]
    assert n.attrs["algo"] in ("im2col", "direct")
    p = P.conv_problem(n)
    assert P.estimate(p, "fft", MODEL) > P.estimate(p, "im2col", MODEL)


def test_autotune_writes_and_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TDC_CACHE_DIR", str(tmp_path))
    g = _conv_graph((1, 4, 8, 8), (4, 4, 3, 3), pad=1)
    out = P.select_conv_algos(g, NUMBA, autotune=True)
    (n,) = [n for n in out.nodes if n.op == "conv2d"]
    data = json.loads((tmp_path / "autotune.json").read_text())
    (key,) = data
    assert key.startswith("conv2d|x1x4x8x8|w4x4x3x3|") and "f32" in key and P.machine_id().replace(" ", "") in key
    assert data[key]["algo"] == n.attrs["algo"] and set(data[key]["ms"]) == set(ALGORITHMS)
    # a forced choice in the cache wins over the measurement: the cache is read, not remeasured
    data[key]["algo"] = "fft"
    (tmp_path / "autotune.json").write_text(json.dumps(data))
    monkeypatch.setattr(CA, "time_conv", lambda *a, **k: pytest.fail("remeasured a cached layer"))
    out = P.select_conv_algos(g, NUMBA, autotune=True)
    assert [n.attrs["algo"] for n in out.nodes if n.op == "conv2d"] == ["fft"]


def test_calibration_recovers_known_costs_and_is_cached(tmp_path, monkeypatch):
    """A target whose kernels take exactly overhead + scale * model + per_plane * planes: the fit
    finds those coefficients, writes them under the CPU model, and a new target object reads them
    back instead of timing again."""
    monkeypatch.setenv("TDC_CACHE_DIR", str(tmp_path))
    truth = {a: (2e-5 * (i + 1), 0.5 + 0.25 * i, 1e-7 * i) for i, a in enumerate(ALGORITHMS)}
    timed = []

    class Synthetic(FixedTarget):
        name = "synthetic"

        def __init__(self):
            self._threads = 2

        def time_conv(self, node, algo):
            timed.append(algo)
            o, sc, pp = truth[algo]
            p = P.conv_problem(node)
            return o + sc * P.modelled(p, algo, self) + pp * P.planes(p)

        def time_matmul(self, m, k, n):
            return 2 * m * k * n / 5e10

    rates = Synthetic().rates()
    assert len(timed) == len(ALGORITHMS) * len(P.PROBES)
    for algo, want in truth.items():
        np.testing.assert_allclose(rates.conv[algo], want, rtol=1e-6, atol=1e-12, err_msg=algo)
    np.testing.assert_allclose(rates.gemm_flops, 5e10, rtol=1e-6)
    cached = json.loads((tmp_path / "targets.json").read_text())
    (key,) = cached
    assert key.startswith("synthetic|") and P.machine_id() in key
    assert Synthetic().rates().conv == rates.conv and len(timed) == len(ALGORITHMS) * len(P.PROBES)


def test_nonnegative_fit_drops_a_column_rather_than_going_negative():
    rows = [(1.0, 1.0, 0.0), (1.0, 2.0, 0.0), (1.0, 3.0, 0.0)]
    measured = [3.0, 2.0, 1.0]          # falls with the work: no non-negative slope explains it
    coef = P.nonnegative_fit(rows, measured)
    assert min(coef) >= 0 and coef[1] == 0


def test_numba_target_is_calibrated_on_this_machine():
    """The real calibration: every algorithm fitted with finite, non-negative coefficients, and the
    calibrated model within 4x of the kernels it was fitted to on the probe layers."""
    rates = NUMBA.rates()
    assert rates.gemm_flops > 1e9 and rates.copy_bytes > 1e8
    assert set(rates.conv) == set(ALGORITHMS)
    for algo in ALGORITHMS:
        assert all(np.isfinite(c) and c >= 0 for c in rates.conv[algo]), (algo, rates.conv[algo])
    node = P.probe_node(*P.PROBES[1])
    for algo in ALGORITHMS:
        est, got = P.estimate(P.conv_problem(node), algo, NUMBA), NUMBA.time_conv(node, algo)
        assert got / 4 < est < got * 4, (algo, est, got)


# ---- through the numba executable ----------------------------------------------------------------

def _five_layer_step():
    """A training step whose five conv layers each force one algorithm: one compile covers every
    lowering (epilogue-fused forward, library backward ops)."""
    @tdc.model(batch=2)
    def five(x: tdc.f32["B", 2, 7, 6]):
        h = x
        for i, algo in enumerate(ALGORITHMS):
            h = tdc.nn.conv2d(h, 3, 3, pad=1, name=f"c{i}", algo=algo).relu()
        return tdc.nn.linear(h.flatten(), 4, name="fc")
    return tdc.train_step(five, optimizer=tdc.Optimizer("sgd", lr=0.01))


def test_training_step_with_every_algorithm_matches_reference():
    """On the LLVM backend (0.5 s to compile; numba's cold compile of this step took over 100 s
    of the suite): numba's algorithm kernels are checked op by op above."""
    g = _five_layer_step()
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((2, 2, 7, 6)).astype(np.float32), "y": np.array([3, 1]), "lr": np.float32(0.1)}
    ref = tdc.compile(g, backend="reference", seed=1)
    nb = tdc.compile(g, backend="llvm", seed=1)
    chosen = [(n.op, n.attrs["algo"]) for n in nb.graph.nodes if n.op in P.CONV_OPS]
    for algo in ALGORITHMS:   # forward, backward-weight and (but for the first layer) backward-input
        assert sum(a == algo for _, a in chosen) == (2 if algo == ALGORITHMS[0] else 3), chosen
    r, o = ref(**feed), nb(**feed)
    np.testing.assert_allclose(o["loss"], r["loss"], rtol=1e-4)
    for k in ref.state:
        np.testing.assert_allclose(nb.state[k], ref.state[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_numba_training_step_runs_fft_at_python_level():
    @tdc.model(batch=2)
    def one(x: tdc.f32["B", 2, 7, 6]):
        return tdc.nn.linear(tdc.nn.conv2d(x, 3, 3, pad=1, name="c", algo="fft").relu().flatten(), 4, name="fc")
    g = tdc.train_step(one, optimizer=tdc.Optimizer("sgd", lr=0.01))
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((2, 2, 7, 6)).astype(np.float32), "y": np.array([3, 1]), "lr": np.float32(0.1)}
    ref, nb = tdc.compile(g, backend="reference", seed=1), tdc.compile(g, backend="numba", seed=1)
    assert "FFT (numpy.fft, Python level)" in nb.source()
    np.testing.assert_allclose(nb(**feed)["loss"], ref(**feed)["loss"], rtol=1e-4)
    for k in ref.state:
        np.testing.assert_allclose(nb.state[k], ref.state[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_inference_keeps_winograd_filters_until_the_weights_change():
    sys.path.insert(0, EXAMPLES)
    import digits
    g = digits.digits.trace(batch=2)
    nb = tdc.compile(g, backend="numba", seed=1, conv_algo="winograd_f2")
    ref = tdc.compile(g, backend="reference", seed=1)
    x = np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(nb(x=x)["out"], ref(x=x)["out"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="read-only"):
        nb.state["conv2.weight"][...] = 0      # would leave the kept transform stale
    new = np.random.default_rng(3).standard_normal((32, 16, 3, 3)).astype(np.float32)
    nb.set_state({"conv2.weight": new})
    ref.state["conv2.weight"] = new
    np.testing.assert_allclose(nb(x=x)["out"], ref(x=x)["out"], rtol=1e-4, atol=1e-5)


# ---- command line ------------------------------------------------------------------------------

def test_cli_conv_algo_on_run_train_and_dump(tmp_path, capsys, monkeypatch):
    model = os.path.join(EXAMPLES, "digits.py")
    import tdc.backends
    import tdc.runtime.trainer as trainer
    seen = []
    real = tdc.backends.compile

    def spy(graph, backend="reference", params=None, seed=0, conv_algo="auto", autotune=False, progress=None,
            profile=False):
        seen.append((conv_algo, autotune))   # what the command asked for reaches the compile...
        return real(graph, "reference", params, seed, conv_algo, autotune)   # ...run cheaply
    monkeypatch.setattr(tdc.backends, "compile", spy)
    monkeypatch.setattr(trainer, "compile_graph", spy)
    assert main(["run", model, "--batch", "2", "--random-inputs", "--conv-algo", "winograd_f4"]) == 0
    assert main(["train", model, "--batch", "8", "--max-steps", "2", "--epochs", "1", "--no-progress",
                 "--conv-algo", "fft", "--autotune"]) == 0
    assert seen == [("winograd_f4", False), ("fft", True), ("fft", True)]
    assert "test accuracy" in capsys.readouterr().out

    assert main(["dump", model, "--batch", "2", "--after", "conv_algo", "--conv-algo", "fft"]) == 0
    dump = capsys.readouterr().out
    assert dump.count('algo="fft"') == 2
    assert main(["dump", model, "--batch", "2", "--train", "--after", "conv_algo", "--conv-algo", "winograd"]) == 0
    dump = capsys.readouterr().out
    assert dump.count('algo="winograd_f') == 5 and 'algo="auto"' not in dump
    assert main(["dump", model, "--batch", "2", "--after", "conv_algo"]) == 0   # the cost model's choice
    assert 'algo="auto"' not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", model, "--conv-algo", "magic"])
