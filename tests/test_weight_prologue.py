"""Weight prologues (passes/hoist.py): an inference graph's weight-only work runs once per set of
weights on the LLVM backend, and new weights recompute it."""
import numpy as np
import pytest

import tdc
from tdc.lower.pipeline import weight_prologue


@tdc.model(batch=2)
def conv_bn(x: tdc.f32["B", 3, 8, 8]):
    h = tdc.nn.batchnorm(tdc.nn.conv2d(x, 4, 3, pad=1, name="conv"), name="bn").relu()
    return tdc.nn.linear(h.flatten(), 5, name="fc")


def _graph():
    return conv_bn.trace(batch=2)


def _params(seed):
    rng = np.random.default_rng(seed)
    exe = tdc.compile(_graph(), backend="reference", seed=seed)
    params = {k: v.copy() for k, v in exe.state.items()}
    params["bn.running_var"] = rng.uniform(0.5, 2.0, params["bn.running_var"].shape).astype(np.float32)
    params["bn.running_mean"] = rng.uniform(-1, 1, params["bn.running_mean"].shape).astype(np.float32)
    return params


def test_the_folded_batchnorm_moves_to_the_prologue():
    split = weight_prologue(_graph())
    assert split is not None
    main_ops = {n.op for n in split.main.nodes}
    assert "batchnorm" not in main_ops and "rsqrt" not in main_ops, main_ops
    assert {"conv.weight", "bn.running_var"} <= set(split.reads)
    # the folded weight and bias are consts of main, computed by the prologue
    assert len(split.outputs) >= 1 and all(a.kind == "const" for a in split.main.args if a.name in split.outputs)
    assert "conv.weight" not in {a.name for a in split.main.args}


def test_training_steps_are_not_split():
    assert weight_prologue(tdc.train_step(conv_bn, batch=2)) is None


def test_llvm_runs_it_once_and_new_weights_recompute_it():
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    p0, p1 = _params(1), _params(2)
    exe = tdc.compile(_graph(), backend="llvm", params=p0)
    ref = tdc.compile(_graph(), backend="reference", params=p0)
    np.testing.assert_allclose(exe(x=x)["out"], ref(x=x)["out"], rtol=1e-4, atol=1e-5)
    assert "batchnorm" not in {n.op for n in exe.graph.nodes}
    assert set(exe.state) == set(ref.state)           # the user's names, not the prologue's consts
    with pytest.raises(ValueError, match="read-only"):
        exe.state["bn.running_var"][...] = 1          # would leave the folded weight stale
    exe.set_state({"bn.running_var": p1["bn.running_var"], "conv.weight": p1["conv.weight"]})
    ref.set_state({"bn.running_var": p1["bn.running_var"], "conv.weight": p1["conv.weight"]})
    np.testing.assert_allclose(exe(x=x)["out"], ref(x=x)["out"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(exe.state["conv.weight"], p1["conv.weight"])
    exe.set_state({"fc.weight": p1["fc.weight"]})     # read by main only: no recompute needed, still right
    ref.set_state({"fc.weight": p1["fc.weight"]})
    np.testing.assert_allclose(exe(x=x)["out"], ref(x=x)["out"], rtol=1e-4, atol=1e-5)
