"""Partitioning a step across ranks (model, pipeline, tensor and spatial parallelism): the ops'
gradients over simulated ranks, the partitioner against brute force and the equal-layer split,
every strategy on the reference's simulated ranks against one process, spatial convolution and
pooling against the unsplit ops, the pipeline schedules (order, memory, measured bubble), and
real MPI jobs: numba and LLVM steps and native executables against one process, and a rank that
dies. Every MPI job runs under the venv's mpiexec with a timeout."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tdc
from tdc import nn
from tdc.cli import main
from tdc.errors import TdcError
from tdc.frontend.init import whole_params
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.ir.weights import read_weights
from tdc.lower.ranks import rank_program
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.passes.autodiff import GRAD_PREFIX, autodiff
from tdc.passes.data_parallel import NETWORKS
from tdc.passes.partition import ChainCosts, Partition, equal_layer_stages, plan_stages, split_stages
from tdc.passes.pipeline import microbatch, unit_order
from tdc.passes.spatial import row_bounds, spatial
from tdc.passes.training import add_loss
from tdc.runtime.gradcheck import gradcheck

from test_data_parallel import kill_rank_1_after_a_checkpoint

HERE = Path(__file__).parent
ROOT = HERE.parent
EXAMPLES = ROOT / "examples"
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
TDC = [sys.executable, "-m", "tdc.cli"]
TIMEOUT = 400          # seconds for any MPI job: a hang fails the test instead of stalling CI
sys.path.insert(0, str(EXAMPLES))
import digits  # noqa: E402
import lenet  # noqa: E402
import mlp  # noqa: E402
import vgg  # noqa: E402

STEPS, LR = 10, 0.01
# float32 bound on the params after 10 momentum steps, relative to 1 + |p|: the partitioned step adds
# the same terms in another order (micro-batch sums, partial dot products, halo-split convolutions)
PARAM_BOUND, LOSS_BOUND = 2e-5, 1e-5


def mpirun(n: int, args: list[str], timeout: float = TIMEOUT, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TDC_THREADS": "1", **(env or {})}
    return subprocess.run([MPIEXEC, "-n", str(n), *args], capture_output=True, text=True, timeout=timeout, env=env)


def last_json(p: subprocess.CompletedProcess):
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b) / (1 + np.abs(b))))


# ---- the ops' gradients over simulated ranks ------------------------------------------------------

def test_gradients_through_transfers_and_collectives_match_finite_differences():
    """A graph placed on 3 ranks by hand: pieces made on each rank, a transfer, a concatenation and
    a sum over the ranks, a param read on every rank (its gradient is summed over them), the loss on
    rank 2. autodiff over the placed graph against central differences, in float64."""
    g = Graph("placed")
    with Builder(g) as b:
        w = b.arg("w", TensorType("f32", (2, 3)), "param")
        v = b.arg("v", TensorType("f32", (3,)), "param")
        pieces = []
        for r in range(3):
            mark = len(g.nodes)
            pieces.append(F.tanh(w * float(r + 1)) + v)
            for n in g.nodes[mark:]:
                n.placement = f"rank:{r}" if n.op not in ("constant", "full") else None
        mark = len(g.nodes)
        cat = F.apply("concat_ranks", *pieces, axis=0)
        total = F.apply("sum_ranks", *pieces)
        for n in g.nodes[mark:]:
            n.placement = "ranks:0..2"
        mark = len(g.nodes)
        moved = F.sum(cat * cat)
        for n in g.nodes[mark:]:
            n.placement = "rank:0"
        moved = F.apply("transfer", moved, src=0, dst=2)
        g.nodes[-1].placement = "ranks:0,2"
        mark = len(g.nodes)
        loss = moved + F.sum(F.exp(total * 0.1))
        for n in g.nodes[mark:]:
            n.placement = "rank:2" if n.op not in ("constant", "full") else None
        g.add_output("loss", loss.value)
    rng = np.random.default_rng(0)
    values = {"w": rng.standard_normal((2, 3)), "v": rng.standard_normal(3)}
    errors = gradcheck(g, values, loss="loss")
    assert set(errors) == {"w", "v"} and max(errors.values()) < 1e-7, errors
    dg = autodiff(g)
    ops = [n.op for n in dg.nodes[len(g.nodes):]]
    assert "transfer" in ops and "sum_ranks" in ops         # the backward pass's own messages


# ---- the partitioner ------------------------------------------------------------------------------

def _chain_graph(n: int) -> Graph:
    g = Graph("chain")
    with Builder(g) as b:
        h = b.arg("x", TensorType("f32", (4, 8)), "input")
        for i in range(n):
            h = F.tanh(h @ b.arg(f"w{i}", TensorType("f32", (8, 8)), "param"))
        g.add_output("y", h.value)
    return g


def _brute(chain: ChainCosts, k: int) -> float:
    n = len(chain.nodes)
    return min(chain.priced([0, *cuts]).cost for cuts in itertools.combinations(range(1, n), k - 1))


@settings(max_examples=40, deadline=None)
@given(costs=st.lists(st.integers(1, 20), min_size=6, max_size=9), k=st.integers(2, 4),
       big=st.integers(0, 8))
def test_stage_split_is_the_optimum_of_brute_force(costs, k, big):
    """Random node costs and one cut made expensive by a large message: the dynamic program's
    slowest stage equals the best over every way to cut the chain."""
    g = _chain_graph(len(costs) // 2 + 1)
    nodes = [n for n in g.nodes][:len(costs)]
    while len(nodes) < len(costs):
        nodes = [n for n in g.nodes]
    nodes = nodes[:len(costs)]
    net = NETWORKS["shm"]
    chain = ChainCosts(nodes, {n: c * 1e-3 for n, c in zip(nodes, costs)}, net, training=True)
    if big < len(nodes):       # a cut that sends 50 MB: 10 ms on shared memory
        chain.bytes[big] += 50_000_000
    got = split_stages(chain, k)
    assert got.cost == pytest.approx(_brute(chain, k), rel=1e-12)
    assert got.cuts[0] == 0 and len(got.cuts) == k and sorted(got.cuts) == got.cuts


def test_partitioner_finds_the_known_best_cut_of_a_hand_made_chain():
    """Costs [3, 3, 3, 1, 1, 1, 1, 1]: two stages are best cut after the second node (6 | 8, the
    slowest 8), not at the middle of the node count (12 | 4) nor after the third (9 | 5); and when
    that cut must send a large activation, the next best cut (9 | 5) wins."""
    g = _chain_graph(4)
    nodes = list(g.nodes)
    assert len(nodes) == 8
    costs = {n: c for n, c in zip(nodes, [3, 3, 3, 1, 1, 1, 1, 1])}
    chain = ChainCosts(nodes, costs, NETWORKS["shm"], training=False)
    chain.bytes = [0] * 9
    assert split_stages(chain, 2).cuts == [0, 2]
    chain.bytes[2] = int(3 * 5e9)          # 3 s on the wire
    assert split_stages(chain, 2).cuts == [0, 3]


@pytest.mark.parametrize("model,batch", [(lenet.lenet, 16), (mlp.mlp, 32), (vgg.vgg, 8)])
@pytest.mark.parametrize("k", [2, 4])
def test_partitioner_is_never_worse_than_the_equal_layer_split(model, batch, k):
    graph = add_loss(model.trace(batch, training=True))
    chosen, naive = plan_stages(graph, Partition("model", k))
    if naive is None:         # the MLP's 3 layers do not go round 4 ranks; the nodes still do
        assert model is mlp.mlp and k == 4 and len(chosen.cuts) == 4
        return
    assert chosen.cost <= naive.cost + 1e-15, (chosen.cuts, naive.cuts)
    assert equal_layer_stages(ChainCosts(chosen.nodes, {}, NETWORKS["shm"], True), k).cuts == naive.cuts


# ---- every strategy on simulated ranks, against one process ---------------------------------------

def _lr(model) -> float:
    # VGG's batchnorm over 4 random images amplifies rounding differences at 0.01 (its loss climbs
    # from 4 to 40 in 10 steps, and any change of summation order grows with it): a calmer step
    return 0.002 if model is vgg.vgg else LR


def _train_reference(model, batch, parallel, steps=STEPS, opt="momentum"):
    """(per-step losses, params as one process holds them) of `steps` steps on the reference."""
    lr = _lr(model)
    step = tdc.train_step(model, optimizer=tdc.Optimizer(opt, lr=lr), batch=batch, parallel=parallel)
    exe = tdc.compile(step, backend="reference", seed=3)
    shape = model.input_types(batch)["x"].shape
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        x = rng.standard_normal(shape).astype(np.float32)
        y = rng.integers(0, 10, batch)
        losses.append(float(exe(x=x, y=y, lr=np.float32(lr))["loss"]))
    state = exe.gather_state() if parallel is not None else exe.state
    return np.array(losses), whole_params(step, state), step


CASES = [(lenet.lenet, 8, "model"), (lenet.lenet, 8, "pipeline"), (lenet.lenet, 8, "tensor"),
         (lenet.lenet, 8, "spatial"), (mlp.mlp, 16, "model"), (mlp.mlp, 16, "pipeline"), (mlp.mlp, 16, "tensor"),
         (vgg.vgg, 4, "tensor"), (vgg.vgg, 4, "spatial"), (vgg.vgg, 4, "model")]


@pytest.mark.parametrize("model,batch,strategy", CASES, ids=[f"{c[0].name}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("k", [2, 4])
def test_every_strategy_on_simulated_ranks_trains_like_one_process(model, batch, strategy, k):
    m = 4 if strategy == "pipeline" else 1
    one_losses, one, _ = _train_reference(model, batch, None)
    losses, got, step = _train_reference(model, batch, Partition(strategy, k, microbatches=m))
    assert np.max(np.abs(losses - one_losses) / (1 + np.abs(one_losses))) < LOSS_BOUND
    assert set(got) == set(one)
    assert max(rel_err(got[p], one[p]) for p in one) < PARAM_BOUND
    ranks = {r for n in step.nodes for r in range(k) if n.placement and f"{r}" in n.placement}
    assert ranks == set(range(k))


def test_a_pipeline_with_batchnorm_equals_its_micro_batched_step_on_one_process():
    """Batchnorm's statistics are per micro-batch in a pipeline (as in GPipe): the oracle is the same
    micro-batched step unpartitioned, whose running statistics pass from micro-batch to micro-batch."""
    cfg = Partition("pipeline", 2, microbatches=2)
    losses, got, _ = _train_reference(vgg.vgg, 4, cfg, steps=4)
    graph = microbatch(vgg.vgg.trace(2, training=True), 2)
    lr = _lr(vgg.vgg)
    one = tdc.compile(tdc.train_step(graph, optimizer=tdc.Optimizer("momentum", lr=lr)), backend="reference", seed=3)
    rng = np.random.default_rng(0)
    for s in range(4):
        x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, 4)
        assert abs(float(one(x=x, y=y, lr=np.float32(lr))["loss"]) - losses[s]) < LOSS_BOUND * (1 + losses[s])
    assert max(rel_err(got[p], one.state[p]) for p in one.state) < PARAM_BOUND
    assert not np.allclose(got["bn1_1.running_mean"], 0)


# ---- spatial partitioning of convolutions and pooling --------------------------------------------

@settings(max_examples=25, deadline=None)
@given(kernel=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), k=st.integers(2, 4),
       extra=st.integers(0, 5), pads=st.tuples(*[st.integers(0, 2)] * 4), dil=st.sampled_from([1, 2]),
       seed=st.integers(0, 1000))
def test_spatial_convolution_matches_the_unsplit_one_forward_and_backward(kernel, stride, k, extra, pads, dil,
                                                                          seed):
    """conv2d, then max pooling, on rows split over k ranks (uneven counts, halos from the
    neighbours): the output and the gradients of the input and the weights equal the unsplit
    graph's to float64 rounding. A conv whose padding would leave a rank nothing but padding
    rows runs whole."""
    span = dil * (kernel - 1) + 1
    h = max(span, (k - 1) * stride + span - pads[0] - pads[2]) + extra
    wd = span + 2
    g = Graph("conv")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f64", (2, 2, h, wd)), "param")
        w = b.arg("w", TensorType("f64", (3, 2, kernel, kernel)), "param")
        y = F.conv2d(x, w, stride=stride, pad=list(pads), dilation=dil)
        assert y.shape[2] >= k
        z = F.maxpool2d(y.relu(), 2, stride=1) if y.shape[2] - 1 >= k else y
        weights = b.constant(np.random.default_rng(seed).standard_normal(z.shape), "f64")
        g.add_output("loss", F.sum(z * weights).value)
    cfg = Partition("spatial", k)
    pooled = z is not y
    try:
        split = spatial(g, cfg)
    except TdcError as e:                       # only the conv, and it cannot be split
        assert not pooled and max(pads[0], pads[2]) >= span and "no convolution" in str(e)
        return
    conv_split = any(n.op == "conv2d" and n.placement == "rank:1" for n in split.nodes)
    # the conv runs whole only when a rank's windows would lie wholly in the padding
    assert conv_split or max(pads[0], pads[2]) >= span
    assert any(n.op == "transfer" for n in split.nodes) == (pooled and conv_split)   # the pooling's halo
    rng = np.random.default_rng(seed)
    values = {"x": rng.standard_normal((2, 2, h, wd)), "w": rng.standard_normal((3, 2, kernel, kernel))}
    ref, par = autodiff(g), autodiff(split)
    from tdc.backends.reference import run, run_placed
    want = run(ref, {a: values[a.name] for a in ref.args})
    got = run_placed(par, {a: values[a.name] for a in par.args})
    for name in ("loss", GRAD_PREFIX + "x", GRAD_PREFIX + "w"):
        np.testing.assert_allclose(got[par.output(name)], want[ref.output(name)], rtol=1e-10, atol=1e-10)


def test_spatial_batchnorm_and_average_pooling_match_the_unsplit_ones():
    g = Graph("bn")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f64", (3, 2, 7, 5)), "param")
        h = nn.batchnorm(nn.conv2d(x, 4, 3, pad=1, name="c"), name="bn") if False else x
        gamma = b.arg("g", TensorType("f64", (2,)), "param")
        beta = b.arg("be", TensorType("f64", (2,)), "param")
        mean = b.arg("m", TensorType("f64", (2,)), "state")
        var = b.arg("v", TensorType("f64", (2,)), "state")
        y, nm, nv = F.batchnorm(h, gamma, beta, mean, var, training=True)
        z = F.avgpool2d(y, 3, stride=2, pad=1)
        g.add_output("loss", F.sum(z * z).value)
        g.add_update(mean.value, nm.value)
        g.add_update(var.value, nv.value)
    rng = np.random.default_rng(1)
    values = {"x": rng.standard_normal((3, 2, 7, 5)), "g": rng.random(2) + 0.5, "be": rng.standard_normal(2),
              "m": np.zeros(2), "v": np.ones(2)}
    from tdc.backends.reference import run, run_placed
    ref, par = autodiff(g), autodiff(spatial(g, Partition("spatial", 3)))
    want = run(ref, {a: values[a.name] for a in ref.args})
    got = run_placed(par, {a: values[a.name] for a in par.args})
    for name in ("loss", GRAD_PREFIX + "x", GRAD_PREFIX + "g", GRAD_PREFIX + "be"):
        np.testing.assert_allclose(got[par.output(name)], want[ref.output(name)], rtol=1e-10, atol=1e-12)
    for (t, v), (_, w) in zip(par.updates, ref.updates):
        np.testing.assert_allclose(got[v], want[w], rtol=1e-12)
    assert row_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_spatial_refuses_a_model_without_convolutions():
    with pytest.raises(TdcError, match="--parallel spatial: mlp has no convolution or pooling"):
        tdc.train_step(mlp.mlp, batch=8, parallel=Partition("spatial", 2))


# ---- pipeline schedules -----------------------------------------------------------------------------

def test_schedules_run_each_stages_units_in_order():
    assert unit_order("gpipe", 0, 2, 3) == [("F", 0), ("F", 1), ("F", 2), ("B", 2), ("B", 1), ("B", 0)]
    assert unit_order("1f1b", 0, 3, 4) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1),
                                           ("B", 2), ("B", 3)]
    assert unit_order("1f1b", 2, 3, 4) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2),
                                           ("F", 3), ("B", 3)]


def _messages(step, rank):
    """Rank `rank`'s sends and receives in its program's order, as ("send"|"recv", tag)."""
    prog = rank_program(step, rank).graph
    return [(n.op, n.attrs["tag"]) for n in prog.nodes if n.op in ("send", "recv")]


def test_the_1f1b_step_sends_and_receives_in_its_schedules_order():
    """Two stages, four micro-batches: stage 0 sends F0 and F1, then takes B0's gradient before it
    sends F2 (1F1B); under GPipe it sends every forward first."""
    for schedule, want in (("1f1b", ["send", "send", "recv", "send", "recv", "send", "recv", "recv"]),
                           ("gpipe", ["send"] * 4 + ["recv"] * 4)):
        step = tdc.train_step(mlp.mlp, batch=16, optimizer=tdc.Optimizer("sgd"),
                              parallel=Partition("pipeline", 2, microbatches=4, schedule=schedule))
        got = [op for op, _ in _messages(step, 0)]
        assert got[:8] == want, (schedule, got)


@pytest.mark.parametrize("k,m", [(2, 2), (2, 4), (2, 8), (4, 4), (4, 8)])
def test_1f1b_holds_fewer_activations_than_gpipe(k, m):
    """The most bytes of forward values each rank holds at once (in its program's order): under
    1F1B stage s holds min(K - s, M) micro-batches' activations, under GPipe all M, so for M >= K
    every stage but the first (which holds K = M of them when M = K) holds less, and the first
    too when M > K."""
    from tdc.lower.ranks import activation_peak
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        step = tdc.train_step(lenet.lenet, batch=8 * m, optimizer=tdc.Optimizer("sgd"),
                              parallel=Partition("pipeline", k, microbatches=m, schedule=schedule))
        peaks[schedule] = [activation_peak(step, r) for r in range(k)]
    assert all(a < b for a, b in zip(peaks["1f1b"][1:], peaks["gpipe"][1:])), peaks
    assert peaks["1f1b"][0] < peaks["gpipe"][0] if m > k else peaks["1f1b"][0] <= peaks["gpipe"][0], peaks
    assert sum(peaks["1f1b"]) < sum(peaks["gpipe"])


@tdc.model(batch=256)
def chain(x: tdc.f32["B", 128]):
    h = x
    for i in range(8):
        h = nn.linear(h, 128, name=f"fc{i}").tanh()
    return nn.linear(h, 10, name="out")


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_bubble_of_the_compiled_schedule_is_the_theorys(k, schedule):
    """Every rank's program of a pipeline of equal stages, run on a model of the machine (each
    node its roofline time, messages alpha + n beta: lower/ranks.simulate): the time the ranks
    wait is within 10 points of (K-1)/(M+K-1) for M = 1, 4, 8. (benchmarks/partition.py measures
    it on real ranks; a timing in a test would measure the other tests running beside it.)"""
    from tdc.lower.ranks import simulate
    for m in (1, 4, 8):
        step = tdc.train_step(chain, optimizer=tdc.Optimizer("sgd"), batch=256,
                              parallel=Partition("pipeline", k, microbatches=m, schedule=schedule))
        t = simulate(step, (5e10, 1e10), NETWORKS["shm"])
        assert abs(t.bubble - (k - 1) / (m + k - 1)) < 0.10, (m, t.bubble)


# ---- rank programs, errors and the command line ---------------------------------------------------

def test_each_rank_holds_only_its_own_params_and_state():
    step = tdc.train_step(lenet.lenet, batch=8, optimizer=tdc.Optimizer("adam"), parallel=Partition("model", 2))
    held = [{a.name for a in rank_program(step, r).graph.args if a.kind != "input"} for r in range(2)]
    params = {p.name for p in step.params}
    assert held[0] & held[1] <= {"step"}
    assert (held[0] | held[1]) >= params
    assert "y" not in {a.name for a in rank_program(step, 0).graph.inputs}


@pytest.mark.parametrize("args,message", [
    (["--ranks", "1", "--parallel", "model"], "--parallel model splits the step over ranks: add --ranks N"),
    (["--ranks", "2", "--microbatches", "4"], "--microbatches splits a pipeline's batch: add --parallel pipeline"),
    (["--ranks", "2", "--parallel", "tensor", "--microbatches", "2"], "use it with --parallel pipeline"),
    (["--ranks", "2", "--parallel", "model", "--sync-bn"], "--sync-bn is a setting of data parallelism"),
    (["--ranks", "2", "--parallel", "pipeline", "--microbatches", "3", "--batch", "16"],
     "a batch of 16 does not split into 3 micro-batches"),
])
def test_partition_settings_mistakes_are_one_line(capsys, args, message):
    assert main(["dump", str(EXAMPLES / "lenet.py"), "--train", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_dump_shows_the_partition_each_ranks_program_and_memory(capsys):
    lenet_py = str(EXAMPLES / "lenet.py")
    assert main(["dump", lenet_py, "--train", "--ranks", "2", "--parallel", "pipeline", "--microbatches", "4",
                 "--partition"]) == 0
    out = capsys.readouterr().out
    assert "chosen" in out and "equal" in out and "balance" in out and "(K-1)/(M+K-1) = 0.200" in out
    assert main(["dump", lenet_py, "--train", "--ranks", "2", "--parallel", "model", "--rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "recv(" in out and "send(" in out and "conv1.weight" not in out
    assert main(["dump", lenet_py, "--train", "--ranks", "2", "--parallel", "spatial", "--memory"]) == 0
    out = capsys.readouterr().out
    assert out.count("// ----- rank ") == 2 and "what each rank holds" in out
    assert main(["dump", lenet_py, "--train", "--ranks", "2", "--parallel", "tensor"]) == 0
    out = capsys.readouterr().out
    assert "concat_ranks(" in out or "sum_ranks(" in out
    assert '"fc1.weight[0:60]"' in out and "@rank:1" in out


def test_the_placed_step_round_trips_through_ir_text():
    from tdc.ir.parser import parse_graph as parse
    from tdc.ir.printer import print_graph
    for strategy in ("pipeline", "tensor", "spatial"):
        step = tdc.train_step(lenet.lenet, batch=8, optimizer=tdc.Optimizer("adam"),
                              parallel=Partition(strategy, 2, microbatches=2 if strategy == "pipeline" else 1))
        text = print_graph(step)
        assert print_graph(parse(text)) == text


# ---- real MPI jobs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [2, 4])
def test_llvm_steps_on_k_ranks_train_like_one_process(ranks):
    """10 steps of every strategy on K ranks of the LLVM backend against one reference process:
    losses and params within the float32 bounds; the reference's simulated ranks too. 4 ranks
    oversubscribe the 2 cores."""
    specs = ["llvm:lenet:model", "llvm:lenet:pipeline", "llvm:lenet:pipeline:gpipe", "llvm:mlp:tensor",
             "llvm:lenet:spatial"]
    report = last_json(mpirun(ranks, [sys.executable, str(HERE / "mpi" / "partition_step.py"), *specs]))
    assert [r["spec"] for r in report] == specs
    for r in report:
        assert r["loss_err"] < LOSS_BOUND and r["param_err"] < PARAM_BOUND, r
        assert r["sim_loss_err"] < LOSS_BOUND and r["sim_param_err"] < PARAM_BOUND, r
        assert r["bytes_sent"] > 0


def test_numba_steps_on_two_ranks_train_like_one_process():
    """As above on the numba backend (mpi4py): the small model of partition_step.py as a pipeline of
    2 micro-batches (sends and receives). The numba backend compiles each rank's program for up to
    a minute cold, so model, tensor and spatial parallelism (whose halo exchanges are the same
    mpi4py sends and receives) are checked on LLVM above and natively only."""
    specs = ["numba:tiny:pipeline:m=2"]
    report = last_json(mpirun(2, [sys.executable, str(HERE / "mpi" / "partition_step.py"), *specs]))
    for r in report:
        assert r["loss_err"] < LOSS_BOUND and r["param_err"] < PARAM_BOUND, r


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pdata")
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((160, 1, 8, 8)).astype(np.float32))
    np.save(d / "y.npy", rng.integers(0, 10, 160))
    return d


@pytest.mark.parametrize("strategy", ["model", "pipeline", "tensor", "spatial"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_native_executables_train_on_k_ranks_like_one_process(train_data, tmp_path, strategy, ranks):
    """The digits CNN's SGD step compiled for K ranks (one executable, each rank running its part)
    trains 10 steps like the reference's single process; rank 0 saves every rank's weights."""
    d = train_data
    assert main(["compile", str(EXAMPLES / "digits.py"), "--train", "--batch", "16", "--optimizer", "sgd",
                 "--ranks", str(ranks), "--parallel", strategy, "-o", str(tmp_path / "b")]) == 0
    p = mpirun(ranks, [str(tmp_path / "b" / "model"), "--input", f"x={d / 'x.npy'}", "--input", f"y={d / 'y.npy'}",
                       "--input", "lr=0.05", "--steps", "10", "--print-every", "10", "--save", str(tmp_path / "w")])
    assert p.returncode == 0, p.stderr
    assert "partitioned over" in p.stdout and p.stdout.count("step 10/10") == 1
    step = tdc.train_step(digits.digits, optimizer=tdc.Optimizer("sgd", lr=0.05), batch=16)
    one = tdc.compile(step, backend="reference")
    x, y = np.load(d / "x.npy"), np.load(d / "y.npy")
    for s in range(10):
        loss = one(x=x[s * 16:(s + 1) * 16], y=y[s * 16:(s + 1) * 16], lr=np.float32(0.05))["loss"]
    assert f"loss={float(loss):.4f}" in p.stdout
    got = whole_params(tdc.train_step(digits.digits, optimizer=tdc.Optimizer("sgd"), batch=16,
                                      parallel=Partition(strategy, ranks, microbatches=2 * ranks if
                                                         strategy == "pipeline" else 1)),
                       dict(read_weights(str(tmp_path / "w"))))
    for k, v in one.state.items():
        assert rel_err(got[k], v) < PARAM_BOUND, k


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_pipeline_rank_that_dies_or_stops_ends_the_job_with_its_name_and_resume_finishes(tmp_path, how):
    """As for data parallelism: rank 1 of a pipeline killed (hydra ends the job) or stopped (rank 0
    stops waiting for its messages after --comm-timeout): one line naming rank 1, a whole
    checkpoint (gathered from both ranks), and --resume finishes the run."""
    ck = tmp_path / "ck"
    args = [str(EXAMPLES / "digits.py"), "--backend", "llvm", "--ranks", "2", "--parallel", "pipeline",
            "--epochs", "400", "--batch", "32", "--checkpoint", str(ck), "--checkpoint-every", "5",
            "--comm-timeout", "3", "--no-progress"]
    line, ended = kill_rank_1_after_a_checkpoint(args, ck, how)
    if how == "SIGKILL":
        assert "rank 1 (pid" in line and ended < 10, (line, ended)
    else:
        assert "no answer from rank 1" in line and ended < 3 + 2 + 10, (line, ended)
    ckpt = np.load(ck / "last.npz")
    assert any(k.endswith("fc2.weight") for k in ckpt.files) and any(k.endswith("conv1.weight") for k in ckpt.files)
    resume = [a if a != "400" else "2" for a in args] + ["--resume"]
    done = subprocess.run(TDC + ["train", *resume], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout and "after 2 epochs" in done.stdout, done.stdout
