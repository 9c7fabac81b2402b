"""Data sets for training, named as `tdc train --data` takes them:

    digits                      scikit-learn's 8x8 digits (bundled: no download)
    mnist:DIR                   MNIST's four IDX files (train-images-idx3-ubyte, ... optionally .gz)
    cifar10:DIR                 CIFAR-10's binary batches (data_batch_1.bin ... data_batch_5.bin, test_batch.bin)
    npz:FILE[:KEY=NAME,...]     one .npz with arrays x_train, y_train, x_test, y_test (other names: x_train=images, ...)
    npy:DIR                     a directory of x_train.npy, y_train.npy, x_test.npy, y_test.npy (memory-mapped)

    data = load_data("mnist:~/mnist")
    x = fit_to_model(data.x_train, model.input_types(batch)["x"])

Images are float32 (8-bit pixels are scaled to [0, 1]) shaped [N, C, H, W] or as the files
give them (fit_to_model reshapes samples whose element count matches the model's); labels are
int64 class indices.
"""
from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import TdcError
from ..ir.types import TensorType


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __repr__(self):
        return (f"<Dataset {self.name}: {len(self.x_train)} train, {len(self.x_test)} test, "
                f"samples {list(self.x_train.shape[1:])}, {self.num_classes} classes>")


# ---- digits ------------------------------------------------------------------------------

def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 1797 8x8 digits (bundled, no download) with a stratified split.
    The split depends only on `seed`, so test accuracy is comparable across runs."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise TdcError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    if not 0.0 < test_fraction < 1.0:
        raise TdcError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = sk_load_digits()
    x = (np.asarray(d.images, np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(d.target, np.int64)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.extend(idx[:int(round(len(idx) * test_fraction))])
    is_test = np.zeros(len(y), bool)
    is_test[test] = True
    # Shuffle the training order once so classes are interleaved even without per-epoch shuffling.
    train = rng.permutation(np.flatnonzero(~is_test))
    test = np.flatnonzero(is_test)
    return Dataset("digits", x[train], y[train], x[test], y[test], 10)


# ---- IDX (MNIST) -------------------------------------------------------------------------

# IDX type codes -> big-endian numpy dtypes
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: str) -> bytes:
    if not os.path.exists(path):
        raise TdcError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    # Detect gzip by its magic bytes, not the name: people gunzip files and keep the suffix, or vice versa.
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise TdcError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return raw


def read_idx(path: str, dtype: str | None = None, rank: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not). `dtype` ("u8", ...) and `rank`, when given,
    are what the caller expects; anything else is an error naming the file."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise TdcError(f"{path}: not an IDX file (only {len(raw)} bytes, the header alone needs 4)")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in IDX_DTYPES:
        raise TdcError(f"{path}: not an IDX file (bad magic number 0x{raw[:4].hex()}; "
                       f"expected 0x0000TTNN with type code TT in {', '.join(f'{c:02x}' for c in IDX_DTYPES)})")
    np_dtype = np.dtype(IDX_DTYPES[code])
    if dtype is not None and np.dtype(_NUMPY_NAMES[dtype]) != np_dtype.newbyteorder("="):
        raise TdcError(f"{path}: holds {_idx_name(np_dtype)} data, expected {dtype}")
    if ndim == 0:
        raise TdcError(f"{path}: IDX header has rank 0")
    if rank is not None and ndim != rank:
        raise TdcError(f"{path}: has rank {ndim}, expected rank {rank}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TdcError(f"{path}: truncated header ({len(raw)} bytes; {ndim} dimensions need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    need = int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize
    have = len(raw) - header
    if have < need:
        raise TdcError(f"{path}: truncated: dimensions {list(dims)} need {need} bytes of data, the file has {have}")
    if have > need:
        raise TdcError(f"{path}: {have - need} unexpected bytes after the data (dimensions {list(dims)} "
                       f"need {need}); the file is corrupt or not what its header says")
    return np.frombuffer(raw, np_dtype, offset=header).reshape(dims).astype(np_dtype.newbyteorder("="))


_NUMPY_NAMES = {"u8": "u1", "i8": "i1", "i16": "i2", "i32": "i4", "f32": "f4", "f64": "f8"}


def _idx_name(dt: np.dtype) -> str:
    return {v: k for k, v in _NUMPY_NAMES.items()}[dt.newbyteorder("=").str[1:]]


def write_idx(path: str, array: np.ndarray) -> None:
    """Write `array` as IDX (gzip-compressed when the name ends in .gz). Used by tests and tools."""
    a = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    if a.dtype not in codes:
        raise TdcError(f"IDX cannot hold dtype {a.dtype}")
    code = codes[a.dtype]
    data = (bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
            + a.astype(IDX_DTYPES[code]).tobytes())
    if path.endswith(".gz"):
        data = gzip.compress(data)
    with open(path, "wb") as f:
        f.write(data)


MNIST_FILES = {"x_train": ("train", "images", 3), "y_train": ("train", "labels", 1),
               "x_test": ("t10k", "images", 3), "y_test": ("t10k", "labels", 1)}


def _find_mnist_file(directory: str, split: str, kind: str, ndim: int) -> str:
    names = [f"{split}-{kind}{sep}idx{ndim}-ubyte{gz}" for sep in "-." for gz in ("", ".gz")]
    for n in names:
        p = os.path.join(directory, n)
        if os.path.exists(p):
            return p
    raise TdcError(f"{directory}: no MNIST {split} {kind} file (looked for {names[0]} or {names[2]}, optionally .gz)")


def load_mnist(directory: str) -> Dataset:
    """MNIST from the four IDX files in `directory` (as distributed, optionally gzip-compressed)."""
    if not os.path.isdir(directory):
        raise TdcError(f"{directory}: no such directory (expected the MNIST IDX files there)")
    arrays, paths = {}, {}
    for key, (split, kind, ndim) in MNIST_FILES.items():
        paths[key] = _find_mnist_file(directory, split, kind, ndim)
        arrays[key] = read_idx(paths[key], dtype="u8", rank=ndim)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise TdcError(f"{paths[f'x_{split}']} has {len(x)} images but {paths[f'y_{split}']} "
                           f"has {len(y)} labels")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise TdcError(f"{directory}: training images are {list(arrays['x_train'].shape[1:])}, "
                       f"test images {list(arrays['x_test'].shape[1:])}")

    def images(a):
        return (a.astype(np.float32) / np.float32(255.0)).reshape(len(a), 1, *a.shape[1:])

    return Dataset("mnist", images(arrays["x_train"]), arrays["y_train"].astype(np.int64),
                   images(arrays["x_test"]), arrays["y_test"].astype(np.int64), 10)


DATA_HELP = "digits, mnist:DIR, cifar10:DIR, npz:FILE[:x_train=NAME,...] or npy:DIR"


def load_data(spec: str, seed: int = 0) -> Dataset:
    """A data set by name (see the module's docstring). `seed` only affects the digits split."""
    kind, sep, arg = spec.partition(":")
    if kind == "digits" and not sep:
        return load_digits(seed)
    if kind in ("mnist", "cifar10", "npy", "npz"):
        if not arg:
            raise TdcError(f"--data {kind} needs a path: {kind}:{'FILE' if kind == 'npz' else 'DIR'}")
        if kind == "npz":
            path, _, keys = arg.partition(":")
            return load_npz_data(os.path.expanduser(path), keys)
        path = os.path.expanduser(arg)       # mnist:~/mnist, as a shell would
        return {"mnist": load_mnist, "cifar10": load_cifar10, "npy": load_npy_dir}[kind](path)
    raise TdcError(f"unknown data set {spec!r}; use {DATA_HELP}")


# ---- arrays: .npz and .npy -----------------------------------------------------------------

SPLITS = ("x_train", "y_train", "x_test", "y_test")


def _as_images(x: np.ndarray) -> np.ndarray:
    """8-bit pixels scaled to float32 [0, 1]; other numbers as they are (float32 stays a view)."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if x.dtype.kind not in "fiu":
        raise TdcError(f"samples of dtype {x.dtype} are not numbers")
    return x


def _dataset(name: str, arrays: dict, where: dict) -> Dataset:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise TdcError(f"{where[f'x_{split}']} has {len(x)} samples but {where[f'y_{split}']} has {len(y)} labels")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise TdcError(f"{name}: training samples are {list(arrays['x_train'].shape[1:])}, test samples "
                       f"{list(arrays['x_test'].shape[1:])}")
    ys = {}
    for key in ("y_train", "y_test"):
        y = np.asarray(arrays[key])
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise TdcError(f"{where[key]}: labels must be a vector of integer class indices, got "
                           f"{y.dtype} {list(y.shape)}")
        ys[key] = y.astype(np.int64)
    classes = int(max(ys["y_train"].max(initial=0), ys["y_test"].max(initial=0))) + 1
    return Dataset(name, _as_images(arrays["x_train"]), ys["y_train"], _as_images(arrays["x_test"]),
                   ys["y_test"], classes)


def load_npz_data(path: str, keys: str = "") -> Dataset:
    """x_train, y_train, x_test, y_test from one .npz; `keys` ("x_train=images,y_train=labels")
    names the arrays that are called otherwise."""
    names = {k: k for k in SPLITS}
    for item in filter(None, keys.split(",")):
        k, sep, v = item.partition("=")
        if not sep or k not in names or not v:
            raise TdcError(f"npz:{path}:{keys}: expected KEY=NAME with KEY one of {', '.join(SPLITS)}")
        names[k] = v
    if not os.path.exists(path):
        raise TdcError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [names[k] for k in SPLITS if names[k] not in z.files]
            if missing:
                raise TdcError(f"{path}: no array {missing[0]!r}; it holds {', '.join(z.files) or 'nothing'} "
                               f"(name yours with npz:{path}:x_train=NAME,...)")
            arrays = {k: z[names[k]] for k in SPLITS}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise TdcError(f"{path}: not a readable .npz file ({e})") from None
    return _dataset(os.path.basename(path), arrays, {k: f"{path}:{names[k]}" for k in SPLITS})


def load_npy_dir(directory: str) -> Dataset:
    """x_train.npy, y_train.npy, x_test.npy and y_test.npy in `directory`, memory-mapped."""
    if not os.path.isdir(directory):
        raise TdcError(f"{directory}: no such directory (expected x_train.npy, y_train.npy, x_test.npy, y_test.npy)")
    arrays, where = {}, {}
    for k in SPLITS:
        where[k] = os.path.join(directory, k + ".npy")
        if not os.path.exists(where[k]):
            raise TdcError(f"{directory}: no {k}.npy (a data directory holds {', '.join(s + '.npy' for s in SPLITS)})")
        try:
            arrays[k] = np.load(where[k], mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise TdcError(f"{where[k]}: not a valid .npy file ({e})") from None
    return _dataset(os.path.basename(os.path.normpath(directory)), arrays, where)


# ---- CIFAR-10 (binary version) -----------------------------------------------------------------

CIFAR_RECORD = 1 + 3 * 32 * 32     # a label byte, then 32x32 red, green and blue planes


def _cifar_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    size = os.path.getsize(path)
    if size == 0 or size % CIFAR_RECORD:
        raise TdcError(f"{path}: {size} bytes is not a whole number of CIFAR-10 records of {CIFAR_RECORD} bytes "
                       "(truncated or not a CIFAR-10 binary batch)")
    raw = np.memmap(path, np.uint8, "r").reshape(-1, CIFAR_RECORD)
    labels = np.array(raw[:, 0], np.int64)
    if labels.max() > 9:
        raise TdcError(f"{path}: label {labels.max()} is not a CIFAR-10 class (0-9): not a CIFAR-10 binary batch")
    return raw[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(directory: str) -> Dataset:
    """CIFAR-10's binary version: data_batch_1.bin ... data_batch_5.bin and test_batch.bin in
    `directory` (or in its cifar-10-batches-bin/, as the archive unpacks)."""
    if os.path.isdir(os.path.join(directory, "cifar-10-batches-bin")):
        directory = os.path.join(directory, "cifar-10-batches-bin")
    if not os.path.isdir(directory):
        raise TdcError(f"{directory}: no such directory (expected CIFAR-10's data_batch_*.bin and test_batch.bin)")
    train = sorted(f for f in os.listdir(directory) if f.startswith("data_batch_") and f.endswith(".bin"))
    if not train or not os.path.exists(os.path.join(directory, "test_batch.bin")):
        raise TdcError(f"{directory}: no CIFAR-10 binary batches (data_batch_1.bin ... and test_batch.bin)")
    parts = [_cifar_file(os.path.join(directory, f)) for f in train]
    x_test, y_test = _cifar_file(os.path.join(directory, "test_batch.bin"))
    x_train = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y_train = np.concatenate([p[1] for p in parts])
    return Dataset("cifar10", _as_images(np.asarray(x_train)), y_train, _as_images(np.asarray(x_test)), y_test, 10)


# ---- fitting data to a model -------------------------------------------------------------

def fit_to_model(x: np.ndarray, input_type: TensorType, what: str = "data") -> np.ndarray:
    """Samples reshaped to the model's per-sample shape (input_type without its batch dimension)
    when the element counts agree, e.g. 1x28x28 images into an MLP's [784]; cast to its dtype."""
    x = np.asarray(x)
    want = tuple(input_type.shape[1:])
    have = tuple(x.shape[1:])
    if have != want:
        if int(np.prod(have, dtype=np.int64)) != int(np.prod(want, dtype=np.int64)):
            raise TdcError(f"{what} samples are {list(have)} but the model takes {list(want)} "
                           f"per sample ({input_type} at its batch size): give --data a data set of "
                           f"{'x'.join(map(str, want))} samples ({DATA_HELP})")
        x = x.reshape(len(x), *want)
    return x.astype(input_type.np_dtype, copy=False)


def check_labels(y: np.ndarray, num_classes: int, what: str = "labels") -> np.ndarray:
    """Labels as int64, checked to be class indices in [0, num_classes) (the model's output width)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise TdcError(f"{what} must be a vector of class indices, got shape {list(y.shape)}")
    if y.dtype.kind not in "iu":
        raise TdcError(f"{what} must be integer class indices, got dtype {y.dtype}")
    if len(y):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise TdcError(f"{what} range over [{lo}, {hi}] but the model has {num_classes} outputs "
                           f"(class indices must be in [0, {num_classes - 1}])")
    return y.astype(np.int64, copy=False)


def write_digits_as_mnist(directory: str, seed: int = 0) -> str:
    """scikit-learn's digits drawn at MNIST's 28x28 (each pixel 3x3, a 2-pixel border), written as
    the four IDX files `mnist:DIR` reads (train = the digits' training split, t10k = its test
    split); returns the data spec mnist:DIR."""
    d = load_digits(seed)
    os.makedirs(directory, exist_ok=True)
    for split, x, y in (("train", d.x_train, d.y_train), ("t10k", d.x_test, d.y_test)):
        big = np.pad(np.kron(x[:, 0], np.ones((3, 3), np.float32)), ((0, 0), (2, 2), (2, 2)))
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte"), np.clip(big * 255, 0, 255).astype(np.uint8))
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte"), y.astype(np.uint8))
    return f"mnist:{directory}"
