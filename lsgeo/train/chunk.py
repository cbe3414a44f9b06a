"""The compiled unit of a training run: ``eval_every`` steps under ``lax.scan``, then an evaluation.

``run_chunk`` is what :func:`lsgeo.train.train` calls ``num_steps / eval_every`` times (and
:func:`lsgeo.train.sweep` ``vmap``s over members); Python sees the state only between chunks, to
check for divergence and to call the caller's progress callback. Per step: the batch of the step
(:mod:`lsgeo.train.batches`), optional augmentation keyed by the step, :func:`lsgeo.train.train_step`,
and the SWA running mean (:mod:`lsgeo.train.swa`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lsgeo.optim import clean_params
from lsgeo.train.batches import augment_key, minibatch
from lsgeo.train.devices import constrain_examples
from lsgeo.train.evaluate import evaluate
from lsgeo.train.state import TrainState
from lsgeo.train.step import train_step
from lsgeo.train.swa import swa_update

__all__ = ["Schedule", "run_chunk", "evaluate_start"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The static configuration of a run (hashable: part of the compilation cache key).

    Attributes:
      eval_every: steps per chunk.
      batch_size: None for full-batch GD, else the minibatch size.
      swa_start, swa_every: the SWA schedule (``swa_start=None``: no SWA).
      augment: ``augment(key, batch) -> batch`` applied to every training batch, or None.
      mesh: the data-parallel mesh, None on one device.
      shard_batch: whether batches are split over the mesh along the example axis.
    """

    eval_every: int
    batch_size: int | None = None
    swa_start: int | None = None
    swa_every: int = 1
    augment: Callable | None = None
    mesh: Mesh | None = None
    shard_batch: bool = False


def evaluate_start(objective, eval_fn, schedule: Schedule, state: TrainState, data, eval_data) -> dict:
    """The evaluation at the start of a run; ``batch_loss`` is the training loss there."""
    metrics = evaluate(objective, eval_fn, state, data, eval_data, batch_size=schedule.batch_size)
    return {"train_loss": metrics["train_loss"], "batch_loss": metrics["train_loss"], **metrics}


def run_chunk(objective, optimizer, eval_fn, schedule: Schedule, state: TrainState, data, eval_data):
    """``(state, metrics)`` after ``schedule.eval_every`` steps; ``metrics["batch_loss"]`` is the mean loss
    the optimizer saw over the chunk. Cost: eval_every gradient steps and one evaluation."""

    def body(state, _):
        batch = minibatch(data, state.data_key, state.step, schedule.batch_size)
        if schedule.augment is not None:
            batch = schedule.augment(augment_key(state.data_key, state.step), batch)
        if schedule.shard_batch:
            batch = constrain_examples(schedule.mesh, batch)
        state, loss = train_step(objective, optimizer, state, batch)
        if schedule.swa_start is not None:
            swa = swa_update(state.swa, clean_params(state.params, state.opt_state), state.step,
                             start=schedule.swa_start, every=schedule.swa_every)
            running = state.divergence.step < 0
            state = state._replace(swa=jax.tree_util.tree_map(lambda a, b: jnp.where(running, a, b), swa, state.swa))
        return state, loss

    state, losses = jax.lax.scan(body, state, None, length=schedule.eval_every)
    metrics = evaluate(objective, eval_fn, state, data, eval_data, batch_size=schedule.batch_size)
    return state, {"train_loss": metrics["train_loss"], "batch_loss": jnp.mean(losses), **metrics}
