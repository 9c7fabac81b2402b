"""The compressed model file of Deep Compression (Han et al. 2016): pruned, shared, Huffman-coded.

A shared weight W (n values, nnz of them kept) is stored as two streams of symbols and a codebook:

    gaps     where the kept weights are: the distance to the previous kept one in b bits. A gap
             longer than the largest symbol G = 2^b - 1 is written as fillers, each the symbol G,
             meaning "G positions further, no weight here" (the paper's bounded relative index;
             its fillers hold a zero weight, ours need no weight code at all)
    codes    the cluster of each kept weight, in q = ceil(log2 k) bits
    centroids  k float32 values: W[i] = centroids[code] where kept, 0 elsewhere

and every other array (biases, normalization params, ...) raw. With Huffman coding each stream
is a canonical Huffman code (its code lengths stored, 5 bits per symbol, none over 24 bits)
instead of fixed-width symbols. b is chosen per layer, 1..8, for the smallest stream; b = 0 when
no weight of the layer is pruned (there are then no gaps to store).

File: MAGIC | u64 header length | header (zlib'd JSON) | payload | u64 FNV-1a of all before it.
The header lists the arrays with their codec, shapes and the byte ranges of their streams in the
payload. `read_compressed` refuses a truncated or corrupted file with a message naming it.
"""
from __future__ import annotations

import heapq
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..files import atomic_write
from .weights import NUMPY_DTYPES, _dtype_name, fnv1a64

MAGIC = b"TDCDEEP1"
MAX_CODE_BITS = 24      # longest Huffman code; decoding looks codes up in a 2^24-entry-or-smaller table
LENGTH_BITS = 5         # a Huffman code length as stored (0..MAX_CODE_BITS)
MAX_INDEX_BITS = 8


@dataclass
class SharedWeight:
    """A weight whose kept values share k centroids: `codes` holds each weight's cluster, -1 where pruned."""
    codes: np.ndarray        # integer, the weight's shape
    centroids: np.ndarray    # float32 [k]

    def dense(self) -> np.ndarray:
        return np.where(self.codes >= 0, self.centroids[np.maximum(self.codes, 0)], 0).astype(np.float32)


# ---- symbols and bits ------------------------------------------------------------------------

def gap_symbols(kept: np.ndarray, index_bits: int) -> np.ndarray:
    """The gap stream of a flat boolean mask: per kept weight, fillers then its gap."""
    top = (1 << index_bits) - 1
    pos = np.flatnonzero(kept)
    gaps = np.diff(pos, prepend=-1) - 1
    fillers = gaps // top
    out = np.full(len(pos) + int(fillers.sum()), top, np.int64)
    ends = np.cumsum(fillers + 1) - 1       # where each kept weight's own symbol goes
    out[ends] = gaps % top
    return out


def positions(symbols: np.ndarray, index_bits: int, n: int) -> np.ndarray:
    """The kept positions a gap stream names (the inverse of gap_symbols)."""
    top = (1 << index_bits) - 1
    steps = np.where(symbols == top, top, symbols + 1)
    pos = np.cumsum(steps) - 1
    pos = pos[symbols != top]
    if len(pos) and pos[-1] >= n:
        raise ValueError(f"its index stream points past its {n} weights")
    return pos


def _pack_fixed(symbols: np.ndarray, bits: int) -> bytes:
    shifts = np.arange(bits - 1, -1, -1)
    return np.packbits(((symbols[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)).tobytes()


def _unpack_fixed(data: bytes, bits: int, count: int) -> np.ndarray:
    b = np.unpackbits(np.frombuffer(data, np.uint8))[:count * bits]
    if len(b) < count * bits:
        raise ValueError("a stream is shorter than its symbols")
    return (b.reshape(count, bits).astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(axis=1)


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code lengths of an optimal prefix code for symbol counts, none over MAX_CODE_BITS (0 for unused symbols)."""
    counts = np.asarray(counts, np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), np.int64)
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    c = counts[used].copy()
    while True:
        heap = [(int(w), i, [i]) for i, w in enumerate(c)]
        heapq.heapify(heap)
        depth = np.zeros(len(c), np.int64)
        tie = len(c)
        while len(heap) > 1:
            w1, _, s1 = heapq.heappop(heap)
            w2, _, s2 = heapq.heappop(heap)
            depth[s1 + s2] += 1
            heapq.heappush(heap, (w1 + w2, tie, s1 + s2))
            tie += 1
        if depth.max() <= MAX_CODE_BITS:
            lengths[used] = depth
            return lengths
        c = (c + 1) // 2       # flatten the distribution until the longest code fits


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes: symbols sorted by (length, symbol) get consecutive codes."""
    codes = np.zeros(len(lengths), np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """The bit stream of `symbols` under the canonical code with these lengths, and its length in bits."""
    codes = _canonical_codes(lengths)
    L = lengths[symbols]
    total = int(L.sum())
    owner = np.repeat(np.arange(len(symbols)), L)
    bit_in = np.arange(total) - np.repeat(np.cumsum(L) - L, L)
    bits = (codes[symbols][owner] >> (L[owner] - 1 - bit_in)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes(), total


def huffman_decode(data: bytes, lengths: np.ndarray, count: int, nbits: int) -> np.ndarray:
    """`count` symbols from a canonical Huffman bit stream of `nbits` bits."""
    if count == 0:
        return np.zeros(0, np.int64)
    width = int(lengths.max())
    if width == 0:
        raise ValueError("a Huffman stream has no code")
    codes = _canonical_codes(lengths)
    table_sym = np.full(1 << width, -1, np.int64)
    table_len = np.zeros(1 << width, np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (width - int(lengths[s]))
        hi = lo + (1 << (width - int(lengths[s])))
        table_sym[lo:hi], table_len[lo:hi] = s, lengths[s]
    bits = np.unpackbits(np.frombuffer(data, np.uint8))[:nbits].astype(np.int64)
    if len(bits) < nbits:
        raise ValueError("a Huffman stream is shorter than its header says")
    padded = np.concatenate([bits, np.zeros(width, np.int64)])
    window = np.zeros(nbits + 1, np.int64)       # the `width` bits from each position on, as a number
    for j in range(width):
        window = (window << 1) | padded[j:j + nbits + 1]
    out = np.empty(count, np.int64)
    length, symbol = table_len[window].tolist(), table_sym[window].tolist()
    p = 0
    for i in range(count):
        if p >= nbits or symbol[p] < 0:
            raise ValueError("a Huffman stream holds a bit pattern that is no code, or ends early")
        out[i] = symbol[p]
        p += length[p]
    if p != nbits:
        raise ValueError("a Huffman stream is longer than its symbols")
    return out


# ---- streams -----------------------------------------------------------------------------------

@dataclass
class Stream:
    """One coded stream: its symbols' alphabet, fixed width, and Huffman code lengths (None: fixed-width)."""
    data: bytes
    count: int
    alphabet: int
    width: int
    bits: int                      # the data's length in bits
    lengths: np.ndarray | None

    @property
    def table_bits(self) -> int:   # the code lengths stored with a Huffman stream
        return 0 if self.lengths is None else LENGTH_BITS * self.alphabet


def encode_stream(symbols: np.ndarray, alphabet: int, huffman: bool) -> Stream:
    width = max(1, math.ceil(math.log2(alphabet)))
    if not huffman:
        return Stream(_pack_fixed(symbols, width), len(symbols), alphabet, width, len(symbols) * width, None)
    lengths = huffman_lengths(np.bincount(symbols, minlength=alphabet)) if len(symbols) else np.ones(alphabet, np.int64)
    data, bits = huffman_encode(symbols, lengths)
    return Stream(data, len(symbols), alphabet, width, bits, lengths)


def decode_stream(s: Stream) -> np.ndarray:
    sym = _unpack_fixed(s.data, s.width, s.count) if s.lengths is None else \
        huffman_decode(s.data, s.lengths, s.count, s.bits)
    if len(sym) and sym.max() >= s.alphabet:
        raise ValueError(f"a stream holds symbol {int(sym.max())} of an alphabet of {s.alphabet}")
    return sym


@dataclass
class SharedLayer:
    """A shared weight as the file holds it."""
    shape: tuple[int, ...]
    index_bits: int
    gaps: Stream
    codes: Stream
    centroids: np.ndarray

    @property
    def nnz(self) -> int:
        return self.codes.count

    def bits(self) -> int:
        """What the layer takes in the file: both streams, their code tables and the codebook."""
        return (self.gaps.bits + self.gaps.table_bits + self.codes.bits + self.codes.table_bits
                + 32 * len(self.centroids))

    def fixed(self) -> tuple[int, int]:
        """(index bits, layer bits) of its best fixed-width coding (P+Q: no Huffman), which may
        take another index width than the Huffman-coded file's."""
        n = int(np.prod(self.shape))
        if self.index_bits == 0:
            return 0, self.codes.count * self.codes.width + 32 * len(self.centroids)
        kept = np.zeros(n, bool)
        kept[positions(decode_stream(self.gaps), self.index_bits, n)] = True
        b = min(range(1, MAX_INDEX_BITS + 1), key=lambda b: len(gap_symbols(kept, b)) * b)
        return b, len(gap_symbols(kept, b)) * b + self.codes.count * self.codes.width + 32 * len(self.centroids)


def encode_shared(w: SharedWeight, huffman: bool) -> SharedLayer:
    flat = w.codes.reshape(-1)
    kept = flat >= 0
    k = len(w.centroids)
    if k < 1 or (kept.any() and flat.max() >= k):
        raise TdcError(f"shared weight codes must be in [0, {k}) or -1, with k >= 1")
    codes = encode_stream(flat[kept].astype(np.int64), k, huffman)
    if kept.all():      # no weight pruned (binary weights, say): the positions go without saying
        return SharedLayer(tuple(w.codes.shape), 0, encode_stream(np.zeros(0, np.int64), 1, False), codes,
                           np.asarray(w.centroids, np.float32))
    best = None
    for b in range(1, MAX_INDEX_BITS + 1):
        gaps = encode_stream(gap_symbols(kept, b), 1 << b, huffman)
        if best is None or gaps.bits + gaps.table_bits < best[1].bits + best[1].table_bits:
            best = (b, gaps)
    return SharedLayer(tuple(w.codes.shape), best[0], best[1], codes, np.asarray(w.centroids, np.float32))


def decode_shared(layer: SharedLayer) -> np.ndarray:
    n = int(np.prod(layer.shape))
    if len(layer.centroids) != layer.codes.alphabet:
        raise ValueError(f"{len(layer.centroids)} centroids for {layer.codes.alphabet} codes")
    pos = np.arange(n) if layer.index_bits == 0 else positions(decode_stream(layer.gaps), layer.index_bits, n)
    codes = decode_stream(layer.codes)
    if len(pos) != len(codes):
        raise ValueError(f"its index stream names {len(pos)} weights but it has {len(codes)} codes")
    out = np.zeros(n, np.float32)
    out[pos] = layer.centroids[codes]
    return out.reshape(layer.shape)


# ---- the file ----------------------------------------------------------------------------------

def encode_compressed(raw: dict[str, np.ndarray], shared: dict[str, SharedLayer]) -> bytes:
    payload = bytearray()

    def put(b: bytes) -> list[int]:
        payload.extend(b)
        return [len(payload) - len(b), len(b)]

    def stream(s: Stream) -> dict:
        d = {"at": put(s.data), "count": s.count, "alphabet": s.alphabet, "width": s.width, "bits": s.bits}
        if s.lengths is not None:
            d["lengths"] = put(_pack_fixed(s.lengths, LENGTH_BITS))
        return d

    arrays = []
    for name, x in raw.items():
        x = np.ascontiguousarray(x)
        arrays.append({"name": name, "codec": "raw", "dtype": _dtype_name(x, name), "shape": list(x.shape),
                       "at": put(x.astype(x.dtype.newbyteorder("<")).tobytes())})
    for name, s in shared.items():
        arrays.append({"name": name, "codec": "shared", "dtype": "f32", "shape": list(s.shape),
                       "index_bits": s.index_bits, "gaps": stream(s.gaps), "codes": stream(s.codes),
                       "centroids": put(s.centroids.astype("<f4").tobytes())})
    header = zlib.compress(json.dumps({"arrays": arrays}, separators=(",", ":")).encode(), 9)
    body = MAGIC + struct.pack("<Q", len(header)) + header + bytes(payload)
    return body + struct.pack("<Q", fnv1a64(body))


def write_compressed(path: str, raw: dict[str, np.ndarray], shared: dict[str, SharedLayer]) -> None:
    data = encode_compressed(raw, shared)
    atomic_write(path, lambda f: f.write(data))


def is_compressed_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_compressed_layers(path: str) -> tuple[dict[str, np.ndarray], dict[str, SharedLayer]]:
    """The raw arrays and the shared layers (still coded) of a compressed file, validated."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TdcError(f"{path}: cannot read ({e.strerror or e})") from None

    def bad(msg: str) -> TdcError:
        return TdcError(f"{path}: {msg}")

    if data[:len(MAGIC)] != MAGIC:
        raise bad("not a tdc compressed model file (bad magic)")
    if len(data) < len(MAGIC) + 16:
        raise bad(f"truncated compressed model file ({len(data)} bytes)")
    (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8 + hlen
    if start + 8 > len(data):
        raise bad(f"truncated compressed model file ({len(data)} bytes; its header alone needs {start + 8})")
    if struct.unpack_from("<Q", data, len(data) - 8)[0] != fnv1a64(data[:-8]):
        raise bad("corrupt or truncated compressed model file (checksum mismatch)")
    payload = data[start:-8]
    try:
        header = json.loads(zlib.decompress(data[len(MAGIC) + 8:start]))
        raw, shared = {}, {}

        def take(at) -> bytes:
            off, n = (int(v) for v in at)
            if off < 0 or n < 0 or off + n > len(payload):
                raise ValueError(f"a range {off}+{n} outside the {len(payload)}-byte payload")
            return payload[off:off + n]

        def stream(d) -> Stream:
            lengths = _unpack_fixed(take(d["lengths"]), LENGTH_BITS, int(d["alphabet"])) if "lengths" in d else None
            if lengths is not None and lengths.max(initial=0) > MAX_CODE_BITS:
                raise ValueError("a Huffman code longer than the format allows")
            return Stream(take(d["at"]), int(d["count"]), int(d["alphabet"]), int(d["width"]), int(d["bits"]), lengths)

        for a in header["arrays"]:
            name, shape = a["name"], tuple(int(d) for d in a["shape"])
            if a["codec"] == "raw":
                dt = NUMPY_DTYPES[a["dtype"]]
                b = take(a["at"])
                if len(b) != int(np.prod(shape)) * dt.itemsize:
                    raise ValueError(f"{name} holds {len(b)} bytes, not {list(shape)} of {a['dtype']}")
                raw[name] = np.frombuffer(b, dt.newbyteorder("<")).astype(dt).reshape(shape)
            elif a["codec"] == "shared":
                if not 0 <= int(a["index_bits"]) <= MAX_INDEX_BITS:
                    raise ValueError(f"{name} has {a['index_bits']}-bit indices")
                shared[name] = SharedLayer(shape, int(a["index_bits"]), stream(a["gaps"]), stream(a["codes"]),
                                           np.frombuffer(take(a["centroids"]), "<f4").astype(np.float32))
            else:
                raise ValueError(f"{name} has an unknown codec {a['codec']!r}")
    except (ValueError, KeyError, TypeError, zlib.error) as e:
        raise bad(f"corrupt compressed model file ({e})") from None
    return raw, shared


def read_compressed(path: str) -> dict[str, np.ndarray]:
    """Every array of a compressed model file, decoded to dense arrays."""
    raw, shared = read_compressed_layers(path)
    out = dict(raw)
    for name, layer in shared.items():
        try:
            out[name] = decode_shared(layer)
        except ValueError as e:
            raise TdcError(f"{path}: corrupt compressed model file ({name}: {e})") from None
    return out
