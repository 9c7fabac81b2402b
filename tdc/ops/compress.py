"""Gradient compression: what goes on the wire instead of a dense float32 gradient.

A compressor turns a flat float32 gradient into a message (a few numpy arrays: exactly the bytes
sent) and back into a dense array:

    topk:F  (or topk:K)   the F fraction (K count) of largest-magnitude values: int32 index + float32 value
    threshold:T           the values with |g| > T, as (index, value) pairs
    sign                  1-bit SGD (Seide et al. 2014): the sign bits, packed, and one scale: the mean |g|
    terngrad              TernGrad (Wen et al. 2017): stochastic ternary {-s, 0, s}, s = max |g|, 2 bits a value
    qsgd:S                QSGD (Alistarh et al. 2017): |g| / ||g|| in S levels, stochastic rounding, 1 byte a value
    fp16, bf16            16-bit floats: IEEE half, or bfloat16 (the top half of a float32: "drop two bytes
                          of mantissa"); add :sr for stochastic rounding (unbiased)

`ErrorFeedback` keeps what compression dropped and adds it to the next gradient (so nothing is
lost, only delayed); `DGC` adds Deep Gradient Compression's momentum correction, local gradient
clipping and sparsity warm-up (Lin et al. 2018) to top-k. A sparse message is summed over ranks by
an allgather of the messages; a dense one by an allreduce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import TdcError


class Compressor:
    """encode(g, rng) -> message (a list of arrays); decode(message, n) -> float32 [n]."""
    name = "none"
    sparse = False       # summed over ranks by gathering every rank's message

    def encode(self, g: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return [np.ascontiguousarray(g, np.float32)]

    def wire_bytes(self, n: int) -> int | None:
        """The bytes of the message for n values (None: it depends on the values)."""
        return 4 * n

    def decode(self, msg: list[np.ndarray], n: int) -> np.ndarray:
        return np.asarray(msg[0], np.float32)

    def __repr__(self):
        return self.name


def nbytes(msg: list[np.ndarray]) -> int:
    return sum(a.nbytes for a in msg)


class TopK(Compressor):
    sparse = True

    def __init__(self, fraction: float | None = None, count: int | None = None):
        if (fraction is None) == (count is None):
            raise TdcError("topk needs a fraction in (0, 1] (topk:0.001) or a count >= 1 (topk:100)")
        if fraction is not None and not 0 < fraction <= 1:
            raise TdcError(f"topk fraction must be in (0, 1], got {fraction}")
        if count is not None and count < 1:
            raise TdcError(f"topk count must be >= 1, got {count}")
        self.fraction, self.count = fraction, count
        self.name = f"topk:{fraction if fraction is not None else count}"

    def k(self, n: int, fraction: float | None = None) -> int:
        f = fraction if fraction is not None else self.fraction
        return min(n, self.count if f is None else max(1, math.ceil(f * n)))

    def encode(self, g, rng, fraction: float | None = None):
        k = self.k(len(g), fraction)
        idx = np.argpartition(np.abs(g), len(g) - k)[len(g) - k:] if k < len(g) else np.arange(len(g))
        idx = np.sort(idx).astype(np.int32)
        return [idx, g[idx].astype(np.float32)]

    def wire_bytes(self, n):
        return 8 * self.k(n)      # an int32 index and a float32 value each

    def decode(self, msg, n):
        out = np.zeros(n, np.float32)
        np.add.at(out, msg[0], msg[1])
        return out


class Threshold(TopK):
    def __init__(self, threshold: float):
        if not threshold > 0:
            raise TdcError(f"threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self.name = f"threshold:{threshold}"

    def wire_bytes(self, n):
        return None

    def encode(self, g, rng, fraction=None):
        idx = np.flatnonzero(np.abs(g) > self.threshold).astype(np.int32)
        return [idx, g[idx].astype(np.float32)]


class Sign(Compressor):
    """1-bit SGD (Seide et al. 2014): a bit a value and two reconstruction values, the means of
    the non-negative and of the negative values, which minimise the squared error of the
    bits' decoding (error feedback carries what remains to the next step)."""
    name = "sign"

    def encode(self, g, rng):
        pos = g >= 0
        means = np.array([g[pos].mean() if pos.any() else 0.0, g[~pos].mean() if (~pos).any() else 0.0], np.float32)
        return [np.packbits(pos), means]

    def wire_bytes(self, n):
        return -(-n // 8) + 8

    def decode(self, msg, n):
        bits = np.unpackbits(msg[0], count=n).astype(bool)
        return np.where(bits, msg[1][0], msg[1][1]).astype(np.float32)


class TernGrad(Compressor):
    """TernGrad (Wen et al. 2017): g is first clipped to 2.5 standard deviations (the paper's
    gradient clipping, which keeps the scale s = max |g| and so the variance down), then each
    value is s * sign(g) with probability |g| / s, else 0: unbiased for the clipped g."""
    name = "terngrad"
    CLIP = 2.5

    def encode(self, g, rng):
        if len(g):
            c = self.CLIP * float(np.std(g))
            g = np.clip(g, -c, c) if c > 0 else g
        s = np.float32(np.abs(g).max() if len(g) else 0.0)
        keep = rng.random(len(g)) < (np.abs(g) / s if s > 0 else 0)
        code = np.where(keep, np.where(g >= 0, 1, 2), 0).astype(np.uint8)          # 0: 0, 1: +s, 2: -s
        pad = (-len(code)) % 4
        packed = np.pad(code, (0, pad)).reshape(-1, 4)
        packed = packed[:, 0] | packed[:, 1] << 2 | packed[:, 2] << 4 | packed[:, 3] << 6
        return [packed.astype(np.uint8), np.array([s], np.float32)]

    def wire_bytes(self, n):
        return -(-n // 4) + 4

    def decode(self, msg, n):
        b = msg[0]
        code = np.stack([b & 3, b >> 2 & 3, b >> 4 & 3, b >> 6 & 3], axis=1).reshape(-1)[:n]
        return np.select([code == 1, code == 2], [msg[1][0], -msg[1][0]], 0).astype(np.float32)


class QSGD(Compressor):
    """Unbiased: |g| / ||g|| in `levels` levels, rounded up with the probability of the remainder."""

    def __init__(self, levels: int = 127):
        if not 1 <= levels <= 127:
            raise TdcError(f"qsgd needs 1 to 127 levels (one signed byte a value), got {levels}")
        self.levels = levels
        self.name = f"qsgd:{levels}"

    def encode(self, g, rng):
        norm = np.float32(np.linalg.norm(g))
        if norm == 0:
            return [np.zeros(len(g), np.int8), np.array([0.0], np.float32)]
        scaled = np.abs(g) / norm * self.levels
        low = np.floor(scaled)
        level = low + (rng.random(len(g)) < scaled - low)
        return [(np.sign(g) * level).astype(np.int8), np.array([norm], np.float32)]

    def wire_bytes(self, n):
        return n + 4

    def decode(self, msg, n):
        return msg[0].astype(np.float32) * (msg[1][0] / self.levels)


class Half(Compressor):
    """IEEE float16 (2 bytes), or bfloat16: the top 16 bits of the float32 (8 bits of exponent,
    7 of mantissa). Truncation rounds toward zero; with stochastic rounding the bits cut off
    decide the probability of rounding up, so the value is right on average."""

    def __init__(self, kind: str, stochastic: bool = False):
        self.kind, self.stochastic = kind, stochastic
        self.name = kind + (":sr" if stochastic else "")

    def encode(self, g, rng):
        g = np.ascontiguousarray(g, np.float32)
        if self.kind == "bf16":
            bits = g.view(np.uint32)
            if self.stochastic:     # add 16 random low bits: a carry into the kept half rounds up
                noise = rng.integers(0, 1 << 16, len(g), dtype=np.uint32)
                finite = np.isfinite(g)
                bits = np.where(finite, bits + noise, bits)
            return [(bits >> 16).astype(np.uint16)]
        if not self.stochastic:
            return [g.astype(np.float16)]
        lo = g.astype(np.float16)                 # nearest; step to the neighbour on g's other side
        lo32 = lo.astype(np.float32)
        toward = np.where(lo32 > g, -np.inf, np.inf).astype(np.float16)
        other = np.nextafter(lo, toward)
        gap = np.abs(other.astype(np.float32) - lo32)
        p = np.where(gap > 0, np.abs(g - lo32) / np.where(gap > 0, gap, 1), 0)
        return [np.where(rng.random(len(g)) < p, other, lo)]

    def wire_bytes(self, n):
        return 2 * n

    def decode(self, msg, n):
        if self.kind == "bf16":
            return (msg[0].astype(np.uint32) << 16).view(np.float32)
        return msg[0].astype(np.float32)


@dataclass(frozen=True)
class Compression:
    """What `--compress SPEC` asks for: a compressor, whether error feedback keeps what it drops,
    and Deep Gradient Compression's settings (for dgc:F)."""
    spec: str
    compressor: Compressor
    error_feedback: bool
    dgc: bool = False
    clip: float | None = None         # dgc: local gradient clipping to this norm (over all workers)
    warmup: int = 0                   # dgc: steps of sparsity warm-up

    @property
    def enabled(self) -> bool:
        return self.compressor.name != "none"

    def encoder(self, momentum: float = 0.0, workers: int = 1) -> "Encoder":
        """A fresh stateful encoder (one per rank): plain, with error feedback, or DGC."""
        if self.dgc:
            return DGC(self.compressor, momentum=momentum, clip=self.clip, workers=workers, warmup_steps=self.warmup,
                       error_feedback=self.error_feedback)
        return ErrorFeedback(self.compressor) if self.error_feedback else Encoder(self.compressor)


COMPRESS_HELP = ("none; topk:F (fraction F, or count when F >= 1) or threshold:T, sparse with error feedback; "
                 "dgc:F (top-k with Deep Gradient Compression's momentum correction, clipping and warm-up); sign "
                 "(1-bit SGD, with error feedback); terngrad; qsgd:S (S levels); fp16, bf16 (:sr for stochastic "
                 "rounding). Options after commas: ef=0|1 (error feedback), and for dgc warmup=STEPS, clip=NORM")


def parse_compression(spec: str) -> Compression:
    """`--compress` text: NAME[:ARG][,key=value...] (see COMPRESS_HELP)."""
    head, *opts = spec.split(",")
    options = {}
    for o in opts:
        k, eq, v = o.partition("=")
        if not eq or k not in ("ef", "warmup", "clip"):
            raise TdcError(f"--compress {spec}: unknown option {o!r}; options are ef=0|1, warmup=STEPS, clip=NORM")
        options[k] = v
    name, _, arg = head.partition(":")
    compressor = make_compressor(head)
    try:
        ef = bool(int(options["ef"])) if "ef" in options else name in ("topk", "threshold", "sign", "dgc")
        dgc = name == "dgc"
        if not dgc and ({"warmup", "clip"} & set(options)):
            raise TdcError(f"--compress {spec}: warmup and clip are options of dgc")
        warmup = int(options.get("warmup", 0))
        clip = float(options["clip"]) if "clip" in options else None
    except ValueError:
        raise TdcError(f"--compress {spec}: bad option value") from None
    if warmup < 0 or (clip is not None and not clip > 0):
        raise TdcError(f"--compress {spec}: warmup must be >= 0 and clip > 0")
    return Compression(spec, compressor, ef, dgc, clip, warmup)


def make_compressor(spec: str) -> Compressor:
    """A compressor from its command-line name (see the module's docstring)."""
    name, _, arg = spec.partition(":")
    try:
        if name == "none":
            return Compressor()
        if name in ("topk", "dgc"):
            value = float(arg) if arg else 0.001
            return TopK(fraction=value) if value < 1 else TopK(count=int(value))
        if name == "threshold":
            return Threshold(float(arg))
        if name == "sign":
            return Sign()
        if name == "terngrad":
            return TernGrad()
        if name == "qsgd":
            return QSGD(int(arg) if arg else 127)
        if name in ("fp16", "bf16"):
            if arg not in ("", "sr"):
                raise ValueError(arg)
            return Half(name, stochastic=arg == "sr")
    except ValueError:
        raise TdcError(f"--compress {spec}: bad argument {arg!r}") from None
    raise TdcError(f"unknown compressor {spec!r}; choose from none, topk:F, threshold:T, sign, terngrad, qsgd:S, "
                   "fp16[:sr], bf16[:sr], dgc:F")


class Encoder:
    """A rank's compression of its tensors, step after step (the stateless base: none kept)."""

    def __init__(self, compressor: Compressor):
        self.c = compressor

    def encode(self, key, g: np.ndarray, rng) -> list[np.ndarray]:
        return self.c.encode(np.ascontiguousarray(g, np.float32), rng)

    def next_step(self):
        pass


class ErrorFeedback(Encoder):
    """Compression with memory: what a message drops is added to the next gradient (per tensor
    key), so every gradient value reaches the sum sooner or later."""

    def __init__(self, compressor: Compressor):
        super().__init__(compressor)
        self.residual: dict = {}

    def encode(self, key, g: np.ndarray, rng) -> list[np.ndarray]:
        x = g + self.residual.get(key, 0.0)
        msg = self.c.encode(x, rng)
        self.residual[key] = x - self.c.decode(msg, len(x))
        return msg


class DGC(ErrorFeedback):
    """Deep Gradient Compression (top-k): the momentum is kept locally and corrected (velocities
    accumulate, and what is sent leaves both the accumulator and the momentum), each worker's
    gradient is clipped to norm `clip` / sqrt(workers) first, and the density warms up from 25%
    to the target over `warmup_steps` (exponentially, as the paper's 25%, 6.25%, 1.56%, 0.4%...).
    The update then applies the summed velocities with plain SGD. error_feedback=False is the
    ablation: what is not sent is dropped instead of accumulated."""

    def __init__(self, topk: Compressor, momentum: float = 0.9, clip: float | None = None, workers: int = 1,
                 warmup_steps: int = 0, error_feedback: bool = True):
        if not isinstance(topk, TopK) or isinstance(topk, Threshold):
            raise TdcError(f"DGC sparsifies by top-k, not by {topk.name}")
        super().__init__(topk)
        self.momentum, self.clip, self.workers, self.warmup_steps = momentum, clip, workers, warmup_steps
        self.error_feedback = error_feedback
        self.velocity: dict = {}
        self.step = 0

    def density(self) -> float:
        target = self.c.fraction if self.c.fraction is not None else 0.001
        if self.step >= self.warmup_steps:
            return target
        frac = self.step / max(1, self.warmup_steps)
        return float(0.25 * (target / 0.25) ** frac)      # exponential from 25% down to the target

    def encode(self, key, g, rng):
        if self.clip is not None:
            norm = float(np.linalg.norm(g))
            limit = self.clip / math.sqrt(self.workers)
            if norm > limit:
                g = g * (limit / norm)
        u = self.momentum * self.velocity.get(key, 0.0) + g          # momentum correction
        v = self.residual.get(key, 0.0) + u                          # accumulated velocity
        msg = self.c.encode(v, rng, fraction=self.density() if self.c.fraction is not None else None)
        sent = np.zeros(len(v), bool)
        sent[msg[0]] = True
        self.residual[key] = np.where(sent, 0.0, v if self.error_feedback else 0.0).astype(np.float32)
        self.velocity[key] = np.where(sent, 0.0, u).astype(np.float32)   # momentum factor masking
        return msg

    def next_step(self):
        self.step += 1


def dense_cheaper(compressor: Compressor, n: int, ranks: int) -> bool:
    """Whether a ring allreduce of n float32 values sends fewer bytes per rank than an allgather
    of the compressed messages: 2 (p - 1) / p * 4n against (p - 1) * message."""
    msg = compressor.wire_bytes(n)
    return msg is not None and (ranks - 1) * msg >= 2 * (ranks - 1) / ranks * 4 * n


def round_trip(spec: str, x: np.ndarray, seed: int) -> np.ndarray:
    """decode(encode(x)) by the compressor of `spec`, with no state kept between calls (the
    reference's view of a compressed collective: error feedback and DGC's momentum are state the
    staged runtime keeps from step to step)."""
    c = parse_compression(spec).compressor
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    return c.decode(c.encode(flat, np.random.default_rng(seed)), flat.size).reshape(x.shape).astype(x.dtype)
