"""The kernel plan: what every compiled backend renders, from a fused graph.

One step per fused kernel of the graph (passes/fuse.py), in schedule order:
  * `Loop`: elementwise and reduction kernels as a loop nest of scalar ops (lower/loops.py),
    optionally the epilogue of an anchor (matmul, linear or conv2d) whose result it reads;
  * `Copy`: transpose, slice, slice_grad, pad and concat as strided copies, after an
    optional fill of the output;
  * `Library`: an op a backend runs by a kernel of its own (GEMM, convolution, pooling,
    softmax, losses, batchnorm, dropout);
  * `View`: reshape and flatten: no work, the output is the input's storage (or a copy, when
    the memory plan says so);
  * `Fallback`: an op the target cannot lower (communication, or a dtype its loops lack).
Backends turn the steps into code (Numba source, LLVM IR); they never regroup them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..ir.graph import Graph, Node, Value
from ..ops.common import norm_axes, norm_axis
from ..passes.fuse import REDUCE_OPS, is_literal, kernels
from ..passes.partition import node_flops
from .loops import Const, LoopKernel, Operand, Reduce, ScalarOp, broadcast_strides, c_strides, collapse

VIEW_OPS = ("reshape", "flatten")
COPY_OPS = ("transpose", "slice", "slice_grad", "pad", "concat")
ANCHORED_OPS = ("matmul", "linear", "conv2d", "sparse_linear", "sparse_conv2d")
CONV_OPS = ("conv2d", "conv2d_grad_input", "conv2d_grad_weight")
# Ops with a library kernel on every compiled backend.
LIBRARY_OPS = frozenset({
    "matmul", "linear", *CONV_OPS, "maxpool2d", "maxpool2d_grad", "maxpool2d_gather", "avgpool2d",
    "avgpool2d_grad", "global_avgpool", "softmax", "log_softmax", "softmax_cross_entropy", "one_hot",
    "mse", "batchnorm", "dropout", "gather", "gather_grad", "sparse_linear", "sparse_conv2d",
    "sparse_linear_grad_input", "sparse_linear_grad_values",
    "quantize", "dequantize", "fake_quant", "fake_quant_grad", "qlinear", "qconv2d",   # int8: ops/quant.py
})


@dataclass
class Loop:
    name: str
    values: list[Value]          # what each operand a0, a1, ... of `kernel` is bound to
    kernel: LoopKernel
    anchor: Node | None = None   # runs first, writing values[0]; the loop is its epilogue


@dataclass
class Copy:
    name: str
    node: Node
    values: list[Value]          # the node's inputs, then its output
    copies: list[LoopKernel]     # one per input; operands a0 (source) and a1 (destination)
    fill: Const | None           # written over the whole output first (slice_grad, pad)


@dataclass
class Library:
    name: str
    node: Node


@dataclass
class View:
    name: str
    node: Node


@dataclass
class Fallback:
    name: str
    node: Node
    why: str = ""                # "dtype" when the target's loops lack one of its dtypes


def step_work(step, nodes: list[Node]) -> tuple[float, int]:
    """(FLOPs, bytes) of one step of a plan running `nodes` (its kernel's group): the ops'
    registry FLOPs; the bytes of the arrays the step reads and writes, each counted once (values
    a fused loop keeps in registers are not memory traffic)."""
    flops = float(sum(node_flops(n) for n in nodes if n.opdef.family != "comm"))
    if isinstance(step, (Loop, Copy)):
        arrays = list(step.values) + (list(step.anchor.inputs) if getattr(step, "anchor", None) else [])
    else:
        arrays = [v for n in nodes for v in list(n.inputs) + n.outputs]
    return flops, sum(v.type.nbytes for v in dict.fromkeys(arrays))


@dataclass
class KernelPlan:
    graph: Graph
    steps: list
    literal_values: dict[Value, np.ndarray]   # constant / full nodes, inlined or bound as arrays


STAGED_OPS = ("push", "pull")   # exchanges only the staged runtime (runtime/staged.py) runs


def build_plan(graph: Graph, loop_dtypes: tuple[str, ...]) -> KernelPlan:
    """The kernel plan of fused graph `graph`; kernels touching a dtype outside `loop_dtypes`
    (the dtypes the target's generated code handles) become fallbacks."""
    plan = KernelPlan(graph, [], {})
    for n in graph.nodes:
        if n.op in STAGED_OPS or n.attrs.get("compress", "none") != "none":
            where = f" ({n.loc})" if n.loc else ""
            raise TdcError(f"{n.op}{where} is carried out by tdc's staged runtime (tdc train --ps S / --compress), "
                           "between compiled stages, not inside one compiled program: a parameter-server or "
                           "compressed step is run by tdc train, or cut per rank with tdc.lower.stages.split_rank")
        if is_literal(n):
            plan.literal_values[n.outputs[0]] = n.opdef.ref(**n.attrs)
    users = graph.users()
    roots = set(graph.roots())
    for name, nodes in kernels(graph):
        plan.steps += _lower_kernel(plan, name, nodes, users, roots, loop_dtypes)
    return plan


def _escapes(v: Value, group: set, users, roots) -> bool:
    return v in roots or any(u not in group for u in users.get(v, []))


def _lower_kernel(plan: KernelPlan, name: str, nodes: list[Node], users, roots, dtypes) -> list:
    group = set(nodes)
    first = nodes[0]
    if len(nodes) == 1 and first.op in VIEW_OPS:
        return [View(name, first)]
    if not all(v.type.dtype in dtypes for n in nodes for v in list(n.inputs) + n.outputs):
        return [Fallback(name, n, "dtype") for n in nodes]
    loopable = all(n.opdef.family == "elementwise" or n.op in REDUCE_OPS or n.op == "broadcast_to" for n in nodes)
    if loopable:
        return [_elementwise_loop(plan, name, nodes, None, group, users, roots)]
    if first.op in ANCHORED_OPS and len(nodes) > 1:
        return [_elementwise_loop(plan, name, nodes[1:], first, group, users, roots)]
    if len(nodes) != 1:
        raise TdcError(f"internal: kernel {name} mixes {[n.op for n in nodes]}")
    if first.op in COPY_OPS:
        return [_copy(name, first)]
    if first.op in LIBRARY_OPS:
        return [Library(name, first)]
    return [Fallback(name, first)]


# ---- elementwise and reduction kernels ----------------------------------------------

def _elementwise_loop(plan, name, nodes, anchor: Node | None, group, users, roots) -> Loop:
    """A loop over the iteration shape computing every node of the chain per element."""
    last = nodes[-1]
    reduce_node = last if last.op in REDUCE_OPS else None
    iter_shape = list(reduce_node.inputs[0].type.shape if reduce_node else last.outputs[0].type.shape)
    if anchor is not None:
        iter_shape = list(anchor.outputs[0].type.shape)
    params: list[str] = []
    arrays: list[Value] = []      # the Value bound to each param, in order
    local: dict[Value, str] = {}
    loads, body, stores = [], [], []
    operands: list[Operand] = []

    def param_for(v: Value) -> str:
        if v in arrays:
            return params[arrays.index(v)]
        p = f"a{len(params)}"
        params.append(p)
        arrays.append(v)
        return p

    def read(v: Value) -> str:
        if v in local:
            return local[v]
        if v.producer is not None and is_literal(v.producer) and v.type.shape == ():
            return Const(plan.literal_values[v].reshape(()).item(), v.type.dtype)
        if v.producer is not None and v.producer.op == "full":
            return Const(v.producer.attrs["value"], v.type.dtype)
        p = param_for(v)
        op = Operand(p, broadcast_strides(v.type.shape, iter_shape))
        operands.append(op)
        name_ = f"x{len(loads)}"
        loads.append((name_, op))
        local[v] = name_
        return name_

    if anchor is not None:   # the anchor writes its result into a buffer; the epilogue reads it there
        read(anchor.outputs[0])
    for i, n in enumerate(nodes):
        if n is reduce_node:
            break
        args = [read(v) for v in n.inputs]
        out = n.outputs[0]
        var = f"v{i}"
        body.append(ScalarOp(var, n.op, args, [v.type for v in n.inputs], out.type, n.attrs))
        local[out] = var
        if _escapes(out, group, users, roots):
            p = param_for(out)
            op = Operand(p, broadcast_strides(out.type.shape, iter_shape))
            operands.append(op)
            stores.append((op, var))
    reduce = None
    keep_apart: set[int] = set()
    if reduce_node is not None:
        x = reduce_node.inputs[0]
        val = read(x)
        axes = norm_axes(reduce_node.attrs["axes"], len(iter_shape))
        keep_apart = set(axes)
        out = reduce_node.outputs[0]
        kept_shape = [1 if k in axes else d for k, d in enumerate(iter_shape)]
        st = c_strides(kept_shape)
        op = Operand(param_for(out), [0 if k in axes else st[k] for k in range(len(iter_shape))])
        operands.append(op)
        kind = {"reduce_sum": "sum", "reduce_mean": "mean", "reduce_max": "max"}[reduce_node.op]
        count = int(np.prod([iter_shape[k] for k in axes])) if axes else 1
        acc_dt = "f64" if out.type.dtype.startswith("f") else out.type.dtype
        if kind != "max":
            init = 0
        elif acc_dt.startswith("f"):
            init = -np.inf
        else:
            init = int(np.iinfo(out.type.np_dtype).min)
        reduce = Reduce(op, val, kind, (1.0 / count) if kind == "mean" else 1, [], init, acc_dt)
    dims, red = collapse(iter_shape, operands, keep_apart)
    lk = LoopKernel(name, params, dims, loads, body, stores)
    if reduce is not None:
        reduce.reduced = red
        lk.reduce = reduce
    return Loop(name, arrays, lk, anchor)


# ---- copies with strides: transpose, slice, slice_grad, pad, concat ---------------------

def _copy(name, node: Node) -> Copy:
    """Strided copies; slice_grad and pad first fill the output with `fill`."""
    x_types = [v.type for v in node.inputs]
    out = node.outputs[0]
    a = node.attrs
    fill = None
    if node.op == "transpose":
        st = c_strides(x_types[0].shape)
        copies = [(list(out.type.shape), Operand("a0", [st[p] for p in a["perm"]]), Operand("a1", c_strides(out.type.shape)))]
    elif node.op == "slice":
        st = c_strides(x_types[0].shape)
        off = sum(s * t for s, t in zip(a["starts"], st))
        copies = [(list(out.type.shape), Operand("a0", [t * s for t, s in zip(st, a["steps"])], off),
                   Operand("a1", c_strides(out.type.shape)))]
    elif node.op == "slice_grad":
        st = c_strides(out.type.shape)
        off = sum(s * t for s, t in zip(a["starts"], st))
        fill = Const(0, out.type.dtype)
        copies = [(list(x_types[0].shape), Operand("a0", c_strides(x_types[0].shape)),
                   Operand("a1", [t * s for t, s in zip(st, a["steps"])], off))]
    elif node.op == "pad":
        st = c_strides(out.type.shape)
        r = len(st)
        off = sum(a["pads"][k] * st[k] for k in range(r))
        fill = Const(a["value"], out.type.dtype)
        copies = [(list(x_types[0].shape), Operand("a0", c_strides(x_types[0].shape)), Operand("a1", list(st), off))]
    else:   # concat
        ax = norm_axis(a["axis"], out.type.rank)
        st = c_strides(out.type.shape)
        copies, off = [], 0
        for i, t in enumerate(x_types):
            copies.append((list(t.shape), Operand(f"a{i}", c_strides(t.shape)),
                           Operand(f"a{len(x_types)}", list(st), off * st[ax])))
            off += t.shape[ax]
    loops = []
    for j, (shape, src, dst) in enumerate(copies):
        dims, _ = collapse(shape, [src, dst])
        loops.append(LoopKernel(f"{name}_{j}", [src.var, dst.var], dims, [("x0", src)], [], [(dst, "x0")]))
    return Copy(name, node, list(node.inputs) + [out], loops, fill)


# ---- library kernel arguments every backend computes alike ------------------------------

def avgpool_counts(size, k, s, lo, hi, n_out, include_pad) -> np.ndarray:
    """Divisor per output position along one dim: window cells inside the input
    (or inside the padded input with include_pad); cells past the padded input never count."""
    counts = np.empty(n_out, np.int64)
    for o in range(n_out):
        cnt = 0
        for i in range(k):
            p = o * s - lo + i
            if include_pad:
                if -lo <= p < size + hi:
                    cnt += 1
            elif 0 <= p < size:
                cnt += 1
        counts[o] = cnt
    return counts


def avgpool_divisors(node: Node, in_shape, out_shape) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) divisor tables of an avgpool2d(_grad) node, as float64."""
    a = node.attrs
    cy = avgpool_counts(in_shape[2], a["kernel"][0], a["stride"][0], a["pad"][0], a["pad"][2], out_shape[2],
                        a["count_include_pad"])
    cx = avgpool_counts(in_shape[3], a["kernel"][1], a["stride"][1], a["pad"][1], a["pad"][3], out_shape[3],
                        a["count_include_pad"])
    return cy.astype(np.float64), cx.astype(np.float64)


# ---- the plan as text (tdc dump --all, --plan) -------------------------------------------

def describe_plan(plan: KernelPlan, memory=None) -> str:
    """One line per step: kernel, kind, what it computes, and (given the memory plan) where its
    results live: the arena offset, in place of an arg, or inside the kernel only."""
    def where(v: Value) -> str:
        b = memory.assignments.get(v) if memory is not None else None
        if memory is None:
            return str(v.type)
        if b is None:
            return f"{v.type} (in the kernel)"
        if not b.in_arena:
            return f"{v.type} (in {b.inplace_of.name})"
        return f"{v.type} @{b.offset}"

    lines = [f"kernel plan of {plan.graph.name}: {len(plan.steps)} steps"]
    for s in plan.steps:
        if isinstance(s, Loop):
            ops = ", ".join(sc.op for sc in s.kernel.body)
            if s.kernel.reduce is not None:
                ops = ", ".join(filter(None, [ops, f"reduce_{s.kernel.reduce.kind}"]))
            what = f"loop over {s.kernel.dims}: {ops or 'copy'}"
            if s.anchor is not None:
                algo = f" ({s.anchor.attrs['algo']})" if s.anchor.op == "conv2d" else ""
                what = f"{s.anchor.op}{algo}, epilogue {what}"
            stored = {op.var for op, _ in s.kernel.stores}
            if s.kernel.reduce is not None:
                stored.add(s.kernel.reduce.operand.var)
            outs = [v for v, p in zip(s.values, s.kernel.params) if p in stored]
        elif isinstance(s, Copy):
            what, outs = f"strided copy: {s.node.op}", s.node.outputs
        elif isinstance(s, Library):
            algo = f" ({s.node.attrs['algo']})" if s.node.op in CONV_OPS else ""
            what, outs = f"library: {s.node.op}{algo}", s.node.outputs
        elif isinstance(s, View):
            what, outs = f"view: {s.node.op}", s.node.outputs
        else:
            what, outs = f"fallback: {s.node.op}" + (" (dtype)" if s.why else ""), s.node.outputs
        lines.append(f"  {s.name:<6} {what} -> {', '.join(where(v) for v in outs)}")
    return "\n".join(lines)
