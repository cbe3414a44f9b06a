"""What ``train`` and ``sweep`` share: the run options (one description of their common keywords), their checks,
the data each compiled program gets, and the measurement's checks and NaN rows.

:class:`RunOptions` is the one signature of a run: ``train(objective, optimizer, params, data, *, key=None,
**options)`` and ``sweep(objective, optimizer_fn, params, data, hyperparams, seeds, *, members_per_chunk=None,
**options)`` take its fields as keywords (``inspect.signature`` shows them all), validated once here.

Example:
  >>> import jax.numpy as jnp
  >>> options = RunOptions.of("train", dict(num_steps=4, eval_every=2)).checked((jnp.eye(2), jnp.ones(2)))[0]
  >>> options.eval_every, options.measure_every
  (2, 1)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import numpy as np

from lsgeo.objective import check_not_iterator, is_source, user_errors
from lsgeo.train.chunk import Schedule, chunk_schedule, evaluate_start
from lsgeo.train.devices import replicate, to_host
from lsgeo.train.evaluate import RESERVED, stream_eval
from lsgeo.train.state import TrainState, init_state, split_key
from lsgeo.validation import check_batch, check_callable, check_float_params, check_nonnegative_int, check_positive_int

__all__ = [
    "RunOptions",
    "with_run_options",
    "RunInputs",
    "check_finite_params",
    "checked_run",
    "start_state",
    "measured",
    "initial_values",
    "split_init_fns",
    "stack_history",
    "to_numpy",
    "measurement_rows",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The keywords shared by :func:`lsgeo.train.train` and :func:`lsgeo.train.sweep`.

    Attributes:
      num_steps: number of optimizer steps (a multiple of ``eval_every``).
      eval_every: evaluate every this many steps (default ``num_steps``: at the start and the end).
      batch_size: None for full-batch GD, else minibatch SGD with per-epoch shuffling (<= n).
      eval_fn: ``eval_fn(params, eval_data) -> dict of scalars`` (``eval_fn(params, model_state, eval_data)`` with
        ``model_state``), called at the clean parameters. Its keys may not be ``step``, ``train_loss``,
        ``batch_loss`` (nor start with ``swa_`` under SWA): ValueError.
      eval_data: any pytree passed to ``eval_fn``, or a data source (``eval_fn`` then runs batch by batch and each
        metric is the example-weighted mean, :mod:`lsgeo.train.evaluate`).
      model_state: initial non-parameter state (or a callable ``init_key -> state``); selects the stateful
        objective signature ``f(params, model_state, batch) -> (loss, new_model_state)``.
      swa_start, swa_every: stochastic weight averaging of the clean iterates w_t for t >= swa_start,
        t - swa_start a multiple of swa_every (:mod:`lsgeo.train.swa`).
      augment: ``augment(key, batch) -> batch``, applied on device to every training batch with a key derived from
        the data key and the step (reproducible, resumable); e.g. ``lsgeo.train.augment.random_crop_flip``.
      devices: devices for data parallelism (``train``: the example axis; ``sweep``: the members), a non-empty
        sequence of distinct devices (default ``jax.devices()``; one device: unsharded).
      callback: ``callback(step, metrics)`` after each chunk, on the host (e.g. a progress bar).
      measure: any measurement by its protocol, an ``(init, update)`` pair (optionally with an eager
        ``check(params, data)``; e.g. ``lsgeo.curvature.track.top_eigenvalue_tracker(objective)``), run on the
        device at the clean iterate w_t, on ``measure_data``, at the start and every ``measure_every`` steps (its
        own compiled program, between chunks: compiled once per run, the state never leaves the device); its
        metrics join the history (NaN at the evaluations in between, and at the first row of a resumed run; a
        metric name that is already a history column is a ValueError naming both) and its state travels in
        ``state.measure`` (resume keeps it; resuming with another measurement is a ValueError).
      measure_every: a multiple of ``eval_every`` (default ``eval_every``).
      measure_data: the batch or data set the measurement runs on: any pytree of arrays (a fixed batch ``(x, y)``,
        held-out data), passed into the compiled measurement as an argument (never a closure constant) and
        replicated over the devices like ``eval_data``, or a data source (read by the measurement, e.g. a
        tracker's operator, one batch at a time); default None: the training data ``data``. Given without
        ``measure``, or data the measurement cannot run on: ValueError naming ``measure_data``.
    """

    num_steps: int
    eval_every: int | None = None
    batch_size: int | None = None
    eval_fn: Callable | None = None
    eval_data: Any = None
    model_state: Any = None
    swa_start: int | None = None
    swa_every: int = 1
    augment: Callable | None = None
    devices: Any = None
    callback: Callable[[int, dict], None] | None = None
    measure: Any = None
    measure_every: int | None = None
    measure_data: Any = None

    @classmethod
    def of(cls, caller: str, options: dict) -> RunOptions:
        """``RunOptions(**options)``, a TypeError naming ``caller`` for an unknown or missing keyword."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}; its options are {names}")
        if "num_steps" not in options:
            raise TypeError(f"{caller}() missing required keyword argument 'num_steps'")
        return cls(**options)

    def checked(self, data) -> tuple[RunOptions, int]:
        """``(options, n)``: every option validated against the training ``data`` (n examples), with
        ``eval_every`` and ``measure_every`` filled in. ValueError/TypeError naming the argument."""
        if self.eval_fn is not None:
            check_callable(self.eval_fn, "eval_fn")
        if self.augment is not None:
            check_callable(self.augment, "augment")
        if self.callback is not None:
            check_callable(self.callback, "callback")
        n = check_batch(data, "data", common_axis=True)
        check_positive_int(self.num_steps, "num_steps")
        eval_every = self.num_steps if self.eval_every is None else self.eval_every
        check_positive_int(eval_every, "eval_every")
        if self.num_steps % eval_every:
            raise ValueError(
                f"eval_every must divide num_steps; got num_steps={self.num_steps}, eval_every={eval_every}"
            )
        if self.batch_size is not None:
            check_positive_int(self.batch_size, "batch_size")
            if self.batch_size > n:
                raise ValueError(f"batch_size must be <= the number of examples {n}; got {self.batch_size}")
        if self.swa_start is not None:
            check_nonnegative_int(self.swa_start, "swa_start")
        check_positive_int(self.swa_every, "swa_every")
        measure_every = self._check_measure(eval_every)
        return dataclasses.replace(self, eval_every=eval_every, measure_every=measure_every), n

    def _check_measure(self, eval_every: int) -> int:
        measure, measure_data = self.measure, self.measure_data
        if measure is None:
            if self.measure_every is not None:
                raise ValueError("measure_every needs a measure (e.g. lsgeo.curvature.track.top_eigenvalue_tracker(f))")
            if measure_data is not None:
                raise ValueError("measure_data needs a measure (e.g. lsgeo.curvature.track.top_eigenvalue_tracker(f)): "
                                 "it is the batch or data set the measurement runs on")
            return 1
        check_not_iterator(measure_data, "measure_data")
        if measure_data is not None and not is_source(measure_data):
            if not any(hasattr(leaf, "shape") for leaf in jax.tree_util.tree_leaves(measure_data)):
                raise ValueError(f"measure_data must be a pytree of arrays (a batch such as (x, y)) or a data source, "
                                 f"got {type(measure_data).__name__}")
            check_batch(measure_data, "measure_data")
        if not (callable(getattr(measure, "init", None)) and callable(getattr(measure, "update", None))):
            raise TypeError(f"measure must be an (init, update) pair with init and update attributes, such as "
                            f"lsgeo.curvature.track.Measurement(init, update), got {type(measure).__name__}")
        measure_every = eval_every if self.measure_every is None else self.measure_every
        check_positive_int(measure_every, "measure_every")
        if measure_every % eval_every:
            raise ValueError(f"measure_every must be a multiple of eval_every={eval_every}, got {measure_every}")
        return measure_every

    def schedule(self, mesh, shard_batch: bool, measure_source=None) -> Schedule:
        """The static schedule of the compiled programs (``checked`` options)."""
        return Schedule(self.eval_every, self.batch_size, self.swa_start, self.swa_every, self.augment, mesh,
                        shard_batch, self.measure, self.measure_every, measure_source)


def with_run_options(fn: Callable) -> Callable:
    """``fn`` (``train``, ``sweep``) with its signature's ``**options`` replaced by the fields of :class:`RunOptions` as
    keywords (what ``help`` and IDEs show), and a data source's errors (``eval_data``, ``measure_data``: one that
    changes between passes, one that fails on a later pass) raised as themselves (``lsgeo.objective.user_errors``)."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    fields = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                          **({} if f.default is dataclasses.MISSING else {"default": f.default}))
        for f in dataclasses.fields(RunOptions)
    ]
    wrapped = user_errors(fn)
    wrapped.__signature__ = inspect.signature(fn).replace(parameters=own + fields)
    return wrapped


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """The data of the compiled programs, placed: ``eval_fn``/``eval_data`` (a source streamed through
    ``StreamedEval``), ``measure_data`` (an argument of the measurement program; None when ``measure_source``, a
    data source, is read by the measurement itself) and the name errors give it."""

    eval_fn: Callable | None
    eval_data: Any
    measure_data: Any
    measure_source: Callable | None
    measure_name: str

    @classmethod
    def of(cls, options: RunOptions, mesh, data) -> RunInputs:
        """``options``' data for ``data`` (already placed) on ``mesh`` (None: one device)."""
        eval_fn, eval_data = stream_eval(options.eval_fn, options.eval_data)
        source = options.measure_data if is_source(options.measure_data) else None
        measure_data = None if source is not None else replicate(mesh, options.measure_data)
        name = "data (the training data: measure_data=None)" if options.measure_data is None else "measure_data"
        return cls(eval_fn, replicate(mesh, eval_data), data if options.measure_data is None else measure_data,
                   source, name)


def checked_run(caller: str, objective: Callable, params, data, options: dict) -> tuple[RunOptions, int]:
    """The checks ``train`` and ``sweep`` share: ``objective`` callable, the run options against ``data``
    (``RunOptions.checked``: the options and the number of examples n) and, unless ``params`` is a callable or a
    ``TrainState``, floating and finite initial parameters."""
    check_callable(objective, "objective")
    checked = RunOptions.of(caller, options).checked(data)
    if not isinstance(params, TrainState) and not callable(params):
        check_float_params(params)
        check_finite_params(params)
    return checked


def start_state(objective, optimizer, eval_fn, schedule: Schedule, init_fns, params, model_state, key, data,
                eval_data):
    """``(state, metrics)`` at step 0 of a run (traceable: the first part of the compiled start of ``train`` and of
    each member of ``sweep``): the initial values (``init_fns`` called with the init key of ``key``), the optimizer,
    SWA and measurement states, and the evaluation at the clean w_0."""
    params, model_state = initial_values(init_fns, params, model_state, key)
    state = init_state(params, optimizer, model_state=model_state, key=key, swa=schedule.swa_start is not None,
                       measure=schedule.measure)
    return evaluate_start(objective, eval_fn, chunk_schedule(schedule), state, data, eval_data)


def measured(measure_program: Callable, not_due: dict, state, metrics: dict, due: bool):
    """``(state, row)``: the evaluated ``metrics`` as numpy, with the measurement's metrics from
    ``measure_program(state) -> (state, values)`` when ``due`` (and a measurement is set: ``not_due`` non-empty or
    the program given), else its NaN row ``not_due``."""
    if due and measure_program is not None:
        state, values = measure_program(state)
        return state, {**to_numpy(metrics), **to_numpy(values)}
    return state, {**to_numpy(metrics), **not_due}


def check_finite_params(params, name: str = "params") -> None:
    """Raises ValueError naming the leaf when the (concrete) initial parameters hold a NaN or an inf."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path)} holds non-finite values (NaN or inf): the initial "
                f"parameters w_0 must be finite"
            )


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


def to_numpy(metrics: dict) -> dict:
    """The metrics as numpy arrays on this process (gathered from every process's devices under several)."""
    return {k: np.asarray(v) for k, v in to_host(metrics).items()}


def stack_history(history: list[dict]) -> dict:
    """A list of per-evaluation dicts as one dict of arrays with the evaluations on the last axis."""
    if not history:
        return {}
    return {k: np.stack([h[k] for h in history], axis=-1) for k in history[0]}


def _describe(data) -> str:
    if data is None or is_source(data):
        return "a data source"
    leaves = jax.tree_util.tree_leaves_with_path(data)
    shapes = {jax.tree_util.keystr(path) or "(root)": tuple(np.shape(a)) for path, a in leaves}
    text = f"leaf shapes {shapes}"
    return text if len(text) <= 300 else text[:300] + "..."


def _owner(name: str) -> str:
    if name == "step" or name in RESERVED:
        return f"the loop, which records the column {name!r} itself"
    if name.startswith("swa_"):
        return "the SWA evaluation (the swa_ columns)"
    return "eval_fn"


def measurement_rows(measure, params: Callable[[], Any], inputs: RunInputs, shapes: Callable[[], dict],
                     columns: dict) -> dict:
    """The NaN rows of the measurement's metrics (the evaluations where it is not due; ``{}`` without one), after
    checking that it can run: ``measure.check(params(), data)`` when it has one (eager, at the clean iterate
    ``params()`` gathered to the host: under several processes every process checks its own copy), then the
    shapes of its metrics (``shapes()``, an ``eval_shape`` of the compiled measurement: its trace is then cached
    by ``jit``). ValueError naming ``measure_data`` (or ``data``) when it cannot run on it, and naming both sides
    when one of its metrics would overwrite a history column (``columns``: the evaluated metrics, ``step``
    added)."""
    if measure is None:
        return {}
    data = inputs.measure_source if inputs.measure_source is not None else inputs.measure_data
    try:
        if getattr(measure, "check", None) is not None:
            measure.check(to_host(params()), data)
        struct = shapes()
    except OSError:  # the data's own I/O error (a source whose file went away) reaches the user as itself
        raise
    except Exception as e:  # any failure to trace the measurement on this data (shapes, structure, dtypes)
        raise ValueError(f"the measurement cannot run on {inputs.measure_name} ({_describe(data)}): "
                         f"{type(e).__name__}: {e}") from e
    for name in struct:
        if name == "step" or name in columns:
            raise ValueError(
                f"the measurement returns a metric named {name!r}, and so does {_owner(name)}: it would "
                f"overwrite that history column; rename the measurement's metrics (the trackers' name=..., e.g. "
                f"trace_tracker(f, name='hessian_trace')) or the eval_fn key"
            )
    return {k: np.full(v.shape, np.nan, v.dtype) for k, v in struct.items()}
