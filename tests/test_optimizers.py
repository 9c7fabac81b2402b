"""Each optimizer's in-graph update against its textbook formula, over several steps."""
import numpy as np
import pytest

import tdc
from tdc.errors import TdcError
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.passes.autodiff import autodiff
from tdc.passes.optimizer import Optimizer, add_optimizer

C = np.array([0.5, -1.0, 2.0, 0.25])
W0 = np.array([1.0, 2.0, -3.0, 0.5])


def _quadratic_step(opt):
    """loss = sum(w*c) + 0.5*sum(w^2 * w)/3, so the gradient is c + w^2/2 (not linear in w)."""
    g = Graph("quad")
    with Builder(g) as b:
        w = b.arg("w", TensorType("f64", (4,)), "param")
        c = b.constant(C, "f64")
        g.add_output("loss", F.sum(w * c + w * w * w * (1.0 / 6.0)).value)
    return add_optimizer(autodiff(g), opt)


def _grad(w):
    return C + w * w / 2


def _textbook(opt, lrs):
    w = W0.copy()
    v = np.zeros(4)
    m = np.zeros(4)
    cache = np.zeros(4)
    out = []
    for t, lr in enumerate(lrs, start=1):
        g = _grad(w) + opt.weight_decay * w
        if opt.name == "sgd":
            w = w - lr * g
        elif opt.name == "momentum":
            v = opt.momentum * v - lr * g
            w = w + v
        elif opt.name == "nesterov":
            v_prev = v
            v = opt.momentum * v - lr * g
            w = w - opt.momentum * v_prev + (1 + opt.momentum) * v
        elif opt.name == "adagrad":
            cache = cache + g * g
            w = w - lr * g / (np.sqrt(cache) + opt.eps)
        elif opt.name == "rmsprop":
            cache = opt.rho * cache + (1 - opt.rho) * g * g
            w = w - lr * g / (np.sqrt(cache) + opt.eps)
        elif opt.name == "adam":
            m = opt.beta1 * m + (1 - opt.beta1) * g
            v = opt.beta2 * v + (1 - opt.beta2) * g * g
            mhat = m / (1 - opt.beta1 ** t)
            vhat = v / (1 - opt.beta2 ** t)
            w = w - lr * mhat / (np.sqrt(vhat) + opt.eps)
        out.append(w.copy())
    return out


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_update_rule_matches_textbook(name, weight_decay):
    opt = Optimizer(name, lr=0.1, momentum=0.8, rho=0.95, beta1=0.85, beta2=0.99, eps=1e-6,
                    weight_decay=weight_decay)
    exe = tdc.compile(_quadratic_step(opt), params={"w": W0.copy()})
    lrs = [0.1, 0.1, 0.05, 0.05, 0.02, 0.2]   # a changing schedule: lr is an input of the step
    expected = _textbook(opt, lrs)
    for step, lr in enumerate(lrs):
        exe(lr=np.float32(lr))
        np.testing.assert_allclose(exe.state["w"], expected[step], rtol=1e-6, atol=1e-7,
                                   err_msg=f"{name} step {step + 1}")
    assert int(exe.state["step"]) == len(lrs)


def test_optimizer_state_is_graph_state():
    g = _quadratic_step(Optimizer("adam"))
    assert {a.name for a in g.state} == {"step", "w.m", "w.v"}
    assert {t.name for t, _ in g.updates} == {"step", "w", "w.m", "w.v"}
    assert [n for n, _ in g.outputs] == ["loss"]
    assert [a.name for a in g.inputs] == ["lr"]


def test_bad_optimizer_settings_are_clear_errors():
    with pytest.raises(TdcError, match="unknown optimizer 'adamax'"):
        Optimizer("adamax")
    with pytest.raises(TdcError, match="momentum must be in"):
        Optimizer("momentum", momentum=1.5)
    g = Graph("nograd")
    with pytest.raises(TdcError, match="run autodiff before the optimizer"):
        add_optimizer(g, Optimizer())
