"""Inverse products of a damped curvature operator: ``(A + damping I)^-1 b`` by conjugate gradients, and
the exact inverse of a low-rank-plus-damping approximation built from eigenpairs.

Uses: influence functions (Koh & Liang 2017, ``-grad L_test^T (H + lambda I)^-1 grad L_train``), Laplace
approximations (the posterior covariance ``(G + prior precision I)^-1``), natural-gradient directions
(``(F + lambda I)^-1 g``).

References: M. Hestenes, E. Stiefel, Methods of conjugate gradients for solving linear systems, 1952;
P. W. Koh, P. Liang, Understanding black-box predictions via influence functions, ICML 2017.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import validation
from lsgeo.curvature.operator import CurvatureOperator

PyTree = Any

__all__ = ["solve", "SolveInfo", "SolveDidNotConverge", "low_rank_inverse"]


class SolveInfo(NamedTuple):
    """How a conjugate-gradient solve ended.

    converged:      ``||b - (A + damping I) x|| <= tol ||b||``.
    num_iters:      CG steps taken (one product each).
    residual_norm:  ``||b - (A + damping I) x||`` (the recurrence's residual).
    indefinite:     a search direction ``p`` with ``p^T (A + damping I) p <= 0`` stopped the run: the damped
                    operator is not positive definite (a Hessian away from a minimum), raise ``damping``.
    """

    converged: jax.Array
    num_iters: jax.Array
    residual_norm: jax.Array
    indefinite: jax.Array


class SolveDidNotConverge(ValueError):
    """Raised by ``solve`` (outside ``jit``) when CG did not reach ``tol``; ``.x`` and ``.info`` keep what it
    computed."""

    def __init__(self, message, x, info):
        super().__init__(message)
        self.x, self.info = x, info


def solve(op: CurvatureOperator, b, *, damping, tol: float = 1e-6, maxiter: int | None = None, x0=None,
          return_info: bool = False):
    """Solves ``(A + damping I) x = b`` by conjugate gradients, for a curvature operator ``A``.

    CG on the flat vectors of the operator (its work dtype), one product per step, stopping when the
    residual ``||b - (A + damping I) x|| <= tol ||b||``. CG needs ``A + damping I`` symmetric positive
    definite: a Gauss-Newton or Fisher operator with ``damping > 0``, a Hessian only where it is (near a
    minimum) or with a damping above ``-lambda_min``; a direction of non-positive curvature stops the run
    and is reported (``SolveInfo.indefinite``). In exact arithmetic CG converges in at most ``m`` steps,
    in about ``sqrt(kappa) log(2 / tol)`` on a condition number ``kappa``.

    No silent wrong answer: outside ``jit``, a run that does not converge raises ``SolveDidNotConverge``
    (with the last iterate and the ``SolveInfo``); inside ``jit`` its ``x`` is NaN. With
    ``return_info=True`` it returns ``(x, info)`` and never raises.

    Args:
      op: a curvature operator (``Hessian``, ``GaussNewton``, a Fisher, a block).
      b: right-hand side, a pytree shaped like the operator's parameters or a flat ``[m]`` vector.
      damping: ``lambda >= 0`` added to the diagonal (a Tikhonov / Levenberg-Marquardt damping).
      tol: relative residual tolerance, > 0.
      maxiter: CG steps at most (default ``m``).
      x0: starting guess shaped like ``b`` (default 0).
      return_info: return ``(x, SolveInfo)``.

    Returns:
      ``x`` shaped like ``b`` (or ``(x, info)``).

    Cost: one product per step, plus ``O(m)``. Memory: four vectors of size ``m`` plus one product.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> op = curvature.Hessian(lambda w, b: 0.5 * jnp.sum(b * w**2), jnp.zeros(3), jnp.array([1.0, 2.0, 3.0]))
      >>> [round(float(v), 6) for v in curvature.solve(op, jnp.ones(3), damping=1.0)]  # (diag(1,2,3) + I)^-1 1
      [0.5, 0.333333, 0.25]
    """
    if not isinstance(op, CurvatureOperator):
        raise TypeError(f"op must be a curvature operator (Hessian, GaussNewton, ...), got {type(op).__name__}")
    validation.check_sigma(damping, "damping")
    validation.check_sigma(tol, "tol")
    if validation.is_concrete(tol) and not float(tol) > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    maxiter = op.size if maxiter is None else maxiter
    validation.check_positive_int(maxiter, "maxiter")
    flat = _is_flat(b, op.size)
    if not flat:
        validation.check_same_structure(op.variable_params, b, "b", "the operator's parameters")
    if x0 is not None:
        if flat != _is_flat(x0, op.size) or (not flat and jax.tree_util.tree_structure(x0) != jax.tree_util.tree_structure(b)):
            raise ValueError("x0 must be shaped like b")
    b, x0 = op.place(b, x0)
    x, info = _cg(op, b, x0, jnp.asarray(damping, op.dtype), jnp.asarray(tol, op.dtype), int(maxiter), flat)
    if return_info:
        return x, info
    if not validation.is_concrete(info.converged):
        return jax.tree_util.tree_map(lambda a: jnp.where(info.converged, a, jnp.nan), x)
    if not bool(info.converged):
        why = ("the damped operator is not positive definite (a direction of non-positive curvature): raise damping"
               if bool(info.indefinite) else f"maxiter={maxiter} steps were not enough")
        raise SolveDidNotConverge(
            f"solve did not converge: relative residual {float(info.residual_norm) / max(_norm(b), 1e-300):.3g} "
            f"> tol={float(tol):.3g} after {int(info.num_iters)} steps; {why}", x, info,
        )
    return x


def _is_flat(v, m) -> bool:
    return isinstance(v, (jax.Array, np.ndarray)) and np.ndim(v) == 1 and np.shape(v)[0] == m and not isinstance(
        v, dict)


def _norm(b) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in jax.tree_util.tree_leaves(b))))


@functools.partial(jax.jit, static_argnums=(5, 6))
def _cg(op, b, x0, damping, tol, maxiter, flat):
    bu = jnp.asarray(b, op.dtype) if flat else op.ravel(b)
    x = jnp.zeros_like(bu) if x0 is None else (jnp.asarray(x0, op.dtype) if flat else op.ravel(x0))

    def apply(u):
        return op.matvec(u) + damping * u

    r = bu - apply(x) if x0 is not None else bu
    bound = tol * jnp.linalg.norm(bu)
    rr = jnp.vdot(r, r)

    def cond(state):
        _, r, _, rr, j, indefinite = state
        return (jnp.sqrt(rr) > bound) & (j < maxiter) & ~indefinite

    def body(state):
        x, r, p, rr, j, _ = state
        ap = apply(p)
        curvature = jnp.vdot(p, ap)
        indefinite = curvature <= 0
        step = jnp.where(indefinite, 0.0, rr / jnp.where(indefinite, 1.0, curvature))
        x, r = x + step * p, r - step * ap
        rr_new = jnp.vdot(r, r)
        p = r + (rr_new / rr) * p
        return x, r, p, rr_new, j + 1, indefinite

    init = (x, r, r, rr, jnp.zeros((), jnp.int32), jnp.asarray(False))
    x, r, _, rr, steps, indefinite = jax.lax.while_loop(cond, body, init)
    residual = jnp.sqrt(rr)
    info = SolveInfo(residual <= bound, steps, residual, indefinite)
    return (x.astype(jnp.promote_types(jnp.asarray(b).dtype, op.dtype)) if flat else op.unravel(x)), info


def low_rank_inverse(values: jax.Array, vectors: PyTree, damping):
    """``b -> (U diag(values) U^T + damping I)^-1 b``, exact for the rank-k matrix of the given eigenpairs.

    With orthonormal ``u_j`` (``eigenpairs``' vectors: a pytree with a leading axis k),
    ``(U Lambda U^T + d I)^-1 = 1/d I + U diag(1/(lambda_j + d) - 1/d) U^T``. Applied to a curvature
    operator's top eigenpairs it is the low-rank-plus-damping approximation of ``(A + d I)^-1`` (exact on
    the span of the ``u_j``, ``1/d`` on its complement): cheap inverse products for influence functions
    once the top of the spectrum is known. Cost per application: ``O(k m)``.

    Args:
      values: ``[k]`` eigenvalues with ``values + damping != 0``.
      vectors: the eigenvectors, a pytree shaped like the parameters with a leading axis k (orthonormal).
      damping: ``d > 0``.

    Returns:
      A function of a pytree ``b`` shaped like one vector.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> inverse = curvature.low_rank_inverse(jnp.array([3.0]), jnp.array([[1.0, 0.0]]), damping=1.0)
      >>> inverse(jnp.array([4.0, 2.0])).tolist()  # (diag(3, 0) + I)^-1 (4, 2)
      [1.0, 2.0]
    """
    validation.check_sigma(damping, "damping")
    if validation.is_concrete(damping) and not float(damping) > 0:
        raise ValueError(f"damping must be > 0 for a low-rank inverse, got {damping!r}")
    values = jnp.asarray(values)
    gains = 1.0 / (values + damping) - 1.0 / damping

    def apply(b):
        coeffs = sum(
            jnp.sum(u.reshape(u.shape[0], -1) * jnp.reshape(a, (1, -1)), axis=1)
            for u, a in zip(jax.tree_util.tree_leaves(vectors), jax.tree_util.tree_leaves(b))
        )
        scaled = gains * coeffs
        return jax.tree_util.tree_map(
            lambda a, u: a / damping + jnp.tensordot(scaled, u, axes=1).astype(a.dtype), b, vectors
        )

    return apply
