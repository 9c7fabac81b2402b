"""Memory planning: liveness over kernels, arena offsets, in-place writes, and the memory report.

Besides MemoryPlan.verify (which recomputes liveness on its own), `simulate` runs a graph with
every buffered value stored only where the plan puts it, so a value overwritten too early
shows up as a wrong result against the reference interpreter."""
import dataclasses
import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tdc
from tdc.backends.reference import run
from tdc.ir.graph import Graph
from tdc.passes.fuse import fuse, is_literal
from tdc.ir.types import TensorType
from tdc.lower.memplan import (ALIGN, MemoryPlanError, align, layer_table, memory_report,
                                plan_memory, split_kernels)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from lenet import lenet  # noqa: E402
from mlp import mlp  # noqa: E402
from vgg import vgg  # noqa: E402

F32x4 = TensorType("f32", (4,))


def set_groups(graph: Graph, groups: list) -> None:
    """Give graph.nodes[i] the kernel name groups[i] (None: a kernel of its own), as fusion does."""
    for n, group in zip(graph.nodes, groups):
        n.group = group


def simulate(graph: Graph, plan, feeds: dict) -> tuple[dict, dict]:
    """Run `graph` kernel by kernel keeping each buffered value only at its planned place (arena
    offset or arg storage); values without a buffer live only inside their kernel, literals are
    made once. A kernel reads its inputs before writing its outputs, as a fused loop does
    element by element. Returns (outputs by name, final arg storage by arg)."""
    arena = np.full(plan.arena_bytes, 0xAB, np.uint8)   # garbage, so a read of an unwritten slot shows
    storage = {a: np.array(feeds[a]) for a in graph.args}
    literals = {n.outputs[0]: n.opdef.ref(**n.attrs) for n in graph.nodes if is_literal(n)}

    def load(v):
        if v.is_arg:
            return storage[v].copy()
        if v in literals:
            return literals[v].copy()
        buf = plan.assignments[v]
        if not buf.in_arena:
            return storage[buf.inplace_of].copy()
        raw = arena[buf.offset:buf.offset + buf.nbytes].tobytes()
        return np.frombuffer(raw, v.type.np_dtype).reshape(v.type.shape).copy()

    def store(v, x):
        buf = plan.assignments[v]
        if not buf.in_arena:
            storage[buf.inplace_of] = np.array(x)
        else:
            arena[buf.offset:buf.offset + buf.nbytes] = np.frombuffer(np.ascontiguousarray(x).tobytes(), np.uint8)

    with np.errstate(all="ignore"):
        for nodes in plan.kernels:
            produced = {o for n in nodes for o in n.outputs}
            env = {v: load(v) for n in nodes for v in n.inputs if v not in produced}
            for n in nodes:
                out = n.opdef.ref(*[env[v] for v in n.inputs], **n.attrs)
                for v, x in zip(n.outputs, out if isinstance(out, tuple) else (out,)):
                    env[v] = np.asarray(x)
            for v in produced:
                if v in plan.assignments:
                    store(v, env[v])
        outputs = {name: load(v) for name, v in graph.outputs}
        new = {t: load(v) for t, v in graph.updates}
    storage.update(new)
    return outputs, storage


def check_against_reference(graph: Graph, plan, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    feeds = {}
    for a in graph.args:
        if a.type.dtype.startswith("f"):
            feeds[a] = rng.standard_normal(a.type.shape).astype(a.type.np_dtype)
        else:
            feeds[a] = rng.integers(0, 10, a.type.shape).astype(a.type.np_dtype)
    with np.errstate(all="ignore"):
        env = run(graph, dict(feeds))
    outputs, storage = simulate(graph, plan, feeds)
    for name, v in graph.outputs:
        np.testing.assert_array_equal(outputs[name], env[v], err_msg=f"output {name}")
    updated = {t: v for t, v in graph.updates}
    for a in graph.args:
        want = env[updated[a]] if a in updated else feeds[a]
        np.testing.assert_array_equal(storage[a], want, err_msg=f"arg {a.name}")


def overlaps(b1, b2) -> bool:
    return b1.offset < b2.offset + b2.nbytes and b2.offset < b1.offset + b1.nbytes


def check_outputs_never_reused(graph: Graph, plan) -> None:
    """Outputs share no bytes with each other or with any value made after them."""
    outs = {v for _, v in graph.outputs if v in plan.intervals}   # not args or literals
    for o in outs:
        bo = plan.assignments[o]
        assert bo.in_arena and plan.intervals[o][1] == plan.end
        for v, b in plan.assignments.items():
            if v is o or not b.in_arena or not b.nbytes:
                continue
            if v in outs or plan.intervals[v][0] > plan.intervals[o][0]:
                assert not overlaps(bo, b), (o, v)


def check_plan(graph: Graph):
    plan = plan_memory(graph)
    plan.verify(graph)
    assert plan.arena_bytes <= plan.unplanned_bytes
    assert all(b.offset % ALIGN == 0 for b in plan.assignments.values() if b.in_arena)
    check_outputs_never_reused(graph, plan)
    return plan


def unary_chain(ops, n=1000):
    """x -> ops[0] -> ops[1] -> ... -> output `out`."""
    g = Graph("chain")
    v = g.add_arg("x", TensorType("f32", (n,)), "input")
    for op in ops:
        (v,) = g.emit(op, [v])
    g.add_output("out", v)
    return g


# ---- the example models ----------------------------------------------------------------------

@pytest.mark.parametrize("model,batch", [(mlp, 16), (lenet, 64), (vgg, 8)], ids=["mlp", "lenet", "vgg"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_step_plans_verify(model, batch, optimizer):
    g = tdc.train_step(model, batch=batch, optimizer=tdc.Optimizer(optimizer))
    plan = check_plan(g)
    assert plan.arena_bytes < plan.unplanned_bytes
    # every optimizer update of a param (and its slots) goes straight into the arg's storage
    state_of_params = {f"{p.name}.{s}" for p in g.params for s in ("m", "v", "velocity", "cache")}
    for target, v in g.updates:
        if target.kind == "param" or target.name in state_of_params:
            buf = plan.assignments[v]
            assert buf.inplace_of is target and not buf.in_arena, target.name


@pytest.mark.parametrize("model,batch", [(mlp, 16), (lenet, 64), (vgg, 8)], ids=["mlp", "lenet", "vgg"])
def test_inference_plans_verify(model, batch):
    check_plan(model.trace(batch))


def test_lenet_training_step_planning_saves_memory_and_runs_correctly():
    g = tdc.train_step(lenet, batch=64)
    plan = check_plan(g)
    # measured: the arena is 50% of the unplanned sum (4.49 MB of 8.90 MB)
    assert plan.arena_bytes < 0.6 * plan.unplanned_bytes
    small = tdc.train_step(lenet, batch=2, optimizer=tdc.Optimizer("adam"))
    check_against_reference(small, check_plan(small))


@pytest.mark.parametrize("model,batch,optimizer", [(lenet, 2, "momentum"), (vgg, 2, "adam"), (mlp, 4, "sgd")],
                         ids=["lenet", "vgg", "mlp"])
def test_fused_training_steps_plan_verify_and_run_correctly(model, batch, optimizer):
    g = fuse(tdc.train_step(model, batch=batch, optimizer=tdc.Optimizer(optimizer)))
    plan = check_plan(g)
    assert len(plan.kernels) < len(g.nodes)
    assert not any(is_literal(n) for k in plan.kernels for n in k)
    internal = [v for k in plan.kernels for n in k for v in n.outputs if v not in plan.assignments]
    assert internal, "values made and used inside one kernel need no buffer"
    assert all(v not in plan.assignments for n in g.nodes if is_literal(n) for v in n.outputs)
    check_against_reference(g, plan)


# ---- liveness ----------------------------------------------------------------------------

def _late_reader_graph():
    """a is made first and read again only by the last node, after a chain of other values."""
    g = Graph("late")
    x = g.add_arg("x", TensorType("f32", (1000,)), "input")
    (a,) = g.emit("exp", [x])
    (v,) = g.emit("tanh", [x])
    chain = [v]
    for op in ("neg", "exp", "relu", "sigmoid", "abs"):
        (v,) = g.emit(op, [v])
        chain.append(v)
    (out,) = g.emit("add", [a, v])
    g.add_output("out", out)
    return g, a, chain


def test_a_value_read_by_a_late_node_stays_allocated():
    g, a, chain = _late_reader_graph()
    plan = check_plan(g)
    last = len(g.nodes) - 1
    assert plan.intervals[a] == (0, last)
    assert all(s <= last for s, _ in plan.intervals.values())
    for v in chain:
        assert not overlaps(plan.assignments[a], plan.assignments[v]), v
    assert a in plan.live_at(last - 1) and a in plan.live_at(last)
    assert a not in plan.live_at(plan.end)
    check_against_reference(g, plan)


def test_liveness_with_kernels():
    g, a, chain = _late_reader_graph()
    set_groups(g, ["k0"] * (len(g.nodes) - 1) + [None])   # everything but the final add is one kernel
    plan = check_plan(g)
    assert [len(k) for k in plan.kernels] == [len(g.nodes) - 1, 1]
    assert plan.intervals[a] == (0, 1) and plan.intervals[chain[-1]] == (0, 1)
    assert all(v not in plan.assignments for v in chain[:-1])
    check_against_reference(g, plan)


def test_verify_catches_broken_plans():
    g, a, chain = _late_reader_graph()
    plan = plan_memory(g)
    plan.verify(g)
    # an interval cut short: a would be free for reuse before its last reader
    short = dataclasses.replace(plan, intervals={**plan.intervals, a: (0, 0)})
    with pytest.raises(MemoryPlanError, match="live in kernels 0..7"):
        short.verify(g)
    # a value put on top of another one that is still live
    clash = dict(plan.assignments)
    clash[chain[2]] = dataclasses.replace(clash[chain[2]], offset=clash[a].offset, inplace_of=None)
    with pytest.raises(MemoryPlanError, match="share bytes"):
        dataclasses.replace(plan, assignments=clash).verify(g)
    with pytest.raises(MemoryPlanError, match="has none"):
        dataclasses.replace(plan, assignments={v: b for v, b in plan.assignments.items() if v is not a}).verify(g)


def test_kernels_are_runs_of_one_group():
    g = unary_chain(["relu"] * 6)
    set_groups(g, ["a", "a", None, "b", "a", "a"])
    assert [len(k) for k in split_kernels(g)] == [2, 1, 1, 2]


# ---- in-place writes ---------------------------------------------------------------------

def test_elementwise_chain_reuses_one_buffer():
    g = unary_chain(["relu", "neg", "exp", "tanh"])
    plan = check_plan(g)
    vals = [n.output for n in g.nodes]
    assert plan.assignments[vals[0]].inplace_of is None   # x is an input: its storage is not the arena's
    for prev, v in zip(vals, vals[1:]):
        assert plan.assignments[v].inplace_of is prev
    assert plan.arena_bytes == align(4000)
    check_against_reference(g, plan)


def test_non_elementwise_ops_do_not_overwrite_their_input():
    g = unary_chain(["relu", "softmax", "relu"])
    plan = check_plan(g)
    r, s, out = (n.output for n in g.nodes)
    assert plan.assignments[s].inplace_of is None
    assert plan.assignments[out].inplace_of is s
    assert plan.arena_bytes == 2 * align(4000)


def _update_graph(rule, extra_read=False, return_p=False):
    g = Graph("upd")
    x = g.add_arg("x", TensorType("f32", (4, 4)), "input")
    p = g.add_arg("p", TensorType("f32", (4, 4)), "param")
    (e,) = g.emit("exp", [x])
    (new,) = g.emit(rule, [p, e] if rule != "matmul" else [p, p])
    g.add_update(p, new)
    (out,) = g.emit("mul", [e, p if extra_read else e])
    g.add_output("out", out)
    if return_p:
        g.add_output("p_old", p)
    return g, p, new


@pytest.mark.parametrize("rule,extra_read,return_p,inplace", [
    ("sub", False, False, True),       # p - e: the old p dies in the kernel that makes the new one
    ("sub", True, False, False),       # the old p is read by a later kernel
    ("sub", False, True, False),       # the old p is an output of the step
    ("matmul", False, False, False),   # p @ p reads all of p for each element of the new p
])
def test_update_in_place_only_when_the_old_value_is_dead(rule, extra_read, return_p, inplace):
    g, p, new = _update_graph(rule, extra_read, return_p)
    plan = check_plan(g)
    buf = plan.assignments[new]
    assert (buf.inplace_of is p and not buf.in_arena) == inplace
    check_against_reference(g, plan)


# ---- random graphs -----------------------------------------------------------------------

UNARY = ("relu", "neg", "exp", "tanh", "abs", "softmax")   # softmax: same shape, not elementwise
BINARY = ("add", "sub", "mul", "maximum")


@st.composite
def random_graphs(draw):
    g = Graph("rand")
    big = [g.add_arg("x", F32x4, "input"), g.add_arg("w", F32x4, "param"), g.add_arg("s", F32x4, "state")]
    small = [g.add_arg("c", TensorType("f32", ()), "input")]
    args = list(big)
    groups, k = [], 0
    for _ in range(draw(st.integers(1, 12))):
        op = draw(st.sampled_from(UNARY + BINARY + ("reduce_sum", "full")))
        a = draw(st.sampled_from(big))
        if op == "full":   # a literal: inlined into the kernels that read it
            (v,) = g.emit(op, [], {"shape": [4], "value": 1.5})
        elif op in BINARY:
            (v,) = g.emit(op, [a, draw(st.sampled_from(big + small))])
        elif op == "reduce_sum":
            (v,) = g.emit(op, [a], {"axes": [0], "keepdims": True})
        else:
            (v,) = g.emit(op, [a])
        (big if v.type == F32x4 else small).append(v)
        how = draw(st.sampled_from(("alone", "join", "new")))
        k += how == "new"
        groups.append(None if how == "alone" else f"k{k}")
    made = [v for n in g.nodes for v in n.outputs]
    for i, v in enumerate(draw(st.lists(st.sampled_from(made + args), min_size=1, max_size=4))):
        g.add_output(f"o{i}", v)
    for target in (big[1], big[2]):
        choice = draw(st.sampled_from([None] + [v for v in made + args if v.type == F32x4]))
        if choice is not None:
            g.add_update(target, choice)
    set_groups(g, groups)
    return g


@settings(max_examples=60, deadline=None, database=None)
@given(random_graphs(), st.integers(0, 2**16))
def test_random_graphs_plan_verify_and_run_correctly(g, seed):
    plan = check_plan(g)
    check_against_reference(g, plan, seed)


# ---- the memory report -------------------------------------------------------------------

LENET_WEIGHTS = {"conv1": 6 * 1 * 5 * 5 + 6, "conv2": 16 * 6 * 5 * 5 + 16, "fc1": 120 * 400 + 120,
                 "fc2": 84 * 120 + 84, "fc3": 10 * 84 + 10}


def test_lenet_report_has_every_layer_with_its_weights():
    g = tdc.train_step(lenet, batch=64, optimizer=tdc.Optimizer("adam"))
    rows, training = layer_table(g)
    assert training
    by_name = {r.name: r for r in rows}
    for name, n in LENET_WEIGHTS.items():
        r = by_name[name]
        assert (r.weight_elems, r.weight_bytes) == (n, 4 * n), name
        assert (r.grad_elems, r.opt_elems) == (n, 2 * n), name   # adam keeps m and v
    conv1_out = 64 * 6 * 28 * 28
    assert by_name["conv1"].shape == (64, 6, 28, 28)
    assert conv1_out <= by_name["conv1"].act_elems <= 2 * conv1_out   # conv and relu outputs
    assert by_name["loss"].shape == () and by_name["loss"].weight_elems == 0
    text = memory_report(g, plan_memory(g))
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for name, n in LENET_WEIGHTS.items():
        assert f"{n:,}" in lines[name].split(), name
    assert "peak before planning" in text and "peak after planning" in text
    total = sum(LENET_WEIGHTS.values())
    assert f"{total:,}" in lines["total"].split()


def test_inference_report_has_no_gradients():
    g = lenet.trace(8)
    rows, training = layer_table(g)
    assert not training
    assert all(r.grad_elems == 0 and r.opt_elems == 0 for r in rows)
    assert {r.name: r.weight_elems for r in rows if r.weight_elems} == LENET_WEIGHTS
    assert "fc3" in memory_report(g)
