"""An early-stopped Lanczos that does not lose a repeated eigenvalue: the converged Ritz vectors are locked and
a fresh run on the deflated operator looks for a hidden copy.

A Krylov space from one start vector ``v0`` holds one direction of each eigenspace (``P_E v0``), so a repeated
eigenvalue appears once, and the eigenvalues below it take the other copies' places with residuals that
truly meet ``tol`` (a zero-initialised head: 1.71, 1.32, 0.92 for 1.71 three times). Only rounding brings the
other copies in, slowly: a run to a fixed ``num_iters`` usually finds them, an early stop does not.

``checked_ritz_run`` runs ``krylov.ritz_run`` to ``tol``, locks the ``k`` Ritz vectors ``Y`` and runs again
from a fresh start on the deflated operator ``(I - Y Y^T) A (I - Y Y^T) + s Y Y^T`` (``s`` beyond the wanted
end, so the locked directions are never wanted again; Saad, Numerical Methods for Large Eigenvalue Problems,
2011, Section 4.2 on locking). If the new run's best value enters the wanted ``k`` (beyond ``tol``), the
values and vectors are merged and it runs again; it stops at the first run that brings nothing new (at most
``k`` extra runs). A hidden copy is as extreme on the deflated operator as the found one was on ``A``, so it
converges as fast.

Residuals: a new Ritz pair ``(theta, y)`` with ``y`` orthogonal to ``Y`` has ``A y - theta y = (deflated
residual) + Y Y^T A y``, and ``||Y^T A y|| = ||(A Y - Y Lambda)^T y|| <= ||R_Y||`` (the locked pairs' residuals),
so the returned residuals bound ``||A y - theta y||`` by the run's residual plus ``||R_Y||_F``.

Cost: the first run's products, plus one more run that finds nothing (about as many products) and one run per
hidden copy; memory: one run's basis plus the ``k`` locked vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lsgeo.curvature import krylov

__all__ = ["checked_ritz_run"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _coefficients(vectors, u):
    """``[<y_c, u>]_c`` for a pytree of vectors with a leading axis."""
    return sum(jnp.tensordot(y, a, axes=a.ndim, precision=_HIGHEST)
               for y, a in zip(jax.tree_util.tree_leaves(vectors), jax.tree_util.tree_leaves(u)))


def _combine(vectors, c, like):
    """``sum_c c_c y_c`` shaped like ``like``."""
    return jax.tree_util.tree_map(lambda y, a: jnp.tensordot(c.astype(y.dtype), y, axes=1, precision=_HIGHEST).astype(
        a.dtype), vectors, like)


def _subtract(u, v):
    return jax.tree_util.tree_map(lambda a, b: a - b, u, v)


def checked_ritz_run(matvec, v0, num_iters: int, *, k: int, which: str = "largest", tol: float | None,
                     shardings=None, basis_memory: str = "device", product_rtol: float = 0.0, start_key=None):
    """``krylov.ritz_run`` to ``tol`` with the multiplicity check of the module docstring.

    The check runs only where a copy can be lost: with an early stop (``tol`` not None) and ``k > 1`` (with
    ``tol=None`` every run goes to ``num_iters``; with ``k = 1`` a hidden copy does not change the one wanted
    value), else the result is the first run's.

    Args:
      matvec, v0, num_iters, k, which, shardings, basis_memory, product_rtol: as in ``krylov.ritz_run`` (every
        run is capped at ``num_iters`` steps).
      tol: None, or the relative residual tolerance (> 0) of every run and the margin by which a new value must
        enter.
      start_key: PRNG key of the fresh starts (default a fixed key).

    Returns:
      ``(values [k], vectors, residuals [k], products)``: the wanted Ritz values (descending for ``"largest"``,
      ascending for ``"smallest"``), their vectors (a pytree shaped like ``v0`` with a leading axis ``k``),
      bounds on their residuals and the number of products in all runs.
    """
    run = dict(k=k, which=which, tol=tol, shardings=shardings, basis_memory=basis_memory, product_rtol=product_rtol)
    values, coefficients, basis, steps, residuals = krylov.ritz_run(matvec, v0, num_iters, **run)
    vectors = krylov.ritz_vectors(basis, coefficients, shardings=shardings, basis_memory=basis_memory)
    if tol is None or k == 1:  # no early stop to miss a copy, or one value (a copy does not change it)
        return values, vectors, residuals, steps
    start_key = jax.random.key(0) if start_key is None else start_key
    sign = 1.0 if which == "largest" else -1.0
    leaves, treedef = jax.tree_util.tree_flatten(v0)

    def body(state):
        r, values, vectors, residuals, products, _ = state
        span = jnp.max(jnp.abs(values)) + 1.0
        beyond = values[-1] - sign * (span + jnp.max(jnp.abs(values)))  # the locked directions' eigenvalue

        def deflated(u):
            p = _subtract(u, _combine(vectors, _coefficients(vectors, u), u))
            ap = matvec(p)
            ap = _subtract(ap, _combine(vectors, _coefficients(vectors, ap), ap))
            locked = _combine(vectors, beyond * _coefficients(vectors, u), u)
            return jax.tree_util.tree_map(lambda a, b: a + b, ap, locked)

        keys = jax.random.split(jax.random.fold_in(start_key, r), len(leaves))
        start = jax.tree_util.tree_unflatten(
            treedef, [jax.random.normal(kk, jnp.shape(a), jnp.result_type(a)) for kk, a in zip(keys, leaves)])
        start = _subtract(start, _combine(vectors, _coefficients(vectors, start), start))
        new, coeffs, new_basis, new_steps, new_res = krylov.ritz_run(deflated, start, num_iters, **run)
        new_vectors = krylov.ritz_vectors(new_basis, coeffs, shardings=shardings, basis_memory=basis_memory)
        new_res = new_res + jnp.sqrt(jnp.sum(jnp.square(residuals)))
        enters = sign * (new[0] - values[-1]) > tol * jnp.abs(values[-1])
        merged = jnp.concatenate([values, new])
        order = jnp.argsort(-sign * merged, stable=True)[:k]
        values_m = merged[order]
        vectors_m = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)])[order], vectors,
                                           new_vectors)
        residuals_m = jnp.concatenate([residuals, new_res])[order]
        pick = lambda a, b: jnp.where(enters, a, b)  # noqa: E731
        return (r + 1, pick(values_m, values), jax.tree_util.tree_map(pick, vectors_m, vectors),
                pick(residuals_m, residuals), products + new_steps, ~enters)

    def cond(state):
        r, *_, done = state
        return (r <= k) & ~done

    state = (jnp.ones((), jnp.int32), values, vectors, residuals, steps, jnp.asarray(False))
    _, values, vectors, residuals, products, _ = jax.lax.while_loop(cond, body, state)
    return values, vectors, residuals, products
