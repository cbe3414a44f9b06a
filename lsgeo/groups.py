"""Parameter groups ("layers"): the unit the layer-wise noise of Orvieto et al. (2023) perturbs.

Parameters are any pytree of arrays (a flax ``variables['params']`` dict, an ``nnx.State``, a tuple
of arrays). Generic pytree arithmetic (sums, inner products, norms, random trees) comes from
``optax.tree``; this module holds the one concept of lsgeo's own, the partition of the leaves into
M groups (Sections 3.2 and 4 of the paper: xi = sigma sqrt(M) eps on one group j, zero elsewhere).

``groups=None``     one group per top-level entry of the tree (flax ``Dense_0`` = kernel + bias);
                    a tree whose only top-level key is ``"params"`` is looked into first.
``groups="leaf"``   every array is its own group (the paper's released snippet).
``groups=callable`` ``groups(path) -> name`` where ``path`` is the leaf's key path as a tuple of
                    strings, e.g. ``("Dense_0", "kernel")``.

Groups are numbered in order of first appearance in ``jax.tree_util`` flattening order.

Example:
  >>> import jax.numpy as jnp
  >>> from lsgeo import groups
  >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "Dense_1": {"kernel": jnp.ones((3, 1))}}
  >>> groups.group_names(params)
  ['Dense_0', 'Dense_1']
  >>> groups.group_ids(params, "leaf")[1]
  ['Dense_0/bias', 'Dense_0/kernel', 'Dense_1/kernel']
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
GroupSpec = None | str | Callable[[tuple[str, ...]], Any]

__all__ = ["GroupSpec", "leaf_paths", "group_names", "group_ids", "group_sq_norms", "check_group_index"]


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
        keys = [groups(p) for p in paths]
        for p, k in zip(paths, keys):
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise ValueError(f"groups(path) must return a group name (a str or an int); for the leaf {'/'.join(p)!r} "
                                 f"it returned {type(k).__name__} {k!r}")
        return keys
    raise ValueError(f"groups must be None, 'leaf' or a callable on the leaf path; got {type(groups).__name__}")


def group_ids(tree: PyTree, groups: GroupSpec = None) -> tuple[PyTree, list[str]]:
    """Returns ``(ids, names)``: a tree of Python ints (the group of every leaf) and the M group names.

    Cost: one flattening of the tree structure, no FLOPs (everything is static).
    """
    keys = _group_keys(tree, groups)
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    ids = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), [index[k] for k in keys])
    return ids, [str(k) for k in index]


def group_names(tree: PyTree, groups: GroupSpec = None) -> list[str]:
    """Names of the M groups of ``tree`` in order of first appearance."""
    return group_ids(tree, groups)[1]


def group_sq_norms(tree: PyTree, groups: GroupSpec = None) -> dict[str, jax.Array]:
    """Squared norm of each group: ``{name: sum of ||leaf||^2 over the group's leaves}``."""
    ids, names = group_ids(tree, groups)
    totals = [jnp.zeros(()) for _ in names]
    for leaf, gid in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(ids)):
        totals[gid] = totals[gid] + jnp.sum(jnp.square(leaf))
    return dict(zip(names, totals))


def check_group_index(group, num_groups: int, name: str = "group") -> None:
    """Raises ValueError unless a concrete ``group`` is an integer in ``[-M, M)`` (negative counts from
    the end, as in Python indexing). Traced values are not checked."""
    if isinstance(group, jax.core.Tracer):
        return
    if isinstance(group, bool) or not jnp.issubdtype(jnp.asarray(group).dtype, jnp.integer) or jnp.ndim(group):
        raise ValueError(f"{name} must be an integer group index, got {group!r}")
    if not -num_groups <= int(group) < num_groups:
        raise ValueError(f"{name} must be in [-{num_groups}, {num_groups}) for M = {num_groups} groups, got {int(group)}")
