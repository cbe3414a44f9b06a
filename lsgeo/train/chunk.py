"""The compiled unit of a training run: ``eval_every`` steps under ``lax.scan``, then an evaluation.

``run_chunk`` is what :func:`lsgeo.train.train` calls ``num_steps / eval_every`` times (and
:func:`lsgeo.train.sweep` ``vmap``s over members); Python sees the state only between chunks, to
check for divergence and to call the caller's progress callback. Per step: the batch of the step
(:mod:`lsgeo.train.batches`), optional augmentation keyed by the step, :func:`lsgeo.train.train_step`,
and the SWA running mean (:mod:`lsgeo.train.swa`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

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

__all__ = ["Schedule", "run_chunk", "evaluate_start", "measure_at"]


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
      measure: a ``lsgeo.train.measure.Measurement`` run at the clean iterate on the training data at the
        evaluations whose step is a multiple of ``measure_every`` (NaN metrics at the others), or None.
    """

    eval_every: int
    batch_size: int | None = None
    swa_start: int | None = None
    swa_every: int = 1
    augment: Callable | None = None
    mesh: Mesh | None = None
    shard_batch: bool = False
    measure: Any = None
    measure_every: int = 1


def measure_at(schedule: Schedule, state: TrainState, data, due) -> tuple[TrainState, dict]:
    """``(state, metrics)``: ``schedule.measure.update`` at the clean iterate on ``data`` when ``due`` (a traced
    bool), else NaN metrics and the measurement state unchanged (``lax.cond``: one compiled body)."""
    clean = clean_params(state.params, state.opt_state)
    dtype = jnp.result_type(float)

    def run(measure_state):
        metrics, measure_state = schedule.measure.update(clean, data, measure_state)
        return {k: jnp.asarray(v, dtype) for k, v in metrics.items()}, measure_state

    struct = jax.eval_shape(run, state.measure)[0]

    def skip(measure_state):
        return {k: jnp.full(v.shape, jnp.nan, v.dtype) for k, v in struct.items()}, measure_state

    metrics, measure_state = jax.lax.cond(due, run, skip, state.measure)
    return state._replace(measure=measure_state), metrics


def evaluate_start(objective, eval_fn, schedule: Schedule, state: TrainState, data, eval_data, *,
                   measure_now: bool = True) -> tuple[TrainState, dict]:
    """``(state, metrics)`` at the start of a run; ``batch_loss`` is the training loss there. With a
    measurement, it is taken too (``measure_now``; a resumed run reports NaN there and keeps its state, so
    that it continues bit for bit)."""
    metrics = evaluate(objective, eval_fn, state, data, eval_data, batch_size=schedule.batch_size)
    metrics = {"train_loss": metrics["train_loss"], "batch_loss": metrics["train_loss"], **metrics}
    if schedule.measure is not None:
        state, measured = measure_at(schedule, state, data, jnp.asarray(measure_now))
        metrics = {**metrics, **measured}
    return state, metrics


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
    metrics = {"train_loss": metrics["train_loss"], "batch_loss": jnp.mean(losses), **metrics}
    if schedule.measure is not None:
        due = (state.step % schedule.measure_every == 0) & (state.divergence.step < 0)
        state, measured = measure_at(schedule, state, data, due)
        metrics = {**metrics, **measured}
    return state, metrics
