import gzip

import numpy as np
import pytest

from tdc.errors import TdcError
from tdc.ir.types import TensorType
from tdc.runtime.data import (check_labels, fit_to_model, load_data, load_digits, load_mnist, read_idx,
                              write_idx)


# ---- IDX -----------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 5, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(str(tmp_path / f"im{suffix}"), images)
    write_idx(str(tmp_path / f"lb{suffix}"), labels)
    raw = (tmp_path / f"lb{suffix}").read_bytes()
    assert (gzip.decompress(raw) if gz else raw)[:4] == b"\x00\x00\x08\x01"
    got = read_idx(str(tmp_path / f"im{suffix}"), dtype="u8", rank=3)
    assert got.dtype == np.uint8 and np.array_equal(got, images)
    assert np.array_equal(read_idx(str(tmp_path / f"lb{suffix}"), dtype="u8", rank=1), labels)


def test_idx_other_dtypes_are_big_endian(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    write_idx(str(tmp_path / "f"), a)
    assert (tmp_path / "f").read_bytes()[:4] == b"\x00\x00\x0d\x02"
    assert np.array_equal(read_idx(str(tmp_path / "f")), a)


def _idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 8, a.ndim]) + np.asarray(a.shape, ">u4").tobytes() + a.astype(np.uint8).tobytes()


CORRUPTIONS = {
    "bad magic": (lambda b: b"\x12\x34" + b[2:], "bad magic number"),
    "bad type code": (lambda b: b[:2] + b"\x07" + b[3:], "bad magic number"),
    "truncated data": (lambda b: b[:-7], "truncated"),
    "truncated header": (lambda b: b[:9], "truncated header"),
    "extra bytes": (lambda b: b + b"\x00\x01\x02", "3 unexpected bytes"),
    "tiny": (lambda b: b[:2], "not an IDX file"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
@pytest.mark.parametrize("gz", [False, True])
def test_idx_corruption_is_a_clear_error(tmp_path, kind, gz):
    damage, message = CORRUPTIONS[kind]
    data = damage(_idx_bytes(np.ones((3, 4, 4))))
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(TdcError, match=message) as e:
        read_idx(str(path))
    assert str(path) in str(e.value)


def test_idx_wrong_rank_or_dtype(tmp_path):
    write_idx(str(tmp_path / "a"), np.zeros((2, 3), np.uint8))
    with pytest.raises(TdcError, match="has rank 2, expected rank 3"):
        read_idx(str(tmp_path / "a"), rank=3)
    write_idx(str(tmp_path / "b"), np.zeros(3, np.int32))
    with pytest.raises(TdcError, match="holds i32 data, expected u8"):
        read_idx(str(tmp_path / "b"), dtype="u8")


def test_idx_truncated_gzip(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(_idx_bytes(np.ones((30, 8, 8))))[:-20])
    with pytest.raises(TdcError, match="gzip"):
        read_idx(str(p))


def test_idx_missing_file(tmp_path):
    with pytest.raises(TdcError, match="no such file"):
        read_idx(str(tmp_path / "nope"))


# ---- MNIST directory -----------------------------------------------------------------------

def _fake_mnist(d, n_train=6, n_test=4, sep="-", gz=False, labels=None):
    rng = np.random.default_rng(1)
    ext = ".gz" if gz else ""
    files = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        files[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(str(d / f"{split}-images{sep}idx3-ubyte{ext}"), files[split][0])
        lab = files[split][1] if labels is None else labels[split]
        write_idx(str(d / f"{split}-labels{sep}idx1-ubyte{ext}"), lab)
    return files


@pytest.mark.parametrize("sep,gz", [("-", False), (".", False), ("-", True), (".", True)])
def test_load_mnist(tmp_path, sep, gz):
    files = _fake_mnist(tmp_path, sep=sep, gz=gz)
    ds = load_mnist(str(tmp_path))
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (4, 1, 28, 28)
    assert ds.y_train.dtype == np.int64 and np.array_equal(ds.y_train, files["train"][1])
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert np.allclose(ds.x_test[:, 0] * 255, files["t10k"][0])
    assert load_data(f"mnist:{tmp_path}").x_train.shape == (6, 1, 28, 28)


def test_mnist_dir_may_start_with_a_tilde(tmp_path, monkeypatch):
    """`--data mnist:~/mnist`, as the README writes it: ~ is the home directory, as in a shell."""
    (tmp_path / "mnist").mkdir()
    _fake_mnist(tmp_path / "mnist")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_data("mnist:~/mnist").x_train.shape == (6, 1, 28, 28)


def test_mnist_count_mismatch(tmp_path):
    _fake_mnist(tmp_path, labels={"train": np.zeros(5, np.uint8), "t10k": np.zeros(4, np.uint8)})
    with pytest.raises(TdcError, match="has 6 images but .*train-labels-idx1-ubyte has 5 labels"):
        load_mnist(str(tmp_path))


def test_mnist_missing_file(tmp_path):
    _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(TdcError, match="no MNIST t10k labels file"):
        load_mnist(str(tmp_path))
    with pytest.raises(TdcError, match="no such directory"):
        load_mnist(str(tmp_path / "nope"))


def test_mnist_images_with_wrong_rank(tmp_path):
    _fake_mnist(tmp_path)
    write_idx(str(tmp_path / "train-images-idx3-ubyte"), np.zeros((6, 784), np.uint8))
    with pytest.raises(TdcError, match="train-images-idx3-ubyte: has rank 2, expected rank 3"):
        load_mnist(str(tmp_path))


# ---- digits, specs, fitting ----------------------------------------------------------------

def test_digits():
    ds = load_digits()
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_train.dtype == np.float32
    assert len(ds.x_train) + len(ds.x_test) == 1797 and len(ds.x_test) == 359
    assert ds.y_train.dtype == np.int64 and set(np.unique(ds.y_test)) == set(range(10))
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # stratified: every class is ~20% test
    for c in range(10):
        frac = np.sum(ds.y_test == c) / (np.sum(ds.y_test == c) + np.sum(ds.y_train == c))
        assert abs(frac - 0.2) < 0.01
    again = load_digits()
    assert np.array_equal(again.x_test, ds.x_test) and np.array_equal(again.y_train, ds.y_train)
    assert not np.array_equal(load_digits(seed=1).y_test, ds.y_test)


def test_load_data_unknown_spec():
    with pytest.raises(TdcError, match="unknown data set 'cifar'; use digits, mnist:DIR, cifar10:DIR, npz:FILE"):
        load_data("cifar")
    with pytest.raises(TdcError, match="mnist:DIR"):
        load_data("mnist")


def test_fit_to_model():
    x = np.zeros((5, 1, 28, 28), np.float64)
    got = fit_to_model(x, TensorType("f32", (128, 784)))
    assert got.shape == (5, 784) and got.dtype == np.float32
    assert fit_to_model(x, TensorType("f32", (1, 1, 28, 28))).shape == (5, 1, 28, 28)
    with pytest.raises(TdcError, match=r"samples are \[1, 8, 8\] but the model takes \[784\]"):
        fit_to_model(np.zeros((5, 1, 8, 8)), TensorType("f32", (128, 784)))


def test_check_labels():
    assert check_labels(np.array([0, 9], np.uint8), 10).dtype == np.int64
    with pytest.raises(TdcError, match=r"range over \[0, 10\] but the model has 10 outputs"):
        check_labels(np.array([0, 10]), 10)
    with pytest.raises(TdcError, match=r"range over \[-1, 3\]"):
        check_labels(np.array([-1, 3]), 10)
    with pytest.raises(TdcError, match="integer class indices"):
        check_labels(np.array([0.0, 1.0]), 10)
