"""batchnorm, dropout, losses, one_hot and communication over simulated ranks,
against per-element float64 formulas written with Python loops."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import FAST, MEDIUM, NP, all_indices, array_of, emit_one, infer_op, run_op, run_op_ranks, shapes
from tdc.backends.reference import run_ranks
from tdc.errors import ShapeError, TdcError
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ir.opdef import all_ops

EPS = {"f32": 2.0 ** -24, "f64": 2.0 ** -53}
SUB = {dt: float(np.finfo(NP[dt]).smallest_subnormal) for dt in EPS}   # absolute rounding below normal range

# ---- batchnorm ------------------------------------------------------------------------------


@st.composite
def bn_case(draw):
    dt = draw(st.sampled_from(["f32", "f64"]))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    spatial = draw(st.sampled_from([(), (2, 2), (1, 3)]))   # 2-D [N, C] or 4-D [N, C, H, W]
    x = array_of(draw, (n, c) + spatial, dt, -10, 10)
    gamma = array_of(draw, (c,), dt, -3, 3)
    beta = array_of(draw, (c,), dt, -3, 3)
    mean = array_of(draw, (c,), dt, -3, 3)
    var = array_of(draw, (c,), dt, 0.01, 5)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    return dt, x, gamma, beta, mean, var, eps


def bn_normalize(v, m, var, eps, g, b):
    return (v - m) / math.sqrt(var + eps) * g + b


def bn_scale(v, m, var, eps, g, b):
    """A bound on the magnitudes that enter one normalized value (for the rounding tolerance)."""
    return (abs(v) + abs(m)) / math.sqrt(var + eps) * abs(g) + abs(b)


@FAST
@given(case=bn_case())
def test_batchnorm_inference(case):
    dt, x, gamma, beta, mean, var, eps = case
    (y,) = run_op("batchnorm", [x, gamma, beta, mean, var], eps=eps)
    assert y.shape == x.shape and y.dtype == x.dtype
    for idx in all_indices(x.shape):
        c = idx[1]
        args = (x[idx].item(), mean[c].item(), var[c].item(), eps, gamma[c].item(), beta[c].item())
        assert abs(y[idx].item() - bn_normalize(*args)) <= 16 * (EPS[dt] * bn_scale(*args) + SUB[dt]), idx


@FAST
@given(case=bn_case(), momentum=st.sampled_from([0.0, 0.1, 0.9, 0.99, 1.0]))
def test_batchnorm_training(case, momentum):
    dt, x, gamma, beta, rmean, rvar, eps = case
    y, new_mean, new_var = run_op("batchnorm", [x, gamma, beta, rmean, rvar], eps=eps, momentum=momentum,
                                  training=True)
    assert y.shape == x.shape and new_mean.shape == rmean.shape and new_var.shape == rvar.shape
    assert y.dtype == new_mean.dtype == new_var.dtype == x.dtype
    per_channel = {c: [] for c in range(x.shape[1])}
    for idx in all_indices(x.shape):
        per_channel[idx[1]].append((idx, x[idx].item()))
    for c, items in per_channel.items():
        vals = [v for _, v in items]
        bm = math.fsum(vals) / len(vals)
        bv = math.fsum((v - bm) ** 2 for v in vals) / len(vals)        # biased batch variance
        g, b = gamma[c].item(), beta[c].item()
        for idx, v in items:
            args = (v, bm, bv, eps, g, b)
            tol = 16 * len(vals) * (EPS[dt] * bn_scale(*args) + SUB[dt])
            assert abs(y[idx].item() - bn_normalize(*args)) <= tol, idx
        want_mean = momentum * rmean[c].item() + (1 - momentum) * bm
        want_var = momentum * rvar[c].item() + (1 - momentum) * bv
        tol = 8 * len(vals) * EPS[dt]
        assert math.isclose(new_mean[c].item(), want_mean, rel_tol=tol, abs_tol=tol * 10)
        assert math.isclose(new_var[c].item(), want_var, rel_tol=tol, abs_tol=tol * 100)


def test_batchnorm_training_small_explicit():
    x = np.array([[1.0, 10.0], [3.0, 14.0]])         # channel 0: mean 2, var 1; channel 1: mean 12, var 4
    one, zero = np.ones(2), np.zeros(2)
    y, m, v = run_op("batchnorm", [x, one, zero, zero, one], eps=0.0, momentum=0.25, training=True)
    assert y.tolist() == [[-1.0, -1.0], [1.0, 1.0]]
    # running = momentum * running + (1 - momentum) * batch
    assert m.tolist() == [0.25 * 0 + 0.75 * 2, 0.25 * 0 + 0.75 * 12]
    assert v.tolist() == [0.25 * 1 + 0.75 * 1, 0.25 * 1 + 0.75 * 4]


def test_batchnorm_errors():
    f = lambda *s: TensorType("f32", s)  # noqa: E731
    with pytest.raises(ShapeError, match="scale must be \\[3\\]"):
        infer_op("batchnorm", [f(2, 3), f(2), f(3), f(3), f(3)])
    with pytest.raises(ShapeError, match="var must be \\[3\\]"):
        infer_op("batchnorm", [f(2, 3), f(3), f(3), f(3), f(3, 1)])
    with pytest.raises(ShapeError, match="N, C"):
        infer_op("batchnorm", [f(3), f(3), f(3), f(3), f(3)])
    with pytest.raises(ShapeError, match="momentum"):
        infer_op("batchnorm", [f(2, 3)] + [f(3)] * 4, momentum=1.5)
    with pytest.raises(ShapeError, match="at least one value"):
        infer_op("batchnorm", [f(0, 3)] + [f(3)] * 4, training=True)
    with pytest.raises(ShapeError, match="at least one value"):
        infer_op("batchnorm", [f(2, 0)] + [f(0)] * 4, training=True)
    with pytest.raises(ShapeError, match="float"):
        infer_op("batchnorm", [TensorType("i32", (2, 3))] + [TensorType("i32", (3,))] * 4)


# ---- dropout ---------------------------------------------------------------------------------

def dropout(x, key, rate, seed=0, key_dtype=np.int64):
    (out,) = run_op("dropout", [x, np.array(key, key_dtype)], rate=rate, seed=seed)
    return out


def test_dropout_is_deterministic_and_keyed():
    x = np.ones((64, 64), np.float32)
    a = dropout(x, 3, 0.5, seed=7)
    assert np.array_equal(a, dropout(x, 3, 0.5, seed=7))
    assert np.array_equal(a, dropout(x, 3, 0.5, seed=7, key_dtype=np.int32))   # the key's value matters, not its dtype
    for other in (dropout(x, 4, 0.5, seed=7), dropout(x, 3, 0.5, seed=8), dropout(x, -3, 0.5, seed=7)):
        assert not np.array_equal(a != 0, other != 0)
        # two independent masks agree on about half of the elements
        assert abs(np.mean((a != 0) == (other != 0)) - 0.5) < 0.05
    neg = dropout(x, 3, 0.5, seed=-7)     # any int seed works
    assert not np.array_equal(a, neg)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("dt", ["f32", "f64"])
def test_dropout_keep_fraction_and_scale(rate, dt):
    rng = np.random.default_rng(0)
    x = (rng.uniform(0.5, 2.0, 100_000) * rng.choice([-1, 1], 100_000)).astype(NP[dt])   # never 0
    out = dropout(x, 11, rate, seed=5)
    kept = out != 0
    assert abs(kept.mean() - (1 - rate)) < 0.01
    # kept values are x / (1 - rate); the rest are exactly 0
    np.testing.assert_allclose(out[kept], x[kept].astype(np.float64) / (1 - rate), rtol=EPS[dt] * 4)
    assert np.all(out[~kept] == 0)
    # the mask is spread over the tensor: every block of 10k elements keeps about 1 - rate
    blocks = kept.reshape(10, 10_000).mean(axis=1)
    assert np.all(np.abs(blocks - (1 - rate)) < 0.03)
    # masks of two keys are independent: both keep about (1 - rate)^2
    other = dropout(x, 12, rate, seed=5) != 0
    assert abs(np.mean(kept & other) - (1 - rate) ** 2) < 0.01


def test_dropout_rate_zero_is_identity():
    x = np.linspace(-3, 3, 1000).astype(np.float32).reshape(10, 100)
    out = dropout(x, 0, 0.0)
    assert out.dtype == x.dtype and np.array_equal(out, x)


def test_dropout_errors():
    f = TensorType("f32", (4,))
    with pytest.raises(ShapeError, match="rate"):
        infer_op("dropout", [f, TensorType("i64", ())], rate=1.0)
    with pytest.raises(ShapeError, match="rate"):
        infer_op("dropout", [f, TensorType("i64", ())], rate=-0.1)
    with pytest.raises(ShapeError, match="key must be an integer scalar"):
        infer_op("dropout", [f, TensorType("i64", (1,))])
    with pytest.raises(ShapeError, match="key must be an integer scalar"):
        infer_op("dropout", [f, TensorType("f32", ())])
    with pytest.raises(ShapeError, match="float"):
        infer_op("dropout", [TensorType("i32", (4,)), TensorType("i64", ())])


# ---- losses and one_hot ---------------------------------------------------------------------

LOGITS = st.one_of(st.sampled_from([-1000.0, -999.0, 0.0, 1.5, 999.0, 1000.0]),
                   st.floats(-50, 50, width=32, allow_subnormal=False))


def sce_by_loops(logits, labels):
    losses = []
    for row, lab in zip(logits.tolist(), labels.tolist()):
        m = max(row)
        lse = m + math.log(math.fsum(math.exp(v - m) for v in row))
        losses.append(lse - row[lab])
    return math.fsum(losses) / len(losses)


@FAST
@given(data=st.data())
def test_softmax_cross_entropy(data):
    dt = data.draw(st.sampled_from(["f32", "f64"]))
    n, c = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    logits = np.array(data.draw(st.lists(LOGITS, min_size=n * c, max_size=n * c)), NP[dt]).reshape(n, c)
    labels = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)),
                      NP[data.draw(st.sampled_from(["i32", "i64"]))])
    (loss,) = run_op("softmax_cross_entropy", [logits, labels])
    assert loss.shape == () and loss.dtype == NP[dt] and np.isfinite(loss)
    np.testing.assert_allclose(loss, sce_by_loops(logits, labels), rtol=1e-6, atol=1e-12)


def test_softmax_cross_entropy_large_logits():
    logits = np.array([[1000.0, -1000.0], [-1000.0, 1000.0], [1000.0, 1000.0]], np.float32)
    (loss,) = run_op("softmax_cross_entropy", [logits, np.array([0, 0, 1], np.int64)])
    np.testing.assert_allclose(loss, (0.0 + 2000.0 + math.log(2)) / 3, rtol=1e-6)


@pytest.mark.parametrize("bad", [-1, 3, 100])
def test_softmax_cross_entropy_label_out_of_range(bad):
    with pytest.raises(TdcError, match=f"label {bad} is out of range.*\\[0, 3\\)"):
        run_op("softmax_cross_entropy", [np.zeros((2, 3), np.float32), np.array([0, bad], np.int32)])


def test_softmax_cross_entropy_type_errors():
    with pytest.raises(ShapeError, match="labels must be integers of shape \\[2\\]"):
        infer_op("softmax_cross_entropy", [TensorType("f32", (2, 3)), TensorType("f32", (2,))])
    with pytest.raises(ShapeError, match="labels must be integers"):
        infer_op("softmax_cross_entropy", [TensorType("f32", (2, 3)), TensorType("i32", (3,))])
    with pytest.raises(ShapeError, match="\\[N, C\\]"):
        infer_op("softmax_cross_entropy", [TensorType("f32", (2, 3, 1)), TensorType("i32", (2,))])


@FAST
@given(data=st.data())
def test_mse(data):
    dt = data.draw(st.sampled_from(["f32", "f64"]))
    shape = data.draw(shapes(0, 3, 1, 4))
    p = array_of(data.draw, shape, dt, -100, 100)
    t = array_of(data.draw, shape, dt, -100, 100)
    (loss,) = run_op("mse", [p, t])
    assert loss.shape == () and loss.dtype == NP[dt]
    idx = all_indices(shape)
    want = math.fsum((p[i].item() - t[i].item()) ** 2 for i in idx) / len(idx)
    # (a nearly exact prediction can give a mean below the dtype's normal range: atol covers that)
    np.testing.assert_allclose(loss, want, rtol=1e-6 if dt == "f32" else 1e-12, atol=4 * np.finfo(NP[dt]).tiny)


def test_mse_errors():
    with pytest.raises(ShapeError, match="same shape and dtype"):
        infer_op("mse", [TensorType("f32", (2,)), TensorType("f32", (3,))])
    with pytest.raises(ShapeError, match="same shape and dtype"):
        infer_op("mse", [TensorType("f32", (2,)), TensorType("f64", (2,))])


@MEDIUM
@given(data=st.data())
def test_one_hot(data):
    shape = data.draw(shapes(0, 3, 0, 3))
    depth = data.draw(st.integers(1, 5))
    idt = data.draw(st.sampled_from(["i8", "i32", "i64"]))
    odt = data.draw(st.sampled_from(["f32", "f64", "i32", "bool"]))
    idx = array_of(data.draw, shape, idt, 0, depth - 1)
    (out,) = run_op("one_hot", [idx], depth=depth, dtype=odt)
    assert out.shape == shape + (depth,) and out.dtype == NP[odt]
    for i in all_indices(shape):
        for k in range(depth):
            assert out[i + (k,)].item() == (1 if idx[i] == k else 0)


def test_one_hot_errors():
    with pytest.raises(TdcError, match="label 4 is out of range"):
        run_op("one_hot", [np.array([0, 4], np.int32)], depth=4)
    with pytest.raises(TdcError, match="label -1 is out of range"):
        run_op("one_hot", [np.array([-1], np.int8)], depth=4)
    with pytest.raises(ShapeError, match="integer"):
        infer_op("one_hot", [TensorType("f32", (2,))], depth=3)
    with pytest.raises(ShapeError, match="depth"):
        infer_op("one_hot", [TensorType("i32", (2,))], depth=0)
    (big,) = run_op("one_hot", [np.array([127], np.int8)], depth=300)   # depth beyond the index dtype's range
    assert big.shape == (1, 300) and big[0, 127] == 1 and big.sum() == 1


# ---- communication ------------------------------------------------------------------------

RANK_VALUES = [np.array([[1.0, -2.0, 3.0]]), np.array([[4.0, 5.0, -6.0]]), np.array([[0.5, 8.0, 9.0]])]


REDUCERS = {"sum": math.fsum, "mean": lambda v: math.fsum(v) / len(v), "max": max, "min": min}


@pytest.mark.parametrize("op,dt", [(op, dt) for op in REDUCERS for dt in ("f32", "f64", "i32", "i64")
                                   if not (op == "mean" and dt.startswith("i"))])
def test_allreduce_over_three_ranks(op, dt):
    fn = REDUCERS[op]
    per_rank = [[v.astype(NP[dt])] for v in RANK_VALUES]
    outs = run_op_ranks("allreduce", per_rank, op=op)
    assert len(outs) == 3
    for (out,) in outs:
        assert out.shape == (1, 3) and out.dtype == NP[dt]
        for j in range(3):
            want = fn([float(r[0][0, j]) for r in per_rank])
            assert math.isclose(out[0, j].item(), want, rel_tol=1e-7), (op, j)


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_allreduce_start_then_wait_is_the_allreduce(op):
    """Split in two, the collective happens at the start (every rank's buffer in flight) and the
    wait hands the result on: together they equal allreduce, on every simulated rank."""
    g = Graph("split")
    x = g.add_arg("x", TensorType("f32", (1, 3)), "input")
    (h,) = g.emit("allreduce_start", [x], {"op": op, "algo": "tree", "world": 3})
    (y,) = g.emit("allreduce_wait", [h])
    (z,) = g.emit("allreduce", [x], {"op": op})
    g.add_output("y", y)
    g.add_output("z", z)
    envs = run_ranks(g, [{x: v.astype(np.float32)} for v in RANK_VALUES])
    for env in envs:
        np.testing.assert_array_equal(env[y], env[z])
        want = {"sum": np.sum, "mean": np.mean, "max": np.max}[op]([v[0] for v in RANK_VALUES], axis=0)
        np.testing.assert_allclose(env[y][0], want, rtol=1e-6)


def test_allreduce_default_is_sum_and_keeps_scalars():
    outs = run_op_ranks("allreduce", [[np.array(float(r))] for r in range(4)])
    assert [o[0].item() for o in outs] == [6.0] * 4 and outs[0][0].shape == ()


@pytest.mark.parametrize("root", [0, 1, 2])
def test_broadcast_from_root(root):
    outs = run_op_ranks("broadcast", [[v] for v in RANK_VALUES], root=root)
    for (out,) in outs:
        assert out.tolist() == RANK_VALUES[root].tolist()
    outs[0][0][...] = 0     # every rank has its own copy
    assert outs[1][0].tolist() == outs[2][0].tolist() == RANK_VALUES[root].tolist()


@pytest.mark.parametrize("root", [0, 2])
def test_reduce_to_root(root):
    outs = run_op_ranks("reduce_to", [[v] for v in RANK_VALUES], root=root)
    total = [math.fsum(float(v[0, j]) for v in RANK_VALUES) for j in range(3)]
    for r, (out,) in enumerate(outs):
        assert out.shape == (1, 3)
        assert out[0].tolist() == (total if r == root else [0.0, 0.0, 0.0])


def test_collective_root_must_be_a_rank():
    for op in ("broadcast", "reduce_to"):
        with pytest.raises(ShapeError, match="root 5 is not among the ranks"):
            run_op_ranks(op, [[v] for v in RANK_VALUES], root=5)


def test_send_recv_moves_a_tensor():
    g = Graph("p2p")
    x = g.add_arg("x", TensorType("f32", (2, 3)), "input")
    assert g.emit("send", [x], {"dst": 1}, placement="rank:0") == []
    (y,) = g.emit("recv", [], {"src": 0, "shape": [2, 3], "dtype": "f32"}, placement="rank:1")
    (z,) = g.emit("neg", [y], placement="rank:1")
    feeds = [{x: np.arange(6, dtype=np.float32).reshape(2, 3) * (r + 1)} for r in range(2)]
    envs = run_ranks(g, feeds)
    assert envs[1][y].tolist() == feeds[0][x].tolist()      # rank 1 got rank 0's tensor
    assert envs[1][z].tolist() == (-feeds[0][x]).tolist()
    assert y not in envs[0] and z not in envs[0]              # rank 0 did not run the recv
    feeds[0][x][...] = 99     # the message was a copy
    assert envs[1][y][0, 1] == 1.0


def test_send_recv_tags_are_matched():
    g = Graph("tags")
    a = g.add_arg("a", TensorType("i32", (2,)), "input")
    b = g.add_arg("b", TensorType("i32", (2,)), "input")
    g.emit("send", [a], {"dst": 2, "tag": 1}, placement="rank:0")
    g.emit("send", [b], {"dst": 2, "tag": 2}, placement="rank:0")
    (rb,) = g.emit("recv", [], {"src": 0, "tag": 2, "shape": [2], "dtype": "i32"}, placement="rank:2")
    (ra,) = g.emit("recv", [], {"src": 0, "tag": 1, "shape": [2], "dtype": "i32"}, placement="rank:2")
    feeds = [{a: np.array([1, 2], np.int32), b: np.array([3, 4], np.int32)} for _ in range(3)]
    envs = run_ranks(g, feeds)
    assert envs[2][ra].tolist() == [1, 2] and envs[2][rb].tolist() == [3, 4]


def test_recv_without_send_is_a_clear_error():
    g = Graph("lonely")
    g.emit("recv", [], {"src": 0, "shape": [2], "dtype": "f32"}, placement="rank:1")
    with pytest.raises(TdcError, match="recv on rank 1 from rank 0 \\(tag 0\\): no matching send"):
        run_ranks(g, [{}, {}])


def test_recv_of_the_wrong_type_is_an_error():
    g = Graph("mismatch")
    x = g.add_arg("x", TensorType("f32", (3,)), "input")
    g.emit("send", [x], {"dst": 1}, placement="rank:0")
    g.emit("recv", [], {"src": 0, "shape": [2], "dtype": "f32"}, placement="rank:1")
    with pytest.raises(TdcError, match="expected f32\\[2\\], got f32\\[3\\]"):
        run_ranks(g, [{x: np.zeros(3, np.float32)}] * 2)


def test_recv_in_a_single_rank_run_without_send():
    g, _, _ = emit_one("recv", [], {"src": 0, "shape": [1]})
    with pytest.raises(TdcError, match="recv on rank 0 from rank 0 \\(tag 0\\): no matching send"):
        run_ranks(g, [{}])


def _placed_push_pull(compress="none"):
    """Workers 0 and 1 push x to server 2, which adds one and the workers pull the result."""
    g = Graph("ps")
    x = g.add_arg("x", TensorType("f32", (1, 3)), "input")
    attrs = {"server": 2, "workers": 2, "world": 3}
    (m,) = g.emit("push", [x], {**attrs, "compress": compress}, placement="ranks:0..2")
    (one,) = g.emit("constant", [], {"value": np.float32(1.0)})
    (m1,) = g.emit("add", [m, one], placement="rank:2")
    (y,) = g.emit("pull", [m1], attrs, placement="ranks:0..2")
    return g, x, m, y


def test_push_gives_the_server_the_workers_mean_and_pull_copies_it_back():
    g, x, m, y = _placed_push_pull()
    envs = run_ranks(g, [{x: v.astype(np.float32)} for v in RANK_VALUES])
    mean = (RANK_VALUES[0] + RANK_VALUES[1]) / 2          # the server's own x takes no part
    np.testing.assert_allclose(envs[2][m], mean, rtol=1e-7)
    for r in range(2):
        np.testing.assert_array_equal(envs[r][m], RANK_VALUES[r].astype(np.float32))   # a worker keeps its own
        np.testing.assert_allclose(envs[r][y], mean + 1, rtol=1e-7)
    envs[0][y][...] = 0       # every worker has its own copy
    assert envs[1][y][0, 0] != 0


def test_a_compressed_push_delivers_what_the_compressor_keeps():
    """topk:1 keeps the largest magnitude of each worker's tensor; the server gets their mean."""
    g, x, m, y = _placed_push_pull("topk:1")
    envs = run_ranks(g, [{x: v.astype(np.float32)} for v in RANK_VALUES])
    assert envs[2][m].tolist() == [[0.0, 0.0, -1.5]]       # (3 from rank 0, -6 from rank 1) / 2


def test_transfer_moves_a_value_between_two_ranks():
    g = Graph("t")
    x = g.add_arg("x", TensorType("f32", (2,)), "input")
    (a,) = g.emit("neg", [x], placement="rank:2")
    (b,) = g.emit("transfer", [a], {"src": 2, "dst": 0}, placement="ranks:0,2")
    (c,) = g.emit("exp", [b], placement="rank:0")
    feeds = [{x: np.full(2, r, np.float32)} for r in range(3)]
    envs = run_ranks(g, feeds)
    assert envs[0][b].tolist() == [-2.0, -2.0] and envs[0][c].tolist() == pytest.approx([np.exp(-2.0)] * 2)
    assert b not in envs[1]
    g.nodes[1].placement = "ranks:0..2"
    with pytest.raises(ShapeError, match="transfer from rank 2 to rank 0 must be placed on exactly those two"):
        run_ranks(g, feeds)


def test_concat_and_sum_over_ranks_take_each_rank_its_own_piece():
    g = Graph("cs")
    x = g.add_arg("x", TensorType("f32", (2, 1)), "input")
    pieces = [g.emit("mul", [x, g.emit("constant", [], {"value": np.float32(r + 1)})[0]], placement=f"rank:{r}")[0]
              for r in range(3)]
    (cat,) = g.emit("concat_ranks", pieces, {"axis": 1}, placement="ranks:0..2")
    (tot,) = g.emit("sum_ranks", pieces, placement="ranks:0..2")
    envs = run_ranks(g, [{x: np.array([[1.0], [2.0]], np.float32)}] * 3)
    for r in range(3):
        assert envs[r][cat].tolist() == [[1, 2, 3], [2, 4, 6]] and envs[r][tot].tolist() == [[6], [12]]
    assert g.nodes[-1].outputs[0].type == TensorType("f32", (2, 1))
    with pytest.raises(ShapeError, match="one piece per rank"):
        g.nodes[-1].placement = "ranks:0..1"
        run_ranks(g, [{x: np.ones((2, 1), np.float32)}] * 3)
    with pytest.raises(ShapeError, match="concat_ranks: the pieces must agree except along axis 1"):
        infer_op("concat_ranks", [TensorType("f32", (2, 1)), TensorType("f32", (3, 1))], axis=1)
    with pytest.raises(ShapeError, match="sum_ranks takes one value of the same type"):
        infer_op("sum_ranks", [TensorType("f32", (2,)), TensorType("f32", (3,))])


def test_allgather_concatenates_every_ranks_piece_in_rank_order():
    pieces = [np.arange(2 * k, dtype=np.float32).reshape(2, k) for k in (1, 3, 2)]
    outs = run_op_ranks("allgather", [[p] for p in pieces], axis=1, sizes=[1, 3, 2], world=3)
    for (out,) in outs:
        assert out.tolist() == np.concatenate(pieces, 1).tolist()
    with pytest.raises(ShapeError, match="none of the sizes"):
        infer_op("allgather", [TensorType("f32", (2, 4))], axis=1, sizes=[1, 3], world=2)


def test_push_and_pull_need_their_server():
    g = Graph("nos")
    x = g.add_arg("x", TensorType("f32", (2,)), "input")
    g.emit("push", [x], {"server": 2, "workers": 2, "world": 3}, placement="ranks:0..1")
    with pytest.raises(TdcError, match="push to server 2"):
        run_ranks(g, [{x: np.zeros(2, np.float32)}] * 3)
    g = Graph("nos")
    x = g.add_arg("x", TensorType("f32", (2,)), "input")
    g.emit("pull", [x], {"server": 2, "workers": 2, "world": 3}, placement="ranks:0..1")
    with pytest.raises(TdcError, match="pull from server 2"):
        run_ranks(g, [{x: np.zeros(2, np.float32)}] * 3)


def test_push_and_pull_gradients_match_finite_differences_over_ranks():
    """The gradient rules, evaluated on simulated ranks, against central differences of the
    forward ops: push's (the server's gradient pulled back, over the workers) and pull's (the
    workers' gradients pushed and summed on the server)."""
    from tdc.ir.opdef import get_op
    from tdc.ops.tensor import Builder, Tensor

    class Ctx:
        def __init__(self, g, attrs):
            self.g, self.attrs = g, attrs
    attrs = {"server": 2, "workers": 2, "world": 3}
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(3) for _ in range(3)]
    ws = [rng.standard_normal(3) for _ in range(3)]

    def forward(op, xs):      # sum over ranks holding a result of <result, w_rank>
        g = Graph("f")
        x = g.add_arg("x", TensorType("f64", (3,)), "input")
        (y,) = g.emit(op, [x], attrs, placement="ranks:0..2")
        envs = run_ranks(g, [{x: v} for v in xs])
        on = [2] if op == "push" else [0, 1]
        return sum(float(envs[r][y] @ ws[r]) for r in on)

    for op in ("push", "pull"):
        g = Graph("b")
        u = g.add_arg("u", TensorType("f64", (3,)), "input")   # the gradient arriving at the op's output
        with Builder(g) as b:
            (gx,) = get_op(op).grad(Ctx(Tensor(u, b), dict(get_op(op).normalize_attrs(attrs))), None)
        for n in g.nodes:
            n.placement = "ranks:0..2" if n.opdef.collective else None
        envs = run_ranks(g, [{u: w} for w in ws])
        takes = [0, 1] if op == "push" else [2]       # the ranks whose x reaches the output
        for r in takes:
            for j in range(3):
                h = 1e-6
                up, down = [x.copy() for x in xs], [x.copy() for x in xs]
                up[r][j] += h
                down[r][j] -= h
                numeric = (forward(op, up) - forward(op, down)) / (2 * h)
                assert envs[r][gx.value][j] == pytest.approx(numeric, rel=1e-6, abs=1e-9), (op, r, j)


# ---- every op of the seven families is covered above or in the sibling test files -------------

TESTED = {
    "elementwise": {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "equal", "not_equal", "less",
                    "less_equal", "greater", "greater_equal", "where", "neg", "abs", "sign", "exp", "log", "sqrt",
                    "rsqrt", "relu", "leaky_relu", "sigmoid", "tanh", "erf", "cast", "constant", "full"},
    "linalg": {"matmul", "linear"},
    "reduce": {"reduce_sum", "reduce_mean", "reduce_max", "softmax", "log_softmax"},
    "shape": {"reshape", "flatten", "transpose", "broadcast_to", "concat", "slice", "slice_grad", "pad",
              "gather", "gather_grad"},                                          # gather: test_gather.py
    "norm": {"batchnorm", "dropout"},
    "loss": {"softmax_cross_entropy", "mse", "one_hot"},
    "comm": {"allreduce", "allreduce_start", "allreduce_wait", "broadcast", "reduce_to", "send", "recv", "push",
             "pull", "transfer", "concat_ranks", "sum_ranks", "allgather"},   # gradients: test_partition.py
}


def test_every_op_in_these_families_has_tests():
    ops = all_ops()
    for family, names in TESTED.items():
        registered = {n for n, o in ops.items() if o.family == family}
        assert registered == names, f"{family}: untested {registered - names}, gone {names - registered}"
