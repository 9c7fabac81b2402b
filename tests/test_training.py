import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tdc
from tdc import nn
from tdc.errors import TdcError
from tdc.passes.optimizer import Optimizer
from tdc.passes.training import train_step
from tdc.runtime.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from tdc.runtime.data import Dataset, load_digits
from tdc.runtime.loader import Source
from tdc.runtime.schedule import Constant, Cosine, StepDecay, Warmup, make_schedule, scaled_lr
from tdc.runtime.trainer import add_train_arguments, cmd_train, train
from tdc.ir.weights import load_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "examples", "digits.py")


@tdc.model(batch=32)
def tiny(x: tdc.f32["B", 64]):
    return nn.linear(x, 10, name="fc1")


@pytest.fixture(scope="module")
def digits_data():
    return load_digits()


@pytest.fixture(scope="module")
def small_digits(digits_data):
    """A fifth of the training set keeps the multi-run tests quick."""
    d = digits_data
    return Dataset("digits", d.x_train[:320], d.y_train[:320], d.x_test[:100], d.y_test[:100], 10)


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """These matrices are small: with pytest -n 2 on 2 cores, threaded BLAS only adds contention."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


def quiet(**kw):
    return dict(progress=False, verbose=False, **kw)


# ---- schedules -----------------------------------------------------------------------------

def test_schedules():
    assert Constant(0.3).lr_at(1000) == 0.3
    s = StepDecay(0.1, step_size=10, gamma=0.5)
    assert [s.lr_at(t) for t in (0, 9, 10, 19, 20, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    c = Cosine(1.0, total_steps=100, floor=0.1)
    assert [c.lr_at(t) for t in (0, 50, 100, 150)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert c.lr_at(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    w = Warmup(Constant(0.4), 4)
    assert [w.lr_at(t) for t in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_make_schedule():
    s = make_schedule("cosine", lr=0.1, total_steps=110, warmup=10)
    assert [s(t) for t in (0, 4, 9, 10, 60, 110, 200)] == pytest.approx([0.01, 0.05, 0.1, 0.1, 0.05, 0.0, 0.0])
    s = make_schedule("step", lr=1.0, total_steps=30)      # step size defaults to a third of the run
    assert [s(t) for t in (9, 10, 20)] == pytest.approx([1.0, 0.1, 0.01])
    s = make_schedule("step", lr=1.0, total_steps=30, step_size=4, gamma=0.5)
    assert s(8) == pytest.approx(0.25)
    # linear scaling rule: batch 256 from a base of 32 is 8x the rate, reached after warm-up
    assert scaled_lr(0.1, 256, 32) == pytest.approx(0.8)
    s = make_schedule("constant", lr=0.1, total_steps=100, warmup=5, batch=256, base_batch=32)
    assert [s(t) for t in (0, 4, 5, 99)] == pytest.approx([0.16, 0.8, 0.8, 0.8])
    with pytest.raises(TdcError, match="unknown schedule 'linear'"):
        make_schedule("linear", 0.1, 10)


# ---- checkpoints ---------------------------------------------------------------------------

def _state():
    return {"fc1.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(7, np.int64)}


def test_checkpoint_round_trip(tmp_path):
    opt = Optimizer("adam", lr=1e-3).to_dict()
    path = save_checkpoint(str(tmp_path), _state(), model="m", step=7, epoch=1, position=3, seed=5,
                           optimizer=opt, keep=True, batch=32)
    assert path == str(tmp_path / "last.npz")
    assert (tmp_path / "step-00000007.npz").exists()
    for where in (str(tmp_path), path):
        ck = load_checkpoint(where)
        assert (ck.step, ck.epoch, ck.position, ck.seed, ck.model) == (7, 1, 3, 5, "m")
        assert ck.optimizer == opt and ck.meta["batch"] == 32 and ck.meta["version"] == 1
        assert set(ck.state) == {"fc1.weight", "step"}
        for k, v in _state().items():
            assert ck.state[k].dtype == v.dtype and np.array_equal(ck.state[k], v)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TdcError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "none"))
    path = save_checkpoint(str(tmp_path), _state(), model="m", step=7, epoch=1, position=3, seed=0,
                           optimizer={"name": "sgd"})
    good = open(path, "rb").read()
    bad = tmp_path / "bad"
    bad.mkdir()
    for damaged in (good[:len(good) // 2], b"garbage" * 10, good[:100] + b"\xff" * 50 + good[150:]):
        (bad / "last.npz").write_bytes(damaged)
        with pytest.raises(TdcError, match="corrupt or truncated checkpoint"):
            load_checkpoint(str(bad))
    np.savez(bad / "last.npz", w=np.zeros(3))
    with pytest.raises(TdcError, match="not a tdc checkpoint"):
        load_checkpoint(str(bad))


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(str(tmp_path), _state(), model="m", step=7, epoch=1, position=3, seed=0,
                    optimizer={"name": "sgd"})
    real_savez = np.savez

    def savez_then_fail(f, **arrays):
        real_savez(f, **arrays)
        f.truncate(f.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(tmp_path), {"fc1.weight": np.ones((2, 3), np.float32)}, model="m", step=99,
                        epoch=5, position=0, seed=0, optimizer={"name": "sgd"})
    monkeypatch.undo()
    ck = load_checkpoint(str(tmp_path))
    assert ck.step == 7 and np.array_equal(ck.state["fc1.weight"], _state()["fc1.weight"])
    assert os.listdir(tmp_path) == ["last.npz"]   # no temp file left behind


def test_checkpoint_for_another_model(tmp_path, small_digits):
    digits = Source(DIGITS).model
    opt = Optimizer("adam", lr=1e-3)
    train(digits, small_digits, epochs=1, batch=32, max_steps=1, checkpoint=str(tmp_path), **quiet())
    ck = load_checkpoint(str(tmp_path))
    wrong_shape = r"param fc1.weight is \[64, 512\] in the checkpoint, the model needs \[10, 64\]"
    with pytest.raises(TdcError, match=wrong_shape):
        check_compatible(ck, train_step(tiny, optimizer=opt, batch=32), opt.to_dict())
    with pytest.raises(TdcError, match=r"fc1.weight is \[64, 512\] in the checkpoint"):
        train(tiny, small_digits, epochs=1, checkpoint=str(tmp_path), resume=True, **quiet())
    with pytest.raises(TdcError, match="written with optimizer name 'adam'; this run uses 'momentum'"):
        train(digits, small_digits, epochs=1, batch=32, optimizer=Optimizer("momentum"), checkpoint=str(tmp_path),
              resume=True, **quiet())
    with pytest.raises(TdcError, match="written with batch 32; this run uses 16"):
        train(digits, small_digits, epochs=1, batch=16, checkpoint=str(tmp_path), resume=True, **quiet())


# ---- training ------------------------------------------------------------------------------

def _records(path):
    """The metrics of a run, without the wall-clock times (which no rerun reproduces)."""
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def test_resume_after_stop_reproduces_losses(tmp_path, small_digits):
    digits = Source(DIGITS).model
    kw = dict(epochs=3, batch=16, optimizer=Optimizer("adam", lr=2e-3), schedule="cosine", warmup=5)
    full = train(digits, small_digits, metrics=str(tmp_path / "full.jsonl"), progress=True, verbose=False, **kw)
    assert full.losses.dtype == np.float32 and len(full.losses) == 3 * (320 // 16)

    ckdir, metrics = str(tmp_path / "ck"), str(tmp_path / "part.jsonl")
    part = train(digits, small_digits, checkpoint=ckdir, checkpoint_every=7, max_steps=27, metrics=metrics,
                 **quiet(**kw))
    assert part.step == 27 and np.array_equal(part.losses, full.losses[:27])
    rest = train(digits, small_digits, checkpoint=ckdir, resume=True, metrics=metrics, **quiet(**kw))
    assert rest.first_step == 27 and rest.epoch == 3
    assert np.array_equal(rest.losses, full.losses[27:])
    assert all(np.array_equal(rest.state[k], v) for k, v in full.state.items())
    assert rest.test_accuracy == full.test_accuracy and rest.test_loss == full.test_loss
    assert _records(metrics) == _records(str(tmp_path / "full.jsonl"))


def test_resume_after_sigkill(tmp_path, small_digits):
    """A real kill: a training subprocess is SIGKILLed once it has written a checkpoint."""
    ckdir = str(tmp_path / "ck")
    script = (
        "import sys, numpy as np\n"
        "from tdc.runtime.data import load_digits, Dataset\n"
        "from tdc.runtime.trainer import train\n"
        "from tdc.passes.optimizer import Optimizer\n"
        "d = load_digits()\n"
        "d = Dataset('digits', d.x_train[:320], d.y_train[:320], d.x_test[:100], d.y_test[:100], 10)\n"
        "train(sys.argv[1], d, epochs=200, batch=16, optimizer=Optimizer('adam', lr=1e-3),\n"
        "      checkpoint=sys.argv[2], checkpoint_every=5, progress=False, verbose=False)\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, DIGITS, ckdir], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(ckdir, "last.npz")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        time.sleep(0.3)   # kill somewhere after the first checkpoint, mid-write or mid-step
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = load_checkpoint(ckdir).step
    assert done >= 5 and done % 5 == 0

    digits = Source(DIGITS).model
    kw = dict(batch=16, optimizer=Optimizer("adam", lr=1e-3))
    epochs = done // 20 + 2      # 20 steps per epoch: finish the current epoch and one more
    full = train(digits, small_digits, epochs=epochs, **quiet(**kw))
    rest = train(digits, small_digits, epochs=epochs, checkpoint=ckdir, resume=True, **quiet(**kw))
    assert rest.first_step == done
    assert np.array_equal(rest.losses, full.losses[done:])
    assert all(np.array_equal(rest.state[k], v) for k, v in full.state.items())


def test_cli_trains_digits(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    metrics, weights = str(tmp_path / "m.jsonl"), str(tmp_path / "w.npz")
    args = parser.parse_args([DIGITS, "--epochs", "3", "--lr", "2e-3", "--metrics", metrics,
                              "--save-weights", weights, "--no-progress", "--backend", "reference"])
    assert cmd_train(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("test accuracy ") and "/359) after 3 epochs, " in last and last.endswith(" s")
    assert float(last.split()[2]) >= 0.9
    records = _records(metrics)
    steps = [r for r in records if "test_accuracy" not in r]
    evals = [r for r in records if "test_accuracy" in r]
    assert len(steps) == 3 * (1438 // 32) and len(evals) == 3
    assert all({"epoch", "step", "loss", "lr"} <= set(r) for r in steps)
    assert all({"epoch", "step", "loss", "test_accuracy", "test_loss"} <= set(r) for r in evals)
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert abs(evals[-1]["test_accuracy"] - float(last.split()[2])) < 1e-4
    digits = Source(DIGITS).model
    assert set(load_weights(weights, digits.trace(1))) == {a.name for a in digits.trace(1).args if a.kind == "param"}


def test_wrong_label_range_is_an_error_before_training(digits_data):
    d = digits_data
    bad = Dataset("digits", d.x_train, d.y_train + 1, d.x_test, d.y_test, 11)
    with pytest.raises(TdcError, match=r"training labels range over \[1, 10\] but the model has 10 outputs"):
        train(DIGITS, bad, **quiet())


def test_data_that_does_not_fit_the_model(digits_data):
    with pytest.raises(TdcError, match=r"samples are \[1, 8, 8\] but the model takes \[1, 28, 28\]"):
        train(os.path.join(ROOT, "examples", "lenet.py"), digits_data, **quiet())


def test_evaluation_counts_every_test_sample(small_digits, tmp_path):
    d = small_digits
    odd = Dataset("digits", d.x_train, d.y_train, d.x_test[:45], d.y_test[:45], 10)   # 45 = 32 + 13 padded
    lines = []
    r = train(tiny, odd, epochs=1, batch=32, checkpoint=str(tmp_path), resume=True, progress=False, out=lines.append)
    assert r.total == 45 and 0 <= r.correct <= 45 and len(r.losses) == 320 // 32
    assert lines[0] == f"no checkpoint in {tmp_path} yet; starting from scratch"
    assert lines[1].startswith("epoch 1/1  loss ") and f"({r.correct}/45)" in lines[1]
    again = train(tiny, odd, epochs=1, batch=32, checkpoint=str(tmp_path), resume=True, **quiet())
    assert len(again.losses) == 0 and again.step == r.step and again.correct == r.correct
    assert again.summary().startswith(f"test accuracy {r.correct / 45:.4f} ({r.correct}/45) after 1 epoch, ")


def test_plot(tmp_path, small_digits):
    lines = []
    train(tiny, small_digits, epochs=1, plot=str(tmp_path / "p.png"), progress=False, verbose=False, out=lines.append)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert lines == [f"note: matplotlib is not installed; not writing {tmp_path / 'p.png'} "
                         "(pip install matplotlib)"]
        assert not (tmp_path / "p.png").exists()
    else:
        assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_initial_params_are_used_and_not_modified(small_digits):
    params = {"fc1.weight": np.full((10, 64), 0.01, np.float32), "fc1.bias": np.zeros(10, np.float32)}
    before = {k: v.copy() for k, v in params.items()}
    r = train(tiny, small_digits, epochs=1, params=params, **quiet())
    assert all(np.array_equal(params[k], before[k]) for k in params)
    assert not np.array_equal(r.state["fc1.weight"], before["fc1.weight"])
    # equal logits for every class: the first loss is log(10)
    assert r.losses[0] == pytest.approx(np.log(10), rel=1e-6)


def test_training_on_the_numba_backend_learns_and_evaluates_with_current_params():
    """numba is the CLI's default backend for train: the step must learn, and evaluation must see
    the params the step updated in place (the executables bind their buffers when compiled)."""
    res = train(DIGITS, "digits", epochs=2, batch=32, optimizer=Optimizer("adam", lr=2e-3), backend="numba",
                progress=False, verbose=False)
    losses = np.asarray(res.losses)
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    assert res.test_accuracy >= 0.85, res.summary()
