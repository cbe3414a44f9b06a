"""Per-example loss gradients for influence scores, and the blocks of examples a data set is read in.

For a mean loss ``L(phi, y) = 1/n sum_i l(phi_i, y_i)`` the loss of example ``i`` alone is ``loss`` on the
one-example batch, ``l_i(w) = loss(predict(w, x_i[None]), y_i[None])``, and its gradient ``g_i = grad l_i(w)``
(Kronfluence's per-sample gradient of the summed loss). The gradients of a block of examples are formed
``examples_per_chunk`` at a time (``lax.map`` over chunks of a ``vmap``) and immediately contracted with the
(preconditioned) query gradients: no ``[n, m]`` matrix of gradients is ever held.

Data: an in-memory batch ``(x, y)`` (pytrees of arrays with a leading example axis) or a data source, a
zero-argument callable returning a fresh iterator of ``(x, y)`` batches (streamed from the host, one batch on
the device at a time). ``blocks`` yields ``(start, x, y)`` pieces of either.

Cost: one backward pass of the one-example model per example (vmapped). Memory: ``examples_per_chunk`` gradients
of size ``m``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import groups as groups_lib

__all__ = ["is_source", "example_loss", "example_gradients", "num_examples", "blocks", "count_examples",
           "leaf_groups", "group_dots"]


def is_source(data) -> bool:
    """A data source: a zero-argument callable returning an iterator of ``(x, y)`` batches."""
    return callable(data) and not isinstance(data, (tuple, list))


def num_examples(batch, name: str) -> int:
    """The shared leading axis of the leaves of an in-memory ``(x, y)``; ValueError naming ``name`` otherwise."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"{name} must be a pair (x, y) of arrays with a leading example axis, or a data source (a "
                         f"zero-argument callable returning an iterator of (x, y) batches); got {type(batch).__name__}")
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(f"{name} must have one non-empty leading example axis shared by x and y; got shapes "
                         f"{[np.shape(a) for a in jax.tree_util.tree_leaves(batch)]}")
    return int(sizes.pop())


def blocks(data, block_size: int | None, name: str) -> Iterator[tuple[int, object, object]]:
    """``(start, x, y)`` for consecutive blocks of ``data``: an in-memory ``(x, y)`` cut into ``block_size``
    examples (all at once when None), or the batches of a data source as they come."""
    if is_source(data):
        start = 0
        for batch in data():
            x, y = batch
            n = num_examples((x, y), f"a batch of {name}")
            yield start, x, y
            start += n
        if start == 0:
            raise ValueError(f"{name} (a data source) yielded no batch")
        return
    n = num_examples(data, name)
    size = n if block_size is None else int(block_size)
    for start in range(0, n, size):
        yield start, *jax.tree_util.tree_map(lambda a: a[start:start + size], tuple(data))


def count_examples(data, name: str) -> tuple[int, list[int]]:
    """``(n, starts)``: the number of examples and the start of every batch (one pass over a source, no compute)."""
    if not is_source(data):
        return num_examples(data, name), [0]
    starts, n = [], 0
    for batch in data():
        starts.append(n)
        n += num_examples(tuple(batch), f"a batch of {name}")
    if n == 0:
        raise ValueError(f"{name} (a data source) yielded no batch")
    return n, starts


def example_loss(predict: Callable, loss: Callable) -> Callable:
    """``l(params, x_i, y_i)``: the mean loss on the one-example batch (x_i, y_i) (no leading axis)."""

    def one(params, xi, yi):
        x1, y1 = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], (xi, yi))
        value = loss(predict(params, x1), y1)
        if jnp.ndim(value) != 0:
            raise ValueError(f"loss must return a scalar (the mean over examples), got shape {jnp.shape(value)}")
        return value

    return one


def example_gradients(predict, loss, params, x, y, fn: Callable, examples_per_chunk: int | None):
    """``fn(g_i, i)`` for every example of ``(x, y)``, stacked: ``g_i`` the loss gradient of example ``i`` (a
    pytree shaped like ``params``), formed ``examples_per_chunk`` at a time (call inside ``jit``)."""
    grad = jax.grad(example_loss(predict, loss))
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    chunk = n if examples_per_chunk is None else min(int(examples_per_chunk), n)
    return jax.lax.map(lambda ex: fn(grad(params, ex[0], ex[1]), ex[2]), (x, y, jnp.arange(n)), batch_size=chunk)


def leaf_groups(params, groups) -> tuple[tuple[int, ...], list[str]]:
    """``(group index of every leaf, group names)`` (``lsgeo.groups``: top-level modules by default)."""
    ids, names = groups_lib.group_ids(params, groups)
    return tuple(jax.tree_util.tree_leaves(ids)), names


def group_dots(g, queries, leaf_ids: tuple[int, ...], num_groups: int):
    """``[M, Q]``: ``sum_{leaves l of group G} <q_l, g_l>`` for a gradient ``g`` and queries with a leading axis Q."""
    qs = jax.tree_util.tree_leaves(queries)
    out = jnp.zeros((num_groups, qs[0].shape[0]), jnp.result_type(*qs))
    for gid, gl, ql in zip(leaf_ids, jax.tree_util.tree_leaves(g), qs):
        out = out.at[gid].add(ql.reshape(ql.shape[0], -1) @ gl.reshape(-1).astype(ql.dtype))
    return out
