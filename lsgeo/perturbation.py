"""Gaussian weight perturbations xi of Orvieto et al. (2023): full and layer-wise.

- ``mode="full"``:      xi = sigma * eps, eps ~ N(0, I) on every parameter (Section 2.1).
- ``mode="layerwise"``: xi = sigma * sqrt(M) * eps on the parameters of one group j, zero elsewhere
  (Sections 3.2 and 4). Averaging over j uniform in {0..M-1} gives E[xi xi^T] = sigma^2 I, the same
  second moment as full noise, without the sigma^4 cross terms that explode with width.
  ``scale_by_num_groups=False`` drops the sqrt(M).

Cost: one Gaussian draw of the size of ``params``. ``group`` may be a traced integer (jit/scan safe).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lsgeo import groups as groups_lib
from lsgeo.validation import check_choice, check_sigma

MODES = ("full", "layerwise")


def perturbation(key, params, sigma, *, mode="full", group=None, groups=None, scale_by_num_groups=True):
    """Samples xi shaped like ``params``.

    Args:
      key: PRNG key.
      params: parameter pytree.
      sigma: noise scale, a scalar >= 0 (may be traced).
      mode: ``"full"`` or ``"layerwise"``.
      group: index of the perturbed group for ``"layerwise"`` (int or traced int). Required there.
      groups: group specification (see ``lsgeo.groups``).
      scale_by_num_groups: multiply the layer-wise noise by sqrt(M).
    """
    check_choice(mode, "mode", MODES)
    check_sigma(sigma)
    eps = optax.tree.random_like(key, params, jax.random.normal)
    if mode == "full":
        return jax.tree_util.tree_map(lambda e: (sigma * e).astype(e.dtype), eps)
    if group is None:
        raise ValueError("group must be given (an int in [0, M)) when mode='layerwise'")
    ids, names = groups_lib.group_ids(params, groups)
    std = sigma * jnp.sqrt(float(len(names))) if scale_by_num_groups else sigma
    return jax.tree_util.tree_map(
        lambda e, gid: jnp.where(gid == group, std * e, jnp.zeros_like(e)).astype(e.dtype), eps, ids
    )
