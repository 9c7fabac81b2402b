"""From a fused, memory-planned graph to one LLVM module.

The module has one function per fused loop kernel (generated loop nests the vectoriser can
work on), calls into the C runtime (runtime/*.c, one file per op family: GEMM through
OpenBLAS, conv, pooling, softmax, losses, batchnorm, dropout) for the other ops, and one entry
point:

    i64 NAME_run(ptr inputs, ptr outputs, ptr weights, ptr scratch)

inputs/outputs are arrays of pointers to the caller's tensors (C order). `weights` holds the
params, consts and state, laid out by `WeightsLayout`, then the large literals; a training step
updates the params and state in place.
`scratch` holds every intermediate value at the offset the memory plan gave it. The entry
point returns 0, or 1 + the index of a label that was out of range.

The kernel plan (which ops fuse, in what loop nest: tdc/lower/plan.py) is the one every
compiled backend renders; this module renders it as IR.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir

from ...errors import TdcError
from ...ir.graph import Graph, Node, Value
from ...lower.loops import Const, LoopKernel, Operand
from ...lower.memplan import MemoryPlan, align, plan_memory
from ...lower.plan import Copy, Fallback, KernelPlan, Library, Loop, View, avgpool_divisors, build_plan
from ...ops.common import norm_axis
from . import quant as Q
from . import scalar as S
from .scalar import F64, I64, MEM, REG, const

PTR = ir.PointerType()
LIBRARY_DTYPES = ("f32", "f64")
# Literals above this size go into the weights buffer rather than the module: the JIT's small
# code model cannot reach globals of hundreds of MB (32-bit relocations overflow and LLVM
# aborts), and the IR text of such a global is several times its size.
BOUND_LITERAL_BYTES = 1 << 16


@dataclass
class WeightsLayout:
    """Params, consts and state of a graph in one buffer, each at a 64-byte aligned offset, then
    the large literals of its modules (unnamed: they are not params, a weights file carries
    them only as payload bytes)."""
    entries: list[tuple[Value, int]]      # (arg, byte offset)
    nbytes: int
    literals: list[tuple[int, bytes]] = field(default_factory=list)   # (byte offset, data)

    def bind(self, data: bytes) -> int:
        """Place a literal after everything else; its byte offset."""
        off = self.nbytes
        self.literals.append((off, data))
        self.nbytes += align(max(len(data), 1))
        return off

    def fill(self, buf: np.ndarray):
        """Write the literals into `buf` (uint8, nbytes)."""
        for off, data in self.literals:
            buf[off:off + len(data)] = np.frombuffer(data, np.uint8)

    @classmethod
    def of(cls, graph: Graph) -> "WeightsLayout":
        entries, off = [], 0
        for a in graph.args:
            if a.kind != "input":
                entries.append((a, off))
                off += align(max(a.type.nbytes, 1))
        return cls(entries, off)

    def offset(self, arg: Value) -> int:
        for a, off in self.entries:
            if a is arg:
                return off
        raise KeyError(arg.name)

    def pack(self, values: dict[str, np.ndarray]) -> bytes:
        buf = np.zeros(self.nbytes, np.uint8)
        self.fill(buf)
        for a, off in self.entries:
            x = np.ascontiguousarray(values[a.name], a.type.np_dtype)
            buf[off:off + a.type.nbytes] = x.reshape(-1).view(np.uint8)
        return buf.tobytes()


class ModuleBuilder:
    """`layout`, `inputs` and `outputs` (names) give the entry point an interface other than the
    graph's own: one rank's program of a partitioned bundle reads the weights, inputs and
    outputs of the whole step, shared by every rank's program (bundle.py)."""

    def __init__(self, graph: Graph, name: str, layout: WeightsLayout | None = None,
                 inputs: list[str] | None = None, outputs: list[str] | None = None, profile: bool = False):
        self.graph = graph
        self.profile = profile
        self.profiled: list = []    # with profile: the steps timed, in order; their seconds sum in {name}_profile
        self.name = name
        self.program: KernelPlan = build_plan(graph, tuple(MEM))
        self.plan: MemoryPlan = plan_memory(graph)
        self.weights = layout or WeightsLayout.of(graph)
        self.input_names = inputs if inputs is not None else [a.name for a in graph.inputs]
        names = outputs if outputs is not None else [n for n, _ in graph.outputs]
        self.output_slots = [names.index(n) for n, _ in graph.outputs]
        self.module = ir.Module(name=name)
        self.scratch_bytes = self.plan.arena_bytes
        self.extra: dict[Value, int] = {}         # values the plan leaves unplaced: after the arena
        self.globals: dict[Value, ir.GlobalVariable] = {}
        self.bound: dict[Value, int] = {}         # large literals: their offset in the weights buffer
        self.aliases: dict[Value, Value] = {}     # reshape outputs that share their input's storage
        self.copies: dict[Node, tuple[Value, Value]] = {}
        self.n_kernels = 0
        self.bases = None                         # inputs, weights, scratch in an array, for split loops
        self.comm_slots: dict[Value, int] = {}    # allreduce_start output -> its job slot in comm.c
        self.uses_comm = any(isinstance(st, Fallback) and st.node.opdef.family == "comm" for st in self.program.steps)
        self._check()

    # ---- what the backend supports ------------------------------------------------------
    def _check(self):
        for step in self.program.steps:
            if isinstance(step, Fallback) and step.node.opdef.family == "comm":
                _check_comm(step.node)
                continue
            if isinstance(step, Fallback):
                n = step.node
                why = "needs MPI" if n.opdef.family == "comm" else \
                    f"has no LLVM lowering for {', '.join(sorted({str(v.type.dtype) for v in n.inputs + n.outputs}))}"
                raise TdcError(f"llvm backend: {n.op} {why}{' at ' + n.loc if n.loc else ''}")
            # a loop's anchor (a matmul with its fused epilogue) calls the same library kernels
            lib = step.node if isinstance(step, Library) else getattr(step, "anchor", None)
            if lib is not None:
                dt = _library_dtype(lib)
                if dt not in LIBRARY_DTYPES and lib.op != "gather" and not Q.supports(lib):
                    raise TdcError(f"llvm backend: {lib.op} on {dt} is not supported (only f32 and f64)"
                                   f"{' at ' + lib.loc if lib.loc else ''}")

    # ---- where each value lives ----------------------------------------------------------
    def _place_values(self):
        plan = self.plan
        for v, x in self.program.literal_values.items():
            data = np.ascontiguousarray(x, v.type.np_dtype).reshape(-1).view(np.uint8).tobytes()
            if len(data) > BOUND_LITERAL_BYTES:
                self.bound[v] = self.weights.bind(data)
            else:
                self.globals[v] = self._constant_bytes("lit", data or b"\0", 64)
        for step in self.program.steps:
            if not isinstance(step, View):
                continue
            n = step.node
            src, out = n.inputs[0], n.outputs[0]
            bo, bs = plan.assignments.get(out), plan.assignments.get(src)
            same = bo is not None and bs is not None and bo.in_arena and bs.in_arena and bo.offset == bs.offset
            root = src
            while root in self.aliases:
                root = self.aliases[root]
            if same or root.kind == "input" or root in self.globals or root in self.bound:   # storage nothing writes to
                self.aliases[out] = src
            else:
                self.copies[n] = (src, out)

    def _constant_bytes(self, prefix: str, data: bytes, alignment: int) -> ir.GlobalVariable:
        g = ir.GlobalVariable(self.module, ir.ArrayType(S.I8, len(data)), name=self.module.get_unique_name(prefix))
        g.global_constant, g.linkage, g.align = True, "internal", alignment
        g.initializer = ir.Constant(g.value_type, bytearray(data))
        return g

    def _scratch_offset(self, v: Value) -> int:
        if v not in self.extra:
            self.extra[v] = self.scratch_bytes
            self.scratch_bytes += align(max(v.type.nbytes, 1))
        return self.extra[v]

    def pointer(self, b: ir.IRBuilder, v: Value, bases=None):
        """Where `v` lives, as an offset from the entry point's inputs, weights or scratch argument
        (or `bases`, those three as loaded inside a split loop kernel)."""
        inputs, weights, scratch = bases or (self.inputs_arg, self.weights_arg, self.scratch_arg)
        while v in self.aliases:
            v = self.aliases[v]
        if v in self.globals:
            return b.bitcast(self.globals[v], PTR)
        if v.kind == "input":
            idx = self.input_names.index(v.name)
            return b.load(b.gep(inputs, [ir.Constant(I64, idx)], source_etype=PTR), typ=PTR)
        if v.kind in ("param", "const", "state") or v in self.bound:
            off = self.bound[v] if v in self.bound else self.weights.offset(v)
            return b.gep(weights, [ir.Constant(I64, off)], source_etype=S.I8)
        buf = self.plan.assignments.get(v)
        if buf is not None and not buf.in_arena:
            return self.pointer(b, buf.inplace_of, bases)
        off = buf.offset if buf is not None else self._scratch_offset(v)
        return b.gep(scratch, [ir.Constant(I64, off)], source_etype=S.I8)

    # ---- the module -----------------------------------------------------------------------
    def build(self) -> ir.Module:
        self._place_values()
        fn = ir.Function(self.module, ir.FunctionType(I64, [PTR] * 4), name=f"{self.name}_run")
        self.inputs_arg, self.outputs_arg, self.weights_arg, self.scratch_arg = fn.args
        for a, n in zip(fn.args, ("inputs", "outputs", "weights", "scratch")):
            a.name = n
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        timed = [st for st in self.program.steps if not isinstance(st, View) or st.node in self.copies]
        if self.profile:
            clock = ir.Function(self.module, ir.FunctionType(F64, []), name="tdc_prof_now")
            add = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [PTR, F64]), name="tdc_prof_add")
            acc = ir.GlobalVariable(self.module, ir.ArrayType(F64, len(timed)), name=f"{self.name}_profile")
            acc.initializer = ir.Constant(ir.ArrayType(F64, len(timed)), None)
            self.profiled = timed
        for step in self.program.steps:
            if self.profile and step in timed:
                t0 = b.call(clock, [])
            if isinstance(step, View):
                if step.node in self.copies:
                    src, out = self.copies[step.node]
                    self._memcpy(b, self.pointer(b, out), self.pointer(b, src), out.type.nbytes)
            elif isinstance(step, (Loop, Copy)):
                self._loop_step(b, step)
            elif isinstance(step, Fallback):     # communication: calls into comm.c
                self._comm_step(b, step.node)
            else:
                b = self._library_step(b, fn, step.name, step.node)
            if self.profile and step in timed:
                slot = b.gep(acc, [ir.Constant(I64, 0), ir.Constant(I64, timed.index(step))],
                             source_etype=acc.value_type)
                b.call(add, [slot, t0])
        # outputs are copied before updates: an output that is an updated param returns its old value
        for i, (_, v) in zip(self.output_slots, self.graph.outputs):
            dst = b.load(b.gep(self.outputs_arg, [ir.Constant(I64, i)], source_etype=PTR), typ=PTR)
            self._memcpy(b, dst, self.pointer(b, v), v.type.nbytes)
        for target, v in self.graph.updates:
            buf = self.plan.assignments.get(v)
            if buf is not None and not buf.in_arena and buf.inplace_of is target:
                continue
            self._memcpy(b, self.pointer(b, target), self.pointer(b, v), v.type.nbytes)
        b.ret(ir.Constant(I64, 0))
        return self.module

    def _memcpy(self, b, dst, src, nbytes: int):
        if nbytes == 0:
            return
        fn = self.module.globals.get("llvm.memmove.p0.p0.i64")
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [PTR, PTR, I64, S.I1]),
                             name="llvm.memmove.p0.p0.i64")
        b.call(fn, [dst, src, ir.Constant(I64, nbytes), ir.Constant(S.I1, 0)])

    # ---- generated loop kernels -----------------------------------------------------------
    def _loop_step(self, b, step: Loop | Copy):
        values: list[Value] = step.values
        if isinstance(step, Loop) and step.anchor is not None:   # the library op writes; the loop is its epilogue
            self._call_library(b, step.anchor, out=values[0])
        dim = split_dim(step.kernel) if isinstance(step, Loop) else None
        split = dim is not None
        if split:     # kN(ptr bases[3], i64 begin, i64 end): a part of the outer loop, for the pool
            kfn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [PTR, I64, I64]), name=step.name)
            kfn.args[0].name = "bases"
            kb = ir.IRBuilder(kfn.append_basic_block("entry"))
            args = self._operands_from_bases(kb, kfn.args[0], values)
        else:
            kfn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [PTR] * len(values)), name=step.name)
            kb = ir.IRBuilder(kfn.append_basic_block("entry"))
            args = kfn.args
        kfn.linkage = "internal"
        var_names = [f"a{i}" for i in range(len(values))]
        ptrs = {p: (arg, v.type.dtype) for p, arg, v in zip(var_names, args, values)}
        for arg, p in zip(args, var_names):
            arg.name = p
        if split:
            emit_loop_nest(kb, step.kernel, ptrs, outer=(kfn.args[1], kfn.args[2]))
        elif isinstance(step, Loop):
            emit_loop_nest(kb, step.kernel, ptrs)
        else:     # strided copies, after an optional fill of the output
            if step.fill is not None:
                out = values[-1]
                fill_lk = LoopKernel("fill", [var_names[-1]], [int(np.prod(out.type.shape))], [], [], [])
                fill_lk.stores = [(Operand(var_names[-1], [1]), step.fill)]
                emit_loop_nest(kb, fill_lk, ptrs)
            for lk in step.copies:
                emit_loop_nest(kb, lk, ptrs)
        kb.ret_void()
        if split:
            self._parallel_call(b, kfn, step.kernel, dim)
        else:
            b.call(kfn, [self.pointer(b, v) for v in values])
        self.n_kernels += 1

    def _operands_from_bases(self, b, bases, values: list[Value]) -> list:
        """Pointers to `values` as offsets from the entry point's inputs, weights and scratch,
        loaded from `bases`: from common bases, LLVM can tell apart operands that never overlap
        and keeps vectorising in-place updates (pointers passed in an array it could not)."""
        loaded = tuple(b.load(b.gep(bases, [ir.Constant(I64, i)], source_etype=PTR), typ=PTR) for i in range(3))
        return [self.pointer(b, v, loaded) for v in values]

    def _parallel_call(self, b, kfn, lk: LoopKernel, dim: int):
        """tdc_parallel_for over loop `dim` of `lk`, the entry point's inputs, weights and scratch
        in an array (stored once, at the entry)."""
        if self.bases is None:
            here = b.block
            b.position_at_start(b.function.entry_basic_block)
            self.bases = b.alloca(ir.ArrayType(PTR, 3))
            for i, arg in enumerate((self.inputs_arg, self.weights_arg, self.scratch_arg)):
                b.store(arg, b.gep(self.bases, [ir.Constant(I64, 0), ir.Constant(I64, i)], inbounds=True))
            b.position_at_end(here)
        fn = self.module.globals.get("tdc_parallel_for")
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [I64, F64, PTR, PTR]), name="tdc_parallel_for")
        work = float(np.prod(lk.dims)) * LOOP_ELEMENT_WORK
        b.call(fn, [ir.Constant(I64, lk.dims[dim]), ir.Constant(F64, work), kfn, self.bases])

    # ---- communication (runtime/comm.c) -----------------------------------------------------
    def _comm_step(self, b, node: Node):
        a = node.attrs
        i64 = lambda x: ir.Constant(I64, int(x))  # noqa: E731
        ins = [self.pointer(b, v) for v in node.inputs]
        outs = [self.pointer(b, v) for v in node.outputs]
        v = (node.inputs or node.outputs)[0]
        n, dt = v.type.size, v.type.dtype
        if node.op == "allreduce":
            self._call(b, f"tdc_comm_allreduce_{dt}", [ins[0], outs[0], i64(n), i64(COMM_OPS[a["op"]]),
                                                       i64(COMM_ALGOS[a["algo"]])])
        elif node.op == "allreduce_start":
            slot = self.comm_slots.setdefault(node.outputs[0], len(self.comm_slots))
            self._call(b, f"tdc_comm_allreduce_start_{dt}", [ins[0], outs[0], i64(n), i64(COMM_OPS[a["op"]]),
                                                             i64(COMM_ALGOS[a["algo"]]), i64(slot)])
        elif node.op == "allreduce_wait":
            if node.inputs[0] in self.comm_slots:      # else nothing is in flight: the wait is a copy
                self._call(b, "tdc_comm_wait", [i64(self.comm_slots[node.inputs[0]])])
            self._memcpy(b, outs[0], ins[0], v.type.nbytes)
        elif node.op == "broadcast":
            self._call(b, "tdc_comm_broadcast", [ins[0], outs[0], i64(v.type.nbytes), i64(a["root"])])
        elif node.op == "reduce_to":
            self._call(b, f"tdc_comm_reduce_to_{dt}", [ins[0], outs[0], i64(n), i64(a["root"])])
        elif node.op == "send":
            self._call(b, "tdc_comm_send", [ins[0], i64(v.type.nbytes), i64(a["dst"]), i64(a["tag"])])
        elif node.op == "allgather":
            out = node.outputs[0].type
            ax = a["axis"]
            outer = int(np.prod(out.shape[:ax], dtype=np.int64))
            inner = int(np.prod(out.shape[ax + 1:], dtype=np.int64)) * out.np_dtype.itemsize
            sizes = b.bitcast(self._constant_bytes("sizes", np.asarray(a["sizes"], np.int64).tobytes(), 8), PTR)
            self._call(b, "tdc_comm_allgather", [ins[0], outs[0], i64(outer), i64(inner), sizes, i64(len(a["sizes"]))])
        else:
            self._call(b, "tdc_comm_recv", [outs[0], i64(v.type.nbytes), i64(a["src"]), i64(a["tag"])])

    def _call(self, b, name: str, args: list):
        fn = self.module.globals.get(name)
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [x.type for x in args]), name=name)
        b.call(fn, args)

    # ---- library kernels (the C runtime) ---------------------------------------------------
    def _library_step(self, b, fn, name, node: Node):
        code = self._call_library(b, node, out=None)
        if code is None:
            return b
        bad = b.icmp_signed("!=", code, ir.Constant(I64, 0))
        fail = fn.append_basic_block(f"{name}.bad_label")
        ok = fn.append_basic_block(f"{name}.ok")
        b.cbranch(bad, fail, ok)
        b.position_at_end(fail)
        b.ret(code)
        b.position_at_end(ok)
        return b

    def _call_library(self, b, node: Node, out: Value | None):
        """Call the runtime for `node`, writing its (first) output to `out` if given. Returns the
        call's error code for the ops that check labels, else None."""
        cname, args, checks = library_call(node)
        outs = list(node.outputs)
        if out is not None:
            outs[0] = out
        ll_args, types = [], []
        for kind, x in args:
            if kind == "in":
                ll_args.append(self.pointer(b, node.inputs[x]))
                types.append(PTR)
            elif kind == "out":
                ll_args.append(self.pointer(b, outs[x]))
                types.append(PTR)
            elif kind == "i64":
                ll_args.append(ir.Constant(I64, int(x)))
                types.append(I64)
            elif kind == "f64":
                ll_args.append(ir.Constant(F64, float(x)))
                types.append(F64)
            else:   # a constant table (any array); a large one goes into the weights buffer, as literals do
                data = x.tobytes() or b"\0"
                if len(data) > BOUND_LITERAL_BYTES:
                    ll_args.append(b.gep(self.weights_arg, [ir.Constant(I64, self.weights.bind(data))], source_etype=S.I8))
                else:
                    ll_args.append(b.bitcast(self._constant_bytes("table", data, 8), PTR))
                types.append(PTR)
        ret = I64 if checks else ir.VoidType()
        callee = self.module.globals.get(cname)
        if callee is None:
            callee = ir.Function(self.module, ir.FunctionType(ret, types), name=cname)
        result = b.call(callee, ll_args)
        return result if checks else None


COMM_OPS = {"sum": 0, "mean": 1, "max": 2, "min": 3}
COMM_ALGOS = {"auto": 0, "mpi": 0, "ring": 1, "doubling": 2, "tree": 3}   # auto: the library's choice


def _check_comm(node: Node) -> None:
    """What comm.c can do: reductions of f32 and f64; moving bytes of any dtype."""
    reduces = node.op in ("allreduce", "allreduce_start", "reduce_to")
    dt = (node.inputs or node.outputs)[0].type.dtype
    if reduces and dt not in ("f32", "f64"):
        raise TdcError(f"llvm backend: {node.op} of {dt} is not supported (f32 and f64 are)"
                       f"{' at ' + node.loc if node.loc else ''}")


def _library_dtype(node: Node) -> str:
    return node.outputs[0].type.dtype if node.op == "one_hot" else node.inputs[0].type.dtype


def _geometry(node: Node, x_shape, w_shape, y_shape):
    a = node.attrs
    N, C, H, W = x_shape
    CO, _, KH, KW = w_shape
    OH, OW = y_shape[2], y_shape[3]
    return [N, C, H, W, CO, KH, KW, OH, OW, a["stride"][0], a["stride"][1], a["pad"][0], a["pad"][1],
            a["dilation"][0], a["dilation"][1], a["groups"]]


def _window(node: Node, x_shape, y_shape, dilation=True):
    a = node.attrs
    N, C, H, W = x_shape
    g = [N, C, H, W, y_shape[2], y_shape[3], a["kernel"][0], a["kernel"][1], a["stride"][0], a["stride"][1],
         a["pad"][0], a["pad"][1]]
    return g + ([a["dilation"][0], a["dilation"][1]] if dilation else [])


def library_call(node: Node):
    """(C function, argument list, returns an error code) for a library op. Arguments are
    ("in", i) / ("out", i) pointers, ("i64", n), ("f64", x), or ("table", array) constants."""
    op, a = node.op, node.attrs
    ins = [v.type.shape for v in node.inputs]
    outs = [v.type.shape for v in node.outputs]
    dt = _library_dtype(node)
    I = [("in", k) for k in range(len(node.inputs))]
    O = [("out", k) for k in range(len(node.outputs))]
    i64 = lambda xs: [("i64", x) for x in xs]  # noqa: E731

    def bias():
        return (I[2], ("i64", 1)) if len(ins) == 3 else (I[0], ("i64", 0))   # an unread pointer without bias

    if Q.supports(node):     # the int8 ops, maxpool2d on i8 codes (runtime/quant.c)
        return (*Q.quant_call(node, _window), False)
    if op == "linear":
        K, N = ins[1][1], ins[1][0]
        args = [I[0], I[1], *bias(), O[0], *i64([int(np.prod(ins[0])) // K, K, N])]
    elif op == "sparse_linear":
        K, N = ins[0][-1], ins[3][0] - 1
        bias = (I[4], ("i64", 1)) if len(ins) == 5 else (I[0], ("i64", 0))
        args = [*I[:4], *bias, O[0], *i64([int(np.prod(ins[0][:-1])), K, N])]
    elif op == "sparse_linear_grad_input":
        args = [*I[:4], O[0], *i64([ins[0][0], a["k"], ins[0][1]])]
    elif op == "sparse_linear_grad_values":
        args = [*I[:4], O[0], *i64([ins[0][0], ins[0][1], ins[3][0] - 1])]
    elif op == "sparse_conv2d":
        bias = (I[4], ("i64", 1)) if len(ins) == 5 else (I[0], ("i64", 0))
        w_shape = (ins[3][0] - 1, 0, *a["kernel"])
        args = [*I[:4], *bias, O[0], *i64(_geometry(node, ins[0], w_shape, outs[0]))]
    elif op == "matmul" and len(ins[0]) == 2 and len(ins[1]) == 2:
        args = [I[0], I[1], O[0], *i64([ins[0][0], ins[0][1], ins[1][1]])]
    elif op == "matmul":
        batch = outs[0][:-2]

        def index_map(shape):
            ids = np.arange(int(np.prod(shape[:-2]))).reshape(shape[:-2]) if len(shape) > 2 else 0
            return np.ascontiguousarray(np.broadcast_to(ids, batch), np.int64).reshape(-1)

        M, K, N = ins[0][-2], ins[0][-1], ins[1][-1]
        args = [I[0], I[1], O[0], *i64([int(np.prod(batch)), M, K, N]),
                ("table", index_map(ins[0])), ("table", index_map(ins[1]))]
        op = "matmul_batched"
    elif op == "conv2d":
        args = [I[0], I[1], *bias(), O[0], *i64(_geometry(node, ins[0], ins[1], outs[0]))]
    elif op == "conv2d_grad_input":
        args = [I[0], I[1], O[0], *i64(_geometry(node, outs[0], ins[1], ins[0]))]
    elif op == "conv2d_grad_weight":
        args = [I[0], I[1], O[0], *i64(_geometry(node, ins[0], outs[0], ins[1]))]
    elif op == "maxpool2d":
        args = [I[0], O[0], *i64(_window(node, ins[0], outs[0]))]
    elif op == "maxpool2d_grad":
        args = [I[0], I[1], O[0], *i64(_window(node, ins[1], ins[0]))]
    elif op == "maxpool2d_gather":
        args = [I[0], I[1], O[0], *i64(_window(node, ins[1], outs[0]))]
    elif op == "avgpool2d":
        cy, cx = avgpool_divisors(node, ins[0], outs[0])
        args = [I[0], O[0], *i64(_window(node, ins[0], outs[0], dilation=False)), ("table", cy), ("table", cx)]
    elif op == "avgpool2d_grad":
        cy, cx = avgpool_divisors(node, outs[0], ins[0])
        args = [I[0], O[0], *i64(_window(node, outs[0], ins[0], dilation=False)), ("table", cy), ("table", cx)]
    elif op == "global_avgpool":
        args = [I[0], O[0], *i64([ins[0][0] * ins[0][1], int(np.prod(ins[0][2:]))])]
    elif op in ("softmax", "log_softmax"):
        ax = norm_axis(a["axis"], len(ins[0]))
        args = [I[0], O[0], *i64([int(np.prod(ins[0][:ax])), ins[0][ax], int(np.prod(ins[0][ax + 1:])),
                                  op == "log_softmax"])]
        op = "softmax"
    elif op == "softmax_cross_entropy":
        args = [I[0], I[1], ("i64", node.inputs[1].type.np_dtype.itemsize), O[0], *i64(ins[0])]
    elif op == "one_hot":
        args = [I[0], ("i64", node.inputs[0].type.np_dtype.itemsize), O[0],
                *i64([int(np.prod(ins[0])), a["depth"]])]
    elif op in ("gather", "gather_grad"):
        table = ins[0] if op == "gather" else outs[0]
        ax = a["axis"] % len(table)
        dims = i64([int(np.prod(table[:ax])), table[ax], int(np.prod(ins[1])), int(np.prod(table[ax + 1:]))])
        idx = [I[1], ("i64", node.inputs[1].type.np_dtype.itemsize)]
        if op == "gather":      # moves bytes: one function for every dtype
            return "tdc_gather", [I[0], ("i64", node.inputs[0].type.np_dtype.itemsize), *idx, O[0], *dims], True
        args = [I[0], *idx, O[0], *dims]
    elif op == "mse":
        args = [I[0], I[1], O[0], ("i64", int(np.prod(ins[0])))]
    elif op == "batchnorm":
        x = ins[0]
        dims = i64([x[0], x[1], int(np.prod(x[2:]))])
        if a["training"]:
            args = [*I[:5], ("f64", a["eps"]), ("f64", a["momentum"]), *O[:3], *dims]
            op = "batchnorm_train"
        else:
            args = [*I[:5], ("f64", a["eps"]), O[0], *dims]
            op = "batchnorm_infer"
    elif op == "dropout":
        args = [I[0], I[1], ("i64", node.inputs[1].type.np_dtype.itemsize), ("f64", a["rate"]),
                ("i64", a["seed"]), O[0], ("i64", int(np.prod(ins[0])))]
    else:
        raise TdcError(f"llvm backend: no runtime kernel for {op}")
    if op.startswith("conv2d"):
        op = f"{op}_{conv_algorithm(node)}"
    return f"tdc_{op}_{dt}", args, op in ("softmax_cross_entropy", "one_hot", "gather_grad")


def conv_algorithm(node: Node) -> str:
    """The runtime function family for a conv node's `algo`. The conv_algo pass has chosen one by
    the time code is generated; a graph that skipped it ("auto", or "winograd" unresolved) gets
    im2col, or F(2x2,3x3) when Winograd was asked for and can compute it."""
    from ...ops.conv import ALGORITHMS, legal_algos
    a = node.attrs
    algo = a.get("algo", "auto")
    w = node.outputs[0] if node.op == "conv2d_grad_weight" else node.inputs[1]
    kernel = w.type.shape[2:]
    legal = legal_algos(node.op, kernel, a["stride"], a["dilation"])
    if algo == "winograd":
        algo = "winograd_f2"
    if algo not in ALGORITHMS or algo not in legal:
        algo = "im2col"
    return algo


# ---- loop nests -------------------------------------------------------------------------

# Loop kernels with at least this many iterations run their outer loop on the runtime's thread
# pool; a generated element costs about as much as this many flops of GEMM (the pool's unit).
PARALLEL_MIN_ITERATIONS = 1 << 15
LOOP_ELEMENT_WORK = 100.0
# A reduction keeps at most this many accumulators in an array on the stack (`loop_order`).
ACC_ARRAY_MAX = 4096


def reduced_dims(lk: LoopKernel) -> list[bool]:
    """Per dim of a loop kernel, whether its reduction sums over it."""
    return lk.reduce.reduced if lk.reduce is not None else [False] * len(lk.dims)


def loop_order(lk: LoopKernel) -> tuple[list[int], int]:
    """The dims of a loop kernel from the outermost loop in, and how many of the innermost are
    kept dims inside the reduced ones. Kept dims go outside reduced ones, whose accumulator is
    then a register; but a reduction whose innermost dim is kept (a column sum) runs its reduced
    loops outside those trailing kept ones, with an array of accumulators (at most
    ACC_ARRAY_MAX), so the inner loop is a vector of independent sums, each taken in index
    order in the accumulator's dtype."""
    n = len(lk.dims)
    red = reduced_dims(lk)
    kept, reduced = [k for k in range(n) if not red[k]], [k for k in range(n) if red[k]]
    trailing = n - 1 - max(reduced, default=n - 1)
    if lk.reduce is None or not trailing or np.prod(lk.dims[n - trailing:]) > ACC_ARRAY_MAX:
        return kept + reduced, 0
    return [k for k in kept if k < n - trailing] + reduced + list(range(n - trailing, n)), trailing


def split_dim(lk: LoopKernel) -> int | None:
    """The dim whose range a loop kernel's threads divide: its outermost loop, if that loop is
    not reduced (each index then owns its outputs and accumulators, so parts never share a
    store, and the results are those of one thread) and the kernel is large enough to pay."""
    red = reduced_dims(lk)
    order, _ = loop_order(lk)
    if not order or red[order[0]] or lk.dims[order[0]] < 2 or np.prod(lk.dims) < PARALLEL_MIN_ITERATIONS:
        return None
    return order[0]


def emit_loop_nest(b: ir.IRBuilder, lk: LoopKernel, ptrs: dict, outer=None):
    """The loops of `lk` at the builder's position. `ptrs` maps each operand variable to
    (pointer, dtype). Non-reduced dims are outer; a reduction's accumulator opens before its
    first reduced loop and is stored when the reduced loops close. With `outer` (begin, end),
    the outermost loop runs over [begin, end) only (`split_dim`)."""
    dims = lk.dims
    red = reduced_dims(lk)
    order, in_output = loop_order(lk)
    if any(dims[k] == 0 for k in order if not red[k]):
        return                                  # nothing to compute
    ivars: dict[int, ir.Value] = {}

    def address(op):
        idx = ir.Constant(I64, op.offset)
        for k, s in enumerate(op.strides):
            if s:
                term = ivars[k] if s == 1 else b.mul(ivars[k], ir.Constant(I64, s), flags=["nsw"])
                idx = b.add(idx, term, flags=["nsw"])
        p, dt = ptrs[op.var]
        return b.gep(p, [idx], source_etype=MEM[dt], inbounds=True)

    def body():
        local: dict[str, ir.Value] = {}
        for name, op in lk.loads:
            local[name] = S.load(b, address(op), ptrs[op.var][1])

        def val(x, dtype=None):
            if isinstance(x, Const):
                return const(x.dtype, x.value)
            return local[x]

        for s in lk.body:
            local[s.var] = S.emit(b, s.op, [val(x) for x in s.args], s.in_types, s.out_type, s.attrs)
        for op, x in lk.stores:
            S.store(b, val(x), address(op), ptrs[op.var][1])
        return local, val

    acc_slot = None     # the accumulator: one register's slot, or with in_output one per trailing element
    trailing = order[len(order) - in_output:]

    def trailing_loops(body):
        """for each index of the trailing kept dims (in_output of them): body()."""
        def level(j):
            if j == len(trailing):
                body()
                return
            k = trailing[j]
            for_range(b, dims[k], lambda i: (ivars.__setitem__(k, i), level(j + 1)))
        level(0)

    def acc_ptr():
        if not in_output:
            return acc_slot
        idx, step = ir.Constant(I64, 0), 1
        for k in reversed(trailing):
            term = ivars[k] if step == 1 else b.mul(ivars[k], ir.Constant(I64, step), flags=["nsw"])
            idx, step = b.add(idx, term, flags=["nsw"]), step * dims[k]
        return b.gep(acc_slot, [ir.Constant(I64, 0), idx], inbounds=True)

    def open_acc():
        nonlocal acc_slot
        r = lk.reduce
        here = b.block
        b.position_at_start(b.function.entry_basic_block)   # a scalar slot becomes a register (mem2reg)
        cells = int(np.prod([dims[k] for k in trailing]))
        acc_slot = b.alloca(ir.ArrayType(REG[r.acc_dtype], cells) if in_output else REG[r.acc_dtype])
        b.position_at_end(here)
        if in_output:
            trailing_loops(lambda: b.store(const(r.acc_dtype, r.init), acc_ptr()))
        else:
            b.store(const(r.acc_dtype, r.init), acc_slot)

    def close_acc():
        if in_output:
            trailing_loops(store_result)
        else:
            store_result()

    def store_result():
        r = lk.reduce
        acc = b.load(acc_ptr(), typ=REG[r.acc_dtype])
        out_dt = ptrs[r.operand.var][1]
        if r.kind == "mean":
            accf = acc if S.is_float(r.acc_dtype) else S.convert(b, acc, r.acc_dtype, "f64")
            acc = b.fmul(accf, const("f64" if not S.is_float(r.acc_dtype) else r.acc_dtype, r.scale))
            S.store(b, S.convert(b, acc, "f64" if not S.is_float(r.acc_dtype) else r.acc_dtype, out_dt),
                    address(r.operand), out_dt)
        else:
            S.store(b, S.convert(b, acc, r.acc_dtype, out_dt), address(r.operand), out_dt)

    def accumulate(local, val):
        r = lk.reduce
        x = val(r.local)
        src_dt = r.local.dtype if isinstance(r.local, Const) else _local_dtype(lk, r.local, ptrs)
        x = S.convert(b, x, src_dt, r.acc_dtype)
        slot = acc_ptr()
        acc = b.load(slot, typ=REG[r.acc_dtype])
        if r.kind == "max":
            new = S.fmax(b, acc, x, r.acc_dtype)
        elif S.is_float(r.acc_dtype):
            # one register's sum may be reassociated: LLVM then keeps vector lanes of partial
            # sums (the bound of any order, gamma_{n-1} times the sum of |x|, covers it)
            new = b.fadd(acc, x, flags=[] if in_output else ["reassoc"])
        else:
            new = b.add(acc, x)
        b.store(new, slot)

    def nest(level: int):
        if level == len(order):
            if per_element:
                open_acc()
            local, val = body()
            if lk.reduce is not None:
                accumulate(local, val)
            if per_element:
                close_acc()
            return
        k = order[level]
        first_red = red[k] and (level == 0 or not red[order[level - 1]])
        if first_red:
            open_acc()
        if level == 0 and outer is not None:
            for_span(b, outer[0], outer[1], lambda i: (ivars.__setitem__(k, i), nest(level + 1)))
        elif dims[k] > 0:
            for_range(b, dims[k], lambda i: (ivars.__setitem__(k, i), nest(level + 1)))
        if first_red:
            close_acc()

    # every reduced dim had size 1 (collapse dropped it): each element is its own reduction
    per_element = lk.reduce is not None and not any(red)
    nest(0)


def _local_dtype(lk: LoopKernel, name: str, ptrs) -> str:
    for local, op in lk.loads:
        if local == name:
            return ptrs[op.var][1]
    for s in lk.body:
        if s.var == name:
            return s.out_type.dtype
    raise TdcError(f"internal: unknown local {name}")


def for_range(b: ir.IRBuilder, n: int, body):
    """for i in range(n): body(i), with n >= 1 known at compile time."""
    pre = b.block
    loop = b.append_basic_block("loop")
    after = b.append_basic_block("after")
    b.branch(loop)
    b.position_at_end(loop)
    i = b.phi(I64, name="i")
    i.add_incoming(ir.Constant(I64, 0), pre)
    body(i)
    nxt = b.add(i, ir.Constant(I64, 1), flags=["nuw", "nsw"])
    i.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, ir.Constant(I64, n)), loop, after)
    b.position_at_end(after)


def for_span(b: ir.IRBuilder, lo: ir.Value, hi: ir.Value, body):
    """for i in range(lo, hi): body(i), with lo and hi known at run time."""
    pre = b.block
    loop = b.append_basic_block("span")
    after = b.append_basic_block("span_after")
    b.cbranch(b.icmp_signed("<", lo, hi), loop, after)
    b.position_at_end(loop)
    i = b.phi(I64, name="i")
    i.add_incoming(lo, pre)
    body(i)
    nxt = b.add(i, ir.Constant(I64, 1), flags=["nsw"])
    i.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, hi), loop, after)
    b.position_at_end(after)


def build_module(graph: Graph, name: str, **interface) -> ModuleBuilder:
    mb = ModuleBuilder(graph, name, **interface)
    mb.build()
    return mb
