"""Noise injection as an optax transformation (Orvieto et al., AISTATS 2023, Sections 3.2, 4 and 5).

The step the paper runs is

    w_{t+1} = w_t - lr * grad R(w_t + xi_t),

with xi_t Gaussian: ``mode="full"`` perturbs every parameter by sigma * eps (Section 3.1);
``mode="layerwise"`` perturbs one group ("layer") j_t by sigma * sqrt(M) * eps and leaves the other
M - 1 groups alone (Sections 3.2 and 4), with j_t uniform at random (``selection="random"``) or
t mod M (``selection="cyclic"``). Both have E[xi xi^T] = sigma^2 I; the layer-wise one avoids the
sigma^4 cross terms that explode with width.

How it costs no extra gradient
------------------------------
The parameters the training loop holds are the *perturbed* point z_t = w_t + xi_t, so the
gradient the loop computes anyway is grad R(w_t + xi_t). The optimizer state stores xi_t;
``update(g, state, params=z_t)`` recovers w_t = z_t - xi_t, passes w_t to the inner optimizer
(so weight decay, e.g. ``optax.adamw``, sees the clean weights), draws xi_{t+1} and returns

    inner_update(g; w_t) + xi_{t+1} - xi_t,

so that z_{t+1} = z_t + update = w_{t+1} + xi_{t+1}. A training loop therefore reads::

    opt = noise_injection(optax.sgd(0.1), sigma=0.05, mode="layerwise", seed=0)
    opt_state = opt.init(w0)                      # stores xi_0
    z = perturbed_params(w0, opt_state)           # z_0 = w_0 + xi_0
    for batch in batches:                         # (lax.scan in lsgeo.train)
        g = jax.grad(f)(z, batch)                 # = grad R(w_t + xi_t)
        updates, opt_state = opt.update(g, opt_state, z)
        z = optax.apply_updates(z, updates)
    w = clean_params(z, opt_state)                # w_T, for evaluation

``noise_injection`` must be the outermost transformation (it wraps the whole optimizer): anything
applied after it would rescale xi_{t+1} - xi_t. With sigma = 0 it reproduces ``inner`` exactly.

Randomness (deterministic, reproducible with ``lsgeo.perturbation``)
-------------------------------------------------------------------
``seed`` (an int, possibly traced, or a PRNG key) gives the base key k = ``jax.random.key(seed)``.
For step t (t = 0 at ``init``):

    k_t = fold_in(k, t);  k_select, k_noise = split(k_t)
    j_t = randint(k_select, (), 0, M)      (random)      or  t mod M   (cyclic)
    xi_t = lsgeo.perturbation.perturbation(k_noise, w, sigma_t, mode=mode, group=j_t,
                                           groups=groups, scale_by_num_groups=scale_by_num_groups)

with sigma_t = sigma(t) for an optax schedule, else sigma. (``lsgeo.threefry`` computes these
``jax.random`` functions, bit for bit, without jax's rolled CPU loop.) ``sigma`` and ``seed`` may be traced
(jax arrays), so a whole training run can be ``vmap``ped over sigma values and seeds
(see ``lsgeo.train.sweep``). Cost per step: one Gaussian draw (``lsgeo.threefry.normal``) of the
size of the parameters (``"full"``) or of the chosen group (``"layerwise"`` on CPU; on accelerators
all normals are drawn and masked, which avoids a host-synchronised conditional), plus three
elementwise passes over the parameters; memory: one extra copy of the parameters (xi_t).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import SAMState

from lsgeo import groups as groups_lib
from lsgeo import validation
from lsgeo.perturbation import MODES, perturbation
from lsgeo.validation import check_choice, check_sigma

PyTree = Any

__all__ = [
    "NoiseInjectionState",
    "noise_injection",
    "noise_key",
    "clean_params",
    "perturbed_params",
    "noise_states",
    "SELECTIONS",
]

SELECTIONS = ("random", "cyclic")


class NoiseInjectionState(NamedTuple):
    """State of :func:`noise_injection`.

    Attributes:
      count: number of updates t done so far (int32); xi_t was drawn for this t.
      key: raw key data (``jax.random.key_data``) of the base key; vmaps like any array.
      group: the perturbed group j_t (int32), -1 for ``mode="full"``.
      xi: the perturbation xi_t currently added to the parameters the loop holds.
      inner_state: state of the wrapped optimizer.
    """

    count: jax.Array
    key: jax.Array
    group: jax.Array
    xi: PyTree
    inner_state: optax.OptState


def noise_key(seed) -> jax.Array:
    """Raw key data of the base key of :func:`noise_injection` for ``seed``.

    ``seed``: a Python/jax integer (may be traced), a new-style typed key, or raw uint32 key data.
    """
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(seed)
    arr = jnp.asarray(seed)
    if arr.dtype == jnp.uint32 and arr.ndim == 1:
        return arr
    if arr.ndim != 0 or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"seed must be an integer, a PRNG key or raw key data; got {seed!r}")
    return jax.random.key_data(jax.random.key(arr))


def _sigma_at(sigma, count):
    return sigma(count) if callable(sigma) else sigma


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
    z_t = w_t + xi_t (start it at :func:`perturbed_params` of the clean w_0), the update passes
    w_t = z_t - xi_t to ``inner`` and returns ``inner_update + xi_{t+1} - xi_t``. Evaluate at
    :func:`clean_params`. See the module docstring for the key derivation.

    Args:
      inner: the optimizer to wrap (e.g. ``optax.sgd(lr)``, ``optax.adamw(lr, weight_decay=...)``).
        Extra update arguments (e.g. ``grad_fn``) are forwarded to it.
      sigma: noise scale: a float >= 0, a (possibly traced) jax scalar, or an optax schedule
        ``count -> sigma_t`` (e.g. ``optax.piecewise_constant_schedule(0.1, {T: 0.0})`` turns the
        noise off from step T on).
      mode: ``"layerwise"`` (one group, std sigma sqrt(M)) or ``"full"`` (all parameters, std sigma).
      selection: ``"random"`` (j_t uniform) or ``"cyclic"`` (j_t = t mod M); layer-wise only.
      groups: group specification (``None``: top-level modules; ``"leaf"``; callable on the path).
      scale_by_num_groups: multiply the layer-wise noise by sqrt(M).
      seed: int (may be traced), PRNG key or raw key data.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`NoiseInjectionState`.
      ``update`` requires ``params`` (the perturbed point z_t).
    """
    check_choice(mode, "mode", MODES)
    check_choice(selection, "selection", SELECTIONS)
    if not callable(sigma):
        check_sigma(sigma)
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
    inner = optax.with_extra_args_support(inner)

    def sample(key_data, count, params):
        k_select, k_noise = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key_data), count))
        sigma_t = _sigma_at(sigma, count)
        if mode == "full":
            return jnp.asarray(-1, jnp.int32), perturbation(k_noise, params, sigma_t, mode="full")
        ids, names = groups_lib.group_ids(params, groups)
        num_groups = len(names)
        if selection == "random":
            group = jax.random.randint(k_select, (), 0, num_groups, dtype=jnp.int32)
        else:
            group = (count % num_groups).astype(jnp.int32)
        std = sigma_t * jnp.sqrt(float(num_groups)) if scale_by_num_groups else sigma_t
        return group, _one_group_noise(k_noise, params, ids, num_groups, groups, group, std)

    def init_fn(params):
        groups_lib.group_ids(params, groups)  # validates ``groups`` early
        key_data = noise_key(seed)
        count = jnp.zeros((), jnp.int32)
        group, xi = sample(key_data, count, params)
        return NoiseInjectionState(count=count, key=key_data, group=group, xi=xi, inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("params (the perturbed point z_t the loop holds) must be passed to update")
        validation.check_same_structure(params, state.xi, "params", "the noise state xi")
        clean = optax.tree.sub(params, state.xi)
        inner_updates, inner_state = inner.update(updates, state.inner_state, clean, **extra_args)
        count = optax.safe_increment(state.count)
        group, xi = sample(state.key, count, clean)
        new_updates = jax.tree_util.tree_map(
            lambda u, new, old: (u + (new - old)).astype(u.dtype), inner_updates, xi, state.xi
        )
        return new_updates, NoiseInjectionState(count=count, key=state.key, group=group, xi=xi, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _one_group_noise(key, params, ids, num_groups, groups, group, std):
    """``perturbation(key, params, sigma, mode="layerwise", group=group, ...)``, bit for bit.

    On CPU only the chosen group's normals are drawn (:func:`_switched_group_noise`). Elsewhere
    (GPU, TPU) a conditional costs a host round trip per step while a draw is cheap, so all
    normals are drawn and masked (:func:`_masked_group_noise`).
    """
    static = dict(params=params, ids=ids, num_groups=num_groups, groups=groups)
    return jax.lax.platform_dependent(
        key,
        group,
        std,
        cpu=lambda key, group, std: _switched_group_noise(key, group=group, std=std, **static),
        default=lambda key, group, std: _masked_group_noise(key, group=group, std=std, **static),
    )


def _switched_group_noise(key, *, params, ids, num_groups, groups, group, std):
    """Draws only group j's normals with ``lax.switch``: the leaves outside j become empty arrays,
    so ``perturbation(mode="full")`` splits the key into the same per-leaf keys and draws the same
    numbers for j's leaves. Under ``vmap`` every branch runs: one full draw in total."""
    del groups
    leaves, treedef = jax.tree_util.tree_flatten(params)
    gids = jax.tree_util.tree_leaves(ids)

    def branch(j):
        def draw(key, std):
            masked = [x if g == j else jnp.zeros((0,), x.dtype) for x, g in zip(leaves, gids)]
            xi = jax.tree_util.tree_leaves(perturbation(key, jax.tree_util.tree_unflatten(treedef, masked), std))
            return jax.tree_util.tree_unflatten(
                treedef, [e if g == j else jnp.zeros(jnp.shape(x), x.dtype) for e, x, g in zip(xi, leaves, gids)]
            )

        return draw

    if num_groups == 1:
        return branch(0)(key, std)
    return jax.lax.switch(group, [branch(j) for j in range(num_groups)], key, std)


def _masked_group_noise(key, *, params, ids, num_groups, groups, group, std):
    """Draws every normal and keeps group j's (no conditional): ``perturbation`` itself, with the
    std already scaled."""
    del ids, num_groups
    return perturbation(key, params, std, mode="layerwise", group=group, groups=groups, scale_by_num_groups=False)


def _is_wrapper_state(x) -> bool:
    return isinstance(x, (NoiseInjectionState, SAMState))


def noise_states(opt_state) -> list[NoiseInjectionState]:
    """All :class:`NoiseInjectionState` found in ``opt_state`` (outermost first)."""
    found = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, NoiseInjectionState))
    return [s for s in found if isinstance(s, NoiseInjectionState)]


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
    adversarial point. Any other state: ``params`` unchanged. Works on stacked (vmapped) states.
    Raises ValueError if ``params`` does not match the parameters the state was built for.
    """
    for state in noise_states(opt_state):
        validation.check_same_structure(state.xi, params, "params", "the noise state xi")
        params = optax.tree.sub(params, state.xi)
    sams = [
        s
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_wrapper_state)
        if isinstance(s, SAMState) and s.cache is not None
    ]
    for state in sams:
        validation.check_same_structure(state.cache, params, "params", "the SAM cache")
        params = _select_cache(params, state)
    return params


def perturbed_params(params: PyTree, opt_state) -> PyTree:
    """The point z_t = w_t + xi_t a training loop holds, from the clean ``params`` w_t.

    Call it once after ``opt.init(w0)`` to start the loop at z_0 = w_0 + xi_0. Inverse of
    :func:`clean_params` for noise states. Raises ValueError on mismatched pytrees.
    """
    for state in noise_states(opt_state):
        validation.check_same_structure(state.xi, params, "params", "the noise state xi")
        params = optax.tree.add(params, state.xi)
    return params
