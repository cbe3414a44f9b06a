"""Lanczos tridiagonalisation (with or without full reorthogonalisation), and the Ritz pairs of the
tridiagonal, on flat vectors or on pytrees shaped like the parameters (sharded or not).

``lanczos`` runs a fixed number of steps as one ``lax.scan``; ``ritz_pairs`` runs up to that number in a
``lax.while_loop`` and stops early once the wanted extreme Ritz pairs have converged (relative residual
``|beta_K u_Kj| <= tol |theta_j|``). Both hold the basis ``V`` (``K + 1`` vectors), the only state that grows
with the number of steps; each step calls the operator once (one compiled body).

Vectors: a flat vector ``[m]`` or any pytree of floating arrays (the parameters' shapes); a flat vector is
a one-leaf pytree, so there is one code path. The basis is a pytree of the same structure whose leaves
carry a leading axis ``K + 1`` (leaf ``[K + 1, *leaf.shape]``); inner products are sums over leaves of
full contractions (``tensordot``, precision HIGHEST). With ``shardings`` (the vectors' ``NamedSharding``
per leaf, ``vector_shardings(params)``) every vector and every basis leaf is constrained inside ``jit``
to the parameter's layout (the basis: the same ``PartitionSpec`` behind a replicated leading axis), so
with FSDP- or tensor-parallel parameters each device holds its shard of every basis vector and the inner
products are partial contractions plus one all-reduce of ``K + 1`` scalars. With ``basis_memory="host"``
the basis lives in host memory (``jax.memory.Space.Host``: pinned host memory on GPU/TPU, the memory
kind ``pinned_host`` of the same sharding) and its rows are fetched one at a time for the
reorthogonalisation (as Zhang et al. 2024 keep their Lanczos basis on the CPU); on the CPU backend the
two memories are one and the option changes only the order of the reorthogonalisation (modified
Gram-Schmidt over rows instead of classical Gram-Schmidt against the whole basis).

References: C. Lanczos, 1950; G. Golub, C. Van Loan, Matrix Computations (4th ed.), Sections 10.1-10.3;
B. Parlett, The Symmetric Eigenvalue Problem, 1998 (residual bounds of Ritz pairs); C. Paige, Accuracy
and effectiveness of the Lanczos algorithm for the symmetric eigenproblem, LAA 1980; G. Meurant, Z.
Strakos, The Lanczos and conjugate gradient algorithms in finite precision arithmetic, Acta Numerica
2006 (Gauss quadrature from Lanczos without reorthogonalisation); Y. Zhang et al., Why Transformers Need
Adam: A Hessian Perspective, NeurIPS 2024 (a host-memory basis).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo.curvature.krylov_space import KrylovSpace, vector_shardings
from lsgeo.validation import check_choice, check_positive_int, is_concrete

__all__ = ["lanczos", "tridiagonal_eigh", "ritz_pairs", "ritz_run", "ritz_vectors", "vector_shardings",
           "rounding_rtol", "BASIS_MEMORY", "PRODUCT_ROUNDING"]

PyTree = Any
MatVec = Callable[[PyTree], PyTree]
BASIS_MEMORY = ("device", "host")
PRODUCT_ROUNDING = 1  # a product's relative rounding error, in units of its dtype's eps (see rounding_rtol)


def rounding_rtol(param_dtype) -> float:
    """The relative size, against ``||A||``, of what the arithmetic cannot resolve in an eigenvalue:
    ``PRODUCT_ROUNDING eps`` of the dtype the products are evaluated in (the parameters' dtype).

    A product ``fl(A v) = A v + e`` with ``||e|| <~ c eps ||A|| ||v||`` makes every estimate see ``A + E`` with
    ``||E|| <~ c eps ||A||``, and Weyl's inequality moves each eigenvalue by at most ``||E||``: the null space of
    a positive semidefinite ``A`` shows up as eigenvalues of either sign of that size, and a Ritz residual
    computed from the recursion (which sees ``A + E``) must be widened by it. ``c = PRODUCT_ROUNDING`` = 1
    (measured: bfloat16 Hessian and Gauss-Newton products of small MLPs move eigenvalues by eps / 10 to
    eps / 45 of ``||A||``): 1.2e-7 in float32, 2.2e-16 in float64, but 7.8e-3 with bfloat16 parameters and
    9.8e-4 with float16 (the products' precision, not float32's, even though the recursion and the
    eigenproblems run in float32).
    """
    return float(PRODUCT_ROUNDING * jnp.finfo(param_dtype).eps)


def _check_start(v0, num_iters, shardings=None, basis_memory="device", what="v0"):
    check_positive_int(num_iters, "num_iters")
    check_choice(basis_memory, "basis_memory", BASIS_MEMORY)
    scalars = (int, float, np.number)
    if isinstance(v0, (jax.Array, np.ndarray, *scalars)) or (
        isinstance(v0, (list, tuple)) and v0 and all(isinstance(a, scalars) for a in v0)
    ):  # an array, or a sequence of numbers: a flat vector
        v0 = jnp.asarray(v0)
        if v0.ndim != 1:
            raise ValueError(f"{what} must be a flat vector of shape [m] or a pytree of arrays, got an array of "
                             f"shape {v0.shape}")
    leaves, treedef = jax.tree_util.tree_flatten(v0)
    if not leaves:
        raise ValueError(f"{what} must be a flat vector or a pytree of arrays with at least one leaf, got {v0!r}")
    leaves = [jnp.asarray(a) for a in leaves]
    dtype = jnp.result_type(*leaves)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(float)
    leaves = [a.astype(dtype) for a in leaves]
    v0 = jax.tree_util.tree_unflatten(treedef, leaves)
    space = KrylovSpace(v0, shardings, basis_memory)
    if num_iters > space.size:
        raise ValueError(f"num_iters must be <= the dimension m={space.size} of {what}, got {num_iters}")
    if is_concrete(leaves):
        norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in leaves)))
        if not np.isfinite(norm):
            raise ValueError(f"{what} must be finite, got a vector with NaN or inf entries")
        if norm == 0.0:
            raise ValueError(f"{what} must be a nonzero start vector, got a zero vector")
    return leaves, space


def _initial_state(space, v0, num_iters):
    dtype = v0[0].dtype
    v0 = space.constrain(v0)
    v1 = [a / space.norm(v0).astype(dtype) for a in v0]
    basis = space.constrain_basis([jnp.zeros((num_iters + 1, *s), dtype) for s in space.shapes])
    return space.write(basis, v1, 0), jnp.zeros((), dtype)


def _step(space, matvec, basis, beta_prev, j):
    """One Lanczos step with full reorthogonalisation: ``(basis with row j + 1, beta_j, alpha_j)``.

    Breakdown (an invariant subspace found) is declared when the reorthogonalised residual is at rounding
    level relative to this step's own product, ``beta_j <= 10 eps ||A v_j||``: the new direction is then
    numerically inside ``span(V)``. (A threshold on a running ``||A||`` estimate, ``sqrt(m) eps ||A||``,
    discards genuine small couplings at large m: 3.9e-4 ||A|| at m = 1e7 in float32.)"""
    dtype = basis[0].dtype
    eps, tiny = jnp.finfo(dtype).eps, jnp.finfo(dtype).tiny
    v, v_prev = space.row(basis, j), space.row(basis, jnp.maximum(j - 1, 0))
    w = space.constrain([a.astype(dtype) for a in space.leaves(matvec(space.tree(v)))])
    scale = space.norm(w)
    alpha = space.inner(v, w)
    w = space.axpy(-beta_prev, v_prev, space.axpy(-alpha, v, w))
    w = space.project_out(basis, w, j + 1)
    beta = space.norm(w)
    breakdown = beta <= 10 * eps * scale
    w = jax.lax.cond(breakdown, lambda: space.project_out(basis, space.restart_vector(j, dtype), j + 1), lambda: w)
    beta = jnp.where(breakdown, jnp.zeros_like(beta), beta)
    inv = 1 / jnp.maximum(space.norm(w), tiny)
    basis = space.write(basis, [a * inv for a in w], j + 1)
    return basis, beta, alpha


def _plain_step(space, matvec, carry, j):
    """One step of the three-term recurrence without reorthogonalisation (Paige's A(1)/A(2) ordering:
    ``w = A v_j - beta_{j-1} v_{j-1}``, ``alpha_j = <v_j, w>``, ``w -= alpha_j v_j``). State: two vectors.
    Breakdown restarts from the fixed restart vector orthogonalised against ``v_j`` and ``v_{j-1}``."""
    v_prev, v, beta_prev = carry
    dtype = v[0].dtype
    eps, tiny = jnp.finfo(dtype).eps, jnp.finfo(dtype).tiny
    w = space.constrain([a.astype(dtype) for a in space.leaves(matvec(space.tree(v)))])
    scale = space.norm(w)
    w = space.axpy(-beta_prev, v_prev, w)
    alpha = space.inner(v, w)
    w = space.axpy(-alpha, v, w)
    beta = space.norm(w)
    breakdown = beta <= 10 * eps * scale

    def restart():
        r = space.restart_vector(j, dtype)
        for _ in range(2):
            r = space.axpy(-space.inner(v, r), v, r)
            r = space.axpy(-space.inner(v_prev, r), v_prev, r)
        return r

    w = jax.lax.cond(breakdown, restart, lambda: w)
    beta = jnp.where(breakdown, jnp.zeros_like(beta), beta)
    inv = 1 / jnp.maximum(space.norm(w), tiny)
    return (v, space.constrain([a * inv for a in w]), beta), beta, alpha


def lanczos(matvec: MatVec, v0, num_iters: int, *, return_vectors: bool = False, reorthogonalize: bool = True,
            shardings=None, basis_memory: str = "device"):
    """Lanczos tridiagonalisation of a symmetric operator, with full reorthogonalisation by default.

    Builds an orthonormal basis ``V = [v_1 .. v_K]`` of the Krylov space ``K_K(A, v0)`` with
    ``v_1 = v0 / ||v0||`` and the tridiagonal ``T = V^T A V`` (diagonal ``alphas``, off-diagonal
    ``betas``). Each new vector is orthogonalised against all previous ones twice (classical
    Gram-Schmidt, "twice is enough"), so ``V`` stays orthonormal to working precision and no ghost
    eigenvalues appear (Golub & Van Loan, Section 10.3). The Ritz values ``eig(T)`` approximate the
    extreme eigenvalues of ``A``; ``(U_1j)^2`` with ``T = U diag(theta) U^T`` are the Gauss quadrature
    weights of the spectral measure of ``A`` seen from ``v0`` (``slq_nodes``).

    ``reorthogonalize=False`` runs the plain three-term recurrence and keeps two vectors instead of the
    basis (memory ``O(m)``, no ``O(K^2 m)`` flops). Orthogonality is then lost as Ritz values converge
    and copies ("ghosts") of converged eigenvalues appear, so it is not for eigenpairs; but the
    tridiagonal of a finite-precision run is that of exact Lanczos on a nearby problem whose spectral
    measure is close to that of ``A`` seen from ``v0`` (Paige 1980; Greenbaum 1989), and the Gauss
    quadrature ``sum_j (U_1j)^2 g(theta_j)`` still approximates ``v0^T g(A) v0 / ||v0||^2`` (the ghosts
    share the weight of the eigenvalue they copy: Meurant & Strakos 2006). That is what stochastic
    Lanczos quadrature needs.

    Vectors may be flat ``[m]`` or pytrees of arrays (see the module docstring); ``shardings`` (a pytree
    shaped like ``v0`` of ``NamedSharding``, e.g. ``vector_shardings(params)``) keeps every vector and
    basis leaf in that layout inside ``jit``; ``basis_memory="host"`` keeps the basis in host memory.

    Breakdown: when the new residual vanishes (``beta <= 10 eps ||A v_j||``, an invariant subspace
    has been found), ``beta`` is set to 0 and the iteration restarts from a fixed pseudo-random
    vector (projected orthogonal to ``V``); ``T`` then splits into blocks, all of whose eigenvalues are
    eigenvalues of ``A`` restricted to invariant subspaces, and the extra blocks carry zero
    quadrature weight.

    Args:
      matvec: symmetric linear operator on vectors shaped like ``v0`` (``[m] -> [m]`` for a flat ``v0``).
      v0: starting vector, a flat ``[m]`` array or a pytree of arrays, nonzero and finite (checked when
        concrete); normalised here. The recursion runs in its (common) dtype.
      num_iters: Krylov dimension ``K``, ``1 <= K <= m``.
      return_vectors: also return the basis ``V``: ``[K, m]`` (rows) for a flat ``v0``, else a pytree
        shaped like ``v0`` with leading axis ``K`` on every leaf (sharded like ``v0`` with ``shardings``,
        in host memory with ``basis_memory="host"``).
      reorthogonalize: full reorthogonalisation (``True``) or the plain recurrence (``False``; no basis).
      shardings: ``None`` or the vectors' ``NamedSharding`` per leaf (a pytree shaped like ``v0``).
      basis_memory: ``"device"`` or ``"host"`` (the basis in host memory, its rows fetched one at a time).

    Returns:
      ``(alphas [K], betas [K - 1])``, or ``(alphas, betas, V)`` when ``return_vectors``.

    Cost: ``K`` matvecs plus ``O(K^2 m)`` flops of reorthogonalisation (``O(K m)`` without); with a
    host basis also ``2 K^2 m`` scalars moved host -> device in all (two passes over ``j`` rows at step j).
    Memory: ``(K + 1) m`` (sharded: ``(K + 1) m / devices`` per device; host basis: ``(K + 1) m`` host
    memory and ``O(m)`` device memory); ``3 m`` without reorthogonalisation. Runs as one ``lax.scan``.

    Raises:
      ValueError: ``v0`` not a flat vector or a pytree of arrays, zero or not finite; ``num_iters`` not in
        ``[1, m]``; ``return_vectors`` without reorthogonalisation; unknown ``basis_memory``; bad
        ``shardings``.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> alphas, betas = curvature.lanczos(lambda u: a @ u, jnp.ones(3), 3)
      >>> [round(float(t), 4) for t in curvature.tridiagonal_eigh(alphas, betas)[0]]
      [1.0, 2.0, 3.0]
    """
    if not isinstance(reorthogonalize, (bool, np.bool_)):
        raise ValueError(f"reorthogonalize must be a bool, got {reorthogonalize!r}")
    if return_vectors and not reorthogonalize:
        raise ValueError("return_vectors=True needs reorthogonalize=True (the plain recurrence keeps no basis)")
    v0, space = _check_start(v0, num_iters, shardings, basis_memory)

    if not reorthogonalize:
        dtype = v0[0].dtype
        v0 = space.constrain(v0)
        v1 = [a / space.norm(v0).astype(dtype) for a in v0]
        init = ([jnp.zeros_like(a) for a in v1], v1, jnp.zeros((), dtype))

        def plain(carry, j):
            carry, beta, alpha = _plain_step(space, matvec, carry, j)
            return carry, (alpha, beta)

        _, (alphas, betas) = jax.lax.scan(plain, init, jnp.arange(num_iters))
        return alphas, betas[:-1]

    def step(carry, j):
        basis, beta_prev = carry
        basis, beta, alpha = _step(space, matvec, basis, beta_prev, j)
        return (basis, beta), (alpha, beta)

    (basis, _), (alphas, betas) = jax.lax.scan(step, _initial_state(space, v0, num_iters), jnp.arange(num_iters))
    if return_vectors:
        return alphas, betas[:-1], space.tree([b[:num_iters] for b in basis])
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


def ritz_pairs(matvec: MatVec, v0, num_iters: int, *, k: int, which: str = "largest", tol=None, shardings=None,
               basis_memory: str = "device"):
    """Lanczos with early stopping: the ``k`` extreme Ritz pairs of a symmetric operator.

    Runs at most ``num_iters`` steps (``lax.while_loop``). With ``tol`` (a float > 0) it stops after the
    first step ``K >= k`` at which every wanted Ritz pair satisfies ``|beta_K u_Kj| <= tol |theta_j|``:
    ``|beta_K u_Kj| = ||A y_j - theta_j y_j||`` is the residual of the Ritz pair ``(theta_j, y_j = V u_j)``,
    so an eigenvalue of ``A`` lies within ``tol |theta_j|`` of ``theta_j`` (Parlett, Theorem 4.5.1).
    ``tol=None`` runs all ``num_iters`` steps. ``v0``, ``shardings`` and ``basis_memory`` as in ``lanczos``
    (full reorthogonalisation always).

    Returns:
      ``(values [k], coefficients [K_max, k], basis, steps)``: the Ritz values (descending for
      ``which="largest"``, ascending for ``"smallest"``), their coordinates ``u_j`` in the basis (rows of
      the basis beyond ``steps`` are zero), the basis (``[K_max, m]`` for a flat ``v0``, else a pytree
      shaped like ``v0`` with leading axis ``K_max``) and the number of steps taken. The Ritz vectors are
      ``ritz_vectors(basis, coefficients)``.

    Cost: ``steps`` matvecs, ``O(steps^2 m)`` reorthogonalisation and, with ``tol``, one ``K_max x K_max``
    ``eigh`` per step. Memory: ``(num_iters + 1) m`` (in host memory with ``basis_memory="host"``).

    Raises:
      ValueError: ``k`` not in ``[1, num_iters]`` (a Krylov space of dimension K has K Ritz values),
        unknown ``which``, a bad ``v0``, ``num_iters``, ``shardings`` or ``basis_memory``.
    """
    values, coefficients, basis, steps, _ = ritz_run(matvec, v0, num_iters, k=k, which=which, tol=tol,
                                                     shardings=shardings, basis_memory=basis_memory)
    return values, coefficients, basis, steps


def ritz_run(matvec: MatVec, v0, num_iters: int, *, k: int, which: str = "largest", tol=None, shardings=None,
             basis_memory: str = "device", product_rtol: float = 0.0):
    """``ritz_pairs`` plus the residual norms ``|beta_K u_Kj|`` of the returned Ritz pairs (``[k]``; the
    residual ``||A y_j - theta_j y_j||``, exactly 0 when the run found an invariant subspace).

    ``product_rtol``: the relative rounding of the products (``rounding_rtol`` of the parameters' dtype). The
    recursion sees ``A + E`` with ``||E|| <= product_rtol ||A||``, so ``product_rtol max|theta|`` is added to
    every residual and to the stopping test: with bfloat16 products a residual computed in float32 alone reads
    0 while the value is 3e-4 to 8e-4 off. An early stop from one start vector can miss a repeated
    eigenvalue: ``lsgeo.curvature.locking.checked_ritz_run`` checks for it."""
    check_choice(which, "which", ("largest", "smallest"))
    v0, space = _check_start(v0, num_iters, shardings, basis_memory)
    check_positive_int(k, "k")
    if k > num_iters:
        raise ValueError(f"k must be <= num_iters={num_iters} (the Krylov dimension), got k={k}")
    dtype = v0[0].dtype
    basis, beta0 = _initial_state(space, v0, num_iters)
    zeros = jnp.zeros((num_iters,), dtype)

    def residuals(alphas, betas, size):
        theta, u = _padded_eigh(alphas, betas, size, which)
        idx = _wanted(theta, k, which)
        num = theta.shape[0]
        ends = (theta[num - size], theta[-1]) if which == "largest" else (theta[0], theta[size - 1])
        rounding = product_rtol * jnp.maximum(jnp.abs(ends[0]), jnp.abs(ends[1]))  # ||A|| >= max |Ritz value|
        return theta[idx], u[:, idx], rounding + jnp.abs(betas[size - 1]) * jnp.abs(u[size - 1, idx])

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
        basis, beta, alpha = _step(space, matvec, basis, beta_prev, j)
        alphas, betas = alphas.at[j].set(alpha), betas.at[j].set(beta)
        return j + 1, basis, beta, alphas, betas, converged(alphas, betas, j + 1)

    init = (jnp.zeros((), jnp.int32), basis, beta0, zeros, zeros, jnp.asarray(False))
    steps, basis, _, alphas, betas, _ = jax.lax.while_loop(cond, body, init)
    values, coefficients, residual = residuals(alphas, betas, steps)
    return values, coefficients, space.tree([b[:num_iters] for b in basis]), steps, residual


def ritz_vectors(basis, coefficients: jax.Array, *, shardings=None, basis_memory: str = "device"):
    """The Ritz vectors ``y_c = sum_i coefficients[i, c] v_i`` of a basis returned by ``ritz_pairs`` /
    ``lanczos``: ``[k, m]`` for a flat basis ``[K, m]``, else a pytree shaped like the basis with leading
    axis ``k`` (constrained to ``shardings`` behind a replicated leading axis; with
    ``basis_memory="host"`` the rows are fetched one at a time and the result is in device memory).

    Cost: ``O(K k m)`` flops. Memory: ``k m`` (plus one row with a host basis).

    Raises:
      ValueError: ``coefficients`` not ``[K', k]`` with ``K' <= K``, unknown ``basis_memory``."""
    check_choice(basis_memory, "basis_memory", BASIS_MEMORY)
    leaves, treedef = jax.tree_util.tree_flatten(basis)
    if np.ndim(coefficients) != 2 or not leaves or np.shape(coefficients)[0] > np.shape(leaves[0])[0]:
        raise ValueError(f"coefficients must be [K', k] with K' <= the basis length, got shape "
                         f"{np.shape(coefficients)} for a basis of {np.shape(leaves[0])[:1] if leaves else 0} vectors")
    rows = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in leaves])
    space = KrylovSpace(rows, shardings, basis_memory)
    coefficients = jnp.asarray(coefficients, leaves[0].dtype)
    return space.tree(space.combine(leaves, coefficients))
