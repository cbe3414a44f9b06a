"""What a training run records at each evaluation: metrics at the clean iterate w_t.

``train_loss`` is the objective at w_t = ``clean_params(state.params, state.opt_state)`` (not at the
perturbed point the loop holds) on all the training data (computed in batches of ``batch_size`` when
given, the last one uneven). Every key of ``eval_fn(w_t, eval_data)`` (or
``eval_fn(w_t, model_state, eval_data)`` for stateful objectives) is added, and with SWA the same keys,
prefixed ``swa_``, at the running mean (NaN until the first iterate has been averaged in).

Example:
  >>> import jax.numpy as jnp, optax
  >>> from lsgeo.train import init_state
  >>> f = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
  >>> state = init_state(jnp.ones(2), optax.sgd(0.1))
  >>> metrics = evaluate(f, None, state, (jnp.eye(2), jnp.zeros(2)), None, batch_size=None)
  >>> float(metrics["train_loss"])
  1.0
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lsgeo import microbatch
from lsgeo.optim import clean_params
from lsgeo.train.state import TrainState
from lsgeo.train.step import objective_value

__all__ = ["evaluate", "train_loss"]


def train_loss(objective: Callable, params, model_state, data, batch_size: int | None) -> jax.Array:
    """The objective at ``params`` over all of ``data``; with ``batch_size``, computed in batches of that
    size (``lsgeo.microbatch``: the example-weighted mean, the last batch uneven), in the memory of one.

    Cost: one forward pass over the n examples.
    """
    if batch_size is None:
        return objective_value(objective, params, model_state, data)
    plan = microbatch.make_plan(data, batch_size, devices=jax.devices()[:1])
    return microbatch.reduce(lambda p, b: objective_value(objective, p, model_state, b), params, data, plan)


def _metrics_at(objective, eval_fn, params, model_state, data, eval_data, batch_size, prefix=""):
    out = {prefix + "train_loss": train_loss(objective, params, model_state, data, batch_size)}
    if eval_fn is not None:
        extra = eval_fn(params, eval_data) if model_state is None else eval_fn(params, model_state, eval_data)
        if not isinstance(extra, dict):
            raise ValueError(f"eval_fn must return a dict of scalars, got {type(extra).__name__}")
        out.update({prefix + str(k): jnp.asarray(v) for k, v in extra.items()})
    return out


def evaluate(objective: Callable, eval_fn: Callable | None, state: TrainState, data, eval_data, *,
             batch_size: int | None) -> dict[str, jax.Array]:
    """``{"train_loss", *eval_fn keys, ["swa_" + each]}`` at the clean iterate of ``state``.

    Cost: one pass over ``data`` and one ``eval_fn`` call (twice with SWA).
    """
    w = clean_params(state.params, state.opt_state)
    out = _metrics_at(objective, eval_fn, w, state.model_state, data, eval_data, batch_size)
    if state.swa is not None:
        swa = _metrics_at(objective, eval_fn, state.swa.params, state.model_state, data, eval_data, batch_size, "swa_")
        started = state.swa.count > 0
        out.update({k: jnp.where(started, v, jnp.nan) for k, v in swa.items()})
    return out
