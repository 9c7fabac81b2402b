"""The profiler: a profiled llvm executable times each kernel; the table and the host's peak."""
import os
import time

import numpy as np
import pytest

import tdc
import tdc.backends.llvm as llvm_backend
import tdc.runtime.profile
from tdc.cli import main
from tdc.errors import TdcError
from tdc.runtime.inputs import random_inputs
from tdc.runtime.loader import load_model
from tdc.runtime.profile import host_peak, profile_table, run_profiled

EX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(scope="module")
def lenet():
    g = load_model(os.path.join(EX, "lenet.py")).trace(batch=8)
    return g, tdc.compile(g, backend="llvm", seed=3, profile=True), random_inputs(g, 1)


def test_profiled_step_computes_what_the_plain_one_does(lenet):
    g, exe, ins = lenet
    plain = tdc.compile(g, backend="llvm", seed=3)
    for k, y in plain(**ins).items():
        np.testing.assert_array_equal(exe(**ins)[k], y)


def test_kernel_times_account_for_the_calls(lenet):
    g, exe, ins = lenet
    exe.reset_times()
    start = time.perf_counter()
    for _ in range(20):
        exe(**ins)
    wall = time.perf_counter() - start
    times = exe.kernel_times()
    assert all(t.calls == 20 for t in times)
    timed = sum(t.seconds for t in times)
    assert 0 < timed <= wall          # the kernels run inside the calls
    assert timed > 0.3 * wall         # and are most of them (the rest: copying inputs and outputs in Python)
    ops = [op for t in times for op in t.ops]
    assert ops.count("conv2d") == 2 and ops.count("linear") == 3 and ops.count("maxpool2d") == 2


def test_kernel_work_is_the_ops_flops_and_arrays(lenet):
    g, exe, _ = lenet
    conv = next(n for n in exe.graph.nodes if n.op == "conv2d")
    (n, c, _, _), (m, _, kh, kw) = conv.inputs[0].type.shape, conv.inputs[1].type.shape
    _, _, ho, wo = conv.outputs[0].type.shape
    t = next(t for t in exe.kernel_times() if t.ops[0] == "conv2d" and t.ops[1:] == ["relu"]
             and conv in dict(tdc.passes.fuse.kernels(exe.graph))[t.name])
    out = n * m * ho * wo
    assert t.flops == 2 * out * c * kh * kw + 2 * out   # multiply-adds, then the bias and the relu
    assert t.bytes >= 4 * (conv.inputs[0].type.size + conv.inputs[1].type.size + out)


def test_table_and_peak(lenet, tmp_path, monkeypatch):
    g, exe, ins = lenet
    # a fresh peak cache, not a fresh $TDC_CACHE_DIR (that would rebuild the C runtime)
    monkeypatch.setattr(tdc.runtime.profile, "peak_path", lambda: str(tmp_path / "peak.json"))
    calls = run_profiled(exe, ins, min_seconds=0.05, min_calls=7)
    assert calls >= 7 and exe.calls == calls
    peak, threads = host_peak(1)
    assert threads == 1 and 1 < peak < 1e4
    times = exe.kernel_times()
    for t in times:   # no kernel runs faster than the machine can: a peak measured too low shows here
        assert t.flops / (t.seconds / t.calls) * 1e-9 < 1.5 * host_peak(len(os.sched_getaffinity(0)))[0]
    monkeypatch.setattr(llvm_backend, "fma_peak_gflops", lambda threads: pytest.fail("measured twice"))
    assert host_peak(1) == (peak, 1)   # cached per CPU model and thread count
    table = profile_table(times, (peak, 1))
    lines = table.splitlines()
    assert lines[0].startswith(f"profile: {calls} calls") and len(lines) == 2 + len(times) + 1
    assert "conv2d,relu" in table and lines[-1].split()[:1] == ["step"] and "100.0%" in lines[-1]
    short = profile_table(times, None, top=2).splitlines()
    assert short[-2].startswith(f"({len(times) - 2} more)") and "%peak" not in short[1]


def test_profile_refusals(lenet, capsys):
    g, exe, _ = lenet
    with pytest.raises(TdcError, match="not the numba backend"):
        tdc.compile(g, backend="numba", profile=True)
    with pytest.raises(TdcError, match="compiled without profiling"):
        tdc.compile(g, backend="llvm").kernel_times()
    assert main(["train", os.path.join(EX, "digits.py"), "--profile", "--backend", "reference",
                 "--no-progress"]) == 1
    assert "does not combine with --backend reference" in capsys.readouterr().err


def test_cli_run_profile(capsys):
    assert main(["run", os.path.join(EX, "mlp.py"), "--random-inputs", "--batch", "4", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "profile: " in out and "linear,relu" in out and "%peak" in out
    assert out.strip().splitlines()[-1].startswith("step")


def test_native_executable_profile(tmp_path, capsys):
    """tdc compile --profile: the executable's --profile prints every kernel over every step."""
    out = tmp_path / "mlp"
    assert main(["compile", os.path.join(EX, "mlp.py"), "-o", str(out), "--train", "--profile", "--batch", "16"]) == 0
    header = (out / "model.h").read_text()
    kernels = int(header.split("#define TDC_NUM_KERNELS ")[1].split()[0])
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((16, 784)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 10, 16).astype(np.int64))
    import subprocess
    run = subprocess.run([str(out / "model"), f"--input=x={tmp_path / 'x.npy'}", f"--input=y={tmp_path / 'y.npy'}",
                          "--input", "lr=0.01", "--steps", "30", "--save", str(tmp_path / "w.weights"), "--profile"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    text = run.stdout[run.stdout.index("profile: "):].splitlines()
    assert text[0].startswith("profile: 30 calls") and f"in {kernels} kernels" in text[0]
    rows = text[2:-1]
    assert len(rows) == min(kernels, 15) + (kernels > 15) and text[-1].startswith("step")
    shares = [float(r.split("%")[0].split()[-1]) for r in rows]
    assert abs(sum(shares) - 100) < 1 and shares[:-1] == sorted(shares[:-1], reverse=True)
    # the products and Adam's update loops over the 784x300 weight are the costliest kernels
    assert any("linear" in r or "matmul" in r for r in rows[:3])
    bad = subprocess.run([str(out / "model"), "--profile", "--hogwild"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not combine with --hogwild" in bad.stderr


def test_rates_are_kept_per_cpu_family_and_features_not_per_name():
    """Two machines here both call themselves "AMD EPYC": a Zen 3 with AVX2 and a Zen 4 with
    AVX-512. Their peaks and calibrated rates must not share a cache entry."""
    from tdc.passes.target import cpu_model
    block = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: {m}\nstepping\t: 1\nflags\t\t: {f}\n\n"
    zen3 = cpu_model(block.format(m=1, f="fpu sse2 avx2 fma"))
    zen4 = cpu_model(block.format(m=17, f="fpu sse2 avx2 fma avx512f avx512_vnni"))
    assert zen3 == "AMD EPYC (25/1/1; avx2 fma)" and zen4 == "AMD EPYC (25/17/1; avx2 fma avx512f avx512_vnni)"
    assert cpu_model("") and "(" not in cpu_model("model name\t: Some CPU\n")   # no family: the name alone
