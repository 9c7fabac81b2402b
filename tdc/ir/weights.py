"""A graph's params, consts and state on disk, in the two formats tdc reads and writes.

* `.npz` (numpy's zip of arrays, one per name): what `tdc train --save-weights` and
  checkpoints write; `load_weights` checks a file against a graph's arguments.
* The native bundle's weights file ("TDCW"): every tensor of a compiled graph in one flat
  buffer, as the generated code addresses it; the C reader and writer live in the LLVM
  backend's runtime/main.c, and both sides must agree byte for byte.

`load_npz` and `load_weights` read either format.

TDCW layout (little-endian):
    bytes 0..7   magic b"TDCWGT01"
    u64          payload_bytes          (the model's TDC_WEIGHTS_BYTES)
    u64          n_entries
    u64          checksum               FNV-1a 64 over the payload bytes
    n_entries times:
        u32 name_len, name (utf-8, no NUL), u32 dtype, u32 rank, i64 shape[rank], u64 offset, u64 nbytes
    zero padding up to a multiple of 64
    payload      payload_bytes bytes; entry i at payload[offset : offset + nbytes]

dtype is the code of DTYPE_CODES (the TDC_F32... enum of the generated header). Offsets are
64-byte aligned (layout_for), and payload_bytes is a multiple of 64 (payload_size).

    layout = layout_for([("w", w), ("b", b)])       # offsets, nbytes: what the codegen emits
    write_weights("out/model.weights", [("w", w), ("b", b)], layout)
    arrays = read_weights("out/model.weights")       # {"w": ..., "b": ...}
"""
from __future__ import annotations

import os
import struct
import zipfile
from typing import Iterable, NamedTuple

import numpy as np

from ..errors import TdcError
from ..files import atomic_write
from .graph import Graph
from .types import DTYPES

MAGIC = b"TDCWGT01"
ALIGN = 64
MAX_RANK = 8  # the generated header's tdc_tensor_info holds at most 8 dims
HEADER = struct.Struct("<8sQQQ")

# Codes are part of the file format and the generated header: new dtypes take new codes.
DTYPE_CODES = {"f32": 0, "f64": 1, "i8": 2, "i32": 3, "i64": 4, "bool": 5,
               "u8": 6, "i16": 7, "u16": 8, "u32": 9, "u64": 10, "bf16": 11}
CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}
NUMPY_DTYPES = {
    "f32": np.dtype("<f4"), "f64": np.dtype("<f8"), "i8": np.dtype("i1"),
    "i32": np.dtype("<i4"), "i64": np.dtype("<i8"), "bool": np.dtype("?"),
    "u8": np.dtype("u1"), "i16": np.dtype("<i2"), "u16": np.dtype("<u2"), "u32": np.dtype("<u4"),
    "u64": np.dtype("<u8"), "bf16": DTYPES["bf16"],
}
_BY_NUMPY = {dt.newbyteorder("="): name for name, dt in NUMPY_DTYPES.items()}

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


class LayoutEntry(NamedTuple):
    """Where one tensor lives in the weights buffer. `dtype` is a DTYPE_CODES code."""
    name: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _dtype_name(arr: np.ndarray, name: str) -> str:
    try:
        return _BY_NUMPY[arr.dtype.newbyteorder("=")]
    except KeyError:
        raise TdcError(f"weight {name!r}: dtype {arr.dtype} cannot be stored in a weights file; "
                       f"supported: {', '.join(DTYPE_CODES)}") from None


def _items(arrays) -> list[tuple[str, np.ndarray]]:
    items = arrays.items() if isinstance(arrays, dict) else arrays
    out = []
    for name, a in items:
        out.append((str(name), np.asarray(a)))
    return out


def layout_for(arrays) -> list[LayoutEntry]:
    """The layout of `arrays` (a list of (name, array) or a dict, in that order): each tensor at the
    next 64-byte aligned offset."""
    layout, pos, seen = [], 0, set()
    for name, a in _items(arrays):
        if name in seen:
            raise TdcError(f"weight {name!r} is given twice")
        seen.add(name)
        if a.ndim > MAX_RANK:
            raise TdcError(f"weight {name!r} has rank {a.ndim}; at most {MAX_RANK} is supported")
        dt = _dtype_name(a, name)
        nbytes = int(a.size) * NUMPY_DTYPES[dt].itemsize
        layout.append(LayoutEntry(name, DTYPE_CODES[dt], tuple(int(d) for d in a.shape), pos, nbytes))
        pos = _round_up(pos + nbytes)
    return layout


def payload_size(layout: Iterable) -> int:
    """The payload bytes of a layout (TDC_WEIGHTS_BYTES): its end rounded up to 64."""
    return _round_up(max((int(e[3]) + int(e[4]) for e in layout), default=0))


def _check_layout(layout, payload_bytes: int) -> list[LayoutEntry]:
    out, seen = [], set()
    for e in layout:
        e = LayoutEntry(str(e[0]), int(e[1]), tuple(int(d) for d in e[2]), int(e[3]), int(e[4]))
        if e.name in seen:
            raise TdcError(f"weights layout: {e.name!r} appears twice")
        seen.add(e.name)
        if e.dtype not in CODE_DTYPES:
            raise TdcError(f"weights layout: {e.name!r} has unknown dtype code {e.dtype}")
        if len(e.shape) > MAX_RANK or any(d < 0 for d in e.shape):
            raise TdcError(f"weights layout: {e.name!r} has an invalid shape {list(e.shape)}")
        want = int(np.prod(e.shape, dtype=np.int64)) * NUMPY_DTYPES[CODE_DTYPES[e.dtype]].itemsize
        if e.nbytes != want:
            raise TdcError(f"weights layout: {e.name!r} has nbytes {e.nbytes}, its shape needs {want}")
        if e.offset < 0 or e.offset + e.nbytes > payload_bytes:
            raise TdcError(f"weights layout: {e.name!r} at offset {e.offset} ({e.nbytes} bytes) "
                           f"lies outside the {payload_bytes}-byte buffer")
        out.append(e)
    return out


def pack_payload(entries, layout=None, payload_bytes: int | None = None, base: bytes | None = None) -> bytes:
    """The weights buffer (TDC_WEIGHTS_BYTES bytes) holding `entries` placed by `layout`
    (default layout_for(entries)); what an embedded-weights object holds as NAME_weights_data.
    `base` (payload_bytes) gives the bytes no entry covers: a model's large constants."""
    items = _items(entries)
    if layout is None:
        layout = layout_for(items)
    if payload_bytes is None:
        payload_bytes = payload_size(layout)
    layout = _check_layout(layout, payload_bytes)
    arrays = dict(items)
    if len(arrays) != len(items):
        raise TdcError("a weight is given twice")
    buf = bytearray(payload_bytes) if base is None else bytearray(base)
    if len(buf) != payload_bytes:
        raise TdcError(f"weights payload: {len(buf)} base bytes for a {payload_bytes}-byte buffer")
    for e in layout:
        if e.name not in arrays:
            raise TdcError(f"weight {e.name!r} of the layout has no array")
        a = arrays[e.name]
        dt = CODE_DTYPES[e.dtype]
        if _dtype_name(a, e.name) != dt or tuple(a.shape) != e.shape:
            raise TdcError(f"weight {e.name!r}: layout says {dt}{list(e.shape)}, "
                           f"array is {_dtype_name(a, e.name)}{list(a.shape)}")
        buf[e.offset:e.offset + e.nbytes] = np.ascontiguousarray(a, dtype=NUMPY_DTYPES[dt]).tobytes()
    extra = set(arrays) - {e.name for e in layout}
    if extra:
        raise TdcError(f"weight {sorted(extra)[0]!r} is not in the layout")
    return bytes(buf)


def _encode_entries(layout: list[LayoutEntry]) -> bytes:
    parts = []
    for e in layout:
        name = e.name.encode("utf-8")
        if b"\0" in name:
            raise TdcError(f"weight name {e.name!r} contains a NUL byte")
        parts.append(struct.pack("<I", len(name)) + name + struct.pack("<II", e.dtype, len(e.shape))
                     + struct.pack(f"<{len(e.shape)}q", *e.shape) + struct.pack("<QQ", e.offset, e.nbytes))
    return b"".join(parts)


def encode_weights(entries, layout=None, payload_bytes: int | None = None, base: bytes | None = None) -> bytes:
    """The whole weights file as bytes."""
    items = _items(entries)
    if layout is None:
        layout = layout_for(items)
    if payload_bytes is None:
        payload_bytes = payload_size(layout)
    payload = pack_payload(items, layout, payload_bytes, base)
    layout = _check_layout(layout, payload_bytes)
    head = HEADER.pack(MAGIC, payload_bytes, len(layout), fnv1a64(payload)) + _encode_entries(layout)
    return head + bytes(_round_up(len(head)) - len(head)) + payload


def write_weights(path: str, entries, layout=None, payload_bytes: int | None = None,
                  base: bytes | None = None) -> None:
    """Write `entries` (list of (name, array), or a dict) as a weights file, atomically.
    `layout` (list of (name, dtype_code, shape, offset, nbytes)) is where each tensor goes; by
    default layout_for(entries). `payload_bytes` defaults to payload_size(layout) and must equal
    the model's TDC_WEIGHTS_BYTES; `base` is the payload before the entries go in (pack_payload)."""
    data = encode_weights(entries, layout, payload_bytes, base)
    atomic_write(path, lambda f: f.write(data))


def is_weights_file(path: str) -> bool:
    """Whether `path` is a readable file starting with the weights-file magic."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_weights_layout(path: str) -> tuple[list[LayoutEntry], bytes]:
    """The layout and payload of a weights file, validated (magic, sizes, entries, checksum)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TdcError(f"{path}: no such file") from None
    except OSError as e:
        raise TdcError(f"{path}: cannot read ({e.strerror or e})") from None

    def bad(msg: str):
        return TdcError(f"{path}: {msg}")

    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise bad("not a tdc weights file (bad magic)")
    if len(data) < HEADER.size:
        raise bad(f"truncated weights file ({len(data)} bytes, shorter than its header)")
    _, payload_bytes, n_entries, checksum = HEADER.unpack_from(data, 0)
    pos = HEADER.size
    if n_entries > (len(data) - pos) // 28:  # 28: the smallest entry (empty name, rank 0)
        raise bad(f"truncated or corrupt weights file (header says {n_entries} entries)")

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise bad("truncated weights file (ends inside the entry table)")
        out = data[pos:pos + n]
        pos += n
        return out

    layout, seen = [], set()
    for i in range(n_entries):
        (name_len,) = struct.unpack("<I", take(4))
        try:
            name = take(name_len).decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"corrupt weights file (entry {i} has a name that is not utf-8)") from None
        dtype, rank = struct.unpack("<II", take(8))
        if dtype not in CODE_DTYPES:
            raise bad(f"corrupt weights file (weight {name!r} has unknown dtype code {dtype})")
        if rank > MAX_RANK:
            raise bad(f"corrupt weights file (weight {name!r} has rank {rank})")
        shape = struct.unpack(f"<{rank}q", take(8 * rank))
        offset, nbytes = struct.unpack("<QQ", take(16))
        if name in seen:
            raise bad(f"corrupt weights file (weight {name!r} appears twice)")
        seen.add(name)
        if any(d < 0 for d in shape):
            raise bad(f"corrupt weights file (weight {name!r} has shape {list(shape)})")
        itemsize = NUMPY_DTYPES[CODE_DTYPES[dtype]].itemsize
        if nbytes != int(np.prod(shape, dtype=object)) * itemsize or offset + nbytes > payload_bytes:
            raise bad(f"corrupt weights file (weight {name!r}: {nbytes} bytes at offset {offset} do not "
                      f"fit its shape {list(shape)} or the {payload_bytes}-byte payload)")
        layout.append(LayoutEntry(name, dtype, tuple(shape), offset, nbytes))
    start = _round_up(pos)
    if len(data) < start + payload_bytes:
        raise bad(f"truncated weights file ({len(data)} bytes, its header says {start + payload_bytes})")
    if len(data) > start + payload_bytes:
        raise bad(f"corrupt weights file ({len(data) - start - payload_bytes} unexpected bytes at the end)")
    payload = data[start:]
    if fnv1a64(payload) != checksum:
        raise bad("corrupt weights file (checksum mismatch)")
    return layout, payload


def read_weights(path: str) -> dict[str, np.ndarray]:
    """The tensors of a weights file by name (writable copies), after validating it."""
    layout, payload = read_weights_layout(path)
    out = {}
    for e in layout:
        dt = NUMPY_DTYPES[CODE_DTYPES[e.dtype]]
        out[e.name] = np.frombuffer(payload, dtype=dt, count=e.nbytes // dt.itemsize,
                                    offset=e.offset).reshape(e.shape).astype(dt.newbyteorder("="))
    return out



# ---- .npz files --------------------------------------------------------------------------------

def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Arrays by name from a .npz file, a native executable's weights file or a compressed model
    file (tdc compress; decoded to dense arrays)."""
    if not os.path.exists(path):
        raise TdcError(f"{path}: no such file")
    if is_weights_file(path):
        return read_weights(path)
    from .compressed import is_compressed_file, read_compressed
    if is_compressed_file(path):
        return read_compressed(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise TdcError(f"{path}: not a readable .npz weights file ({e})") from None


def save_weights(path: str, values: dict[str, np.ndarray]) -> None:
    save_npz(path, values)


CHECKPOINT_STATE = "state/"     # a training checkpoint (runtime/checkpoint.py) keeps its arrays under this


def load_weights(path: str, graph: Graph, strict: bool = True, warn=None) -> dict[str, np.ndarray]:
    """The params, consts and state of `graph` from `path` (a .npz of weights, a training
    checkpoint, or a native bundle's weights file), checked by name, shape, dtype and finiteness.
    With strict=False, args missing from the file are left out (they get initialised). Arrays the
    graph does not have are reported through `warn` (default: a line on stderr), except a
    checkpoint's optimizer state."""
    data = load_npz(path)
    checkpoint = "meta" in data and any(k.startswith(CHECKPOINT_STATE) for k in data)
    if checkpoint:
        data = {k[len(CHECKPOINT_STATE):]: v for k, v in data.items() if k.startswith(CHECKPOINT_STATE)}
    known = {a.name for a in graph.args}
    unused = sorted(k for k in data if k not in known)
    if unused and not checkpoint:
        (warn or _warn)(f"{path}: ignoring {len(unused)} array(s) the model does not have: "
                        + ", ".join(unused[:8]) + (", ..." if len(unused) > 8 else ""))
    out = {}
    for a in graph.args:
        if a.kind == "input":
            continue
        if a.name not in data:
            if strict and a.kind != "state":
                raise TdcError(f"{path}: no value for {a.kind} {a.name} ({a.type})")
            continue
        x = data[a.name]
        if a.type.dtype == "bf16" and x.dtype == np.dtype("V2"):
            x = x.view(a.type.np_dtype)    # .npz, like .npy, keeps a bfloat16 array as raw 2-byte voids
        if x.shape != a.type.shape:
            raise TdcError(f"{path}: {a.kind} {a.name} has shape {list(x.shape)}, the model needs {list(a.type.shape)}")
        if x.dtype != a.type.np_dtype:
            raise TdcError(f"{path}: {a.kind} {a.name} has dtype {x.dtype}, the model needs {a.type.dtype}")
        if (x.dtype.kind == "f" or a.type.dtype == "bf16") and not np.isfinite(x).all():
            raise TdcError(f"{path}: {a.kind} {a.name} holds {int((~np.isfinite(x)).sum())} NaN or infinite values "
                           "(did its training diverge?)")
        out[a.name] = x
    return out


def _warn(message: str) -> None:
    import sys
    print(f"tdc: warning: {message}", file=sys.stderr)


# ---- checksum --------------------------------------------------------------------------------

_fnv_jit = None


def _fnv_numba(buf: np.ndarray) -> int:
    global _fnv_jit
    if _fnv_jit is None:
        import numba

        def fnv(b):
            h = np.uint64(FNV_OFFSET)
            p = np.uint64(FNV_PRIME)
            for i in range(b.shape[0]):
                h = (h ^ np.uint64(b[i])) * p
            return h

        try:
            _fnv_jit = numba.njit(cache=True, nogil=True)(fnv)
        except Exception:  # no writable cache location
            _fnv_jit = numba.njit(cache=False, nogil=True)(fnv)
    return int(_fnv_jit(buf))


def fnv1a64(data) -> int:
    """FNV-1a 64 of a bytes-like object."""
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    if buf.size >= 1 << 22:  # ~0.4 s in pure Python, about what compiling the numba loop takes
        try:
            return _fnv_numba(buf)
        except ImportError:
            pass
    h = FNV_OFFSET
    for b in buf.tobytes():
        h = ((h ^ b) * FNV_PRIME) & _MASK
    return h


__all__ = ["ALIGN", "DTYPE_CODES", "CODE_DTYPES", "LayoutEntry", "MAGIC", "encode_weights",
           "fnv1a64", "is_weights_file", "layout_for", "pack_payload", "payload_size",
           "read_weights", "read_weights_layout", "write_weights",
           "save_npz", "load_npz", "save_weights", "load_weights"]
