"""``train``: one training run, ``num_steps`` optimizer steps in compiled chunks, evaluated at the clean iterate.

A run is ``num_steps / eval_every`` calls of one compiled chunk (:mod:`lsgeo.train.chunk`); after each,
Python checks for divergence, runs the measurement when one is due (``measure=``: its own compiled program,
on the device), records the metrics and calls ``callback(step, metrics)`` (a progress
bar, logging: the library itself prints nothing). The result carries the final :class:`TrainState`,
from which ``train`` resumes bit for bit (mid-epoch minibatch SGD, noise injection, transparent SAM
and SWA included): ``train(objective, optimizer, result.state, data, num_steps=...)``.

History: a dict of numpy arrays ``[num_evals]``, ``num_evals = num_steps / eval_every + 1`` (the start
included):
  ``step``        the step count at the evaluation;
  ``train_loss``  the objective at the clean parameters on the training data (see :mod:`lsgeo.train.evaluate`);
  ``batch_loss``  the mean objective the optimizer saw (perturbed point, minibatches) over the chunk
                  ending there (at the start: ``train_loss``);
  every key of ``eval_fn``, and with SWA the same keys prefixed ``swa_`` (NaN before averaging starts).

Divergence: a non-finite loss, gradient or update freezes the state at the last finite step
(:mod:`lsgeo.train.step`); ``train`` then raises :class:`TrainingDiverged` with the step, the quantity,
the history up to the last finite evaluation and the frozen state, so nothing computed is lost. A
non-finite evaluated metric raises the same error, naming the metric.

Example:
  >>> import jax.numpy as jnp, optax
  >>> f = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
  >>> data = (jnp.eye(4), jnp.arange(4.0))
  >>> opt = optax.sgd(0.1)
  >>> result = train(f, opt, jnp.zeros(4), data, num_steps=20, eval_every=10)
  >>> result.history["step"].tolist(), result.history["train_loss"].round(3).tolist()
  ([0, 10, 20], [3.5, 1.255, 0.45])
  >>> more = train(f, opt, result.state, data, num_steps=10)   # resumes at step 20
  >>> int(more.state.step)
  30
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax

from lsgeo.optim import clean_params
from lsgeo.streams import as_key, check_seed
from lsgeo.train.chunk import chunk_schedule, evaluate_start, measure_at, run_chunk
from lsgeo.train.devices import data_mesh, replicate, shard_examples
from lsgeo.train import run as run_lib
from lsgeo.train.state import TrainState, with_state_views

PyTree = Any

__all__ = ["train", "TrainResult", "TrainingDiverged"]


class TrainingDiverged(FloatingPointError):
    """A training run produced a non-finite value.

    Attributes:
      step: the step t at which ``quantity`` went non-finite (for an evaluated metric: the evaluation step).
      quantity: ``"loss"``, ``"gradient"``, ``"params"`` or the name of a history metric.
      history: dict of numpy arrays up to the last finite evaluation.
      state: the :class:`TrainState` frozen at the last finite step, to inspect or save (it keeps its
        divergence marker, so passing it back to ``train`` takes no further step); ``params`` is its
        clean iterate.
    """

    def __init__(self, step: int, quantity: str, history: dict, state: TrainState | None = None):
        self.step = int(step)
        self.quantity = quantity
        self.history = history
        self.state = state
        super().__init__(f"training diverged at step {self.step}: {quantity} is not finite")

    @property
    def params(self):
        return None if self.state is None else clean_params(self.state.params, self.state.opt_state)


@with_state_views
class TrainResult(NamedTuple):
    """Result of :func:`train`.

    Attributes:
      params: the clean final parameters w_T (``clean_params`` of the point the loop held).
      history: dict of numpy arrays ``[num_evals]`` (module docstring).
      state: the final :class:`TrainState` (pass it as ``params`` to resume).
    """

    params: PyTree
    history: dict
    state: TrainState


    @property
    def steps(self) -> int:
        return int(self.state.step)


def _describe(tree) -> str:
    text = str(jax.tree_util.tree_structure(tree))
    return text if len(text) <= 300 else text[:300] + "..."


def _check_same_state(expected, have, what: str, hint: str) -> None:
    """ValueError when ``have`` (a concrete state) does not have the structure, shapes and dtypes of ``expected``
    (``jax.eval_shape`` of the init that should have built it)."""
    if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(have):
        raise ValueError(f"{what} does not match the resumed state: it builds a state of structure "
                         f"{_describe(expected)}, but the state holds {_describe(have)}; {hint}")
    leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, want), leaf in zip(leaves, jax.tree_util.tree_leaves(have)):
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)
        if tuple(want.shape) != tuple(np.shape(leaf)) or want.dtype != dtype:
            raise ValueError(
                f"{what} does not match the resumed state: leaf {jax.tree_util.keystr(path)} is "
                f"{dtype}{list(np.shape(leaf))} in the state, {want.dtype}{list(want.shape)} for this {what}; {hint}"
            )


def check_resume_optimizer(optimizer: optax.GradientTransformation, state: TrainState) -> None:
    """Raises ValueError when ``optimizer`` did not build ``state.opt_state`` (another optimizer, or the
    same one for other parameters): the structure, shapes and dtypes of ``optimizer.init(state.params)``
    (``jax.eval_shape``: nothing is computed) must be those of the state's."""
    _check_same_state(jax.eval_shape(optimizer.init, state.params), state.opt_state, "optimizer",
                      "resume with the optimizer the state was trained with")


def check_resume_measure(measure, state: TrainState) -> None:
    """Raises ValueError when ``measure`` did not build ``state.measure`` (another measurement, or the same kind
    with other settings): ``measure.init`` at the clean iterate must give the state's structure, shapes and
    dtypes. A state without a measurement state starts one (``measure.init``)."""
    if measure is None or state.measure is None:
        return
    expected = jax.eval_shape(measure.init, clean_params(state.params, state.opt_state))
    _check_same_state(expected, state.measure, "measure", "resume with the measurement the state was trained with "
                      "(or measure=None to carry its state along unmeasured)")


def _first_non_finite(metrics: dict, swa_started: bool) -> str | None:
    names = [k for k in metrics if k not in ("step", "batch_loss")] + ["batch_loss"]
    for name in names:
        if name.startswith("swa_") and not swa_started:
            continue
        if not np.all(np.isfinite(metrics[name])):
            return name
    return None


def _resume(objective, eval_fn, schedule, state, data, eval_data):
    return evaluate_start(objective, eval_fn, schedule, state, data, eval_data)[1]


_STATIC = ("objective", "optimizer", "eval_fn", "schedule")
_start_jit = jax.jit(run_lib.start_state, static_argnames=_STATIC + ("init_fns",))
_resume_jit = jax.jit(_resume, static_argnames=("objective", "eval_fn", "schedule"))
_chunk_jit = jax.jit(run_chunk, static_argnames=_STATIC)
#: the measurement program (one compilation per measurement, schedule and shapes; ``chunk`` module docstring)
_measure_jit = jax.jit(measure_at, static_argnames="schedule")


@run_lib.with_run_options
def train(
    objective: Callable,
    optimizer: optax.GradientTransformation,
    params,
    data,
    *,
    key=None,
    **options,
) -> TrainResult:
    """Trains with ``optimizer`` on ``objective`` for ``num_steps`` steps (``lax.scan`` chunks).

    Args:
      objective: ``f(params, batch) -> scalar``, or with ``model_state``,
        ``f(params, model_state, batch) -> (loss, new_model_state)``.
      optimizer: any optax transformation, e.g. ``lsgeo.optim.noise_injection(optax.sgd(lr), sigma)``
        or ``optax.contrib.sam(...)``.
      params: the clean initial parameters w_0 (finite floats), a callable ``init_key -> params``, or a
        :class:`TrainState` to resume from (``result.state``; then ``key`` and ``model_state`` must be None,
        and ``optimizer`` and ``measure`` must be the ones that built ``state.opt_state`` and ``state.measure``:
        checked, ValueError otherwise).
      data: pytree of arrays with a leading example axis n (e.g. ``(x, y)``).
      key: int seed in [-2**31, 2**32) or PRNG key (default 0); ``init_key, data_key = split_key(key)``,
        disjoint from the noise stream of ``noise_injection(seed=key)`` (:mod:`lsgeo.streams`).
      **options: the keywords of :class:`lsgeo.train.run.RunOptions` (``num_steps`` required; ``eval_every``,
        ``batch_size``, ``eval_fn``, ``eval_data``, ``model_state``, ``swa_start``, ``swa_every``, ``augment``,
        ``devices``, ``callback``, ``measure``, ``measure_every``, ``measure_data``), described there once.

    Returns:
      :class:`TrainResult`. Raises :class:`TrainingDiverged` on a non-finite loss, gradient or metric.

    Cost: num_steps gradient steps plus num_evals evaluations; one compilation of the chunk per
    (objective, optimizer, eval_fn, shapes, schedule), reused across calls: reuse the same
    ``objective``/``optimizer``/``eval_fn`` objects to reuse it.
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    run, n = run_lib.checked_run("train", objective, params, data, options)
    measure, model_state = run.measure, run.model_state
    resume = isinstance(params, TrainState)
    if key is not None and not resume:
        check_seed(key, "key")
    if resume:
        if key is not None or model_state is not None:
            raise ValueError("key and model_state come from the TrainState when resuming; pass None")
        check_resume_optimizer(optimizer, params)
        check_resume_measure(measure, params)
        if (run.swa_start is None) != (params.swa is None):
            raise ValueError(
                f"swa_start must be given exactly when the resumed state has an SWA average "
                f"(state.swa is {'set' if params.swa is not None else 'None'}, swa_start={run.swa_start})"
            )
        if measure is not None and params.measure is None:
            params = params._replace(measure=measure.init(clean_params(params.params, params.opt_state)))
    mesh = data_mesh(run.devices)
    data, shard = shard_examples(mesh, data, n, run.batch_size)
    inputs = run_lib.RunInputs.of(run, mesh, data)
    schedule = run.schedule(mesh, shard, inputs.measure_source)
    static = dict(objective=objective, eval_fn=inputs.eval_fn, schedule=chunk_schedule(schedule))
    eval_data, measure_data = inputs.eval_data, inputs.measure_data

    if resume:
        state = replicate(mesh, params)
        metrics = _resume_jit(state=state, data=data, eval_data=eval_data, **static)
    else:
        if not callable(params):
            params = replicate(mesh, params)
        if model_state is not None and not callable(model_state):
            model_state = replicate(mesh, model_state)
        init_fns, params, model_state = run_lib.split_init_fns(params, model_state)
        key = as_key(0 if key is None else key)  # a typed key: seeds up to 2**32 - 1 do not overflow int32 in jit
        state, metrics = _start_jit(
            optimizer=optimizer, init_fns=init_fns, params=params, model_state=model_state, key=key,
            data=data, eval_data=eval_data, **{**static, "schedule": schedule},
        )  # fmt: skip
        if init_fns[0] is not None:
            run_lib.check_finite_params(state.params, "params(init_key)")
    start = int(state.step)
    history: list[dict] = []
    not_due = run_lib.measurement_rows(
        measure, lambda: clean_params(state.params, state.opt_state), inputs,
        lambda: _measure_jit.eval_shape(schedule=schedule, state=state, data=measure_data)[1], metrics,
    )  # fmt: skip

    program = None if measure is None else lambda st: _measure_jit(schedule=schedule, state=st, data=measure_data)
    state, metrics = run_lib.measured(program, not_due, state, metrics, not resume)
    _record(history, start, metrics, state, frozenset(not_due))
    for chunk in range(1, run.num_steps // run.eval_every + 1):
        state, metrics = _chunk_jit(optimizer=optimizer, state=state, data=data, eval_data=eval_data, **static)
        if int(state.divergence.step) >= 0:
            raise TrainingDiverged(int(state.divergence.step), state.divergence.quantity(),
                                   run_lib.stack_history(history), state)
        step = start + chunk * run.eval_every
        state, metrics = run_lib.measured(program, not_due, state, metrics, step % run.measure_every == 0)
        _record(history, step, metrics, state, frozenset(not_due))
        if run.callback is not None:
            run.callback(step, history[-1])
    return TrainResult(clean_params(state.params, state.opt_state), run_lib.stack_history(history), state)


def _record(history: list[dict], step: int, metrics: dict, state: TrainState, measured=frozenset()) -> None:
    """Appends ``{"step": step, **metrics}``, or raises TrainingDiverged on a non-finite metric (a measurement's
    NaN between measurements excepted)."""
    swa_started = state.swa is not None and int(state.swa.count) > 0
    bad = _first_non_finite({k: v for k, v in metrics.items() if k not in measured}, swa_started)
    if bad is not None:
        raise TrainingDiverged(step, bad, run_lib.stack_history(history), state)
    history.append({"step": np.asarray(step), **metrics})
