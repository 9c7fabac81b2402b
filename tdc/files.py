"""Files tdc writes: atomically (a crash never leaves a half-written file where a good one
was), and caches under one directory."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, write) -> None:
    """Call write(file_object) on a temp file beside `path`, then rename it over `path`,
    so a crash never leaves a half-written file where a good one was."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path) + "-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cache_dir(*parts: str) -> str:
    """$TDC_CACHE_DIR (default ~/.cache/tdc), joined with `parts`: where tdc keeps what it
    builds or measures once per machine (generated Numba modules, the LLVM runtime, autotuning
    decisions, target rates)."""
    base = os.environ.get("TDC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tdc")
    return os.path.join(base, *parts)
