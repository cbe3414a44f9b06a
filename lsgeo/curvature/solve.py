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
from lsgeo.curvature.operators.base import Products

PyTree = Any

__all__ = ["solve", "SolveInfo", "SolveDidNotConverge", "low_rank_inverse"]


class SolveInfo(NamedTuple):
    """How a conjugate-gradient solve ended.

    converged:      ``||b - (A + damping I) x|| <= tol ||b||`` for the returned ``x``, the residual recomputed
                    from ``x`` (not CG's recurrence, which drifts from it on ill-conditioned systems).
    num_iters:      CG steps taken (one product each), over all restarts.
    residual_norm:  the true residual ``||b - (A + damping I) x||`` of the returned ``x``.
    indefinite:     a search direction ``p`` with ``p^T (A + damping I) p <= 0`` (or, preconditioned,
                    ``r^T M^-1 r <= 0``) stopped the run: the damped operator (or the preconditioner) is not
                    positive definite (a Hessian away from a minimum), raise ``damping``.
    num_products:   products with the operator in all: the CG steps plus one per recomputed residual.
    num_restarts:   restarts from the true residual (after the recurrence's residual met ``tol`` but the true
                    one did not).
    """

    converged: jax.Array
    num_iters: jax.Array
    residual_norm: jax.Array
    indefinite: jax.Array
    num_products: jax.Array = None
    num_restarts: jax.Array = None


class SolveDidNotConverge(ValueError):
    """Raised by ``solve`` (outside ``jit``) when CG did not reach ``tol``; ``.x`` and ``.info`` keep what it
    computed."""

    def __init__(self, message, x, info):
        super().__init__(message)
        self.x, self.info = x, info


MAX_RESTARTS = 4  # restarts from the true residual before a stagnating solve is declared not converged


def solve(op: CurvatureOperator, b, *, damping, tol: float = 1e-6, maxiter: int | None = None, x0=None,
          preconditioner=None, return_info: bool = False):
    """Solves ``(A + damping I) x = b`` by (preconditioned) conjugate gradients, for a curvature operator ``A``.

    CG on the flat vectors of the operator (its work dtype), one product per step. CG's recurrence residual
    ``r_j`` drifts from the true residual ``b - (A + damping I) x_j`` in finite precision (by about
    ``kappa eps ||b||``: 1400x ``tol`` in float32 at damping 1e-5), so when the recurrence meets ``tol`` the
    true residual is recomputed (one product) and, if it does not meet ``||b - (A + damping I) x|| <= tol
    ||b||``, CG restarts from ``x`` with it (at most ``MAX_RESTARTS`` times, within ``maxiter`` steps);
    ``SolveInfo`` reports the true residual. CG needs ``A + damping I`` symmetric positive definite: a
    Gauss-Newton or Fisher operator with ``damping > 0``, a Hessian only where it is (near a minimum) or
    with a damping above ``-lambda_min``; a direction of non-positive curvature stops the run and is
    reported (``SolveInfo.indefinite``). In exact arithmetic CG converges in at most ``m`` steps, in about
    ``sqrt(kappa) log(2 / tol)`` on a condition number ``kappa``.

    Preconditioning (Saad, Iterative Methods for Sparse Linear Systems, Algorithm 9.1): with ``M^-1`` an SPD
    approximation of ``(A + damping I)^-1`` (a Jacobi diagonal, a KFAC inverse, a low-rank inverse), PCG
    runs CG on ``M^-1/2 (A + damping I) M^-1/2`` and converges in about ``sqrt(kappa(M^-1 (A + dI)))``
    steps; one ``M^-1`` application per step, no extra product with ``A``.

    No silent wrong answer: outside ``jit``, a run that does not converge raises ``SolveDidNotConverge``
    (with the last iterate and the ``SolveInfo``); inside ``jit`` its ``x`` is NaN. With
    ``return_info=True`` it returns ``(x, info)`` and never raises. A tolerance below what the work dtype
    resolves on the system (about ``kappa eps``) ends as not converged, the true residual stagnating.

    Args:
      op: a curvature operator (``Hessian``, ``GaussNewton``, a Fisher, a block).
      b: right-hand side, a pytree shaped like the operator's parameters or a flat ``[m]`` vector; finite.
      damping: ``lambda >= 0`` added to the diagonal (a Tikhonov / Levenberg-Marquardt damping).
      tol: relative residual tolerance, > 0.
      maxiter: CG steps at most (default ``m``, or ``2 m`` with restarts counted).
      x0: starting guess shaped like ``b`` (default 0); finite.
      preconditioner: ``None``, a callable ``v -> M^-1 v`` or an object with a ``.matvec`` method doing that,
        taking and returning a vector of the structure of ``b`` (a pytree shaped like the parameters, or a
        flat ``[m]`` vector when ``b`` is flat); an object with ``.tree_matvec`` (lsgeo's operators and
        ``KFAC(...).inverse(d)``: ``matvec`` flat, ``tree_matvec`` on pytrees) gets the one that fits ``b``.
        ``M^-1`` must be symmetric positive definite and linear.
        A pytree (an operator holding arrays) is traced, not baked into the program.
      return_info: return ``(x, SolveInfo)``.

    Returns:
      ``x`` shaped like ``b`` (or ``(x, info)``).

    Raises:
      ValueError: NaN or inf in ``b`` or ``x0`` (named), ``b``/``x0`` not shaped like the parameters, a
        ``preconditioner`` that is neither callable nor has ``.matvec``, bad ``damping``/``tol``/``maxiter``;
        ``SolveDidNotConverge`` as above.

    Cost: one product per step plus one per restart, and one ``M^-1`` per step with a preconditioner, plus
    ``O(m)``. Memory: five vectors of size ``m`` plus one product.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> op = curvature.Hessian(lambda w, b: 0.5 * jnp.sum(b * w**2), jnp.zeros(3), jnp.array([1.0, 2.0, 3.0]))
      >>> [round(float(v), 6) for v in curvature.solve(op, jnp.ones(3), damping=1.0)]  # (diag(1,2,3) + I)^-1 1
      [0.5, 0.333333, 0.25]
      >>> jacobi = lambda v: v / jnp.array([2.0, 3.0, 4.0])  # the exact diagonal inverse: one step
      >>> x, info = curvature.solve(op, jnp.ones(3), damping=1.0, preconditioner=jacobi, return_info=True)
      >>> int(info.num_iters)
      1
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
        if isinstance(b, (jax.Array, np.ndarray)) and not isinstance(op.variable_params, (jax.Array, np.ndarray)):
            raise ValueError(f"b must be a pytree shaped like the operator's parameters or a flat vector "
                             f"[m={op.size}], got an array of shape {np.shape(b)}")
        validation.check_same_structure(op.variable_params, b, "b", "the operator's parameters")
    if x0 is not None:
        same_structure = jax.tree_util.tree_structure(x0) == jax.tree_util.tree_structure(b)
        if flat != _is_flat(x0, op.size) or (not flat and not same_structure):
            raise ValueError("x0 must be shaped like b")
        if not flat:
            validation.check_same_structure(b, x0, "x0", "b")
    for value, name in ((b, "b"), (x0, "x0")):
        _check_finite(value, name)
    precondition = _preconditioner(preconditioner, flat)
    dynamic, static = _partition(precondition)
    b, x0 = op.place(b, x0)
    x, info = _cg(op, b, x0, jnp.asarray(damping, op.dtype), jnp.asarray(tol, op.dtype), int(maxiter), flat,
                  dynamic, static)
    if return_info:
        return x, info
    if not validation.is_concrete(info.converged):
        return jax.tree_util.tree_map(lambda a: jnp.where(info.converged, a, jnp.nan), x)
    if not bool(info.converged):
        if bool(info.indefinite):
            why = ("the damped operator (or the preconditioner) is not positive definite (a direction of "
                   "non-positive curvature): raise damping")
        elif int(info.num_iters) < maxiter:
            why = (f"the true residual stagnates after {int(info.num_restarts)} restarts: tol is below what "
                   f"{np.dtype(op.dtype).name} resolves on this system; raise tol or damping, or use float64")
        else:
            why = f"maxiter={maxiter} steps were not enough"
        raise SolveDidNotConverge(
            f"solve did not converge: true relative residual {float(info.residual_norm) / max(_norm(b), 1e-300):.3g}"
            f" > tol={float(tol):.3g} after {int(info.num_iters)} steps; {why}", x, info,
        )
    return x


def _check_finite(tree, name):
    """ValueError naming the first leaf of ``tree`` with a NaN or inf (concrete trees; one scalar is fetched)."""
    if tree is None or not all(validation.is_concrete(a) for a in jax.tree_util.tree_leaves(tree)):
        return
    with jax.ensure_compile_time_eval():  # concrete (closed-over) values under an enclosing jit stay concrete
        finite = [bool(jnp.all(jnp.isfinite(jnp.asarray(a)))) for a in jax.tree_util.tree_leaves(tree)]
    if all(finite):
        return
    for (path, _), ok in zip(jax.tree_util.tree_leaves_with_path(tree), finite):
        if not ok:
            raise ValueError(f"{name} must be finite, got NaN or inf in {name}{jax.tree_util.keystr(path)}")


def _preconditioner(preconditioner, flat: bool):
    """The map ``v -> M^-1 v`` on vectors shaped like ``b``: an operator's ``product(flat=...)`` (the operator
    protocol of ``lsgeo.curvature.operators.base.Products``: a ``KFAC``/``EKFAC`` inverse, any curvature
    operator) first, then a ``matvec`` method (flat vectors), then the callable."""
    if preconditioner is None:
        return None
    if isinstance(preconditioner, Products):
        return preconditioner.product(flat=flat)
    if hasattr(preconditioner, "matvec") and callable(preconditioner.matvec):
        return preconditioner.matvec
    if callable(preconditioner):
        return preconditioner
    raise ValueError(f"preconditioner must be None, a callable v -> M^-1 v or an object with a .matvec method, "
                     f"got {type(preconditioner).__name__}")


def _partition(fn):
    """``fn`` split into its array leaves (traced) and the rest (static, hashable): a bound method of a pytree
    operator carries its arrays into the program as arguments, not as constants."""
    if fn is None:
        return None, None
    owner = getattr(fn, "__self__", None)
    if owner is not None and jax.tree_util.tree_leaves(owner) and all(
            isinstance(a, (jax.Array, np.ndarray)) for a in jax.tree_util.tree_leaves(owner)):
        leaves, treedef = jax.tree_util.tree_flatten(owner)
        return leaves, (treedef, fn.__func__)
    try:
        hash(fn)
    except TypeError:  # an unhashable callable: a wrapper (hashed by identity; compiled per call)
        return None, lambda v: fn(v)
    return None, fn


def _rebuild(dynamic, static):
    if static is None:
        return None
    if dynamic is None:
        return static
    treedef, func = static
    owner = jax.tree_util.tree_unflatten(treedef, dynamic)
    return lambda v: func(owner, v)


def _is_flat(v, m) -> bool:
    return isinstance(v, (jax.Array, np.ndarray)) and np.ndim(v) == 1 and np.shape(v)[0] == m and not isinstance(
        v, dict)


def _norm(b) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in jax.tree_util.tree_leaves(b))))


@functools.partial(jax.jit, static_argnums=(5, 6, 8))
def _cg(op, b, x0, damping, tol, maxiter, flat, dynamic, static):
    user = _rebuild(dynamic, static)
    bu = jnp.asarray(b, op.dtype) if flat else op.ravel(b)
    x = jnp.zeros_like(bu) if x0 is None else (jnp.asarray(x0, op.dtype) if flat else op.ravel(x0))

    def apply(u):
        return op.matvec(u) + damping * u

    def precondition(r):
        if user is None:
            return r
        z = user(r.astype(jnp.asarray(b).dtype) if flat else op.unravel(r))
        return jnp.asarray(z, op.dtype) if flat else op.ravel(z)

    bound = tol * jnp.linalg.norm(bu)

    def cg(x, r, j):
        """CG from ``x`` with residual ``r`` until the recurrence meets the bound (or maxiter, or indefinite)."""
        z = precondition(r)
        rz = jnp.vdot(r, z)

        def cond(state):
            _, r, _, _, _, j, indefinite = state
            return (jnp.linalg.norm(r) > bound) & (j < maxiter) & ~indefinite

        def body(state):
            x, r, z, p, rz, j, _ = state
            ap = apply(p)
            curvature = jnp.vdot(p, ap)
            indefinite = (curvature <= 0) | (rz <= 0)
            step = jnp.where(indefinite, 0.0, rz / jnp.where(indefinite, 1.0, curvature))
            x, r = x + step * p, r - step * ap
            z = precondition(r)
            rz_new = jnp.vdot(r, z)
            p = z + (rz_new / jnp.where(rz == 0, 1.0, rz)) * p
            return x, r, z, p, rz_new, j + 1, indefinite

        x, r, _, _, _, j, indefinite = jax.lax.while_loop(cond, body, (x, r, z, z, rz, j, jnp.asarray(False)))
        return x, j, indefinite

    def outer_cond(state):
        _, r_true, j, indefinite, restarts = state
        return (jnp.linalg.norm(r_true) > bound) & (j < maxiter) & ~indefinite & (restarts <= MAX_RESTARTS)

    def outer_body(state):
        x, r_true, j, _, restarts = state
        x, j, indefinite = cg(x, r_true, j)
        return x, bu - apply(x), j, indefinite, restarts + 1

    r0 = bu - apply(x) if x0 is not None else bu
    zero = jnp.zeros((), jnp.int32)
    x, r_true, steps, indefinite, passes = jax.lax.while_loop(
        outer_cond, outer_body, (x, r0, zero, jnp.asarray(False), zero))
    residual = jnp.linalg.norm(r_true)
    products = steps + passes + (0 if x0 is None else 1)
    info = SolveInfo(residual <= bound, steps, residual, indefinite, products, jnp.maximum(passes - 1, 0))
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
      A function of a pytree ``b`` shaped like one vector (a ``preconditioner`` for ``solve``).

    Raises:
      ValueError: ``damping <= 0``, ``values`` not ``[k]``, ``vectors`` without a leading axis ``k``; the
        function: ``b`` not shaped like one vector.

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
    if values.ndim != 1:
        raise ValueError(f"values must be a 1-D array [k] of eigenvalues, got shape {values.shape}")
    k = values.shape[0]
    leaves, treedef = jax.tree_util.tree_flatten(vectors)
    if not leaves or any(np.ndim(u) < 1 or np.shape(u)[0] != k for u in leaves):
        raise ValueError(f"vectors must be a pytree whose leaves have a leading axis k={k} (len(values)), got "
                         f"leaf shapes {[np.shape(u) for u in leaves]}")
    gains = 1.0 / (values + damping) - 1.0 / damping

    def apply(b):
        if jax.tree_util.tree_structure(b) != treedef or any(
                np.shape(a) != np.shape(u)[1:] for a, u in zip(jax.tree_util.tree_leaves(b), leaves)):
            raise ValueError(f"b must be shaped like one of the vectors: structure {treedef} with leaf shapes "
                             f"{[np.shape(u)[1:] for u in leaves]}, got {jax.tree_util.tree_structure(b)} with "
                             f"{[np.shape(a) for a in jax.tree_util.tree_leaves(b)]}")
        coeffs = sum(
            jnp.sum(u.reshape(u.shape[0], -1) * jnp.reshape(a, (1, -1)), axis=1)
            for u, a in zip(jax.tree_util.tree_leaves(vectors), jax.tree_util.tree_leaves(b))
        )
        scaled = gains * coeffs
        return jax.tree_util.tree_map(
            lambda a, u: a / damping + jnp.tensordot(scaled, u, axes=1).astype(a.dtype), b, vectors
        )

    return apply
