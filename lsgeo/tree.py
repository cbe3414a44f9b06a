"""Pytree helpers: flattening, inner products, Gaussian trees and parameter groups.

Parameters are any pytree of arrays (a flax ``variables['params']`` dict, an ``nnx.State``,
a tuple of arrays). Everything here is a thin, jit-compatible layer over
``jax.flatten_util`` and ``optax.tree_utils``; the one concept of its own is the *group*
("layer") that the layer-wise noise of Orvieto et al. (2023, Sections 3.2 and 4) perturbs.

Groups
------
``groups=None``     one group per top-level entry of the tree (flax ``Dense_0`` = kernel + bias);
                    a tree whose only top-level key is ``"params"`` is looked into first.
``groups="leaf"``   every array is its own group (the paper's released snippet).
``groups=callable`` ``groups(path) -> name`` where ``path`` is the leaf's key path as a tuple of
                    strings, e.g. ``("Dense_0", "kernel")``.
Groups are numbered in order of first appearance in ``jax.tree_util`` flattening order.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from lsgeo import threefry

PyTree = Any
GroupSpec = None | str | Callable[[tuple[str, ...]], Any]

__all__ = [
    "ravel",
    "dot",
    "sq_norm",
    "norm",
    "add",
    "sub",
    "scale",
    "axpy",
    "zeros_like",
    "num_params",
    "normal_like",
    "check_same_structure",
    "leaf_paths",
    "group_names",
    "group_ids",
    "group_sq_norms",
    "stack_leaves",
]


def ravel(tree: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Flattens ``tree`` into one vector; returns ``(flat, unravel)``. Cost: one copy."""
    return ravel_pytree(tree)


def dot(a: PyTree, b: PyTree) -> jax.Array:
    """Euclidean inner product <a, b> summed over all leaves (real trees)."""
    return otu.tree_vdot(a, b)


def sq_norm(a: PyTree) -> jax.Array:
    """Squared Euclidean norm ||a||^2 over all leaves."""
    return otu.tree_norm(a, squared=True)


def norm(a: PyTree) -> jax.Array:
    """Euclidean norm ||a|| over all leaves."""
    return otu.tree_norm(a)


def add(a: PyTree, b: PyTree) -> PyTree:
    """a + b leaf-wise."""
    return otu.tree_add(a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """a - b leaf-wise."""
    return otu.tree_sub(a, b)


def scale(alpha, a: PyTree) -> PyTree:
    """alpha * a leaf-wise."""
    return otu.tree_scale(alpha, a)


def axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """alpha * x + y leaf-wise."""
    return otu.tree_add_scale(y, alpha, x)


def zeros_like(a: PyTree) -> PyTree:
    return otu.tree_zeros_like(a)


def num_params(tree: PyTree) -> int:
    """Total number of scalar parameters m (a Python int, static)."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def normal_like(key: jax.Array, tree: PyTree) -> PyTree:
    """A tree of independent standard normals shaped like ``tree``, one key per leaf.

    Leaf i is ``jax.random.normal(k_i, shape_i, dtype_i)`` with k_i = ``jax.random.split(key, L)[i]``
    (as ``optax.tree_utils.tree_random_like(key, tree, jax.random.normal)``), computed by
    ``lsgeo.threefry`` (the same numbers, faster on CPU).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = threefry.split(key, len(leaves)) if leaves else []
    return jax.tree_util.tree_unflatten(
        treedef, [threefry.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    )


def check_same_structure(reference: PyTree, other: PyTree, name: str, reference_name: str = "params") -> None:
    """Raises ValueError naming ``name`` unless ``other`` has the structure and leaf shapes of ``reference``."""
    ref_def = jax.tree_util.tree_structure(reference)
    other_def = jax.tree_util.tree_structure(other)
    if ref_def != other_def:
        raise ValueError(
            f"{name} must have the same pytree structure as {reference_name}; "
            f"got {other_def}, expected {ref_def}"
        )
    for (path, r), o in zip(jax.tree_util.tree_leaves_with_path(reference), jax.tree_util.tree_leaves(other)):
        if np.shape(r) != np.shape(o):
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path)} has shape {np.shape(o)}, "
                f"expected {np.shape(r)} as in {reference_name}"
            )


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree: PyTree) -> list[tuple[str, ...]]:
    """The key path of every leaf as a tuple of strings, in flattening order."""
    return [tuple(_key_str(k) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _group_keys(tree: PyTree, groups: GroupSpec) -> list:
    paths = leaf_paths(tree)
    if groups is None:
        if paths and all(len(p) >= 2 and p[0] == "params" for p in paths):
            paths = [p[1:] for p in paths]
        return [p[0] if p else "all" for p in paths]
    if isinstance(groups, str):
        if groups != "leaf":
            raise ValueError(f"groups must be None, 'leaf' or a callable on the leaf path; got {groups!r}")
        return ["/".join(p) if p else "all" for p in paths]
    if callable(groups):
        return [groups(p) for p in paths]
    raise ValueError(f"groups must be None, 'leaf' or a callable on the leaf path; got {type(groups).__name__}")


def group_names(tree: PyTree, groups: GroupSpec = None) -> list[str]:
    """Names of the M groups of ``tree`` in order of first appearance."""
    names: list = []
    for k in _group_keys(tree, groups):
        if k not in names:
            names.append(k)
    return [str(n) for n in names]


def group_ids(tree: PyTree, groups: GroupSpec = None) -> tuple[PyTree, list[str]]:
    """Returns ``(ids, names)``: a tree of Python ints (the group of every leaf) and the M names."""
    keys = _group_keys(tree, groups)
    order: list = []
    for k in keys:
        if k not in order:
            order.append(k)
    index = {k: i for i, k in enumerate(order)}
    treedef = jax.tree_util.tree_structure(tree)
    ids = jax.tree_util.tree_unflatten(treedef, [index[k] for k in keys])
    return ids, [str(k) for k in order]


def group_sq_norms(tree: PyTree, groups: GroupSpec = None) -> dict[str, jax.Array]:
    """Squared norm of each group: {name: sum of ||leaf||^2 over the group's leaves}."""
    ids, names = group_ids(tree, groups)
    totals = [jnp.zeros(()) for _ in names]
    for leaf, gid in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(ids)):
        totals[gid] = totals[gid] + jnp.sum(jnp.square(leaf))
    return dict(zip(names, totals))


def stack_leaves(trees: Sequence[PyTree]) -> PyTree:
    """Stacks a list of same-structured trees along a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
