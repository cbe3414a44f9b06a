"""Sharpness and flatness of a minimum, and the reparametrisation that fools them (Dinh et al. 2017).

Every measure takes an objective ``f(params, batch) -> scalar`` (the risk R(w) = L(Phi(w)) or any
other), the point ``w = params`` and the data ``batch`` as an argument. Arguments are validated
eagerly, then the computation runs as one ``jax.jit``-compiled program with ``f`` and the integer
options static: calling again with the same ``f`` object and shapes reuses the compilation (a fresh
``lambda`` per call recompiles). All measures can also be used inside the caller's own ``jit``/``vmap``
(``rho``, ``sigma``, ``epsilon``, ``alpha`` may be traced; value checks then apply only to concrete
inputs). ``f`` may be an ``lsgeo.Objective`` (then ``batch=None``): with ``microbatch_size`` the objective is the
data-set value of ``f``, the example-weighted mean over microbatches (values and gradients in the memory of one
microbatch, sharded over ``devices``): ``f`` must then be a mean over examples, BatchNorm in evaluation mode.
``epsilon_sharpness`` and ``average_sharpness`` (shared/DESIGN.md section 3) also take ``microbatch_size=`` and
``devices=`` and build that objective themselves.

  epsilon-sharpness (Keskar et al. 2017)   [max_{||delta|| <= rho} f(w + delta) - f(w)] / (1 + f(w))
  average sharpness                        E_eps[f(w + sigma eps)] - f(w),  eps ~ N(0, I)
  adaptive sharpness (Kwon et al. 2021)    max_{||delta / (|w| + eta)|| <= rho} f(w + delta) - f(w)
  volume eps-flatness (Hochreiter & Schmidhuber 1997; Dinh et al. 2017, Def. 1)
                                           radii r_k of the set {f < f(w) + eps} along random rays

Dinh et al. (2017) show that for ReLU networks all three definitions of flatness that they study
(volume epsilon-flatness, Hessian-based curvature, epsilon-sharpness) can be changed arbitrarily without changing the function
the network computes, by the alpha-scale transform ``alpha_scale``:
T_alpha(theta_i, theta_j) = (alpha theta_i, theta_j / alpha). Adaptive sharpness with ``eta = 0`` is
invariant under it (the perturbation is measured relative to |w|), which ``tests/test_sharpness.py``
checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from lsgeo import groups as groups_lib
from lsgeo.objective import compiled, objective_at
from lsgeo.validation import (
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_sigma,
    is_concrete,
)

PyTree = Any
Objective = Callable[[PyTree, Any], jax.Array]

__all__ = [
    "NORMS",
    "epsilon_sharpness",
    "adaptive_sharpness",
    "average_sharpness",
    "volume_flatness",
    "VolumeFlatness",
    "alpha_scale",
]

NORMS = ("l2", "linf")


def _ascent_direction(g: PyTree, norm: str) -> PyTree:
    """Steepest-ascent unit direction for the ball's norm: g / ||g||_2 (l2) or sign(g) (linf)."""
    if norm == "linf":
        return jax.tree_util.tree_map(jnp.sign, g)
    g_norm = optax.tree.norm(g)
    inv = jnp.where(g_norm > 0, 1.0 / jnp.where(g_norm > 0, g_norm, 1.0), 0.0)
    return optax.tree.scale(inv, g)


def _project(u: PyTree, rho, norm: str) -> PyTree:
    """Euclidean projection onto {||u|| <= rho} (l2: radial shrink; linf: clipping)."""
    if norm == "linf":
        return jax.tree_util.tree_map(lambda x: jnp.clip(x, -rho, rho), u)
    u_norm = optax.tree.norm(u)
    factor = jnp.minimum(1.0, rho / jnp.where(u_norm > 0, u_norm, 1.0))
    return optax.tree.scale(factor, u)


def _uniform_in_ball(key, template: PyTree, rho, norm: str) -> PyTree:
    """A point drawn uniformly from the rho-ball of the given norm, shaped like ``template``."""
    if norm == "linf":
        return optax.tree.scale(rho, _uniform_like(key, template))
    k_dir, k_rad = jax.random.split(key)
    direction = optax.tree.random_like(k_dir, template, jax.random.normal)
    m = optax.tree.size(template)
    radius = rho * jnp.exp(jnp.log(jax.random.uniform(k_rad)) / m)  # r = rho U^(1/m)
    return optax.tree.scale(radius / optax.tree.norm(direction), direction)


def _uniform_like(key, template: PyTree) -> PyTree:
    """U[-1, 1] entries shaped like ``template`` from one flat draw."""
    flat, unravel = ravel_pytree(template)
    return unravel(jax.random.uniform(key, flat.shape, flat.dtype, -1.0, 1.0))


def _maximize_in_ball(g, template: PyTree, rho, *, key, steps: int, norm: str, step_size):
    """max over ||u|| <= rho of g(u) by projected (normalised) gradient ascent; returns the best value seen.

    The start is uniform in the ball when ``key`` is given, else rho times the ascent direction of
    the gradient at u = 0 (the first-order maximiser, SAM's perturbation). The value at u = 0 is
    included, so the result is >= g(0). Cost: ``steps`` gradient evaluations of g (+1 without key),
    plus two evaluations of g.
    """
    zero = optax.tree.zeros_like(template)
    value_and_grad = jax.value_and_grad(g)
    if key is None:
        g0, grad0 = value_and_grad(zero)
        u0 = optax.tree.scale(rho, _ascent_direction(grad0, norm))
    else:
        g0 = g(zero)
        u0 = _uniform_in_ball(key, template, rho, norm)
    u0 = _project(u0, rho, norm)

    def step(carry, _):
        u, best = carry
        value, grad = value_and_grad(u)
        best = jnp.maximum(best, value)
        u = _project(optax.tree.add_scale(u, step_size, _ascent_direction(grad, norm)), rho, norm)
        return (u, best), value

    (u_final, best), _ = jax.lax.scan(step, (u0, g0), None, length=steps)
    return g0, jnp.maximum(best, g(u_final))


def _check_ball_args(rho, steps, norm, step_size):
    check_sigma(rho, "rho")
    check_nonnegative_int(steps, "steps")
    check_choice(norm, "norm", NORMS)
    if step_size is not None:
        check_sigma(step_size, "step_size")


def epsilon_sharpness(
    f: Objective,
    params: PyTree,
    batch,
    rho,
    *,
    key=None,
    steps: int = 10,
    norm: str = "l2",
    step_size=None,
    relative: bool = True,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> jax.Array:
    """Keskar et al.'s (2017) epsilon-sharpness, estimated by projected gradient ascent.

        S_rho(w) = [ max_{||delta|| <= rho} f(w + delta) - f(w) ] / (1 + f(w))

    with ``||.||`` the Euclidean (``norm="l2"``, the form Dinh et al. 2017 analyse) or max
    (``norm="linf"``) norm. Keskar et al. report 100 x this relative quantity (a percentage) and use a
    box scaled by |w| + 1; the factor 100 is omitted here, and ``relative=False`` returns the absolute
    rise max f(w + delta) - f(w).

    The inner maximum is approximated from below by ``steps`` steps of projected normalised gradient
    ascent, delta <- Proj(delta + step_size * d(grad)), with d(g) = g / ||g||_2 (l2) or sign(g) (linf),
    starting uniformly at random in the ball when ``key`` is given and else at rho * d(grad f(w))
    (SAM's first-order maximiser; at an exact critical point, where grad f(w) = 0, pass a ``key``).
    The best value seen (including delta = 0) is returned, so 0 <= result <= the true S_rho.

    Args:
      f: objective ``f(params, batch) -> scalar``.
      params: the point w (any pytree).
      batch: data passed to ``f``.
      rho: radius of the ball, >= 0.
      key: optional PRNG key for a random start.
      steps: number of ascent steps (lax.scan), >= 0.
      norm: ``"l2"`` or ``"linf"``.
      step_size: ascent step length; default ``rho`` (each step may move one radius; the projection
        keeps the iterate feasible).
      relative: divide by 1 + f(w) (Keskar's definition); ``False`` gives the absolute rise.
      microbatch_size: ``None`` or examples per microbatch: f is then the data-set objective, its values
        and gradients the example-weighted means over microbatches, in the memory of one microbatch
        (:mod:`lsgeo.dataplan`; f must be a mean over examples). ``devices``: where they are sharded.

    Cost: ``steps`` (+1 without ``key``) gradients of f, plus two evaluations; memory of one gradient.
    """
    objective = objective_at(f, params, batch, microbatch_size=microbatch_size, devices=devices)
    params, key = objective.place(params, key)
    _check_ball_args(rho, steps, norm, step_size)
    return _epsilon_sharpness(objective, params, rho, key, step_size, steps=steps, norm=norm, relative=relative)


@compiled(static_argnames=("steps", "norm", "relative"))
def _epsilon_sharpness(objective, params, rho, key, step_size, *, steps, norm, relative):
    f = objective.value
    eta = rho if step_size is None else step_size

    def g(delta):
        return f(optax.tree.add(params, delta))

    base, top = _maximize_in_ball(g, params, rho, key=key, steps=steps, norm=norm, step_size=eta)
    rise = top - base
    return rise / (1.0 + base) if relative else rise


def adaptive_sharpness(
    f: Objective,
    params: PyTree,
    batch,
    rho,
    *,
    key=None,
    steps: int = 10,
    eta=0.0,
    norm: str = "l2",
    step_size=None,
    relative: bool = False,
) -> jax.Array:
    """Adaptive (scale-invariant) sharpness of Kwon et al. (2021, ASAM, Definition 3).

        S^adaptive_rho(w) = max_{||T_w^{-1} delta|| <= rho} f(w + delta) - f(w),   T_w = diag(|w| + eta)

    i.e. each coordinate's perturbation is measured relative to the size of that weight. Substituting
    delta = T_w u turns it into a maximum over the plain ball ||u|| <= rho of f(w + (|w| + eta) * u),
    which is computed exactly as in ``epsilon_sharpness`` (projected normalised gradient ascent in u,
    random start with ``key``, else the first-order start; the best value seen is returned).

    With ``eta = 0`` the measure is invariant under any positive elementwise rescaling w -> D w that
    leaves the network function unchanged, in particular Dinh et al.'s alpha-scale transform of a ReLU
    network (``alpha_scale``): f(D(w + |w| u)) = f(w + |w| u) for every u. With ``eta > 0`` the
    invariance is approximate (ASAM uses eta = 0.01 so that zero weights can move).

    Args mirror ``epsilon_sharpness`` (microbatches: ``f`` an ``lsgeo.Objective``); ``eta`` >= 0 is the offset in
    T_w.
    ``relative=True`` divides by 1 + f(w) as Keskar does (ASAM's definition has no denominator; the
    default).

    Cost: ``steps`` (+1 without ``key``) gradients of f, plus two evaluations.
    """
    objective = objective_at(f, params, batch)
    params, key = objective.place(params, key)
    _check_ball_args(rho, steps, norm, step_size)
    check_sigma(eta, "eta")
    return _adaptive_sharpness(objective, params, rho, key, eta, step_size, steps=steps, norm=norm, relative=relative)


@compiled(static_argnames=("steps", "norm", "relative"))
def _adaptive_sharpness(objective, params, rho, key, eta, step_size, *, steps, norm, relative):
    f = objective.value
    step = rho if step_size is None else step_size
    scales = jax.tree_util.tree_map(lambda w: jnp.abs(w) + eta, params)

    def g(u):
        delta = jax.tree_util.tree_map(jnp.multiply, scales, u)
        return f(optax.tree.add(params, delta))

    base, top = _maximize_in_ball(g, params, rho, key=key, steps=steps, norm=norm, step_size=step)
    rise = top - base
    return rise / (1.0 + base) if relative else rise


def average_sharpness(
    f: Objective,
    params: PyTree,
    batch,
    sigma,
    key,
    *,
    num_samples: int = 16,
    draws_per_pass: int = 16,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> jax.Array:
    """Average (Gaussian) sharpness: E_eps[f(w + sigma eps)] - f(w), eps ~ N(0, I).

    The Monte Carlo mean over ``num_samples`` draws (unbiased). For a quadratic f with Hessian H at a
    minimum it is sigma^2 tr(H) / 2, against the worst case rho^2 lambda_max(H) / 2 of
    ``epsilon_sharpness(..., relative=False)`` (Keskar et al. 2017; the seed's "E[L(theta + eps)]"
    measure). It equals R_sigma(w) - R(w) of ``lsgeo.risk.perturbed_risk`` with full noise.

    Cost: ``num_samples + 1`` evaluations of f, ``draws_per_pass`` at a time (``lax.map``), memory of
    ``draws_per_pass`` parameter copies. ``microbatch_size``: the data-set objective by microbatches, as in
    ``epsilon_sharpness``.
    """
    objective = objective_at(f, params, batch, microbatch_size=microbatch_size, devices=devices)
    params, key = objective.place(params, key)
    check_sigma(sigma, "sigma")
    check_positive_int(num_samples, "num_samples")
    check_positive_int(draws_per_pass, "draws_per_pass")
    return _average_sharpness(objective, params, sigma, key, num_samples=num_samples, draws_per_pass=draws_per_pass)


@compiled(static_argnames=("num_samples", "draws_per_pass"))
def _average_sharpness(objective, params, sigma, key, *, num_samples, draws_per_pass):
    f = objective.value
    base = f(params)
    keys = jax.random.split(key, num_samples)

    def one(k):
        eps = optax.tree.random_like(k, params, jax.random.normal)
        return f(optax.tree.add_scale(params, sigma, eps))

    values = jax.lax.map(one, keys, batch_size=min(draws_per_pass, num_samples))
    return jnp.mean(values) - base


class VolumeFlatness(NamedTuple):
    """Result of ``volume_flatness``.

    radii:       [K] the radius r_k of the region {f < f(w) + epsilon} along each unit direction d_k
                 (capped at ``max_radius``).
    mean_radius: the mean of ``radii``.
    log_volume:  log of the Monte Carlo estimate V_m * mean_k r_k^m of the volume of the star-shaped
                 region {w + r d : r < r(d)} in m dimensions (V_m the unit-ball volume). A proxy:
                 dominated by the largest radius when m is large.
    """

    radii: jax.Array
    mean_radius: jax.Array
    log_volume: jax.Array


def volume_flatness(
    f: Objective,
    params: PyTree,
    batch,
    epsilon,
    key,
    *,
    num_directions: int = 16,
    max_radius=1.0,
    num_grid: int = 8,
    iters: int = 20,
    directions_per_pass: int = 16,
) -> VolumeFlatness:
    """Volume epsilon-flatness along random directions (Hochreiter & Schmidhuber 1997; Dinh et al. 2017).

    Dinh et al. (Definition 1) measure flatness by the volume of C(f, w, epsilon), the largest connected
    set containing w on which f < f(w) + epsilon. Along K directions d_k uniform on the unit sphere this
    estimates the radius

        r_k = sup{ r in [0, max_radius] : f(w + s d_k) - f(w) <= epsilon for all s <= r }

    (the first crossing), by evaluating f on ``num_grid`` equally spaced radii in (0, max_radius] and
    bisecting ``iters`` times inside the first grid cell that crosses (lax.fori_loop). A direction
    that never crosses gets ``max_radius``; crossings between grid points that re-enter the set before
    the next grid point are missed. The region {w + r d : r < r(d)} is star-shaped and inside C.
    Dinh et al. show that for ReLU networks C has infinite volume (alpha-scaling); ``max_radius``
    keeps the estimate finite.

    Returns ``VolumeFlatness(radii [K], mean_radius, log_volume)``.

    Cost: K * (num_grid + iters) + 1 evaluations of f, directions ``directions_per_pass`` at a time.
    ``f`` an ``lsgeo.Objective`` (``batch=None``): the data-set objective by microbatches, as in ``epsilon_sharpness``.
    """
    objective = objective_at(f, params, batch)
    params, key = objective.place(params, key)
    check_sigma(epsilon, "epsilon")
    check_positive_int(num_directions, "num_directions")
    check_positive_int(num_grid, "num_grid")
    check_nonnegative_int(iters, "iters")
    check_positive_int(directions_per_pass, "directions_per_pass")
    check_sigma(max_radius, "max_radius")
    if is_concrete(max_radius) and not np.asarray(max_radius) > 0:
        raise ValueError(f"max_radius must be > 0, got {max_radius!r}")
    return _volume_flatness(
        objective, params, epsilon, key, max_radius,
        num_directions=num_directions, num_grid=num_grid, iters=iters, directions_per_pass=directions_per_pass,
    )


@compiled(static_argnames=("num_directions", "num_grid", "iters", "directions_per_pass"))
def _volume_flatness(objective, params, epsilon, key, max_radius, *, num_directions, num_grid, iters, directions_per_pass):
    f = objective.value
    base = f(params)
    keys = jax.random.split(key, num_directions)
    grid = max_radius * jnp.arange(1, num_grid + 1) / num_grid

    def excess(r, d):
        return f(optax.tree.add_scale(params, r, d)) - base - epsilon

    def radius(k):
        n = optax.tree.random_like(k, params, jax.random.normal)
        d = optax.tree.scale(1.0 / optax.tree.norm(n), n)
        above = jax.vmap(lambda r: excess(r, d))(grid) > 0
        crosses = jnp.any(above)
        first = jnp.argmax(above)
        hi = grid[first]
        lo = jnp.where(first > 0, grid[jnp.maximum(first - 1, 0)], 0.0).astype(hi.dtype)

        def bisect(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            inside = excess(mid, d) <= 0
            return jnp.where(inside, mid, lo), jnp.where(inside, hi, mid)

        lo, _ = jax.lax.fori_loop(0, iters, bisect, (lo, hi))
        return jnp.where(crosses, lo, jnp.asarray(max_radius, hi.dtype))

    radii = jax.lax.map(radius, keys, batch_size=min(directions_per_pass, num_directions))
    m = optax.tree.size(params)
    log_unit_ball = 0.5 * m * math.log(math.pi) - math.lgamma(0.5 * m + 1.0)
    log_r = jnp.log(jnp.maximum(radii, jnp.finfo(radii.dtype).tiny))
    log_volume = log_unit_ball + jax.scipy.special.logsumexp(m * log_r) - math.log(num_directions)
    return VolumeFlatness(radii=radii, mean_radius=jnp.mean(radii), log_volume=log_volume)


def _resolve_group(index, names: list[str], name: str) -> int:
    if isinstance(index, str):
        if index not in names:
            raise ValueError(f"{name} must be a group index or one of the group names {names}, got {index!r}")
        return names.index(index)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise ValueError(f"{name} must be an int group index or a group name, got {index!r}")
    if not -len(names) <= index < len(names):
        raise ValueError(f"{name} must be in [0, {len(names)}) (groups {names}), got {index}")
    return int(index) % len(names)


def _is_bias(path) -> bool:
    """A flax bias: the last key is ``"bias"`` (linen), or ``"bias"`` then ``"value"`` (an ``nnx.State``)."""
    return bool(path) and (path[-1] == "bias" or (len(path) > 1 and path[-2:] == ("bias", "value")))


def alpha_scale(params: PyTree, i, j, alpha, *, groups=None) -> PyTree:
    """Dinh et al.'s (2017) alpha-scale transform T_alpha: (theta_i, theta_j) -> (alpha theta_i, theta_j / alpha).

    For a ReLU network, phi(x (alpha W_i) + alpha b_i) = alpha phi(x W_i + b_i) for alpha > 0, so if
    layer j consumes the output of layer i, scaling layer i up by alpha and layer j's weights down by
    alpha leaves the network function unchanged, while the Hessian at the new point is
    D^{-1} H D^{-1} with D = alpha on layer i's leaves and 1/alpha on layer j's scaled leaves: its
    diagonal block for layer i is multiplied by alpha^{-2} and that of layer j's kernel by alpha^2
    (Dinh et al., Section 4), so sharpness can be made arbitrarily large or small.

    Exactly which leaves are scaled:
      * group ``i``: every leaf (a flax Dense/Conv ``kernel`` and ``bias``) times ``alpha``; the bias
        must scale with the kernel so that the pre-activation, and hence the ReLU pattern, scales by
        alpha;
      * group ``j``: every leaf except biases (last path key ``"bias"``, or ``("bias", "value")`` in an
        ``nnx.State``) times ``1 / alpha``
        (a flax ``kernel``; layer j's bias is added after the product and stays as it is);
      * all other leaves unchanged.

    ``i`` and ``j`` are group indices in ``lsgeo.groups.group_ids(params, groups)`` order (negative
    indices count from the end) or group names (e.g. ``"Dense_0"``). ``groups`` as in ``lsgeo.groups``
    (default: one group per top-level module). ``alpha`` must be > 0 (checked when concrete; may be
    traced, e.g. vmapped). The function is unchanged only when layer j directly follows layer i through
    a positively homogeneous activation (ReLU, leaky ReLU, identity) with no normalisation in between.
    """
    ids, names = groups_lib.group_ids(params, groups)
    gi = _resolve_group(i, names, "i")
    gj = _resolve_group(j, names, "j")
    if gi == gj:
        raise ValueError(f"i and j must name different groups, both are {names[gi]!r}")
    if is_concrete(alpha):
        value = np.asarray(alpha)
        if value.ndim != 0 or not np.isfinite(value) or value <= 0:
            raise ValueError(f"alpha must be a finite scalar > 0, got {alpha!r}")
    paths = groups_lib.leaf_paths(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out = []
    for leaf, gid, path in zip(leaves, jax.tree_util.tree_leaves(ids), paths):
        if gid == gi:
            leaf = (leaf * alpha).astype(jnp.result_type(leaf))
        elif gid == gj and not _is_bias(path):
            leaf = (leaf / alpha).astype(jnp.result_type(leaf))
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)
