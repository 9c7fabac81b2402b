"""Every differentiable op's gradient rule against float64 central finite differences,
plus the autodiff pass's own behaviour (fan-out, broadcasting, errors)."""
import numpy as np
import pytest

import tdc
from tdc.errors import TdcError
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ir.opdef import all_ops
from tdc.passes.autodiff import autodiff
from tdc.runtime.gradcheck import gradcheck
from tdc.frontend.init import init_params

TOL = 1e-5


def pos(*s):   # positive values, away from 0 (log, sqrt, div)
    return ("pos", s)


def any_(*s):  # values away from 0 and from each other (relu/abs kinks, max ties)
    return ("any", s)


def data(*s):  # non-differentiable input given as a ready array
    return ("data", s)


def _make(kind, spec, rng, i):
    if kind == "pos":
        return rng.uniform(0.5, 2.0, spec)
    if kind == "any":
        n = int(np.prod(spec)) if spec else 1
        vals = (rng.permutation(n) + 1.0) / n * rng.choice([-1, 1], n) + rng.uniform(-0.1, 0.1, n) / n
        return vals.reshape(spec)
    return spec


# (op, inputs, attrs). Non-float inputs are plain arrays.
CASES = [
    ("add", [any_(2, 3), any_(3)], {}),
    ("add", [any_(2, 1, 3), any_(4, 1)], {}),
    ("sub", [any_(2, 3), any_(2, 1)], {}),
    ("mul", [any_(2, 3), any_(1, 3)], {}),
    ("mul", [any_(3), any_(2, 3)], {}),
    ("div", [any_(2, 3), pos(3)], {}),
    ("pow", [pos(2, 3), any_(2, 3)], {}),
    ("pow", [pos(2, 3), pos()], {}),
    ("maximum", [any_(2, 3), any_(3)], {}),
    ("minimum", [any_(2, 3), any_(2, 3)], {}),
    ("where", [np.array([[True, False, True], [False, False, True]]), any_(2, 3), any_(3)], {}),
    ("neg", [any_(4)], {}),
    ("abs", [any_(2, 3)], {}),
    ("exp", [any_(2, 3)], {}),
    ("log", [pos(2, 3)], {}),
    ("sqrt", [pos(5)], {}),
    ("rsqrt", [pos(5)], {}),
    ("relu", [any_(3, 4)], {}),
    ("leaky_relu", [any_(3, 4)], {"alpha": 0.2}),
    ("sigmoid", [any_(3, 4)], {}),
    ("tanh", [any_(3, 4)], {}),
    ("cast", [any_(3)], {"to": "f64"}),
    ("matmul", [any_(3, 4), any_(4, 2)], {}),
    ("matmul", [any_(2, 3, 4), any_(4, 5)], {}),
    ("matmul", [any_(2, 1, 3, 4), any_(3, 4, 2)], {}),
    ("linear", [any_(5, 4), any_(3, 4), any_(3)], {}),
    ("linear", [any_(2, 5, 4), any_(3, 4)], {}),
    ("reduce_sum", [any_(2, 3, 4)], {"axes": (1,)}),
    ("reduce_sum", [any_(2, 3, 4)], {"axes": None, "keepdims": True}),
    ("reduce_mean", [any_(2, 3, 4)], {"axes": (0, -1)}),
    ("reduce_max", [any_(2, 3, 4)], {"axes": (2,), "keepdims": True}),
    ("reduce_max", [any_(3, 4)], {}),
    ("softmax", [any_(3, 5)], {}),
    ("softmax", [any_(2, 3, 4)], {"axis": 1}),
    ("log_softmax", [any_(3, 5)], {"axis": -1}),
    ("reshape", [any_(2, 6)], {"shape": (3, -1)}),
    ("flatten", [any_(2, 3, 4)], {"axis": 2}),
    ("transpose", [any_(2, 3, 4)], {"perm": (2, 0, 1)}),
    ("broadcast_to", [any_(3, 1)], {"shape": (2, 3, 4)}),
    ("concat", [any_(2, 3), any_(2, 2), any_(2, 1)], {"axis": 1}),
    ("slice", [any_(5, 6)], {"starts": (1, 0), "ends": (4, 6), "steps": (2, 3)}),
    ("slice_grad", [any_(2, 2)], {"input_shape": (5, 6), "starts": (1, 0), "ends": (4, 6), "steps": (2, 3)}),
    ("erf", [any_(3, 4)], {}),
    ("gather", [any_(4, 3), np.array([[1, -1], [1, 0]], np.int32)], {"axis": 0}),     # a row read twice
    ("gather", [any_(2, 5, 3), np.array([4, 0, 4], np.int64)], {"axis": -2}),
    ("gather_grad", [any_(2, 3, 2), np.array([0, 2, 0], np.int32)], {"axis": 1, "size": 4}),
    ("pad", [any_(2, 3)], {"pads": (1, 0, 2, 3), "value": 0.5}),
    ("batchnorm", [any_(4, 3), pos(3), any_(3), any_(3), pos(3)], {}),
    ("batchnorm", [any_(3, 2, 2, 3), pos(2), any_(2), any_(2), pos(2)], {"training": True}),
    ("batchnorm", [any_(2, 3, 2, 2), pos(3), any_(3), any_(3), pos(3)], {"eps": 0.1}),
    ("dropout", [any_(4, 5), np.array(7)], {"rate": 0.3, "seed": 11}),
    ("softmax_cross_entropy", [any_(4, 5), np.array([0, 4, 2, 2])], {}),
    ("mse", [any_(3, 2), any_(3, 2)], {}),
    ("allreduce", [any_(3)], {"op": "sum"}),
    ("allreduce", [any_(3)], {"op": "mean"}),
    ("allreduce_start", [any_(3)], {"op": "sum", "algo": "ring", "world": 1}),
    ("allreduce_wait", [any_(3)], {}),
    ("broadcast", [any_(3)], {"root": 0}),
    ("reduce_to", [any_(3)], {"root": 0}),
    ("conv2d", [any_(2, 3, 5, 5), any_(4, 3, 3, 3), any_(4)], {}),
    ("conv2d", [any_(1, 4, 7, 6), any_(6, 2, 3, 2)],
     {"stride": (2, 1), "pad": (1, 0, 2, 1), "dilation": (1, 2), "groups": 2}),
    ("conv2d", [any_(1, 3, 5, 5), any_(3, 1, 3, 3), any_(3)], {"groups": 3, "pad": (1, 1, 1, 1), "stride": (2, 2)}),
    ("conv2d_grad_input", [any_(1, 4, 3, 3), any_(4, 2, 3, 3)],
     {"input_shape": (1, 2, 7, 7), "stride": (2, 2), "pad": (0, 0, 0, 0)}),
    ("conv2d_grad_weight", [any_(1, 2, 6, 6), any_(1, 3, 3, 3)],
     {"weight_shape": (3, 2, 3, 3), "stride": (2, 2), "pad": (0, 0, 1, 1)}),
    ("maxpool2d", [any_(2, 2, 6, 6)], {"kernel": (2, 2), "stride": (2, 2)}),
    ("maxpool2d", [any_(1, 2, 7, 7)], {"kernel": (3, 3), "stride": (2, 2), "pad": (1, 1, 1, 1), "ceil_mode": True}),
    # windows that tile the image but for a last, partial one (the backends' tiled fast path must not read past it)
    ("maxpool2d", [any_(1, 2, 5, 5)], {"kernel": (2, 2), "stride": (2, 2), "ceil_mode": True}),
    ("avgpool2d", [any_(1, 2, 6, 6)], {"kernel": (3, 3), "stride": (2, 2), "pad": (1, 1, 1, 1)}),
    ("avgpool2d", [any_(1, 2, 5, 5)],
     {"kernel": (2, 2), "stride": (2, 2), "ceil_mode": True, "count_include_pad": True}),
    ("global_avgpool", [any_(2, 3, 4, 5)], {}),
]


def _graph_for(op, inputs, attrs, seed=0):
    rng = np.random.default_rng(seed)
    g = Graph(op)
    values = {}
    with Builder(g) as b:
        ts = []
        for i, spec in enumerate(inputs):
            if isinstance(spec, tuple):
                arr = _make(spec[0], spec[1], rng, i).astype(np.float64)
                t = b.arg(f"p{i}", TensorType("f64", arr.shape), "param")
            else:
                arr = spec
                t = b.arg(f"d{i}", TensorType.of(arr), "input")
            values[t.name] = arr
            ts.append(t)
        out = F.apply(op, *ts, **attrs)
        y = out[0] if isinstance(out, tuple) else out
        weights = b.constant(rng.standard_normal(y.shape), "f64")   # a generic linear functional of y
        g.add_output("loss", F.sum(y * weights).value)
    return g, values


@pytest.mark.parametrize("op,inputs,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_gradient_matches_finite_differences(op, inputs, attrs):
    g, values = _graph_for(op, inputs, attrs)
    errors = gradcheck(g, values, loss="loss")
    assert errors, "no gradient was checked"
    for name, err in errors.items():
        assert err < TOL, f"{op} d/d{name}: relative error {err:.2e}"


def test_every_differentiable_op_is_covered():
    covered = {c[0] for c in CASES}
    differentiable = {name for name, op in all_ops().items() if op.grad is not None}
    # push and pull need a server and workers: test_ops_norm_loss_comm checks them over simulated ranks;
    # transfer, concat_ranks and sum_ranks need several ranks: test_partition checks them;
    # fake_quant's gradient is the straight-through estimator, not the derivative of its rounding
    # (finite differences see steps): test_quantize checks it; sparse_linear's index inputs must
    # describe a CSR matrix, which random arrays do not: test_sparse checks it against finite differences
    assert differentiable - covered <= {"sign", "maxpool2d_grad", "avgpool2d_grad", "one_hot", "push", "pull",
                                        "transfer", "concat_ranks", "sum_ranks", "fake_quant", "fake_quant_grad",
                                        "sparse_linear"} | \
        {n for n in differentiable if n.startswith("maxpool2d_")}, differentiable - covered


def _mlp_graph(batch=3):
    @tdc.model(batch=batch)
    def net(x: tdc.f32["B", 4]):
        h = tdc.nn.linear(x, 5).tanh()
        return tdc.nn.linear(h + h * h, 3)   # h fans out three times
    return net.trace()


def test_fan_out_accumulates_and_unused_param_gets_zero():
    g = Graph("t")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f64", (3,)), "param")
        u = b.arg("unused", TensorType("f64", (2,)), "param")
        g.add_output("loss", F.sum(x * x + x).value)
    d = autodiff(g)
    vals = {"x": np.array([1.0, -2.0, 0.5]), "unused": np.ones(2)}
    out = tdc.compile(d, params=vals)()
    np.testing.assert_allclose(out["grad.x"], 2 * vals["x"] + 1)
    np.testing.assert_array_equal(out["grad.unused"], np.zeros(2))
    del u


def test_broadcast_gradient_is_reduced_to_the_input_shape():
    g = Graph("t")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f64", (4, 3)), "param")
        bias = b.arg("bias", TensorType("f64", (3,)), "param")
        g.add_output("loss", F.sum((x + bias) * (x + bias)).value)
    d = autodiff(g)
    vals = {"x": np.arange(12.0).reshape(4, 3), "bias": np.array([1.0, 2.0, 3.0])}
    out = tdc.compile(d, params=vals)()
    assert out["grad.bias"].shape == (3,)
    np.testing.assert_allclose(out["grad.bias"], (2 * (vals["x"] + vals["bias"])).sum(0))


def test_integer_inputs_get_no_gradient_and_model_checks():
    g = _mlp_graph()
    with Builder(g) as b:
        from tdc.ops.tensor import Tensor
        y = b.arg("y", TensorType("i64", (3,)), "input")
        g.add_output("loss", F.softmax_cross_entropy(Tensor(g.output("out"), b), y).value)
    rng = np.random.default_rng(1)
    vals = init_params(g, 0)
    vals["x"] = rng.standard_normal((3, 4))
    vals["y"] = np.array([0, 2, 1])
    errors = gradcheck(g, vals, loss="loss")
    assert set(errors) == {a.name for a in g.params}
    assert max(errors.values()) < TOL
    with pytest.raises(TdcError, match="cannot differentiate with respect to y"):
        autodiff(g, "loss", wrt=["y"])


def test_inputs_can_be_differentiated_on_request():
    g = _mlp_graph()
    with Builder(g) as b:
        from tdc.ops.tensor import Tensor
        g.add_output("loss", F.sum(Tensor(g.output("out"), b)).value)
    d = autodiff(g, "loss", wrt=["x"])
    assert [n for n, _ in d.outputs] == ["out", "loss", "grad.x"]


def test_loss_must_be_a_scalar():
    g = _mlp_graph()
    with pytest.raises(TdcError, match="must be a float scalar"):
        autodiff(g, "out")


def test_missing_gradient_rule_is_a_clear_error():
    from tdc.ir.opdef import _REGISTRY, OpDef
    _REGISTRY["test_nograd"] = OpDef("test_nograd", "test", infer=lambda ins: ins[0], ref=lambda x: x.copy())
    try:
        g = Graph("t")
        with Builder(g) as b:
            x = b.arg("x", TensorType("f64", (3,)), "param")
            g.add_output("loss", F.sum(F.apply("test_nograd", x)).value)
        with pytest.raises(TdcError, match=r"op test_nograd has no gradient rule \(at .*test_autodiff.py:\d+\)"):
            autodiff(g)
    finally:
        del _REGISTRY["test_nograd"]


@pytest.mark.parametrize("model,batch", [("mlp", 2), ("lenet", 2), ("digits", 3)])
def test_example_models_gradients_match_finite_differences(model, batch):
    """Whole training graphs (forward + softmax cross-entropy) in float64, every param."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from tdc.passes.training import add_loss
    m = getattr(__import__(model), model)
    g = add_loss(m.trace(batch))
    rng = np.random.default_rng(0)
    vals = init_params(g, 0)
    vals["x"] = rng.standard_normal(g.arg("x").type.shape)
    vals["y"] = rng.integers(0, 10, batch)
    errors = gradcheck(g, vals, loss="loss", max_entries=12)
    assert set(errors) == {a.name for a in g.params}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{model}: d/d{worst} relative error {errors[worst]:.2e}"
