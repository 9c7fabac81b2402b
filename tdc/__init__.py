"""tdc: a compiler for a tensor dataflow DSL.

    import tdc
    from tdc import nn

    @tdc.model(batch=128)
    def mlp(x: tdc.f32["B", 784]):
        return nn.linear(nn.linear(x, 300).relu(), 10)

    g = mlp.trace()                       # a typed SSA graph
    print(g)                              # its text IR
    exe = tdc.compile(g, backend="reference")
    out = exe(x=images)["out"]
"""
__version__ = "0.1.0"

from .errors import IRParseError, ShapeError, TdcError, VerifyError  # noqa: E402,F401
from .ir.graph import Graph, Node, Value  # noqa: E402,F401
from .ir.types import TensorType  # noqa: E402,F401
from . import ops  # noqa: E402,F401  (defines every op)
from .frontend.model import DTYPE_SPECS, Model, model  # noqa: E402,F401
from .ops.tensor import Builder, Tensor  # noqa: E402,F401
from .ops import functional  # noqa: E402,F401
from .frontend import nn  # noqa: E402,F401
from .ops.functional import *  # noqa: E402,F401,F403  (the DSL's ops: tdc.relu, tdc.conv2d, ...)
from .backends import compile  # noqa: E402,F401

f32, f64, f16 = DTYPE_SPECS["f32"], DTYPE_SPECS["f64"], DTYPE_SPECS["f16"]
i8, i32, i64, bool_ = DTYPE_SPECS["i8"], DTYPE_SPECS["i32"], DTYPE_SPECS["i64"], DTYPE_SPECS["bool"]
u8, i16, u16, u32, u64 = (DTYPE_SPECS[n] for n in ("u8", "i16", "u16", "u32", "u64"))
bf16 = DTYPE_SPECS["bf16"]
from .passes.optimizer import Optimizer  # noqa: E402,F401
from .passes.training import train_step  # noqa: E402,F401
