"""Build the C runtime of the LLVM backend once per machine.

The runtime is one C file per family of ops (runtime/linalg.c, conv_*.c, pool.c, reduce.c,
loss.c, norm.c, and common.c for memory and the thread pool), declared in tdc_runtime.h.
`build_runtime()` compiles them with gcc (in parallel) into a cache directory and returns where
the results are:
  * `tdc_runtime.o`: every family in one relocatable object, linked into standalone
    executables (see `RuntimeBuild.link_args()`);
  * `libtdc_runtime.so`: loaded into the JIT's process (llvmlite's load_library_permanently),
    linked against scipy-openblas32's libscipy_openblas with an rpath to its directory.

The cache is `$TDC_CACHE_DIR/llvm` (or ~/.cache/tdc/llvm), one subdirectory per hash of the
C sources, the compiler flags, gcc's version, the CPU (the code is built with -march=native)
and the OpenBLAS location. A build goes into a temporary directory that is then renamed into
place, so concurrent processes (parallel test workers) never see half-written files; the
loser of a race discards its copy.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...errors import TdcError

RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
FAMILIES = ("common", "linalg", "conv_im2col", "conv_direct", "conv_winograd", "conv_fft", "pool", "reduce",
            "loss", "norm", "gather", "sparse", "quant", "timing")
SOURCES = tuple(f"{f}.c" for f in FAMILIES) + ("tdc_runtime.h", "internal.h", "instantiate.h")
CFLAGS = ("-O3", "-march=native", "-fPIC", "-Wall", "-Wextra", "-std=c11")
OBJECT = "tdc_runtime.o"
SHARED = "libtdc_runtime.so"
OPENBLAS_LIB = "scipy_openblas"


@dataclass(frozen=True)
class RuntimeBuild:
    directory: Path              # the cache subdirectory holding the build
    object_path: Path            # tdc_runtime.o, for executables
    shared_lib_path: Path        # libtdc_runtime.so, for the JIT
    include_dir: Path            # holds tdc_runtime.h
    openblas_include_dir: Path   # holds scipy-openblas32's cblas.h
    openblas_lib_dir: Path       # holds libscipy_openblas.so

    def link_args(self) -> list[str]:
        """What gcc needs, after the program's own objects, to link an executable using the runtime."""
        return [str(self.object_path), f"-L{self.openblas_lib_dir}", f"-l{OPENBLAS_LIB}",
                f"-Wl,-rpath,{self.openblas_lib_dir}", "-lpthread", "-lm"]


def cache_root() -> Path:
    base = os.environ.get("TDC_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "tdc") / "llvm"


def _openblas_dirs() -> tuple[Path, Path]:
    try:
        import scipy_openblas32
    except ImportError as e:
        raise TdcError("the LLVM backend needs scipy-openblas32 (pip install scipy-openblas32)") from e
    return Path(scipy_openblas32.get_include_dir()), Path(scipy_openblas32.get_lib_dir())


def _gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise TdcError("gcc not found on PATH: the LLVM backend needs it to build its C runtime (tdc/backends/llvm/runtime/*.c)")
    return gcc


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def _first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower():
            return ln
    return lines[0] if lines else "(no output)"


def _run(cmds: list[list[str]], what: str) -> None:
    """Run the gcc commands `cmds` side by side; the first failure is the error."""
    try:
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    except OSError as e:
        raise TdcError(f"could not run gcc to {what} the LLVM runtime: {e}") from e
    errors = [(cmd, p.communicate()[1]) for cmd, p in zip(cmds, procs) if p.wait() != 0]
    if errors:
        raise TdcError(f"gcc failed to {what} the LLVM runtime: {_first_error(errors[0][1])}")


def _cached(root: str, sources: list[Path], key: tuple, outputs: tuple[str, ...], build) -> Path:
    """The cache subdirectory for (sources, key): built by build(tmp_dir) into a temporary directory
    that is then renamed into place, unless it already holds `outputs`."""
    h = hashlib.sha256()
    for path in sources:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in key:
        h.update(repr(part).encode() + b"\0")
    final = Path(root) / h.hexdigest()[:16]
    if all((final / o).exists() for o in outputs):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)   # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:
            # another process finished first; use its build if complete
            if not all((final / o).exists() for o in outputs):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gcc_key(gcc: str) -> tuple:
    try:
        version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        raise TdcError(f"could not run gcc ({gcc}): {e}") from e
    return (CFLAGS, version, _cpu_id(), platform.machine())


@functools.lru_cache(maxsize=None)
def _build(root: str) -> RuntimeBuild:
    gcc = _gcc()
    ob_inc, ob_lib = _openblas_dirs()

    def build(tmp: Path):
        parts = [tmp / f"{f}.o" for f in FAMILIES]
        _run([[gcc, *CFLAGS, f"-I{RUNTIME_DIR}", f"-I{ob_inc}", "-c", str(RUNTIME_DIR / f"{f}.c"), "-o", str(o)]
              for f, o in zip(FAMILIES, parts)], "compile")
        _run([[gcc, "-r", "-nostdlib", "-o", str(tmp / OBJECT), *map(str, parts)]], "combine")
        _run([[gcc, "-shared", "-o", str(tmp / SHARED), str(tmp / OBJECT), f"-L{ob_lib}", f"-l{OPENBLAS_LIB}",
               f"-Wl,-rpath,{ob_lib}", "-lpthread", "-lm", "-Wl,--no-undefined"]], "link")

    final = _cached(root, [RUNTIME_DIR / n for n in SOURCES], _gcc_key(gcc) + (str(ob_inc), str(ob_lib)),
                    (OBJECT, SHARED), build)
    return RuntimeBuild(final, final / OBJECT, final / SHARED, RUNTIME_DIR, ob_inc, ob_lib)


# ---- communication (comm.c): built only for graphs that talk to other ranks ----------------------

COMM_SOURCES = ("comm.c", "tdc_comm.h")
COMM_OBJECT, COMM_SHARED = "tdc_comm.o", "libtdc_comm.so"


@dataclass(frozen=True)
class CommBuild:
    object_path: Path            # tdc_comm.o, for executables
    shared_lib_path: Path        # libtdc_comm.so, for the JIT
    mpi_include_dir: Path        # holds mpi.h
    mpi_lib_dir: Path            # holds libmpi.so

    def link_args(self) -> list[str]:
        return [str(self.object_path), f"-L{self.mpi_lib_dir}", "-lmpi", f"-Wl,-rpath,{self.mpi_lib_dir}", "-lpthread"]


def mpi_dirs() -> tuple[Path, Path]:
    """mpi.h's and libmpi's directories, from the mpich package (a dependency of tdc)."""
    import importlib.metadata
    try:
        files = importlib.metadata.files("mpich") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = {f.name: Path(f.locate()).resolve().parent for f in files if f.name in ("mpi.h", "libmpi.so")}
    if len(found) < 2:
        raise TdcError("communication between ranks needs MPI: the mpich package (pip install mpich mpi4py) "
                       "with mpi.h and libmpi.so")
    return found["mpi.h"], found["libmpi.so"]


@functools.lru_cache(maxsize=None)
def _build_comm(root: str) -> CommBuild:
    gcc = _gcc()
    inc, lib = mpi_dirs()

    def build(tmp: Path):
        _run([[gcc, *CFLAGS, f"-I{RUNTIME_DIR}", f"-I{inc}", "-c", str(RUNTIME_DIR / "comm.c"), "-o",
               str(tmp / COMM_OBJECT)]], "compile")
        _run([[gcc, "-shared", "-o", str(tmp / COMM_SHARED), str(tmp / COMM_OBJECT), f"-L{lib}", "-lmpi",
               f"-Wl,-rpath,{lib}", "-lpthread", "-Wl,--no-undefined"]], "link")

    final = _cached(root, [RUNTIME_DIR / n for n in COMM_SOURCES], _gcc_key(gcc) + (str(inc), str(lib)),
                    (COMM_OBJECT, COMM_SHARED), build)
    return CommBuild(final / COMM_OBJECT, final / COMM_SHARED, inc, lib)


def build_comm() -> CommBuild:
    """Compile comm.c against the MPI library if this machine's cache lacks it."""
    return _build_comm(str(cache_root()))


def build_runtime() -> RuntimeBuild:
    """Compile the runtime if this machine's cache lacks it; returns the paths (cached per process)."""
    return _build(str(cache_root()))
