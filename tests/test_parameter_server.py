"""Parameter servers and the staged runtime: the placement pass (shards, push and pull, the
optimizer on the servers), the per-rank stages, synchronous servers against data parallelism on
every backend, asynchronous and bounded-staleness training on digits, compressed data
parallelism, and what happens when a worker or a server is killed. Every MPI job runs under the
venv's mpiexec with a timeout."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tdc
from tdc.cli import main
from tdc.errors import TdcError
from tdc.ir.graph import placed_ranks
from tdc.ir.parser import parse_graph
from tdc.ir.printer import print_graph
from tdc.lower.stages import Stage, split_rank
from tdc.passes.data_parallel import DataParallel
from tdc.passes.parameter_server import ParameterServer, plan_shards

HERE = Path(__file__).parent
ROOT = HERE.parent
EXAMPLES = ROOT / "examples"
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
TDC = [sys.executable, "-m", "tdc.cli"]
TIMEOUT = 300
sys.path.insert(0, str(EXAMPLES))
import lenet  # noqa: E402
import mlp  # noqa: E402


def mpirun(n: int, args: list[str], timeout: float = TIMEOUT) -> dict | list:
    p = subprocess.run([MPIEXEC, "-n", str(n), *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def tdc_train(args: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*TDC, "train", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ---- sharding and placement ----------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8), servers=st.integers(1, 4))
def test_shards_cover_every_element_once_with_balanced_bytes(sizes, servers):
    params = [(f"p{i}", (n,), 4) for i, n in enumerate(sizes)]
    shards = plan_shards(params, servers)
    assert len(shards) == servers
    for name, (n,), _ in params:
        pieces = sorted((pc.start, pc.stop) for sh in shards for pc in sh if pc.name == name)
        assert pieces[0][0] == 0 and pieces[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))    # contiguous, no overlap
    loads = [sum(pc.size for pc in sh) * 4 for sh in shards]
    total = sum(sizes) * 4
    # a shard takes its share of the bytes, give or take one element at each end
    for load in loads[:-1]:
        assert abs(load - total / servers) <= 8 + 4
    assert sum(loads) == total


def test_placement_puts_the_optimizer_on_the_servers_and_the_model_on_the_workers():
    opt = tdc.Optimizer("adam", lr=0.01)
    g = tdc.train_step(lenet.lenet, batch=12, optimizer=opt, parallel=ParameterServer(2, 3))
    workers, servers = {0, 1, 2}, {3, 4}
    for n in g.nodes:
        ranks = placed_ranks(n.placement)
        if n.op in ("push", "pull"):
            assert ranks == workers | {n.attrs["server"]} and n.attrs["server"] in servers
        elif n.op in ("conv2d", "maxpool2d", "linear", "softmax_cross_entropy"):
            assert ranks == workers
    # the optimizer state exists only as the servers' pieces, and the pieces cover each param once
    slots = [a for a in g.state if a.name.endswith((".m", ".v"))]
    assert all("[" in a.name for a in slots)
    params = {a.name: a.type.size for a in g.params if "[" not in a.name}
    pieces = [a for a in g.params if "[" in a.name]
    for name, size in params.items():
        assert sum(a.type.size for a in pieces if a.attrs["of"] == name) == size
    assert not any(name.startswith("grad.") for name, _ in g.outputs)
    text = print_graph(g)
    assert "@ranks:0..2" in text and '@"ranks:0..2,4"' in text and "push(" in text
    assert print_graph(parse_graph(text)) == text            # the placed step round-trips


def test_dump_shows_the_placement(capsys):
    assert main(["dump", str(EXAMPLES / "mlp.py"), "--train", "--ranks", "3", "--ps", "1", "--batch", "12"]) == 0
    out = capsys.readouterr().out
    assert "push(" in out and "pull(" in out and "@rank:2" in out and "@ranks:0..1" in out


def test_each_node_runs_in_the_stages_of_exactly_the_ranks_it_is_placed_on():
    g = tdc.train_step(mlp.mlp, batch=12, optimizer=tdc.Optimizer("momentum"), parallel=ParameterServer(2, 2))
    counts: dict = {}
    for r in range(4):
        prog = split_rank(g, r)
        for it in prog.items:
            if isinstance(it, Stage):
                assert not it.graph.params and not it.graph.updates     # stages hold no state of their own
                for n in it.graph.nodes:
                    counts[(r, n.op)] = counts.get((r, n.op), 0) + 1
            else:
                assert r in placed_ranks(it.placement)
    for r in (0, 1):
        assert counts.get((r, "linear"), 0) == 3
    for r in (2, 3):
        assert (r, "linear") not in counts and counts.get((r, "mul"), 0) > 0
    # the worker's state is the whole model; a server's only its pieces and their velocities
    assert {a.name for a in split_rank(g, 0).args if a.kind == "param"} == {p.name for p in mlp.mlp.trace(1).params}
    assert all("[" in a.name for a in split_rank(g, 2).args if a.kind in ("param",))


@pytest.mark.parametrize("servers,workers", [(1, 1), (1, 2), (2, 3)])
def test_simulated_sync_servers_equal_data_parallel_training(servers, workers):
    """The reference's simulated ranks: the placed step, step for step, against data-parallel
    training of the same global batch (bound: 2e-5 on the params after 5 Adam steps: the mean
    over workers is summed in another order, and Adam's division by sqrt(v) magnifies the last
    bits where v is tiny)."""
    batch = 12
    opt = tdc.Optimizer("adam", lr=0.01)
    ps = tdc.compile(tdc.train_step(lenet.lenet, batch=batch, optimizer=opt,
                                    parallel=ParameterServer(servers, workers)), seed=2)
    dp = tdc.compile(tdc.train_step(lenet.lenet, batch=batch, optimizer=opt,
                                    parallel=DataParallel(workers) if workers > 1 else None), seed=2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        ps(x=x, y=y, lr=np.float32(0.01))
        dp(x=x, y=y, lr=np.float32(0.01))
    for k in dp.state:
        if not k.endswith((".m", ".v")):
            np.testing.assert_allclose(ps.state[k], dp.state[k], rtol=0, atol=2e-5, err_msg=k)


def test_a_placed_step_is_not_compiled_into_one_program():
    g = tdc.train_step(mlp.mlp, batch=4, parallel=ParameterServer(1, 1))
    with pytest.raises(TdcError, match="staged runtime"):
        tdc.compile(g, backend="llvm")


# ---- the staged runtime over MPI -----------------------------------------------------------------

@pytest.mark.parametrize("servers,workers,backends", [(1, 1, "reference llvm numba"),
                                                      (1, 2, "reference llvm numba"), (2, 2, "llvm")])
def test_sync_servers_equal_data_parallel_step_for_step(servers, workers, backends):
    """8 momentum steps on the MLP: the servers' params against one process on the same backend
    (which data parallelism equals: test_data_parallel) and against the reference's simulated
    ranks. Bound: 1e-6 (sums over the workers run in another order); 0 between the simulation
    and the reference backend's stages, which compute the same thing in the same order."""
    report = mpirun(servers + workers, [sys.executable, str(HERE / "mpi" / "ps_step.py"), str(servers), "sync",
                                        *backends.split()])
    assert [r["backend"] for r in report] == backends.split()
    for r in report:
        assert r["one_err"] <= 1e-6 and r["sim_err"] <= (0.0 if r["backend"] == "reference" else 1e-6), r
        assert r["staleness"] == {"0": 8 * servers * workers} or r["backend"] != "reference"


def test_sync_servers_with_three_workers():
    report = mpirun(4, [sys.executable, str(HERE / "mpi" / "ps_step.py"), "1", "sync", "reference", "llvm", "numba"])
    assert len(report) == 3
    for r in report:
        assert r["one_err"] <= 1e-6 and r["sim_err"] <= (0.0 if r["backend"] == "reference" else 1e-6), r


def test_compressed_data_parallel_keeps_every_rank_identical():
    report = mpirun(2, [sys.executable, str(HERE / "mpi" / "ps_step.py"), "0", "topk:0.05", "llvm"])
    r = report[0]
    assert r["same_on_every_rank"], r
    # dense: 8 steps of a ring allreduce of 266610 floats between 2 ranks is 8 * 4 * 266610 bytes
    assert r["bytes_sent"] < 8 * 4 * 266610 * 0.15


# ---- tdc train -----------------------------------------------------------------------------------

def _accuracy(p: subprocess.CompletedProcess) -> float:
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("test accuracy")][-1]
    return float(line.split()[2])


@pytest.fixture(scope="module")
def sync_digits(tmp_path_factory):
    metrics = tmp_path_factory.mktemp("sync") / "m.jsonl"
    p = tdc_train(["examples/digits.py", "--ranks", "3", "--ps", "1", *SETTLE, "--no-progress",
                   "--metrics", str(metrics)])
    return _accuracy(p), [json.loads(line) for line in metrics.read_text().splitlines()]


# Asynchronous runs are not reproducible (the order of updates depends on timing): enough epochs,
# and a cosine decay of lr to zero, that the final accuracy settles instead of jumping between epochs.
EPOCHS = 8
SETTLE = ["--epochs", str(EPOCHS), "--schedule", "cosine"]


def test_train_with_sync_servers_reports_no_staleness(sync_digits):
    acc, records = sync_digits
    assert acc > 0.9
    ps = [r for r in records if "staleness_histogram" in r][0]
    assert ps["mode"] == "sync" and set(ps["staleness_histogram"]) == {"0"} and ps["lead_histogram"] == {
        "0": ps["updates"] * 2}
    assert all(r["bytes_sent"] > 0 for r in records if "bytes_sent" in r)


@pytest.mark.parametrize("flags", [["--mode", "async"], ["--staleness", "1"]])
def test_async_and_bounded_training_converge_near_sync(sync_digits, flags, tmp_path):
    metrics = tmp_path / "m.jsonl"
    acc = _accuracy(tdc_train(["examples/digits.py", "--ranks", "3", "--ps", "1", *SETTLE,
                               "--no-progress", "--metrics", str(metrics), *flags]))
    assert acc >= sync_digits[0] - 0.02, (acc, sync_digits[0])
    ps = [json.loads(line) for line in metrics.read_text().splitlines() if "staleness_histogram" in line][0]
    assert ps["updates"] == 2 * EPOCHS * (1437 // 32)          # every worker's every step reached the server
    assert sum(ps["staleness_histogram"].values()) == ps["updates"]
    assert ps["mode"] == ("bounded" if "--staleness" in flags else "async")
    if "--staleness" in flags:
        # the recorded versions: no worker was ever answered more than K=1 steps ahead of the slowest
        assert max(int(k) for k in ps["lead_histogram"]) <= 1


def test_staleness_aware_lr_trains():
    """lr / (1 + staleness): with two workers most updates are one stale, so the steps are about
    halved; the run still learns (benchmarks/parameter_server.py compares it over 10 epochs)."""
    assert _accuracy(tdc_train(["examples/digits.py", "--ranks", "3", "--ps", "1", "--mode", "async",
                                "--staleness-lr", "--epochs", "4", "--no-progress"])) > 0.85


def _train_and_kill(rank: int, epochs: int, timeout: float) -> tuple[int, str, float]:
    """Async training on 1 server and 2 workers; rank `rank` (the tdc process, not its supervisor)
    is killed just after the first epoch line. (exit status, output, seconds from the kill to the end)."""
    proc = subprocess.Popen([*TDC, "train", "examples/digits.py", "--ranks", "3", "--ps", "1", "--mode", "async",
                             "--epochs", str(epochs), "--no-progress", "--comm-timeout", str(timeout)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.time() + TIMEOUT
        while not any("epoch 1/" in ln for ln in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)
            time.sleep(0.05)
        time.sleep(0.2)
        _kill(rank)
        t_kill = time.time()
        code = proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    time.sleep(0.1)
    return code, "".join(lines), time.time() - t_kill


def _kill(rank: int) -> None:
    for pid in os.listdir("/proc"):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except (OSError, ValueError):
            continue
        if f"PMI_RANK={rank}".encode() in env and b"tdc.cli" in cmd and b"supervisor" not in cmd:
            os.kill(int(pid), signal.SIGKILL)
            return
    raise AssertionError(f"rank {rank} not found")


def test_a_killed_worker_does_not_stop_async_training():
    code, out, _ = _train_and_kill(1, epochs=12, timeout=3)
    assert code == 0, out
    assert "lost worker rank 1" in out and "worker rank 1 was lost" in out
    assert "epoch 12/12" in out and "test accuracy" in out


def test_a_killed_server_ends_the_job_naming_it():
    code, out, after_kill = _train_and_kill(2, epochs=200, timeout=2)
    assert code != 0
    assert "no answer from rank 2" in out, out[-2000:]
    assert after_kill < 30


def test_compressed_data_parallel_training_counts_its_bytes(tmp_path):
    dense, sparse = tmp_path / "dense.jsonl", tmp_path / "sparse.jsonl"
    for path, extra in ((dense, []), (sparse, ["--compress", "dgc:0.001", "--optimizer", "momentum", "--lr", "0.05"])):
        p = tdc_train(["examples/digits.py", "--ranks", "2", "--epochs", "1", "--no-progress", "--bucket-mb", "0",
                       "--metrics", str(path), *extra])
        assert p.returncode == 0, p.stderr[-2000:]
    per_step = lambda f: np.median([json.loads(ln)["bytes_sent"] for ln in f.read_text().splitlines()  # noqa: E731
                                    if '"bytes_sent"' in ln])
    assert per_step(dense) / per_step(sparse) >= 270, (per_step(dense), per_step(sparse))


def test_dgc_trains_near_dense_and_error_feedback_is_what_makes_it(tmp_path):
    """10 epochs on digits, 2 ranks, momentum SGD at lr 0.03, seed 0 (benchmarks/compression.py
    averages 5 seeds: -0.5 points for DGC, -9 without error feedback)."""
    def acc(*extra):
        return _accuracy(tdc_train(["examples/digits.py", "--ranks", "2", "--epochs", "10", "--no-progress",
                                    "--optimizer", "momentum", "--lr", "0.03", *extra]))
    dense, dgc, no_ef = acc(), acc("--compress", "dgc:0.001"), acc("--compress", "dgc:0.001,ef=0")
    assert dgc >= dense - 0.015, (dgc, dense)
    assert no_ef < dgc - 0.03, (no_ef, dgc)


@pytest.mark.parametrize("args,message", [
    (["--ps", "1"], "needs --ranks N with N > 1"),
    (["--ranks", "3", "--ps", "1", "--mode", "async", "--staleness", "2"], "use --mode bounded"),
    (["--ranks", "2", "--mode", "async"], "add --ps S"),
    (["--compress", "topk:0.01"], "needs --ranks N"),
    (["--ranks", "2", "--compress", "dgc:0.01"], "DGC keeps SGD momentum"),
    (["--ranks", "3", "--ps", "1", "--checkpoint", "CK"], "checkpoints of parameter-server training"),
    (["--ranks", "3", "--ps", "1", "--momentum-correction"], "for asynchronous parameter servers"),
    (["--ranks", "2", "--compress", "bits"], "unknown compressor"),
    (["--ranks", "3", "--ps", "1", "--compress", "topk:2x"], "bad argument"),
])
def test_bad_settings_are_one_line_errors(args, message, capsys, tmp_path):
    args = [a if a != "CK" else str(tmp_path / "ck") for a in args]
    assert main(["train", str(EXAMPLES / "digits.py"), "--backend", "reference", "--epochs", "1", *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_native_executables_refuse_staged_steps(tmp_path, capsys):
    assert main(["compile", str(EXAMPLES / "mlp.py"), "--train", "--ranks", "3", "--ps", "1",
                 "-o", str(tmp_path / "b")]) != 0
    assert "staged runtime" in capsys.readouterr().err
