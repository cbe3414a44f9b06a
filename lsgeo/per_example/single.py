"""The predictor on one example, for per-example Jacobians."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["single_example", "single_example_leaves"]


def single_example(predict: Callable) -> Callable:
    """``phi_i(params, x_i) = predict(params, x_i[None])`` flattened to ``[k]``: the predictor on one
    example (``x_i`` a pytree slice without the example axis), for per-example Jacobians.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo.per_example import single_example
      >>> single_example(lambda w, x: x @ w)(jnp.ones((2, 3)), jnp.ones(2)).shape
      (3,)
    """

    @functools.wraps(predict)
    def one(params, xi):
        out = predict(params, jax.tree_util.tree_map(lambda a: a[None], xi))
        return jnp.reshape(out, (-1,))

    return one


def single_example_leaves(predict: Callable, treedef, x_def) -> Callable:
    """``phi_i(p_leaves, xi_leaves) -> [k]``: :func:`single_example` on flat leaves (``treedef`` of the parameters,
    ``x_def`` of the inputs), the form the ghost-norm tracer reads; ValueError unless ``predict`` returns ``[n, k]``
    or ``[n]``.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from lsgeo.per_example import single_example_leaves
      >>> treedef, x_def = jax.tree_util.tree_structure(jnp.ones((2, 3))), jax.tree_util.tree_structure(jnp.ones(2))
      >>> single_example_leaves(lambda w, x: x @ w, treedef, x_def)([jnp.ones((2, 3))], [jnp.ones(2)]).shape
      (3,)
    """

    def single(p_leaves, xi_leaves):
        p = jax.tree_util.tree_unflatten(treedef, list(p_leaves))
        xi = jax.tree_util.tree_unflatten(x_def, [a[None] for a in xi_leaves])
        out = predict(p, xi)
        if not hasattr(out, "ndim") or out.ndim not in (1, 2) or out.shape[0] != 1:
            raise ValueError(
                f"predict must return an array of shape [n, k] or [n]; on one example it returned "
                f"{getattr(out, 'shape', type(out))}"
            )
        return out.reshape(-1)

    return single
