"""What a new user hits (issue 18), one test per item: errors before the work, errors that name
the user's own file and line, training on one's own data, whole files through `tdc run` and the
native executable, divergence, strict inputs, the cache, and a normal (non-editable) install."""
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import tdc
from tdc import nn
from tdc.cli import main
from tdc.errors import TdcError
from tdc.ir.graph import Graph
from tdc.ir.parser import parse_graph
from tdc.ir.printer import print_graph
from tdc.ir.types import TensorType
from tdc.runtime.data import load_data, load_digits

from helpers import cli, one_error

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EX = os.path.join(ROOT, "examples")




# ---- 0. a normal install ---------------------------------------------------------------------------

def test_a_wheel_install_builds_and_runs_a_native_executable(tmp_path):
    """`pip install .` (not -e) ships the C runtime: a wheel holds runtime/*.c and *.h, and tdc
    installed from it (ahead of this checkout on the path) compiles and runs an executable."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "-q", "-w", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    (wheel,) = (tmp_path / "w").glob("tdc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("main.c", "linalg.c", "conv_im2col.c", "comm.c", "internal.h", "tdc_runtime.h", "tdc_comm.h"):
        assert f"tdc/backends/llvm/runtime/{f}" in names, f
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    script = ("import sys, numpy as np, subprocess, tdc\n"
              "assert tdc.__file__.startswith(sys.argv[1]), tdc.__file__\n"
              "from tdc.cli import main\n"
              f"assert main(['compile', {EX + '/mlp.py'!r}, '--batch', '1', '-o', sys.argv[2]]) == 0\n"
              "np.save(sys.argv[2] + '/x.npy', np.ones((1, 784), np.float32))\n"
              "r = subprocess.run([sys.argv[2] + '/model', '--input', 'x=' + sys.argv[2] + '/x.npy'],\n"
              "                   capture_output=True, text=True)\n"
              "assert r.returncode == 0 and 'out: f32[1,10]' in r.stdout, r.stdout + r.stderr\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "TDC_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "site"), str(tmp_path / "b")], capture_output=True,
                       text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr


# ---- 1. outputs checked before the work --------------------------------------------------------------

def test_an_unwritable_output_is_refused_before_any_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    t0 = time.time()
    code, out, err = cli(capsys, "train", f"{EX}/digits.py", "--epochs", "50", "--save-weights", blocker / "w.npz")
    one_error(code, err, "--save-weights")
    assert "epoch" not in out and time.time() - t0 < 20
    code, out, err = cli(capsys, "train", f"{EX}/digits.py", "--epochs", "50", "--checkpoint", blocker)
    one_error(code, err, "--checkpoint")
    code, out, err = cli(capsys, "train", f"{EX}/digits.py", "--metrics", blocker / "m.jsonl")
    one_error(code, err, "--metrics")
    code, out, err = cli(capsys, "run", f"{EX}/mlp.py", "--random-inputs", "--output", blocker / "y.npy")
    one_error(code, err, "--output")
    assert "out:" not in out          # the model did not run
    code, out, err = cli(capsys, "dump", f"{EX}/mlp.py", "-o", tmp_path)
    assert code != 0 and "is a directory" in err


# ---- 2. README commands work as written: see test_readme_commands.py ------------------------------------
# ---- 3. --batch on an ONNX file with a fixed batch ------------------------------------------------------

def test_batch_on_an_onnx_file_that_fixes_it_is_refused(capsys, tmp_path):
    import tdc.onnx
    g = tdc.Graph("fixed")
    x = g.add_arg("x", TensorType("f32", (2, 3)), "input")
    g.add_output("y", g.emit("relu", [x])[0])
    tdc.onnx.save(g, str(tmp_path / "m.onnx"))
    code, _, err = cli(capsys, "run", tmp_path / "m.onnx", "--random-inputs", "--batch", "4")
    one_error(code, err, "fixed batch of 2 in the file: --batch 4 cannot change it")
    assert cli(capsys, "run", tmp_path / "m.onnx", "--random-inputs", "--batch", "2")[0] == 0


# ---- 4. errors in the user's own model file ------------------------------------------------------------

def test_errors_in_the_model_file_name_it_and_debug_goes_after_the_command(capsys, tmp_path):
    (tmp_path / "div.py").write_text('import tdc\n@tdc.model(batch=2)\ndef m(x: tdc.f32["B", 4]):\n'
                                     '    k = 1 / 0\n    return x\n')
    (tmp_path / "imp.py").write_text("import tdc\nimport no_such_module_here\n")
    code, _, err = cli(capsys, "dump", tmp_path / "div.py")
    one_error(code, err, "div.py:4: ZeroDivisionError: division by zero")
    assert "the model's code" in err
    code, _, err = cli(capsys, "dump", tmp_path / "imp.py")
    one_error(code, err, "imp.py:2: ModuleNotFoundError")
    with pytest.raises(TdcError, match="ZeroDivisionError"):      # --debug after the command: the traceback
        main(["dump", str(tmp_path / "div.py"), "--debug"])


# ---- 5. divergence -----------------------------------------------------------------------------------------

def test_a_diverging_run_stops_naming_the_step_with_valid_metrics_and_a_finite_checkpoint(capsys, tmp_path):
    code, out, err = cli(capsys, "train", f"{EX}/digits.py", "--lr", "1e30", "--epochs", "3", "--no-progress",
                         "--metrics", tmp_path / "m.jsonl", "--checkpoint", tmp_path / "ck", "--checkpoint-every", "1",
                         "--save-weights", tmp_path / "w.npz")
    one_error(code, err, "training diverged")
    step = int(err.split(" at step ")[1].split()[0])
    assert step <= 3
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]   # valid JSON
    assert rows[-1]["loss"] is None and rows[-1]["step"] == step
    assert not (tmp_path / "w.npz").exists()
    if (tmp_path / "ck" / "last.npz").exists():
        with np.load(tmp_path / "ck" / "last.npz") as z:
            assert all(np.isfinite(z[k]).all() for k in z.files if z[k].dtype.kind == "f")


# ---- 6. tracing mistakes carry the user's line ---------------------------------------------------------------

def test_tracing_mistakes_name_the_source_line():
    @tdc.model(batch=2)
    def branchy(x: tdc.f32["B", 4]):
        if x:   # the mistake under test
            return x
        return x
    with pytest.raises(TdcError, match=r"test_user_experience.py:\d+: a traced tensor has no truth value"):
        branchy.trace()

    @tdc.model(batch=2)
    def twice(x: tdc.f32["B", 4]):
        return nn.linear(nn.linear(x, 4, name="fc"), 2, name="fc")
    with pytest.raises(TdcError, match=r"test_user_experience.py:\d+: layer name 'fc' is used twice"):
        twice.trace()


# ---- 7. one's own data ---------------------------------------------------------------------------------------------

def _digits_arrays():
    d = load_digits(0)
    return {"x_train": d.x_train, "y_train": d.y_train, "x_test": d.x_test, "y_test": d.y_test}


def test_own_data_from_npz_npy_and_cifar10_files(capsys, tmp_path):
    arrays = _digits_arrays()
    np.savez(tmp_path / "d.npz", pics=arrays["x_train"], labels=arrays["y_train"], x_test=arrays["x_test"],
             y_test=arrays["y_test"])
    ds = load_data(f"npz:{tmp_path / 'd.npz'}:x_train=pics,y_train=labels")
    assert ds.x_train.shape == (1438, 1, 8, 8) and ds.num_classes == 10
    (tmp_path / "npy").mkdir()
    for k, v in arrays.items():
        np.save(tmp_path / "npy" / f"{k}.npy", v)
    ds = load_data(f"npy:{tmp_path / 'npy'}")
    assert isinstance(ds.x_train, np.memmap) and np.array_equal(ds.y_test, arrays["y_test"])   # not copied
    rng = np.random.default_rng(0)
    (tmp_path / "cifar").mkdir()
    pixels = {}
    for name, n in (("data_batch_1.bin", 30), ("data_batch_2.bin", 20), ("test_batch.bin", 10)):
        rec = np.zeros((n, 3073), np.uint8)
        rec[:, 0] = rng.integers(0, 10, n)
        rec[:, 1:] = rng.integers(0, 256, (n, 3072))
        rec.tofile(tmp_path / "cifar" / name)
        pixels[name] = rec
    ds = load_data(f"cifar10:{tmp_path / 'cifar'}")
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    np.testing.assert_allclose(ds.x_test[3, 2, 31, 31], pixels["test_batch.bin"][3, -1] / 255.0)
    assert np.array_equal(ds.y_train[30:], pixels["data_batch_2.bin"][:, 0])
    (tmp_path / "cifar" / "test_batch.bin").write_bytes(b"\0" * 100)
    with pytest.raises(TdcError, match="not a whole number of CIFAR-10 records"):
        load_data(f"cifar10:{tmp_path / 'cifar'}")
    code, out, err = cli(capsys, "train", f"{EX}/digits.py", "--data", f"npy:{tmp_path / 'npy'}", "--epochs", "1",
                         "--no-progress")
    assert code == 0 and "test accuracy" in out, err
    code, _, err = cli(capsys, "train", f"{EX}/lenet.py", "--epochs", "1")
    one_error(code, err, "give --data a data set of 1x28x28 samples")


# ---- 8. a whole file through tdc run and the native executable -------------------------------------------------

def test_whole_files_run_batch_by_batch_in_python_and_natively(capsys, tmp_path):
    x = np.random.default_rng(0).standard_normal((70, 784)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = cli(capsys, "run", f"{EX}/mlp.py", "--batch", "32", "--input", f"x={tmp_path / 'x.npy'}",
                         "--output", tmp_path / "y.npy", "--weights", _mlp_weights(tmp_path))
    assert code == 0 and "ran 3 batches of 32" in out, err
    y = np.load(tmp_path / "y.npy")
    ref = tdc.compile(mlp_graph(70), params=dict(np.load(tmp_path / "w.npz")))(x=x)["out"]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert cli(capsys, "compile", f"{EX}/mlp.py", "--batch", "32", "--weights", tmp_path / "w.npz",
               "-o", tmp_path / "b")[0] == 0
    p = subprocess.run([str(tmp_path / "b" / "model"), "--input", f"x={tmp_path / 'x.npy'}", "--output",
                        str(tmp_path / "yn.npy")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ran 3 batches of 32 (70 samples)" in p.stdout, p.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "yn.npy"), y)


def mlp_graph(batch):
    sys.path.insert(0, EX)
    import mlp
    return mlp.mlp.trace(batch=batch)


def _mlp_weights(tmp_path):
    from tdc.frontend.init import init_params
    np.savez(tmp_path / "w.npz", **init_params(mlp_graph(1), seed=5))
    return tmp_path / "w.npz"


# ---- 9. checkpoints as weights -------------------------------------------------------------------------------------

def test_a_checkpoint_is_accepted_wherever_weights_are(capsys, tmp_path):
    assert cli(capsys, "train", f"{EX}/digits.py", "--epochs", "1", "--no-progress", "--checkpoint", tmp_path / "ck")[0] == 0
    code, out, err = cli(capsys, "run", f"{EX}/digits.py", "--random-inputs", "--weights", tmp_path / "ck" / "last.npz")
    assert code == 0 and "warning" not in err, err
    code, out, err = cli(capsys, "compile", f"{EX}/digits.py", "--weights", tmp_path / "ck" / "last.npz",
                         "-o", tmp_path / "b")
    assert code == 0, err


# ---- 10. training executables: optimizer options and a schedule ------------------------------------------------------

def test_training_executables_take_the_optimizer_and_schedule_options_of_train(capsys, tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 784)).astype(np.float32), rng.integers(0, 10, 64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    assert cli(capsys, "compile", f"{EX}/mlp.py", "--batch", "16", "--train", "--optimizer", "momentum",
               "--momentum", "0.8", "--weight-decay", "0.01", "--no-decay-bias-norm", "--schedule", "cosine",
               "--warmup", "3", "-o", tmp_path / "b")[0] == 0
    p = subprocess.run([str(tmp_path / "b" / "model"), "--input", f"x={tmp_path / 'x.npy'}", "--input",
                        f"y={tmp_path / 'y.npy'}", "--input", "lr=0.1", "--steps", "12", "--print-every", "4",
                        "--save", str(tmp_path / "t.weights")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    native = [float(line.split("loss=")[1]) for line in p.stdout.splitlines() if "loss=" in line]
    from tdc.runtime.schedule import make_schedule
    opt = tdc.Optimizer("momentum", lr=0.1, momentum=0.8, weight_decay=0.01, decay_bias_norm=False)
    sys.path.insert(0, EX)
    import mlp
    exe = tdc.compile(tdc.train_step(mlp.mlp, batch=16, optimizer=opt), seed=0)
    sched = make_schedule("cosine", 0.1, 12, warmup=3)
    losses = [float(exe(x=x[16 * (s % 4):16 * (s % 4) + 16], y=y[16 * (s % 4):16 * (s % 4) + 16],
                        lr=np.float32(sched.lr_at(s)))["loss"]) for s in range(12)]
    np.testing.assert_allclose(native, [losses[3], losses[7], losses[11]], rtol=1e-5)


def test_decoupled_decay_and_no_decay_on_biases_and_norms():
    """With zero gradients (the loss does not reach the params) only decay moves them: L2 and
    decoupled decay as their formulas say, and rank-1 params untouched when exempted."""
    g = Graph("still")
    with tdc.Builder(g) as b:
        w = b.param("w", (3, 2), "ones")
        bias = b.param("bias", (2,), "ones")
        x = b.arg("x", TensorType("f32", (2,)), "input")
        g.add_output("loss", tdc.functional.sum(x * x).value)
    del w, bias
    from tdc.passes.autodiff import autodiff
    from tdc.passes.optimizer import add_optimizer
    for opt, want_w, want_b in [
            (tdc.Optimizer("sgd", weight_decay=0.5), 1 - 0.1 * 0.5, 1 - 0.1 * 0.5),
            (tdc.Optimizer("sgd", weight_decay=0.5, decay_bias_norm=False), 1 - 0.1 * 0.5, 1.0),
            (tdc.Optimizer("adamw", weight_decay=0.5), 1 - 0.1 * 0.5, 1 - 0.1 * 0.5)]:
        exe = tdc.compile(add_optimizer(autodiff(g, "loss"), opt), seed=0)
        exe(x=np.ones(2, np.float32), lr=np.float32(0.1))
        np.testing.assert_allclose(exe.state["w"], want_w, rtol=1e-6, err_msg=opt.name)
        np.testing.assert_allclose(exe.state["bias"], want_b, rtol=1e-6, err_msg=opt.name)


# ---- 11. the compile is seen and is not counted as a step ------------------------------------------------------------

def test_numba_compiles_in_tdc_compile_and_reports_progress():
    seen = []
    exe = tdc.compile(mlp_graph(2), backend="numba", progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == list(range(1, seen[-1][1] + 1))
    drivers = [fn for fn, _ in exe.steps if hasattr(fn, "signatures")]
    assert drivers and all(fn.signatures for fn in drivers)      # compiled before the first call


# ---- 12. BLAS threads: tdc's own, not the caller's ----------------------------------------------------------------------

def test_compiling_leaves_numpys_blas_threads_alone():
    from threadpoolctl import threadpool_info

    def numpy_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]]
    before = numpy_threads()
    exe = tdc.compile(mlp_graph(2), backend="numba")
    exe(x=np.zeros((2, 784), np.float32))
    tdc.compile(mlp_graph(2), backend="reference")(x=np.zeros((2, 784), np.float32))
    assert numpy_threads() == before


# ---- 13. the README quotes what make demo prints: see the README's Train section -------------------------------------
# ---- 14, 15. tdc dump: large constants, the pipelines it shows, kernels in DOT -------------------------------------------

def test_dump_prints_large_constants_in_short_and_exactly_when_asked(capsys, tmp_path):
    g = Graph("big")
    x = g.add_arg("x", TensorType("f32", (1000,)), "input")
    (c,) = g.emit("constant", [], {"value": np.arange(1000, dtype=np.float32)})
    g.add_output("y", g.emit("add", [x, c])[0])
    (tmp_path / "big.tdc").write_text(print_graph(g))
    code, out, _ = cli(capsys, "dump", tmp_path / "big.tdc")
    assert code == 0 and "elided<" in out and len(out) < 600
    with pytest.raises(TdcError, match="cannot be read back: print the graph with every value"):
        parse_graph(out)
    code, out, _ = cli(capsys, "dump", tmp_path / "big.tdc", "--full-constants")
    assert code == 0 and print_graph(parse_graph(out)) == out.rstrip("\n")


def test_dump_shows_the_pipelines_that_run(capsys):
    with pytest.raises(SystemExit):
        main(["dump", "--help"])
    help_text = capsys.readouterr().out
    assert "bnfold,fold,simplify,cse,dce,conv_algo,fuse" in help_text
    code, out, _ = cli(capsys, "dump", f"{EX}/mlp.py", "--train", "--optimizer", "sgd")
    assert code == 0 and "<-" in out and "loss=" in out             # the step, not the training-mode forward
    code, out, _ = cli(capsys, "dump", f"{EX}/mlp.py", "--batch", "2", "--source", "--llvm")
    assert code == 0 and "@njit" in out and "define " in out         # both
    code, out, _ = cli(capsys, "dump", f"{EX}/mlp.py", "--after", "fuse", "--format", "dot")
    assert code == 0 and "subgraph cluster_0" in out and "kernel k0" in out


# ---- 16. tdc run checks its inputs as the native executable does --------------------------------------------------------

def test_run_checks_inputs_like_the_native_executable(capsys, tmp_path):
    np.save(tmp_path / "x64.npy", np.zeros((2, 784)))
    np.save(tmp_path / "x.npy", np.zeros((2, 784), np.float32))
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 784), np.float32))
    args = ("run", f"{EX}/mlp.py", "--batch", "2")
    one_error(*cli(capsys, *args, "--input", f"x={tmp_path / 'x64.npy'}")[::2], "expected f32[2,784], got float64")
    one_error(*cli(capsys, *args, "--input", f"x={tmp_path / 'x.npy'}", "--input", f"x={tmp_path / 'x.npy'}")[::2],
              "--input x is given twice")
    one_error(*cli(capsys, *args, "--input", f"x={tmp_path / 'x.npz'}")[::2], "is a .npz archive")
    code, out, err = cli(capsys, *args, "--input", f"x={tmp_path / 'x.npy'}", "--output", f"nope={tmp_path / 'y.npy'}")
    one_error(code, err, "has no output 'nope'")
    assert "out:" not in out


# ---- 17. values that were accepted without complaint ---------------------------------------------------------------------

def test_bad_settings_and_weights_are_refused_or_warned(capsys, tmp_path):
    one_error(*cli(capsys, "train", f"{EX}/digits.py", "--warmup", "-5")[::2], "warm-up must be >= 0")
    from tdc.frontend.init import init_params
    w = init_params(mlp_graph(1), seed=0)
    w["fc1.weight"][0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **w)
    one_error(*cli(capsys, "run", f"{EX}/mlp.py", "--random-inputs", "--weights", tmp_path / "nan.npz")[::2],
              "holds 1 NaN or infinite values")
    w["fc1.weight"][0, 0] = 0.0
    np.savez(tmp_path / "extra.npz", **w, typo_weight=np.zeros(3))
    code, out, err = cli(capsys, "run", f"{EX}/mlp.py", "--random-inputs", "--weights", tmp_path / "extra.npz")
    assert code == 0 and "warning" in err and "typo_weight" in err
    assert cli(capsys, "compile", f"{EX}/mlp.py", "--batch", "4", "--train", "--optimizer", "sgd",
               "-o", tmp_path / "b")[0] == 0
    np.save(tmp_path / "x.npy", np.zeros((4, 784), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(4, np.int64))
    p = subprocess.run([str(tmp_path / "b" / "model"), "--input", f"x={tmp_path / 'x.npy'}", "--input",
                        f"y={tmp_path / 'y.npy'}", "--input", "lr=-0.5"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "the learning rate must be a finite number >= 0" in p.stderr


# ---- 18. --plot without matplotlib --------------------------------------------------------------------------------------------

def test_plot_without_matplotlib_is_refused_before_training(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # as if it were not installed
    code, out, err = cli(capsys, "train", f"{EX}/digits.py", "--epochs", "5", "--plot", tmp_path / "p.png")
    one_error(code, err, "needs matplotlib")
    assert "epoch" not in out


# ---- 19. the cache and the BLAS copies -------------------------------------------------------------------------------------

def test_cache_info_and_clear_and_a_bundle_sharing_blas(capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    assert "--shared-blas" in capsys.readouterr().out
    assert cli(capsys, "compile", f"{EX}/mlp.py", "--batch", "1", "--shared-blas", "-o", tmp_path / "b")[0] == 0
    assert not (tmp_path / "b" / "libscipy_openblas.so").exists()
    np.save(tmp_path / "x.npy", np.zeros((1, 784), np.float32))
    p = subprocess.run([str(tmp_path / "b" / "model"), "--input", f"x={tmp_path / 'x.npy'}"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    monkeypatch.setenv("TDC_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "llvm").mkdir(parents=True)
    (tmp_path / "cache" / "llvm" / "junk").write_bytes(b"x" * 4096)
    code, out, _ = cli(capsys, "cache", "--info")
    assert code == 0 and str(tmp_path / "cache") in out and "llvm" in out and "total" in out
    import tdc.cli as tcli
    kernels_dir = os.path.join(os.path.dirname(tcli.__file__), "backends", "numba", "__pycache__")
    before = sorted(os.listdir(kernels_dir)) if os.path.isdir(kernels_dir) else []
    monkeypatch.setattr(tcli, "__file__", str(tmp_path / "pkg" / "cli.py"))   # keep the real kernel cache
    code, out, _ = cli(capsys, "cache", "--clear")
    assert code == 0 and "cleared" in out and not (tmp_path / "cache").exists()
    assert (sorted(os.listdir(kernels_dir)) if os.path.isdir(kernels_dir) else []) == before


# ---- 20. porting from PyTorch: the unbiased running variance ---------------------------------------------------------------

def test_batchnorm_can_keep_the_unbiased_running_variance_as_pytorch_does():
    @tdc.model(batch=4)
    def m(x: tdc.f32["B", 3, 2, 2]):
        return nn.batchnorm(x, name="bn", unbiased_running_var=True)
    exe = tdc.compile(m.trace(training=True))
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    exe(x=x)
    unbiased = x.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=1)
    np.testing.assert_allclose(exe.state["bn.running_var"], 0.9 * 1.0 + 0.1 * unbiased, rtol=1e-5)
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("### Porting a model from PyTorch"):]
    for topic in ("count_include_pad", "momentum", "unbiased", "Weight decay", "NCHW"):
        assert topic in section[:section.index("\n### ")], topic
