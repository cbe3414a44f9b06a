"""How many vectors go through one curvature product together, and the padded ``lax.map`` that runs them.

Vmapping P probes (or Lanczos runs) through one Hessian-vector product shares the primal forward and
backward pass between them but multiplies the tangent activations by P: on a small model this is the
fast way to run many probes, on a large one it is what exhausts the device memory. ``auto_chunk``
decides from a memory estimate: the bytes of every intermediate of one evaluation of the objective on
one microbatch (a ``jax.make_jaxpr`` trace, no compilation, cached per function and shapes), doubled
for the backward tangents, plus the per-vector state the caller declares (a Lanczos basis). As many
vectors as fit in ``PROBE_BUDGET_BYTES`` go together, at most ``MAX_CHUNK`` and at least one: a
ResNet-18 takes one probe at a time, a small MLP sixteen.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import microbatch
from lsgeo.validation import check_positive_int

PROBE_BUDGET_BYTES = 2**28
MAX_CHUNK = 16


def check_chunk_size(chunk_size, name: str = "chunk_size") -> None:
    """``None`` (automatic) or a positive int."""
    if chunk_size is not None:
        check_positive_int(chunk_size, name)


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
    activations a backward pass stores. Only shapes are used; cached per (``fn``, shapes)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    structs = tuple((tuple(np.shape(a)), jnp.result_type(a)) for a in leaves)
    try:
        return _cached_bytes(fn, structs, treedef)
    except TypeError:  # an unhashable fn: no cache
        return _cached_bytes.__wrapped__(fn, structs, treedef)


def auto_chunk(f, params, batch, plan, num_vectors: int, *, state_bytes_per_vector: int = 0) -> int:
    """Vectors per vmapped product for ``f`` on one microbatch of ``plan`` (the whole batch if None)."""
    per_vector = 2 * activation_bytes(f, params, microbatch.microbatch_struct(batch, plan)) + state_bytes_per_vector
    fits = PROBE_BUDGET_BYTES // max(per_vector, 1)
    return int(max(1, min(num_vectors, MAX_CHUNK, fits)))


def chunked_map(fn, xs, chunk_size: int):
    """``lax.map(fn, xs, batch_size=chunk)`` with ``xs`` padded (by repeating its last row) to a multiple of
    the chunk, so that one ``vmap``-ed body is compiled instead of a body plus a remainder; the padded rows
    cost at most ``chunk - 1`` extra evaluations and are dropped."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    if pad:
        xs = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), xs)
    out = jax.lax.map(fn, xs, batch_size=chunk)
    return jax.tree_util.tree_map(lambda a: a[:n], out)
