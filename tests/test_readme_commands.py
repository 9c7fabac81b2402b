"""Every command in the README's ```sh blocks, run exactly as written (but `make demo` and
`make test`), in order, in a scratch directory holding what the commands read: the examples,
`~/mnist` and `~/cifar-10-batches-bin` (small stand-ins in MNIST's and CIFAR-10's formats, made
from scikit-learn's digits, under a HOME of the test's own), and the files the text names
(saved.tdc, trained.npz, img.npy, X.npy, Y.npy, X8.npy, Y8.npy, mine.npz, model.onnx)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tdc.frontend.init import init_params
from tdc.runtime.data import load_digits, write_idx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Commands the README shows failing on purpose, and what they say.
EXPECTED_ERRORS = {"tdc run examples/lenet.py": "missing input x; lenet takes x: f32[64,1,28,28]"}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if line.strip() and not line.startswith((" ", "#", "make ")):
                commands.append(line)
    return commands


def _images_28(x8: np.ndarray) -> np.ndarray:     # [N, 8, 8] in [0, 1] -> [N, 28, 28]
    return np.pad(np.kron(x8, np.ones((3, 3), np.float32)), ((0, 0), (2, 2), (2, 2)))


def _setup(work: Path, home: Path) -> None:
    (work / "examples").symlink_to(ROOT / "examples")
    d = load_digits(0)
    mnist = home / "mnist"
    mnist.mkdir(parents=True)
    for split, x, y in (("train", d.x_train[:256, 0], d.y_train[:256]), ("t10k", d.x_test[:64, 0], d.y_test[:64])):
        write_idx(str(mnist / f"{split}-images-idx3-ubyte"), np.clip(_images_28(x) * 255, 0, 255).astype(np.uint8))
        write_idx(str(mnist / f"{split}-labels-idx1-ubyte"), y.astype(np.uint8))
    cifar = home / "cifar-10-batches-bin"
    cifar.mkdir()
    for name, lo, hi in (("data_batch_1.bin", 0, 64), ("test_batch.bin", 64, 96)):
        pix = np.tile(np.kron(d.x_train[lo:hi, 0], np.ones((4, 4), np.float32)), (1, 3, 1))   # 3 planes of 32x32
        rec = np.concatenate([d.y_train[lo:hi, None].astype(np.uint8),
                              np.clip(pix * 255, 0, 255).astype(np.uint8).reshape(hi - lo, -1)], axis=1)
        rec.tofile(cifar / name)
    sys.path.insert(0, str(ROOT / "examples"))
    import lenet
    import mlp
    np.savez(work / "trained.npz", **init_params(mlp.mlp.trace(batch=1), seed=3))
    rng = np.random.default_rng(0)
    np.save(work / "img.npy", rng.random((1, 1, 28, 28), np.float32))
    np.save(work / "X.npy", rng.random((64, 784), np.float32))
    np.save(work / "Y.npy", rng.integers(0, 10, 64))
    np.save(work / "X8.npy", d.x_train[:320])            # the digits CNN's 8x8 images
    np.save(work / "Y8.npy", d.y_train[:320])
    x28 = _images_28(d.x_train[:, 0]).reshape(-1, 784)
    np.savez(work / "mine.npz", images=x28, labels=d.y_train, x_test=_images_28(d.x_test[:, 0]).reshape(-1, 784),
             y_test=d.y_test)
    import tdc.onnx
    tdc.onnx.save(mlp.mlp.trace(batch=1), str(work / "model.onnx"))
    del lenet
    from tdc.cli import main
    assert main(["dump", str(ROOT / "examples" / "mlp.py"), "--full-constants", "-o", str(work / "saved.tdc")]) == 0


def test_every_readme_command_works_as_written(tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    _setup(work, home)
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "TDC_CACHE_DIR": os.environ.get("TDC_CACHE_DIR", str(Path.home() / ".cache" / "tdc"))}
    commands = readme_commands()
    assert len(commands) >= 30
    for cmd in commands:
        p = subprocess.run(cmd, shell=True, executable="/bin/bash", cwd=work, env=env, capture_output=True,
                           text=True, timeout=600)
        bare = cmd.split("#")[0].strip()
        if bare in EXPECTED_ERRORS:
            assert p.returncode == 1 and EXPECTED_ERRORS[bare] in p.stderr, (cmd, p.stderr)
            continue
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}"
