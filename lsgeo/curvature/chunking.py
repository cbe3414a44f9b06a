"""How many vectors go through one curvature product together (the one memory budget of
``lsgeo.curvature``), and the balanced ``lax.map`` that runs them.

Vmapping P probes (or Lanczos runs) through one Hessian-vector product shares the primal forward and
backward pass between them but multiplies the tangent activations by P: on a small model this is the
fast way to run many probes, on a large one it is what exhausts the device memory.
``auto_vectors_per_pass`` decides from a memory estimate: the bytes of every intermediate of one evaluation of the objective on
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

from lsgeo.microbatch import MEMORY_BUDGET_BYTES
from lsgeo.validation import check_positive_int

PROBE_BUDGET_BYTES = MEMORY_BUDGET_BYTES
MAX_CHUNK = 16


def check_vectors_per_pass(value, name: str = "vectors_per_pass") -> None:
    """``None`` (automatic) or a positive int."""
    if value is not None:
        check_positive_int(value, name)


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


def auto_vectors_per_pass(op, num_vectors: int, *, state_bytes_per_vector: int = 0) -> int:
    """Vectors per vmapped product of the curvature operator ``op`` (its ``activation_bytes`` on one
    microbatch, doubled for the tangents, plus the caller's per-vector state) within the budget."""
    per_vector = 2 * op.activation_bytes() + state_bytes_per_vector
    fits = PROBE_BUDGET_BYTES // max(per_vector, 1)
    return int(max(1, min(num_vectors, MAX_CHUNK, fits)))


def chunked_map(fn, xs, max_rows: int, *, batched: bool = False):
    """``fn`` over the rows of ``xs`` (a pytree with a leading axis n), at most ``max_rows`` rows per pass.

    The rows are cut into ``steps = ceil(n / max_rows)`` equal passes of ``ceil(n / steps)`` rows (the
    last row repeated to fill the last pass, fewer than ``steps`` extra rows in all: 257 rows in passes of
    at most 256 run as 2 x 129, not 2 x 256), so that one ``vmap``-ed body is compiled, run by a
    ``lax.map``. ``fn`` maps one row (``batched=False``) or a ``[chunk, ...]`` block of rows
    (``batched=True``, e.g. ``CurvatureOperator.matmat``); padded rows are dropped."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    steps = -(-n // max(1, min(max_rows, n)))
    chunk = -(-n // steps)
    pad = steps * chunk - n
    if pad:
        xs = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), xs)
    blocks = jax.tree_util.tree_map(lambda a: a.reshape(steps, chunk, *a.shape[1:]), xs)
    out = jax.lax.map(fn if batched else jax.vmap(fn), blocks)
    return jax.tree_util.tree_map(lambda a: a.reshape(steps * chunk, *a.shape[2:])[:n], out)
