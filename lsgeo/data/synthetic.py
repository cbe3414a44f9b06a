"""Synthetic problems of Orvieto et al. (AISTATS 2023), generated from a seed with known ground truth.

- ``sparse_regression``: Section 5 / Figure 2, x in R^10, a sparse target and label noise;
- ``sparse_linear``: the overparametrised Lasso problem of the diagonal net (Section 2.3, d > n);
- ``low_rank_regression``: Y = X M* + noise with a low-rank M* (the linear net of Section 2.4).

Cost O(n d) time and memory (O(n d_in d_out) for the low-rank problem).

Example:
  >>> from lsgeo.data import sparse_regression
  >>> ds = sparse_regression(n_train=5, n_test=3, noise=0.0, seed=0)
  >>> ds.x_train.shape, ds.y_train.shape, int((ds.extras["beta_star"] != 0).sum())
  ((5, 10), (5, 1), 3)
"""

from __future__ import annotations

import numpy as np

from lsgeo.data.dataset import Dataset
from lsgeo.validation import check_nonnegative_int, check_positive_int, check_sigma

__all__ = ["low_rank_regression", "sparse_linear", "sparse_regression"]


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
    check_positive_int(n_train, "n_train")
    check_positive_int(n_test, "n_test")
    check_positive_int(d, "d")
    check_nonnegative_int(num_nonzero, "num_nonzero")
    if num_nonzero > d:
        raise ValueError(f"num_nonzero={num_nonzero} exceeds d={d}")
    check_sigma(noise, "noise")
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
        check_positive_int(v, name)
    if rank > min(d_in, d_out):
        raise ValueError(f"rank={rank} exceeds min(d_in, d_out)={min(d_in, d_out)}")
    check_sigma(noise, "noise")
    rng = np.random.default_rng(seed)
    m_star = rng.normal(size=(d_in, rank)) @ rng.normal(size=(rank, d_out)) / np.sqrt(rank)
    x = rng.normal(size=(n_train + n_test, d_in))
    y = x @ m_star + noise * rng.normal(size=(n_train + n_test, d_out))
    x, y = x.astype(np.float32), y.astype(np.float32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], None,
                   {"M_star": m_star.astype(np.float32)})
