"""What every backend's executable shares: checking and binding the caller's arrays, and the
initial values of params, consts and state."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..frontend.init import init_params
from ..ir.graph import Graph, Value, placed_ranks
from ..ops.sparse import check_csr, csr_columns


@dataclass
class KernelTime:
    """One kernel of a profiled executable: its ops, how often it ran, the seconds it took in all,
    and the work of one run (FLOPs by the op registry, bytes of the arrays it reads and writes)."""
    name: str
    ops: list[str]
    calls: int
    seconds: float
    flops: float
    bytes: int


def check_feed(arg: Value, array, what: str) -> np.ndarray:
    """Convert a user-supplied array for `arg`, or raise a one-line error naming it."""
    a = np.asarray(array)
    want = arg.type
    if want.dtype == "bf16" and a.dtype == np.dtype("V2"):
        a = a.view(want.np_dtype)    # what np.load gives for a bfloat16 .npy (saved as '<V2')
    if tuple(a.shape) != want.shape:
        raise TdcError(f"{what} {arg.name}: expected shape {list(want.shape)} ({want}), got {list(a.shape)}")
    if a.dtype != want.np_dtype:
        got = a.dtype
        # Python-made data (int64 labels, float64 images) is converted when no value changes.
        if np.can_cast(got, want.np_dtype, casting="same_kind") or (got.kind in "iu" and want.np_dtype.kind in "iu"):
            conv = a.astype(want.np_dtype)
            if got.kind in "iub" and not np.array_equal(conv.astype(got), a):
                raise TdcError(f"{what} {arg.name}: values do not fit {want.dtype}")
            return conv
        raise TdcError(f"{what} {arg.name}: expected dtype {want.dtype} ({want}), got {got}")
    return a


def copy_inputs(slots: list, given: dict) -> None:
    """Copy each given input into its buffer (slots: (arg, array) pairs), after checking that the
    names are the graph's and each value's shape and dtype fit (the compiled backends' calls)."""
    unknown = set(given) - {a.name for a, _ in slots}
    if unknown:
        raise TdcError(f"unknown input {sorted(unknown)[0]!r}; the graph takes: "
                       + ", ".join(f"{a.name}: {a.type}" for a, _ in slots))
    for a, buf in slots:
        if a.name not in given:
            raise TdcError(f"missing input {a.name}: {a.type}")
        buf[...] = check_feed(a, given[a.name], "input")


def initial_state(graph: Graph, params: dict | None, seed: int) -> dict[str, np.ndarray]:
    """The value of every param, const and state arg of `graph`: from `params` (name -> array),
    else drawn from its initializer with `seed`; each checked against the arg's type."""
    values = {**init_params(graph, seed, only_missing=params or {}), **(params or {})}
    state = {}
    for a in graph.args:
        if a.kind != "input":
            if a.name not in values:
                raise TdcError(f"no value for {a.kind} {a.name} ({a.type})")
            state[a.name] = check_feed(a, values[a.name], a.kind)
    check_sparse_weights(graph, state)
    return state


def check_sparse_weights(graph: Graph, state: dict[str, np.ndarray]) -> None:
    """The compiled sparse kernels index memory with their CSR arrays unchecked: check each
    sparse_linear's and sparse_conv2d's arrays held in `state` (name -> array) before a kernel sees them."""
    for n in graph.nodes:
        if n.op not in ("sparse_linear", "sparse_conv2d"):
            continue
        csr = n.inputs[1:4]
        if all(v.is_arg and v.name in state for v in csr):
            check_csr(*(state[v.name] for v in csr), csr_columns(n.op, n.inputs[0].type.shape, n.attrs),
                      f"{n.op} ({', '.join(v.name for v in csr)})")


def graph_ranks(graph: Graph) -> int:
    """The number of ranks a step was compiled for: the `world` of its collectives, or one more
    than the highest rank a node is placed on (1 if neither)."""
    placed = [r + 1 for n in graph.nodes for r in placed_ranks(n.placement) or ()]
    return max([n.attrs.get("world", 0) for n in graph.nodes if n.opdef.collective] + placed + [1])
