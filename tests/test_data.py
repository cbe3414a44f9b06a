"""lsgeo.data: official file formats (written here in miniature), clear errors, determinism."""

import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest

from lsgeo import data
from lsgeo.data import (
    FASHION_MNIST_FILES,
    Dataset,
    load_dataset,
    read_cifar10,
    read_fashion_mnist,
    read_idx,
    standardize,
    subsample,
)

# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian uint32 sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder, n_train=6, n_test=4, side=4, gz=True):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in FASHION_MNIST_FILES.items():
        raw = _idx_bytes(arrays[key])
        if gz:
            (folder / name).write_bytes(gzip.compress(raw))
        else:
            (folder / name[: -len(".gz")]).write_bytes(raw)
    return arrays


def test_idx_magic_numbers_of_the_writer(tmp_path):
    arrays = _write_fashion(tmp_path)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz") as f:
        assert struct.unpack(">I", f.read(4))[0] == 2051
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz") as f:
        assert struct.unpack(">I", f.read(4))[0] == 2049
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), arrays["x_test"])


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reader(tmp_path, gz):
    arrays = _write_fashion(tmp_path / "fashion_mnist", gz=gz)
    xtr, ytr, xte, yte = read_fashion_mnist(data_dir=tmp_path)
    for got, key in zip((xtr, ytr, xte, yte), ("x_train", "y_train", "x_test", "y_test")):
        np.testing.assert_array_equal(got, arrays[key])

    ds = load_dataset("fashion_mnist", data_dir=tmp_path, standardize=False)
    assert ds.x_train.shape == (6, 4, 4, 1) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 10
    np.testing.assert_allclose(ds.x_test[..., 0], arrays["x_test"] / 255.0)

    flat = load_dataset("fashion-mnist", data_dir=tmp_path, flatten=True, n_train=5, seed=1)
    assert flat.x_train.shape == (5, 16) and flat.x_test.shape == (4, 16)
    np.testing.assert_allclose(flat.x_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat.x_train.std(), 1.0, atol=1e-4)


def test_fashion_mnist_missing_file_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LSGEO_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion_mnist")
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg and "http" in msg

    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        read_fashion_mnist(tmp_path)


def test_fashion_mnist_malformed_files(tmp_path):
    _write_fashion(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 12))  # image magic for labels
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        read_fashion_mnist(tmp_path)
    bad.write_bytes(gzip.compress(b"\x12\x34\x56\x78"))
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        read_idx(bad)
    bad.write_bytes(gzip.compress(_idx_bytes(np.zeros(5, np.uint8))[:-1]))  # truncated payload
    with pytest.raises(ValueError, match="bytes"):
        read_idx(bad)
    bad.write_bytes(gzip.compress(_idx_bytes(np.zeros(5, np.uint8))))  # 5 labels for 6 images
    with pytest.raises(ValueError, match="labels"):
        read_fashion_mnist(tmp_path)


# ----------------------------------------------------------------------------------------------
# CIFAR-10: python pickle batches and the .tar.gz


def _cifar_batches(n=3):
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {
        name: {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
               b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        for name in names
    }


def _write_cifar_folder(folder, batches):
    folder.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def _write_cifar_tar(path, batches):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _check_cifar(arrays, batches):
    xtr, ytr, xte, yte = arrays
    assert xtr.shape == (15, 32, 32, 3) and xte.shape == (3, 32, 32, 3) and xtr.dtype == np.uint8
    np.testing.assert_array_equal(ytr[3:6], batches["data_batch_2"][b"labels"])
    np.testing.assert_array_equal(yte, batches["test_batch"][b"labels"])
    row = batches["data_batch_1"][b"data"][1]  # R plane, G plane, B plane; each 32x32 row-major
    i, r, c = 1, 5, 7
    for ch in range(3):
        assert xtr[i, r, c, ch] == row[ch * 1024 + r * 32 + c]


def test_cifar10_from_batches_folder(tmp_path):
    batches = _cifar_batches()
    _write_cifar_folder(tmp_path / "cifar10" / "cifar-10-batches-py", batches)
    _check_cifar(read_cifar10(data_dir=tmp_path), batches)
    ds = load_dataset("cifar10", data_dir=tmp_path, n_train=10, n_test=2, seed=3)
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)  # per channel
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    assert load_dataset("cifar-10", data_dir=tmp_path, flatten=True).x_train.shape == (15, 3072)


def test_cifar10_from_tar_gz(tmp_path):
    batches = _cifar_batches()
    _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", batches)
    _check_cifar(read_cifar10(tmp_path), batches)


def test_cifar10_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        read_cifar10(data_dir=tmp_path)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg and "https://www.cs.toronto.edu" in msg

    batches = _cifar_batches()
    del batches["data_batch_4"]
    _write_cifar_folder(tmp_path / "cifar-10-batches-py", batches)
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        read_cifar10(data_dir=tmp_path)


@pytest.mark.parametrize("split, bad", [("y_train", 200), ("y_test", 10)])
def test_fashion_mnist_rejects_bad_labels(tmp_path, split, bad):
    arrays = _write_fashion(tmp_path)
    labels = arrays[split].copy()
    labels[1] = bad
    name = FASHION_MNIST_FILES[split]
    (tmp_path / name).write_bytes(gzip.compress(_idx_bytes(labels)))
    with pytest.raises(ValueError, match=rf"{name}: Fashion-MNIST labels must be in \[0, 10\).*\[{bad}\]"):
        read_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match=name):
        load_dataset("fashion_mnist", data_dir=tmp_path)


@pytest.mark.parametrize("where, batch, bad", [("folder", "data_batch_2", 42), ("folder", "test_batch", -1),
                                               ("archive", "data_batch_5", 42), ("folder", "data_batch_1", 3.0)])
def test_cifar10_rejects_bad_labels(tmp_path, where, batch, bad):
    batches = _cifar_batches()
    batches[batch][b"labels"][0] = bad
    if where == "folder":
        _write_cifar_folder(tmp_path / "cifar-10-batches-py", batches)
    else:
        _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", batches)
    expected = "must be integer class indices" if isinstance(bad, float) else rf"must be in \[0, 10\).*\[{bad}\]"
    with pytest.raises(ValueError, match=rf"{batch}: CIFAR-10 labels {expected}"):
        read_cifar10(tmp_path)


def test_cifar10_malformed_files_named(tmp_path):
    batches = _cifar_batches()
    _write_cifar_folder(tmp_path / "cifar-10-batches-py", batches)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        read_cifar10(tmp_path)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        read_cifar10(tmp_path / "other")


# ----------------------------------------------------------------------------------------------
# MNIST-1D, digits, synthetic data, subsampling


def test_mnist1d_deterministic_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = data.mnist1d(num_samples=60, generation_seed=7, cache_dir=tmp_path / "a")
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # global RNG untouched
    b = data.mnist1d(num_samples=60, generation_seed=7, cache_dir=tmp_path / "b")
    assert a.x_train.shape == (48, 40) and a.x_test.shape == (12, 40) and a.num_classes == 10
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    for u, v in zip(a[:4], b[:4]):
        np.testing.assert_array_equal(u, v)
    assert len(list((tmp_path / "a").glob("mnist1d_*.npz"))) == 1
    assert not list((tmp_path / "a").glob("*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(data.embedded, "_generate_mnist1d", fail)
    c = load_dataset("mnist1d", cache_dir=tmp_path / "a", num_samples=60, generation_seed=7,
                     standardize=False)
    np.testing.assert_array_equal(c.x_train, a.x_train)
    d = load_dataset("mnist1d", cache_dir=tmp_path / "a", num_samples=60, generation_seed=7, n_train=20, seed=5)
    e = load_dataset("mnist1d", cache_dir=tmp_path / "a", num_samples=60, generation_seed=7, n_train=20, seed=5)
    np.testing.assert_array_equal(d.x_train, e.x_train)
    assert d.x_train.shape == (20, 40)


def test_digits_shapes():
    ds = load_dataset("digits", n_train=200, n_test=100, seed=0)
    assert isinstance(ds, Dataset)
    assert ds.x_train.shape == (200, 64) and ds.x_test.shape == (100, 64) and ds.num_classes == 10
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train.mean(), 0.0, atol=1e-5)
    img = load_dataset("digits", flatten=False, standardize=False)
    assert img.x_train.shape == (1300, 8, 8, 1) and img.x_test.shape == (497, 8, 8, 1)
    assert 0.0 <= img.x_train.min() and img.x_train.max() <= 1.0
    assert set(np.unique(img.y_train)) == set(range(10))


def test_subsampling_deterministic_per_seed():
    x, y = np.arange(100.0)[:, None], np.arange(100)
    a, b, c = (subsample(x, y, 10, s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    np.testing.assert_array_equal(a[0][:, 0], a[1])  # x and y stay paired
    assert len(np.unique(a[1])) == 10  # without replacement
    with pytest.raises(ValueError, match="n_train"):
        subsample(x, y, 101, 0)
    d0, d0b, d1 = (load_dataset("digits", n_train=50, n_test=20, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(d0.x_train, d0b.x_train)
    assert not np.array_equal(d0.y_train, d1.y_train)
    np.testing.assert_array_equal(d0.y_test, d1.y_test)  # the test subset does not depend on seed


def test_standardize_fits_on_train_only():
    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(3.0, 2.0, (50, 4)), rng.normal(-5.0, 1.0, (20, 4))
    xtr[:, 1] = 7.0  # a constant feature is only centred
    s_tr, s_te = standardize(xtr, xte)
    np.testing.assert_allclose(s_tr.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(s_tr.std(0)[[0, 2, 3]], 1.0, atol=1e-5)
    np.testing.assert_allclose(s_te, (xte - xtr.mean(0)) / np.where(xtr.std(0) > 0, xtr.std(0), 1.0), rtol=1e-5)
    images = rng.normal(2.0, 3.0, (9, 5, 5, 3)).astype(np.float32)  # per channel, over chunks of 2 images
    s_img, _ = standardize(images, images[:1], chunk=2)
    expected = (images - images.mean((0, 1, 2))) / images.std((0, 1, 2))
    np.testing.assert_allclose(s_img, expected, rtol=1e-4, atol=1e-5)


def test_synthetic_data():
    ds = load_dataset("sparse_regression", n_train=30, n_test=10, noise=0.0, seed=2)
    beta = ds.extras["beta_star"]
    assert ds.x_train.shape == (30, 10) and ds.y_train.shape == (30, 1) and ds.num_classes is None
    assert np.count_nonzero(beta) == 3
    np.testing.assert_allclose(ds.y_train[:, 0], ds.x_train @ beta, rtol=1e-5, atol=1e-5)
    again = load_dataset("sparse_regression", n_train=30, n_test=10, noise=0.0, seed=2)
    np.testing.assert_array_equal(again.x_train, ds.x_train)

    lasso = load_dataset("sparse_linear", n_train=20, d=50, num_nonzero=4, noise=0.0)
    assert lasso.x_train.shape == (20, 50) and lasso.y_train.shape == (20,)
    assert np.count_nonzero(lasso.extras["beta_star"]) == 4
    np.testing.assert_allclose(lasso.y_train, lasso.x_train @ lasso.extras["beta_star"], rtol=1e-5, atol=1e-5)

    lr = load_dataset("low_rank_regression", n_train=40, d_in=8, d_out=6, rank=2, noise=0.0)
    m = lr.extras["M_star"]
    assert m.shape == (8, 6) and np.linalg.matrix_rank(m) == 2 and lr.y_train.shape == (40, 6)
    np.testing.assert_allclose(lr.y_train, lr.x_train @ m, rtol=1e-4, atol=1e-4)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("digits", n_train=0)
    with pytest.raises(ValueError, match="n_test"):
        load_dataset("digits", n_test=10_000)
    with pytest.raises(ValueError, match="num_nonzero"):
        data.sparse_regression(d=3, num_nonzero=4)
    with pytest.raises(ValueError, match="noise"):
        data.sparse_linear(noise=-1.0)
    with pytest.raises(ValueError, match="rank"):
        data.low_rank_regression(d_in=3, d_out=5, rank=4)
