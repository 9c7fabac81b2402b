"""Files tdc writes: atomically (a crash never leaves a half-written file where a good one
was), and caches under one directory."""
from __future__ import annotations

import os
import tempfile

from .errors import TdcError


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


def _first_existing(path: str) -> str:
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."


def check_output_file(path: str, what: str) -> None:
    """Refuse, before any work is done, a file tdc could not write later: a directory where the
    file should be, or a file where a directory should be, or a place this user cannot write."""
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        raise TdcError(f"{what} {path}: is a directory")
    _check_dir(os.path.dirname(full), f"{what} {path}")


def check_output_dir(path: str, what: str) -> None:
    """As check_output_file, for a directory tdc will create or write into."""
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full) and not os.path.isdir(full):
        raise TdcError(f"{what} {path}: is a file, not a directory")
    _check_dir(full, f"{what} {path}")


def _check_dir(directory: str, what: str) -> None:
    base = _first_existing(directory)
    if not os.path.isdir(base):
        raise TdcError(f"{what}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise TdcError(f"{what}: {base} is not writable")
