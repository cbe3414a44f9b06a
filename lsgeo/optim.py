"""Noise injection as an optax transformation (Orvieto et al., AISTATS 2023, Sections 3.2, 4 and 5).

The step the paper runs is

    w_{t+1} = w_t - lr * grad R(w_t + xi_t),

with xi_t Gaussian: ``mode="full"`` perturbs every parameter by sigma * eps (Section 3.1);
``mode="layerwise"`` perturbs one group ("layer") j_t by sigma * sqrt(M) * eps and leaves the other
M - 1 groups alone (Sections 3.2 and 4), with j_t uniform at random (``selection="random"``) or in
turn (``selection="cyclic"``). Both have E[xi xi^T] = sigma^2 I; the layer-wise one avoids the
sigma^4 cross terms that explode with width.

The perturbed-point trick (as ``optax.contrib.sam``): the parameters the training loop holds are
z_t = w_t + xi_t, so the gradient the loop computes anyway is grad R(w_t + xi_t). The state stores
xi_t; ``update(g, state, params=z_t)`` recovers w_t = z_t - xi_t, passes w_t to the inner optimizer
(weight decay sees the clean weights), draws xi_{t+1} and returns

    inner_update(g; w_t) + xi_{t+1} - xi_t,

so that z_{t+1} = w_{t+1} + xi_{t+1}. ``init`` applies no perturbation (xi_0 = 0): the ordinary loop
that starts at w_0 runs the paper's step from its first update on (the first gradient is at w_0,
every later one at a perturbed point), with no helper to call first:

    >>> import jax, jax.numpy as jnp, optax
    >>> f = lambda w: jnp.sum(w ** 2)
    >>> opt = noise_injection(optax.sgd(0.1), sigma=0.05, mode="full", seed=0)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = opt.init(params)                       # xi_0 = 0: params is w_0
    >>> for _ in range(3):
    ...     updates, state = opt.update(jax.grad(f)(params), state, params)
    ...     params = optax.apply_updates(params, updates)   # z_{t+1} = w_{t+1} + xi_{t+1}
    >>> print(clean_params(params, state).round(3))    # w_3, for evaluation
    [0.523 1.018]

A flax ``TrainState(tx=noise_injection(...))`` or an ``nnx.Optimizer`` works the same way.
``noise_injection`` must be the OUTERMOST transformation: anything chained after it
(``optax.chain(noise_injection(...), optax.scale(0.5))``) would rescale xi_{t+1} - xi_t and the
loop's point would drift away from w_t + xi_t. Transformations of the gradient go inside ``inner`` or
before it (``optax.chain(optax.clip_by_global_norm(1.0), noise_injection(...))`` is fine).
:func:`clean_params` (and ``lsgeo.train``) raise ValueError when they find a noise-injection state
with a transformation chained after it. With sigma = 0 it reproduces ``inner`` exactly.

Randomness (deterministic, reproducible with ``lsgeo.perturbation``): ``seed`` (an int, possibly
traced, or a PRNG key) gives the base key k = fold_in(key(seed), STREAMS["noise"]) (:mod:`lsgeo.streams`:
disjoint from the initialisation and data streams of the same seed). For step t >= 1,

    k_t = fold_in(k, t);  k_select, k_noise = split(k_t)
    j_t = randint(k_select, (), 0, M)   (random)   or   (t - 1) mod M   (cyclic)
    xi_t = lsgeo.perturbation.perturbation(k_noise, w_t, sigma_t, mode=mode, group=j_t, groups=groups,
                                           scale_by_num_groups=scale_by_num_groups)

with sigma_t = sigma(t) for an optax schedule, else sigma. ``sigma`` and ``seed`` may be traced, so a
whole training run can be ``vmap``-ped over sigma values and seeds (``lsgeo.train.sweep``).
Cost per step: one Gaussian draw of the size of the parameters (``optax.tree.random_like``; layer-wise
noise keeps the chosen group's part) plus three elementwise passes; memory: one extra copy of the
parameters (xi_t).
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import SAMState

from lsgeo import groups as groups_lib
from lsgeo import streams
from lsgeo.perturbation import MODES, perturbation
from lsgeo.validation import check_choice, check_same_structure, check_sigma

PyTree = Any

__all__ = [
    "NoiseInjectionState",
    "noise_injection",
    "noise_key",
    "clean_params",
    "perturbed_params",
    "noise_states",
    "check_outermost",
    "SELECTIONS",
]

SELECTIONS = ("random", "cyclic")


class NoiseInjectionState(NamedTuple):
    """State of :func:`noise_injection`.

    Attributes:
      count: number of updates t done so far (int32); xi_t belongs to this t.
      key: raw key data (``jax.random.key_data``) of the base key; vmaps like any array.
      group: the group j_t perturbed by xi_t (int32); -1 for ``mode="full"`` and at t = 0.
      xi: the perturbation xi_t currently added to the parameters the loop holds (zero at t = 0).
      inner_state: state of the wrapped optimizer.
    """

    count: jax.Array
    key: jax.Array
    group: jax.Array
    xi: PyTree
    inner_state: optax.OptState


def noise_key(seed) -> jax.Array:
    """Raw key data of the base key k of :func:`noise_injection` for ``seed``.

    ``seed``: a Python/numpy/jax integer in [-2**31, 2**32) (may be traced), a typed PRNG key, or raw
    uint32 key data. k is the ``"noise"`` subtree of the seed's key (:mod:`lsgeo.streams`), disjoint from
    the initialisation and data streams that ``lsgeo.train`` derives from the same seed.
    """
    streams.check_seed(seed, "seed")
    return jax.random.key_data(streams.stream(seed, "noise"))


def _check_float_leaves(params) -> None:
    """Gaussian noise needs floating-point leaves: ValueError naming the first other one (static: dtypes only).
    An empty tree is fine (``optax.masked`` may route every leaf elsewhere)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"params leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}: noise_injection adds "
                f"Gaussian noise, so parameters must be floating point (mask integer leaves out with optax.masked)"
            )


def noise_injection(
    inner: optax.GradientTransformation,
    sigma,
    *,
    mode: str = "layerwise",
    selection: str = "random",
    groups=None,
    scale_by_num_groups: bool = True,
    seed=0,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that gradients are taken at w_t + xi_t (Orvieto et al. 2023, Section 5).

    The paper's step w_{t+1} = w_t - lr grad R(w_t + xi_t) at no extra gradient: the loop holds
    z_t = w_t + xi_t (z_0 = w_0: no perturbation before the first update), the update passes
    w_t = z_t - xi_t to ``inner`` and returns ``inner_update + xi_{t+1} - xi_t``. Evaluate at
    :func:`clean_params`. Must be the outermost transformation. See the module docstring.

    Args:
      inner: the optimizer to wrap (e.g. ``optax.sgd(lr)``, ``optax.adamw(lr, weight_decay=...)``,
        ``optax.inject_hyperparams(optax.sgd)(learning_rate=lr)``). Extra update arguments (e.g.
        ``grad_fn``) are forwarded to it.
      sigma: noise scale: a float >= 0, a (possibly traced) jax scalar, or an optax schedule
        ``count -> sigma_t`` (e.g. ``optax.piecewise_constant_schedule(0.1, {T: 0.0})`` turns the
        noise off from step T on).
      mode: ``"layerwise"`` (one group, std sigma sqrt(M)) or ``"full"`` (all parameters, std sigma).
      selection: ``"random"`` (j_t uniform) or ``"cyclic"`` (j_t = (t - 1) mod M); layer-wise only.
      groups: group specification (``None``: top-level modules; ``"leaf"``; callable on the path).
      scale_by_num_groups: multiply the layer-wise noise by sqrt(M).
      seed: int (may be traced), PRNG key or raw key data.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`NoiseInjectionState`.
      ``update`` requires ``params`` (the point z_t the loop holds).
    """
    check_choice(mode, "mode", MODES)
    check_choice(selection, "selection", SELECTIONS)
    check_sigma(sigma)
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
    inner = optax.with_extra_args_support(inner)
    noise_key(seed)  # validates seed early

    def draw(key_data, count, params):
        """(j_t, xi_t) for step t = count >= 1."""
        k_select, k_noise = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key_data), count))
        sigma_t = sigma(count) if callable(sigma) else sigma
        if mode == "full":
            return jnp.asarray(-1, jnp.int32), perturbation(k_noise, params, sigma_t, mode="full")
        num_groups = len(groups_lib.group_names(params, groups))
        if selection == "random":
            group = jax.random.randint(k_select, (), 0, num_groups, dtype=jnp.int32)
        else:
            group = ((count - 1) % num_groups).astype(jnp.int32)
        xi = perturbation(
            k_noise, params, sigma_t, mode="layerwise", group=group, groups=groups, scale_by_num_groups=scale_by_num_groups
        )
        return group, xi

    def init_fn(params):
        _check_float_leaves(params)
        groups_lib.group_ids(params, groups)  # validates ``groups`` early
        return NoiseInjectionState(
            count=jnp.zeros((), jnp.int32),
            key=noise_key(seed),
            group=jnp.asarray(-1, jnp.int32),
            xi=optax.tree.zeros_like(params),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("params (the point z_t the loop holds) must be passed to update")
        check_same_structure(params, state.xi, "params", "the noise state xi")
        clean = optax.tree.sub(params, state.xi)
        inner_updates, inner_state = inner.update(updates, state.inner_state, clean, **extra_args)
        count = optax.safe_increment(state.count)
        group, xi = draw(state.key, count, clean)
        new_updates = jax.tree_util.tree_map(
            lambda u, new, old: (u + (new - old)).astype(u.dtype), inner_updates, xi, state.xi
        )
        return new_updates, NoiseInjectionState(count=count, key=state.key, group=group, xi=xi, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_wrapper_state(x) -> bool:
    return isinstance(x, (NoiseInjectionState, SAMState))


def noise_states(opt_state) -> list[NoiseInjectionState]:
    """All :class:`NoiseInjectionState` found in ``opt_state`` (outermost first)."""
    found = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, NoiseInjectionState))
    return [s for s in found if isinstance(s, NoiseInjectionState)]


def check_outermost(opt_state) -> None:
    """Raises ValueError when a transformation is chained after ``noise_injection`` in ``opt_state``.

    ``optax.chain`` keeps its states in a plain tuple, in order: a :class:`NoiseInjectionState` (at
    any depth) followed by another entry of the same chain means that transformation rescales or
    shifts xi_{t+1} - xi_t. Wrappers that pass the updates through (``optax.inject_hyperparams``,
    ``optax.apply_if_finite``) are fine. Static: costs nothing under ``jit``.
    """

    def visit(node, where: str) -> None:
        if type(node) is tuple:  # an optax.chain state
            for i, part in enumerate(node[:-1]):
                if noise_states(part):
                    raise ValueError(
                        f"noise_injection must be the outermost transformation: its state is entry {i} of an "
                        f"optax.chain state ({where}) with {len(node) - 1 - i} transformation(s) chained after it, "
                        f"which would rescale the noise xi_(t+1) - xi_t; put them inside noise_injection(inner)"
                    )
        children = jax.tree_util.tree_leaves(node, is_leaf=lambda x: x is not node)  # one level down
        for i, child in enumerate(children):
            if child is not node and noise_states(child):
                visit(child, f"{where}/{i}")

    visit(opt_state, "opt_state")


def _is_variable(x) -> bool:
    """Whether ``x`` is a flax ``nnx.Variable`` (``nnx.Param``, the optimizer's ``OptVariable``...); flax is
    not imported for this: without ``flax.nnx`` loaded there are none."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def _is_stop(x) -> bool:
    return isinstance(x, optax.MaskedNode) or _is_variable(x)


def _shift(params: PyTree, xi: PyTree, sign: int) -> PyTree:
    """``params + sign * xi`` with the structure of ``params``, where ``xi`` is the noise state's tree.

    ``xi`` may differ from ``params`` in two ways that hold no information: ``optax.MaskedNode`` where
    ``optax.masked`` / ``optax.multi_transform`` route a subtree to another transformation (that subtree
    carries no noise: kept as is), and the ``nnx.Variable`` type around each array (an ``nnx.Optimizer``
    boxes its state in ``OptVariable`` while the model holds ``nnx.Param``). Anything else is a ValueError
    naming ``params``.
    """
    xi_parts, xi_def = jax.tree_util.tree_flatten(xi, is_leaf=_is_stop)
    try:
        parts = xi_def.flatten_up_to(params)
    except (ValueError, TypeError):
        parts = None
    if parts is None:
        raise ValueError(
            f"params must have the same pytree structure as the noise state xi (the parameters the optimizer "
            f"was initialised with); got {jax.tree_util.tree_structure(params)}, expected {xi_def}"
        )
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(xi, is_leaf=_is_stop)[0]]
    out = []
    for path, x, p in zip(paths, xi_parts, parts):
        if isinstance(x, optax.MaskedNode):
            out.append(p)
            continue
        x_leaves, p_leaves = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(p)
        p_def = jax.tree_util.tree_structure(p, is_leaf=_is_variable)
        if len(x_leaves) != 1 or len(p_leaves) != 1 or not (p_def.num_nodes == 1 and p_def.num_leaves == 1):
            raise ValueError(
                f"params at {jax.tree_util.keystr(path)} must be one array as in the noise state xi, got "
                f"{jax.tree_util.tree_structure(p)}"
            )
        if np.shape(x_leaves[0]) != np.shape(p_leaves[0]):
            raise ValueError(
                f"params leaf {jax.tree_util.keystr(path)} has shape {np.shape(p_leaves[0])}, expected "
                f"{np.shape(x_leaves[0])} as in the noise state xi"
            )
        noise = x_leaves[0]
        out.append(jax.tree_util.tree_map(lambda a: a + noise if sign > 0 else a - noise, p))
    return xi_def.unflatten(out)


def _select_cache(params, state: SAMState):
    """Transparent-mode SAM holds the adversarial point between syncs; its cache is the real iterate."""
    steps = state.steps_since_sync

    def pick(p, c):
        cond = jnp.reshape(steps == 0, jnp.shape(steps) + (1,) * (jnp.ndim(p) - jnp.ndim(steps)))
        return jnp.where(cond, p, c)

    return jax.tree_util.tree_map(pick, params, state.cache)


def clean_params(params: PyTree, opt_state) -> PyTree:
    """The unperturbed iterate w_t behind the point ``params`` = z_t a training loop holds.

    Subtracts xi_t of every :class:`NoiseInjectionState` in ``opt_state``; for transparent-mode
    ``optax.contrib.sam`` between synchronisations, returns the cached outer iterate instead of the
    adversarial point. Any other state: ``params`` unchanged. Works on stacked (vmapped) states, with
    noise on part of the tree (``optax.multi_transform`` / ``optax.masked``: the subtrees where xi holds
    ``optax.MaskedNode`` carry no noise) and with what an nnx user holds:
    ``clean_params(nnx.state(model, nnx.Param), optimizer.opt_state)`` for an ``nnx.Optimizer`` returns
    an ``nnx.State`` of ``nnx.Param`` (``nnx.update(model, w)`` puts it back).

    Raises:
      ValueError: ``params`` does not match the parameters the state was built for, or a
        transformation is chained after ``noise_injection`` (see :func:`check_outermost`).
    """
    check_outermost(opt_state)
    for state in noise_states(opt_state):
        params = _shift(params, state.xi, -1)
    sams = [
        s
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_wrapper_state)
        if isinstance(s, SAMState) and s.cache is not None
    ]
    for state in sams:
        check_same_structure(state.cache, params, "params", "the SAM cache")
        params = _select_cache(params, state)
    return params


def perturbed_params(params: PyTree, opt_state) -> PyTree:
    """The point z_t = w_t + xi_t a training loop holds, from the clean ``params`` w_t.

    The inverse of :func:`clean_params` for noise states. Not needed to start a loop (``init`` has
    xi_0 = 0, so z_0 = w_0); useful to rebuild the loop's point from a saved w_t and state.
    Raises ValueError on mismatched pytrees.
    """
    for state in noise_states(opt_state):
        params = _shift(params, state.xi, +1)
    return params
