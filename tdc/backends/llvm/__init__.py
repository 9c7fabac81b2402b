"""The LLVM backend: native code for tdc graphs through llvmlite.

`tdc.compile(graph, backend="llvm")` JIT-compiles the graph in-process (MCJIT) and runs it
with the same interface as the other backends; `tdc.backends.llvm.aot` writes the same
code as an object file and links it into a standalone executable (see bundle.py).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import time

import numpy as np

from ...errors import TdcError
from ...ir.graph import Graph
from ...lower.pipeline import optimize_for_target, weight_prologue
from ...lower.plan import step_work
from ...passes.fuse import kernels
from ..executable import KernelTime, check_feed, check_sparse_weights, copy_inputs, initial_state

ENTRY_ARGS = (ctypes.c_void_p,) * 4


def _llvm():
    import llvmlite.binding as llvm
    if not getattr(_llvm, "ready", False):
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        llvm.initialize_native_asmparser()
        _llvm.ready = True
    return llvm


def target_machine(jit: bool = False):
    """The host CPU with every feature it has. LLVM prefers 256-bit vectors on AVX-512 CPUs;
    we ask for 512-bit ones (the loops here are long and FMA-bound)."""
    llvm = _llvm()
    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" in features:
        features += ",-prefer-256-bit"
    target = llvm.Target.from_triple(llvm.get_process_triple())
    return target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=features, opt=3,
                                        reloc="pic", codemodel="default", jit=jit)


def optimize(ir_text: str, tm):
    """Parse, verify and optimise generated IR at -O3 with the vectorisers on."""
    llvm = _llvm()
    mod = llvm.parse_assembly(ir_text)
    mod.triple = llvm.get_process_triple()
    mod.data_layout = str(tm.target_data)
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = pto.slp_vectorization = pto.loop_unrolling = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return mod


def compile_graph(graph: Graph, name: str = "tdc_graph", autotune: bool = False, profile: bool = False):
    """Optimise the graph for codegen (the compile pipeline, whose conv_algo pass picks by the C
    runtime's costs, or with --autotune by timing the C kernels) and build its LLVM module
    (with `profile`, one that times each of its kernels). Returns (graph, ModuleBuilder)."""
    from .codegen import build_module
    from .target import TARGET
    g = optimize_for_target(graph, TARGET, autotune)
    return g, build_module(g, name, profile=profile)


def fma_peak_gflops(threads: int, seconds: float = 0.2) -> float:
    """The FMA throughput of `threads` cores running at once, in GFLOP/s, measured by the C
    runtime's register-only loop (runtime/timing.c) for about `seconds`."""
    from .runtime import build_runtime
    lib = ctypes.CDLL(str(build_runtime().shared_lib_path))
    lib.tdc_fma_peak_gflops.restype = ctypes.c_double
    lib.tdc_fma_peak_gflops.argtypes = [ctypes.c_int64, ctypes.c_int64]
    iters = 1 << 16
    t0 = time.perf_counter()
    lib.tdc_fma_peak_gflops(threads, iters)   # a first guess, scaled to about `seconds` per run
    iters = max(iters, int(iters * seconds / max(time.perf_counter() - t0, 1e-6)))
    best = max(lib.tdc_fma_peak_gflops(threads, iters) for _ in range(3))
    if best <= 0:
        raise TdcError("the FMA peak measurement could not start its threads")
    return best


def _load_libgcc(llvm):
    """float16 conversions from double become calls to libgcc (__truncdfhf2); an executable links
    libgcc anyway, the JIT has to load it."""
    import ctypes.util
    name = ctypes.util.find_library("gcc_s")
    if name:
        try:
            llvm.load_library_permanently(name)
        except RuntimeError:
            pass


def aligned_bytes(n: int) -> np.ndarray:
    """A zeroed uint8 buffer of n bytes starting at a 64-byte boundary."""
    raw = np.zeros(n + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start:start + n]


def label_error(code: int, graph: Graph | None = None) -> TdcError:
    if graph is not None and any(n.op in ("gather", "gather_grad") for n in graph.nodes):
        return TdcError(f"a label or index is out of range (element {code - 1}): labels must be in "
                        "[0, number of classes), gather's indices in [-n, n) for a dim of n")
    return TdcError(f"a label is out of range (element {code - 1}): labels must be in [0, number of classes)")


class LLVMExecutable:
    backend = "llvm"

    def __init__(self, graph: Graph, params: dict | None = None, seed: int = 0, autotune: bool = False,
                 profile: bool = False):
        from .runtime import build_runtime
        llvm = _llvm()
        self.source_graph = graph
        values = initial_state(graph, params, seed)
        self._prologue = weight_prologue(graph)
        if self._prologue is not None:     # an inference graph's weight-only work, done once per weights
            graph = self._prologue.main
            values = {**values, **self._prologue.evaluate(values)}
        self.graph, mb = compile_graph(graph, autotune=autotune, profile=profile)
        self.module_builder = mb
        self.llvm_ir = str(mb.module)
        rt = build_runtime()
        llvm.load_library_permanently(str(rt.shared_lib_path))
        if mb.uses_comm:
            self._start_comm(llvm)
        _load_libgcc(llvm)
        tm = target_machine(jit=True)
        mod = optimize(self.llvm_ir, tm)
        self._engine = llvm.create_mcjit_compiler(mod, tm)
        self._engine.finalize_object()
        addr = self._engine.get_function_address(f"{mb.name}_run")
        self._profile = None   # with profile: the seconds each kernel took, summed over self.calls calls
        if profile:
            slots = len(mb.profiled)
            where = self._engine.get_global_value_address(f"{mb.name}_profile")
            self._profile = np.ctypeslib.as_array((ctypes.c_double * max(slots, 1)).from_address(where))[:slots]
        self.calls = 0
        self._run = ctypes.CFUNCTYPE(ctypes.c_int64, *ENTRY_ARGS)(addr)
        # one BLAS thread unless asked otherwise: two spin against each other on 2 vCPUs (see main.c)
        threads = max(int(os.environ.get("TDC_BLAS_THREADS", "1")), 1)
        ctypes.CDLL(str(rt.shared_lib_path)).tdc_runtime_set_threads(ctypes.c_int64(threads))

        self.weights = aligned_bytes(mb.weights.nbytes)
        mb.weights.fill(self.weights)
        self._views: dict[str, np.ndarray] = {}    # every weights-buffer arg, writable
        for a, off in mb.weights.entries:
            view = self.weights[off:off + a.type.nbytes].view(a.type.np_dtype).reshape(a.type.shape)
            view[...] = values[a.name]
            self._views[a.name] = view
        self.state: dict[str, np.ndarray] = dict(self._views)
        if self._prologue is not None:
            # The prologue's outputs are the executable's business; what it reads is shown read-only
            # (a write in place would leave its results stale): set_state recomputes them.
            for name in self._prologue.outputs:
                del self.state[name]
            for name in self._prologue.reads:
                view = self._views[name].view() if name in self._views else np.array(values[name])
                view.flags.writeable = False
                self.state[name] = view
        self.scratch = aligned_bytes(mb.scratch_bytes)
        self.inputs = [(a, aligned_bytes(a.type.nbytes).view(a.type.np_dtype).reshape(a.type.shape))
                       for a in self.graph.inputs]
        self.outputs = [(n, np.empty(v.type.shape, v.type.np_dtype)) for n, v in self.graph.outputs]
        self._in_ptrs = (ctypes.c_void_p * max(len(self.inputs), 1))(*[x.ctypes.data for _, x in self.inputs])
        self._out_ptrs = (ctypes.c_void_p * max(len(self.outputs), 1))(*[x.ctypes.data for _, x in self.outputs])

    def for_thread(self) -> "LLVMExecutable":
        """Another caller of this compiled step on the same weights and state, with scratch,
        input and output buffers of its own: threads that each call their own copy run steps
        at once on shared params without locks (Hogwild, Recht et al. 2011). Only the scalar
        updates race: a lost write is a lost update, which is Hogwild's bargain."""
        twin = object.__new__(LLVMExecutable)
        twin.__dict__.update(self.__dict__)
        twin.scratch = aligned_bytes(self.module_builder.scratch_bytes)
        twin.inputs = [(a, aligned_bytes(a.type.nbytes).view(a.type.np_dtype).reshape(a.type.shape))
                       for a, _ in self.inputs]
        twin.outputs = [(n, np.empty_like(x)) for n, x in self.outputs]
        twin._in_ptrs = (ctypes.c_void_p * max(len(twin.inputs), 1))(*[x.ctypes.data for _, x in twin.inputs])
        twin._out_ptrs = (ctypes.c_void_p * max(len(twin.outputs), 1))(*[x.ctypes.data for _, x in twin.outputs])
        return twin

    def _start_comm(self, llvm):
        """Load comm.c's library and start it (MPI, tdc's communicator and its thread); the world
        must be the one the step was compiled for."""
        from ..comm import check_world, communicator
        from ..executable import graph_ranks
        from .runtime import build_comm
        lib_path = str(build_comm().shared_lib_path)
        llvm.load_library_permanently(lib_path)
        self._comm = ctypes.CDLL(lib_path)
        self._comm.tdc_comm_stats.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_double)]
        py = communicator()       # MPI is started the same way in every backend (mpi4py, under mpiexec)
        size = self._comm.tdc_comm_init(ctypes.c_double(getattr(py, "timeout", 30.0)))
        atexit.register(self._comm.tdc_comm_stop)   # before mpi4py finalizes MPI (atexit runs last-in first)
        check_world(graph_ranks(self.source_graph), type("World", (), {"size": size})())
        p2p = sorted({n.op for n in self.graph.nodes if n.op in ("send", "recv")})
        if size == 1 and p2p:
            raise TdcError(f"llvm backend: {p2p[0]} needs several processes; this one runs alone (rank 0 of 1)")

    def comm_stats(self) -> tuple[int, float]:
        """(bytes sent, seconds waited) by this process's communication so far."""
        if getattr(self, "_comm", None) is None:
            return 0, 0.0
        nbytes, secs = ctypes.c_int64(), ctypes.c_double()
        self._comm.tdc_comm_stats(ctypes.byref(nbytes), ctypes.byref(secs))
        return nbytes.value, secs.value

    def set_state(self, values: dict[str, np.ndarray]) -> None:
        """Copy new values into params or state (in place: the generated code reads these buffers);
        values the weight prologue computes from them are recomputed."""
        args = {a.name: a for a in self.source_graph.args if a.kind != "input"}
        new = {}
        for name, x in values.items():
            if name not in args:
                raise TdcError(f"no param or state named {name!r}")
            new[name] = check_feed(args[name], x, args[name].kind)
        check_sparse_weights(self.graph, {**self._views, **new})   # before the kernels' buffers change
        for name, x in new.items():
            if name in self._views:
                self._views[name][...] = x
            else:                          # read by the prologue only
                self.state[name] = np.array(x)
                self.state[name].flags.writeable = False
        if self._prologue is not None and not new.keys().isdisjoint(self._prologue.reads):
            current = {n: self.state[n] for n in self._prologue.reads}
            for name, x in self._prologue.evaluate(current).items():
                self._views[name][...] = x

    def kernel_times(self) -> list[KernelTime]:
        """Of an executable compiled with profile=True: each kernel's ops, work and the seconds
        it took over the calls so far (`reset_times` starts again)."""
        if self._profile is None:
            raise TdcError("this executable was compiled without profiling (compile(..., profile=True))")
        groups = dict(kernels(self.graph))
        return [KernelTime(step.name, [n.op for n in groups.get(step.name, [])], self.calls, float(secs),
                           *step_work(step, groups.get(step.name, [])))
                for step, secs in zip(self.module_builder.profiled, self._profile)]

    def reset_times(self) -> None:
        if self._profile is not None:
            self._profile[:] = 0.0
        self.calls = 0

    def source(self) -> str:
        """The generated LLVM IR, before optimisation."""
        return self.llvm_ir

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        copy_inputs(self.inputs, inputs)
        code = self._run(self._in_ptrs, self._out_ptrs, self.weights.ctypes.data, self.scratch.ctypes.data)
        self.calls += 1
        if code:
            raise label_error(code, self.graph)
        return {n: x.copy() for n, x in self.outputs}
