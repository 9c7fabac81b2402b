"""Tensor types: a dtype and a static shape."""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..errors import TdcError

# IR name -> numpy dtype. Binary ops require equal dtypes (there is no implicit promotion).
DTYPES = {
    "bool": np.dtype(np.bool_),
    "i8": np.dtype(np.int8),
    "u8": np.dtype(np.uint8),
    "i16": np.dtype(np.int16),
    "u16": np.dtype(np.uint16),
    "i32": np.dtype(np.int32),
    "u32": np.dtype(np.uint32),
    "i64": np.dtype(np.int64),
    "u64": np.dtype(np.uint64),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f32": np.dtype(np.float32),
    "f64": np.dtype(np.float64),
}
_BY_NUMPY = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("f16", "f32", "f64")
SIGNED_DTYPES = ("i8", "i16", "i32", "i64")
UNSIGNED_DTYPES = ("u8", "u16", "u32", "u64")
INT_DTYPES = ("i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64")
# Storage-only dtypes: they are moved and cast, never computed on (ops without `storage=True`
# refuse them at build time). bf16 is not in FLOAT_DTYPES so that no float check admits it.
STORAGE_DTYPES = ("bf16",)


def dtype_name(dt) -> str:
    """The IR name of a dtype given as IR name, numpy dtype or numpy scalar type."""
    if isinstance(dt, str) and dt in DTYPES:
        return dt
    try:
        return _BY_NUMPY[np.dtype(dt)]
    except (TypeError, KeyError):
        raise TdcError(f"unsupported dtype {dt!r}; tdc supports {', '.join(DTYPES)}") from None


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def is_int(dtype: str) -> bool:
    return dtype in INT_DTYPES


def is_unsigned(dtype: str) -> bool:
    return dtype in UNSIGNED_DTYPES


def is_storage(dtype: str) -> bool:
    return dtype in STORAGE_DTYPES


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise TdcError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        shape = tuple(self.shape)
        for d in shape:
            if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 0:
                raise TdcError(f"bad dimension {d!r} in shape {shape}: dimensions are integers >= 0")
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.size * DTYPES[self.dtype].itemsize

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"

    @staticmethod
    def of(array) -> "TensorType":
        a = np.asarray(array)
        return TensorType(dtype_name(a.dtype), a.shape)
