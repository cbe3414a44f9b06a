"""Gaussian weight perturbations xi of Orvieto et al. (AISTATS 2023): full and layer-wise.

- ``mode="full"``:      xi = sigma * eps, eps ~ N(0, I) on every parameter (Section 2.1).
- ``mode="layerwise"``: xi = sigma * sqrt(M) * eps on the parameters of one group j, zero elsewhere
  (Sections 3.2 and 4). Averaging over j uniform in {0..M-1} gives E[xi xi^T] = sigma^2 I, the same
  second moment as full noise, without the sigma^4 cross terms that explode with width.
  ``scale_by_num_groups=False`` drops the sqrt(M).

eps is ``optax.tree.random_like(key, params, jax.random.normal)`` (one key per leaf, split from
``key``), so the layer-wise xi equals the full one restricted to group j and rescaled.
Cost: one Gaussian draw of the size of ``params``. ``group`` may be a traced integer (jit/scan safe).

Example:
  >>> import jax, jax.numpy as jnp
  >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones((2, 1))}}
  >>> xi = perturbation(jax.random.key(0), params, 0.1, mode="layerwise", group=1)
  >>> float(jnp.abs(xi["Dense_0"]["kernel"]).max()), xi["Dense_1"]["kernel"].shape
  (0.0, (2, 1))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    eps = optax.tree.random_like(key, params, jax.random.normal)
    if mode == "full":
        return jax.tree_util.tree_map(lambda e: (sigma * e).astype(e.dtype), eps)
    if group is None:
        raise ValueError("group must be given (an int in [0, M)) when mode='layerwise'")
    ids, names = groups_lib.group_ids(params, groups)
    groups_lib.check_group_index(group, len(names))
    group = jnp.asarray(group) % len(names)
    std = sigma * jnp.sqrt(float(len(names))) if scale_by_num_groups else sigma
    return jax.tree_util.tree_map(
        lambda e, gid: jnp.where(gid == group, std * e, jnp.zeros_like(e)).astype(e.dtype), eps, ids
    )
