"""Data sets that need no download: scikit-learn's 8x8 digits (embedded in scikit-learn) and
MNIST-1D (generated offline by the ``mnist1d`` package and cached on disk).

Example:
  >>> from lsgeo.data import digits
  >>> ds = digits()
  >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
  ((1300, 64), (497, 64), 10)
"""

from __future__ import annotations

import hashlib
import random
import zipfile

import numpy as np

from lsgeo.data.atomic import savez_atomic
from lsgeo.data.dataset import Dataset
from lsgeo.data.paths import default_cache_dir
from lsgeo.validation import check_positive_int

__all__ = ["digits", "mnist1d"]


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

    check_positive_int(num_test, "num_test")
    raw = load_digits()
    if num_test >= len(raw.target):
        raise ValueError(f"num_test={num_test} must be below the {len(raw.target)} digits")
    x = (raw.data / 16.0).astype(np.float32)
    y = raw.target.astype(np.int32)
    return Dataset(*_fixed_split(x, y, num_test), 10)


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
    ``<cache_dir>/mnist1d_<hash>.npz`` (written atomically with ``savez_atomic``) and reused; a
    corrupt cache file is regenerated. ``x`` is ``[n, 40]`` float32 (already centred and scaled to
    unit std by the generator), labels int32.
    """
    check_positive_int(num_samples, "num_samples")
    if num_samples < 10:
        raise ValueError(f"num_samples must be an integer >= 10, got {num_samples!r}")
    import mnist1d as _pkg

    version = getattr(_pkg, "__version__", "unknown")
    tag = hashlib.sha256(f"{num_samples}-{generation_seed}-{version}".encode()).hexdigest()[:12]
    path = default_cache_dir(cache_dir) / f"mnist1d_{tag}.npz"
    data = None
    if path.exists():
        try:
            with np.load(path) as f:
                data = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a corrupt cache file is regenerated
            data = None
    if data is None:
        data = _generate_mnist1d(num_samples, generation_seed)
        savez_atomic(path, **data)
    return Dataset(data["x"].astype(np.float32), data["y"].astype(np.int32),
                   data["x_test"].astype(np.float32), data["y_test"].astype(np.int32), 10)
