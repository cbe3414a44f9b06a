"""Extreme Hessian eigenvalues and eigenvectors by Lanczos: ``top_eigenvalues``, ``eigenpairs``,
``min_eigenvalue``.

All three take a curvature operator (``top_eigenvalues(op, key, k=5)``: the Hessian, the Gauss-Newton
matrix, a Fisher, a block) or build the Hessian from ``(f, params, batch, key)``, and share one compiled
program per (operator, options): a Lanczos run (``ritz_pairs``) from a Gaussian start, one product body
inside a ``lax.while_loop``. The recursion runs
in at least float32 (``bfloat16``/``float16`` parameters: the products are evaluated in the parameters'
dtype, the basis, the reorthogonalisation and the small eigenproblem in float32). The error claims are the
products' precision, not float32's: every residual includes ``krylov.rounding_rtol(param dtype) max|theta|``
(7.8e-3 relative with bfloat16 parameters) and a ``tol`` below that is refused.

With ``tol``, the early stop checks for a repeated eigenvalue (``lsgeo.curvature.locking``): one start vector
sees one direction of each eigenspace, so the converged Ritz vectors are locked and a fresh run on the deflated
operator looks for a hidden copy (a repeated top eigenvalue, e.g. a zero-initialised head, is then returned
with its multiplicity); this costs one more early-stopped run, plus one per hidden copy.

Sharded parameters (leaves laid out over several devices by a ``NamedSharding``, as FSDP or tensor
parallelism lays them out): the run takes the pytree path of ``lsgeo.curvature.krylov`` automatically,
the products are ``op.tree_matvec`` (no ravel) and every basis vector keeps the parameters' sharding
(``krylov.vector_shardings``); ``basis_memory="host"`` keeps the basis in host memory (any parameters).

References: Kaniel-Paige convergence theory (Golub & Van Loan, Section 10.1.5); Y. Dauphin et al.,
Identifying and attacking the saddle point problem in high-dimensional non-convex optimization, NeurIPS
2014 (the escape direction); J. Cohen et al., Gradient descent on neural networks typically occurs at
the edge of stability, ICLR 2021 (lambda_max).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from lsgeo.curvature import krylov, locking
from lsgeo.curvature.operator import resolve
from lsgeo.validation import check_choice, check_positive_int, check_sigma

__all__ = ["top_eigenvalues", "eigenpairs", "min_eigenvalue", "WHICH"]

WHICH = ("largest", "smallest")
_HIGHEST = jax.lax.Precision.HIGHEST


def _default_num_iters(k, m):
    return min(m, max(2 * k + 20, 40))


def _check_k(k, m):
    check_positive_int(k, "k")
    if k > m:
        raise ValueError(f"k must be <= the number of parameters m={m}, got k={k}")


def _resolve_num_iters(num_iters, k, m):
    if num_iters is None:
        return _default_num_iters(k, m)
    check_positive_int(num_iters, "num_iters")
    if num_iters < k:
        raise ValueError(f"num_iters must be >= k={k}, got {num_iters}")
    return min(num_iters, m)


def _check_tol(tol, param_dtype=None):
    if tol is None:
        return None
    check_sigma(tol, "tol")
    if not float(tol) > 0:
        raise ValueError(f"tol must be None or a relative tolerance > 0, got {tol!r}")
    if param_dtype is not None and float(tol) <= krylov.rounding_rtol(param_dtype):
        raise ValueError(
            f"tol={float(tol):.3g} is below what products in {jnp.dtype(param_dtype).name} resolve "
            f"(rounding_rtol = {krylov.rounding_rtol(param_dtype):.3g} relative): no residual can certify it; "
            f"raise tol or evaluate the operator with float32/float64 parameters"
        )
    return float(tol)


def _prepare(name, f, params, batch, key, k, num_iters, tol, microbatch_size, devices, basis_memory="device"):
    check_choice(basis_memory, "basis_memory", krylov.BASIS_MEMORY)
    op, key = resolve(f, params, batch, key, name=name, microbatch_size=microbatch_size, devices=devices)
    _check_k(k, op.size)
    return op, key, _resolve_num_iters(num_iters, k, op.size), _check_tol(tol, op.param_dtype)


def vector_layout(op):
    """The static layout of the Krylov vectors of ``op``: ``None`` (flat vectors ``[m]``) unless some
    variable parameter is laid out over several devices, else the tuple of the leaves'
    ``NamedSharding`` (``krylov.vector_shardings``; hashable, a ``jit`` static argument)."""
    shardings = krylov.vector_shardings(op.variable_params)
    return None if shardings is None else tuple(jax.tree_util.tree_leaves(shardings))


def krylov_space(op, layout):
    """``(to_vector, matvec, shardings)`` of the Krylov vectors of ``op`` for a ``vector_layout``: a flat
    probe ``[m]`` as the run's start vector (itself when flat; the pytree of its ``ravel_pytree`` pieces,
    in ``op.dtype``, when sharded, so that both paths start from the same vector), the product and the
    vectors' shardings. Call inside ``jit``."""
    if layout is None:
        return (lambda u: u), op.matvec, None
    pv = op.variable_params
    _, unravel = ravel_pytree(jax.tree_util.tree_map(lambda a: jnp.zeros(jnp.shape(a), op.dtype), pv))
    shardings = jax.tree_util.tree_structure(pv).unflatten(layout)
    return unravel, op.tree_matvec, shardings


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _lanczos_pairs(op, key, num_iters, k, which, tol, with_vectors, layout=None, basis_memory="device"):
    """Lanczos on the operator from a Gaussian start: the k wanted Ritz values, their residual norms and,
    with ``with_vectors``, the Ritz vectors as a pytree with a leading axis k."""
    to_vector, matvec, shardings = krylov_space(op, layout)
    v0 = to_vector(jax.random.normal(key, (op.size,), op.dtype))
    run = dict(k=k, which=which, tol=tol, shardings=shardings, basis_memory=basis_memory,
               product_rtol=krylov.rounding_rtol(op.param_dtype))
    # an early stop (k > 1): locked Ritz vectors and a deflated run check for a repeated eigenvalue
    values, vectors, residuals, _ = locking.checked_ritz_run(matvec, v0, num_iters, start_key=key, **run)
    if not with_vectors:  # the vectors are then never computed (dead code in the compiled program)
        return values, residuals
    if layout is None:
        return values, residuals, jax.vmap(op.unravel)(vectors)  # [k, m], V^T u_j
    return values, residuals, jax.tree_util.tree_map(lambda y, p: y.astype(jnp.result_type(p)), vectors,
                                                     op.variable_params)


def top_eigenvalues(
    f,
    params=None,
    batch=None,
    key: jax.Array | None = None,
    *,
    k: int = 1,
    num_iters: int | None = None,
    tol: float | None = None,
    return_residuals: bool = False,
    basis_memory: str = "device",
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> jax.Array:
    """The ``k`` largest (algebraic) eigenvalues of a curvature operator (the Hessian of ``f`` by default),
    descending.

    The largest Ritz values of a Lanczos run (full reorthogonalisation) from a Gaussian start drawn with
    ``key``. Extreme, well-separated eigenvalues converge first and fastest (Kaniel-Paige theory); network
    Hessians have ``~k``-class outliers, which converge in a few dozen steps. ``num_iters`` defaults to
    ``min(m, max(2k + 20, 40))`` and is capped at ``m`` (where the Ritz values are exact). With ``tol`` the
    run stops as soon as each of the k Ritz pairs has a relative residual ``||A y - theta y|| <= tol
    |theta|`` (an eigenvalue within ``tol |theta|``; ``num_iters`` is then the cap).
    With ``tol`` the run also checks for a repeated eigenvalue before stopping (module docstring: one more
    early-stopped run); ``tol`` must exceed the products' rounding (``krylov.rounding_rtol``).
    ``top_eigenvalues(...)[0]`` of the Hessian is the sharpness ``lambda_max`` of the stability bound
    ``lr < 2 / lambda_max``.

    Args:
      f: a curvature operator, or the objective ``f(params, batch)`` (a mean over examples) of a ``Hessian``.
      params, batch: with an objective, the parameters and the data (omit both with an operator).
      key: PRNG key of the start (``top_eigenvalues(op, key)``).
      k: number of eigenvalues, ``1 <= k <= m``.
      num_iters: Lanczos steps (products), at least ``k``.
      tol: ``None`` (run ``num_iters`` steps) or a relative residual tolerance > 0 for early stopping.
      return_residuals: also return bounds on the residual norms ``||A y_j - theta_j y_j||`` of the Ritz
        pairs (an eigenvalue of A lies within each of its value), the products' rounding included.
      basis_memory: ``"device"`` or ``"host"``: the Lanczos basis (``(num_iters + 1) m`` scalars) in host
        memory, its rows fetched one at a time for the reorthogonalisation, for when it does not fit
        in device memory (``lsgeo.curvature.krylov``). Sharded parameters keep a sharded basis either way.
      microbatch_size, devices: with an objective, the data plan of its ``Hessian`` (``lsgeo.dataplan``).

    Returns:
      ``[k]`` Ritz values, descending (at least float32), or ``(values, residuals)``.

    Cost: ``num_iters`` products (with ``tol``: an early-stopped run, one more to check for a repeated
    eigenvalue) plus ``O(num_iters^2 m)`` flops. Memory:
    ``(num_iters + 1) m`` plus one product on one microbatch (per device, ``(num_iters + 1) m / devices``
    with sharded parameters; in host memory with ``basis_memory="host"``).

    Raises:
      ValueError: ``k`` not in ``[1, m]``, ``num_iters < k``, ``tol <= 0`` or below the products' rounding,
        unknown ``basis_memory``, ``key`` not a PRNG key,
        integer ``params``, an empty batch, a bad ``microbatch_size``; TypeError: ``f`` not callable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> f = lambda w, b: 0.5 * jnp.sum(b * w**2)  # H = diag(b)
      >>> b = jnp.array([1.0, 5.0, 2.0, 3.0])
      >>> [round(float(v), 4) for v in curvature.top_eigenvalues(f, jnp.ones(4), b, jax.random.key(0), k=2)]
      [5.0, 3.0]
    """
    op, key, num_iters, tol = _prepare("top_eigenvalues", f, params, batch, key, k, num_iters, tol,
                                       microbatch_size, devices, basis_memory)
    values, residuals = _lanczos_pairs(op, key, num_iters, k, "largest", tol, False, vector_layout(op), basis_memory)
    return (values, residuals) if return_residuals else values


def eigenpairs(
    f,
    params=None,
    batch=None,
    key: jax.Array | None = None,
    *,
    k: int = 1,
    which: str = "largest",
    num_iters: int | None = None,
    tol: float | None = None,
    return_residuals: bool = False,
    basis_memory: str = "device",
):
    """The ``k`` extreme eigenpairs of a curvature operator (the Hessian of ``f`` by default): Lanczos
    Ritz pairs.

    The same Lanczos run as ``top_eigenvalues``; returns the ``k`` largest (``which="largest"``,
    descending) or smallest (``which="smallest"``, ascending) Ritz values ``theta_j`` of ``T`` and
    the Ritz vectors ``V^T u_j`` (unit norm, mutually orthogonal; exact eigenvectors once the
    residual ``|beta_K u_Kj|`` is small, which ``tol`` bounds relative to ``|theta_j|``). With sharded
    parameters the vectors keep the parameters' sharding (behind the leading axis k); ``basis_memory``
    as in ``top_eigenvalues``. Microbatches and devices: pass an operator, or ``f`` an ``lsgeo.Objective`` built
    with them (``batch=None``).

    Returns:
      ``(values [k], vectors)`` with ``vectors`` a pytree shaped like the operator's parameters with a
      leading axis of size ``k``; ``(values, vectors, residuals)`` with ``return_residuals``.

    Cost: ``num_iters`` products. Memory: ``(num_iters + 1) m``.

    Raises:
      ValueError: ``k`` not in ``[1, m]``, ``num_iters < k``, unknown ``which``, ``tol <= 0``, unknown
        ``basis_memory``.
    """
    check_choice(which, "which", WHICH)
    op, key, num_iters, tol = _prepare("eigenpairs", f, params, batch, key, k, num_iters, tol, None, None,
                                       basis_memory)
    values, residuals, vectors = _lanczos_pairs(op, key, num_iters, k, which, tol, True, vector_layout(op),
                                                basis_memory)
    return (values, vectors, residuals) if return_residuals else (values, vectors)


def min_eigenvalue(
    f,
    params=None,
    batch=None,
    key: jax.Array | None = None,
    *,
    num_iters: int | None = None,
    tol: float | None = None,
    basis_memory: str = "device",
):
    """The most negative (smallest algebraic) eigenvalue of a curvature operator (the Hessian of ``f`` by
    default) and its unit eigenvector.

    ``lambda_min < 0`` certifies a saddle (or maximum) and the eigenvector ``u`` is the escape
    direction (Dauphin et al. 2014): ``f(w + t u) = f(w) + t <grad f, u> + t^2 lambda_min / 2 + O(t^3)``.
    ``eigenpairs(..., k=1, which="smallest")``; ``num_iters`` defaults to ``min(m, 40)``.

    Returns:
      ``(lambda_min, u)`` with ``u`` a pytree shaped like the parameters, ``||u|| = 1``.

    Cost: ``num_iters`` products. Memory: ``(num_iters + 1) m``.
    """
    values, vectors = eigenpairs(
        f, params, batch, key, k=1, which="smallest", num_iters=num_iters, tol=tol, basis_memory=basis_memory,
    )
    return values[0], jax.tree_util.tree_map(lambda a: a[0], vectors)
