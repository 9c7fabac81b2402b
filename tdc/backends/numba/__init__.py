"""The Numba backend: fused kernels as generated Numba source, run by a driver over
preallocated buffers. `tdc.compile(graph, backend="numba")`.

Generated source is written to a file named by its content hash and imported, so
Numba's on-disk cache makes a second compile of the same graph fast.
"""
from __future__ import annotations

import os

# libgomp's default is to spin-wait between parallel regions; on this 2-vCPU machine that made
# every parallel kernel take 4-8 ms instead of 20 us. It must be set before the OpenMP runtime loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from ...errors import TdcError  # noqa: E402
from ...files import cache_dir  # noqa: E402
from ...ir.graph import Graph, Value  # noqa: E402
from ...ir.types import DTYPES  # noqa: E402
from ...lower.memplan import plan_memory  # noqa: E402
from ...lower.pipeline import optimize_for_target  # noqa: E402
from ...lower.plan import CONV_OPS, Copy, Library, Loop, View, build_plan  # noqa: E402
from ..comm import check_world, comm_step, communicator  # noqa: E402
from ..executable import check_feed, check_sparse_weights, copy_inputs, graph_ranks, initial_state  # noqa: E402
from .codegen import LIBRARY, NumbaProgram, is_python_step, render  # noqa: E402
from .target import TARGET  # noqa: E402


def load_module(source: str):
    """Write generated source to a content-addressed file and import it."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    name = f"tdc_gen_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    directory = cache_dir("numba")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + ".py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def prepare_runtime() -> None:
    """Once per process, before any kernel runs:
    * start Numba's thread pool. A driver loaded from Numba's cache calls parallel kernels
      without going through their dispatchers, which is what normally starts the pool; without
      it, the second run of a graph (a cache hit) crashed;
    * run the BLAS that Numba's kernels call on one thread: Numba's threads parallelise the
      kernels (the conv kernels call BLAS from inside their parallel loops). Two pools on two
      cores made kernels up to 10x slower here. That BLAS is SciPy's OpenBLAS (Numba's np.dot
      calls it), not numpy's: numpy's, the caller's, keeps its threads."""
    global _prepared
    if not _prepared:
        from numba.np.ufunc.parallel import _launch_threads
        from threadpoolctl import ThreadpoolController
        _launch_threads()
        try:   # load SciPy's BLAS now, so that the limit reaches it
            import scipy.linalg.cython_blas  # noqa: F401
        except ImportError:
            pass
        threads = int(os.environ.get("TDC_BLAS_THREADS", "1"))
        for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
            if f"{os.sep}numpy" not in lib.filepath:
                lib.set_num_threads(threads)
        _prepared = True



_prepared = False


class NumbaExecutable:
    backend = "numba"

    def __init__(self, graph: Graph, params: dict | None = None, seed: int = 0, autotune: bool = False,
                 progress=None, eager: bool = True):
        prepare_runtime()
        self.progress = progress      # called with (kernels compiled, total)
        self.eager = eager            # compile now (else on the first call: for looking at the source)
        self.source_graph = graph
        self.comm = communicator()
        check_world(graph_ranks(graph), self.comm)
        self._pending: dict = {}      # allreduce_start value -> its job, until the wait
        self.graph = optimize_for_target(graph, TARGET, autotune)
        self.program: NumbaProgram = render(build_plan(self.graph, TARGET.loop_dtypes))
        self.state: dict[str, np.ndarray] = {name: np.array(x, order="C")    # private copies
                                             for name, x in initial_state(self.graph, params, seed).items()}
        self._allocate()
        self._bind()

    # ---- buffers ------------------------------------------------------------------
    def _allocate(self):
        """Every buffered value gets its slice of one arena, as the memory plan says; updates the
        plan writes in place use the param's own storage; reshapes are views where they can be."""
        self.plan = plan = plan_memory(self.graph)
        self.arena = np.empty(max(plan.arena_bytes, 1), np.uint8)
        arrays: dict[Value, np.ndarray] = {}
        for a in self.graph.args:
            arrays[a] = self.state[a.name] if a.kind != "input" else np.empty(a.type.shape, a.type.np_dtype)
        for v, x in self.program.literal_values.items():
            arrays[v] = np.array(x, order="C")
        self.copies = []   # (dst, src) for reshapes that must copy (see below)

        def buffer(v: Value) -> np.ndarray:
            b = plan.assignments.get(v)
            if b is None:    # used only inside its kernel (an anchor's result before its epilogue)
                return np.empty(v.type.shape, v.type.np_dtype)
            if not b.in_arena:
                return self.state[b.inplace_of.name]
            return self.arena[b.offset:b.offset + v.type.nbytes].view(v.type.np_dtype).reshape(v.type.shape)

        for step in self.program.steps:
            if isinstance(step, View):
                n = step.node
                src, out = n.inputs[0], n.outputs[0]
                bo, bs = plan.assignments.get(out), plan.assignments.get(src)
                same = bo is not None and bs is not None and bo.offset == bs.offset and bo.in_arena
                if same or src.kind == "input" or (src.producer is not None and src.producer.op in ("constant", "full")):
                    arrays[out] = arrays[src].reshape(out.type.shape)
                else:   # the input stays live (or is a param updated in place): copy
                    arrays[out] = buffer(out)
                    self.copies.append((n, arrays[out], arrays[src].reshape(out.type.shape)))
                continue
            if isinstance(step, (Loop, Copy)):
                nodes = [v.producer for v in step.values if v.producer is not None]
                if isinstance(step, Loop) and step.anchor is not None:
                    nodes.append(step.anchor)
            else:
                nodes = [step.node]
            for n in nodes:
                if n.op in ("constant", "full"):
                    continue
                for v in n.outputs:
                    if v not in arrays:
                        arrays[v] = buffer(v)
        self.arrays = arrays

    def _bind(self):
        """Turn the plan into driver source: one @njit function per run of kernels between numpy
        fallbacks, calling each kernel on its buffers, so a step is one or a few calls from Python
        (and Numba caches the whole driver)."""
        arrays = self.arrays
        bufs: list[np.ndarray] = []
        slot: dict[int, int] = {}

        def expr(x) -> str:
            if isinstance(x, np.ndarray):
                if id(x) not in slot:
                    slot[id(x)] = len(bufs)
                    bufs.append(_kernel_view(x))
                return f"b[{slot[id(x)]}]"
            if isinstance(x, (bool, np.bool_)):
                return repr(bool(x))
            if isinstance(x, (int, np.integer)):
                return repr(int(x))
            return repr(float(x))

        copies = {n: (dst, src) for n, dst, src in self.copies}
        calls: list[tuple] = []               # (kernel name or library function, its arguments)
        segments: list[list[str]] = [[]]
        python_steps: dict[int, tuple] = {}   # segment index after which a fallback runs
        for step in self.program.steps:
            name = step.name
            if isinstance(step, View):
                if step.node in copies:
                    dst, src = copies[step.node]
                    segments[-1].append(f"{expr(dst)}[...] = {expr(src)}")
                continue
            if isinstance(step, (Loop, Copy)):
                args = [arrays[v] for v in step.values]
                if isinstance(step, Loop) and step.anchor is not None:
                    args += [arrays[v] for v in step.anchor.inputs] + self.program.loop_extra.get(name, [])
                segments[-1].append(f"{name}({', '.join(expr(a) for a in args)})")
                calls.append((name, args))
            elif isinstance(step, Library) and not is_python_step(step):
                n = step.node
                ins, outs = [arrays[v] for v in n.inputs], [arrays[v] for v in n.outputs]
                fn, args = LIBRARY[n.op](n, ins, outs, self.program) if n.op in CONV_OPS else LIBRARY[n.op](n, ins, outs)
                mod = "CA" if fn.__module__.endswith("conv_algos") else "K"
                segments[-1].append(f"{mod}.{fn.__name__}({', '.join(expr(a) for a in args)})   # {name}: {n.op}")
                calls.append((fn, args))
            else:
                n = step.node
                python_steps[len(segments) - 1] = (name, self._python_step(n),
                                                   tuple(arrays[v] for v in n.inputs + n.outputs))
                segments.append([])
        lines = []
        for k, seg in enumerate(segments):
            # nogil: the communication thread moves gradients while the kernels run
            lines += ["@njit(cache=True, nogil=True)", f"def drive{k}(b):"] + [f"    {s}" for s in seg or ["pass"]] + ["", ""]
        self.driver_source = "\n".join(lines)
        self.module = load_module(self.program.module_source() + "\n\n" + self.driver_source)
        self.buffers = tuple(bufs)
        if self.eager:
            self._compile(calls, [getattr(self.module, f"drive{k}") for k in range(len(segments)) if segments[k]])
        steps = []
        for k in range(len(segments)):
            if segments[k]:
                steps.append((getattr(self.module, f"drive{k}"), (self.buffers,)))
            if k in python_steps:
                _, fn, args = python_steps[k]
                steps.append((fn, args))
        self.steps = steps
        self.updates = [(self.state[t.name], arrays[v]) for t, v in self.graph.updates
                        if arrays[v] is not self.state[t.name]]
        self.outputs = [(n, arrays[v]) for n, v in self.graph.outputs]
        self.inputs = [(a, arrays[a]) for a in self.graph.inputs]
        self._hide_cached_weights()

    def _compile(self, calls: list[tuple], drivers: list) -> None:
        """Compile every kernel for the arguments it will get, then the drivers, now rather than on
        the first call (so `tdc.compile` returns a ready executable and a first step's time is a
        step's), telling `self.progress` (done, total) as it goes. Cached kernels load from disk."""
        import numba
        kernels, seen = [], set()
        for fn, args in calls:
            disp = getattr(self.module, fn) if isinstance(fn, str) else fn
            sig = tuple(numba.typeof(_kernel_view(a)) for a in args)
            if (id(disp), sig) not in seen:
                seen.add((id(disp), sig))
                kernels.append((disp, sig))
        work = kernels + [(d, (numba.typeof(self.buffers),)) for d in drivers]
        for i, (disp, sig) in enumerate(work):
            disp.compile(sig)
            if self.progress is not None:
                self.progress(i + 1, len(work))

    def _hide_cached_weights(self):
        """Params whose Winograd filter transform is kept between calls are shown read-only in
        `state` (an in-place write would leave the transform stale); `set_state` replaces them."""
        self._filter_caches: dict[str, list[np.ndarray]] = {}
        for name, ustate in self.program.filter_caches:
            self._filter_caches.setdefault(name, []).append(ustate)
        self._owned = {name: self.state[name] for name in self._filter_caches}
        for name, arr in self._owned.items():
            view = arr.view()
            view.flags.writeable = False
            self.state[name] = view

    def set_state(self, values: dict[str, np.ndarray]) -> None:
        """Copy new values into params or state (in place: the buffers stay bound)."""
        new = {}
        for name, x in values.items():
            if name not in self.state:
                raise TdcError(f"no param or state named {name!r}")
            arg = next(a for a in self.graph.args if a.name == name)
            new[name] = check_feed(arg, x, arg.kind)
        check_sparse_weights(self.graph, {**self.state, **new})   # before the kernels' buffers change
        for name, x in new.items():
            self._owned.get(name, self.state[name])[...] = x
            for ustate in self._filter_caches.get(name, ()):
                ustate[0] = 1

    def source(self) -> str:
        """The generated kernels and the driver that runs them in order over the planned buffers."""
        fallbacks = "".join(f"# numpy fallback: {f}\n" for f in self.program.fallbacks)
        return self.program.module_source() + "\n\n" + fallbacks + self.driver_source

    def comm_stats(self) -> tuple[int, float]:
        """(bytes sent, seconds waited) by this process's communication so far."""
        return self.comm.bytes_sent, self.comm.wait_seconds

    def _python_step(self, node):
        if node.opdef.family == "comm":
            return comm_step(node, self.comm, self._pending)
        return _fallback(node)

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        copy_inputs(self.inputs, inputs)
        try:
            for fn, args in self.steps:
                fn(*args)
        except ValueError as e:
            if "out of range" not in str(e):   # only the kernels' own input checks are user errors
                raise
            raise TdcError(str(e)) from None
        for dst, src in self.updates:
            dst[...] = src
        return {n: x.copy() for n, x in self.outputs}


BF16 = DTYPES["bf16"]


def _kernel_view(x):
    """What a kernel sees of a buffer: a bf16 array as its uint16 bits (Numba has no bfloat16);
    the executable's own arrays, which its fallbacks and callers get, keep the bf16 dtype."""
    return x.view(np.uint16) if isinstance(x, np.ndarray) and x.dtype == BF16 else x


def _fallback(node):
    """Run an op without a Numba lowering through its numpy reference."""
    opdef, attrs, n_in = node.opdef, node.attrs, len(node.inputs)
    if node.op in CONV_OPS and attrs["algo"] == "fft":
        from .conv_algos import fft_step
        return fft_step(node)

    def run(*arrays):
        res = opdef.ref(*arrays[:n_in], **attrs)
        res = res if isinstance(res, tuple) else (res,)
        for dst, r in zip(arrays[n_in:], res):
            dst[...] = r
    return run
