"""`tdc export --dynamic-batch`: ONNX files whose batch dim is symbolic run at any batch size in
onnxruntime, and match tdc's reference traced at that batch."""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import tdc
import tdc.onnx
from tdc.cli import main
from tdc.errors import TdcError
from tdc.frontend.init import init_params

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)


@pytest.mark.parametrize("name", ["lenet", "vgg"])   # a flatten's reshape; batchnorm and pooling
def test_exported_file_runs_at_any_batch(tmp_path, capsys, name):
    path = tmp_path / f"{name}.onnx"
    assert main(["export", os.path.join(EXAMPLES, f"{name}.py"), "--batch", "2", "--seed", "3", "--dynamic-batch",
                 "-o", str(path)]) == 0
    assert "any batch" in capsys.readouterr().out
    proto = onnx.load(path)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = getattr(__import__(name), name)
    for batch in (1, 5):
        g = model.trace(batch=batch)
        x = np.random.default_rng(batch).standard_normal(g.inputs[0].type.shape).astype(np.float32)
        want = tdc.compile(g, backend="reference", params=init_params(g, 3))(**{g.inputs[0].name: x})
        got = sess.run(None, {g.inputs[0].name: x})[0]
        name_out = g.outputs[0][0]
        np.testing.assert_allclose(got, want[name_out], rtol=1e-4, atol=1e-5)
    # and tdc imports it back at a batch of its choosing
    assert tdc.onnx.load(path, batch=3).graph.inputs[0].type.shape[0] == 3


def test_a_shape_that_fixes_the_batch_is_refused(tmp_path, capsys):
    @tdc.model(batch=4)
    def mixes(x: tdc.f32["B", 6]):
        return x.reshape((2, 12))        # the batch folded into a fixed shape
    with pytest.raises(TdcError, match=r"reshape .*to \[2, 12\] mixes the batch dim \(4\) into a fixed shape"):
        tdc.onnx.save(mixes.trace(batch=4), tmp_path / "m.onnx", dynamic_batch=True)
    assert not (tmp_path / "m.onnx").exists()
    tdc.onnx.save(mixes.trace(batch=4), tmp_path / "m.onnx")     # a static batch is fine
    assert main(["export", os.path.join(EXAMPLES, "mlp.py"), "-o", str(tmp_path)]) == 1   # a directory
    assert "tdc: error:" in capsys.readouterr().err
