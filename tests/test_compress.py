"""Gradient compression (tdc/ops/compress.py): every compressor's decode(encode(g)) against a
stated error bound, stochastic rounding unbiased on average, error feedback losing nothing,
DGC's momentum correction and warm-up, the bytes of each message, the dense-or-sparse choice,
and the staged runtime's message format."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tdc.errors import TdcError
from tdc.ops.compress import (DGC, QSGD, ErrorFeedback, Half, Sign, TernGrad, Threshold, TopK, dense_cheaper,
                              nbytes, parse_compression)
from tdc.runtime.staged import pack, unpack

RNG = np.random.default_rng(0)
G = (RNG.standard_normal(4096) * RNG.uniform(0.01, 3, 4096)).astype(np.float32)   # values over 2.5 decades


def round_trip(c, g, seed=0):
    msg = c.encode(g, np.random.default_rng(seed))
    return msg, c.decode(msg, len(g))


def test_topk_keeps_exactly_the_largest_magnitudes_and_drops_the_rest():
    c = TopK(fraction=0.01)
    msg, d = round_trip(c, G)
    k = 41                                             # ceil(0.01 * 4096)
    assert len(msg[0]) == k and nbytes(msg) == 8 * k == c.wire_bytes(len(G))
    kept = np.flatnonzero(d)
    assert set(kept) == set(np.argsort(-np.abs(G))[:k])
    np.testing.assert_array_equal(d[kept], G[kept])   # kept values are exact
    # error bound: what is dropped, each value no larger than the smallest kept
    assert np.max(np.abs(G - d)) <= np.min(np.abs(G[kept]))


def test_topk_by_count_and_threshold():
    _, d = round_trip(TopK(count=5), G)
    assert np.count_nonzero(d) == 5
    _, d = round_trip(Threshold(2.0), G)
    assert np.all(np.abs(G[d != 0]) > 2.0) and np.all(np.abs(G[d == 0]) <= 2.0)
    assert np.max(np.abs(G - d)) <= 2.0


def test_sign_sends_one_bit_a_value_and_the_mean_of_each_sign():
    msg, d = round_trip(Sign(), G)
    assert nbytes(msg) == len(G) // 8 + 8 == Sign().wire_bytes(len(G))
    pos, neg = G[G >= 0].mean(), G[G < 0].mean()
    np.testing.assert_allclose(d, np.where(G >= 0, pos, neg), rtol=1e-6)
    # the two values are the least-squares reconstruction: the error sums to zero on each side
    assert abs(np.sum((G - d)[G >= 0])) < 1e-2 and abs(np.sum((G - d)[G < 0])) < 1e-2
    # error bound: |g - d| <= max(|g|, |d|) on each side, since g and d have the same sign
    assert np.all(np.abs(G - d) <= np.maximum(np.abs(G), np.abs(d)) * (1 + 1e-6))


@pytest.mark.parametrize("c,bound", [(TernGrad(), "max"), (QSGD(127), "norm/127"), (QSGD(4), "norm/4")])
def test_unbiased_quantizers_have_bounded_error_and_are_right_on_average(c, bound):
    g = G[:512]
    if isinstance(c, TernGrad):    # TernGrad is unbiased for g clipped to 2.5 standard deviations
        g = np.clip(g, -2.5 * np.std(g), 2.5 * np.std(g))
    msg, d = round_trip(c, g)
    assert nbytes(msg) == c.wire_bytes(len(g))
    # a value lands on one of the two levels around it: the error is under one level's width
    width = np.max(np.abs(g)) if bound == "max" else np.linalg.norm(g) / int(bound.split("/")[1])
    assert np.max(np.abs(d - g)) <= width * (1 + 1e-5)
    # unbiased: the mean over many encodings tends to g (standard error ~ width / sqrt(n))
    n = 4000
    total = np.zeros(len(g))
    for s in range(n):
        total += round_trip(c, g, seed=s + 1)[1]
    err = np.abs(total / n - g)
    assert np.max(err) < 5 * width / np.sqrt(n), np.max(err)


def test_terngrad_clips_outliers_before_it_scales():
    g = np.concatenate([np.full(999, 0.1, np.float32), [100.0]]).astype(np.float32)
    msg, d = round_trip(TernGrad(), g)
    assert msg[1][0] < 2.5 * np.std(g) * (1 + 1e-6)       # the scale is the clipped maximum, not 100


def test_fp16_and_bf16_truncation_error_bounds():
    small = G / 8
    _, d = round_trip(Half("fp16"), small)
    # round to nearest: half an ulp, or half the smallest subnormal step (2^-24) below fp16's normal range
    assert np.all(np.abs(d - small) <= np.maximum(np.abs(small) * 2.0 ** -11 * (1 + 1e-6), 2.0 ** -25))
    _, d = round_trip(Half("bf16"), G)
    assert np.all(np.abs(d - G) < np.abs(G) * 2.0 ** -7)                         # truncation: under one ulp
    assert np.all(np.abs(d) <= np.abs(G))                                         # toward zero


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_stochastic_rounding_is_unbiased(kind):
    g = G[:256] / 8
    c = Half(kind, stochastic=True)
    _, d = round_trip(c, g)
    ulp = 2.0 ** (-10 if kind == "fp16" else -7)
    assert np.all(np.abs(d - g) <= np.abs(g) * ulp * (1 + 1e-6) + 1e-7)   # never past a neighbour
    n = 4000
    total = np.zeros(len(g))
    for s in range(n):
        total += round_trip(c, g, seed=s + 7)[1]
    mean_err = np.abs(total / n - g) / (np.abs(g) * ulp)
    assert np.max(mean_err) < 5 / np.sqrt(n) * 2, np.max(mean_err)          # in ulps: ~0 on average
    # while plain truncation (bf16) or rounding (fp16) keeps its one-sided error
    biased = round_trip(Half(kind), g)[1]
    assert np.mean(np.abs(biased - g)) > 20 * np.mean(np.abs(total / n - g))


def test_error_feedback_loses_nothing_it_only_delays():
    """After any number of steps, what was sent plus the residual equals what came in."""
    ef = ErrorFeedback(TopK(fraction=0.05))
    rng = np.random.default_rng(1)
    sent = np.zeros(1000)
    came = np.zeros(1000)
    for _ in range(30):
        g = rng.standard_normal(1000).astype(np.float32)
        came += g
        sent += ef.c.decode(ef.encode("w", g, rng), 1000)
    np.testing.assert_allclose(sent + ef.residual["w"], came, atol=1e-4)
    assert np.count_nonzero(ef.residual["w"]) > 0


def test_dgc_masks_momentum_where_it_sends_and_warms_up_its_sparsity():
    rng = np.random.default_rng(2)
    dgc = DGC(TopK(fraction=0.01), momentum=0.9, clip=None, warmup_steps=4)
    densities = []
    for step in range(6):
        densities.append(dgc.density())
        g = rng.standard_normal(2000).astype(np.float32)
        msg = dgc.encode("w", g, rng)
        sent = msg[0]
        assert len(sent) == int(np.ceil(densities[-1] * 2000))
        assert np.all(dgc.velocity["w"][sent] == 0) and np.all(dgc.residual["w"][sent] == 0)
        dgc.next_step()
    assert densities[0] == 0.25 and densities[-1] == densities[-2] == 0.01
    assert all(a > b for a, b in zip(densities[:5], densities[1:5]))      # exponential decay to the target


def test_dgc_clips_each_workers_gradient_to_its_share_of_the_norm():
    dgc = DGC(TopK(fraction=1.0), momentum=0.0, clip=1.0, workers=4)
    g = np.full(100, 1.0, np.float32)       # norm 10
    msg = dgc.encode("w", g, np.random.default_rng(0))
    assert np.linalg.norm(msg[1]) == pytest.approx(0.5, rel=1e-6)     # clip / sqrt(workers)


@pytest.mark.parametrize("spec,ef,dgc", [("topk:0.01", True, False), ("topk:0.01,ef=0", False, False),
                                         ("sign", True, False), ("terngrad", False, False), ("qsgd:8", False, False),
                                         ("fp16:sr", False, False), ("dgc:0.001,warmup=100,clip=5", True, True),
                                         ("dgc:0.01,ef=0", False, True),
                                         ("none", False, False)])
def test_compress_specs(spec, ef, dgc):
    c = parse_compression(spec)
    assert (c.error_feedback, c.dgc, c.enabled) == (ef, dgc, spec != "none")


@pytest.mark.parametrize("spec,message", [("zip", "unknown compressor"), ("topk:2.5x", "bad argument"),
                                          ("topk:0.1,clip=3", "options of dgc"),
                                          ("qsgd:300", "1 to 127"), ("topk:0.1,foo=1", "unknown option"),
                                          ("threshold:-1", "must be > 0")])
def test_bad_compress_specs_are_clear_errors(spec, message):
    with pytest.raises(TdcError, match=message):
        parse_compression(spec)


def test_dense_is_chosen_where_the_compressed_allgather_sends_more():
    assert not dense_cheaper(TopK(fraction=0.001), 100000, 2)
    assert dense_cheaper(TopK(fraction=0.5), 1000, 4)         # 4 KB of pairs to each of 3 ranks > 6 KB ring
    assert not dense_cheaper(Half("fp16"), 1000, 2)           # 2 KB vs 4 KB
    assert dense_cheaper(Half("fp16"), 1000, 8)               # 7 * 2 KB vs 7 KB
    assert not dense_cheaper(Threshold(1.0), 1000, 8)         # size unknown in advance: compress


@settings(max_examples=40, deadline=None)
@given(head=st.lists(st.integers(-2**40, 2**40), max_size=5),
       arrays=st.lists(st.tuples(st.sampled_from(["float32", "int32", "uint8", "uint16", "float16", "int8"]),
                                 st.integers(0, 50)), max_size=4))
def test_messages_round_trip(head, arrays):
    rng = np.random.default_rng(len(arrays))
    xs = [(rng.standard_normal(n) * 50).astype(dt) for dt, n in arrays]
    h, ys = unpack(pack(head, xs))
    assert h == head and len(ys) == len(xs)
    for a, b in zip(xs, ys):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
