"""Data sets of Orvieto et al. (AISTATS 2023), all as numpy arrays in a ``Dataset``.

- synthetic (``lsgeo.data.synthetic``): ``sparse_regression`` (Section 5, Figure 2: x in R^10,
  sparse target, noise), ``sparse_linear`` (the overparametrised Lasso problem of the diagonal net,
  Section 2.3: d > n), ``low_rank_regression`` (Y = X M* + noise with a low-rank M*, the linear net
  of Section 2.4);
- embedded or generated offline (``lsgeo.data.embedded``): ``digits`` (scikit-learn, 64 features),
  ``mnist1d`` (40 features, generated with the ``mnist1d`` package and cached on disk);
- read from local files in their official formats, downloaded only when asked (``download=True``):
  ``fashion_mnist`` (the four IDX ``.gz`` files, ``lsgeo.data.idx``) and ``cifar10`` (the python
  pickle batches in ``cifar-10-batches-py/`` or the ``cifar-10-python.tar.gz`` archive,
  ``lsgeo.data.cifar``). Readers check formats, sizes and labels (classes 0..9) and name the file.

``load_dataset(name, ...)`` (``lsgeo.data.load``) is the single entry point used by the experiments:
it loads, subsamples ``n_train`` training points deterministically per ``seed``, standardises with
train statistics (``lsgeo.data.dataset``), and lays images out NHWC float32 (``flatten=True`` for
MLPs). Labels are int32.

Local files are looked for in ``data_dir`` (argument), else ``$LSGEO_DATA_DIR``, else ``./data``;
for each data set in ``<data_dir>/<name>/`` and in ``<data_dir>/`` itself (``lsgeo.data.paths``).
Downloads (``lsgeo.data.download``) come from the official URLs, or ``base_url`` /
``$LSGEO_DATA_URL``, are verified against known SHA-256 digests and written atomically. The MNIST-1D
cache lives in ``cache_dir``, else ``$LSGEO_CACHE_DIR``, else ``~/.cache/lsgeo``. Every file this
project writes goes through ``write_atomic`` / ``atomic_writer`` (``lsgeo.data.atomic``).

Example:
  >>> from lsgeo import data
  >>> ds = data.load_dataset("sparse_linear", n_train=20, d=50, seed=0)
  >>> ds.x_train.shape, ds.y_train.shape, ds.num_classes is None
  ((20, 50), (20,), True)
"""

from lsgeo.data.atomic import atomic_writer, savez_atomic, write_atomic
from lsgeo.data.cifar import (
    CIFAR10_ARCHIVE,
    CIFAR10_SHA256,
    CIFAR10_URL,
    cifar10,
    download_cifar10,
    read_cifar10,
)
from lsgeo.data.dataset import Dataset, standardize, subsample
from lsgeo.data.download import DATA_URL_ENV, DownloadError, download_file
from lsgeo.data.embedded import digits, mnist1d
from lsgeo.data.idx import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_PAGE,
    FASHION_MNIST_SHA256,
    FASHION_MNIST_URL,
    download_fashion_mnist,
    fashion_mnist,
    read_fashion_mnist,
    read_idx,
)
from lsgeo.data.load import DATASETS, DOWNLOADABLE, download_dataset, load_dataset
from lsgeo.data.paths import default_cache_dir, default_data_dir
from lsgeo.data.synthetic import low_rank_regression, sparse_linear, sparse_regression

__all__ = [
    "CIFAR10_ARCHIVE",
    "CIFAR10_SHA256",
    "CIFAR10_URL",
    "DATASETS",
    "DATA_URL_ENV",
    "DOWNLOADABLE",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_PAGE",
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_URL",
    "Dataset",
    "DownloadError",
    "atomic_writer",
    "cifar10",
    "default_cache_dir",
    "default_data_dir",
    "digits",
    "download_cifar10",
    "download_dataset",
    "download_fashion_mnist",
    "download_file",
    "fashion_mnist",
    "load_dataset",
    "low_rank_regression",
    "mnist1d",
    "read_cifar10",
    "read_fashion_mnist",
    "read_idx",
    "savez_atomic",
    "sparse_linear",
    "sparse_regression",
    "standardize",
    "subsample",
    "write_atomic",
]
