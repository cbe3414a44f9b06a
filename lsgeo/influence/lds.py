"""The linear datamodeling score (LDS; Park et al. 2023, TRAK, Section 2.2): attribution quality by retraining.

Draw M random subsets S_j of the training set (``fraction`` of it, ``round(fraction n)`` examples each), retrain
on each, and compare, for every query q, the actual query loss ``l_q(w_{S_j})`` with the change the scores
predict, across the M subsets; LDS is the Spearman rank correlation per query, averaged over the queries (its
standard error: their spread over ``sqrt(Q)``).

Prediction: training on S_j minimises ``1/|S| sum_{i in S_j} l_i`` = the full mean objective reweighted by
``eps_i = 1[i in S_j] / |S| - 1/n``; with ``I[i, q] = g_q^T A^-1 g_i`` (``lsgeo.influence.scores``; upweighting by
``eps`` changes ``l_q`` by ``-eps I[i, q]`` to first order) the predicted change is

    Delta_jq = - sum_i (1[i in S_j] / |S| - 1/n) I[i, q].

(A rank correlation across subsets is unchanged by the per-query constant, so this is also TRAK's
``sum_{i in S_j} tau_i`` up to sign and scale.)

Retraining: all M runs are ONE ``lsgeo.train.sweep`` over M seeds (compiled once, vmapped, ``members_per_chunk``
at a time): member j's subset mask is its model state, drawn from its init key (``subset_mask``), and the
objective weights the examples by it, ``sum_i m_i l_i / sum_i m_i`` (over the minibatch with ``batch_size``;
the data carry their indices), plus an optional ``penalty(params)``. The masks come back in the result.

Cost: M training runs (vmapped) plus M Q query losses. Memory: every member's parameters and optimizer
state, plus the activations of ``members_per_chunk`` runs.

Example:
  >>> import jax.numpy as jnp, optax
  >>> from lsgeo import influence, losses
  >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]); y = x @ jnp.array([1.0, -1.0])
  >>> runs = influence.retrain_on_subsets(lambda w, x: x @ w, losses.squared_loss, jnp.zeros(2), (x, y),
  ...                                     optax.sgd(0.1), num_steps=20, num_subsets=4)
  >>> runs.masks.shape, runs.masks.sum(axis=1).tolist()
  ((4, 4), [2, 2, 2, 2])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from lsgeo import train as train_lib
from lsgeo import validation
from lsgeo.influence.gradients import example_loss, num_examples

__all__ = ["SubsetRetrains", "LDSResult", "retrain_on_subsets", "subset_mask", "masked_objective", "query_losses",
           "predicted_changes", "lds_from_predictions", "lds"]


class SubsetRetrains(NamedTuple):
    """``masks [M, n]`` (bool), the retrained ``params`` (leaves ``[M, ...]``) and the sweep's ``history``."""

    masks: np.ndarray
    params: Any
    history: dict


class LDSResult(NamedTuple):
    """``score`` (mean Spearman over the queries), its ``stderr``, ``per_query [Q]``, ``predicted [M, Q]``,
    ``actual [M, Q]`` (query losses of the retrained models) and the ``retrains``."""

    score: float
    stderr: float
    per_query: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    retrains: SubsetRetrains | None


@dataclasses.dataclass(frozen=True)
class subset_mask:  # noqa: N801 (a hashable init function: a static argument of the compiled sweep)
    """``init_key -> [n]`` mask with exactly ``size`` ones at random positions (a random permutation's first)."""

    n: int
    size: int

    def __call__(self, key):
        order = jax.random.permutation(jax.random.fold_in(key, 0x5EB5), self.n)
        return (jnp.zeros(self.n).at[order[:self.size]].set(1.0)).astype(jnp.zeros(()).dtype)


@dataclasses.dataclass(frozen=True)
class masked_objective:  # noqa: N801 (hashable: one compilation per (predict, loss, penalty))
    """``(params, mask, (x, y, idx)) -> (sum_i m_idx_i l_i / sum_i m_idx_i + penalty(params), mask)``, the stateful
    objective of ``lsgeo.train`` with the subset mask as model state."""

    predict: Callable
    loss: Callable
    penalty: Callable | None = None

    def __call__(self, params, mask, batch):
        x, y, idx = batch
        per_example = jax.vmap(example_loss(self.predict, self.loss), in_axes=(None, 0, 0))(params, x, y)
        weights = mask[idx].astype(per_example.dtype)
        value = jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1.0)
        if self.penalty is not None:
            value = value + self.penalty(params)
        return value, mask


@dataclasses.dataclass(frozen=True)
class _Fixed:
    optimizer: optax.GradientTransformation

    def __call__(self, seed):
        return self.optimizer


def retrain_on_subsets(predict: Callable, loss: Callable, params, train_data, optimizer: optax.GradientTransformation,
                       *, num_steps: int, num_subsets: int = 32, fraction: float = 0.5, seed: int = 0,
                       batch_size: int | None = None, penalty: Callable | None = None,
                       members_per_chunk: int | None = None) -> SubsetRetrains:
    """M = ``num_subsets`` retrains on random subsets of ``fraction`` of the in-memory ``train_data``, as one
    ``lsgeo.train.sweep`` over the seeds ``seed, ..., seed + M - 1`` (module docstring).

    Args:
      params: the initial parameters w_0 of every run, or ``init_key -> params`` (one initialisation per seed).
      optimizer: an optax transformation; ``num_steps`` steps of full-batch GD, or minibatch SGD with ``batch_size``.
      penalty: ``penalty(params) -> scalar`` added to the objective (e.g. an L2 term).
    """
    n = num_examples(train_data, "train_data")
    validation.check_positive_int(num_subsets, "num_subsets")
    if not 0.0 < float(fraction) <= 1.0 or not 1 <= round(float(fraction) * n) <= n:
        raise ValueError(f"fraction must be in (0, 1] with at least one example per subset, got {fraction!r} (n={n})")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    x, y = train_data
    res = train_lib.sweep(masked_objective(predict, loss, penalty), _Fixed(optimizer), params,
                          (x, y, jnp.arange(n)), {}, seed + np.arange(num_subsets), num_steps=num_steps,
                          batch_size=batch_size, model_state=subset_mask(n, round(float(fraction) * n)),
                          members_per_chunk=members_per_chunk)
    masks = np.asarray(res.state.model_state)[0] > 0.5
    history = {k: np.asarray(v)[0] for k, v in res.history.items()}
    return SubsetRetrains(masks, jax.tree_util.tree_map(lambda a: a[0], res.params), history)


def query_losses(predict: Callable, loss: Callable, stacked_params, query_data) -> np.ndarray:
    """``[M, Q]``: the loss of every query example under each of the M stacked parameter sets."""
    xq, yq = query_data
    one = example_loss(predict, loss)
    per_model = jax.jit(jax.vmap(lambda p, x, y: jax.vmap(one, in_axes=(None, 0, 0))(p, x, y), in_axes=(0, None, None)))
    return np.asarray(per_model(stacked_params, xq, yq))


def predicted_changes(scores, masks) -> np.ndarray:
    """``[M, Q]``: ``-sum_i (1[i in S_j] / |S_j| - 1/n) I[i, q]``, the first-order change of each query's loss when
    training on subset j (module docstring), from scores ``[n, Q]`` and masks ``[M, n]``."""
    scores, masks = np.asarray(scores, np.float64), np.asarray(masks, np.float64)
    if scores.ndim != 2 or masks.ndim != 2 or masks.shape[1] != scores.shape[0]:
        raise ValueError(f"scores must be [n, Q] and masks [M, n] with the same n; got {scores.shape} and "
                         f"{masks.shape}")
    weights = masks / np.maximum(masks.sum(axis=1, keepdims=True), 1.0) - 1.0 / masks.shape[1]
    return -weights @ scores


def lds_from_predictions(predicted, actual) -> tuple[float, float, np.ndarray]:
    """``(LDS, standard error, per-query Spearman [Q])`` of predicted vs actual ``[M, Q]`` (ranks across the M
    subsets, ties averaged). A query whose predictions or outcomes are all equal has no rank correlation (NaN in
    ``per_query``) and is left out of the mean."""
    predicted, actual = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    if predicted.shape != actual.shape or predicted.ndim != 2 or predicted.shape[0] < 3:
        raise ValueError(f"predicted and actual must be [M, Q] with M >= 3 subsets; got {predicted.shape}, "
                         f"{actual.shape}")
    rp, ra = scipy.stats.rankdata(predicted, axis=0), scipy.stats.rankdata(actual, axis=0)
    rp, ra = rp - rp.mean(axis=0), ra - ra.mean(axis=0)
    denominator = np.sqrt((rp**2).sum(axis=0) * (ra**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_query = np.where(denominator > 0, (rp * ra).sum(axis=0) / denominator, np.nan)
    valid = per_query[np.isfinite(per_query)]
    if valid.size == 0:
        raise ValueError("no query has a rank correlation (all predictions or all outcomes constant across subsets)")
    stderr = float(valid.std(ddof=1) / np.sqrt(valid.size)) if valid.size > 1 else float("nan")
    return float(valid.mean()), stderr, per_query


def lds(predict: Callable, loss: Callable, params, train_data, query_data, scores, *,
        retrains: SubsetRetrains | None = None, optimizer: optax.GradientTransformation | None = None,
        num_steps: int | None = None, num_subsets: int = 32, fraction: float = 0.5, seed: int = 0,
        batch_size: int | None = None, penalty: Callable | None = None,
        members_per_chunk: int | None = None) -> LDSResult:
    """The LDS of ``scores [n_train, n_query]`` (module docstring).

    Pass ``retrains`` (from :func:`retrain_on_subsets`) to score several attribution methods on the same
    retrained models; otherwise they are trained here from ``params`` with ``optimizer`` for ``num_steps``.
    """
    if retrains is None:
        if optimizer is None or num_steps is None:
            raise ValueError("lds needs retrains=, or optimizer= and num_steps= to retrain on the subsets")
        retrains = retrain_on_subsets(predict, loss, params, train_data, optimizer, num_steps=num_steps,
                                      num_subsets=num_subsets, fraction=fraction, seed=seed, batch_size=batch_size,
                                      penalty=penalty, members_per_chunk=members_per_chunk)
    predicted = predicted_changes(scores, retrains.masks)
    actual = query_losses(predict, loss, retrains.params, query_data)
    score, stderr, per_query = lds_from_predictions(predicted, actual)
    return LDSResult(score, stderr, per_query, predicted, actual, retrains)
