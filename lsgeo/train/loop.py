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
from lsgeo.train.chunk import Schedule, chunk_schedule, evaluate_start, measure_at, run_chunk
from lsgeo.train.devices import data_mesh, replicate, shard_examples, to_host
from lsgeo.train.evaluate import stream_eval
from lsgeo.train.state import TrainState, init_state, split_key, with_state_views
from lsgeo.validation import (
    check_batch,
    check_callable,
    check_float_params,
    check_nonnegative_int,
    check_positive_int,
)

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


def check_schedule(num_steps, eval_every, batch_size, n, swa_start, swa_every) -> int:
    """Validates the loop's integers; returns ``eval_every`` (default ``num_steps``)."""
    check_positive_int(num_steps, "num_steps")
    eval_every = num_steps if eval_every is None else eval_every
    check_positive_int(eval_every, "eval_every")
    if num_steps % eval_every:
        raise ValueError(f"eval_every must divide num_steps; got num_steps={num_steps}, eval_every={eval_every}")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
        if batch_size > n:
            raise ValueError(f"batch_size must be <= the number of examples {n}; got {batch_size}")
    if swa_start is not None:
        check_nonnegative_int(swa_start, "swa_start")
    check_positive_int(swa_every, "swa_every")
    return eval_every


def check_finite_params(params, name: str = "params") -> None:
    """Raises ValueError naming the leaf when the (concrete) initial parameters hold a NaN or an inf."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path)} holds non-finite values (NaN or inf): the initial "
                f"parameters w_0 must be finite"
            )


def _describe(tree) -> str:
    text = str(jax.tree_util.tree_structure(tree))
    return text if len(text) <= 300 else text[:300] + "..."


def check_resume_optimizer(optimizer: optax.GradientTransformation, state: TrainState) -> None:
    """Raises ValueError when ``optimizer`` did not build ``state.opt_state`` (another optimizer, or the
    same one for other parameters): the structure, shapes and dtypes of ``optimizer.init(state.params)``
    (``jax.eval_shape``: nothing is computed) must be those of the state's."""
    expected = jax.eval_shape(optimizer.init, state.params)
    hint = "resume with the optimizer the state was trained with"
    if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(state.opt_state):
        raise ValueError(
            f"optimizer does not match the resumed state: optimizer.init builds an opt_state of structure "
            f"{_describe(expected)}, but state.opt_state has structure {_describe(state.opt_state)}; {hint}"
        )
    leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, want), have in zip(leaves, jax.tree_util.tree_leaves(state.opt_state)):
        if tuple(want.shape) != tuple(np.shape(have)) or want.dtype != np.result_type(have):
            raise ValueError(
                f"optimizer does not match the resumed state: opt_state leaf {jax.tree_util.keystr(path)} is "
                f"{np.result_type(have)}{list(np.shape(have))} in the state, {want.dtype}{list(want.shape)} for this "
                f"optimizer; {hint}"
            )


def to_numpy(metrics: dict) -> dict:
    """The metrics as numpy arrays on this process (gathered from every process's devices under several)."""
    return {k: np.asarray(v) for k, v in to_host(metrics).items()}


def stack_history(history: list[dict]) -> dict:
    """A list of per-evaluation dicts as one dict of arrays with the evaluations on the last axis."""
    if not history:
        return {}
    return {k: np.stack([h[k] for h in history], axis=-1) for k in history[0]}


def check_measure(measure, measure_every, eval_every: int, measure_data=None) -> int:
    """``measure_every`` (default ``eval_every``) checked: a positive multiple of ``eval_every``; ``measure`` an
    ``(init, update)`` pair of callables or None; ``measure_data`` None or a non-empty pytree of arrays, given only
    with a ``measure``."""
    if measure is None:
        if measure_every is not None:
            raise ValueError("measure_every needs a measure (e.g. lsgeo.train.measure.top_eigenvalue_tracker(f))")
        if measure_data is not None:
            raise ValueError("measure_data needs a measure (e.g. lsgeo.train.measure.top_eigenvalue_tracker(f)): it is "
                             "the batch or data set the measurement runs on")
        return 1
    if measure_data is not None:
        if not any(hasattr(leaf, "shape") for leaf in jax.tree_util.tree_leaves(measure_data)):
            raise ValueError(f"measure_data must be a pytree of arrays (a batch such as (x, y)), got "
                             f"{type(measure_data).__name__}")
        check_batch(measure_data, "measure_data")
    if not (callable(getattr(measure, "init", None)) and callable(getattr(measure, "update", None))):
        raise TypeError(f"measure must be an (init, update) pair such as lsgeo.train.measure.Measurement, "
                        f"got {type(measure).__name__}")
    measure_every = eval_every if measure_every is None else measure_every
    check_positive_int(measure_every, "measure_every")
    if measure_every % eval_every:
        raise ValueError(f"measure_every must be a multiple of eval_every={eval_every}, got {measure_every}")
    return measure_every


#: the measurement program (one compilation per measurement, schedule and shapes; ``chunk`` module docstring)
_measure_jit = jax.jit(measure_at, static_argnames="schedule")


def nan_measurement(schedule, state, data) -> dict:
    """The schedule's measurement metrics as NaN numpy arrays (``{}`` without one): the rows where it is not
    due. Shapes only (``eval_shape`` of the compiled measurement: its trace is cached by ``jit``)."""
    if schedule.measure is None:
        return {}
    struct = _measure_jit.eval_shape(schedule=schedule, state=state, data=data)[1]
    return {k: np.full(v.shape, np.nan, v.dtype) for k, v in struct.items()}


def _first_non_finite(metrics: dict, swa_started: bool) -> str | None:
    names = [k for k in metrics if k not in ("step", "batch_loss")] + ["batch_loss"]
    for name in names:
        if name.startswith("swa_") and not swa_started:
            continue
        if not np.all(np.isfinite(metrics[name])):
            return name
    return None


def initial_values(init_fns, params, model_state, key):
    """``(params, model_state)``: the given values, or ``init_fns[i](init_key)`` where a callable was given."""
    init_key, _ = split_key(key)
    params_fn, state_fn = init_fns
    return (params_fn(init_key) if params_fn else params), (state_fn(init_key) if state_fn else model_state)


def split_init_fns(params, model_state):
    """``(init_fns, params, model_state)``: callables (static, hashable) apart from arrays (traced)."""
    params_fn = params if callable(params) else None
    state_fn = model_state if callable(model_state) else None
    return (params_fn, state_fn), (None if params_fn else params), (None if state_fn else model_state)


def _start(objective, optimizer, eval_fn, schedule, init_fns, params, model_state, key, data, eval_data):
    params, model_state = initial_values(init_fns, params, model_state, key)
    state = init_state(params, optimizer, model_state=model_state, key=key, swa=schedule.swa_start is not None,
                       measure=schedule.measure)
    return evaluate_start(objective, eval_fn, chunk_schedule(schedule), state, data, eval_data)


def _resume(objective, eval_fn, schedule, state, data, eval_data):
    return evaluate_start(objective, eval_fn, schedule, state, data, eval_data)[1]


_STATIC = ("objective", "optimizer", "eval_fn", "schedule")
_start_jit = jax.jit(_start, static_argnames=_STATIC + ("init_fns",))
_resume_jit = jax.jit(_resume, static_argnames=("objective", "eval_fn", "schedule"))
_chunk_jit = jax.jit(run_chunk, static_argnames=_STATIC)


def train(
    objective: Callable,
    optimizer: optax.GradientTransformation,
    params,
    data,
    *,
    num_steps: int,
    eval_every: int | None = None,
    batch_size: int | None = None,
    eval_fn: Callable | None = None,
    eval_data=None,
    model_state=None,
    key=None,
    swa_start: int | None = None,
    swa_every: int = 1,
    augment: Callable | None = None,
    devices=None,
    callback: Callable[[int, dict], None] | None = None,
    measure=None,
    measure_every: int | None = None,
    measure_data=None,
) -> TrainResult:
    """Trains with ``optimizer`` on ``objective`` for ``num_steps`` steps (``lax.scan`` chunks).

    Args:
      objective: ``f(params, batch) -> scalar``, or with ``model_state``,
        ``f(params, model_state, batch) -> (loss, new_model_state)``.
      optimizer: any optax transformation, e.g. ``lsgeo.optim.noise_injection(optax.sgd(lr), sigma)``
        or ``optax.contrib.sam(...)``.
      params: the clean initial parameters w_0 (finite floats), a callable ``init_key -> params``, or a
        :class:`TrainState` to resume from (``result.state``; then ``key`` and ``model_state`` must be None,
        and ``optimizer`` must be the one that built ``state.opt_state``: checked, ValueError otherwise).
      data: pytree of arrays with a leading example axis n (e.g. ``(x, y)``).
      num_steps: number of optimizer steps (a multiple of ``eval_every``).
      eval_every: evaluate every this many steps (default ``num_steps``: at the start and the end).
      batch_size: None for full-batch GD, else minibatch SGD with per-epoch shuffling.
      eval_fn: ``eval_fn(params, eval_data) -> dict of scalars`` (``eval_fn(params, model_state,
        eval_data)`` with ``model_state``), called at the clean parameters. Its keys may not be ``step``,
        ``train_loss``, ``batch_loss`` (nor start with ``swa_`` under SWA): ValueError.
      eval_data: any pytree passed to ``eval_fn``.
      model_state: initial non-parameter state (or a callable ``init_key -> state``); selects the
        stateful objective signature.
      key: int seed in [-2**31, 2**32) or PRNG key (default 0); ``init_key, data_key = split_key(key)``,
        disjoint from the noise stream of ``noise_injection(seed=key)`` (:mod:`lsgeo.streams`).
      swa_start, swa_every: stochastic weight averaging of the clean iterates w_t for t >= swa_start,
        t - swa_start a multiple of swa_every (:mod:`lsgeo.train.swa`).
      augment: ``augment(key, batch) -> batch``, applied on device to every training batch with a key
        derived from the data key and the step (reproducible, resumable); e.g.
        ``lsgeo.train.augment.random_crop_flip``.
      devices: devices for data parallelism, a non-empty sequence of distinct devices (default
        ``jax.devices()``; one device: unsharded).
      callback: ``callback(step, metrics)`` after each chunk, on the host (e.g. a progress bar).
      measure: a ``lsgeo.train.measure.Measurement`` (e.g. ``top_eigenvalue_tracker(objective)``) run on the
        device at the clean iterate w_t, on ``measure_data``, at the start and every ``measure_every`` steps
        (its own compiled program, between chunks: compiled once per run, the state never leaves the device);
        its metrics join the history (NaN at the evaluations in between, and at the first row of a resumed
        run) and its state travels in ``state.measure`` (resume keeps it).
      measure_every: a multiple of ``eval_every`` (default ``eval_every``).
      measure_data: the batch or data set the measurement runs on, any pytree of arrays (e.g. a fixed
        batch ``(x, y)`` of training examples, or held-out data); default None: the training data ``data``.
        Passed into the compiled measurement program as an argument (never a closure constant) and replicated over the
        devices like ``eval_data``. Given without ``measure``: ValueError.

    Returns:
      :class:`TrainResult`. Raises :class:`TrainingDiverged` on a non-finite loss, gradient or metric.

    Cost: num_steps gradient steps plus num_evals evaluations; one compilation of the chunk per
    (objective, optimizer, eval_fn, shapes, schedule), reused across calls: reuse the same
    ``objective``/``optimizer``/``eval_fn`` objects to reuse it.
    """
    check_callable(objective, "objective")
    if eval_fn is not None:
        check_callable(eval_fn, "eval_fn")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    n = check_batch(data, "data", common_axis=True)
    eval_every = check_schedule(num_steps, eval_every, batch_size, n, swa_start, swa_every)
    resume = isinstance(params, TrainState)
    if not resume and not callable(params):
        check_float_params(params)
        check_finite_params(params)
    if key is not None and not resume:
        check_seed(key, "key")
    if resume:
        if key is not None or model_state is not None:
            raise ValueError("key and model_state come from the TrainState when resuming; pass None")
        check_resume_optimizer(optimizer, params)
        if (swa_start is None) != (params.swa is None):
            raise ValueError(
                f"swa_start must be given exactly when the resumed state has an SWA average "
                f"(state.swa is {'set' if params.swa is not None else 'None'}, swa_start={swa_start})"
            )
    measure_every = check_measure(measure, measure_every, eval_every, measure_data)
    if resume and measure is not None and params.measure is None:
        params = params._replace(measure=measure.init(clean_params(params.params, params.opt_state)))
    mesh = data_mesh(devices)
    data, shard = shard_examples(mesh, data, n, batch_size)
    eval_fn, eval_data = stream_eval(eval_fn, eval_data)  # a data source: eval_fn runs batch by batch
    eval_data, measure_data = replicate(mesh, eval_data), replicate(mesh, measure_data)
    schedule = Schedule(eval_every, batch_size, swa_start, swa_every, augment, mesh, shard, measure, measure_every)
    static = dict(objective=objective, eval_fn=eval_fn, schedule=chunk_schedule(schedule))
    measure_data = data if measure_data is None else measure_data

    if resume:
        state = replicate(mesh, params)
        metrics = _resume_jit(state=state, data=data, eval_data=eval_data, **static)
    else:
        if not callable(params):
            params = replicate(mesh, params)
        if model_state is not None and not callable(model_state):
            model_state = replicate(mesh, model_state)
        init_fns, params, model_state = split_init_fns(params, model_state)
        key = as_key(0 if key is None else key)  # a typed key: seeds up to 2**32 - 1 do not overflow int32 in jit
        state, metrics = _start_jit(
            optimizer=optimizer, init_fns=init_fns, params=params, model_state=model_state, key=key,
            data=data, eval_data=eval_data, **{**static, "schedule": schedule},
        )  # fmt: skip
        if init_fns[0] is not None:
            check_finite_params(state.params, "params(init_key)")
    start = int(state.step)
    history: list[dict] = []
    not_due = nan_measurement(schedule, state, measure_data)

    def measured(state, metrics, due):
        if due and measure is not None:
            state, values = _measure_jit(schedule=schedule, state=state, data=measure_data)
            return state, {**to_numpy(metrics), **to_numpy(values)}
        return state, {**to_numpy(metrics), **not_due}

    state, metrics = measured(state, metrics, not resume)
    _record(history, start, metrics, state, frozenset(not_due))
    for chunk in range(1, num_steps // eval_every + 1):
        state, metrics = _chunk_jit(optimizer=optimizer, state=state, data=data, eval_data=eval_data, **static)
        if int(state.divergence.step) >= 0:
            raise TrainingDiverged(int(state.divergence.step), state.divergence.quantity(), stack_history(history), state)
        step = start + chunk * eval_every
        state, metrics = measured(state, metrics, step % measure_every == 0)
        _record(history, step, metrics, state, frozenset(not_due))
        if callback is not None:
            callback(step, history[-1])
    return TrainResult(clean_params(state.params, state.opt_state), stack_history(history), state)


def _record(history: list[dict], step: int, metrics: dict, state: TrainState, measured=frozenset()) -> None:
    """Appends ``{"step": step, **metrics}``, or raises TrainingDiverged on a non-finite metric (a measurement's
    NaN between measurements excepted)."""
    swa_started = state.swa is not None and int(state.swa.count) > 0
    bad = _first_non_finite({k: v for k, v in metrics.items() if k not in measured}, swa_started)
    if bad is not None:
        raise TrainingDiverged(step, bad, stack_history(history), state)
    history.append({"step": np.asarray(step), **metrics})
