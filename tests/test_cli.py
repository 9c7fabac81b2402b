"""The tdc command: dump, run, ops; one-line errors with a non-zero exit, tracebacks with --debug."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tdc.cli import main
from tdc.ir.parser import parse_graph

ROOT = os.path.join(os.path.dirname(__file__), "..")
EX = os.path.join(ROOT, "examples")


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "tdc 0.1.0" in capsys.readouterr().out
    code, out, _ = run_cli(capsys)
    assert code == 2 and "dump" in out and "train" in out


def test_dump_prints_parseable_ir_and_dot(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "dump", f"{EX}/lenet.py")
    assert code == 0 and out.startswith("graph lenet(") and "conv2d(" in out
    g = parse_graph(out)
    assert g.output("out").type.shape == (64, 10)
    code, out, _ = run_cli(capsys, "dump", f"{EX}/lenet.py", "--batch", "3", "--format", "dot")
    assert code == 0 and out.startswith('digraph "lenet"') and out.rstrip().endswith("}")
    assert "f32[3,6,28,28]" in out
    # a saved .tdc file is parsed, verified and printed again
    path = tmp_path / "m.tdc"
    run_cli(capsys, "dump", f"{EX}/mlp.py", "-o", str(path))
    code, out, _ = run_cli(capsys, "dump", str(path))
    assert code == 0 and out == path.read_text()


def test_dump_after_training_passes(capsys):
    code, out, _ = run_cli(capsys, "dump", f"{EX}/mlp.py", "--batch", "4", "--after", "autodiff")
    assert code == 0 and "grad.fc1.weight=" in out and "softmax_cross_entropy" in out
    code, out, _ = run_cli(capsys, "dump", f"{EX}/mlp.py", "--batch", "4", "--after", "optimizer",
                           "--optimizer", "momentum")
    assert code == 0 and "%fc1.weight <- " in out and "fc1.weight.velocity" in out
    code, out, _ = run_cli(capsys, "dump", f"{EX}/mlp.py", "--batch", "4", "--train", "--after", "fuse")
    assert code == 0 and "kernel k0 {" in out
    code, out, _ = run_cli(capsys, "dump", f"{EX}/mlp.py", "--batch", "4", "--all")
    assert code == 0 and "// ----- after cse -----" in out
    code, out, _ = run_cli(capsys, "dump", f"{EX}/lenet.py", "--train", "--memory")
    assert code == 0 and "conv1" in out and "peak after planning" in out
    code, out, _ = run_cli(capsys, "dump", f"{EX}/mlp.py", "--batch", "2", "--train", "--source")
    assert code == 0 and "@njit" in out and "def drive0(b):" in out and "K.softmax_cross_entropy(" in out


def test_run_with_random_inputs_saves_and_reloads(capsys, tmp_path):
    d = tmp_path / "in"
    code, out, _ = run_cli(capsys, "run", f"{EX}/mlp.py", "--batch", "2", "--random-inputs", "--seed", "3",
                           "--save-inputs", str(d), "--output", str(tmp_path / "y.npy"), "--backend", "reference")
    assert code == 0 and out.startswith("out: f32[2,10]")
    y = np.load(tmp_path / "y.npy")
    x = np.load(d / "x.npy")
    assert x.shape == (2, 784) and x.dtype == np.float32
    code, out2, _ = run_cli(capsys, "run", f"{EX}/mlp.py", "--batch", "2", "--input", f"x={d}/x.npy",
                            "--seed", "3", "--output", f"out={tmp_path}/y2.npy", "--backend", "reference")
    assert code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y2.npy"), y)


def test_run_with_weights(capsys, tmp_path):
    from tdc.ir.weights import save_weights
    import tdc
    sys.path.insert(0, EX)
    import mlp
    g = mlp.mlp.trace(batch=2)
    w = {a.name: np.full(a.type.shape, 0.01, np.float32) for a in g.params}
    save_weights(str(tmp_path / "w.npz"), w)
    np.save(tmp_path / "x.npy", np.ones((2, 784), np.float32))
    code, out, _ = run_cli(capsys, "run", f"{EX}/mlp.py", "--batch", "2", "--input", f"x={tmp_path}/x.npy",
                           "--weights", str(tmp_path / "w.npz"), "--output", str(tmp_path / "y.npy"),
                           "--backend", "reference")
    assert code == 0
    expected = tdc.compile(g, params=w)(x=np.ones((2, 784), np.float32))["out"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["dump", "nope.py"], "nope.py: no such file"),
    (["dump", f"{EX}/lenet.py:resnet"], "has no model 'resnet'; it defines: lenet"),
    (["dump", f"{EX}/README"], "expected a Python model file"),
    (["dump", f"{EX}/lenet.py", "--after", "magic"], "unknown pass 'magic'"),
    (["run", f"{EX}/mlp.py"], "missing input x; mlp takes x: f32[128,784]"),
    (["run", f"{EX}/mlp.py", "--input", "x"], "expected NAME=FILE.npy"),
    (["run", f"{EX}/mlp.py", "--weights", "missing.npz", "--random-inputs"], "missing.npz: no such file"),
    (["dump", f"{EX}/mlp.py", "--batch", "0"], "batch size must be a positive integer"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code != 0 and message in err, err
    assert err.count("\n") == 1 and err.startswith("tdc: error: ")


def test_malformed_npy_and_wrong_shape(capsys, tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    code, _, err = run_cli(capsys, "run", f"{EX}/mlp.py", "--input", f"x={bad}")
    assert code == 1 and "not a valid .npy file" in err
    np.save(tmp_path / "x.npy", np.zeros((3, 785), np.float32))
    code, _, err = run_cli(capsys, "run", f"{EX}/mlp.py", "--batch", "2", "--input", f"x={tmp_path}/x.npy")
    assert code == 1 and "input x: expected f32[2,784], got [3, 785]" in err
    np.save(tmp_path / "x.npy", np.zeros((2, 784), np.complex64))
    code, _, err = run_cli(capsys, "run", f"{EX}/mlp.py", "--batch", "2", "--input", f"x={tmp_path}/x.npy")
    assert code == 1 and "input x: expected f32[2,784], got complex64" in err


def test_malformed_ir_file_gives_line_and_column(capsys, tmp_path):
    p = tmp_path / "m.tdc"
    p.write_text("graph g(%x: f32[2] input) {\n  %0 = rleu(%x) : f32[2]\n  return out=%0 : f32[2]\n}\n")
    code, _, err = run_cli(capsys, "dump", str(p))
    assert code == 1 and f"{p}:2:8: unknown op 'rleu'" in err


def test_debug_shows_the_traceback():
    r = subprocess.run([sys.executable, "-m", "tdc.cli", "--debug", "dump", "nope.py"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode != 0 and "Traceback" in r.stderr and "TdcError" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tdc.cli", "dump", "nope.py"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_ops_lists_the_registry(capsys):
    code, out, _ = run_cli(capsys, "ops")
    assert code == 0 and "conv2d(" in out and "allreduce(" in out and "softmax_cross_entropy" in out
