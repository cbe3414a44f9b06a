"""The predictor on one example, for per-example Jacobians."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["single_example"]


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
