"""The spectral density of a curvature operator by stochastic Lanczos quadrature, and the saddle index.

Every function takes an operator (``spectral_density(op, key)``; per-block densities are
``{g: spectral_density(b, key) for g, b in blocks(op).items()}``) or builds the Hessian from
``(f, params, batch, key)``.

References: S. Ubaru, J. Chen, Y. Saad, Fast estimation of tr(f(A)) via stochastic Lanczos quadrature,
SIMAX 2017; B. Ghorbani, S. Krishnan, Y. Xiao, An investigation into neural net optimization via Hessian
eigenvalue density, ICML 2019; Y. Dauphin et al., Identifying and attacking the saddle point problem in
high-dimensional non-convex optimization, NeurIPS 2014 (the saddle index).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jax.flatten_util
import jax.scipy.stats
import numpy as np

from lsgeo.curvature import chunking
from lsgeo.curvature.eigen import krylov_space, vector_layout
from lsgeo.curvature.krylov import BASIS_MEMORY, lanczos, rounding_rtol, tridiagonal_eigh
from lsgeo.curvature.operator import resolve
from lsgeo.validation import check_choice, check_nonnegative_int, check_positive_int, check_sigma, is_concrete

__all__ = ["slq_nodes", "block_slq_nodes", "spectral_density", "saddle_index", "default_saddle_rtol",
           "saddle_rounding_rtol", "SADDLE_METHODS", "DEFAULT_SADDLE_RTOL"]

SADDLE_METHODS = ("auto", "exact", "slq")
DEFAULT_SADDLE_RTOL = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


def slq_nodes(
    f,
    params=None,
    batch=None,
    key: jax.Array | None = None,
    *,
    num_iters: int = 80,
    num_runs: int = 4,
    vectors_per_pass: int | None = None,
    reorthogonalize: bool = True,
    basis_memory: str = "device",
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Stochastic Lanczos quadrature nodes and weights of the spectral measure of a curvature operator
    (the Hessian of ``f`` by default).

    For each of ``num_runs`` normalised Rademacher probes ``v``, ``num_iters`` Lanczos steps give
    ``T = U diag(theta) U^T``; the Gauss quadrature ``v^T g(A) v ~ sum_j (U_1j)^2 g(theta_j)`` is exact
    for polynomials of degree ``< 2 num_iters``. Averaged over probes (``E[v v^T] = I / m``),
    ``tr(g(A)) / m ~ 1/R sum_r sum_j tau_rj g(theta_rj)`` (Ubaru, Chen, Saad 2017): the empirical
    spectral measure ``1/m sum_i delta_{lambda_i}`` is approximated by the nodes ``theta`` with
    weights ``tau = (U_1j)^2 / R`` (which sum to 1).

    ``reorthogonalize=False`` runs the plain three-term recurrence (``krylov.lanczos``): no basis is
    stored (memory ``3 m`` per run instead of ``(K + 1) m``, no ``O(K^2 m)`` reorthogonalisation), and
    the Gauss quadrature of a finite-precision run still approximates the spectral measure (Paige 1980;
    Meurant & Strakos 2006: converged eigenvalues reappear as ghost nodes that share their weight). With
    sharded parameters (``NamedSharding`` leaves) the runs take the pytree path and every vector keeps
    the parameters' sharding; ``basis_memory="host"`` keeps each run's basis in host memory.

    Args:
      f, params, batch, key: an operator and a key, or an objective, parameters, data and a key.
      num_iters: Lanczos steps per run (capped at ``m``).
      num_runs: independent probes ``R``.
      vectors_per_pass: runs vmapped together (``None``: as many as fit in a memory budget that counts
        each run's basis and tangents; one at a time on a large model).
      reorthogonalize: full reorthogonalisation (default) or the plain recurrence without a basis.
      basis_memory: ``"device"`` or ``"host"`` (each run's basis in host memory, the runs one at a time;
        with reorthogonalisation).
      microbatch_size, devices: with an objective, the data plan of its ``Hessian``.

    Returns:
      ``(nodes [num_runs, K], weights [num_runs, K])`` with ``K = min(num_iters, m)`` (at least float32).

    Cost: ``num_runs * K`` products plus ``O(num_runs K^2 m)`` flops (``O(num_runs K m)`` without
    reorthogonalisation). Memory: ``vectors_per_pass (K + 1) m`` plus the products (``3 m`` per run
    without reorthogonalisation; ``O(m)`` device memory per run with a host basis).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> f = lambda w, b: 0.5 * jnp.sum(b * w**2)  # H = diag(b), m = 3: exact nodes
      >>> nodes, weights = curvature.slq_nodes(f, jnp.ones(3), jnp.array([1.0, 2.0, 3.0]), jax.random.key(0))
      >>> nodes.shape, round(float(weights.sum()), 6)
      ((4, 3), 1.0)
    """
    op, key = resolve(f, params, batch, key, name="slq_nodes", microbatch_size=microbatch_size, devices=devices)
    check_positive_int(num_iters, "num_iters")
    check_positive_int(num_runs, "num_runs")
    chunking.check_vectors_per_pass(vectors_per_pass)
    if not isinstance(reorthogonalize, (bool, np.bool_)):
        raise ValueError(f"reorthogonalize must be a bool, got {reorthogonalize!r}")
    check_choice(basis_memory, "basis_memory", BASIS_MEMORY)
    num_iters = min(num_iters, op.size)
    if vectors_per_pass is None:
        stored = num_iters + 1 if reorthogonalize and basis_memory == "device" else 3
        basis_bytes = stored * op.size * np.dtype(op.dtype).itemsize
        vectors_per_pass = chunking.auto_vectors_per_pass(op, num_runs, state_bytes_per_vector=basis_bytes)
    return _slq_nodes(op, key, num_iters, num_runs, vectors_per_pass, bool(reorthogonalize), vector_layout(op),
                      basis_memory)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _slq_nodes(op, key, num_iters, num_runs, chunk, reorthogonalize=True, layout=None, basis_memory="device"):
    m, dtype = op.size, op.dtype
    to_vector, matvec, shardings = krylov_space(op, layout)

    def run(k):
        z = to_vector(jax.random.rademacher(k, (m,), dtype=dtype))
        alphas, betas = lanczos(matvec, z, num_iters, reorthogonalize=reorthogonalize, shardings=shardings,
                                basis_memory=basis_memory)
        theta, u = tridiagonal_eigh(alphas, betas)
        return theta, jnp.square(u[0]) / num_runs

    if basis_memory == "host":  # one run at a time: a host basis is for models whose basis does not fit
        return jax.lax.map(run, jax.random.split(key, num_runs))
    return chunking.chunked_map(run, jax.random.split(key, num_runs), chunk)


def block_slq_nodes(
    op,
    key: jax.Array,
    groups=None,
    *,
    num_iters: int = 80,
    num_runs: int = 4,
    skip: tuple[str, ...] = (),
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """SLQ nodes and weights of every diagonal block of ``op`` (``blocks(op, groups)``) in one compiled program.

    Block ``g``'s operator is applied as ``P_g A P_g`` on full-size vectors (``P_g`` the 0/1 mask of the
    group's coordinates), so every block shares one program and one primal pass per product: the blocks'
    Lanczos runs are ``vmap``-ed over the masks (B blocks: B tangents through each product). A run started
    in the block's coordinates stays there, and its nodes and weights are those of ``A_gg``'s spectral
    measure, as ``slq_nodes(blocks(op)[g], ...)`` gives them (equal up to rounding with the same probes).
    Per-block densities: broaden each with ``spectral_density``'s Gaussian, or compare them on one grid
    (Zhang et al. 2024).

    Args:
      op: a curvature operator (not a block).
      key: PRNG key of the probes (the same probes, restricted to each block, for every block).
      groups: the parameter groups, as in ``lsgeo.groups`` (default one per top-level module).
      num_iters: Lanczos steps per run, at most the smallest compared block's size.
      num_runs: probes per block.
      skip: group-name prefixes left out (e.g. ``("ln_",)`` for layer norms).

    Returns:
      ``{name: (nodes [num_runs, num_iters], weights [num_runs, num_iters])}``.

    Cost: ``num_runs * num_iters`` products with B tangents each. Memory: ``B num_runs (num_iters + 1) m``
    (all runs at once) plus the products. The trade-off against one ``slq_nodes`` per block of
    ``blocks(op)`` (restricted products, one compilation per block), measured by
    ``benchmarks/bench_curvature.py`` on a ResNet-18 (width 16, 11 blocks, CPU): this variant compiles once
    (23 s against 24 s for the 11) but runs 14.5x a full-model density, the per-block operators 2.1x; use
    it for small models with many blocks (a transformer's), the per-block operators for deep conv nets.

    Raises:
      ValueError: ``num_iters`` larger than the smallest compared block, no block left.
    """
    from lsgeo import groups as groups_lib  # noqa: PLC0415
    from lsgeo.curvature.operator import CurvatureOperator  # noqa: PLC0415

    if not isinstance(op, CurvatureOperator) or op.block is not None:
        raise TypeError(f"op must be a full curvature operator (not a block), got {type(op).__name__}")
    check_positive_int(num_iters, "num_iters")
    check_positive_int(num_runs, "num_runs")
    ids, names = groups_lib.group_ids(op.params, groups)
    masks = jax.tree_util.tree_map(lambda a, g: np.full(np.shape(a), g), op.params, ids)
    group_of = np.asarray(jax.flatten_util.ravel_pytree(masks)[0])
    chosen = [(g, name) for g, name in enumerate(names) if not name.startswith(tuple(skip))]
    if not chosen:
        raise ValueError(f"skip={skip!r} leaves no block of {names}")
    sizes = {name: int(np.sum(group_of == g)) for g, name in chosen}
    if num_iters > min(sizes.values()):
        raise ValueError(f"num_iters must be <= the smallest compared block ({min(sizes, key=sizes.get)}: "
                         f"{min(sizes.values())} parameters), got {num_iters}")
    stacked = np.stack([(group_of == g).astype(np.float64) for g, _ in chosen])
    nodes, weights = _block_slq(op, key, jnp.asarray(stacked, op.dtype), num_iters, num_runs)
    return {name: (nodes[i], weights[i]) for i, (_, name) in enumerate(chosen)}


@functools.partial(jax.jit, static_argnums=(3, 4))
def _block_slq(op, key, masks, num_iters, num_runs):
    m, dtype = op.size, op.dtype
    probes = jax.random.rademacher(key, (num_runs, m), dtype=dtype)

    def block(mask):
        def run(z):
            alphas, betas = lanczos(lambda u: mask * op.matvec(mask * u), mask * z, num_iters)
            theta, u = tridiagonal_eigh(alphas, betas)
            return theta, jnp.square(u[0]) / num_runs

        return jax.lax.map(run, probes)

    return jax.vmap(block)(masks)


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
    kernel = jax.scipy.stats.norm.pdf(grid[None, :], nodes[:, None], width)
    return grid, jnp.matmul(weights, kernel, precision=_HIGHEST)


def _check_width(width, *, allow_zero: bool):
    if width is None:
        return
    check_sigma(width, "width")
    if not allow_zero and is_concrete(width) and not float(width) > 0:
        raise ValueError(f"width must be None or a broadening > 0 (a standard deviation), got {width!r}")


def spectral_density(
    f,
    params=None,
    batch=None,
    key: jax.Array | None = None,
    *,
    num_iters: int = 80,
    num_runs: int = 4,
    grid: jax.Array | None = None,
    width=None,
    num_points: int = 1000,
    vectors_per_pass: int | None = None,
    reorthogonalize: bool = True,
    basis_memory: str = "device",
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Eigenvalue density of a curvature operator (the Hessian of ``f`` by default) by stochastic Lanczos
    quadrature with Gaussian broadening.

    ``phi(t) = sum_{r,j} tau_rj N(t; theta_rj, width^2)`` with the nodes and weights of ``slq_nodes``
    (Ghorbani, Krishnan, Xiao 2019; Ubaru et al. 2017): a smoothed version of the spectral measure
    ``1/m sum_i delta(t - lambda_i)``, evaluated on the grid (``trapezoid(density, grid)`` is 1 up to
    quadrature error when the grid covers the Ritz values with a few widths to spare, as the default
    grid does; on a grid zoomed onto part of the spectrum it is the mass of that part).

    Args:
      f, params, batch, key: an operator and a key, or an objective, parameters, data and a key.
      num_iters: Lanczos steps per run (capped at ``m``).
      num_runs: independent probes.
      grid: 1-D evaluation points. Default: ``num_points`` points spanning the Ritz values with a
        margin of ``5 width`` on either side.
      width: standard deviation of the broadening, > 0. Default: 1% of the span of the Ritz values.
        Network Hessians have a few large outliers, so the bulk needs a smaller ``width`` to be resolved.
      num_points: size of the default grid.
      vectors_per_pass, reorthogonalize, basis_memory, microbatch_size, devices: as in ``slq_nodes``
        (``reorthogonalize=False``: no basis stored, memory ``O(m)`` per run).

    Returns:
      ``(grid [P], density [P])``.

    Cost: ``num_runs * num_iters`` HVPs plus ``O(num_runs num_iters P)`` for the broadening.
    Memory: ``vectors_per_pass (num_iters + 1) m`` (``3 m`` per run without reorthogonalisation).

    Raises:
      ValueError: ``width <= 0``, a grid that is not 1-D with >= 2 points, bad counts.
    """
    check_positive_int(num_points, "num_points")
    _check_width(width, allow_zero=False)
    if grid is not None and (np.ndim(grid) != 1 or np.shape(grid)[0] < 2):
        raise ValueError(f"grid must be a 1-D array of at least 2 points, got shape {np.shape(grid)}")
    nodes, weights = slq_nodes(
        f, params, batch, key, num_iters=num_iters, num_runs=num_runs, vectors_per_pass=vectors_per_pass,
        reorthogonalize=reorthogonalize, basis_memory=basis_memory, microbatch_size=microbatch_size, devices=devices,
    )
    return _broaden(nodes, weights, grid, width, num_points=num_points)


def _threshold(values, tol, rtol, floor):
    """``max(tol, rtol * max|values|, floor * max|values|)``: eigenvalues below minus this count as negative
    (``floor``: the relative rounding level of the arithmetic, ``rounding_rtol``)."""
    scale = jnp.max(jnp.abs(values))
    dtype = values.dtype
    relative = jnp.maximum(jnp.asarray(rtol, dtype), jnp.asarray(floor, dtype))
    return jnp.maximum(jnp.asarray(tol, dtype), relative * scale)


def saddle_rounding_rtol(size: int, dtype, param_dtype=None) -> float:
    """The relative rounding level, against ``max|lambda|``, under which ``saddle_index`` cannot tell an
    eigenvalue's sign: ``max(size eps(dtype), rounding_rtol(param_dtype))``. ``size``: ``m`` for the exact
    count (the dense matrix is assembled from ``m`` products and ``eigvalsh`` errs by about ``m eps ||H||``:
    4.4e-13 at m = 2000 in float64, 2.4e-4 in float32), the Krylov dimension ``K`` for SLQ (its Ritz values are
    exact to about ``K eps ||A||`` with full reorthogonalisation: 9.5e-6 at K = 80 in float32). ``dtype``: the
    work dtype; ``param_dtype`` (default ``dtype``): the products' dtype (``rounding_rtol``: 7.8e-3 with
    bfloat16 parameters, whatever the work dtype)."""
    return max(float(size * jnp.finfo(dtype).eps), rounding_rtol(dtype if param_dtype is None else param_dtype))


def default_saddle_rtol(exact: bool, m: int, dtype, param_dtype=None) -> float:
    """The default relative threshold of ``saddle_index``: what the computation can resolve.

    Exact (dense ``eigvalsh``): ``saddle_rounding_rtol(m, dtype, param_dtype)``, the rounding of the
    eigenvalues (``m eps`` of the work dtype unless the products' precision is coarser); eigenvalues below it
    are the sign noise of rounding, above it they are counted. SLQ: ``DEFAULT_SADDLE_RTOL = 1e-3``, the
    resolution of a Gauss quadrature node (the large bulk of eigenvalues at zero of a network Hessian has Ritz
    values of either sign at that scale), or the products' rounding where that is coarser (bfloat16).
    """
    if not exact:
        return max(DEFAULT_SADDLE_RTOL, rounding_rtol(dtype if param_dtype is None else param_dtype))
    return saddle_rounding_rtol(m, dtype, param_dtype)


def _resolve_tolerances(tol, rtol, default_rtol):
    for value, name in ((tol, "tol"), (rtol, "rtol")):
        if value is not None:
            check_sigma(value, name)
    if tol is None and rtol is None:
        return 0.0, default_rtol
    return (0.0 if tol is None else tol), (0.0 if rtol is None else rtol)


def saddle_index(
    f,
    params=None,
    batch=None,
    key: jax.Array | None = None,
    *,
    method: str = "auto",
    max_dense: int = 2000,
    tol=None,
    rtol=None,
    num_iters: int = 80,
    num_runs: int = 16,
    width=None,
    vectors_per_pass: int | None = None,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> jax.Array:
    """Saddle index: the fraction of clearly negative eigenvalues of a curvature operator (the Hessian of
    ``f`` by default), ``#{i: lambda_i < -t} / m``.

    0 at a strict local minimum, 1 at a strict local maximum, in between at a saddle (lecture 001,
    Section 1; Dauphin et al. 2014). The threshold is ``t = max(tol, rtol * s, saddle_rounding_rtol * s)``
    with ``s = max_i |lambda_i|`` (the last term: the rounding of the computation, ``m eps`` exact, ``K eps``
    by SLQ, at least the products' ``rounding_rtol``). By default (``tol`` and ``rtol`` both None)
    ``rtol`` is what the computation resolves (``default_saddle_rtol``): ``m eps`` of the work dtype for the
    exact count (rounding noise only: the textbook count of negative eigenvalues, 4.4e-13 relative at
    m = 2000 in float64), ``1e-3`` for the SLQ estimate (the resolution of its quadrature nodes; network
    Hessians have a large bulk at zero whose signs are noise). Passing ``tol`` alone keeps an absolute
    threshold (``tol=0.0``: every negative eigenvalue the arithmetic resolves); passing both takes the
    larger. The rounding floor always applies: an eigenvalue within the computation's rounding of 0 has no
    resolvable sign (with bfloat16 parameters that is at least 7.8e-3 s; float32's eps would claim a
    resolution the products do not have).

    ``method="exact"`` counts the eigenvalues of the dense matrix (``eigvalsh``; ``s`` exact).
    ``method="slq"`` counts the SLQ quadrature nodes below ``-t`` with their weights,
    ``sum_{r,j} tau_rj [theta_rj < -t]`` (``slq_nodes``), and takes ``s`` as the largest ``|node|`` (Lanczos
    finds the extremes first). The Ritz values lie inside ``[lambda_min, lambda_max]`` up to rounding, so
    the count is exact in expectation over probes when ``-t`` falls in a gap of the spectrum, in particular
    0 for a positive semidefinite operator (a null space, a zero operator) and 1 for a negative definite
    one; when ``-t`` falls inside a dense bulk, a run's count is off by at most the weight of its node
    nearest ``-t`` (Gauss quadrature of a step function), a bias that more runs do not remove but more
    ``num_iters`` do. ``width > 0`` instead takes the mass below ``-t`` of the Gaussian-broadened measure
    (``spectral_density``), ``sum tau_rj Phi((-t - theta_rj) / width)``, which smooths that bias but puts
    half of any mass at 0 below 0 when ``width`` exceeds ``t``. ``method="auto"`` is exact when
    ``m <= max_dense``, SLQ otherwise. NaN parameters or data give NaN (never a count of 0).

    Args:
      f, params, batch: an operator, or an objective, parameters and data.
      key: PRNG key for the SLQ probes; required unless the exact path is taken.
      method: ``"auto"``, ``"exact"`` or ``"slq"``.
      max_dense: largest ``m`` for which ``"auto"`` forms the dense matrix.
      tol: absolute threshold >= 0 (see above).
      rtol: threshold relative to ``max|lambda|``, >= 0 (see above).
      num_iters, num_runs, vectors_per_pass: SLQ settings (see ``slq_nodes``).
      width: SLQ broadening (standard deviation, >= 0); ``None`` or 0: the nodes are counted (above).
      microbatch_size, devices: with an objective, the data plan of its ``Hessian``.

    Cost: exact, ``m`` products plus an ``O(m^3)`` ``eigvalsh`` and ``O(m^2)`` memory; SLQ,
    ``num_runs * num_iters`` products and ``vectors_per_pass (num_iters + 1) m`` memory. The
    eigenproblems run in at least float32.

    Raises:
      ValueError: unknown ``method``, ``tol``/``rtol``/``width`` negative or not finite, or ``key``
        missing when the SLQ estimate is needed.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> f = lambda w, b: 0.5 * jnp.sum(b * w**2)  # H = diag(b)
      >>> b = jnp.array([-2.0, -1e-5, 1.0, 3.0])
      >>> float(curvature.saddle_index(f, jnp.ones(4), b)), float(curvature.saddle_index(f, jnp.ones(4), b, rtol=1e-3))
      (0.5, 0.25)
    """
    check_choice(method, "method", SADDLE_METHODS)
    check_nonnegative_int(max_dense, "max_dense")
    _check_width(width, allow_zero=True)
    op, key = resolve(f, params, batch, key, name="saddle_index", microbatch_size=microbatch_size, devices=devices,
                      key_required=False)
    exact = method == "exact" or (method == "auto" and op.size <= max_dense)
    tol, rtol = _resolve_tolerances(tol, rtol, default_saddle_rtol(exact, op.size, op.dtype, op.param_dtype))
    floor = saddle_rounding_rtol(op.size if exact else min(num_iters, op.size), op.dtype, op.param_dtype)
    if exact:
        return _exact_index(op.to_dense(), tol, rtol, floor)
    if key is None:
        raise ValueError(
            f"key must be a PRNG key for the SLQ estimate of the saddle index "
            f"(method={method!r}, m={op.size} > max_dense={max_dense}); got None"
        )
    nodes, weights = slq_nodes(op, key, num_iters=num_iters, num_runs=num_runs, vectors_per_pass=vectors_per_pass)
    return _mass_below(nodes, weights, tol, rtol, floor, width)


def _nan_unless_finite(values, result):
    return jnp.where(jnp.all(jnp.isfinite(values)), result, jnp.nan)


@jax.jit
def _exact_index(h, tol, rtol, floor):
    dtype = jnp.promote_types(h.dtype, jnp.float32)
    h = h.astype(dtype)
    eigs = jnp.linalg.eigvalsh(jnp.where(jnp.isfinite(h), h, 0.0))
    return _nan_unless_finite(h, jnp.mean(eigs < -_threshold(eigs, tol, rtol, floor)))


@jax.jit
def _mass_below(nodes, weights, tol, rtol, floor, width):
    threshold = _threshold(nodes, tol, rtol, floor)
    width = jnp.asarray(0.0 if width is None else width, nodes.dtype)
    z = (-threshold - nodes) / jnp.where(width > 0, width, 1.0)
    below = jnp.where(width > 0, jax.scipy.stats.norm.cdf(z), (nodes < -threshold).astype(nodes.dtype))
    return _nan_unless_finite(nodes, jnp.sum(weights * below))
