"""Measurements recorded along a training run: curvature computed inside the compiled loop.

A measurement is stateful like an optax transformation, a pair of pure functions

    init(params) -> state
    update(params, batch, state) -> (metrics: dict[str, scalar], state)

whose state travels with the run in ``TrainState.measure`` (so a resumed or ``vmap``-ped run keeps it):
``lsgeo.train.train(f, opt, params, data, ..., measure=top_eigenvalue_tracker(f), measure_every=k)``
records its metrics every k steps next to the losses, computed on the device by a compiled program between the
loop's chunks (compiled once per run; vmapped over the members of a sweep). ``update`` gets the clean iterate w_t
and the batch (or data set) it measures on: the training data, or ``measure_data=`` of ``train`` / ``sweep``. The trackers here build a curvature operator at
w_t (``lsgeo.curvature``) and record what it gives:

``top_eigenvalue_tracker``  the top-k eigenvalues by Lanczos, warm-started from the previous measurement's
                           Ritz vectors: after a small step the wanted pairs converge in a few products
                           instead of a cold run's dozens (the count is recorded). The edge of stability
                           (Cohen et al. 2021) is lambda_max against 2 / lr.
``trace_tracker``          a Hutchinson (or XTrace) estimate of the trace, with its standard error.

References: J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar, Gradient descent on neural networks
typically occurs at the edge of stability, ICLR 2021.

Example:
  >>> import jax, jax.numpy as jnp
  >>> f = lambda w, b: 0.5 * jnp.sum(b * w**2)  # H = diag(b)
  >>> tracker = top_eigenvalue_tracker(f, k=1, num_iters=3, tol=1e-6)
  >>> state = tracker.init(jnp.ones(3))
  >>> metrics, state = tracker.update(jnp.ones(3), jnp.array([1.0, 4.0, 2.0]), state)
  >>> round(float(metrics["lambda_max"]), 4)
  4.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from lsgeo import curvature, validation
from lsgeo.curvature import krylov

PyTree = Any

__all__ = ["Measurement", "TopEigenState", "top_eigenvalue_tracker", "trace_tracker"]

_HIGHEST = jax.lax.Precision.HIGHEST


class Measurement(NamedTuple):
    """``init(params) -> state``, ``update(params, batch, state) -> (metrics, state)``; both pure."""

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, Any, PyTree], tuple[dict, PyTree]]


class TopEigenState(NamedTuple):
    """vectors: the last Ritz vectors ``[k, m]`` (flat, the operator's work dtype); key: for the start
    vector's perturbation; warm: whether ``vectors`` holds a previous measurement."""

    vectors: jax.Array
    key: jax.Array
    warm: jax.Array


def _key(key):
    return jax.random.key(key) if isinstance(key, int) else key


def top_eigenvalue_tracker(
    objective: Callable,
    *,
    k: int = 1,
    num_iters: int = 40,
    tol: float | None = 1e-3,
    key=0,
    name: str = "lambda_max",
    operator: Callable | None = None,
) -> Measurement:
    """The top-k eigenvalues of a curvature operator at w_t, warm-started, as a ``Measurement``.

    Each ``update`` runs Lanczos (``lsgeo.curvature.krylov.ritz_run``, full reorthogonalisation, early
    stopping when every wanted Ritz pair has relative residual <= ``tol``) on ``operator(params, batch)``
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
      k: eigenvalues tracked.
      num_iters: Lanczos steps at most per measurement (the cap; ``k <= num_iters``).
      tol: relative residual tolerance of the early stop (None: always ``num_iters`` products). An eigenvalue
        lies within ``tol |theta|`` of each returned Ritz value theta, and the error of a well-separated one is
        about ``(tol theta)^2 / gap`` (the Kato-Temple bound): the default 1e-3 bounds lambda_max to 0.1%
        (measured: ~1e-5 relative along GD at the edge of stability), while 1e-4 costs 25-40% more products
        (``benchmarks/bench_tracking.py``).
      key: int or PRNG key of the start vectors.
      name: the metric's name: ``name`` for k = 1, else ``name_1 .. name_k``; ``name_products`` is the
        number of products the measurement used.
      operator: ``operator(params, batch) -> CurvatureOperator`` (e.g. a Gauss-Newton operator);
        default ``curvature.Hessian(objective, params, batch)``.

    Cost per measurement: at most ``num_iters`` products (a few when warm) and ``O(num_iters^2 m)``.
    Memory: ``(num_iters + 1 + k) m`` in the state and the basis.
    """
    validation.check_positive_int(k, "k")
    validation.check_positive_int(num_iters, "num_iters")
    if k > num_iters:
        raise ValueError(f"k must be <= num_iters={num_iters}, got {k}")
    build = operator or (lambda params, batch: curvature.Hessian(objective, params, batch))

    def init(params):
        flat = ravel_pytree(params)[0]
        dtype = jnp.promote_types(flat.dtype, jnp.float32)
        return TopEigenState(jnp.zeros((k, flat.shape[0]), dtype), _key(key), jnp.asarray(False))

    def update(params, batch, state):
        op = build(params, batch)
        key_now, key_next = jax.random.split(state.key)
        noise = jax.random.normal(key_now, (op.size,), op.dtype)
        warm_start = jnp.sum(state.vectors, axis=0)
        warm_start = warm_start / jnp.maximum(jnp.linalg.norm(warm_start), jnp.finfo(op.dtype).tiny)
        noise = noise / jnp.linalg.norm(noise)
        v0 = jnp.where(state.warm, warm_start + 1e-3 * noise, noise)
        values, coefficients, basis, steps, _ = krylov.ritz_run(op.matvec, v0, min(num_iters, op.size), k=k,
                                                                tol=tol)
        vectors = jnp.matmul(coefficients.T, basis, precision=_HIGHEST)
        metrics = {name: values[0]} if k == 1 else {f"{name}_{j + 1}": values[j] for j in range(k)}
        metrics[f"{name}_products"] = steps
        return metrics, TopEigenState(vectors.astype(state.vectors.dtype), key_next, jnp.asarray(True))

    return Measurement(init, update)


def trace_tracker(
    objective: Callable,
    *,
    num_probes: int = 16,
    method: str = "hutchinson",
    key=0,
    name: str = "trace",
    operator: Callable | None = None,
) -> Measurement:
    """A stochastic trace estimate of a curvature operator at w_t (``lsgeo.curvature.hessian_trace``, fresh
    probes each time), recorded as ``name`` with its standard error ``name_stderr``.

    Cost per measurement: ``num_probes`` products. State: the PRNG key.
    """
    validation.check_positive_int(num_probes, "num_probes")
    build = operator or (lambda params, batch: curvature.Hessian(objective, params, batch))

    def init(params):
        return _key(key)

    def update(params, batch, state):
        key_now, key_next = jax.random.split(state)
        estimate, stderr = curvature.hessian_trace(build(params, batch), key_now, num_probes=num_probes,
                                                   method=method, return_stderr=True)
        return {name: estimate, f"{name}_stderr": stderr}, key_next

    return Measurement(init, update)
