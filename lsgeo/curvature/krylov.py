"""Lanczos tridiagonalisation with full reorthogonalisation, and the Ritz pairs of the tridiagonal.

``lanczos`` runs a fixed number of steps as one ``lax.scan``; ``ritz_pairs`` runs up to that number in a
``lax.while_loop`` and stops early once the wanted extreme Ritz pairs have converged (relative residual
``|beta_K u_Kj| <= tol |theta_j|``). Both hold the basis ``V`` (``(K + 1) x m``), the only state that grows
with the number of steps; each step calls the operator once (one compiled body).

References: C. Lanczos, 1950; G. Golub, C. Van Loan, Matrix Computations (4th ed.), Sections 10.1-10.3;
B. Parlett, The Symmetric Eigenvalue Problem, 1998 (residual bounds of Ritz pairs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo.validation import check_choice, check_positive_int, is_concrete

__all__ = ["lanczos", "tridiagonal_eigh", "ritz_pairs", "ritz_run"]

MatVec = Callable[[jax.Array], jax.Array]
_HIGHEST = jax.lax.Precision.HIGHEST


def _restart_vector(j, m, dtype):
    """A fixed, generic pseudo-random vector (a sine hash of the index), the ``j``-th restart of
    ``lanczos`` after breakdown. Deterministic and free of PRNG state."""
    i = jnp.arange(1, m + 1, dtype=dtype)
    h = jnp.sin(i * 12.9898 + (j + 1) * 78.233) * 43758.5453
    return h - jnp.floor(h) - 0.5


def _check_start(v0, num_iters):
    check_positive_int(num_iters, "num_iters")
    v0 = jnp.asarray(v0)
    if v0.ndim != 1:
        raise ValueError(f"v0 must be a flat vector of shape [m], got shape {v0.shape}")
    m = v0.shape[0]
    if num_iters > m:
        raise ValueError(f"num_iters must be <= the dimension m={m} of v0, got {num_iters}")
    if not jnp.issubdtype(v0.dtype, jnp.inexact):
        v0 = v0.astype(jnp.result_type(float))
    if is_concrete(v0):
        norm = float(np.linalg.norm(np.asarray(v0, np.float64)))
        if not np.isfinite(norm):
            raise ValueError("v0 must be finite, got a vector with NaN or inf entries")
        if norm == 0.0:
            raise ValueError("v0 must be a nonzero start vector, got a zero vector")
    return v0


def _initial_state(v0, num_iters):
    m, dtype = v0.shape[0], v0.dtype
    basis = jnp.zeros((num_iters + 1, m), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    return basis, jnp.zeros((), dtype)


def _step(matvec, basis, beta_prev, j):
    """One Lanczos step: ``(basis with row j + 1, beta_j, alpha_j)``.

    Breakdown (an invariant subspace found) is declared when the reorthogonalised residual is at rounding
    level relative to this step's own product, ``beta_j <= 10 eps ||A v_j||``: the new direction is then
    numerically inside ``span(V)``. (A threshold on a running ``||A||`` estimate, ``sqrt(m) eps ||A||``,
    discards genuine small couplings at large m: 3.9e-4 ||A|| at m = 1e7 in float32.)"""
    m, dtype = basis.shape[1], basis.dtype
    eps, tiny = jnp.finfo(dtype).eps, jnp.finfo(dtype).tiny

    def project_out(w):
        for _ in range(2):  # twice is enough (Kahan / Parlett)
            w = w - jnp.matmul(basis.T, jnp.matmul(basis, w, precision=_HIGHEST), precision=_HIGHEST)
        return w

    v = basis[j]
    w = matvec(v).astype(dtype)
    scale = jnp.linalg.norm(w)
    alpha = jnp.vdot(v, w)
    w = w - alpha * v - beta_prev * basis[jnp.maximum(j - 1, 0)]
    w = project_out(w)
    beta = jnp.linalg.norm(w)
    breakdown = beta <= 10 * eps * scale
    w = jax.lax.cond(breakdown, lambda: project_out(_restart_vector(j, m, dtype)), lambda: w)
    beta = jnp.where(breakdown, jnp.zeros_like(beta), beta)
    w = w / jnp.maximum(jnp.linalg.norm(w), tiny)
    basis = jax.lax.dynamic_update_index_in_dim(basis, w, j + 1, axis=0)
    return basis, beta, alpha


def lanczos(matvec: MatVec, v0: jax.Array, num_iters: int, *, return_vectors: bool = False):
    """Lanczos tridiagonalisation of a symmetric operator, with full reorthogonalisation.

    Builds an orthonormal basis ``V = [v_1 .. v_K]`` of the Krylov space ``K_K(A, v0)`` with
    ``v_1 = v0 / ||v0||`` and the tridiagonal ``T = V^T A V`` (diagonal ``alphas``, off-diagonal
    ``betas``). Each new vector is orthogonalised against all previous ones twice (classical
    Gram-Schmidt, "twice is enough"), so ``V`` stays orthonormal to working precision and no ghost
    eigenvalues appear (Golub & Van Loan, Section 10.3). The Ritz values ``eig(T)`` approximate the
    extreme eigenvalues of ``A``; ``(U_1j)^2`` with ``T = U diag(theta) U^T`` are the Gauss quadrature
    weights of the spectral measure of ``A`` seen from ``v0`` (``slq_nodes``).

    Breakdown: when the new residual vanishes (``beta <= 10 eps ||A v_j||``, an invariant subspace
    has been found), ``beta`` is set to 0 and the iteration restarts from a fixed pseudo-random
    vector (projected orthogonal to ``V``); ``T`` then splits into blocks, all of whose eigenvalues are
    eigenvalues of ``A`` restricted to invariant subspaces, and the extra blocks carry zero
    quadrature weight.

    Args:
      matvec: symmetric linear operator on flat vectors ``[m] -> [m]``.
      v0: starting vector ``[m]``, nonzero and finite (checked when concrete); normalised here. The
        recursion runs in its dtype.
      num_iters: Krylov dimension ``K``, ``1 <= K <= m``.
      return_vectors: also return the basis ``V`` as ``[K, m]`` (rows).

    Returns:
      ``(alphas [K], betas [K - 1])``, or ``(alphas, betas, V)`` when ``return_vectors``.

    Cost: ``K`` matvecs plus ``O(K^2 m)`` flops of reorthogonalisation. Memory: ``(K + 1) m``.
    Runs as one ``lax.scan``.

    Raises:
      ValueError: ``v0`` not a flat vector, zero or not finite; ``num_iters`` not in ``[1, m]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> alphas, betas = curvature.lanczos(lambda u: a @ u, jnp.ones(3), 3)
      >>> [round(float(t), 4) for t in curvature.tridiagonal_eigh(alphas, betas)[0]]
      [1.0, 2.0, 3.0]
    """
    v0 = _check_start(v0, num_iters)

    def step(carry, j):
        basis, beta_prev = carry
        basis, beta, alpha = _step(matvec, basis, beta_prev, j)
        return (basis, beta), (alpha, beta)

    (basis, _), (alphas, betas) = jax.lax.scan(step, _initial_state(v0, num_iters), jnp.arange(num_iters))
    if return_vectors:
        return alphas, betas[:-1], basis[:num_iters]
    return alphas, betas[:-1]


def tridiagonal_eigh(alphas: jax.Array, betas: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposition ``T = U diag(theta) U^T`` of the symmetric tridiagonal matrix with diagonal
    ``alphas [K]`` and off-diagonal ``betas [K - 1]``; returns ``(theta [K] ascending, U [K, K])``.
    Computed in at least float32 (bfloat16/float16 inputs are promoted: LAPACK has no half precision).
    Cost ``O(K^3)`` (dense ``eigh``; K is a Krylov dimension, small).

    Raises:
      ValueError: ``alphas`` not 1-D, or ``betas`` not of length ``K - 1``."""
    if np.ndim(alphas) != 1 or np.ndim(betas) != 1 or np.shape(betas)[0] != np.shape(alphas)[0] - 1:
        raise ValueError(
            f"betas must have length K - 1 for alphas of length K (1-D arrays), got alphas of shape "
            f"{np.shape(alphas)} and betas of shape {np.shape(betas)}"
        )
    dtype = jnp.promote_types(jnp.result_type(alphas, betas), jnp.float32)
    alphas, betas = jnp.asarray(alphas, dtype), jnp.asarray(betas, dtype)
    t = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    return jnp.linalg.eigh(t)


def _padded_eigh(alphas, betas, size, which):
    """``tridiagonal_eigh`` of the leading ``size x size`` block of a ``K x K`` tridiagonal whose other
    rows are decoupled and set to a value outside the block's spectrum (below it for the largest Ritz
    values, above it for the smallest), so that shapes stay static inside a ``while_loop``."""
    num = alphas.shape[0]
    idx = jnp.arange(num)
    real = idx < size
    off = jnp.where(idx[:-1] < size - 1, betas[:-1], 0.0)
    radius = jnp.abs(jnp.concatenate([off, jnp.zeros(1, off.dtype)])) + jnp.abs(
        jnp.concatenate([jnp.zeros(1, off.dtype), off])
    )
    lo = jnp.min(jnp.where(real, alphas - radius, jnp.inf))
    hi = jnp.max(jnp.where(real, alphas + radius, -jnp.inf))
    span = hi - lo + 1.0 + jnp.abs(lo) + jnp.abs(hi)
    sentinel = lo - span if which == "largest" else hi + span
    return tridiagonal_eigh(jnp.where(real, alphas, sentinel), off)


def _wanted(theta, k, which):
    num = theta.shape[0]
    return jnp.arange(num - 1, num - 1 - k, -1) if which == "largest" else jnp.arange(k)


def ritz_pairs(matvec: MatVec, v0: jax.Array, num_iters: int, *, k: int, which: str = "largest", tol=None):
    """Lanczos with early stopping: the ``k`` extreme Ritz pairs of a symmetric operator.

    Runs at most ``num_iters`` steps (``lax.while_loop``). With ``tol`` (a float > 0) it stops after the
    first step ``K >= k`` at which every wanted Ritz pair satisfies ``|beta_K u_Kj| <= tol |theta_j|``:
    ``|beta_K u_Kj| = ||A y_j - theta_j y_j||`` is the residual of the Ritz pair ``(theta_j, y_j = V u_j)``,
    so an eigenvalue of ``A`` lies within ``tol |theta_j|`` of ``theta_j`` (Parlett, Theorem 4.5.1).
    ``tol=None`` runs all ``num_iters`` steps.

    Returns:
      ``(values [k], coefficients [K_max, k], basis [K_max, m], steps)``: the Ritz values (descending for
      ``which="largest"``, ascending for ``"smallest"``), their coordinates ``u_j`` in the basis (rows of
      the basis beyond ``steps`` are zero), the basis and the number of steps taken.

    Cost: ``steps`` matvecs, ``O(steps^2 m)`` reorthogonalisation and, with ``tol``, one ``K_max x K_max``
    ``eigh`` per step. Memory: ``(num_iters + 1) m``.

    Raises:
      ValueError: ``k`` not in ``[1, num_iters]`` (a Krylov space of dimension K has K Ritz values),
        unknown ``which``, a bad ``v0`` or ``num_iters``.
    """
    values, coefficients, basis, steps, _ = ritz_run(matvec, v0, num_iters, k=k, which=which, tol=tol)
    return values, coefficients, basis, steps


def ritz_run(matvec: MatVec, v0: jax.Array, num_iters: int, *, k: int, which: str = "largest", tol=None):
    """``ritz_pairs`` plus the residual norms ``|beta_K u_Kj|`` of the returned Ritz pairs (``[k]``; the
    residual ``||A y_j - theta_j y_j||``, exactly 0 when the run found an invariant subspace)."""
    check_choice(which, "which", ("largest", "smallest"))
    v0 = _check_start(v0, num_iters)
    check_positive_int(k, "k")
    if k > num_iters:
        raise ValueError(f"k must be <= num_iters={num_iters} (the Krylov dimension), got k={k}")
    dtype = v0.dtype
    basis, beta0 = _initial_state(v0, num_iters)
    zeros = jnp.zeros((num_iters,), dtype)

    def residuals(alphas, betas, size):
        theta, u = _padded_eigh(alphas, betas, size, which)
        idx = _wanted(theta, k, which)
        return theta[idx], u[:, idx], jnp.abs(betas[size - 1]) * jnp.abs(u[size - 1, idx])

    def converged(alphas, betas, size):
        if tol is None:
            return jnp.asarray(False)
        theta, _, residual = residuals(alphas, betas, size)
        scale = jnp.maximum(jnp.abs(theta), jnp.finfo(theta.dtype).tiny)
        return (size >= k) & jnp.all(residual <= tol * scale)

    def cond(state):
        j, _, _, _, _, done = state
        return (j < num_iters) & ~done

    def body(state):
        j, basis, beta_prev, alphas, betas, _ = state
        basis, beta, alpha = _step(matvec, basis, beta_prev, j)
        alphas, betas = alphas.at[j].set(alpha), betas.at[j].set(beta)
        return j + 1, basis, beta, alphas, betas, converged(alphas, betas, j + 1)

    init = (jnp.zeros((), jnp.int32), basis, beta0, zeros, zeros, jnp.asarray(False))
    steps, basis, _, alphas, betas, _ = jax.lax.while_loop(cond, body, init)
    values, coefficients, residual = residuals(alphas, betas, steps)
    return values, coefficients, basis[:num_iters], steps, residual
