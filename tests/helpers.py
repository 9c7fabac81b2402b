"""Small helpers shared by the op tests: run one op through the reference interpreter,
and independent (loop-based, pure Python) building blocks for expected values."""
from __future__ import annotations

import itertools
import math
import os
import warnings

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from tdc.backends.reference import run, run_ranks
from tdc.ir.graph import Graph
from tdc.ir.types import TensorType

# hypothesis settings every property test uses: no deadline (first runs import numba etc.),
# no example database written into the working tree. TDC_TEST_EXAMPLES_SCALE=20 runs 20x as
# many examples (for a soak run).
_SCALE = float(os.environ.get("TDC_TEST_EXAMPLES_SCALE", "1"))
FAST = settings(max_examples=max(1, int(50 * _SCALE)), deadline=None, database=None)
MEDIUM = settings(max_examples=max(1, int(30 * _SCALE)), deadline=None, database=None)

FLOAT_DTYPES = ("f16", "f32", "f64")
INT_DTYPES = ("i8", "i32", "i64")
NP = {"bool": np.bool_, "i8": np.int8, "i32": np.int32, "i64": np.int64,
      "f16": np.float16, "f32": np.float32, "f64": np.float64}

# relative tolerances for one correctly rounded (or nearly so) operation per element
RTOL = {"f16": 2e-3, "f32": 1e-5, "f64": 1e-6}


def emit_one(op, arrays, attrs, /, placement=None):
    g = Graph("t")
    args = [g.add_arg(f"x{i}", TensorType.of(a), "input") for i, a in enumerate(arrays)]
    outs = g.emit(op, args, attrs, placement=placement)
    return g, args, outs


def run_op(op, arrays, /, strict=True, **attrs):
    """Run one `op` node on `arrays` and return its outputs (a list). Checks that each output's
    dtype and shape are the inferred ones. With strict, numpy warnings (overflow, invalid,
    divide by zero) are errors."""
    arrays = [np.asarray(a) for a in arrays]
    g, args, outs = emit_one(op, arrays, attrs)
    with warnings.catch_warnings():
        if strict:
            warnings.simplefilter("error")
        mode = "raise" if strict else "warn"
        with np.errstate(over=mode, invalid=mode, divide=mode, under="ignore"):
            env = run(g, dict(zip(args, arrays)))
    res = [env[o] for o in outs]
    for o, r in zip(outs, res):
        assert isinstance(r, np.ndarray), type(r)
        assert TensorType.of(r) == o.type, (TensorType.of(r), o.type)
    return res


def infer_op(op, types, **attrs):
    """The inferred output types of `op` on inputs of the given TensorTypes."""
    g = Graph("t")
    args = [g.add_arg(f"x{i}", t, "input") for i, t in enumerate(types)]
    return [o.type for o in g.emit(op, args, attrs)]


def run_op_ranks(op, per_rank_arrays, /, **attrs):
    """Run one op on len(per_rank_arrays) simulated ranks; returns each rank's outputs."""
    first = [np.asarray(a) for a in per_rank_arrays[0]]
    g, args, outs = emit_one(op, first, attrs)
    envs = run_ranks(g, [dict(zip(args, map(np.asarray, arrs))) for arrs in per_rank_arrays])
    return [[env[o] for o in outs] for env in envs]


# ---- independent building blocks ------------------------------------------------------

def all_indices(shape):
    """Every index of `shape` in row-major order, built with itertools (not numpy)."""
    return list(itertools.product(*[range(d) for d in shape]))


def bcast_shape(*shapes):
    """Broadcast result shape, written out dim by dim from the right."""
    rank = max([len(s) for s in shapes] + [0])
    out = []
    for k in range(1, rank + 1):
        d = 1
        for s in shapes:
            if k <= len(s) and s[-k] != 1:
                assert d in (1, s[-k]), shapes
                d = s[-k]
        out.append(d)
    return tuple(reversed(out))


def source_index(out_idx, in_shape):
    """The element of an input of `in_shape` that broadcasting reads for output index out_idx."""
    lead = len(out_idx) - len(in_shape)
    return tuple(0 if d == 1 else out_idx[lead + k] for k, d in enumerate(in_shape))


def from_dict(shape, values: dict, dtype):
    """An array of `shape` filled element by element from {index: value}."""
    out = np.zeros(shape, dtype)
    for idx, v in values.items():
        out[idx] = v
    return out


def wrap_int(v: int, dtype: str) -> int:
    """Two's complement wrap of a Python int to the width of `dtype`."""
    bits = {"i8": 8, "i32": 32, "i64": 64}[dtype]
    return (v + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))


# ---- hypothesis strategies --------------------------------------------------------------

@st.composite
def broadcast_pair(draw, max_rank=4, max_side=4, n=2):
    """`n` shapes that broadcast together: an output shape (rank 0..max_rank, dims 1..max_side),
    and per input a suffix of it with some dims replaced by 1."""
    out = draw(st.lists(st.integers(1, max_side), min_size=0, max_size=max_rank))
    shapes = []
    for _ in range(n):
        k = draw(st.integers(0, len(out)))
        suffix = out[len(out) - k:]
        ones = draw(st.lists(st.booleans(), min_size=len(suffix), max_size=len(suffix)))
        shapes.append(tuple(1 if o else d for d, o in zip(suffix, ones)))
    return tuple(shapes)


def shapes(min_rank=0, max_rank=4, min_side=1, max_side=4):
    return st.lists(st.integers(min_side, max_side), min_size=min_rank, max_size=max_rank).map(tuple)


def array_of(draw, shape, dtype, lo, hi, nonzero=False, min_abs=0.0):
    """An array with elements drawn by hypothesis from [lo, hi] (exactly representable in dtype)."""
    n = int(np.prod(shape)) if shape else 1
    if dtype in INT_DTYPES:
        el = st.integers(int(lo), int(hi))
        if nonzero:
            el = el.filter(lambda v: v != 0)
    elif dtype == "bool":
        el = st.booleans()
    else:
        width = {"f16": 16, "f32": 32, "f64": 64}[dtype]
        lo, hi = float(NP[dtype](lo)), float(NP[dtype](hi))   # bounds representable in dtype
        el = st.floats(lo, hi, width=width, allow_nan=False, allow_infinity=False, allow_subnormal=False)
        if nonzero or min_abs:
            m = max(min_abs, 1e-3)
            el = el.filter(lambda v: abs(v) >= m)
    vals = draw(st.lists(el, min_size=n, max_size=n))
    return np.array(vals, dtype=NP[dtype]).reshape(shape)


def lrn_loop(x, size, alpha=1e-4, beta=0.75, bias=1.0):
    """ONNX's definition, channel by channel, in float64: the window is
    [c - floor((size-1)/2), c + ceil((size-1)/2)], clipped to the channels there are."""
    x = np.asarray(x, np.float64)
    y = np.empty_like(x)
    for c in range(x.shape[1]):
        lo = max(0, c - math.floor((size - 1) / 2))
        hi = min(x.shape[1], c + math.ceil((size - 1) / 2) + 1)
        y[:, c] = x[:, c] / (bias + alpha / size * (x[:, lo:hi] ** 2).sum(axis=1)) ** beta
    return y


# ---- the command line ------------------------------------------------------------------------------

def cli(capsys, *args):
    """Run `tdc args...` in this process: (exit code, stdout, stderr)."""
    from tdc.cli import main
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code, err, text):
    """The command failed with one line, `tdc: error: ...` holding `text`, and no traceback."""
    assert code != 0 and err.count("\n") == 1 and err.startswith("tdc: error: ") and text in err, err
    assert "internal error" not in err
