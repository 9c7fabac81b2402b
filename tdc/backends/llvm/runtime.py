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
            "loss", "norm")
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


@functools.lru_cache(maxsize=None)
def _build(root: str) -> RuntimeBuild:
    gcc = _gcc()
    ob_inc, ob_lib = _openblas_dirs()
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (RUNTIME_DIR / name).read_bytes() + b"\0")
    try:
        version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        raise TdcError(f"could not run gcc ({gcc}): {e}") from e
    for part in (CFLAGS, version, _cpu_id(), platform.machine(), str(ob_inc), str(ob_lib)):
        h.update(repr(part).encode() + b"\0")
    final = Path(root) / h.hexdigest()[:16]
    result = RuntimeBuild(final, final / OBJECT, final / SHARED, RUNTIME_DIR, ob_inc, ob_lib)
    if result.object_path.exists() and result.shared_lib_path.exists():
        return result
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        obj, lib = tmp / OBJECT, tmp / SHARED
        parts = [tmp / f"{f}.o" for f in FAMILIES]
        _run([[gcc, *CFLAGS, f"-I{RUNTIME_DIR}", f"-I{ob_inc}", "-c", str(RUNTIME_DIR / f"{f}.c"), "-o", str(o)]
              for f, o in zip(FAMILIES, parts)], "compile")
        _run([[gcc, "-r", "-nostdlib", "-o", str(obj), *map(str, parts)]], "combine")
        _run([[gcc, "-shared", "-o", str(lib), str(obj), f"-L{ob_lib}", f"-l{OPENBLAS_LIB}",
               f"-Wl,-rpath,{ob_lib}", "-lpthread", "-lm", "-Wl,--no-undefined"]], "link")
        os.chmod(tmp, 0o755)   # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:
            # another process finished first; use its build if complete
            if not (result.object_path.exists() and result.shared_lib_path.exists()):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def build_runtime() -> RuntimeBuild:
    """Compile the runtime if this machine's cache lacks it; returns the paths (cached per process)."""
    return _build(str(cache_root()))
