"""Native executables from `tdc compile`: every example's inference and training step against the
reference and the LLVM JIT (the executable runs as a subprocess), embedded weights, relocation,
no libpython, bad inputs, an imported ONNX model against onnxruntime, and the C embedding example."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tdc
from tdc.backends.llvm.bundle import write_bundle
from tdc.ir.weights import read_weights
from tdc.frontend.init import init_params

HERE = os.path.dirname(__file__)
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, HERE)


def _run(exe, *args, cwd=None):
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def _inputs(graph, seed=0):
    rng = np.random.default_rng(seed)
    return {a.name: rng.standard_normal(a.type.shape).astype(a.type.np_dtype) for a in graph.inputs}


def _save_inputs(tmp, feeds):
    args = []
    for k, x in feeds.items():
        p = os.path.join(tmp, f"in_{k}.npy")
        np.save(p, x)
        args += ["--input", f"{k}={p}"]
    return args


@pytest.mark.parametrize("model,batch", [("mlp", 1), ("lenet", 1), ("lenet", 3), ("digits", 2), ("vgg", 1)])
def test_inference_executable_matches_reference_and_jit(model, batch, tmp_path):
    g = getattr(__import__(model), model).trace(batch=batch)
    params = init_params(g, 1)
    feeds = _inputs(g)
    b = write_bundle(g, str(tmp_path / "b"), params=params)
    out_args = []
    for name, _ in g.outputs:
        out_args += ["--output", f"{name}={tmp_path / (name + '.npy')}"]
    r = _run(b.executable, *_save_inputs(str(tmp_path), feeds), *out_args)
    assert r.returncode == 0, r.stderr
    ref = tdc.compile(g, params=params)(**feeds)
    jit = tdc.compile(g, backend="llvm", params=params)(**feeds)
    for name, _ in g.outputs:
        got = np.load(tmp_path / (name + ".npy"))
        assert got.dtype == ref[name].dtype and got.shape == ref[name].shape
        np.testing.assert_allclose(got, ref[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got, jit[name])    # the same code, bit for bit
        assert f"{name}: f32[" in r.stdout


@pytest.mark.parametrize("model,batch,opt", [("mlp", 4, "adam"), ("lenet", 2, "momentum"), ("digits", 4, "sgd"),
                                             ("vgg", 2, "sgd")])
def test_training_executable_matches_reference_steps(model, batch, opt, tmp_path):
    """Five steps over two batches: the losses printed and the weights written match the reference."""
    g = tdc.train_step(getattr(__import__(model), model), optimizer=tdc.Optimizer(opt, lr=0.01, eps=1e-4),
                       batch=batch)
    params = init_params(g, 2)
    rng = np.random.default_rng(3)
    x_shape = g.inputs[[a.name for a in g.inputs].index("x")].type.shape
    X = rng.standard_normal((2 * batch,) + x_shape[1:]).astype(np.float32)
    Y = (np.arange(2 * batch) % 10).astype(np.int64)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "Y.npy", Y)
    b = write_bundle(g, str(tmp_path / "b"), params=params, training=True)
    r = _run(b.executable, "--input", f"x={tmp_path / 'X.npy'}", "--input", f"y={tmp_path / 'Y.npy'}",
             "--input", "lr=0.01", "--steps", 5, "--print-every", 1, "--save", tmp_path / "t.weights")
    assert r.returncode == 0, r.stderr
    ref = tdc.compile(g, params=params)
    losses = []
    for s in range(5):
        k = s % 2
        losses.append(float(ref(x=X[k * batch:(k + 1) * batch], y=Y[k * batch:(k + 1) * batch],
                                lr=np.float32(0.01))["loss"]))
    printed = [float(line.split("loss=")[1].split()[0]) for line in r.stdout.splitlines() if "loss=" in line]
    np.testing.assert_allclose(printed, losses, rtol=1e-4, atol=1e-5)
    trained = read_weights(str(tmp_path / "t.weights"))
    for name, value in ref.state.items():
        np.testing.assert_allclose(trained[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    # the trained weights go back into tdc: an inference bundle or a run can start from them
    from tdc.ir.weights import load_weights
    infer = getattr(__import__(model), model).trace(batch=batch)
    assert set(load_weights(str(tmp_path / "t.weights"), infer)) == {a.name for a in infer.args if a.kind != "input"}


@pytest.fixture(scope="module")
def lenet_bundle(tmp_path_factory):
    import lenet
    tmp = tmp_path_factory.mktemp("lenet")
    g = lenet.lenet.trace(batch=1)
    params = init_params(g, 0)
    b = write_bundle(g, str(tmp / "b"), params=params)
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    expected = tdc.compile(g, params=params)(x=x)["out"]
    return b, tmp, x, expected


def test_embedded_weights_need_no_weights_file(lenet_bundle, tmp_path):
    import lenet
    _, _, x, expected = lenet_bundle
    g = lenet.lenet.trace(batch=1)
    b = write_bundle(g, str(tmp_path / "e"), params=init_params(g, 0), embed_weights=True)
    assert not os.path.exists(tmp_path / "e" / "model.weights") and b.weights is None
    np.save(tmp_path / "x.npy", x)
    r = _run(b.executable, "--input", f"x={tmp_path / 'x.npy'}", "--output", tmp_path / "y.npy")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-4, atol=1e-5)


def test_bundle_is_relocatable_and_needs_no_python(lenet_bundle, tmp_path):
    b, src_tmp, x, expected = lenet_bundle
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(b.directory, moved)
    env = {"PATH": "/usr/bin:/bin"}           # no venv, no PYTHONPATH
    r = subprocess.run([str(moved / "model"), "--input", f"x={src_tmp / 'x.npy'}", "--output", tmp_path / "y.npy"],
                       capture_output=True, text=True, cwd="/", env=env)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-4, atol=1e-5)
    ldd = subprocess.run(["ldd", str(moved / "model")], capture_output=True, text=True).stdout
    assert "libpython" not in ldd and "libscipy_openblas.so => " + str(moved) in ldd, ldd


def test_help_lists_inputs_outputs_and_weights(lenet_bundle):
    b = lenet_bundle[0]
    r = _run(b.executable, "--help")
    assert r.returncode == 0
    assert "x" in r.stdout and "f32[1,1,28,28]" in r.stdout and "f32[1,10]" in r.stdout and "weights" in r.stdout


def test_bad_inputs_give_one_line_and_nonzero_exit(lenet_bundle, tmp_path):
    b, src_tmp, x, _ = lenet_bundle
    out = tmp_path / "y.npy"
    np.save(tmp_path / "shape.npy", np.zeros((2, 1, 28, 27), np.float32))   # any number of samples, but 28x28
    np.save(tmp_path / "dtype.npy", np.zeros((1, 1, 28, 28), np.float64))
    good = (src_tmp / "x.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(good[:len(good) // 2])
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00\xff\xff{'descr': '<f4', " + b"x" * 40)
    (tmp_path / "empty.npy").write_bytes(b"")
    weights = (tmp_path / "bad.weights")
    wbytes = open(b.weights, "rb").read()
    weights.write_bytes(wbytes[:-100])
    flipped = bytearray(wbytes)
    flipped[-1] ^= 0xFF
    (tmp_path / "flip.weights").write_bytes(bytes(flipped))
    cases = [
        (["--input", f"x={tmp_path / 'shape.npy'}"], "shape"),
        (["--input", f"x={tmp_path / 'dtype.npy'}"], "dtype"),
        (["--input", f"x={tmp_path / 'trunc.npy'}"], "truncated"),
        (["--input", f"x={tmp_path / 'garbage.npy'}"], "npy"),
        (["--input", f"x={tmp_path / 'empty.npy'}"], "npy"),
        (["--input", f"x={tmp_path / 'missing.npy'}"], "missing.npy"),
        (["--input", f"x={src_tmp / 'x.npy'}", "--weights", tmp_path / "nope.weights"], "nope.weights"),
        (["--input", f"x={src_tmp / 'x.npy'}", "--weights", weights], "weights"),
        (["--input", f"x={src_tmp / 'x.npy'}", "--weights", tmp_path / "flip.weights"], "checksum"),
    ]
    for args, word in cases:
        r = _run(b.executable, *args, "--output", out)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("model: error:") and word in lines[0].lower(), (args, r.stderr)
        assert not out.exists()
    r = _run(b.executable, "--input", f"z={src_tmp / 'x.npy'}")
    assert r.returncode == 2 and "z" in r.stderr
    r = _run(b.executable)
    assert r.returncode == 2 and "x" in r.stderr


def test_label_out_of_range_in_a_training_executable(tmp_path):
    import mlp
    g = tdc.train_step(mlp.mlp, optimizer=tdc.Optimizer("sgd", lr=0.1), batch=2)
    b = write_bundle(g, str(tmp_path / "b"), training=True)
    np.save(tmp_path / "X.npy", np.zeros((2, 784), np.float32))
    np.save(tmp_path / "Y.npy", np.array([3, 12], np.int64))
    r = _run(b.executable, "--input", f"x={tmp_path / 'X.npy'}", "--input", f"y={tmp_path / 'Y.npy'}",
             "--input", "lr=0.1", "--steps", 1, "--save", tmp_path / "t.weights")
    assert r.returncode == 1 and "out of range" in r.stderr and not (tmp_path / "t.weights").exists()


def test_cli_compile_and_run_with_llvm(tmp_path, capsys):
    from tdc.cli import main
    x = np.random.default_rng(1).standard_normal((2, 784)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["compile", os.path.join(ROOT, "examples", "mlp.py"), "--batch", "2", "-o", str(tmp_path / "b"),
                 "--name", "my mlp"]) == 0
    assert "model.weights" in capsys.readouterr().out
    assert "int64_t my_mlp_run(" in (tmp_path / "b" / "model.h").read_text()
    r = _run(tmp_path / "b" / "model", "--input", f"x={tmp_path / 'x.npy'}", "--output", tmp_path / "y.npy")
    assert r.returncode == 0, r.stderr
    assert main(["run", os.path.join(ROOT, "examples", "mlp.py"), "--batch", "2", "--backend", "llvm",
                 "--input", f"x={tmp_path / 'x.npy'}", "--output", str(tmp_path / "y2.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.load(tmp_path / "y2.npy"))
    assert main(["dump", os.path.join(ROOT, "examples", "mlp.py"), "--llvm"]) == 0
    assert "define i64" in capsys.readouterr().out
    assert main(["compile", os.path.join(ROOT, "examples", "nothere.py"), "-o", str(tmp_path / "c")]) == 1
    assert not (tmp_path / "c").exists()
    (tmp_path / "afile").write_text("")
    assert main(["compile", os.path.join(ROOT, "examples", "mlp.py"), "-o", str(tmp_path / "afile")]) == 1
    assert "cannot write the bundle to" in capsys.readouterr().err


def test_onnx_model_compiles_to_an_executable_matching_onnxruntime(tmp_path):
    import onnx
    from test_onnx import ort_run, torch_like_model
    from tdc.cli import main
    proto = torch_like_model()
    onnx.save(proto, tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "--batch", "2", "-o", str(tmp_path / "b")]) == 0
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = _run(tmp_path / "b" / "model", "--input", f"input.1={tmp_path / 'x.npy'}",
             "--output", f"output={tmp_path / 'y.npy'}")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ort_run(proto, {"input.1": x})["output"],
                               rtol=1e-4, atol=1e-5)


def test_c_program_embeds_the_bundle_through_its_header(lenet_bundle, tmp_path):
    from tdc.backends.llvm.runtime import build_runtime
    b, _, x, expected = lenet_bundle
    rt = build_runtime()
    exe = tmp_path / "embed"
    src = os.path.join(ROOT, "examples", "embed", "embed.c")
    r = subprocess.run(["gcc", "-O2", "-std=c11", f"-I{b.directory}", src, b.object, *rt.link_args(), "-o", exe],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    x.tofile(tmp_path / "x.f32")
    r = _run(exe, b.weights, tmp_path / "x.f32")
    assert r.returncode == 0, r.stderr
    got = np.array([float(v) for v in r.stdout.split()], np.float32)
    np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-4, atol=1e-5)


def test_large_constant_goes_into_the_weights_file_unnamed(tmp_path):
    """A constant above codegen.BOUND_LITERAL_BYTES is payload of model.weights (or of the
    embedded weights), not a weight: the file names the params only."""
    from test_llvm_backend import large_constant_graph
    g, params, feed = large_constant_graph()
    np.save(tmp_path / "x.npy", feed["x"])
    ref = tdc.compile(g, params=params)(**feed)
    for embed in (False, True):
        b = write_bundle(g, str(tmp_path / f"b{embed}"), params=params, embed_weights=embed)
        r = _run(b.executable, "--input", f"x={tmp_path / 'x.npy'}", "--output", f"y={tmp_path / 'y.npy'}",
                 "--output", f"c={tmp_path / 'c.npy'}")
        assert r.returncode == 0, r.stderr
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref["y"], rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), ref["c"])
    assert set(read_weights(str(tmp_path / "bFalse" / "model.weights"))) == {"w"}
