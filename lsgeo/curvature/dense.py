"""The dense Hessian of a small model, one row per Hessian-vector product."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from lsgeo.curvature.operators import DEFAULT_VECTORS_PER_PASS, Hessian

__all__ = ["hessian"]


def hessian(
    f,
    params,
    batch,
    *,
    vectors_per_pass: int = DEFAULT_VECTORS_PER_PASS,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> jax.Array:
    """Dense Hessian ``H = D^2_w f(w, batch)`` of the flattened parameters, shape ``[m, m]``.

    ``Hessian(f, params, batch, ...).to_dense()``: row ``i`` is ``H e_i`` (``jax.flatten_util.ravel_pytree``
    order), ``vectors_per_pass`` rows per vmapped product, in one ``lax.map`` (the passes balanced: fewer
    than one extra row per pass). Small models only. With ``microbatch_size`` every row is the exact
    data-set product (``lsgeo.dataplan``).

    Cost: ``m`` HVPs. Memory: ``O(m^2)`` for the result plus ``vectors_per_pass`` tangents of one backward
    pass (on one microbatch). Computed in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> curvature.hessian(lambda w, b: jnp.sum(b * w**3), jnp.array([1.0, 2.0]), jnp.ones(2)).tolist()
      [[6.0, 0.0], [0.0, 12.0]]
    """
    op = Hessian(f, params, batch, microbatch_size=microbatch_size, devices=devices)
    return op.to_dense(vectors_per_pass=vectors_per_pass)
