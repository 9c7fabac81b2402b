"""int8 from the command line and quantization-aware training: tdc run/compile/dump --quantize
int8 against the Python API and the JIT, each refusal's one-line message, the fake-quant
training step's straight-through gradient and running ranges checked against numpy, and LeNet-5
trained with --qat on the digits at 28x28, whose int8 accuracy is compared with post-training
quantization of the same model trained in float."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tdc
from tdc.ir.weights import load_npz
from tdc.passes.quantize import learned_ranges, quantize_int8
from tdc.runtime.data import fit_to_model, load_data, write_digits_as_mnist
from tdc.runtime.quantize import DEFAULT_CALIBRATION_SAMPLES, quantize_model

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from helpers import cli, one_error  # noqa: E402

LENET = os.path.join(HERE, "..", "examples", "lenet.py")
TRAIN = ["--epochs", "3", "--optimizer", "momentum", "--lr", "0.05", "--backend", "llvm", "--no-progress"]
QAT_BOUND = 0.03     # QAT int8 accuracy may trail PTQ's by at most this (359 test digits: ~11 of them)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The digits as MNIST IDX files, LeNet-5 trained in float and with --qat (same seed and
    schedule), and both models' int8 test accuracies."""
    from tdc.cli import main
    d = tmp_path_factory.mktemp("qat")
    data = write_digits_as_mnist(str(d / "mnist"))
    for name, extra in (("float", []), ("qat", ["--qat"])):
        assert main(["train", LENET, "--data", data, *TRAIN, *extra, "--save-weights", str(d / f"{name}.npz")]) == 0
    from lenet import lenet
    ds = load_data(data)
    g = lenet.trace()
    x_test = fit_to_model(ds.x_test, g.inputs[0].type, "test")
    fw, qw = load_npz(str(d / "float.npz")), load_npz(str(d / "qat.npz"))
    calib = fit_to_model(ds.x_train[:DEFAULT_CALIBRATION_SAMPLES], g.inputs[0].type, "calibration")
    models = {"float": (g, fw), "ptq": quantize_model(g, fw, calib),
              "qat": quantize_int8(g, qw, learned_ranges(g, qw))}
    acc = {k: _accuracy(tdc.compile(mg, backend="llvm", params=mp), x_test, ds.y_test) for k, (mg, mp) in models.items()}
    print(f"\nLeNet-5 on the digits at 28x28, 3 epochs: accuracy {acc}")
    return {"dir": d, "data": data, "graph": g, "models": models, "acc": acc, "x": x_test[:64]}


def _accuracy(exe, x, y):
    from tdc.runtime.trainer import evaluate
    return evaluate(exe, "x", "out", x, y, 64)[0] / len(y)


@pytest.mark.parametrize("which", ["ptq", "qat"])
def test_cli_run_equals_the_python_api(trained, which, capsys):
    d = trained["dir"]
    np.save(d / "x.npy", trained["x"])
    extra = ["--weights", d / "float.npz", "--calibrate", trained["data"]] if which == "ptq" else \
        ["--weights", d / "qat.npz"]
    code, out, err = cli(capsys, "run", LENET, "--quantize", "int8", *extra, "--input", f"x={d / 'x.npy'}",
                         "--output", d / f"y_{which}.npy")
    assert code == 0, err
    assert ("calibrated on 256 samples" if which == "ptq" else "learned by quantization-aware training") in out
    qg, qp = trained["models"][which]
    want = tdc.compile(qg, backend="llvm", params=qp)(x=trained["x"])["out"]
    np.testing.assert_array_equal(np.load(d / f"y_{which}.npy"), want)


def test_cli_compile_bundle_equals_the_jit(trained, capsys):
    d = trained["dir"]
    code, out, err = cli(capsys, "compile", LENET, "--weights", d / "float.npz", "--quantize", "int8",
                         "--calibrate", trained["data"], "-o", d / "bundle")
    assert code == 0 and "int8 inference" in out, err
    np.save(d / "xb.npy", trained["x"])
    r = subprocess.run([str(d / "bundle" / "model"), "--input", f"x={d / 'xb.npy'}", "--output", f"out={d / 'yb.npy'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    qg, qp = trained["models"]["ptq"]
    np.testing.assert_array_equal(np.load(d / "yb.npy"), tdc.compile(qg, backend="llvm", params=qp)(x=trained["x"])["out"])


def test_cli_dump_shows_the_int8_graph(trained, capsys):
    code, out, err = cli(capsys, "dump", LENET, "--weights", trained["dir"] / "float.npz", "--quantize", "int8",
                         "--calibrate", trained["data"], "--calibrate-samples", "64")
    assert code == 0, err
    assert "calibrated on 64 samples" in out and out.count("qconv2d(") == 2 and out.count("qlinear(") == 3


def test_refusals_are_one_line(trained, capsys, tmp_path):
    d, data = trained["dir"], trained["data"]
    w = ["--weights", d / "float.npz"]
    plain = tmp_path / "plain.py"
    plain.write_text("import tdc\n\n\n@tdc.model(batch=4)\ndef plain(x: tdc.f32['B', 8]):\n    return x.relu()\n")
    cases = [
        (["run", LENET, "--random-inputs", "--quantize", "int8", "--calibrate", data], "needs the trained weights"),
        (["run", LENET, "--random-inputs", *w, "--quantize", "int8"], "give --calibrate DATA"),
        (["run", LENET, "--random-inputs", *w, "--quantize", "int4"], "--quantize must be int8, not 'int4'"),
        (["run", LENET, "--random-inputs", *w, "--quantize", "kmeans:16"], "weight sharing is tdc compress's"),
        (["compile", LENET, *w, "--quantize", "kmeans:16", "-o", tmp_path / "k"], "weight sharing is tdc compress's"),
        (["run", LENET, "--random-inputs", *w, "--quantize", "int8", "--calibrate", data, "--sparse", "on"],
         "--sparse on exclude each other"),
        (["run", LENET, "--random-inputs", *w, "--calibrate", data], "go with --quantize int8"),
        (["compile", LENET, "--train", *w, "--quantize", "int8", "--calibrate", data, "-o", tmp_path / "t"],
         "tdc train --qat"),
        (["dump", LENET, "--train", *w, "--quantize", "int8", "--calibrate", data], "tdc train --qat"),
        (["compile", LENET, "--ranks", "2", "--parallel", "model", *w, "--quantize", "int8", "--calibrate", data,
          "-o", tmp_path / "p"], "not partitioned graphs"),
        (["run", plain, "--random-inputs", "--weights", tmp_path / "none.npz", "--quantize", "int8",
          "--calibrate", data], "no linear or conv2d layer"),
        (["run", LENET, "--random-inputs", *w, "--quantize", "int8", "--calibrate", data,
          "--calibrate-samples", "0"], "--calibrate-samples must be >= 1"),
    ]
    np.savez(tmp_path / "none.npz")
    for args, text in cases:
        code, _, err = cli(capsys, *args)
        one_error(code, err, text)


def test_fake_quant_step_is_straight_through_with_running_ranges():
    """One linear layer trained with QAT and plain SGD: the update is the float gradient taken at
    the fake-quantized input and weights (numpy, independently), the input's range is the first
    batch's and then moves 1% towards each batch's."""
    from tdc import nn
    from tdc.passes.training import train_step

    @tdc.model(batch=8)
    def one(x: tdc.f32["B", 6]):
        return nn.linear(x, 4, name="fc")

    lr = 0.1
    step = train_step(one.trace(training=True), loss="mse", optimizer=tdc.Optimizer("sgd", lr=lr), qat=True)
    assert step.op_counts()["fake_quant"] == 2 and step.op_counts()["fake_quant_grad"] == 1   # w's STE; x has none
    exe = tdc.compile(step, backend="llvm", seed=1)
    rng = np.random.default_rng(0)
    rng_state = None    # the running range numpy expects
    for k in range(2):
        x = rng.uniform(-1 - k, 2 + k, (8, 6)).astype(np.float32)
        t = rng.standard_normal((8, 4)).astype(np.float32)
        w, b = exe.state["fc.weight"].copy(), exe.state["fc.bias"].copy()
        batch = np.float64([x.min(), x.max()])
        rng_state = batch if rng_state is None else 0.99 * rng_state + 0.01 * batch
        lo, hi = min(rng_state[0], 0), max(rng_state[1], 0)
        s = (hi - lo) / 255
        z = -128 - np.rint(lo / s)
        xq = (np.clip(np.rint(x / s) + z, -128, 127) - z) * s
        ws = np.abs(w).max(1, keepdims=True) / 127
        wq = np.rint(w / ws) * ws
        dy = 2 * (xq @ wq.T + b - t) / t.size
        exe(x=x, y=t, lr=np.float32(lr))
        np.testing.assert_allclose(exe.state["fc.in_range"], rng_state, rtol=1e-6)
        np.testing.assert_allclose(exe.state["fc.weight"], w - lr * dy.T @ xq, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(exe.state["fc.bias"], b - lr * dy.sum(0), rtol=1e-4, atol=1e-6)
        if k == 1:     # the second batch reaches past the running range: those inputs were clamped
            assert (x < rng_state[0]).any() or (x > rng_state[1]).any()


def test_qat_int8_accuracy_at_least_ptq_minus_bound(trained):
    acc = trained["acc"]
    assert acc["float"] > 0.85 and acc["ptq"] > 0.85
    assert acc["qat"] >= acc["ptq"] - QAT_BOUND, acc


def test_train_qat_saves_the_ranges_and_reports_int8_accuracy(trained, capsys):
    w = load_npz(str(trained["dir"] / "qat.npz"))
    for name in ("conv1.in_range", "conv1.out_range", "conv2.out_range", "fc1.out_range", "fc2.out_range"):
        assert w[name].shape == (2,) and w[name][0] <= 0 <= w[name][1] and w[name][1] > w[name][0]
    code, out, err = cli(capsys, "train", LENET, "--data", trained["data"], "--qat", "--max-steps", "2", *TRAIN)
    assert code == 0 and "int8 test accuracy" in out, err
