"""Stochastic estimates of the Hessian's trace (Hutchinson, Hutch++) and diagonal (Hutchinson).

References: M. Hutchinson, A stochastic estimator of the trace of the influence matrix, 1990;
C. Bekas, E. Kokiopoulou, Y. Saad, An estimator for the diagonal of a matrix, Appl. Numer. Math. 2007;
R. Meyer, C. Musco, C. Musco, D. Woodruff, Hutch++: optimal stochastic trace estimation, SOSA 2021;
Z. Yao et al., ADAHESSIAN (the Hutchinson diagonal of network Hessians), AAAI 2021.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import microbatch
from lsgeo.curvature import chunking, products
from lsgeo.validation import check_choice, check_positive_int

__all__ = ["hessian_trace", "hessian_diagonal", "TRACE_METHODS"]

TRACE_METHODS = ("hutchinson", "hutch++")
_HIGHEST = jax.lax.Precision.HIGHEST


def hessian_trace(
    f,
    params,
    batch,
    key: jax.Array,
    *,
    num_probes: int = 64,
    method: str = "hutchinson",
    chunk_size: int | None = None,
    return_stderr: bool = False,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
):
    """Stochastic estimate of ``tr(H)``, the trace of the Hessian of ``f`` at ``params``.

    ``method="hutchinson"`` (Hutchinson 1990): ``1/N sum_i z_i^T H z_i`` with ``N = num_probes``
    Rademacher probes ``z_i``; unbiased, variance ``2 (||H||_F^2 - sum_j H_jj^2) / N``.

    ``method="hutch++"`` (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1) at the same count of
    ``N`` HVPs: with ``s = N // 3``, ``Q = orth(H S)`` for a Rademacher ``S`` of ``s`` columns, then
    ``tr(Q^T H Q) + 1/g sum_i z_i^T (I - Q Q^T) H (I - Q Q^T) z_i`` with ``g = N - 2 s`` Rademacher
    ``z_i``. Unbiased; the top of the spectrum is captured exactly by ``Q``, so on matrices with a
    decaying spectrum (network Hessians) the error falls like ``1/N`` instead of ``1/sqrt(N)``. The three
    phases share one compiled product body (one ``lax.scan`` over blocks of vectors).

    Args:
      f: objective ``f(params, batch) -> scalar`` (a mean over the examples of ``batch``).
      params: parameter pytree (``m`` scalars).
      batch: data passed to ``f``.
      key: PRNG key for the probes.
      num_probes: total number of HVPs ``N`` (>= 1; >= 3 for Hutch++).
      method: ``"hutchinson"`` or ``"hutch++"``.
      chunk_size: probes vmapped through one product. ``None``: as many as fit in a memory budget
        (``lsgeo.curvature.chunking``; one at a time on a large model, up to 16 on a small one).
      return_stderr: also return the standard error of the estimate (the sample standard deviation of
        the stochastic part over ``sqrt`` of its number of probes; ``0`` with a single probe).
      microbatch_size: examples per microbatch for the exact data-set Hessian (``lsgeo.microbatch``).
      devices: devices the microbatches are sharded over (default ``jax.devices()``).

    Returns:
      The scalar estimate, or ``(estimate, stderr)`` when ``return_stderr``.

    Cost: ``num_probes`` HVPs (at most ``chunk_size - 1`` more per phase to keep blocks equal). Memory:
    Hutchinson, ``chunk_size`` probes of size ``m`` and their tangents; Hutch++, ``O(m N)`` for ``S``,
    ``Q`` and ``G``. The probes and the reductions use at least float32.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> f = lambda w, b: 0.5 * jnp.sum(b * w**2)  # H = diag(b)
      >>> round(float(curvature.hessian_trace(f, jnp.ones(3), jnp.array([1.0, 2.0, 3.0]), jax.random.key(0))), 4)
      6.0
    """
    products.check_objective(f, params)
    check_choice(method, "method", TRACE_METHODS)
    check_positive_int(num_probes, "num_probes")
    chunking.check_chunk_size(chunk_size)
    if method == "hutch++" and num_probes < 3:
        raise ValueError(f"num_probes must be >= 3 for method='hutch++' (3 blocks of HVPs), got {num_probes}")
    plan = microbatch.make_plan(batch, microbatch_size, devices=devices)
    params, batch, key = microbatch.place(plan, params, batch, key)
    if chunk_size is None:
        chunk_size = chunking.auto_chunk(f, params, batch, plan, num_probes)
    return _hessian_trace(f, num_probes, method, chunk_size, bool(return_stderr), plan, params, batch, key)


def _stats(values):
    n = values.shape[0]
    mean = jnp.mean(values)
    if n < 2:
        return mean, jnp.zeros((), values.dtype)
    return mean, jnp.std(values, ddof=1) / np.sqrt(n)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _hessian_trace(f, num_probes, method, chunk, return_stderr, plan, params, batch, key):
    m, _, dtype, _ = products.flat_spec(params)
    matvec = products.hessian_matvec(f, params, batch, plan)
    if method == "hutchinson":

        def quad(k):
            z = jax.random.rademacher(k, (m,), dtype=dtype)
            return jnp.vdot(z, matvec(z))

        estimate, stderr = _stats(chunking.chunked_map(quad, jax.random.split(key, num_probes), chunk))
    else:
        estimate, stderr = _hutchpp(matvec, key, m, dtype, num_probes, chunk)
    return (estimate, stderr) if return_stderr else estimate


def _hutchpp(matvec, key, m, dtype, num_probes, chunk):
    """Hutch++ with one product body: the vectors live in one ``[T, m]`` table, sketch rows first (padded
    to a multiple of ``chunk`` with zero rows), then the rows of Q and of the projected G, which are filled
    in when the scan reaches them (``lax.cond``); a ``lax.scan`` applies H to ``chunk`` rows per step."""
    s = min(num_probes // 3, m)
    g = num_probes - 2 * s
    chunk = min(chunk, num_probes)
    s_pad = -(-s // chunk) * chunk
    rest_pad = -(-(s + g) // chunk) * chunk
    key_s, key_g = jax.random.split(key)
    sketch = jax.random.rademacher(key_s, (s, m), dtype=dtype)  # S^T
    resid = jax.random.rademacher(key_g, (g, m), dtype=dtype)
    table = jnp.zeros((s_pad + rest_pad, m), dtype)
    table = table.at[:s].set(sketch).at[s_pad + s : s_pad + s + g].set(resid)
    images = jnp.zeros((s_pad, m), dtype)  # H S^T rows

    def fill(table, images):
        q, _ = jnp.linalg.qr(images[:s].T)  # [m, s], orth(H S)
        gq = table[s_pad + s : s_pad + s + g]
        gq = gq - jnp.matmul(jnp.matmul(gq, q, precision=_HIGHEST), q.T, precision=_HIGHEST)  # (I - Q Q^T) G
        return table.at[s_pad : s_pad + s].set(q.T).at[s_pad + s : s_pad + s + g].set(gq)

    def step(carry, t):
        table, images = carry
        table = jax.lax.cond(t == s_pad // chunk, fill, lambda tb, _: tb, table, images)
        block = jax.lax.dynamic_slice_in_dim(table, t * chunk, chunk, axis=0)
        out = jax.vmap(matvec)(block)
        images = jax.lax.cond(
            t < s_pad // chunk,
            lambda im: jax.lax.dynamic_update_slice_in_dim(im, out, jnp.minimum(t * chunk, s_pad - chunk), axis=0),
            lambda im: im,
            images,
        )
        return (table, images), jnp.sum(block * out, axis=-1)

    steps = (s_pad + rest_pad) // chunk
    _, quads = jax.lax.scan(step, (table, images), jnp.arange(steps))
    quads = quads.reshape(-1)
    rest, stderr = _stats(quads[s_pad + s : s_pad + s + g])
    return jnp.sum(quads[s_pad : s_pad + s]) + rest, stderr


def hessian_diagonal(
    f,
    params,
    batch,
    key: jax.Array,
    *,
    num_probes: int = 64,
    chunk_size: int | None = None,
    return_stderr: bool = False,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
):
    """Hutchinson estimate of ``diag(H)``, the diagonal of the Hessian of ``f`` at ``params``.

    ``d = 1/N sum_i z_i * (H z_i)`` (elementwise) with ``N = num_probes`` Rademacher probes: unbiased,
    since ``E[z_a z_b] = delta_ab`` gives ``E[z_a (H z)_a] = H_aa``; the variance of coordinate ``a`` is
    ``(sum_b H_ab^2 - H_aa^2) / N`` (Bekas, Kokiopoulou, Saad 2007; ADAHESSIAN's preconditioner).

    Args:
      f, params, batch, key: objective, parameters, data and the probes' PRNG key.
      num_probes: number of HVPs ``N`` (>= 1).
      chunk_size: probes vmapped together (``None``: from a memory budget, as in ``hessian_trace``).
      return_stderr: also return the per-coordinate standard error (sample standard deviation over
        ``sqrt(N)``; zeros with one probe).
      microbatch_size, devices: the exact data-set Hessian by microbatches (``lsgeo.microbatch``).

    Returns:
      A pytree shaped like ``params`` (the parameters' dtypes), or ``(diagonal, stderr)``.

    Cost: ``num_probes`` HVPs. Memory: ``chunk_size`` probes and two accumulators of size ``m`` (at least
    float32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> f = lambda w, b: 0.5 * jnp.sum(b * w**2)  # H = diag(b): every probe is exact
      >>> curvature.hessian_diagonal(f, jnp.ones(3), jnp.array([1.0, 2.0, 3.0]), jax.random.key(0)).tolist()
      [1.0, 2.0, 3.0]
    """
    products.check_objective(f, params)
    check_positive_int(num_probes, "num_probes")
    chunking.check_chunk_size(chunk_size)
    plan = microbatch.make_plan(batch, microbatch_size, devices=devices)
    params, batch, key = microbatch.place(plan, params, batch, key)
    if chunk_size is None:
        chunk_size = chunking.auto_chunk(f, params, batch, plan, num_probes)
    return _hessian_diagonal(f, num_probes, chunk_size, bool(return_stderr), plan, params, batch, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _hessian_diagonal(f, num_probes, chunk, return_stderr, plan, params, batch, key):
    m, _, dtype, unravel = products.flat_spec(params)
    matvec = products.hessian_matvec(f, params, batch, plan)
    chunk = min(chunk, num_probes)
    steps = -(-num_probes // chunk)
    keys = jax.random.split(key, steps * chunk).reshape(steps, chunk)
    valid = (jnp.arange(steps * chunk) < num_probes).reshape(steps, chunk)

    def step(carry, xs):
        total, total_sq = carry
        ks, mask = xs
        z = jax.vmap(lambda k: jax.random.rademacher(k, (m,), dtype=dtype))(ks)
        d = jnp.where(mask[:, None], z * jax.vmap(matvec)(z), 0.0)
        return (total + jnp.sum(d, axis=0), total_sq + jnp.sum(jnp.square(d), axis=0)), None

    zeros = jnp.zeros((m,), dtype)
    (total, total_sq), _ = jax.lax.scan(step, (zeros, zeros), (keys, valid))
    mean = total / num_probes
    if num_probes > 1:
        var = jnp.maximum(total_sq - num_probes * jnp.square(mean), 0.0) / (num_probes - 1)
        stderr = jnp.sqrt(var / num_probes)
    else:
        stderr = jnp.zeros_like(mean)
    diagonal = unravel(mean)
    return (diagonal, unravel(stderr)) if return_stderr else diagonal
