"""What a training run records at each evaluation: metrics at the clean iterate w_t.

``train_loss`` is the objective at w_t = ``clean_params(state.params, state.opt_state)`` (not at the
perturbed point the loop holds) on all the training data (computed in batches of ``batch_size`` when
given, the last one uneven). Every key of ``eval_fn(w_t, eval_data)`` (or
``eval_fn(w_t, model_state, eval_data)`` for stateful objectives) is added, and with SWA the same keys,
prefixed ``swa_``, at the running mean (NaN until the first iterate has been averaged in). A key of
``eval_fn`` that would replace a column of the loop (``step``, ``train_loss``, ``batch_loss``, and with
SWA any ``swa_`` name) is a ValueError naming it.

``eval_data`` may be a data source (``lsgeo.dataplan.is_source``: a zero-argument callable returning a fresh
iterator of batches, e.g. a numpy memmap read in batches): ``eval_fn`` then runs on each batch inside the
compiled evaluation (one batch on the device at a time, fetched from the host) and each metric is the
example-weighted mean over the batches (``StreamedEval``), exact when ``eval_fn``'s metrics are means over the
examples of its batch (losses, accuracies).

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

from lsgeo import dataplan
from lsgeo.optim import clean_params
from lsgeo.train.state import TrainState
from lsgeo.train.step import objective_value

__all__ = ["evaluate", "train_loss", "check_metric_names", "RESERVED", "StreamedEval", "stream_eval"]


def train_loss(objective: Callable, params, model_state, data, batch_size: int | None) -> jax.Array:
    """The objective at ``params`` over all of ``data``; with ``batch_size``, computed in batches of that
    size (``lsgeo.dataplan``: the example-weighted mean, the last batch uneven), in the memory of one.

    Cost: one forward pass over the n examples.
    """
    if batch_size is None:
        return objective_value(objective, params, model_state, data)
    plan = dataplan.in_memory_plan(data, batch_size, devices=jax.devices()[:1])
    return dataplan.reduce(lambda p, b: objective_value(objective, p, model_state, b), params, data, plan)


@dataclasses.dataclass(frozen=True)
class StreamedEval:
    """``eval_fn`` evaluated over a data source: the example-weighted mean of ``eval_fn(params, batch)`` (or
    ``eval_fn(params, model_state, batch)``) over the source's batches (``lsgeo.dataplan.reduce`` on its
    ``StreamPlan``). Hashable: a static argument of the compiled chunk; its third argument is ignored.

    Cost: one pass over the source per evaluation, one compiled body for its full batches."""

    eval_fn: Callable
    plan: dataplan.StreamPlan

    def __call__(self, params, *rest):
        model_state = rest[0] if len(rest) == 2 else None

        def on_batch(operands, batch):
            p, s = operands
            metrics = self.eval_fn(p, batch) if s is None else self.eval_fn(p, s, batch)
            if not isinstance(metrics, dict):
                raise ValueError(f"eval_fn must return a dict of scalars, got {type(metrics).__name__}")
            return {k: jnp.asarray(v, jnp.promote_types(jnp.result_type(v), jnp.float32)) for k, v in metrics.items()}

        return dataplan.reduce(on_batch, (params, model_state), None, self.plan)


def stream_eval(eval_fn: Callable | None, eval_data):
    """``(eval_fn, eval_data)`` for the compiled loop: unchanged for in-memory ``eval_data``; for a data source,
    ``(StreamedEval(eval_fn, plan), None)`` with the source read once here (``dataplan.stream_plan``: its batch
    sizes and shapes checked). ValueError when a source is given without an ``eval_fn``."""
    if not dataplan.is_source(eval_data):
        return eval_fn, eval_data
    if eval_fn is None:
        raise ValueError("eval_data is a data source but eval_fn is None: give the eval_fn to run on its batches")
    return StreamedEval(eval_fn, dataplan.stream_plan(eval_data, name="eval_data")), None


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
