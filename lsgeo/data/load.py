"""``load_dataset``: the one entry point of the experiments, and ``download_dataset``.

``load_dataset(name, ...)`` loads a set by name (aliases accepted), subsamples ``n_train`` training
points deterministically per ``seed``, takes a fixed ``n_test`` subset, standardises with training
statistics and lays images out NHWC float32 (``flatten=True`` for MLPs). Labels are int32.
Fashion-MNIST and CIFAR-10 are read from local files, fetched first when ``download=True``.

Example:
  >>> from lsgeo.data import load_dataset
  >>> ds = load_dataset("digits", n_train=100, n_test=50, seed=0)
  >>> ds.x_train.shape, ds.y_train.dtype.name, ds.num_classes
  ((100, 64), 'int32', 10)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lsgeo.data.cifar import cifar10, download_cifar10
from lsgeo.data.dataset import Dataset, subsample
from lsgeo.data.dataset import standardize as _standardize
from lsgeo.data.embedded import digits, mnist1d
from lsgeo.data.idx import download_fashion_mnist, fashion_mnist
from lsgeo.data.synthetic import low_rank_regression, sparse_linear, sparse_regression
from lsgeo.validation import check_positive_int

__all__ = ["DATASETS", "DOWNLOADABLE", "download_dataset", "load_dataset"]

_SYNTHETIC: dict[str, Callable[..., Dataset]] = {
    "sparse_regression": sparse_regression,
    "sparse_linear": sparse_linear,
    "low_rank_regression": low_rank_regression,
}
_DOWNLOADERS: dict[str, Callable[..., list[Path]]] = {
    "fashion_mnist": download_fashion_mnist,
    "cifar10": download_cifar10,
}
_ALIASES = {"fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist", "cifar-10": "cifar10",
            "mnist-1d": "mnist1d", "low_rank": "low_rank_regression", "lasso": "sparse_linear"}
DATASETS = tuple(_SYNTHETIC) + ("digits", "mnist1d") + tuple(_DOWNLOADERS)
DOWNLOADABLE = tuple(_DOWNLOADERS)


def _canonical(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, one of {list(DATASETS)}, got {name!r}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"name must be one of {list(DATASETS)}, got {name!r}")
    return key


def download_dataset(name: str, data_dir=None, *, base_url: str | None = None, progress: bool = True) -> list[Path]:
    """Fetch the files of ``name`` that are not in ``data_dir`` yet (``download_fashion_mnist``,
    ``download_cifar10``); a set that needs no download (synthetic, digits, MNIST-1D) returns [].

    Every file is verified against its official SHA-256 and written atomically: a failed or
    corrupt download leaves nothing behind and raises an error naming the URL and the file.
    ``base_url`` (else ``$LSGEO_DATA_URL``) replaces the official location by a mirror. Returns the
    files downloaded.
    """
    key = _canonical(name)
    if key not in _DOWNLOADERS:
        return []
    return _DOWNLOADERS[key](data_dir, base_url=base_url, progress=progress)


def load_dataset(name: str, *, data_dir=None, n_train: int | None = None, n_test: int | None = None,
                 seed: int = 0, flatten: bool | None = None, standardize: bool = True,
                 cache_dir=None, download: bool = False, **kwargs: Any) -> Dataset:
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
        channel (one mean and std per colour channel; digits, MNIST-1D and Fashion-MNIST have one).
        Synthetic data are returned as generated (x ~ N(0, I) already), so the ground truth in
        ``extras`` stays valid.
      cache_dir: MNIST-1D cache folder (default ``$LSGEO_CACHE_DIR`` else ``~/.cache/lsgeo``).
      download: fetch missing Fashion-MNIST / CIFAR-10 files first (``download_dataset``: official
        URLs, SHA-256 verified, atomic, progress bar); no effect on the other sets, which need none.
      **kwargs: passed to the generator or loader (e.g. ``noise``, ``d`` for synthetic data;
        ``base_url`` of a mirror for a download).

    Returns:
      ``Dataset`` with float32 inputs and int32 labels (float32 targets for regression).
    """
    key = _canonical(name)
    if n_train is not None:
        check_positive_int(n_train, "n_train")
    if n_test is not None:
        check_positive_int(n_test, "n_test")
    if not isinstance(download, bool):
        raise TypeError(f"download must be True or False, got {download!r}")

    if key in _SYNTHETIC:
        sizes = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
        return _SYNTHETIC[key](**sizes, seed=seed, **kwargs)

    if key == "digits":
        ds = digits(**kwargs)
    elif key == "mnist1d":
        ds = mnist1d(cache_dir=cache_dir, **kwargs)
    elif key == "fashion_mnist":
        ds = fashion_mnist(data_dir=data_dir, download=download, **kwargs)
    else:
        ds = cifar10(data_dir=data_dir, download=download, **kwargs)

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
