"""The dense Hessian of a small model, one row per Hessian-vector product."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lsgeo import microbatch
from lsgeo.curvature import chunking, products
from lsgeo.validation import check_positive_int

__all__ = ["hessian"]


def hessian(
    f,
    params,
    batch,
    *,
    chunk_size: int = 256,
    microbatch_size: int | None = None,
    devices: Sequence | None = None,
) -> jax.Array:
    """Dense Hessian ``H = D^2_w f(w, batch)`` of the flattened parameters, shape ``[m, m]``.

    Row ``i`` is ``H e_i`` (``jax.flatten_util.ravel_pytree`` order); the rows are computed ``chunk_size``
    at a time (vmapped) in one ``lax.map``. Small models only. With ``microbatch_size`` every row is the
    exact data-set product (``lsgeo.microbatch``).

    Cost: ``m`` HVPs. Memory: ``O(m^2)`` for the result plus ``chunk_size`` tangents of one backward pass
    (on one microbatch).

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> curvature.hessian(lambda w, b: jnp.sum(b * w**3), jnp.array([1.0, 2.0]), jnp.ones(2)).tolist()
      [[6.0, 0.0], [0.0, 12.0]]
    """
    products.check_objective(f, params)
    check_positive_int(chunk_size, "chunk_size")
    plan = microbatch.make_plan(batch, microbatch_size, devices=devices)
    params, batch = microbatch.place(plan, params, batch)
    return _hessian(f, chunk_size, plan, params, batch)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _hessian(f, chunk_size, plan, params, batch):
    m, param_dtype, _, _ = products.flat_spec(params)
    matvec = products.hessian_matvec(f, params, batch, plan)
    rows = chunking.chunked_map(lambda i: matvec(jax.nn.one_hot(i, m, dtype=param_dtype)), jnp.arange(m), chunk_size)
    return rows
