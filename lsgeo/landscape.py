"""Loss landscapes: filter-normalised directions, 1-D/2-D slices, paths between minima, trajectory PCA.

  random directions    Li et al. (2018, Section 4): Gaussian directions rescaled filter by filter
  slices               f(w + a d) and f(w + a d1 + b d2) on a grid (Li et al., Sections 3-4)
  paths                the line (1-t) a + t b (Goodfellow et al. 2015) and the quadratic Bezier curve
                       (1-t)^2 a + 2t(1-t) bend + t^2 b fitted as in Garipov et al. (2018)
  barrier              max_t f(path(t)) - max(f(a), f(b))
  trajectory PCA       the plane of the top-2 principal directions of an optimisation path
                       (Li et al., Section 7)

Every function that evaluates the objective takes ``f(params, batch) -> scalar`` and the data
``batch`` as arguments, and evaluates grid points with ``lax.map(..., batch_size=points_per_pass)``:
``points_per_pass`` points are vmapped together, so memory is that of ``points_per_pass`` forward passes.
Arguments are validated eagerly; the computation then runs as one ``jax.jit``-compiled program with
``f`` (and ``optimizer``) static, so repeated calls with the same ``f`` object and shapes reuse it.
``f`` may be an ``lsgeo.Objective`` (then ``batch=None``): with ``microbatch_size`` every evaluation of ``f`` is
the data-set value, the example-weighted mean over microbatches of the batch (and gradients likewise, for
``fit_bezier``), in the memory of one microbatch and sharded over ``devices`` (``f`` must be a mean over
examples). ``slice_1d`` and ``slice_2d`` (shared/DESIGN.md section 3) also take ``microbatch_size=`` and
``devices=`` and build that objective themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from lsgeo import validation
from lsgeo.objective import compiled, objective_at
from lsgeo.validation import check_choice, check_float_params, check_positive_int

PyTree = Any
Objective = Callable[[PyTree, Any], jax.Array]

__all__ = [
    "NORMALIZATIONS",
    "random_direction",
    "normalize_direction",
    "slice_1d",
    "slice_2d",
    "interpolate",
    "bezier",
    "path_losses",
    "barrier_height",
    "fit_bezier",
    "trajectory_pca",
    "TrajectoryPCA",
]

NORMALIZATIONS = ("filter", "layer", None)


def _normalize_leaf(d: jax.Array, w: jax.Array, normalization, ignore_1d: bool, eps: float) -> jax.Array:
    if normalization is None:
        return d
    if jnp.ndim(w) <= 1:
        # Li et al.'s ignore='biasbn': biases and BatchNorm parameters do not move; otherwise they
        # follow the weight itself (d = w), as in their code.
        return jnp.zeros_like(d) if ignore_1d else jnp.asarray(w, d.dtype)
    if normalization == "layer":
        return d * (jnp.linalg.norm(w) / (jnp.linalg.norm(d) + eps))
    axes = tuple(range(jnp.ndim(w) - 1))  # every axis but the last (output neurons / channels)
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
    return d * (w_norm / (d_norm + eps))


def normalize_direction(direction: PyTree, params: PyTree, *, normalization="filter", ignore_1d: bool = True,
                        eps: float = 1e-10) -> PyTree:
    """Rescales ``direction`` to the scale of ``params`` (Li et al. 2018, Section 4); see ``random_direction``."""
    check_choice(normalization, "normalization", NORMALIZATIONS)
    validation.check_same_structure(params, direction, "direction")
    return jax.tree_util.tree_map(
        lambda d, w: _normalize_leaf(d, w, normalization, ignore_1d, eps), direction, params
    )


def random_direction(params: PyTree, key, *, normalization="filter", ignore_1d: bool = True) -> PyTree:
    """A random direction d ~ N(0, I) shaped like ``params``, normalised as in Li et al. (2018).

    ``normalization="filter"`` (Li et al.'s filter normalisation, Section 4):
        d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||w_{i,j}||
    for every filter j of every leaf i with ndim >= 2. A filter is a slice along the *last* axis,
    flax's output axis: one output neuron's column of a Dense kernel ``[d_in, d_out]``, one output
    channel of a Conv kernel ``[h, w, c_in, c_out]``. Every filter of the direction then has the norm
    of the matching weight filter, which removes the scale invariance of ReLU/BatchNorm networks
    from the plot.
    ``normalization="layer"``: each leaf with ndim >= 2 is rescaled to the norm of the weight leaf.
    ``normalization=None``: the raw Gaussian on every leaf (no rescaling, biases included).

    Leaves with ndim <= 1 (biases, BatchNorm scale and bias) are set to zero in the direction for
    ``"filter"`` and ``"layer"`` (Li et al.'s default ``ignore='biasbn'``); ``ignore_1d=False`` sets
    them to the weights themselves, as Li et al.'s code does without that option.

    Cost: one Gaussian draw and O(m) arithmetic.
    """
    check_float_params(params)
    check_choice(normalization, "normalization", NORMALIZATIONS)
    return _random_direction(params, key, normalization=normalization, ignore_1d=ignore_1d)


@partial(jax.jit, static_argnames=("normalization", "ignore_1d"))
def _random_direction(params, key, *, normalization, ignore_1d):
    flat, unravel = ravel_pytree(params)  # one flat draw: one generator, cheap to compile
    d = unravel(jax.random.normal(key, flat.shape, flat.dtype))
    return normalize_direction(d, params, normalization=normalization, ignore_1d=ignore_1d)


def _chunk(points_per_pass: int, n: int) -> int:
    check_positive_int(points_per_pass, "points_per_pass")
    return max(1, min(points_per_pass, n))


def _as_grid(values, name: str) -> jax.Array:
    arr = jnp.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of coordinates, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    return arr


def slice_1d(
    f: Objective,
    params: PyTree,
    batch,
    direction: PyTree,
    alphas,
    *,
    points_per_pass: int = 32,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> jax.Array:
    """The 1-D slice [f(w + a d, batch) for a in alphas] (Li et al. 2018, Section 3), shape ``[len(alphas)]``.

    Cost: len(alphas) evaluations of f, ``points_per_pass`` at a time (``lax.map``); ``microbatch_size``: each
    evaluation is the data-set value by microbatches.
    """
    objective = objective_at(f, params, batch, microbatch_size=microbatch_size, devices=devices)
    params, direction = objective.place(params, direction)
    validation.check_same_structure(params, direction, "direction")
    alphas = _as_grid(alphas, "alphas")
    return _slice_1d(objective, params, direction, alphas, points_per_pass=_chunk(points_per_pass, alphas.shape[0]))


@compiled(static_argnames=("points_per_pass",))
def _slice_1d(objective, params, direction, alphas, *, points_per_pass):
    f = objective.value

    def one(a):
        return f(optax.tree.add_scale(params, a, direction))

    return jax.lax.map(one, alphas, batch_size=points_per_pass)


def slice_2d(
    f: Objective,
    params: PyTree,
    batch,
    d1: PyTree,
    d2: PyTree,
    alphas,
    betas,
    *,
    points_per_pass: int = 32,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> jax.Array:
    """The 2-D slice F[i, j] = f(w + alphas[i] d1 + betas[j] d2, batch) (Li et al. 2018, Section 4).

    Returns ``[len(alphas), len(betas)]`` (``matplotlib.contour(betas, alphas, F)`` plots it with
    alpha on the vertical axis). Cost: len(alphas) * len(betas) evaluations of f over the flattened
    grid, ``points_per_pass`` at a time (``lax.map``); memory of ``points_per_pass`` parameter copies (times one
    microbatch with ``microbatch_size``).
    """
    objective = objective_at(f, params, batch, microbatch_size=microbatch_size, devices=devices)
    params, d1, d2 = objective.place(params, d1, d2)
    validation.check_same_structure(params, d1, "d1")
    validation.check_same_structure(params, d2, "d2")
    alphas = _as_grid(alphas, "alphas")
    betas = _as_grid(betas, "betas")
    chunk = _chunk(points_per_pass, alphas.shape[0] * betas.shape[0])
    return _slice_2d(objective, params, d1, d2, alphas, betas, points_per_pass=chunk)


@compiled(static_argnames=("points_per_pass",))
def _slice_2d(objective, params, d1, d2, alphas, betas, *, points_per_pass):
    f = objective.value
    aa, bb = jnp.meshgrid(alphas, betas, indexing="ij")

    def one(ab):
        a, b = ab
        return f(optax.tree.add_scale(optax.tree.add_scale(params, a, d1), b, d2))

    values = jax.lax.map(one, (aa.reshape(-1), bb.reshape(-1)), batch_size=points_per_pass)
    return values.reshape(aa.shape)


def interpolate(params_a: PyTree, params_b: PyTree, t) -> PyTree:
    """The straight line (1 - t) a + t b (Goodfellow et al. 2015); ``t`` a scalar (vmap for many)."""
    validation.check_same_structure(params_a, params_b, "params_b", "params_a")
    return jax.tree_util.tree_map(lambda a, b: ((1 - t) * a + t * b).astype(jnp.result_type(a)), params_a, params_b)


def bezier(params_a: PyTree, bend: PyTree, params_b: PyTree, t) -> PyTree:
    """The quadratic Bezier curve (1-t)^2 a + 2 t (1-t) bend + t^2 b (Garipov et al. 2018, Eq. 3).

    It passes through a at t = 0 and b at t = 1; ``bend`` is its control point (the curve passes
    through (a + 2 bend + b) / 4 at t = 1/2). ``t`` a scalar (vmap for many).
    """
    validation.check_same_structure(params_a, bend, "bend", "params_a")
    validation.check_same_structure(params_a, params_b, "params_b", "params_a")
    c0, c1, c2 = (1 - t) ** 2, 2 * t * (1 - t), t**2
    return jax.tree_util.tree_map(
        lambda a, m, b: (c0 * a + c1 * m + c2 * b).astype(jnp.result_type(a)), params_a, bend, params_b
    )


def _path_point(params_a, params_b, bend, t):
    return interpolate(params_a, params_b, t) if bend is None else bezier(params_a, bend, params_b, t)


def path_losses(
    f: Objective,
    params_a: PyTree,
    params_b: PyTree,
    batch,
    ts,
    *,
    bend: PyTree | None = None,
    points_per_pass: int = 32,
) -> jax.Array:
    """[f(path(t), batch) for t in ts] along the line a -> b (``bend=None``) or the Bezier curve
    through ``bend``. Shape ``[len(ts)]``. Cost: len(ts) evaluations of f, ``points_per_pass`` at a time
    (each the data-set value by microbatches when ``f`` is an ``lsgeo.Objective`` with ``microbatch_size``; then
    ``batch=None``)."""
    objective = objective_at(f, params_a, batch, name="params_a")
    params_a, params_b, bend = objective.place(params_a, params_b, bend)
    validation.check_same_structure(params_a, params_b, "params_b", "params_a")
    if bend is not None:
        validation.check_same_structure(params_a, bend, "bend", "params_a")
    ts = _as_grid(ts, "ts")
    return _path_losses(objective, params_a, params_b, bend, ts, points_per_pass=_chunk(points_per_pass, ts.shape[0]))


@compiled(static_argnames=("points_per_pass",))
def _path_losses(objective, params_a, params_b, bend, ts, *, points_per_pass):
    f = objective.value
    def one(t):
        return f(_path_point(params_a, params_b, bend, t))

    return jax.lax.map(one, ts, batch_size=points_per_pass)


BARRIER_REFERENCES = ("max", "linear")


def barrier_height(
    f: Objective,
    params_a: PyTree,
    params_b: PyTree,
    batch,
    *,
    bend: PyTree | None = None,
    num_points: int = 25,
    reference: str = "max",
    points_per_pass: int = 32,
) -> jax.Array:
    """Height of the loss barrier on the path a -> b (line, or Bezier curve through ``bend``).

    ``reference="max"`` (default):    max_t f(path(t)) - max(f(a), f(b))
        (0 when the path never climbs above the worse end point, the seed's mode-connectivity
        condition f(path(t)) <= max(f(a), f(b)); > 0 is the height of the barrier).
    ``reference="linear"``:           max_t [f(path(t)) - ((1 - t) f(a) + t f(b))]
        (Frankle et al. 2020's barrier against the linear interpolation of the end-point losses).

    t runs over ``num_points`` equally spaced points of [0, 1], end points included, so both forms
    are >= 0; a barrier narrower than the grid spacing can be missed.
    Cost: ``num_points`` evaluations of f (each the data-set value by microbatches for an ``lsgeo.Objective`` ``f``
    with ``microbatch_size``).
    """
    check_choice(reference, "reference", BARRIER_REFERENCES)
    check_positive_int(num_points, "num_points")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2 (the path's end points), got {num_points}")
    ts = jnp.linspace(0.0, 1.0, num_points)
    losses = path_losses(f, params_a, params_b, batch, ts, bend=bend, points_per_pass=points_per_pass)
    f_a, f_b = losses[0], losses[-1]
    if reference == "max":
        return jnp.max(losses) - jnp.maximum(f_a, f_b)
    return jnp.max(losses - ((1 - ts) * f_a + ts * f_b))


def fit_bezier(
    f: Objective,
    params_a: PyTree,
    params_b: PyTree,
    batch,
    key,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    init_bend: PyTree | None = None,
    num_t: int = 8,
) -> tuple[PyTree, jax.Array]:
    """Fits the bend of a quadratic Bezier curve between two minima (Garipov et al. 2018, Section 3).

    Minimises the expected loss along the curve over the control point theta (end points fixed),

        l(theta) = E_{t ~ U(0, 1)} f(bezier(a, theta, b, t), batch),

    by ``num_steps`` steps of ``optimizer`` (any optax transformation) on the Monte Carlo estimate
    with ``num_t`` fresh uniform t per step (Garipov et al. draw one t per minibatch). The loop is a
    ``lax.scan``. ``init_bend`` defaults to the midpoint (a + b) / 2, i.e. the straight line; where the
    objective is symmetric about the segment (toy problems) the line is a critical point of l, so
    start from a slightly displaced bend.
    For a full-data ``batch`` the objective is deterministic except for t; for minibatches, call
    repeatedly with new batches and pass the previous bend as ``init_bend`` (the optimizer state
    restarts in that case).

    Returns ``(bend, losses)`` with ``losses[s]`` the step-s estimate of l (before the update).
    Cost: ``num_steps * num_t`` gradients of f; memory of one gradient per t (vmapped). For an ``lsgeo.Objective``
    ``f`` with ``microbatch_size`` (``batch=None``) each gradient is the data-set gradient, one microbatch at a time.
    """
    objective = objective_at(f, params_a, batch, name="params_a")
    params_a, params_b, key, init_bend = objective.place(params_a, params_b, key, init_bend)
    check_positive_int(num_steps, "num_steps")
    check_positive_int(num_t, "num_t")
    validation.check_same_structure(params_a, params_b, "params_b", "params_a")
    if init_bend is None:
        init_bend = interpolate(params_a, params_b, 0.5)
    else:
        validation.check_same_structure(params_a, init_bend, "init_bend", "params_a")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    return _fit_bezier(objective, params_a, params_b, key, init_bend, optimizer=optimizer, num_steps=num_steps,
                       num_t=num_t)


@compiled(static_argnames=("optimizer", "num_steps", "num_t"))
def _fit_bezier(objective, params_a, params_b, key, init_bend, *, optimizer, num_steps, num_t):
    f = objective.value
    def curve_loss(bend, ts):
        return jnp.mean(jax.vmap(lambda t: f(bezier(params_a, bend, params_b, t)))(ts))

    grad_fn = jax.value_and_grad(curve_loss)

    def step(carry, k):
        bend, opt_state = carry
        ts = jax.random.uniform(k, (num_t,))
        value, grads = grad_fn(bend, ts)
        updates, opt_state = optimizer.update(grads, opt_state, bend)
        return (optax.apply_updates(bend, updates), opt_state), value

    keys = jax.random.split(key, num_steps)
    (bend, _), losses = jax.lax.scan(step, (init_bend, optimizer.init(init_bend)), keys)
    return bend, losses


class TrajectoryPCA(NamedTuple):
    """Result of ``trajectory_pca``.

    directions:                pytree like ``final_params`` with a leading ``[k]`` axis; the k
                               orthonormal principal directions (as one flat vector each).
    explained_variance_ratio:  ``[k]`` fraction of the (centred, unless ``center=False``) variance
                               of the snapshots' offsets captured by each direction.
    coords:                    ``[T, k]`` the coordinates <theta_t - theta_final, d_i> of each
                               snapshot in the plane (the final point at the origin).
    """

    directions: PyTree
    explained_variance_ratio: jax.Array
    coords: jax.Array


def trajectory_pca(snapshots: PyTree, final_params: PyTree, *, num_components: int = 2,
                   center: bool = True) -> TrajectoryPCA:
    """Principal directions of an optimisation trajectory (Li et al. 2018, Section 7).

    Given T snapshots theta_0..theta_{T-1} (a pytree whose leaves carry a leading ``[T]`` axis, e.g.
    ``lsgeo.tree.stack_leaves`` of a list, or the stacked output of a ``lax.scan`` training loop) and
    the final point theta_n, forms M = [theta_0 - theta_n; ...; theta_{T-1} - theta_n] (T x m) and takes
    the top ``num_components`` right singular vectors of M (after subtracting its column mean when
    ``center=True``, as Li et al.'s code does through sklearn's PCA). Returns the directions (unit
    norm, mutually orthogonal), their explained variance ratios s_i^2 / sum_j s_j^2 and the
    trajectory's coordinates in the plane, ``(theta_t - theta_n) . d_i``, ready to overlay on
    ``slice_2d(f, final_params, batch, d_1, d_2, ...)``. Directions are not filter-normalised
    (as in Li et al.). Signs are fixed so that the first snapshot has non-positive coordinates.

    Cost: a thin SVD of a T x m matrix, O(T^2 m) time and O(T m) memory.
    """
    check_positive_int(num_components, "num_components")
    final_leaves, final_def = jax.tree_util.tree_flatten(final_params)
    snap_leaves, snap_def = jax.tree_util.tree_flatten(snapshots)
    if snap_def != final_def:
        raise ValueError(
            f"snapshots must have the pytree structure of final_params with a leading [T] axis; "
            f"got {snap_def}, expected {final_def}"
        )
    lengths = {np.shape(s)[0] if np.ndim(s) > 0 else None for s in snap_leaves}
    for s, w in zip(snap_leaves, final_leaves):
        if np.ndim(s) != np.ndim(w) + 1 or np.shape(s)[1:] != np.shape(w):
            raise ValueError(
                f"snapshots leaves must have shape [T, *leaf.shape] of final_params; got {np.shape(s)} "
                f"for a leaf of shape {np.shape(w)}"
            )
    if len(lengths) != 1:
        raise ValueError(f"snapshots leaves must share the leading [T] axis, got lengths {sorted(lengths)}")
    (num_snapshots,) = lengths
    if num_components > min(num_snapshots, optax.tree.size(final_params)):
        raise ValueError(
            f"num_components must be <= min(T, m) = {min(num_snapshots, optax.tree.size(final_params))}, "
            f"got {num_components}"
        )

    return _trajectory_pca(snapshots, final_params, num_components=num_components, center=center)


@partial(jax.jit, static_argnames=("num_components", "center"))
def _trajectory_pca(snapshots, final_params, *, num_components, center):
    flat_final, unravel = ravel_pytree(final_params)
    offsets = jax.vmap(lambda s: ravel_pytree(s)[0])(snapshots) - flat_final  # [T, m]
    data = offsets - jnp.mean(offsets, axis=0) if center else offsets
    _, s, vt = jnp.linalg.svd(data, full_matrices=False)
    components = vt[:num_components]  # [k, m]
    coords = offsets @ components.T  # [T, k]
    sign = jnp.where(coords[0] > 0, -1.0, 1.0).astype(components.dtype)
    components = components * sign[:, None]
    coords = coords * sign[None, :]
    total = jnp.sum(jnp.square(s))
    ratio = jnp.square(s[:num_components]) / jnp.where(total > 0, total, 1.0)
    directions = jax.vmap(unravel)(components)
    return TrajectoryPCA(directions=directions, explained_variance_ratio=ratio, coords=coords)
