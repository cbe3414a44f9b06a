"""The compiled unit of a training run: ``eval_every`` steps under ``lax.scan``, then an evaluation.

``run_chunk`` is what :func:`lsgeo.train.train` calls ``num_steps / eval_every`` times (and
:func:`lsgeo.train.sweep` ``vmap``s over members); Python sees the state only between chunks, to
check for divergence and to call the caller's progress callback. Per step: the batch of the step
(:mod:`lsgeo.train.batches`), optional augmentation keyed by the step, :func:`lsgeo.train.train_step`,
and the SWA running mean (:mod:`lsgeo.train.swa`).

A measurement (any ``(init, update)`` pair, e.g. :mod:`lsgeo.curvature.track`) is its own compiled program,
``measure_at``, run on the device after the chunks whose step is a multiple of ``measure_every`` (and at the
start): the state never leaves the device, the measurement is compiled once per run (not once in the start program
and again in the chunk), the chunk does not depend on which measurement it carries the state of
(``chunk_schedule``), and in a ``vmap``-ped sweep a measurement that is not due costs nothing (a ``lax.cond`` on a
per-member predicate would run both branches under ``vmap``).
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

__all__ = ["Schedule", "run_chunk", "evaluate_start", "measure_at", "chunk_schedule"]


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
      measure: a measurement (an ``(init, update)`` pair, e.g. ``lsgeo.curvature.track.Measurement``) run
        (``measure_at``) at the clean iterate on the measurement data (default the training data) at the start and
        at the evaluations whose step is a multiple of ``measure_every`` (NaN metrics at the others), or None.
      measure_source: a data source the measurement reads itself (``measure_data=source``), in place of the
        measurement data argument; None for in-memory measurement data.
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
    measure_source: Callable | None = None


def chunk_schedule(schedule: Schedule) -> Schedule:
    """The schedule of the chunk and start programs: ``schedule`` without its measurement (which runs in its own
    program), so that their compilation does not depend on the measurement object (only on its state's shapes)."""
    return dataclasses.replace(schedule, measure=None, measure_every=1, measure_source=None)


def measure_at(schedule: Schedule, state: TrainState, data) -> tuple[TrainState, dict]:
    """``(state, metrics)``: ``schedule.measure.update`` at the clean iterate w_t on ``data`` (the measurement
    data: an argument of the compiled program, never a closure constant; or ``schedule.measure_source``, a data
    source read batch by batch), its metrics as floats. A state frozen
    by a divergence keeps its measurement state (its metrics are recorded as NaN by the loops).

    Cost: one ``update`` (for ``top_eigenvalue_tracker``, a few Hessian-vector products when warm)."""
    clean = clean_params(state.params, state.opt_state)
    dtype = jnp.result_type(float)
    data = data if schedule.measure_source is None else schedule.measure_source
    metrics, measure_state = schedule.measure.update(clean, data, state.measure)
    running = state.divergence.step < 0
    measure_state = jax.tree_util.tree_map(lambda a, b: jnp.where(running, a, b), measure_state, state.measure)
    return state._replace(measure=measure_state), {k: jnp.asarray(v, dtype) for k, v in metrics.items()}


def evaluate_start(objective, eval_fn, schedule: Schedule, state: TrainState, data, eval_data) -> tuple[TrainState, dict]:
    """``(state, metrics)`` at the start of a run; ``batch_loss`` is the training loss there (the measurement,
    if any, is ``measure_at``'s)."""
    metrics = evaluate(objective, eval_fn, state, data, eval_data, batch_size=schedule.batch_size)
    metrics = {"train_loss": metrics["train_loss"], "batch_loss": metrics["train_loss"], **metrics}
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
    return state, metrics
