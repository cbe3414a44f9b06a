"""What a training run records at each evaluation: metrics at the clean iterate w_t.

``train_loss`` is the objective at w_t = ``clean_params(state.params, state.opt_state)`` (not at the
perturbed point the loop holds) on all the training data (computed in batches of ``batch_size`` when
given, the last one uneven). Every key of ``eval_fn(w_t, eval_data)`` (or
``eval_fn(w_t, model_state, eval_data)`` for stateful objectives) is added, and with SWA the same keys,
prefixed ``swa_``, at the running mean (NaN until the first iterate has been averaged in). A key of
``eval_fn`` that would replace a column of the loop (``step``, ``train_loss``, ``batch_loss``, and with
SWA any ``swa_`` name) is a ValueError naming it.

Both evaluate through an ``lsgeo.Objective`` (the one place data plans are built): ``train_loss`` is the value of
``Objective(TrainingLoss(objective), data, microbatch_size=batch_size)`` at ``(w_t, model_state)``, and ``eval_data``
may be a data source (a zero-argument callable returning a fresh iterator of batches, e.g. a numpy memmap read
in batches): ``eval_fn`` then runs on each batch inside the compiled evaluation (one batch on the device at a
time, fetched from the host) and each metric is the example-weighted mean over the batches (``StreamedEval``,
``Objective.map``), exact when ``eval_fn``'s metrics are means over the examples of its batch (losses,
accuracies).

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

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from lsgeo.objective import Objective, check_not_iterator, is_source
from lsgeo.optim import clean_params
from lsgeo.train.state import TrainState
from lsgeo.train.step import objective_value

__all__ = ["evaluate", "train_loss", "TrainingLoss", "check_metric_names", "RESERVED", "StreamedEval", "stream_eval"]


@dataclasses.dataclass(frozen=True)
class TrainingLoss:
    """The training objective as a function of ``(params, model_state)``: ``f((w, s), batch)`` is ``objective(w,
    batch)``, or the loss of a stateful ``objective(w, s, batch) -> (loss, new_state)`` (state read, not updated).
    Hashable (equal for equal objectives): the ``f`` of an ``Objective``."""

    objective: Callable

    def __call__(self, operands, batch):
        params, model_state = operands
        return objective_value(self.objective, params, model_state, batch)


def train_loss(objective: Callable, params, model_state, data, batch_size: int | None) -> jax.Array:
    """The objective at ``params`` over all of ``data``: the value of ``Objective(TrainingLoss(objective), data,
    microbatch_size=batch_size)`` (with ``batch_size``, the example-weighted mean over batches of that size, the
    last one uneven, in the memory of one), on the device the loop evaluates on.

    Cost: one forward pass over the n examples.
    """
    loss = Objective(TrainingLoss(objective), data, microbatch_size=batch_size, devices=jax.devices()[:1])
    return loss.value((params, model_state))


@dataclasses.dataclass(frozen=True)
class EvalMetrics:
    """``eval_fn`` as the ``f`` of an objective over ``(params, model_state)``: its dict of metrics on one batch
    (each at least float32). Hashable."""

    eval_fn: Callable

    def __call__(self, operands, batch):
        params, model_state = operands
        metrics = self.eval_fn(params, batch) if model_state is None else self.eval_fn(params, model_state, batch)
        if not isinstance(metrics, dict):
            raise ValueError(f"eval_fn must return a dict of scalars, got {type(metrics).__name__}")
        return {k: jnp.asarray(v, jnp.promote_types(jnp.result_type(v), jnp.float32)) for k, v in metrics.items()}


@dataclasses.dataclass(frozen=True)
class StreamedEval:
    """``eval_fn`` evaluated over a data source: the example-weighted mean of ``eval_fn(params, batch)`` (or
    ``eval_fn(params, model_state, batch)``) over the source's batches (``Objective.map`` of an objective on the
    source, built once). Hashable: a static argument of the compiled chunk; its eval-data argument is ignored.

    Cost: one pass over the source per evaluation, one compiled body for its full batches."""

    metrics: Objective

    def __call__(self, params, *rest):
        model_state = rest[0] if len(rest) == 2 else None
        return self.metrics.map(self.metrics.f, (params, model_state))


def stream_eval(eval_fn: Callable | None, eval_data):
    """``(eval_fn, eval_data)`` for the compiled loop: unchanged for in-memory ``eval_data``; for a data source,
    ``(StreamedEval(Objective(EvalMetrics(eval_fn), eval_data)), None)`` with the source read once here (its batch
    sizes and shapes checked). ValueError when a source is given without an ``eval_fn``."""
    check_not_iterator(eval_data, "eval_data")
    if not is_source(eval_data):
        return eval_fn, eval_data
    if eval_fn is None:
        raise ValueError("eval_data is a data source but eval_fn is None: give the eval_fn to run on its batches")
    return StreamedEval(Objective(EvalMetrics(eval_fn), eval_data, data_name="eval_data")), None


#: the history columns the loop writes itself; ``eval_fn`` may not return these names
RESERVED = ("step", "train_loss", "batch_loss")


def check_metric_names(names, swa: bool) -> None:
    """Raises ValueError naming the key when a metric of ``eval_fn`` would replace a history column of the
    loop (``RESERVED``; with SWA also any ``swa_`` name, the prefix of the SWA columns) or another metric."""
    seen = set()
    for k in names:
        name = str(k)
        if name in RESERVED or (swa and name.startswith("swa_")):
            what = "the SWA columns are prefixed swa_" if name not in RESERVED else "the loop records it itself"
            raise ValueError(
                f"eval_fn returned a metric named {name!r}, which would replace the history column of that name "
                f"({what}; reserved: {list(RESERVED)}{' and swa_*' if swa else ''}); rename it"
            )
        if name in seen:
            raise ValueError(f"eval_fn returned two metrics named {name!r} (keys are converted with str); rename one")
        seen.add(name)


def _metrics_at(objective, eval_fn, params, model_state, data, eval_data, batch_size, prefix="", swa=False):
    out = {prefix + "train_loss": train_loss(objective, params, model_state, data, batch_size)}
    if eval_fn is not None:
        extra = eval_fn(params, eval_data) if model_state is None else eval_fn(params, model_state, eval_data)
        if not isinstance(extra, dict):
            raise ValueError(f"eval_fn must return a dict of scalars, got {type(extra).__name__}")
        check_metric_names(extra, swa)
        out.update({prefix + str(k): jnp.asarray(v) for k, v in extra.items()})
    return out


def evaluate(objective: Callable, eval_fn: Callable | None, state: TrainState, data, eval_data, *,
             batch_size: int | None) -> dict[str, jax.Array]:
    """``{"train_loss", *eval_fn keys, ["swa_" + each]}`` at the clean iterate of ``state``.

    Cost: one pass over ``data`` and one ``eval_fn`` call (twice with SWA).
    """
    w = clean_params(state.params, state.opt_state)
    out = _metrics_at(objective, eval_fn, w, state.model_state, data, eval_data, batch_size, swa=state.swa is not None)
    if state.swa is not None:
        swa = _metrics_at(objective, eval_fn, state.swa.params, state.model_state, data, eval_data, batch_size, "swa_")
        started = state.swa.count > 0
        out.update({k: jnp.where(started, v, jnp.nan) for k, v in swa.items()})
    return out
