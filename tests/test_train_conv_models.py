"""LeNet-5 and the VGG-style network train on real images with the conv_algo selector on, and the
algorithms it chose show in the dump. No MNIST or CIFAR file is needed: scikit-learn's 8x8 digits
are scaled up and written as IDX files (the MNIST format), at 28x28 for LeNet and 3x32x32 for VGG
(stored as 96x32 images, which the trainer reshapes to the model's input)."""
import json
import os

import numpy as np

from tdc.cli import main
from tdc.runtime.data import load_digits, write_idx

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _idx_dir(tmp, images, n_train, n_test):
    d = load_digits(0)
    xs = {"train": d.x_train[:n_train, 0], "t10k": d.x_test[:n_test, 0]}
    ys = {"train": d.y_train[:n_train], "t10k": d.y_test[:n_test]}
    for split in ("train", "t10k"):
        pix = np.clip(images(xs[split]) * 255, 0, 255).astype(np.uint8)
        write_idx(os.path.join(tmp, f"{split}-images-idx3-ubyte"), pix)
        write_idx(os.path.join(tmp, f"{split}-labels-idx1-ubyte"), ys[split].astype(np.uint8))
    return tmp


def _to_lenet(x):     # [N, 8, 8] -> [N, 28, 28]: each pixel 3x3, then a 2-pixel border
    return np.pad(np.kron(x, np.ones((3, 3), np.float32)), ((0, 0), (2, 2), (2, 2)))


def _to_vgg(x):       # [N, 8, 8] -> [N, 3*32, 32]: each pixel 4x4, the same image in 3 channels
    return np.tile(np.kron(x, np.ones((4, 4), np.float32)), (1, 3, 1))


def _train(capsys, tmp_path, model, data, *extra):
    metrics = tmp_path / "m.jsonl"
    rc = main(["train", os.path.join(ROOT, "examples", f"{model}.py"), "--data", f"mnist:{data}", "--backend", "llvm",
               "--no-progress", "--metrics", str(metrics), *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in rows if "test_accuracy" in r]


def _dump_algos(capsys, model, batch):
    assert main(["dump", os.path.join(ROOT, "examples", f"{model}.py"), "--batch", str(batch), "--train",
                 "--after", "conv_algo"]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if "conv2d" in ln and " = " in ln]
    assert lines and all('algo="auto"' not in ln and "algo=" in ln for ln in lines), lines
    return lines


def test_lenet_trains_with_the_selector_on(tmp_path, capsys):
    data = _idx_dir(str(tmp_path), _to_lenet, 1000, 300)
    epochs = _train(capsys, tmp_path, "lenet", data, "--epochs", "3", "--batch", "32", "--lr", "2e-3")
    assert epochs[-1]["test_accuracy"] >= 0.85, epochs
    lines = _dump_algos(capsys, "lenet", 32)
    assert len(lines) == 5      # conv1 forward and weight gradient; conv2 forward, input and weight gradients


def test_vgg_trains_with_the_selector_on(tmp_path, capsys):
    data = _idx_dir(str(tmp_path), _to_vgg, 256, 64)
    epochs = _train(capsys, tmp_path, "vgg", data, "--epochs", "2", "--batch", "16", "--lr", "1e-3")
    assert epochs[-1]["loss"] < epochs[0]["loss"] and epochs[-1]["test_accuracy"] > 0.3, epochs
    lines = _dump_algos(capsys, "vgg", 16)
    # which algorithm wins depends on this machine (the cost model is calibrated on it): every
    # one is one the layer can use, and all are 3x3 stride-1 layers, so Winograd is legal on all
    algos = {ln.split('algo="')[1].split('"')[0] for ln in lines}
    assert algos <= {"direct", "im2col", "fft", "winograd_f2", "winograd_f4"}, lines
