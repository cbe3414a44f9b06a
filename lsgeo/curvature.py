"""Curvature of an objective f(params, batch): Hessian- and Gauss-Newton-vector products, dense
Hessians, stochastic traces, Lanczos, extreme eigenpairs, spectral densities and the saddle index.

Notation: ``w`` is the flattened parameter vector (``m`` scalars), ``H = D^2_w f(w)`` the Hessian of
the objective, and for R(w) = L(Phi(w)) the Gauss-Newton matrix is ``G = J^T D2L J`` with
``J = DPhi(w)`` the ``[n k, m]`` Jacobian of the predictions and ``D2L = blockdiag(H_i) / n``
(``lsgeo.losses``). ``H = G + sum_i dL/dphi_i D^2 phi_i``; G is PSD when L is convex, H is
indefinite away from minima (a saddle), and its spectrum is the object of Ghorbani et al. (2019).

Every function takes ``params`` as any pytree (flax linen ``variables['params']``, an ``nnx.split``
state, a tuple of arrays) and the data ``batch`` as an explicit argument. Iterative methods act
on flat vectors ``[m]`` (``jax.flatten_util.ravel_pytree``) through a matrix-free operator
(``hessian_operator``, ``gauss_newton_operator``), so any operator can be passed to ``lanczos``.

Costs are counted in Hessian-vector products (HVPs). One HVP by forward-over-reverse costs about
2-3 gradient evaluations (Pearlmutter 1994); the operators below linearise the gradient once
(``jax.linearize``), so a run of many HVPs pays the primal forward/backward pass only once and
stores its residuals (the memory of one backward pass).

The functions that run many HVPs are ``jax.jit``-compiled with ``f`` static (hashed by identity):
reuse the same ``f`` object between calls to reuse the compilation. They are pure and may be
called under an outer ``jit``/``vmap``.

References
----------
- B. Pearlmutter. Fast exact multiplication by the Hessian. Neural Computation, 1994.
- N. Schraudolph. Fast curvature matrix-vector products for second-order gradient descent. 2002.
- M. Hutchinson. A stochastic estimator of the trace of the influence matrix. 1990.
- R. Meyer, C. Musco, C. Musco, D. Woodruff. Hutch++: optimal stochastic trace estimation. SOSA 2021.
- C. Lanczos, 1950; G. Golub, C. Van Loan, Matrix Computations, Section 10.1 (4th ed.).
- S. Ubaru, J. Chen, Y. Saad. Fast estimation of tr(f(A)) via stochastic Lanczos quadrature. SIMAX 2017.
- B. Ghorbani, S. Krishnan, Y. Xiao. An investigation into neural net optimization via Hessian
  eigenvalue density. ICML 2019.
- Y. Dauphin et al. Identifying and attacking the saddle point problem in high-dimensional
  non-convex optimization. NeurIPS 2014 (the saddle index).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jax.scipy.stats
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from lsgeo import validation
from lsgeo.validation import check_choice, check_nonnegative_int, check_positive_int

PyTree = Any
Objective = Callable[[PyTree, Any], jax.Array]
MatVec = Callable[[jax.Array], jax.Array]

__all__ = [
    "hvp",
    "gnvp",
    "hessian_operator",
    "gauss_newton_operator",
    "hessian",
    "hessian_trace",
    "lanczos",
    "tridiagonal_eigh",
    "top_eigenvalues",
    "eigenpairs",
    "min_eigenvalue",
    "spectral_density",
    "slq_nodes",
    "saddle_index",
]

TRACE_METHODS = ("hutchinson", "hutch++")
WHICH = ("largest", "smallest")
SADDLE_METHODS = ("auto", "exact", "slq")

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# products


def hvp(f: Objective, params: PyTree, batch, v: PyTree) -> PyTree:
    """Hessian-vector product ``H v = D^2_w f(w, batch) v`` by forward-over-reverse.

    Computes ``jax.jvp(grad f, (w,), (v,))`` (Pearlmutter 1994): exact to rounding, no Hessian formed.

    Args:
      f: objective ``f(params, batch) -> scalar``.
      params: parameter pytree ``w``.
      batch: data passed to ``f`` unchanged.
      v: tangent pytree with the structure and leaf shapes of ``params``.

    Returns:
      ``H v`` as a pytree shaped like ``params``.

    Cost: about 2-3 gradient evaluations (one forward-mode pass through the backward pass).
    Memory: that of one gradient evaluation plus one tangent per activation.

    Raises:
      ValueError: if ``v`` does not match the structure of ``params``.
    """
    validation.check_same_structure(params, v, "v")
    return jax.jvp(lambda p: jax.grad(f)(p, batch), (params,), (v,))[1]


def gnvp(predict, loss, params: PyTree, batch, v: PyTree) -> PyTree:
    """Gauss-Newton-vector product ``G v = J^T D2L(Phi) J v`` for R(w) = L(Phi(w)).

    ``J v`` is a forward-mode product through ``predict``; ``D2L`` is applied in output space as a
    Hessian-vector product of ``loss`` at the predictions (for a mean loss this is
    ``blockdiag(H_i) / n``, see ``lsgeo.losses.output_hessians``); ``J^T`` is the transpose of the
    linearised ``predict`` (a vector-Jacobian product). Schraudolph (2002).

    Args:
      predict: ``predict(params, x) -> [n, k]`` (or ``[n]``).
      loss: ``loss(outputs, y) -> scalar``, a mean over examples.
      params: parameter pytree.
      batch: ``(x, y)``.
      v: tangent pytree with the structure and leaf shapes of ``params``.

    Returns:
      ``G v`` as a pytree shaped like ``params``. G is PSD when ``loss`` is convex in the outputs.

    Cost: one forward pass, one JVP and one VJP through ``predict`` (about one gradient evaluation
    more than a forward pass) plus an HVP of ``loss`` in output space (O(n k) for the losses of
    ``lsgeo.losses``). Memory: one linearisation of ``predict``.

    Raises:
      ValueError: if ``v`` does not match the structure of ``params``.
    """
    validation.check_same_structure(params, v, "v")
    x, y = batch
    outputs, jvp_fn = jax.linearize(lambda p: predict(p, x), params)
    jv = jvp_fn(v)
    hjv = jax.jvp(jax.grad(lambda o: loss(o, y)), (outputs,), (jv,))[1]
    (gv,) = jax.linear_transpose(jvp_fn, params)(hjv)
    return gv


def hessian_operator(f: Objective, params: PyTree, batch) -> MatVec:
    """The Hessian of ``f`` at ``params`` as a matrix-free operator on flat vectors ``[m]``.

    Returns ``matvec(u) = ravel(H unravel(u))``. The gradient is linearised once
    (``jax.linearize``), so each call costs only the tangent part of forward-over-reverse (about
    1-2 gradient evaluations) and the primal forward/backward pass is shared by all calls.
    ``matvec`` may be ``vmap``-ed over a batch of vectors. Memory: the residuals of one backward pass.
    """
    _, unravel = ravel_pytree(params)
    _, jvp_fn = jax.linearize(lambda p: jax.grad(f)(p, batch), params)

    def matvec(u):
        return ravel_pytree(jvp_fn(unravel(u)))[0]

    return matvec


def gauss_newton_operator(predict, loss, params: PyTree, batch) -> MatVec:
    """The Gauss-Newton matrix ``G = J^T D2L J`` as a matrix-free operator on flat vectors ``[m]``.

    ``predict`` and ``loss`` are linearised once; each call then costs one JVP and one VJP through
    the linearised ``predict`` (see ``gnvp``). Use it with ``lanczos`` for Gauss-Newton spectra.
    Memory: one linearisation of ``predict``.
    """
    x, y = batch
    _, unravel = ravel_pytree(params)
    outputs, jvp_fn = jax.linearize(lambda p: predict(p, x), params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)
    _, loss_hvp = jax.linearize(jax.grad(lambda o: loss(o, y)), outputs)

    def matvec(u):
        (gu,) = vjp_fn(loss_hvp(jvp_fn(unravel(u))))
        return ravel_pytree(gu)[0]

    return matvec


# ----------------------------------------------------------------------------------------------
# dense Hessian and trace


@functools.partial(jax.jit, static_argnames=("f", "chunk_size"))
def hessian(f: Objective, params: PyTree, batch, *, chunk_size: int = 256) -> jax.Array:
    """Dense Hessian ``H = D^2_w f(w, batch)`` of the flattened parameters, shape ``[m, m]``.

    Row ``i`` is ``H e_i`` (``jax.flatten_util.ravel_pytree`` order); the rows are computed ``chunk_size`` at a time
    with ``lax.map``. Small models only.

    Cost: ``m`` HVPs. Memory: ``O(m^2)`` for the result plus ``chunk_size`` tangents of one backward pass.
    """
    check_positive_int(chunk_size, "chunk_size")
    flat, _ = ravel_pytree(params)
    m = flat.shape[0]
    matvec = hessian_operator(f, params, batch)
    return _chunked_map(lambda i: matvec(jax.nn.one_hot(i, m, dtype=flat.dtype)), jnp.arange(m), chunk_size)


def _chunked_map(fn, xs, chunk_size):
    """``lax.map(fn, xs, batch_size=chunk)`` with ``xs`` padded (by repeating its last row) to a
    multiple of the chunk, so that one ``vmap``-ed body is compiled instead of a body plus a
    remainder; the padded rows cost at most ``chunk - 1`` extra evaluations and are dropped."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    if pad:
        xs = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), xs)
    out = jax.lax.map(fn, xs, batch_size=chunk)
    return jax.tree_util.tree_map(lambda a: a[:n], out)


def _flat_dtype(params):
    flat, _ = ravel_pytree(params)
    dtype = flat.dtype if jnp.issubdtype(flat.dtype, jnp.inexact) else jnp.result_type(float)
    return flat.shape[0], dtype


@functools.partial(jax.jit, static_argnames=("f", "num_probes", "method", "chunk_size", "return_stderr"))
def hessian_trace(
    f: Objective,
    params: PyTree,
    batch,
    key: jax.Array,
    *,
    num_probes: int = 64,
    method: str = "hutchinson",
    chunk_size: int = 16,
    return_stderr: bool = False,
):
    """Stochastic estimate of ``tr(H)``, the trace of the Hessian of ``f`` at ``params``.

    ``method="hutchinson"`` (Hutchinson 1990): ``1/N sum_i z_i^T H z_i`` with ``N = num_probes``
    Rademacher probes ``z_i``; unbiased, variance ``2 (||H||_F^2 - sum_j H_jj^2) / N``.

    ``method="hutch++"`` (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1) at the same count of
    ``N`` HVPs: with ``s = N // 3``, ``Q = orth(H S)`` for a Rademacher ``S`` of ``s`` columns, then
    ``tr(Q^T H Q) + 1/g sum_i z_i^T (I - Q Q^T) H (I - Q Q^T) z_i`` with ``g = N - 2 s`` Rademacher
    ``z_i``. Unbiased; the top of the spectrum is captured exactly by ``Q``, so on matrices with a
    decaying spectrum (network Hessians) the error falls like ``1/N`` instead of ``1/sqrt(N)``.

    Args:
      f: objective ``f(params, batch) -> scalar``.
      params: parameter pytree (``m`` scalars).
      batch: data passed to ``f``.
      key: PRNG key for the probes.
      num_probes: total number of HVPs ``N`` (>= 1; >= 3 for Hutch++).
      method: ``"hutchinson"`` or ``"hutch++"``.
      chunk_size: probes evaluated together (``vmap``) inside a ``lax.map``; bounds memory.
      return_stderr: also return the standard error of the estimate (the sample standard deviation of
        the stochastic part over ``sqrt`` of its number of probes; ``0`` with a single probe).

    Returns:
      The scalar estimate, or ``(estimate, stderr)`` when ``return_stderr``.

    Cost: ``num_probes`` HVPs (the primal pass once; at most ``chunk_size - 1`` more per block to
    keep chunks equal). Memory: Hutchinson, ``chunk_size`` probes of size ``m``; Hutch++, ``O(m N)``
    for ``S``, ``Q`` and ``G`` (``N / 3`` columns each), HVPs still ``chunk_size`` at a time.
    """
    check_choice(method, "method", TRACE_METHODS)
    check_positive_int(num_probes, "num_probes")
    check_positive_int(chunk_size, "chunk_size")
    if method == "hutch++" and num_probes < 3:
        raise ValueError(f"num_probes must be >= 3 for method='hutch++' (3 blocks of HVPs), got {num_probes}")
    m, dtype = _flat_dtype(params)
    matvec = hessian_operator(f, params, batch)

    def rademacher(k):
        return jax.random.rademacher(k, (m,), dtype=dtype)

    def stats(values):
        n = values.shape[0]
        mean = jnp.mean(values)
        if n < 2:
            return mean, jnp.zeros((), values.dtype)
        return mean, jnp.std(values, ddof=1) / np.sqrt(n)

    if method == "hutchinson":

        def quad(k):
            z = rademacher(k)
            return jnp.vdot(z, matvec(z))

        estimate, stderr = stats(_chunked_map(quad, jax.random.split(key, num_probes), chunk_size))
    else:
        num_sketch = min(num_probes // 3, m)
        num_resid = num_probes - 2 * num_sketch
        key_s, key_g = jax.random.split(key)
        sketch = jax.random.rademacher(key_s, (num_sketch, m), dtype=dtype)  # S^T
        q, _ = jnp.linalg.qr(_chunked_map(matvec, sketch, chunk_size).T)  # [m, s], orth(H S)
        g = jax.random.rademacher(key_g, (num_resid, m), dtype=dtype)
        g = g - jnp.matmul(jnp.matmul(g, q, precision=_HIGHEST), q.T, precision=_HIGHEST)  # (I - Q Q^T) G
        vecs = jnp.concatenate([q.T, g])
        quads = jnp.sum(vecs * _chunked_map(matvec, vecs, chunk_size), axis=-1)
        rest, stderr = stats(quads[num_sketch:])
        estimate = jnp.sum(quads[:num_sketch]) + rest
    return (estimate, stderr) if return_stderr else estimate


# ----------------------------------------------------------------------------------------------
# Lanczos


def _restart_vector(j, m, dtype):
    """A fixed, generic pseudo-random vector (a sine hash of the index), the ``j``-th restart of
    ``lanczos`` after breakdown. Deterministic and free of PRNG state."""
    i = jnp.arange(1, m + 1, dtype=dtype)
    h = jnp.sin(i * 12.9898 + (j + 1) * 78.233) * 43758.5453
    return h - jnp.floor(h) - 0.5


def lanczos(matvec: MatVec, v0: jax.Array, num_iters: int, *, return_vectors: bool = False):
    """Lanczos tridiagonalisation of a symmetric operator, with full reorthogonalisation.

    Builds an orthonormal basis ``V = [v_1 .. v_K]`` of the Krylov space ``K_K(A, v0)`` with
    ``v_1 = v0 / ||v0||`` and the tridiagonal ``T = V^T A V`` (diagonal ``alphas``, off-diagonal
    ``betas``). Each new vector is orthogonalised against all previous ones twice (classical
    Gram-Schmidt, "twice is enough"), so ``V`` stays orthonormal to working precision and no ghost
    eigenvalues appear (Golub & Van Loan, Section 10.3). The Ritz values ``eig(T)`` approximate the
    extreme eigenvalues of ``A``; ``(U_1j)^2`` with ``T = U diag(theta) U^T`` are the Gauss quadrature
    weights of the spectral measure of ``A`` seen from ``v0`` (``slq_nodes``).

    Breakdown: when the new residual vanishes (``beta <= sqrt(m) eps ||A||``, an invariant subspace
    has been found), ``beta`` is set to 0 and the iteration restarts from a fixed pseudo-random
    vector (projected orthogonal to ``V``); ``T`` then splits into blocks, all of whose eigenvalues are
    eigenvalues of ``A`` restricted to invariant subspaces, and the extra blocks carry zero
    quadrature weight.

    Args:
      matvec: symmetric linear operator on flat vectors ``[m] -> [m]``.
      v0: starting vector ``[m]`` (nonzero; normalised here).
      num_iters: Krylov dimension ``K``, ``1 <= K <= m``.
      return_vectors: also return the basis ``V`` as ``[K, m]`` (rows).

    Returns:
      ``(alphas [K], betas [K - 1])``, or ``(alphas, betas, V)`` when ``return_vectors``.

    Cost: ``K`` matvecs plus ``O(K^2 m)`` flops of reorthogonalisation. Memory: ``(K + 1) m``.
    Runs as one ``lax.scan``.
    """
    check_positive_int(num_iters, "num_iters")
    v0 = jnp.asarray(v0)
    if v0.ndim != 1:
        raise ValueError(f"v0 must be a flat vector of shape [m], got shape {v0.shape}")
    m = v0.shape[0]
    if num_iters > m:
        raise ValueError(f"num_iters must be <= the dimension m={m} of v0, got {num_iters}")
    if not jnp.issubdtype(v0.dtype, jnp.inexact):
        v0 = v0.astype(jnp.result_type(float))
    dtype = v0.dtype
    eps = jnp.finfo(dtype).eps
    tiny = jnp.finfo(dtype).tiny
    basis = jnp.zeros((num_iters + 1, m), dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def project_out(basis, w):
        for _ in range(2):  # twice is enough (Kahan / Parlett)
            w = w - jnp.matmul(basis.T, jnp.matmul(basis, w, precision=_HIGHEST), precision=_HIGHEST)
        return w

    def step(carry, j):
        basis, beta_prev, anorm = carry
        v = basis[j]
        w = matvec(v)
        anorm = jnp.maximum(anorm, jnp.linalg.norm(w))
        alpha = jnp.vdot(v, w)
        w = w - alpha * v - beta_prev * basis[jnp.maximum(j - 1, 0)]
        w = project_out(basis, w)
        beta = jnp.linalg.norm(w)
        breakdown = beta <= np.sqrt(m) * eps * anorm
        w = jax.lax.cond(breakdown, lambda: project_out(basis, _restart_vector(j, m, dtype)), lambda: w)
        beta = jnp.where(breakdown, jnp.zeros_like(beta), beta)
        w = w / jnp.maximum(jnp.linalg.norm(w), tiny)
        basis = jax.lax.dynamic_update_index_in_dim(basis, w, j + 1, axis=0)
        return (basis, beta, anorm), (alpha, beta)

    init = (basis, jnp.zeros((), dtype), jnp.zeros((), dtype))
    (basis, _, _), (alphas, betas) = jax.lax.scan(step, init, jnp.arange(num_iters))
    if return_vectors:
        return alphas, betas[:-1], basis[:num_iters]
    return alphas, betas[:-1]


def tridiagonal_eigh(alphas: jax.Array, betas: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposition ``T = U diag(theta) U^T`` of the symmetric tridiagonal matrix with diagonal
    ``alphas [K]`` and off-diagonal ``betas [K - 1]``; returns ``(theta [K] ascending, U [K, K])``.
    Cost ``O(K^3)`` (dense ``eigh``; K is a Krylov dimension, small)."""
    t = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    return jnp.linalg.eigh(t)


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


@functools.partial(jax.jit, static_argnames=("f", "num_iters"))
def _hessian_lanczos(f, params, batch, key, *, num_iters):
    """Lanczos on the Hessian from a Gaussian start: (Ritz values ascending, U, basis [K, m]).
    Shared (one compilation) by ``top_eigenvalues``, ``eigenpairs`` and ``min_eigenvalue``."""
    m, dtype = _flat_dtype(params)
    v0 = jax.random.normal(key, (m,), dtype)
    alphas, betas, basis = lanczos(hessian_operator(f, params, batch), v0, num_iters, return_vectors=True)
    theta, u = tridiagonal_eigh(alphas, betas)
    return theta, u, basis


@functools.partial(jax.jit, static_argnames=("k", "which"))
def _ritz_pairs(params, theta, u, basis, *, k, which):
    num_iters = theta.shape[0]
    idx = jnp.arange(num_iters - 1, num_iters - 1 - k, -1) if which == "largest" else jnp.arange(k)
    vectors = jnp.matmul(u[:, idx].T, basis, precision=_HIGHEST)  # [k, m], V^T u_j
    _, unravel = ravel_pytree(params)
    return theta[idx], jax.vmap(unravel)(vectors)


def top_eigenvalues(
    f: Objective, params: PyTree, batch, key: jax.Array, *, k: int = 1, num_iters: int | None = None
) -> jax.Array:
    """The ``k`` largest (algebraic) eigenvalues of the Hessian of ``f`` at ``params``, descending.

    The largest Ritz values of a ``num_iters``-step Lanczos run (``lanczos``, full
    reorthogonalisation) on ``hessian_operator`` from a Gaussian start drawn with ``key``. Extreme,
    well-separated eigenvalues converge first and fastest (Kaniel-Paige theory); network Hessians
    have ``~k``-class outliers, which converge in a few dozen steps. ``num_iters`` defaults to
    ``min(m, max(2k + 20, 40))`` and is capped at ``m`` (where the Ritz values are exact).
    ``top_eigenvalues(...)[0]`` is the sharpness ``lambda_max`` of the stability bound
    ``lr < 2 / lambda_max``.

    Returns:
      ``[k]`` Ritz values, descending.

    Cost: ``num_iters`` HVPs plus ``O(num_iters^2 m)`` flops. Memory: ``(num_iters + 1) m``.

    Raises:
      ValueError: ``k`` not in ``[1, m]`` or ``num_iters < k``.
    """
    m = optax.tree.size(params)
    _check_k(k, m)
    num_iters = _resolve_num_iters(num_iters, k, m)
    theta, _, _ = _hessian_lanczos(f, params, batch, key, num_iters=num_iters)
    return theta[::-1][:k]


def eigenpairs(
    f: Objective,
    params: PyTree,
    batch,
    key: jax.Array,
    *,
    k: int = 1,
    which: str = "largest",
    num_iters: int | None = None,
) -> tuple[jax.Array, PyTree]:
    """The ``k`` extreme eigenpairs of the Hessian of ``f`` at ``params`` (Lanczos Ritz pairs).

    The same Lanczos run as ``top_eigenvalues``; returns the ``k`` largest (``which="largest"``,
    descending) or smallest (``which="smallest"``, ascending) Ritz values ``theta_j`` of ``T`` and
    the Ritz vectors ``V^T u_j`` (unit norm, mutually orthogonal; exact eigenvectors once the
    residual ``|beta_K u_Kj|`` is small).

    Returns:
      ``(values [k], vectors)`` with ``vectors`` a pytree shaped like ``params`` with a leading axis
      of size ``k``.

    Cost: ``num_iters`` HVPs. Memory: ``(num_iters + 1) m``.

    Raises:
      ValueError: ``k`` not in ``[1, m]``, ``num_iters < k``, unknown ``which``.
    """
    check_choice(which, "which", WHICH)
    m = optax.tree.size(params)
    _check_k(k, m)
    num_iters = _resolve_num_iters(num_iters, k, m)
    theta, u, basis = _hessian_lanczos(f, params, batch, key, num_iters=num_iters)
    return _ritz_pairs(params, theta, u, basis, k=k, which=which)


def min_eigenvalue(
    f: Objective, params: PyTree, batch, key: jax.Array, *, num_iters: int | None = None
) -> tuple[jax.Array, PyTree]:
    """The most negative (smallest algebraic) Hessian eigenvalue and its unit eigenvector.

    ``lambda_min < 0`` certifies a saddle (or maximum) and the eigenvector ``u`` is the escape
    direction (Dauphin et al. 2014): ``f(w + t u) = f(w) + t <grad f, u> + t^2 lambda_min / 2 + O(t^3)``.
    ``eigenpairs(..., k=1, which="smallest")``; ``num_iters`` defaults to ``min(m, 40)``.

    Returns:
      ``(lambda_min, u)`` with ``u`` a pytree shaped like ``params``, ``||u|| = 1``.

    Cost: ``num_iters`` HVPs. Memory: ``(num_iters + 1) m``.
    """
    values, vectors = eigenpairs(f, params, batch, key, k=1, which="smallest", num_iters=num_iters)
    return values[0], jax.tree_util.tree_map(lambda a: a[0], vectors)


# ----------------------------------------------------------------------------------------------
# spectral density (stochastic Lanczos quadrature) and saddle index


@functools.partial(jax.jit, static_argnames=("f", "num_iters", "num_runs"))
def slq_nodes(
    f: Objective, params: PyTree, batch, key: jax.Array, *, num_iters: int = 80, num_runs: int = 4
) -> tuple[jax.Array, jax.Array]:
    """Stochastic Lanczos quadrature nodes and weights of the Hessian spectral measure.

    For each of ``num_runs`` normalised Rademacher probes ``v``, ``num_iters`` Lanczos steps give
    ``T = U diag(theta) U^T``; the Gauss quadrature ``v^T g(H) v ~ sum_j (U_1j)^2 g(theta_j)`` is exact
    for polynomials of degree ``< 2 num_iters``. Averaged over probes (``E[v v^T] = I / m``),
    ``tr(g(H)) / m ~ 1/R sum_r sum_j tau_rj g(theta_rj)`` (Ubaru, Chen, Saad 2017): the empirical
    spectral measure ``1/m sum_i delta_{lambda_i}`` is approximated by the nodes ``theta`` with
    weights ``tau = (U_1j)^2 / R`` (which sum to 1).

    Returns:
      ``(nodes [num_runs, K], weights [num_runs, K])`` with ``K = min(num_iters, m)``.

    Cost: ``num_runs * K`` HVPs, the runs ``vmap``-ed (one batched HVP per Lanczos step).
    Memory: ``num_runs (K + 1) m``.
    """
    check_positive_int(num_iters, "num_iters")
    check_positive_int(num_runs, "num_runs")
    m, dtype = _flat_dtype(params)
    num_iters = min(num_iters, m)
    matvec = hessian_operator(f, params, batch)

    def run(k):
        z = jax.random.rademacher(k, (m,), dtype=dtype)
        alphas, betas = lanczos(matvec, z, num_iters)
        theta, u = tridiagonal_eigh(alphas, betas)
        return theta, jnp.square(u[0]) / num_runs

    return jax.vmap(run)(jax.random.split(key, num_runs))


@functools.partial(jax.jit, static_argnames=("num_points",))
def _broaden(nodes, weights, grid, width, *, num_points):
    nodes, weights = nodes.reshape(-1), weights.reshape(-1)
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    if width is None:
        width = 0.01 * jnp.maximum(hi - lo, 1e-6 * (1.0 + jnp.max(jnp.abs(nodes))))
    width = jnp.asarray(width, nodes.dtype)
    if grid is None:
        grid = jnp.linspace(lo - 5 * width, hi + 5 * width, num_points, dtype=nodes.dtype)
    grid = jnp.asarray(grid, nodes.dtype)
    kernel = jnp.exp(-0.5 * jnp.square((grid[None, :] - nodes[:, None]) / width))
    mass = jnp.trapezoid(kernel, grid, axis=-1)
    kernel = jnp.where(mass[:, None] > 0, kernel / jnp.where(mass > 0, mass, 1.0)[:, None], 0.0)
    return grid, jnp.matmul(weights, kernel, precision=_HIGHEST)


def spectral_density(
    f: Objective,
    params: PyTree,
    batch,
    key: jax.Array,
    *,
    num_iters: int = 80,
    num_runs: int = 4,
    grid: jax.Array | None = None,
    width=None,
    num_points: int = 1000,
) -> tuple[jax.Array, jax.Array]:
    """Hessian eigenvalue density by stochastic Lanczos quadrature with Gaussian broadening.

    ``phi(t) = sum_{r,j} tau_rj N(t; theta_rj, width^2)`` with the nodes and weights of ``slq_nodes``
    (Ghorbani, Krishnan, Xiao 2019; Ubaru et al. 2017): a smoothed version of the spectral measure
    ``1/m sum_i delta(t - lambda_i)``. Each Gaussian is normalised on the grid (trapezoid rule), so
    ``trapezoid(density, grid) = 1`` whenever the grid covers the Ritz values; a Gaussian entirely
    off the grid contributes nothing.

    Args:
      f, params, batch, key: objective, parameters, data and the probes' PRNG key.
      num_iters: Lanczos steps per run (capped at ``m``).
      num_runs: independent probes, ``vmap``-ed.
      grid: 1-D evaluation points. Default: ``num_points`` points spanning the Ritz values with a
        margin of ``5 width`` on either side.
      width: standard deviation of the broadening. Default: 1% of the span of the Ritz values. Network
        Hessians have a few large outliers, so the bulk needs a smaller ``width`` to be resolved.
      num_points: size of the default grid.

    Returns:
      ``(grid [P], density [P])``.

    Cost: ``num_runs * num_iters`` HVPs plus ``O(num_runs num_iters P)`` for the broadening.
    Memory: ``num_runs (num_iters + 1) m``.
    """
    check_positive_int(num_points, "num_points")
    if grid is not None and (np.ndim(grid) != 1 or np.shape(grid)[0] < 2):
        raise ValueError(f"grid must be a 1-D array of at least 2 points, got shape {np.shape(grid)}")
    nodes, weights = slq_nodes(f, params, batch, key, num_iters=num_iters, num_runs=num_runs)
    return _broaden(nodes, weights, grid, width, num_points=num_points)


def _robust_width(nodes, weights, fraction=0.01):
    """``fraction`` times the 5%-95% inter-quantile range of the SLQ measure (outliers, which carry
    weight ~1/m, do not inflate it), floored at a tiny multiple of the node scale."""
    nodes, weights = nodes.reshape(-1), weights.reshape(-1)
    order = jnp.argsort(nodes)
    cdf = jnp.cumsum(weights[order]) / jnp.sum(weights)
    sorted_nodes = nodes[order]
    lo = sorted_nodes[jnp.clip(jnp.searchsorted(cdf, 0.05), 0, nodes.shape[0] - 1)]
    hi = sorted_nodes[jnp.clip(jnp.searchsorted(cdf, 0.95), 0, nodes.shape[0] - 1)]
    floor = 1e-6 * (1.0 + jnp.max(jnp.abs(nodes)))
    return fraction * jnp.maximum(hi - lo, floor)


def saddle_index(
    f: Objective,
    params: PyTree,
    batch,
    key: jax.Array | None = None,
    *,
    method: str = "auto",
    max_dense: int = 2000,
    tol: float = 0.0,
    num_iters: int = 80,
    num_runs: int = 16,
    width=None,
) -> jax.Array:
    """Saddle index: the fraction of negative Hessian eigenvalues, ``#{i: lambda_i < -tol} / m``.

    0 at a strict local minimum, 1 at a strict local maximum, in between at a saddle (lecture 001,
    Section 1; Dauphin et al. 2014). ``method="exact"`` counts the eigenvalues of the dense Hessian
    (``eigvalsh``). ``method="slq"`` estimates the count as the mass below ``-tol`` of the
    Gaussian-broadened SLQ spectral measure (``spectral_density``),
    ``sum_{r,j} tau_rj Phi((-tol - theta_rj) / width)`` with ``Phi`` the standard normal CDF.
    Broadening matters: Gauss quadrature of a step function placed inside the dense bulk of a network
    Hessian is biased by up to the weight of the nodes next to the step, a bias that more runs do not
    remove; smoothing over ~``width`` removes most of it. ``width`` defaults to 1% of the 5%-95%
    inter-quantile range of the measure (insensitive to outlier eigenvalues); ``width=0`` counts the
    nodes below ``-tol`` (the zero-width limit). ``method="auto"`` is exact when ``m <= max_dense``,
    SLQ otherwise.

    Network Hessians have many eigenvalues at (numerical) zero, and near a minimum their signs are
    rounding noise; neither count is meaningful for them unless ``tol > 0`` separates them.

    Args:
      f, params, batch: objective, parameters and data.
      key: PRNG key for the SLQ probes; required unless the exact path is taken.
      method: ``"auto"``, ``"exact"`` or ``"slq"``.
      max_dense: largest ``m`` for which ``"auto"`` forms the dense Hessian.
      tol: eigenvalues below ``-tol`` count as negative.
      num_iters, num_runs: SLQ settings (see ``slq_nodes``).
      width: SLQ broadening (standard deviation); ``None`` for the default above.

    Cost: exact, ``m`` HVPs plus an ``O(m^3)`` ``eigvalsh`` and ``O(m^2)`` memory; SLQ,
    ``num_runs * num_iters`` HVPs and ``num_runs (num_iters + 1) m`` memory.

    Raises:
      ValueError: unknown ``method``, or ``key`` missing when the SLQ estimate is needed.
    """
    check_choice(method, "method", SADDLE_METHODS)
    check_nonnegative_int(max_dense, "max_dense")
    m = optax.tree.size(params)
    exact = method == "exact" or (method == "auto" and m <= max_dense)
    if exact:
        eigs = jnp.linalg.eigvalsh(hessian(f, params, batch))
        return jnp.mean(eigs < -tol)
    if key is None:
        raise ValueError(
            f"key must be a PRNG key for the SLQ estimate of the saddle index "
            f"(method={method!r}, m={m} > max_dense={max_dense}); got None"
        )
    nodes, weights = slq_nodes(f, params, batch, key, num_iters=num_iters, num_runs=num_runs)
    return _mass_below(nodes, weights, tol, width)


@jax.jit
def _mass_below(nodes, weights, tol, width):
    if width is None:
        width = _robust_width(nodes, weights)
    width = jnp.asarray(width, nodes.dtype)
    z = (-tol - nodes) / jnp.where(width > 0, width, 1.0)
    below = jnp.where(width > 0, jax.scipy.stats.norm.cdf(z), (nodes < -tol).astype(nodes.dtype))
    return jnp.sum(weights * below)
