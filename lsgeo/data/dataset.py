"""The ``Dataset`` container and the two preprocessing steps ``load_dataset`` applies to every set:
deterministic subsampling and standardisation with training statistics.

Example:
  >>> import numpy as np
  >>> from lsgeo.data import standardize, subsample
  >>> x, y = np.arange(10.0)[:, None], np.arange(10)
  >>> xs, ys = subsample(x, y, 4, seed=0)
  >>> bool(np.all(xs[:, 0] == ys)), xs.shape
  (True, (4, 1))
  >>> tr, te = standardize(np.array([[0.0], [2.0]]), np.array([[4.0]]))
  >>> tr.ravel().tolist(), te.ravel().tolist()
  ([-1.0, 1.0], [3.0])
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lsgeo.validation import check_positive_int

__all__ = ["Dataset", "standardize", "subsample"]


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


def subsample(x: np.ndarray, y: np.ndarray, n: int | None, seed: int, *, name: str = "n_train"):
    """``n`` points drawn without replacement, deterministically for ``seed`` (numpy PCG64).

    ``n=None`` returns all points in their original order. Raises ValueError naming ``name`` when
    ``n`` exceeds the number of points available.
    """
    if n is None:
        return x, y
    check_positive_int(n, name)
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
    f = lambda x: ((np.asarray(x, np.float32) - mean32) / std32).astype(np.float32)
    return f(x_train), f(x_test)
