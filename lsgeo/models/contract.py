"""The model contract of DESIGN.md section 2 for flax models: ``(params, model_state)`` and
``predict(params, x) -> [n, k]`` (or ``[n]``), with BatchNorm statistics bound by ``functools.partial``.

For BatchNorm models the training loop uses ``make_train_apply(model)``, which returns the updated
running statistics; noise injection never touches them (they are not in ``params``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lsgeo.models import MLP
  >>> model = MLP(widths=(4,), num_outputs=2)
  >>> params, state = init_model(model, jax.random.key(0), jnp.ones((1, 3)))
  >>> predict = make_predict(model, state)       # eval mode: running averages, deterministic
  >>> predict(params, jnp.ones((5, 3))).shape, state, count_params(model, (1, 3))
  ((5, 2), {}, 26)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["init_model", "make_predict", "make_train_apply", "count_params"]

PyTree = Any


def init_model(model: nn.Module, key: jax.Array, x_example) -> tuple[PyTree, dict]:
    """Initialise ``model`` on an example batch ``x_example`` (one example suffices).

    Returns ``(params, model_state)``: ``params = variables['params']`` (what noise, gradients and
    curvature act on) and ``model_state`` the other collections (``{'batch_stats': ...}`` for
    BatchNorm models, ``{}`` otherwise). The initialiser runs as one compiled program
    (``jax.jit(model.init)``); traceable, so it can be ``vmap``-ed over keys.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lsgeo.models import MLP
      >>> params, state = init_model(MLP(widths=(4,), num_outputs=2), jax.random.key(0), jnp.ones((1, 3)))
      >>> jax.tree.map(jnp.shape, params)["Dense_0"]["kernel"], state
      ((3, 4), {})
    """
    variables = dict(_jit_init(model, key, jnp.asarray(x_example)))
    if "params" not in variables:
        raise ValueError(f"model {type(model).__name__} has no parameters")
    params = variables.pop("params")
    return params, variables


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(model, key, x_example):
    return model.init(key, x_example, train=False)


def _apply_eval(model, model_state, params, x):
    try:
        return model.apply({"params": params, **model_state}, x, train=False)
    except flax.errors.ScopeCollectionNotFound as e:
        raise ValueError(
            f"{type(model).__name__} needs model_state (e.g. BatchNorm 'batch_stats'): pass the one "
            f"returned by init_model, make_predict(model, model_state). Flax: {e}"
        ) from e


def _apply_train_batch_stats(model, model_state, params, x):
    out, _ = model.apply({"params": params, **model_state}, x, train=True, mutable=list(model_state))
    return out


def make_predict(model: nn.Module, model_state: dict | None = None, *, train: bool = False) -> Callable:
    """The predictor ``predict(params, x) -> [n, k]`` (or ``[n]``) of the model contract.

    ``train=False`` (default): BatchNorm uses the running averages in ``model_state`` (bound with
    ``functools.partial``), so ``predict`` is deterministic and per-example.
    ``train=True``: BatchNorm normalises with the statistics of the batch ``x`` (the function the
    training loop differentiates); the updated running averages are discarded, use
    ``make_train_apply`` to keep them. For models without state both modes coincide.
    """
    state = {} if model_state is None else dict(model_state)
    fn = _apply_train_batch_stats if (train and state) else _apply_eval
    return functools.partial(fn, model, state)


def _train_apply(model, params, model_state, x):
    if not model_state:
        return model.apply({"params": params}, x, train=True), model_state
    out, new_state = model.apply({"params": params, **model_state}, x, train=True, mutable=list(model_state))
    return out, dict(new_state)


def make_train_apply(model: nn.Module) -> Callable:
    """``f(params, model_state, x) -> (outputs, new_model_state)`` in training mode.

    BatchNorm normalises with batch statistics and the running averages are updated
    (new = momentum * old + (1 - momentum) * batch). The training loop threads ``model_state``;
    perturbations (noise injection) apply to ``params`` only.
    """
    return functools.partial(_train_apply, model)


def count_params(model: nn.Module, x_shape: Sequence[int], dtype=jnp.float32) -> int:
    """Number of scalar parameters (``variables['params']`` only) of ``model`` on inputs of shape
    ``x_shape``, computed with ``jax.eval_shape`` (no FLOPs, no memory: fine for ResNet-18)."""
    x = jax.ShapeDtypeStruct(tuple(x_shape), dtype)
    shapes = jax.eval_shape(lambda k, xx: model.init(k, xx, train=False), jax.random.key(0), x)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes["params"])))
