"""Constant folding (fold), algebraic simplification (simplify) and batchnorm folding (bnfold)."""
import os
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tdc
from tdc.backends.reference import run
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.passes.manager import Pipeline
from tdc.frontend.init import init_params

from helpers import MEDIUM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


# ---- helpers ------------------------------------------------------------------------------

def build(fn, **arg_types):
    """A graph with f32 inputs of the given shapes (or (dtype, shape, kind)); fn returns the output `out`
    or a dict of named outputs."""
    g = Graph("t")
    with Builder(g) as b:
        args = {}
        for name, t in arg_types.items():
            dtype, shape, kind = t if isinstance(t[0], str) else ("f32", t, "input")
            args[name] = b.arg(name, TensorType(dtype, shape), kind)
        outs = fn(**args)
        for name, t in (outs.items() if isinstance(outs, dict) else [("out", outs)]):
            g.add_output(name, t.value)
    return g


def random_feed(g, seed=0):
    """Arrays for every argument, by name: floats normal, integers small (valid labels), lr 0.1."""
    rng = np.random.default_rng(seed)
    feed = {}
    for a in g.args:
        t = a.type
        if a.name == "lr":
            feed[a.name] = np.asarray(0.1, t.np_dtype)
        elif t.dtype.startswith("f"):
            feed[a.name] = rng.standard_normal(t.shape).astype(t.np_dtype)
        else:
            feed[a.name] = rng.integers(0, 10, t.shape).astype(t.np_dtype)
    return feed


def results(g, feed):
    """Outputs and updated params/state, by name."""
    env = run(g, {a: feed[a.name] for a in g.args})
    out = {name: env[v] for name, v in g.outputs}
    out.update({"new." + t.name: env[v] for t, v in g.updates})
    return out


def assert_same(g, h, rtol=0.0, feed=None, atol=0.0):
    feed = feed or random_feed(g)
    want, got = results(g, feed), results(h, feed)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, equal_nan=True, err_msg=k)


def apply(g, pipeline):
    before = str(g)
    h = Pipeline.parse(pipeline).run(g)   # verifies the IR after each pass
    assert str(g) == before, "passes must not mutate their input"
    return h


# ---- simplify: one graph per rule -------------------------------------------------------------

X = (3, 4)
RULE_CASES = {
    # name: (graph, expected op counts after simplify)
    "x+0": (lambda x: x + 0.0, {}),
    "0+x": (lambda x: 0.0 + x, {}),
    "x-0": (lambda x: x - 0.0, {}),
    "x*1": (lambda x: x * 1.0, {}),
    "1*x": (lambda x: 1.0 * x, {}),
    "x/1": (lambda x: x / 1.0, {}),
    "x*ones": (lambda x: x * F.full(X, 1.0), {}),
    "x+zeros const": (lambda x: x + F.constant(np.zeros(X, np.float32)), {}),
    "x+zeros bigger": (lambda x: F.reshape(x, (1, 12)) + F.full((5, 12), 0.0),
                       {"reshape": 1, "broadcast_to": 1}),
    "x*0 kept": (lambda x: x * 0.0, {"constant": 1, "mul": 1}),
    "x+ones kept": (lambda x: x + F.full(X, 1.0), {"full": 1, "add": 1}),
    "neg neg": (lambda x: -(-x), {}),
    "neg neg neg": (lambda x: -(-(-x)), {"neg": 1}),
    "reshape reshape": (lambda x: F.reshape(F.reshape(x, (12,)), (2, 6)), {"reshape": 1}),
    "reshape round trip": (lambda x: F.reshape(F.reshape(x, (12,)), X), {}),
    "reshape same": (lambda x: F.reshape(x, (-1, 4)), {}),
    "flatten reshape": (lambda x: F.reshape(F.flatten(F.reshape(x, (3, 2, 2))), (4, 3)), {"reshape": 1}),
    "transpose transpose": (lambda x: F.transpose(F.transpose(F.reshape(x, (3, 2, 2)), (1, 0, 2)), (2, 0, 1)),
                            {"reshape": 1, "transpose": 1}),
    "transpose identity": (lambda x: F.transpose(F.transpose(x)), {}),
    "broadcast same": (lambda x: F.broadcast_to(x, X), {}),
    "broadcast chain": (lambda x: F.broadcast_to(F.broadcast_to(x, (2, 3, 4)), (5, 2, 3, 4)), {"broadcast_to": 1}),
    "cast same": (lambda x: F.cast(x, "f32"), {}),
    "sum_to": (lambda x: F.sum_to(x, (4,)), {"reduce_sum": 1}),
    "where(c, x, x)": (lambda x: F.where(x > 0.0, x, x), {}),
    "where(c, x, x) broadcast": (lambda x: F.where(F.full((2, 3, 4), 1.0) > F.reshape(x, (1, 3, 4)), x, x),
                                 {"broadcast_to": 1}),
    "relu gradient kept": (lambda x: F.where(x > 0.0, x * 3.0, F.zeros_like(x)),
                           {"constant": 2, "greater": 1, "mul": 1, "full": 1, "where": 1}),
    "a-neg(c)": (lambda x: x - (-F.exp(x)), {"exp": 1, "add": 1}),
    "a+neg(c)": (lambda x: x + (-F.exp(x)), {"exp": 1, "sub": 1}),
    "neg(c)+a": (lambda x: (-F.exp(x)) + x, {"exp": 1, "sub": 1}),
    "x*c1*c2": (lambda x: (x * 3.0) * 0.1, {"constant": 1, "mul": 1}),
    "c2*(c1*x)": (lambda x: 0.1 * (3.0 * x), {"constant": 1, "mul": 1}),
    "log softmax": (lambda x: F.log(F.softmax(x, 1)), {"log_softmax": 1}),
    "relu relu": (lambda x: F.relu(F.relu(x)), {"relu": 1}),
}


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_simplify_rule(name):
    fn, want = RULE_CASES[name]
    g = build(fn, x=X)
    h = apply(g, "simplify")
    assert h.op_counts() == want, str(h)
    assert_same(g, h, rtol=1e-6)


def test_rules_compose_to_a_fixpoint():
    # 1 * (reshape(reshape(x)) + 0) - neg(neg(0)): every layer goes, in one pass
    g = build(lambda x: 1.0 * (F.reshape(F.reshape(x, (12,)), X) + 0.0) - (-(-F.full(X, 0.0))), x=X)
    h = apply(g, "simplify")
    assert h.op_counts() == {} and h.outputs[0][1] is h.arg("x")


def test_transpose_perms_compose():
    g = build(lambda x: F.transpose(F.transpose(x, (1, 2, 0)), (2, 0, 1)) * 2.0
              + F.transpose(F.transpose(x, (1, 0, 2)), (0, 2, 1)), x=(3, 3, 3))
    h = apply(g, "simplify")
    assert [n.attrs["perm"] for n in h.nodes if n.op == "transpose"] == [(1, 2, 0)]
    assert_same(g, h)


def test_shared_values_are_not_duplicated():
    def fn(x):
        s = F.sum(x, 0, keepdims=True)    # also used as is: sum_to must not compute it twice
        y = x * 3.0                       # also used as is: no reassociation
        return F.reshape(s, (4,)) + F.sum(s * 1.0 + y * 2.0, 0) + F.sum(y, 0)
    g = build(fn, x=X)
    h = apply(g, "simplify")
    assert h.op_counts()["reduce_sum"] == 3 and h.op_counts()["mul"] == 2
    assert_same(g, h)


def test_simplify_leaves_other_ranks_alone():
    g = Graph("t")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", X), "input")
        n = F.neg(x)
        n.value.producer.placement = "rank:1"
        g.add_output("out", F.neg(n).value)
    assert apply(g, "simplify").op_counts() == {"neg": 2}


# ---- fold ---------------------------------------------------------------------------------

def test_fold_evaluates_constant_subgraphs():
    def fn(x):
        c = F.exp(F.constant(np.array([1.0, 2.0, 3.0, 4.0], np.float32))) * 2.0
        return x * F.reshape(c + F.full((4,), 1.0), (1, 4))
    g = build(fn, x=X)
    h = apply(g, "fold,dce")
    assert h.op_counts() == {"constant": 1, "mul": 1}
    assert_same(g, h)


def test_fold_keeps_big_results_and_never_folds_arguments():
    def fn(x, p, c):
        big = F.full((100, 100), 2.0) * 3.0              # 10000 elements: too big to spell out
        return F.sum(big) + F.sum(p * 2.0) + F.sum(c * 2.0) + F.sum(x)
    g = build(fn, x=X, p=("f32", (2,), "param"), c=("f32", (2,), "const"))
    h = apply(g, "fold,dce")
    assert h.op_counts() == g.op_counts()
    assert_same(g, h)


def test_fold_does_not_evaluate_huge_inputs():
    g = build(lambda x: x + F.sum(F.full((1 << 15, 1 << 15), 1.0)), x=X)   # a scalar, but 4 GB to compute
    assert apply(g, "fold").op_counts() == {"full": 1, "reduce_sum": 1, "add": 1}


def test_fold_handles_several_outputs_ints_and_special_values():
    def fn(x):
        c = lambda a: F.constant(np.asarray(a, np.float32))   # noqa: E731
        y, m, v = F.batchnorm(c(np.arange(12.0).reshape(2, 3, 2)), c([1, 2, 3]), c([0, 0, 1]),
                              c([0, 0, 0]), c([1, 1, 1]), training=True)
        inf = c([1.0, -1.0, 0.0]) / c(0.0)                  # inf, -inf, nan: no warnings, same values
        idx = F.constant(np.array([7, 9], np.int32)) / F.constant(np.int32(-2))   # integer division
        d = F.dropout(c(np.ones(8)), F.constant(np.int64(3)), 0.5, seed=1)
        return {"y": y, "m": m, "v": v, "inf": inf, "idx": idx, "d": d, "x": F.sum(x)}
    g = build(fn, x=X)
    h = apply(g, "fold,dce")
    assert h.op_counts() == {"constant": 6, "reduce_sum": 1}
    with np.errstate(divide="ignore", invalid="ignore"):
        assert_same(g, h)


def test_fold_leaves_run_time_errors_and_communication_to_run_time():
    def fn(x):
        bad = F.apply("one_hot", F.constant(np.array([12], np.int64)), depth=3)   # label out of range
        total = F.allreduce(F.constant(np.float32(2.0)))
        return F.sum(x) + F.sum(bad) + total
    h = apply(build(fn, x=X), "fold,dce")
    assert h.op_counts()["one_hot"] == 1 and h.op_counts()["allreduce"] == 1


# ---- random elementwise graphs ------------------------------------------------------------

# Powers of two (and 0): reassociating their products is exact, so results must match exactly.
CONSTS = (0.0, 1.0, -1.0, 2.0, 0.5, 4.0)
SHAPES = ((), (4,), (3, 4))
UNARY = ("neg", "relu", "abs", "tanh")
SHAPE_OPS = ("reshape", "transpose", "broadcast")
BINARY = ("add", "sub", "mul", "maximum", "div")


@st.composite
def programs(draw):
    """Steps building values from x [3,4] and constants; each operand is an earlier value or a constant."""
    def operand():
        if draw(st.booleans()):
            return ("value", draw(st.integers(0, 100)))
        kind = draw(st.sampled_from(("constant", "full")))
        return (kind, draw(st.sampled_from(CONSTS)), draw(st.sampled_from(SHAPES)))
    steps = []
    for _ in range(draw(st.integers(1, 10))):
        op = draw(st.sampled_from(UNARY + BINARY + SHAPE_OPS + ("where", "where_same")))
        n = 1 if op in UNARY + SHAPE_OPS else 2 if op in BINARY + ("where_same",) else 3
        specs = [operand() for _ in range(n)]
        if op == "div":   # by a nonzero constant, so no inf or nan to compare
            specs[1] = ("constant", draw(st.sampled_from(CONSTS[1:])), ())
        steps.append((op, specs))
    return steps


def build_program(steps):
    def fn(x):
        values = [x]

        def get(spec):
            if spec[0] == "value":
                return values[spec[1] % len(values)]
            _, c, shape = spec
            return F.full(shape, c) if spec[0] == "full" else F.constant(np.full(shape, c, np.float32))
        for op, specs in steps:
            a = [get(s) for s in specs]
            if op in UNARY:
                y = F.apply(op, a[0])
            elif op in BINARY:
                y = F.apply(op, a[0], a[1])
            elif op == "where":
                y = F.where(a[0] > a[1], a[1], a[2])
            elif op == "where_same":
                y = F.where(a[0] > 0.0, a[1], a[1])
            elif op == "reshape":
                y = F.reshape(F.reshape(a[0], (-1,)), a[0].shape)
            elif op == "transpose":
                y = F.transpose(F.transpose(a[0]))
            else:
                y = F.broadcast_to(a[0], X)
            values.append(y)
        return values[-1] if values[-1].shape == X else F.broadcast_to(values[-1], X)
    return build(fn, x=X)


@MEDIUM
@given(programs(), st.integers(0, 2**16))
def test_fold_simplify_dce_preserve_random_elementwise_graphs(steps, seed):
    g = build_program(steps)
    h = apply(g, "fold,simplify,dce")
    assert len(h.nodes) <= len(g.nodes)
    assert_same(g, h, feed=random_feed(g, seed))


# ---- training steps of the examples ---------------------------------------------------------

@pytest.mark.parametrize("model", ["lenet", "mlp"])
def test_training_steps_get_smaller_and_compute_the_same_update(model):
    from tdc.passes.training import training_pipeline
    m = getattr(__import__(model), model)
    g = training_pipeline(simplify=False).run(m.trace(16, training=True))   # the raw autodiff output
    h = apply(g, "simplify,fold,cse,dce")
    assert len(h.nodes) < len(g.nodes)
    assert h.op_counts().get("reshape", 0) < g.op_counts()["reshape"]
    feed = {**random_feed(g, 1), **init_params(g, 0)}
    assert_same(g, h, rtol=1e-5, atol=1e-7, feed=feed)


# ---- bnfold -------------------------------------------------------------------------------

def _bn_params(g, seed=0):
    """Nonzero running statistics, gamma and beta for every batchnorm; initializers for the rest."""
    rng = np.random.default_rng(seed)
    p = init_params(g, seed)
    for a in g.args:
        if a.name.endswith(("running_mean", "bias")) and a.name.startswith("bn"):
            p[a.name] = rng.normal(0, 0.5, a.type.shape).astype(np.float32)
        elif a.name.endswith(("running_var", "weight")) and a.name.startswith("bn"):
            p[a.name] = rng.uniform(0.5, 2.0, a.type.shape).astype(np.float32)
    return p


def test_bnfold_removes_every_batchnorm_of_vgg_and_keeps_its_outputs():
    from vgg import vgg
    g = vgg.trace(batch=2)
    h = apply(g, "bnfold")
    assert "batchnorm" not in h.op_counts() and h.op_counts()["conv2d"] == g.op_counts()["conv2d"]
    params = _bn_params(g)
    x = np.random.default_rng(1).standard_normal(g.arg("x").type.shape).astype(np.float32)
    want = tdc.compile(g, params=params)(x=x)["out"]
    got = tdc.compile(h, params=params)(x=x)["out"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("bias,groups,stride", [(True, 1, 1), (False, 2, 2), (True, 3, 1)])
def test_bnfold_conv_variants(bias, groups, stride):
    def fn(x, w, b, gamma, beta, mean, var):
        y = F.conv2d(x, w, b if bias else None, stride=stride, pad=1, groups=groups)
        return F.batchnorm(y, gamma, beta, mean, var, eps=1e-3)
    c = 6
    p = lambda *s: ("f32", s, "param")   # noqa: E731
    g = build(fn, x=(2, 6, 7, 7), w=p(c, 6 // groups, 3, 3), b=p(c), gamma=p(c), beta=p(c),
              mean=("f32", (c,), "state"), var=("f32", (c,), "state"))
    h = apply(g, "bnfold,dce")
    assert h.op_counts()["conv2d"] == 1 and "batchnorm" not in h.op_counts()
    feed = random_feed(g, 2)
    feed["var"] = np.abs(feed["var"]) + 0.1
    assert_same(g, h, rtol=1e-5, atol=1e-5, feed=feed)


def test_bnfold_leaves_what_it_cannot_fold():
    def fn(x, w, gamma, beta, mean, var):
        y = F.conv2d(x, w)
        shared = F.batchnorm(y, gamma, beta, mean, var) + F.sum(y)           # conv output used twice
        z = F.conv2d(x, w)
        from_input = F.batchnorm(z, gamma, beta, mean, F.abs(F.reshape(x[0:1, :, 0, 0], (2,))) + 1.0)
        u = F.conv2d(x, w)
        trained = F.batchnorm(u, gamma, beta, mean, var, training=True)[0]
        return shared + from_input + trained
    p = ("f32", (2,), "param")
    g = build(fn, x=(1, 2, 5, 5), w=("f32", (2, 2, 3, 3), "param"), gamma=p, beta=p, mean=p, var=p)
    h = apply(g, "bnfold")
    assert h.op_counts()["batchnorm"] == 3
