"""Measurements recorded along a training run: curvature computed inside the compiled loop.

A measurement is stateful like an optax transformation, a pair of pure functions

    init(params) -> state
    update(params, batch, state) -> (metrics: dict[str, scalar], state)

and, optionally, ``check(params, batch)``, run once, eagerly, before anything is compiled: it raises a
ValueError for data the measurement cannot run on (the trackers here build their operator, so a batch-coupled
objective with microbatches, an empty or mis-shaped batch or a bad source is refused before training starts).
``lsgeo.train.train`` and ``lsgeo.train.sweep`` take any measurement by this protocol: its state travels with
the run in ``TrainState.measure`` (so a resumed or ``vmap``-ped run keeps it):
``train(f, opt, params, data, ..., measure=top_eigenvalue_tracker(f), measure_every=k)`` records its metrics
every k steps next to the losses, computed on the device by a compiled program between the loop's chunks
(compiled once per run; vmapped over the members of a sweep). ``update`` gets the clean iterate w_t and the
batch (or data set) it measures on: the training data, or ``measure_data=`` of ``train`` / ``sweep`` (a batch
or a data source, a zero-argument callable returning a fresh iterator of batches). The trackers here build a
curvature operator at w_t (default ``lsgeo.curvature.Hessian(objective, params, batch,
microbatch_size=...)``: like every estimator, on the whole batch, on microbatches in the memory of one, or
streamed from a source) and record what it gives:

``top_eigenvalue_tracker``  the top-k eigenvalues by Lanczos, warm-started from the previous measurement's
                           Ritz vectors: after a small step the wanted pairs converge in a few products
                           instead of a cold run's dozens (the count is recorded). The edge of stability
                           (Cohen et al. 2021) is lambda_max against 2 / lr.
``trace_tracker``          a Hutchinson (Hutch++, XTrace) estimate of the trace, with its standard error.

References: J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar, Gradient descent on neural networks
typically occurs at the edge of stability, ICLR 2021.

Example:
  >>> import jax, jax.numpy as jnp
  >>> f = lambda w, b: 0.5 * jnp.mean(b @ w**2)  # H = diag(mean of the rows of b)
  >>> tracker = top_eigenvalue_tracker(f, k=1, num_iters=3, tol=1e-6, microbatch_size=2)
  >>> state = tracker.init(jnp.ones(3))
  >>> metrics, state = tracker.update(jnp.ones(3), jnp.array([[1.0, 4.0, 2.0], [1.0, 2.0, 2.0]]), state)
  >>> round(float(metrics["lambda_max"]), 4)
  3.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from lsgeo import validation
from lsgeo.curvature import krylov, locking
from lsgeo.curvature.operators import Hessian
from lsgeo.curvature.trace_estimators import TRACE_METHODS, hessian_trace

PyTree = Any

__all__ = ["Measurement", "TopEigenState", "top_eigenvalue_tracker", "trace_tracker"]



class Measurement(NamedTuple):
    """``init(params) -> state``, ``update(params, batch, state) -> (metrics, state)``, both pure; optionally
    ``check(params, batch)``, eager, raising ValueError for data the measurement cannot run on."""

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, Any, PyTree], tuple[dict, PyTree]]
    check: Callable[[PyTree, Any], None] | None = None


class TopEigenState(NamedTuple):
    """vectors: the last Ritz vectors ``[k, m]`` (flat, the operator's work dtype); key: for the start
    vector's perturbation; warm: whether ``vectors`` holds a previous measurement."""

    vectors: jax.Array
    key: jax.Array
    warm: jax.Array


def _is_seed(key) -> bool:
    return isinstance(key, (int, np.integer)) and not isinstance(key, bool)


def _key(key):
    return jax.random.key(int(key)) if _is_seed(key) else key


def _check_key(key) -> None:
    """``key``: an int seed in [0, 2**32) or a single PRNG key (ValueError naming ``key``)."""
    if _is_seed(key):
        if not 0 <= int(key) < 2**32:
            raise ValueError(f"key must be an int seed in [0, 2**32) or a PRNG key, got {key}")
        return
    validation.check_key(key, "key")


def _check_name(name) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string (the metric's name in the history), got {name!r}")


def _operator_builder(objective, operator, microbatch_size, devices) -> Callable:
    """``build(params, batch) -> operator``: ``operator`` itself, or the Hessian of ``objective`` on ``batch`` cut
    into microbatches of ``microbatch_size`` (a data source: its own batches)."""
    if operator is not None:
        validation.check_callable(operator, "operator")
        if microbatch_size is not None or devices is not None:
            raise ValueError("microbatch_size and devices configure the default Hessian operator; with operator=, "
                             "build the operator with them (e.g. lambda p, b: GaussNewton(..., microbatch_size=s))")
        return operator
    validation.check_callable(objective, "objective")
    if microbatch_size is not None:
        validation.check_positive_int(microbatch_size, "microbatch_size")
    return lambda params, batch: Hessian(objective, params, batch, microbatch_size=microbatch_size, devices=devices)


def top_eigenvalue_tracker(
    objective: Callable,
    *,
    k: int = 1,
    num_iters: int = 40,
    tol: float | None = 1e-3,
    key=0,
    name: str = "lambda_max",
    operator: Callable | None = None,
    microbatch_size: int | None = None,
    devices=None,
) -> Measurement:
    """The top-k eigenvalues of a curvature operator at w_t, warm-started, as a ``Measurement``.

    Each ``update`` runs Lanczos (``lsgeo.curvature.locking.checked_ritz_run``: ``krylov.ritz_run`` with the
    multiplicity check that finds repeated top eigenvalues when ``k > 1`` and ``tol`` stops early (at least one
    more early-stopped run per measurement; ``k = 1`` needs none), full reorthogonalisation, early stopping when every
    wanted Ritz pair has relative residual <= ``tol``) on ``operator(params, batch)``
    (default: the Hessian of ``objective``). The start is the sum of the previous measurement's k Ritz
    vectors plus a small random part (1e-3 of its norm, so that the start is never exactly orthogonal to an
    eigenvector); the first measurement starts from a Gaussian vector.

    The saving is the Krylov steps a cold start spends finding the top eigenvector's direction: about
    ``log(angle_cold / angle_warm) / log(rate)``, so 1.4-2x fewer products along GD (measured on a 3466-parameter
    MLP, ``benchmarks/bench_tracking.py``: at the edge of stability the top eigenvector turns by 15-25 degrees
    in 10 steps, in stable GD by ~3). The failure mode of any warm start with early stopping: when a new
    eigenvalue overtakes the tracked one (eigenvalues cross, as at the edge of stability) along a direction
    nearly orthogonal to the previous Ritz vector, the run may stop at the old pair, now the second
    eigenvalue, within ``tol``. Rare (1 of 279 measurements in ``experiments.hessian_spectrum``, 0 of 40 in the
    benchmark); tracking ``k=2`` and reading ``name_1`` guards against it for ~35% more products.

    Args:
      objective: ``objective(params, batch) -> scalar``, a mean over examples.
      k: eigenvalues tracked (at most ``num_iters`` and at most m, the number of parameters).
      num_iters: Lanczos steps at most per measurement (the cap; runs of an operator of size m < num_iters take m).
      tol: relative residual tolerance of the early stop (None: always ``num_iters`` products). An eigenvalue
        lies within ``tol |theta|`` of each returned Ritz value theta, and the error of a well-separated one is
        about ``(tol theta)^2 / gap`` (the Kato-Temple bound): the default 1e-3 bounds lambda_max to 0.1%
        (measured: ~1e-5 relative along GD at the edge of stability), while 1e-4 costs 25-40% more products
        (``benchmarks/bench_tracking.py``).
      key: int or PRNG key of the start vectors.
      name: the metric's name: ``name`` for k = 1, else ``name_1 .. name_k``; ``name_products`` is the
        number of products the measurement used.
      operator: ``operator(params, batch) -> CurvatureOperator`` (e.g. a Gauss-Newton operator);
        default ``curvature.Hessian(objective, params, batch, microbatch_size=microbatch_size, devices=devices)``.
      microbatch_size, devices: as for ``curvature.Hessian``: each product is the exact data-set product, the
        example-weighted mean over microbatches, in the memory of one (the objective must be a mean over
        examples: checked by ``check`` before training).

    Cost per measurement: at most ``num_iters`` products (a few when warm) and ``O(num_iters^2 m)``.
    Memory: ``(num_iters + 1 + k) m`` in the state and the basis.
    """
    validation.check_positive_int(k, "k")
    validation.check_positive_int(num_iters, "num_iters")
    if k > num_iters:
        raise ValueError(f"k must be <= num_iters (the Lanczos steps that give k Ritz values); got k={k}, "
                         f"num_iters={num_iters}")
    if tol is not None and not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and 0 < tol < 1):
        raise ValueError(f"tol must be None or a relative tolerance in (0, 1), got {tol!r}")
    _check_key(key)
    _check_name(name)
    build = _operator_builder(objective, operator, microbatch_size, devices)

    def check_size(m: int) -> None:
        if k > m:
            raise ValueError(f"k={k} eigenvalues asked of an operator of size m={m} (the number of parameters it "
                             f"acts on): k must be <= m")

    def init(params):
        flat = ravel_pytree(params)[0]
        dtype = jnp.promote_types(flat.dtype, jnp.float32)
        return TopEigenState(jnp.zeros((k, flat.shape[0]), dtype), _key(key), jnp.asarray(False))

    def update(params, batch, state):
        op = build(params, batch)
        check_size(op.size)
        key_now, key_next = jax.random.split(state.key)
        noise = jax.random.normal(key_now, (op.size,), op.dtype)
        warm_start = jnp.sum(state.vectors, axis=0)
        warm_start = warm_start / jnp.maximum(jnp.linalg.norm(warm_start), jnp.finfo(op.dtype).tiny)
        noise = noise / jnp.linalg.norm(noise)
        v0 = jnp.where(state.warm, warm_start + 1e-3 * noise, noise)
        steps_cap, precision = min(num_iters, op.size), krylov.rounding_rtol(op.param_dtype)
        values, vectors, _, steps = locking.checked_ritz_run(op.matvec, v0, steps_cap, k=k, tol=tol,
                                                             product_rtol=precision, start_key=key_now)
        metrics = {name: values[0]} if k == 1 else {f"{name}_{j + 1}": values[j] for j in range(k)}
        metrics[f"{name}_products"] = steps
        return metrics, TopEigenState(vectors.astype(state.vectors.dtype), key_next, jnp.asarray(True))

    def check(params, batch):
        check_size(build(params, batch).size)

    return Measurement(init, update, check)


def trace_tracker(
    objective: Callable,
    *,
    num_probes: int = 16,
    method: str = "hutchinson",
    key=0,
    name: str = "trace",
    operator: Callable | None = None,
    microbatch_size: int | None = None,
    devices=None,
) -> Measurement:
    """A stochastic trace estimate of a curvature operator at w_t (``lsgeo.curvature.hessian_trace``, fresh
    probes each time), recorded as ``name`` with its standard error ``name_stderr``.

    Args:
      objective, key, name, operator, microbatch_size, devices: as in :func:`top_eigenvalue_tracker`.
      num_probes: probe vectors per measurement (at least 3 for ``"hutch++"``, 2 for ``"xtrace"``).
      method: one of ``lsgeo.curvature.TRACE_METHODS`` (``"hutchinson"``, ``"hutch++"``, ``"xtrace"``).

    Cost per measurement: ``num_probes`` products. State: the PRNG key.
    """
    validation.check_positive_int(num_probes, "num_probes")
    validation.check_choice(method, "method", TRACE_METHODS)
    minimum = {"hutchinson": 1, "hutch++": 3, "xtrace": 2}[method]
    if num_probes < minimum:
        raise ValueError(f"num_probes must be >= {minimum} for method={method!r}, got {num_probes}")
    _check_key(key)
    _check_name(name)
    build = _operator_builder(objective, operator, microbatch_size, devices)

    def init(params):
        return _key(key)

    def update(params, batch, state):
        key_now, key_next = jax.random.split(state)
        estimate, stderr = hessian_trace(build(params, batch), key_now, num_probes=num_probes, method=method,
                                         return_stderr=True)
        return {name: estimate, f"{name}_stderr": stderr}, key_next

    def check(params, batch):
        op = build(params, batch)
        if method == "xtrace" and num_probes // 2 >= op.size:
            raise ValueError(f"num_probes // 2 must be < m={op.size} for method='xtrace', got num_probes={num_probes}")

    return Measurement(init, update, check)
