"""Pass infrastructure, DCE and CSE, weights files."""
import os

import numpy as np
import pytest

import tdc
from tdc.errors import TdcError
from tdc.ops import functional as F
from tdc.ops.tensor import Builder
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType
from tdc.passes.manager import PassContext, Pipeline, get_pass
from tdc.ir.weights import load_weights, save_weights


def _graph_with_waste():
    g = Graph("w")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (3,)), "input")
        a = F.exp(x) + 1.0
        a2 = F.exp(x) + 1.0            # same as a: CSE merges
        F.tanh(x)                      # unused: DCE removes
        g.add_output("out", (a * a2).value)
    return g


def test_cse_then_dce_removes_duplicates_and_dead_code_and_keeps_results():
    g = _graph_with_waste()
    x = np.array([0.1, -2.0, 3.0], np.float32)
    before = tdc.compile(g)(x=x)["out"]
    p = Pipeline.parse("pipeline(cse,dce)")
    assert str(p) == "pipeline(cse,dce)"
    h = p.run(g)
    assert h.op_counts() == {"exp": 1, "constant": 1, "add": 1, "mul": 1}
    np.testing.assert_array_equal(tdc.compile(h)(x=x)["out"], before)
    assert g.op_counts()["exp"] == 2, "passes must not mutate their input"


def test_dce_keeps_side_effects_and_updates():
    g = Graph("s")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (3,)), "input")
        s = b.arg("s", TensorType("f32", (3,)), "state")
        F.send(x * 2.0, dst=1)
        g.add_update(s.value, (s + x).value)
    h = get_pass("dce")(g)
    assert h.op_counts() == {"constant": 1, "mul": 1, "send": 1, "add": 1}


def test_context_times_dumps_and_verifies():
    dumped = []
    ctx = PassContext(dump_after={"dce"}, dump=lambda name, g: dumped.append((name, str(g))))
    Pipeline.parse("cse,dce").run(_graph_with_waste(), ctx)
    assert [n for n, _ in ctx.timings] == ["cse", "dce"]
    assert len(dumped) == 1 and dumped[0][0] == "dce" and "exp" in dumped[0][1]

    def breaker(g):
        g = g.copy()
        g.nodes = g.nodes[::-1]   # uses before definitions
        return g
    from tdc.passes.manager import Pass
    with pytest.raises(TdcError, match="after pass breaker"):
        Pipeline([Pass("breaker", breaker)]).run(_graph_with_waste(), PassContext(verify=True))


def test_unknown_pass_lists_the_known_ones():
    with pytest.raises(TdcError, match="unknown pass .nosuchpass.*cse"):
        Pipeline.parse("cse,nosuchpass")


def _params_graph():
    g = Graph("p")
    with Builder(g) as b:
        x = b.arg("x", TensorType("f32", (2, 3)), "input")
        w = b.param("fc.weight", (4, 3), "he_normal")
        g.add_output("out", F.linear(x, w).value)
    return g


def test_weights_round_trip_and_mismatches(tmp_path):
    g = _params_graph()
    path = str(tmp_path / "w.npz")
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    save_weights(path, {"fc.weight": w})
    np.testing.assert_array_equal(load_weights(path, g)["fc.weight"], w)
    save_weights(path, {"other": w})
    with pytest.raises(TdcError, match="no value for param fc.weight"):
        load_weights(path, g)
    save_weights(path, {"fc.weight": w.T.copy()})
    with pytest.raises(TdcError, match=r"fc.weight has shape \[3, 4\], the model needs \[4, 3\]"):
        load_weights(path, g)
    save_weights(path, {"fc.weight": w.astype(np.float64)})
    with pytest.raises(TdcError, match="fc.weight has dtype float64, the model needs f32"):
        load_weights(path, g)


def test_corrupt_weights_file_is_a_clear_error_and_failed_write_keeps_old_file(tmp_path, monkeypatch):
    g = _params_graph()
    path = str(tmp_path / "w.npz")
    good = {"fc.weight": np.ones((4, 3), np.float32)}
    save_weights(path, good)
    data = open(path, "rb").read()
    bad = str(tmp_path / "bad.npz")
    open(bad, "wb").write(data[: len(data) // 2])
    with pytest.raises(TdcError, match="not a readable .npz"):
        load_weights(bad, g)

    def exploding_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", exploding_savez)
    with pytest.raises(OSError):
        save_weights(path, {"fc.weight": np.zeros((4, 3), np.float32)})
    monkeypatch.undo()
    np.testing.assert_array_equal(load_weights(path, g)["fc.weight"], good["fc.weight"])
    assert sorted(os.listdir(tmp_path)) == ["bad.npz", "w.npz"], "temp files must be cleaned up"
