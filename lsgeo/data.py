"""Data sets of Orvieto et al. (AISTATS 2023), all as numpy arrays in a ``Dataset``.

- synthetic: ``sparse_regression`` (Section 5, Figure 2: x in R^10, sparse target, noise),
  ``sparse_linear`` (the overparametrised Lasso problem of the diagonal net, Section 2.3: d > n),
  ``low_rank_regression`` (Y = X M* + noise with a low-rank M*, the linear net of Section 2.4);
- embedded or generated offline: ``digits`` (scikit-learn, 64 features), ``mnist1d`` (40 features,
  generated with the ``mnist1d`` package and cached on disk);
- read from local files in their official formats (nothing is ever downloaded):
  ``fashion_mnist`` (the four IDX ``.gz`` files) and ``cifar10`` (the python pickle batches in
  ``cifar-10-batches-py/`` or the ``cifar-10-python.tar.gz`` archive).

``load_dataset(name, ...)`` is the single entry point used by the experiments: it loads, subsamples
``n_train`` training points deterministically per ``seed``, standardises with train statistics,
and lays images out NHWC float32 (``flatten=True`` for MLPs). Labels are int32.

Local files are looked for in ``data_dir`` (argument), else ``$LSGEO_DATA_DIR``, else ``./data``;
for each data set in ``<data_dir>/<name>/`` and in ``<data_dir>/`` itself. The MNIST-1D cache lives
in ``cache_dir``, else ``$LSGEO_CACHE_DIR``, else ``~/.cache/lsgeo``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import random
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

__all__ = [
    "Dataset",
    "DATASETS",
    "load_dataset",
    "sparse_regression",
    "sparse_linear",
    "low_rank_regression",
    "digits",
    "mnist1d",
    "fashion_mnist",
    "cifar10",
    "read_idx",
    "read_cifar10",
    "read_fashion_mnist",
    "subsample",
    "standardize",
    "default_data_dir",
    "default_cache_dir",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_URL",
    "FASHION_MNIST_PAGE",
    "CIFAR10_URL",
]

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # + file name
FASHION_MNIST_PAGE = "https://github.com/zalandoresearch/fashion-mnist"
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class Dataset(NamedTuple):
    """A train/test split of numpy arrays.

    x_*: float32, ``[n, d]`` (tabular or flattened) or ``[n, H, W, C]`` (NHWC images).
    y_*: int32 ``[n]`` class labels, or float32 ``[n]`` / ``[n, k]`` regression targets.
    num_classes: number of classes, or None for regression.
    extras: ground truth of synthetic data (``beta_star``, ``M_star``, ...), else None.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None
    extras: dict | None = None

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """The training batch ``(x_train, y_train)`` of the model contract."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """The test batch ``(x_test, y_test)``."""
        return self.x_test, self.y_test


def _check_int(value, name: str, *, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_nonneg_float(value, name: str) -> None:
    if not np.isscalar(value) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def subsample(x: np.ndarray, y: np.ndarray, n: int | None, seed: int, *, name: str = "n_train"):
    """``n`` points drawn without replacement, deterministically for ``seed`` (numpy PCG64).

    ``n=None`` returns all points in their original order. Raises ValueError naming ``name`` when
    ``n`` exceeds the number of points available.
    """
    if n is None:
        return x, y
    _check_int(n, name)
    if n > len(x):
        raise ValueError(f"{name}={n} exceeds the {len(x)} points available")
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[idx], y[idx]


def standardize(x_train: np.ndarray, x_test: np.ndarray, *, eps: float = 1e-8, chunk: int = 4096):
    """Standardise with the training statistics: per last-axis entry (feature, or channel of NHWC
    images) mean and std over all other axes; constant entries (std < eps) are only centred.
    Returns ``(x_train, x_test)`` as float32. Statistics accumulate in float64 over row chunks of
    ``chunk`` examples, so memory stays at the size of the float32 output (CIFAR-10: 600 MB).
    """
    flat = np.asarray(x_train).reshape(-1, x_train.shape[-1])
    rows = max(1, chunk * flat.shape[0] // max(1, len(x_train)))
    total = max(1, flat.shape[0])
    mean = sum(flat[i:i + rows].sum(0, dtype=np.float64) for i in range(0, flat.shape[0], rows)) / total
    var = sum(np.square(flat[i:i + rows] - mean).sum(0) for i in range(0, flat.shape[0], rows)) / total
    std = np.sqrt(var)
    std = np.where(std < eps, 1.0, std)
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    f = lambda x: ((np.asarray(x, np.float32) - mean32) / std32).astype(np.float32)  # noqa: E731
    return f(x_train), f(x_test)


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$LSGEO_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("LSGEO_DATA_DIR", "data")).expanduser()


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$LSGEO_CACHE_DIR``, else ``~/.cache/lsgeo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LSGEO_CACHE_DIR", "~/.cache/lsgeo")).expanduser()


def _sparse_vector(rng: np.random.Generator, d: int, num_nonzero: int) -> np.ndarray:
    beta = np.zeros(d)
    support = rng.choice(d, size=num_nonzero, replace=False)
    beta[support] = rng.normal(size=num_nonzero)
    return beta


def sparse_regression(n_train: int = 100, n_test: int = 1000, *, d: int = 10, num_nonzero: int = 3,
                      noise: float = 0.1, seed: int = 0) -> Dataset:
    """Random sparse linear regression of Section 5 / Figure 2: y = <beta*, x> + noise * eps.

    x ~ N(0, I_d) (d = 10 in the paper), beta* has ``num_nonzero`` N(0, 1) entries on a random
    support, eps ~ N(0, 1). Targets are ``[n, 1]`` (the ``[n, k]`` outputs of an MLP/LinearNet
    with one output and the paper's Y in R^{n x d_M}). extras: ``beta_star [d]``.
    """
    ds = sparse_linear(n_train, n_test, d=d, num_nonzero=num_nonzero, noise=noise, seed=seed)
    return ds._replace(y_train=ds.y_train[:, None], y_test=ds.y_test[:, None])


def sparse_linear(n_train: int = 40, n_test: int = 1000, *, d: int = 100, num_nonzero: int = 5,
                  noise: float = 0.0, seed: int = 0) -> Dataset:
    """The overparametrised sparse problem of the diagonal net (Section 2.3, Lasso): d > n.

    x ~ N(0, I_d), y = X beta* + noise * eps with a ``num_nonzero``-sparse beta* (N(0, 1) entries),
    targets ``[n]`` (the outputs of ``DiagonalNet``). Any n_train is accepted; the Lasso regime
    is n_train < d. extras: ``beta_star [d]``.
    """
    _check_int(n_train, "n_train")
    _check_int(n_test, "n_test")
    _check_int(d, "d")
    _check_int(num_nonzero, "num_nonzero", minimum=0)
    if num_nonzero > d:
        raise ValueError(f"num_nonzero={num_nonzero} exceeds d={d}")
    _check_nonneg_float(noise, "noise")
    rng = np.random.default_rng(seed)
    beta = _sparse_vector(rng, d, num_nonzero)
    x = rng.normal(size=(n_train + n_test, d))
    y = x @ beta + noise * rng.normal(size=n_train + n_test)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], None,
                   {"beta_star": beta.astype(np.float32)})


def low_rank_regression(n_train: int = 100, n_test: int = 1000, *, d_in: int = 20, d_out: int = 20,
                        rank: int = 2, noise: float = 0.1, seed: int = 0) -> Dataset:
    """Multivariate regression with a low-rank target (the linear net of Section 2.4).

    Y = X M* + noise * E with X ~ N(0, I), M* = U V^T / sqrt(rank), U [d_in, rank] and
    V [d_out, rank] with N(0, 1) entries (so <x, M*_{:, j}> has unit variance on average).
    Targets ``[n, d_out]``. In the paper's notation the product W_2 W_1 estimates M*^T.
    extras: ``M_star [d_in, d_out]``.
    """
    for v, name in ((n_train, "n_train"), (n_test, "n_test"), (d_in, "d_in"), (d_out, "d_out"), (rank, "rank")):
        _check_int(v, name)
    if rank > min(d_in, d_out):
        raise ValueError(f"rank={rank} exceeds min(d_in, d_out)={min(d_in, d_out)}")
    _check_nonneg_float(noise, "noise")
    rng = np.random.default_rng(seed)
    m_star = rng.normal(size=(d_in, rank)) @ rng.normal(size=(rank, d_out)) / np.sqrt(rank)
    x = rng.normal(size=(n_train + n_test, d_in))
    y = x @ m_star + noise * rng.normal(size=(n_train + n_test, d_out))
    x, y = x.astype(np.float32), y.astype(np.float32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], None,
                   {"M_star": m_star.astype(np.float32)})


def _fixed_split(x, y, num_test: int):
    """Seed-independent train/test split (permutation with seed 0)."""
    idx = np.random.default_rng(0).permutation(len(x))
    return x[idx[num_test:]], y[idx[num_test:]], x[idx[:num_test]], y[idx[:num_test]]


def digits(*, num_test: int = 497) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), embedded in scikit-learn.

    Pixels scaled to [0, 1]; ``x`` is ``[n, 64]`` float32, labels int32. A fixed (seed-independent)
    split holds out ``num_test`` images (default 497: 1300 train / 497 test).
    """
    from sklearn.datasets import load_digits

    _check_int(num_test, "num_test")
    raw = load_digits()
    if num_test >= len(raw.target):
        raise ValueError(f"num_test={num_test} must be below the {len(raw.target)} digits")
    x = (raw.data / 16.0).astype(np.float32)
    y = raw.target.astype(np.int32)
    return Dataset(*_fixed_split(x, y, num_test), 10)


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _generate_mnist1d(num_samples: int, generation_seed: int) -> dict[str, np.ndarray]:
    """Run ``mnist1d.data.make_dataset`` offline (never ``get_dataset``, which may download),
    restoring numpy's and Python's global random states that it reseeds."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = generation_seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {"x": data["x"], "y": data["y"], "x_test": data["x_test"], "y_test": data["y_test"]}


def mnist1d(*, num_samples: int = 5000, generation_seed: int = 42, cache_dir=None) -> Dataset:
    """MNIST-1D (Greydanus 2020): 40-feature 1-D signals of 10 digit templates, 10 classes.

    Generated offline with ``mnist1d.data.make_dataset`` and the package's default arguments
    (``num_samples`` = 5000 split 80/20 into 4000 train / 1000 test, ``generation_seed`` = 42), so it is
    deterministic for ``(num_samples, generation_seed)``. The arrays are cached in
    ``<cache_dir>/mnist1d_<hash>.npz`` (written atomically) and reused. ``x`` is ``[n, 40]``
    float32 (already centred and scaled to unit std by the generator), labels int32.
    """
    _check_int(num_samples, "num_samples", minimum=10)
    import mnist1d as _pkg

    version = getattr(_pkg, "__version__", "unknown")
    tag = hashlib.sha256(f"{num_samples}-{generation_seed}-{version}".encode()).hexdigest()[:12]
    path = default_cache_dir(cache_dir) / f"mnist1d_{tag}.npz"
    data = None
    if path.exists():
        try:
            with np.load(path) as f:
                data = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):  # a corrupt cache file is regenerated
            data = None
    if data is None:
        data = _generate_mnist1d(num_samples, generation_seed)
        _atomic_savez(path, **data)
    return Dataset(data["x"].astype(np.float32), data["y"].astype(np.int32),
                   data["x_test"].astype(np.float32), data["y_test"].astype(np.int32), 10)


def _candidate_dirs(data_dir, subdirs: Sequence[str]) -> list[Path]:
    root = default_data_dir(data_dir)
    return [root / s for s in subdirs] + [root]


def _find_file(names: Sequence[str], dirs: Sequence[Path], *, dataset: str, url: str) -> Path:
    """First existing ``dir / name``; else FileNotFoundError naming the file, where it was looked
    for and how to obtain it."""
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(
        f"{dataset}: file {names[0]!r} not found; looked in: {', '.join(str(d) for d in dirs)}. "
        f"Nothing is downloaded at run time: download it by hand from {url} into one of these folders "
        f"(or point data_dir / $LSGEO_DATA_DIR at the folder holding it)."
    )


def read_idx(path: str | os.PathLike, *, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw): magic = 0x0000 <dtype byte> <ndim byte>, big-endian int32
    sizes, then the row-major data. Images (idx3) have magic 2051, labels (idx1) 2049.

    Raises ValueError naming the file when the magic number, ``expected_ndim`` or size is wrong.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read the IDX file ({e}); re-download it") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number {'0x' + raw[:4].hex() if raw else '(empty file)'}; "
                         "expected 0x00000801 (labels) or 0x00000803 (images)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dimensions (magic 0x{raw[:4].hex()}), "
                         f"expected {expected_ndim} (magic 0x{0x800 + expected_ndim:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != size:
        raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes, expected {size} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_fashion_mnist(folder: str | os.PathLike | None = None, *, data_dir=None):
    """Raw Fashion-MNIST arrays from the four official IDX files: ``(x_train [60000, 28, 28] uint8,
    y_train [60000] uint8, x_test [10000, 28, 28], y_test [10000])``.

    Files (``.gz``, or already gunzipped without the suffix) are looked for in ``folder`` if given,
    else in ``<data_dir>/fashion_mnist``, ``<data_dir>/fashion-mnist``, ``<data_dir>/FashionMNIST/raw``
    and ``<data_dir>``.
    """
    dirs = ([Path(folder).expanduser()] if folder is not None else
            _candidate_dirs(data_dir, ["fashion_mnist", "fashion-mnist", "FashionMNIST/raw"]))
    out = {}
    for key, name in FASHION_MNIST_FILES.items():
        path = _find_file([name, name[: -len(".gz")]], dirs, dataset="Fashion-MNIST",
                          url=f"{FASHION_MNIST_URL}{name} (see {FASHION_MNIST_PAGE})")
        out[key] = read_idx(path, expected_ndim=3 if key.startswith("x") else 1)
    for split in ("train", "test"):
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise ValueError(f"Fashion-MNIST {split}: {len(out[f'x_{split}'])} images but "
                             f"{len(out[f'y_{split}'])} labels in {FASHION_MNIST_FILES[f'y_{split}']}")
    return out["x_train"], out["y_train"], out["x_test"], out["y_test"]


def _parse_cifar_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = pickle.loads(blob, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int32)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise ValueError(f"{where}: not a CIFAR-10 python batch (a pickled dict with b'data' and "
                         f"b'labels'): {type(e).__name__}: {e}") from e
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{where}: expected data [n, 3072] and n labels, got data {data.shape} "
                         f"and {len(labels)} labels")
    # rows are channel-major 3 x 32 x 32 (R, G, B planes): to NHWC
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar10(folder: str | os.PathLike | None = None, *, data_dir=None):
    """Raw CIFAR-10 arrays from the official python version: ``(x_train [50000, 32, 32, 3] uint8
    NHWC, y_train [50000] int32, x_test [10000, 32, 32, 3], y_test [10000])``.

    Reads ``cifar-10-batches-py/{data_batch_1..5, test_batch}`` if that folder exists (or the
    batches directly in ``folder``), else the archive ``cifar-10-python.tar.gz`` without extracting
    it. Looked for in ``folder`` if given, else ``<data_dir>/cifar10``, ``<data_dir>/cifar-10`` and
    ``<data_dir>``. The batches are pickles: only read files you downloaded from the official URL.
    """
    dirs = ([Path(folder).expanduser()] if folder is not None else
            _candidate_dirs(data_dir, ["cifar10", "cifar-10"]))
    names = CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,)
    blobs = None
    for d in dirs:
        for batch_dir in (d / CIFAR10_FOLDER, d):
            if (batch_dir / CIFAR10_TEST_BATCH).is_file() or (batch_dir / "data_batch_1").is_file():
                paths = [batch_dir / n for n in names]
                for p in paths:
                    if not p.is_file():
                        raise FileNotFoundError(
                            f"CIFAR-10: file {p.name!r} not found in {batch_dir} (the other batches are "
                            f"there); download {CIFAR10_URL} by hand and extract it into {d}")
                blobs = {p.name: (p.read_bytes(), str(p)) for p in paths}
                break
        if blobs is not None:
            break
    if blobs is None:
        archive = _find_file([CIFAR10_ARCHIVE], dirs, dataset="CIFAR-10 (folder "
                             f"{CIFAR10_FOLDER!r} or archive)", url=CIFAR10_URL)
        blobs = _read_cifar_archive(archive, names)
    parsed = {n: _parse_cifar_batch(*blobs[n]) for n in names}
    x_train = np.concatenate([parsed[n][0] for n in CIFAR10_TRAIN_BATCHES])
    y_train = np.concatenate([parsed[n][1] for n in CIFAR10_TRAIN_BATCHES])
    return x_train, y_train, *parsed[CIFAR10_TEST_BATCH]


def _read_cifar_archive(archive: Path, names: Sequence[str]) -> dict[str, tuple[bytes, str]]:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise ValueError(f"{archive}: archive lacks {missing}; re-download {CIFAR10_URL}")
            return {n: (tar.extractfile(members[n]).read(), f"{archive}:{members[n].name}") for n in names}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{archive}: cannot read the archive ({e}); re-download {CIFAR10_URL}") from e


def fashion_mnist(*, data_dir=None) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017) from the local IDX files: NHWC ``[n, 28, 28, 1]`` float32
    in [0, 1], labels int32, 10 classes. See ``read_fashion_mnist`` for where files are looked for."""
    xtr, ytr, xte, yte = read_fashion_mnist(data_dir=data_dir)
    f = lambda x: (x[..., None].astype(np.float32) / 255.0)  # noqa: E731
    return Dataset(f(xtr), ytr.astype(np.int32), f(xte), yte.astype(np.int32), 10)


def cifar10(*, data_dir=None) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009) from the local python batches: NHWC ``[n, 32, 32, 3]`` float32 in
    [0, 1], labels int32, 10 classes. See ``read_cifar10`` for where files are looked for."""
    xtr, ytr, xte, yte = read_cifar10(data_dir=data_dir)
    f = lambda x: x.astype(np.float32) / 255.0  # noqa: E731
    return Dataset(f(xtr), ytr.astype(np.int32), f(xte), yte.astype(np.int32), 10)


_SYNTHETIC: dict[str, Callable[..., Dataset]] = {
    "sparse_regression": sparse_regression,
    "sparse_linear": sparse_linear,
    "low_rank_regression": low_rank_regression,
}
_IMAGES = ("fashion_mnist", "cifar10")
_ALIASES = {"fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist", "cifar-10": "cifar10",
            "mnist-1d": "mnist1d", "low_rank": "low_rank_regression", "lasso": "sparse_linear"}
DATASETS = tuple(_SYNTHETIC) + ("digits", "mnist1d") + _IMAGES


def load_dataset(name: str, *, data_dir=None, n_train: int | None = None, n_test: int | None = None,
                 seed: int = 0, flatten: bool | None = None, standardize: bool = True,
                 cache_dir=None, **kwargs: Any) -> Dataset:
    """Load data set ``name`` (one of ``DATASETS``) ready for training.

    Args:
      name: "sparse_regression", "sparse_linear", "low_rank_regression", "digits", "mnist1d",
        "fashion_mnist" or "cifar10" (aliases "fashion-mnist", "cifar-10", "mnist-1d", "low_rank", "lasso").
      data_dir: folder of the local files (Fashion-MNIST, CIFAR-10); default ``$LSGEO_DATA_DIR``
        else ``./data``.
      n_train: training points, drawn without replacement deterministically for ``seed``
        (None: all). Synthetic data sets are generated with this many points (default of the generator).
      n_test: test points, a fixed seed-independent subset (None: all), so that every seed is
        evaluated on the same points.
      seed: subsampling seed (synthetic: the generation seed).
      flatten: images as ``[n, H*W*C]`` for MLPs; default False for Fashion-MNIST/CIFAR-10 (NHWC for
        CNNs), True for digits (``flatten=False`` gives ``[n, 8, 8, 1]``). MNIST-1D is always ``[n, 40]``.
      standardize: centre and scale with the statistics of the (subsampled) training inputs, per
        channel (one mean and std per colour channel; digits, MNIST-1D and Fashion-MNIST have one). Synthetic data are returned as generated
        (x ~ N(0, I) already), so the ground truth in ``extras`` stays valid.
      cache_dir: MNIST-1D cache folder (default ``$LSGEO_CACHE_DIR`` else ``~/.cache/lsgeo``).
      **kwargs: passed to the generator or loader (e.g. ``noise``, ``d`` for synthetic data).

    Returns:
      ``Dataset`` with float32 inputs and int32 labels (float32 targets for regression).
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, one of {list(DATASETS)}, got {name!r}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"name must be one of {list(DATASETS)}, got {name!r}")
    _check_int(n_train, "n_train", allow_none=True)
    _check_int(n_test, "n_test", allow_none=True)

    if key in _SYNTHETIC:
        sizes = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
        return _SYNTHETIC[key](**sizes, seed=seed, **kwargs)

    if key == "digits":
        ds = digits(**kwargs)
    elif key == "mnist1d":
        ds = mnist1d(cache_dir=cache_dir, **kwargs)
    elif key == "fashion_mnist":
        ds = fashion_mnist(data_dir=data_dir, **kwargs)
    else:
        ds = cifar10(data_dir=data_dir, **kwargs)

    x_train, y_train = subsample(ds.x_train, ds.y_train, n_train, seed, name="n_train")
    x_test, y_test = subsample(ds.x_test, ds.y_test, n_test, 0, name="n_test")
    if key == "digits":
        x_train, x_test = x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1)
        flatten = True if flatten is None else flatten
    if standardize:
        if key == "mnist1d":  # a 1-D signal with one channel
            x_train, x_test = _standardize(x_train[..., None], x_test[..., None])
            x_train, x_test = x_train[..., 0], x_test[..., 0]
        else:
            x_train, x_test = _standardize(x_train, x_test)
    if flatten and x_train.ndim > 2:
        x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    return Dataset(x_train, y_train, x_test, y_test, ds.num_classes)


_standardize = standardize  # load_dataset's argument ``standardize`` shadows the function
