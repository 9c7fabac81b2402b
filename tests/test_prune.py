"""Magnitude pruning: the prune pass's masks in the training step, the schedule, the trainer and the CLI."""
import os

import numpy as np
import pytest

import tdc
from tdc import nn
from tdc.backends import compile as compile_graph
from tdc.errors import TdcError
from tdc.ir.printer import print_graph
from tdc.ir.weights import load_npz
from tdc.passes.autodiff import autodiff
from tdc.passes.optimizer import SLOTS, Optimizer
from tdc.passes.prune import prunable
from tdc.passes.training import add_loss, train_step
from tdc.runtime.checkpoint import load_checkpoint
from tdc.runtime.data import Dataset, load_digits
from tdc.runtime.loader import Source
from tdc.runtime.prune import Prune, masks_for, prune_state, sparsity_report
from tdc.runtime.trainer import train

from helpers import cli, one_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "examples", "digits.py")
B = 8


@tdc.model(batch=B)
def small(x: tdc.f32["B", 1, 6, 6]):
    h = nn.conv2d(x, 4, 3, name="conv").relu()           # 4x4x4
    h = nn.batchnorm(h, name="bn").flatten()               # batchnorm: its params are not pruned
    h = nn.linear(h, 16, name="fc1").relu()
    return nn.linear(h, 3, name="fc2")


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {"x": rng.standard_normal((B, 1, 6, 6)).astype(np.float32),
               "y": rng.integers(0, 3, B).astype(np.int64), "lr": np.float32(0.05)}


def test_only_linear_and_conv_weights_get_masks():
    step = train_step(small, optimizer=Optimizer("momentum"), prune=True)
    assert prunable(small.trace(B, training=True)) == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert sorted(a.name for a in step.state if a.name.endswith(".mask")) == \
        ["conv.weight.mask", "fc1.weight.mask", "fc2.weight.mask"]
    updates = {t.name: v for t, v in step.updates}
    for name in ("conv.weight", "conv.weight.velocity", "fc2.weight", "fc2.weight.velocity"):
        assert updates[name].producer.op == "mul" and updates[name].producer.inputs[1].name.endswith(".mask")
    weights = ("conv.weight", "fc1.weight", "fc2.weight")
    others = [t for t in updates if not t.startswith(weights)]
    assert any(t.startswith("bn.") for t in others) and "fc1.bias" in others
    for name in others:
        v = updates[name]
        assert v.producer is None or not any((u.name or "").endswith(".mask") for u in v.producer.inputs), name


@pytest.mark.parametrize("opt", list(SLOTS))
def test_pruned_weights_and_their_state_stay_zero_for_100_steps(opt):
    # weight decay too: L2 and decoupled decay must not move a pruned weight either
    step = train_step(small, optimizer=Optimizer(opt, lr=0.05, weight_decay=0.01), prune=True)
    exe = compile_graph(step, backend="reference", seed=1)
    exe.set_state(prune_state(exe.state, step, 0.75, "layer"))
    masks = {k[:-5]: exe.state[k].copy() for k in exe.state if k.endswith(".mask")}
    before = {k: exe.state[k].copy() for k in masks}
    for feed in batches(100):
        exe(**feed)
    for w, m in masks.items():
        assert int(np.sum(m == 0)) == round(0.75 * m.size)
        assert np.all(exe.state[w][m == 0] == 0), (opt, w)
        for s in SLOTS[opt]:
            assert np.all(exe.state[f"{w}.{s}"][m == 0] == 0), (opt, w, s)
        assert not np.array_equal(exe.state[w][m == 1], before[w][m == 1])   # the rest still trains


def test_sparsity_per_layer_and_global_within_one_weight():
    rng = np.random.default_rng(0)
    w = {"a": rng.standard_normal((30, 7)).astype(np.float32), "b": 5 * rng.standard_normal((4, 3, 3, 3))}
    for s in (0.0, 0.33, 0.5, 0.9):
        layer = masks_for(w, s, "layer")
        for k in w:
            assert abs(np.sum(layer[k] == 0) - s * w[k].size) <= 0.5
            assert np.abs(w[k][layer[k] == 0]).max(initial=0) <= np.abs(w[k][layer[k] == 1]).min()
        glob = masks_for(w, s, "global")
        total = sum(x.size for x in w.values())
        assert abs(sum(np.sum(m == 0) for m in glob.values()) - s * total) <= 0.5
        pruned = np.concatenate([np.abs(w[k][glob[k] == 0]) for k in w])
        kept = np.concatenate([np.abs(w[k][glob[k] == 1]) for k in w])
        assert pruned.max(initial=0) <= kept.min()
    # the larger weights of b keep more of it under one global threshold
    glob = masks_for(w, 0.5, "global")
    assert np.mean(glob["b"]) > 0.8 and np.mean(glob["a"]) < 0.4


def test_schedules():
    cubic = Prune(0.9, schedule="iterative:4")
    expect = [0.0] + [0.9 * (1 - (1 - e / 4) ** 3) for e in (1, 2, 3)] + [0.9, 0.9]
    assert np.allclose([cubic.sparsity_at(e) for e in range(6)], expect)
    assert cubic.sparsity_at(4) == 0.9 and cubic.last_epoch() == 4
    assert [Prune(0.5, schedule="oneshot:2").sparsity_at(e) for e in range(4)] == [0, 0, 0.5, 0.5]
    assert [Prune(0.5).sparsity_at(e) for e in range(2)] == [0.5, 0.5]


def test_rising_sparsity_keeps_pruned_weights_pruned():
    step = train_step(small, optimizer=Optimizer("sgd"), prune=True)
    exe = compile_graph(step, backend="reference", seed=2)
    masks = []
    for s, feeds in ((0.3, 20), (0.6, 20), (0.8, 1)):
        exe.set_state(prune_state(exe.state, step, s, "global"))
        masks.append({k: exe.state[k].copy() for k in exe.state if k.endswith(".mask")})
        total, _ = sparsity_report(exe.state, ["conv.weight", "fc1.weight", "fc2.weight"])
        assert abs(total - s) * sum(m.size for m in masks[-1].values()) <= 0.5
        for feed in batches(feeds, seed=len(masks)):
            exe(**feed)
    for old, new in zip(masks, masks[1:]):
        assert all(np.all(new[k][old[k] == 0] == 0) for k in old)


def test_masked_adam_step_equals_numpy():
    opt = Optimizer("adam", lr=0.01, weight_decay=0.1)
    step = train_step(small, optimizer=opt, prune=True)
    exe = compile_graph(step, backend="reference", seed=3)
    exe.set_state(prune_state(exe.state, step, 0.6, "layer"))
    s0 = {k: v.copy() for k, v in exe.state.items()}
    # the gradients at the pruned weights, from autodiff alone
    grads_g = autodiff(add_loss(small.trace(B, training=True)))
    grads = compile_graph(grads_g, backend="reference", params={a.name: s0[a.name] for a in grads_g.args
                                                                if a.kind != "input"})
    feed = next(batches(1))
    g = grads(**{k: v for k, v in feed.items() if k != "lr"})
    exe(**feed)
    lr, b1, b2 = float(feed["lr"]), opt.beta1, opt.beta2     # the step takes lr as an input
    for w in ("conv.weight", "fc1.weight", "fc2.weight"):
        m = s0[w + ".mask"]
        grad = (g["grad." + w] + 0.1 * s0[w]).astype(np.float64) * m
        m1, v1 = (1 - b1) * grad, (1 - b2) * grad ** 2
        p1 = (s0[w] - lr * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + opt.eps)) * m
        np.testing.assert_allclose(exe.state[w], p1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(exe.state[w + ".m"], m1, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(exe.state[w + ".v"], v1, rtol=1e-5, atol=1e-9)
        assert np.all(exe.state[w][m == 0] == 0)


def test_llvm_step_keeps_pruned_weights_zero():
    step = train_step(small, optimizer=Optimizer("momentum", lr=0.05), prune=True)
    exe = compile_graph(step, backend="llvm", seed=4)
    exe.set_state(prune_state(exe.state, step, 0.9, "global"))
    masks = {k[:-5]: exe.state[k].copy() for k in exe.state if k.endswith(".mask")}
    for feed in batches(20):
        exe(**feed)
    for w, m in masks.items():
        assert np.all(exe.state[w][m == 0] == 0) and np.any(exe.state[w][m == 1] != 0)


# ---- the trainer and the command line ---------------------------------------------------------



@pytest.mark.parametrize("args, text", [
    (["--prune", "1"], "--prune sparsity must be in [0, 1), got 1"),
    (["--prune", "-0.1"], "--prune sparsity must be in [0, 1), got -0.1"),
    (["--prune", "0.5", "--prune-schedule", "iterative:0"], "--prune-schedule must be"),
    (["--prune", "0.5", "--prune-schedule", "cubic"], "--prune-schedule must be oneshot"),
    (["--prune", "0.5", "--prune-schedule", "iterative:x"], "--prune-schedule must be"),
    (["--prune-scope", "global"], "--prune-scope and --prune-schedule go with --prune S"),
    (["--prune", "0.5", "--prune-schedule", "iterative:3", "--epochs", "3"], "train for more than 3 epochs"),
])
def test_bad_prune_options_are_one_line_errors(capsys, args, text):
    one_error(*cli(capsys, "train", DIGITS, "--backend", "reference", "--no-progress", *args)[::2], text)


def test_dump_shows_the_masks(capsys):
    code, out, _ = cli(capsys, "dump", DIGITS, "--train", "--prune", "0.9", "--after", "prune")
    assert code == 0 and "%fc1.weight.mask: f32[64,512] state" in out
    assert "mul(" in out and ", %fc1.weight.mask)" in out and "%fc1.bias.mask" not in out
    one_error(*cli(capsys, "dump", DIGITS, "--prune", "0.9")[::2], "add --train")
    one_error(*cli(capsys, "compile", DIGITS, "--train", "--prune", "0.9", "-o", "unused")[::2],
              "prune with tdc train")


def test_pruned_digits_cnn_still_learns(tmp_path, capsys):
    weights, ck = tmp_path / "w.npz", tmp_path / "ck"
    code, out, err = cli(capsys, "train", DIGITS, "--backend", "reference", "--epochs", "4", "--no-progress",
                         "--prune", "0.9", "--prune-schedule", "iterative:2", "--save-weights", weights,
                         "--checkpoint", ck)
    assert code == 0, err
    assert "pruned to 0.9000 (layer) before epoch 3: sparsity 0.9000" in out
    final = out.strip().splitlines()[-1]
    assert "pruned weights sparsity 0.9000" in final
    acc = float(final.split("test accuracy ")[1].split()[0])
    assert acc > 0.7, out          # chance is 0.1
    saved = load_npz(str(weights))
    for w in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"):
        assert abs(np.mean(saved[w] == 0) - 0.9) * saved[w].size <= 0.5
    assert np.mean(saved["fc1.bias"] == 0) < 0.5     # biases are not pruned
    state = load_checkpoint(str(ck)).state
    assert np.array_equal(state["fc1.weight.mask"] == 0, saved["fc1.weight"] == 0)


def test_resume_within_the_schedule_reproduces_losses(tmp_path):
    d = load_digits()
    data = Dataset("digits", d.x_train[:320], d.y_train[:320], d.x_test[:100], d.y_test[:100], 10)
    digits = Source(DIGITS).model
    kw = dict(epochs=3, batch=32, prune=Prune(0.8, "global", "iterative:2"), progress=False, verbose=False)
    full = train(digits, data, backend="reference", **kw)
    ck = str(tmp_path / "ck")
    part = train(digits, data, backend="reference", checkpoint=ck, max_steps=15, **kw)
    rest = train(digits, data, backend="reference", checkpoint=ck, resume=True, **kw)
    assert np.array_equal(np.concatenate([part.losses, rest.losses]), full.losses)
    assert rest.sparsity == full.sparsity and abs(full.sparsity - 0.8) < 1e-3
    with pytest.raises(TdcError, match="prune"):
        train(digits, data, backend="reference", checkpoint=ck, resume=True,
              **dict(kw, prune=Prune(0.5, "global", "iterative:2")))
    assert "fc1.weight.mask" in print_graph(train_step(digits, prune=True))
