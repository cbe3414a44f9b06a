"""Stochastic estimates of a curvature operator's trace (Hutchinson, Hutch++, XTrace) and diagonal
(Hutchinson, XDiag), with their standard errors.

Every function takes an operator (``Hessian``, ``GaussNewton``, ``EmpiricalFisher``, a block, ...) and a
key, ``hessian_trace(op, key)``, or builds the Hessian from ``(f, params, batch, key)``.

References: M. Hutchinson, A stochastic estimator of the trace of the influence matrix, 1990;
C. Bekas, E. Kokiopoulou, Y. Saad, An estimator for the diagonal of a matrix, Appl. Numer. Math. 2007;
R. Meyer, C. Musco, C. Musco, D. Woodruff, Hutch++: optimal stochastic trace estimation, SOSA 2021;
E. Epperly, J. Tropp, R. Webber, XTrace: making the most of every sample in stochastic trace estimation,
SIMAX 2024 (XTrace and XDiag); Z. Yao et al., ADAHESSIAN (the Hutchinson diagonal of network Hessians), AAAI 2021.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo.curvature import chunking
from lsgeo.curvature.operator import resolve
from lsgeo.validation import check_choice, check_positive_int

__all__ = ["hessian_trace", "hessian_diagonal", "TRACE_METHODS", "DIAGONAL_METHODS"]

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
DIAGONAL_METHODS = ("hutchinson", "xdiag")
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _vectors_per_pass(op, value, num_vectors):
    chunking.check_vectors_per_pass(value)
    return chunking.auto_vectors_per_pass(op, num_vectors) if value is None else value


def hessian_trace(
    f,
    params=None,
    batch=None,
    key: jax.Array | None = None,
    *,
    num_probes: int = 64,
    method: str = "hutchinson",
    vectors_per_pass: int | None = None,
    return_stderr: bool = False,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
):
    """Stochastic estimate of ``tr(A)`` for a curvature operator ``A`` (the Hessian of ``f`` by default).

    ``method="hutchinson"`` (Hutchinson 1990): ``1/N sum_i z_i^T A z_i`` with ``N = num_probes``
    Rademacher probes ``z_i``; unbiased, variance ``2 (||A||_F^2 - sum_j A_jj^2) / N``.

    ``method="hutch++"`` (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1) at the same count of
    ``N`` products: with ``s = N // 3``, ``Q = orth(A S)`` for a Rademacher ``S`` of ``s`` columns, then
    ``tr(Q^T A Q) + 1/g sum_i z_i^T (I - Q Q^T) A (I - Q Q^T) z_i`` with ``g = N - 2 s`` Rademacher
    ``z_i``. Unbiased; the top of the spectrum is captured exactly by ``Q``, so on matrices with a
    decaying spectrum (network Hessians) the error falls like ``1/N`` instead of ``1/sqrt(N)``.

    ``method="xtrace"`` (Epperly, Tropp, Webber 2024): ``s = N // 2`` Rademacher columns ``Omega``, ``Y = A
    Omega = QR``; for each ``i`` the basis ``Q_(i)`` of ``Y`` without column ``i`` (a rank-one downdate
    of ``Q``: ``Q (I - s_i s_i^T)`` with ``s_i`` the normalised ``i``-th column of ``R^-T``) and the
    Hutch++ estimate ``tr(Q_(i)^T A Q_(i)) + omega_i^T (I - P_(i)) A (I - P_(i)) omega_i``; the estimate is
    their mean (unbiased, every product used as sketch and as probe), its standard error their spread.
    Needs ``s < m``. A sketch ``A Omega`` of rank below ``s`` (``rank A < s``: a zero block, an unused
    parameter) has vanishing pivots in ``R``; they are replaced by 1 so that the estimate stays finite (0 for a
    zero operator, as Hutchinson gives).

    Args:
      f: a curvature operator, or the objective ``f(params, batch) -> scalar`` of a ``Hessian``.
      params, batch: with an objective, the parameters and the data (omit both with an operator).
      key: PRNG key for the probes (``hessian_trace(op, key)``).
      num_probes: total number of products ``N`` (>= 1; >= 3 for Hutch++, >= 2 for XTrace).
      method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
      vectors_per_pass: probes vmapped through one product. ``None``: as many as fit in a memory budget
        (``lsgeo.curvature.chunking``; one at a time on a large model, up to 16 on a small one).
      return_stderr: also return the standard error: the sample standard deviation of the stochastic
        terms over the square root of their number (Hutchinson, Hutch++) or of the ``s`` exchangeable
        estimates (XTrace); NaN when the estimate rests on one random term (Hutchinson with one probe,
        Hutch++ with ``num_probes = 3`` (one residual probe), XTrace with ``num_probes < 4`` (one estimate)):
        one term's spread is unknown, and reporting 0 would claim an exact value.
      microbatch_size, devices: with an objective, the data plan of its ``Hessian`` (``lsgeo.dataplan``).

    Returns:
      The scalar estimate, or ``(estimate, stderr)`` when ``return_stderr``.

    Cost: ``num_probes`` products (fewer than one extra per pass to keep passes equal). Memory:
    Hutchinson, ``vectors_per_pass`` probes of size ``m`` and their tangents; Hutch++ and XTrace,
    ``O(m N)``. Probes and reductions use at least float32.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> f = lambda w, b: 0.5 * jnp.sum(b * w**2)  # H = diag(b)
      >>> round(float(curvature.hessian_trace(f, jnp.ones(3), jnp.array([1.0, 2.0, 3.0]), jax.random.key(0))), 4)
      6.0
    """
    op, key = resolve(f, params, batch, key, name="hessian_trace", microbatch_size=microbatch_size, devices=devices)
    check_choice(method, "method", TRACE_METHODS)
    check_positive_int(num_probes, "num_probes")
    minimum = {"hutchinson": 1, "hutch++": 3, "xtrace": 2}[method]
    if num_probes < minimum:
        raise ValueError(f"num_probes must be >= {minimum} for method={method!r}, got {num_probes}")
    if method == "xtrace" and num_probes // 2 >= op.size:
        raise ValueError(f"num_probes // 2 must be < m={op.size} for method='xtrace', got num_probes={num_probes}")
    chunk = _vectors_per_pass(op, vectors_per_pass, num_probes)
    return _hessian_trace(op, key, num_probes, method, chunk, bool(return_stderr))


def _stats(values):
    """Mean and standard error of ``n`` exchangeable terms; the standard error is NaN for ``n < 2``: the spread
    of one term is unknown (not 0: a one-probe estimate can be far off)."""
    n = values.shape[0]
    mean = jnp.mean(values)
    if n < 2:
        return mean, jnp.full((), jnp.nan, values.dtype)
    return mean, jnp.std(values, ddof=1) / np.sqrt(n)


def _rademacher_rows(key, num, m, dtype):
    return jax.random.rademacher(key, (num, m), dtype=dtype)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _hessian_trace(op, key, num_probes, method, chunk, return_stderr):
    m, dtype = op.size, op.dtype
    if method == "hutchinson":

        def quads(keys):
            z = jax.vmap(lambda k: jax.random.rademacher(k, (m,), dtype=dtype))(keys)
            return jnp.sum(z * op.matmat(z), axis=-1)

        estimate, stderr = _stats(chunking.chunked_map(quads, jax.random.split(key, num_probes), chunk, batched=True))
    elif method == "hutch++":
        estimate, stderr = _hutchpp(op, key, m, dtype, num_probes, chunk)
    else:
        estimate, stderr = _xtrace(op, key, m, dtype, num_probes // 2, chunk)
    return (estimate, stderr) if return_stderr else estimate


def _hutchpp(op, key, m, dtype, num_probes, chunk):
    """Hutch++ with one product body: the vectors live in one ``[T, m]`` table, sketch rows first (padded
    to a multiple of ``chunk`` with zero rows), then the rows of Q and of the projected G, which are filled
    in when the scan reaches them (``lax.cond``); a ``lax.scan`` applies A to ``chunk`` rows per step."""
    s = min(num_probes // 3, m)
    g = num_probes - 2 * s
    chunk = min(chunk, num_probes)
    s_pad = -(-s // chunk) * chunk
    rest_pad = -(-(s + g) // chunk) * chunk
    key_s, key_g = jax.random.split(key)
    sketch = _rademacher_rows(key_s, s, m, dtype)  # S^T
    resid = _rademacher_rows(key_g, g, m, dtype)
    table = jnp.zeros((s_pad + rest_pad, m), dtype)
    table = table.at[:s].set(sketch).at[s_pad + s : s_pad + s + g].set(resid)
    images = jnp.zeros((s_pad, m), dtype)  # A S^T rows

    def fill(table, images):
        q, _ = jnp.linalg.qr(images[:s].T)  # [m, s], orth(A S)
        gq = table[s_pad + s : s_pad + s + g]
        gq = gq - _mm(_mm(gq, q), q.T)  # (I - Q Q^T) G
        return table.at[s_pad : s_pad + s].set(q.T).at[s_pad + s : s_pad + s + g].set(gq)

    def step(carry, t):
        table, images = carry
        table = jax.lax.cond(t == s_pad // chunk, fill, lambda tb, _: tb, table, images)
        block = jax.lax.dynamic_slice_in_dim(table, t * chunk, chunk, axis=0)
        out = op.matmat(block)
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


def _sketch(op, key, m, dtype, s, chunk):
    """``(Omega [m, s], Y = A Omega, Q, R, Z = A Q, S)``: the randomized range sketch shared by XTrace and
    XDiag, with ``S``'s columns ``s_i = R^-T e_i / ||R^-T e_i||`` (``Q s_i`` is the direction of ``range(Y)``
    orthogonal to every column of ``Y`` but the i-th, so ``Q (I - s_i s_i^T) Q^T`` projects on the range of
    ``Y`` without column i)."""
    omega = _rademacher_rows(key, s, m, dtype)  # rows
    y = chunking.chunked_map(op.matmat, omega, chunk, batched=True)  # rows (A omega_i)^T
    q, r = jnp.linalg.qr(y.T)  # [m, s], [s, s]
    z = chunking.chunked_map(op.matmat, q.T, chunk, batched=True).T  # A Q, [m, s]
    # a rank-deficient sketch (rank A < s: a zero block, an unused parameter) has vanishing pivots; they are
    # set to 1 so that S stays finite (a zero operator gives exactly 0, as Hutchinson does)
    pivots = jnp.abs(jnp.diagonal(r))
    vanishing = pivots <= s * jnp.finfo(dtype).eps * jnp.max(pivots)
    r = jnp.where(jnp.eye(s, dtype=bool) & vanishing[None, :], 1.0, jnp.where(vanishing[None, :], 0.0, r))
    r_inv_t = jax.scipy.linalg.solve_triangular(r, jnp.eye(s, dtype=dtype), lower=False).T
    s_mat = r_inv_t / jnp.linalg.norm(r_inv_t, axis=0, keepdims=True)
    return omega.T, y.T, q, r, z, s_mat, jnp.any(vanishing)


# A rank-deficient sketch (rank Y < s) means rank A = rank Y < s almost surely, so range(A) = range(Y), which
# the orthonormal Q (s columns, spanning range(Y) and more) contains: then A = Q Q^T A exactly, tr A = tr(Q^T A Q)
# and diag A = diag(Q (A Q)^T). The leave-one-out formulas need R invertible and are wrong there (on a rank-6
# operator with s = 8 they gave 33 for 21), so XTrace / XDiag return the captured values instead. They are exact
# up to rounding amplified by the sketch's conditioning (measured: 1e-12 relative in float64 on a low-rank
# empirical Fisher), which the reported standard error states as sqrt(eps) |estimate| (no random term is left).
def _captured_rtol(dtype) -> float:
    return float(np.sqrt(jnp.finfo(dtype).eps))


def _xtrace(op, key, m, dtype, s, chunk):
    omega, y, q, r, z, s_mat, deficient = _sketch(op, key, m, dtype, s, chunk)
    h = _mm(q.T, z)  # Q^T A Q
    w = _mm(q.T, omega)
    c = jnp.sum(s_mat * w, axis=0)  # s_i^T w_i
    v = w - s_mat * c[None, :]  # Q_(i)-coordinates removed from w_i: w_i - s_i c_i
    # tr(Q_(i)^T A Q_(i)) + u_i^T A u_i with u_i = omega_i - Q v_i:
    #   tr(H) - s_i^T H s_i + omega_i^T A omega_i - 2 r_i^T v_i + v_i^T H v_i   (A omega_i = Q r_i)
    estimates = (
        jnp.trace(h)
        - jnp.sum(s_mat * _mm(h, s_mat), axis=0)
        + jnp.sum(omega * y, axis=0)
        - 2 * jnp.sum(r * v, axis=0)
        + jnp.sum(v * _mm(h, v), axis=0)
    )
    mean, stderr = _stats(jnp.where(deficient, jnp.trace(h), estimates))
    return mean, jnp.where(deficient, _captured_rtol(dtype) * jnp.abs(mean), stderr)


def hessian_diagonal(
    f,
    params=None,
    batch=None,
    key: jax.Array | None = None,
    *,
    num_probes: int = 64,
    method: str = "hutchinson",
    vectors_per_pass: int | None = None,
    return_stderr: bool = False,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
):
    """Stochastic estimate of ``diag(A)`` for a curvature operator ``A`` (the Hessian of ``f`` by default).

    ``method="hutchinson"``: ``d = 1/N sum_i z_i * (A z_i)`` (elementwise) with ``N = num_probes``
    Rademacher probes: unbiased, since ``E[z_a z_b] = delta_ab`` gives ``E[z_a (A z)_a] = A_aa``; the
    variance of coordinate ``a`` is ``(sum_b A_ab^2 - A_aa^2) / N`` (Bekas, Kokiopoulou, Saad 2007;
    ADAHESSIAN's preconditioner).

    ``method="xdiag"`` (Epperly, Tropp, Webber 2024): with the sketch of XTrace (``s = N // 2``), the mean
    over ``i`` of ``diag(P_(i) A) + omega_i * ((I - P_(i)) A omega_i)``: exact on the captured range, Hutchinson
    on the rest; far more accurate when the spectrum decays. Its standard error is the spread of the ``s``
    exchangeable estimates. Needs ``s < m``.

    Args:
      f, params, batch, key: an operator and a key, or an objective, parameters, data and a key.
      num_probes: number of products ``N`` (>= 1; >= 2 for XDiag).
      method: ``"hutchinson"`` or ``"xdiag"``.
      vectors_per_pass: probes vmapped together (``None``: from a memory budget, as in ``hessian_trace``).
      return_stderr: also return the per-coordinate standard error (NaN with one probe, or with XDiag's
        ``num_probes < 4``: one term's spread is unknown).
      microbatch_size, devices: with an objective, the data plan of its ``Hessian``.

    Returns:
      A pytree shaped like the operator's parameters (their dtypes), or ``(diagonal, stderr)``.

    Cost: ``num_probes`` products. Memory: Hutchinson, ``vectors_per_pass`` probes and two accumulators of
    size ``m`` (at least float32); XDiag, ``O(m N)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> f = lambda w, b: 0.5 * jnp.sum(b * w**2)  # H = diag(b): every probe is exact
      >>> curvature.hessian_diagonal(f, jnp.ones(3), jnp.array([1.0, 2.0, 3.0]), jax.random.key(0)).tolist()
      [1.0, 2.0, 3.0]
    """
    op, key = resolve(f, params, batch, key, name="hessian_diagonal", microbatch_size=microbatch_size, devices=devices)
    check_choice(method, "method", DIAGONAL_METHODS)
    check_positive_int(num_probes, "num_probes")
    if method == "xdiag" and not 2 <= num_probes < 2 * op.size:
        raise ValueError(f"num_probes must be in [2, 2 m = {2 * op.size}) for method='xdiag', got {num_probes}")
    chunk = _vectors_per_pass(op, vectors_per_pass, num_probes)
    mean, stderr = _hessian_diagonal(op, key, num_probes, method, chunk)
    diagonal = op.unravel(mean)
    return (diagonal, op.unravel(stderr)) if return_stderr else diagonal


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _hessian_diagonal(op, key, num_probes, method, chunk):
    m, dtype = op.size, op.dtype
    if method == "xdiag":
        return _xdiag(op, key, m, dtype, num_probes // 2, chunk)
    chunk = min(chunk, num_probes)
    steps = -(-num_probes // chunk)
    chunk = -(-num_probes // steps)  # balanced passes: fewer than `steps` masked probes
    keys = jax.random.split(key, steps * chunk).reshape(steps, chunk)
    valid = (jnp.arange(steps * chunk) < num_probes).reshape(steps, chunk)

    def step(carry, xs):
        total, total_sq = carry
        ks, mask = xs
        z = jax.vmap(lambda k: jax.random.rademacher(k, (m,), dtype=dtype))(ks)
        d = jnp.where(mask[:, None], z * op.matmat(z), 0.0)
        return (total + jnp.sum(d, axis=0), total_sq + jnp.sum(jnp.square(d), axis=0)), None

    zeros = jnp.zeros((m,), dtype)
    (total, total_sq), _ = jax.lax.scan(step, (zeros, zeros), (keys, valid))
    mean = total / num_probes
    if num_probes > 1:
        var = jnp.maximum(total_sq - num_probes * jnp.square(mean), 0.0) / (num_probes - 1)
        stderr = jnp.sqrt(var / num_probes)
    else:
        stderr = jnp.full_like(mean, jnp.nan)  # one probe: the spread is unknown
    return mean, stderr


def _xdiag(op, key, m, dtype, s, chunk):
    omega, y, q, _, z, s_mat, deficient = _sketch(op, key, m, dtype, s, chunk)
    t = _mm(z.T, omega)  # Q^T A Omega
    c = jnp.sum(s_mat * t, axis=0)  # s_i^T t_i
    qs, zs = _mm(q, s_mat), _mm(z, s_mat)
    # estimate i: diag(Q Z^T) - (Q s_i) * (Z s_i) + omega_i * (y_i - Q t_i + Q s_i c_i)
    captured = jnp.sum(q * z, axis=1)  # diag(Q Q^T A)
    estimates = captured[:, None] - qs * zs + omega * (y - _mm(q, t) + qs * c[None, :])  # [m, s]
    estimates = jnp.where(deficient, captured[:, None], estimates)
    mean = jnp.mean(estimates, axis=1)
    stderr = jnp.std(estimates, axis=1, ddof=1) / np.sqrt(s) if s > 1 else jnp.full_like(mean, jnp.nan)
    return mean, jnp.where(deficient, _captured_rtol(dtype) * jnp.abs(mean), stderr)
