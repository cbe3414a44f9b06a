"""The one memory budget of lsgeo's automatic chunking and the balanced chunked map that respects it.

``MEMORY_BUDGET_BYTES`` decides how many vectors go through one curvature product together
(``lsgeo.curvature.chunking``) and how many examples one chunk of per-example Jacobians or gradients
holds (``lsgeo.per_example``, ``lsgeo.ntk``, the Gauss-Newton diagonal). ``chunked_map`` runs a function
over the rows of an array in equal passes of at most a given number of rows (one compiled body).

Example:
  >>> import jax.numpy as jnp
  >>> from lsgeo.dataplan import chunked_map
  >>> chunked_map(lambda r: 2 * r, jnp.arange(5.0), 2).tolist()
  [0.0, 2.0, 4.0, 6.0, 8.0]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MEMORY_BUDGET_BYTES", "chunked_map", "activation_bytes"]

MEMORY_BUDGET_BYTES = 2**28
"""The one memory budget of lsgeo's automatic chunking (256 MiB)."""


def _jaxpr_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = getattr(var, "aval", None)
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                total += _jaxpr_bytes(inner)
    return total


@functools.lru_cache(maxsize=128)
def _cached_bytes(fn, structs_flat, treedef) -> int:
    args = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in structs_flat])
    return _jaxpr_bytes(jax.make_jaxpr(fn)(*args).jaxpr)


def activation_bytes(fn, *args) -> int:
    """Bytes of all intermediates of one (unfused) evaluation of ``fn(*args)``: an upper bound of the
    activations a backward pass stores. Only shapes are used (a ``jax.make_jaxpr`` trace, no compilation);
    cached per (``fn``, shapes)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    structs = tuple((tuple(np.shape(a)), jnp.result_type(a)) for a in leaves)
    try:
        return _cached_bytes(fn, structs, treedef)
    except TypeError:  # an unhashable fn: no cache
        return _cached_bytes.__wrapped__(fn, structs, treedef)


def chunked_map(fn, xs, max_rows: int, *, batched: bool = False):
    """``fn`` over the rows of ``xs`` (a pytree with a leading axis n), at most ``max_rows`` rows per pass.

    The rows are cut into ``steps = ceil(n / max_rows)`` equal passes of ``ceil(n / steps)`` rows (the
    last row repeated to fill the last pass, fewer than ``steps`` extra rows in all: 257 rows in passes of
    at most 256 run as 2 x 129, not 2 x 256), so that one ``vmap``-ed body is compiled, run by a
    ``lax.map``. ``fn`` maps one row (``batched=False``) or a ``[chunk, ...]`` block of rows
    (``batched=True``, e.g. ``CurvatureOperator.matmat``); padded rows are dropped.

    Cost: ``n`` rows plus fewer than ``steps`` padding rows. Memory: one pass of ``ceil(n / steps)`` rows."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    steps = -(-n // max(1, min(max_rows, n)))
    chunk = -(-n // steps)
    pad = steps * chunk - n
    if pad:
        xs = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), xs)
    blocks = jax.tree_util.tree_map(lambda a: a.reshape(steps, chunk, *a.shape[1:]), xs)
    out = jax.lax.map(fn if batched else jax.vmap(fn), blocks)
    return jax.tree_util.tree_map(lambda a: a.reshape(steps * chunk, *a.shape[2:])[:n], out)
