"""Gaussian weight perturbations xi of Orvieto et al. (AISTATS 2023): full and layer-wise.

- ``mode="full"``:      xi = sigma * eps, eps ~ N(0, I) on every parameter (Section 2.1).
- ``mode="layerwise"``: xi = sigma * sqrt(M) * eps on the parameters of one group j, zero elsewhere
  (Sections 3.2 and 4). Averaging over j uniform in {0..M-1} gives E[xi xi^T] = sigma^2 I, the same
  second moment as full noise, without the sigma^4 cross terms that explode with width.
  ``scale_by_num_groups=False`` drops the sqrt(M).

eps is ``optax.tree.random_like(key, params, jax.random.normal)`` (one key per leaf, split from
``key``), so the layer-wise xi equals the full one restricted to group j and rescaled.
Cost: full noise, one Gaussian draw of the size of ``params``. Layer-wise noise draws only group j's
normals when ``group`` is a Python int, and on CPU when it is traced (``lax.switch`` over the groups:
the leaves outside j become empty, so the per-leaf keys and j's numbers are unchanged); on
accelerators a traced ``group`` draws every normal and masks, since a conditional costs more there
than a draw. Under ``vmap`` over ``group`` every branch runs: one full draw in total. ``group`` may be a
traced integer (jit/scan safe).

Example:
  >>> import jax, jax.numpy as jnp
  >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones((2, 1))}}
  >>> xi = perturbation(jax.random.key(0), params, 0.1, mode="layerwise", group=1)
  >>> float(jnp.abs(xi["Dense_0"]["kernel"]).max()), xi["Dense_1"]["kernel"].shape
  (0.0, (2, 1))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsgeo import groups as groups_lib
from lsgeo.validation import check_choice, check_sigma

__all__ = ["MODES", "perturbation"]

MODES = ("full", "layerwise")


def perturbation(key, params, sigma, *, mode="full", group=None, groups=None, scale_by_num_groups=True):
    """Samples xi shaped like ``params``.

    Args:
      key: PRNG key.
      params: parameter pytree.
      sigma: noise scale, a scalar >= 0 (may be traced).
      mode: ``"full"`` or ``"layerwise"``.
      group: index of the perturbed group for ``"layerwise"`` (int in [-M, M) or a traced int). Required there.
      groups: group specification (see ``lsgeo.groups``).
      scale_by_num_groups: multiply the layer-wise noise by sqrt(M).

    Returns:
      A pytree shaped like ``params``. Cost: one draw of as many normals as ``params`` has.
    """
    check_choice(mode, "mode", MODES)
    check_sigma(sigma)
    if mode == "full":
        eps = optax.tree.random_like(key, params, jax.random.normal)
        return jax.tree_util.tree_map(lambda e: (sigma * e).astype(e.dtype), eps)
    if group is None:
        raise ValueError("group must be given (an int in [0, M)) when mode='layerwise'")
    ids, names = groups_lib.group_ids(params, groups)
    groups_lib.check_group_index(group, len(names))
    std = sigma * jnp.sqrt(float(len(names))) if scale_by_num_groups else sigma
    ids = jax.tree_util.tree_leaves(ids)
    if isinstance(group, (int, np.integer)):
        return _one_group(key, std, params=params, ids=ids, group=int(group) % len(names))
    group = jnp.asarray(group) % len(names)
    branches = [functools.partial(_one_group, params=params, ids=ids, group=j) for j in range(len(names))]  # (key, std)
    return jax.lax.platform_dependent(
        key, group, std,
        cpu=lambda key, group, std: jax.lax.switch(group, branches, key, std),
        default=lambda key, group, std: _masked(key, params, ids, group, std),
    )  # fmt: skip


def _one_group(key, std, *, params, ids, group: int):
    """Only group ``group``'s normals: the other leaves are drawn as empty arrays (same per-leaf keys)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shells = [x if g == group else jnp.zeros((0,), jnp.result_type(x)) for x, g in zip(leaves, ids)]
    eps = jax.tree_util.tree_leaves(optax.tree.random_like(key, jax.tree_util.tree_unflatten(treedef, shells)))
    xi = [(std * e).astype(e.dtype) if g == group else jnp.zeros(jnp.shape(x), jnp.result_type(x))
          for e, x, g in zip(eps, leaves, ids)]
    return jax.tree_util.tree_unflatten(treedef, xi)


def _masked(key, params, ids, group, std):
    """Every normal drawn, group ``group``'s kept (no conditional)."""
    eps, treedef = jax.tree_util.tree_flatten(optax.tree.random_like(key, params, jax.random.normal))
    xi = [jnp.where(g == group, std * e, jnp.zeros_like(e)).astype(e.dtype) for e, g in zip(eps, ids)]
    return jax.tree_util.tree_unflatten(treedef, xi)
