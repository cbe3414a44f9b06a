"""``sweep``: the same training run ``vmap``-ped over a grid of hyperparameters and seeds, compiled once.

Member (i, j) is ``train(objective, optimizer_fn(**{name: values[i]}, seed=seeds[j]), params, data,
key=seeds[j], ...)``: every hyperparameter the optimizer factory takes (``sigma``, ``learning_rate``,
momentum, ...) reaches it as a traced scalar, the seed too. The S value tuples (the columns of
``hyperparams`` zipped; build a product with ``np.meshgrid``) times the R seeds are processed
``members_per_chunk`` at a time (``lax.map`` over chunks of a ``vmap``), so activation memory is that of
``members_per_chunk`` runs; every member's parameters and optimizer state stay resident. With several
devices the members of a chunk are sharded over them.

A member that diverges is frozen at its last finite step (it does not raise): ``diverged_step`` is
that step, and every history entry evaluated after it is NaN, as measured values would mislead.

Example:
  >>> import jax.numpy as jnp, optax
  >>> f = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
  >>> data = (jnp.eye(2), jnp.ones(2))
  >>> res = sweep(f, lambda learning_rate, seed: optax.sgd(learning_rate), jnp.zeros(2), data,
  ...             {"learning_rate": [0.1, 1.0, 1e30]}, [0], num_steps=4)
  >>> res.history["train_loss"][:, 0, -1].round(3).tolist(), res.diverged_step[:, 0].tolist()
  ([0.43, 0.0, nan], [-1, -1, 1])
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lsgeo.optim import clean_params
from lsgeo.train.chunk import chunk_schedule, measure_at, run_chunk
from lsgeo.train.devices import data_mesh, replicate, to_host
from lsgeo.train import run as run_lib
from lsgeo.train.state import TrainState, with_state_views
from lsgeo.validation import check_callable, check_positive_int

PyTree = Any

__all__ = ["sweep", "SweepResult"]


@with_state_views
class SweepResult(NamedTuple):
    """Result of :func:`sweep`: every leaf has leading axes ``[S, R]`` (value tuples, seeds).

    Attributes:
      params: the clean final parameters of every member.
      history: dict of arrays ``[S, R, num_evals]`` (NaN after a member's divergence).
      state: the stacked final :class:`TrainState` of every member.
      diverged_step: ``[S, R]`` int, -1 for members that stayed finite.
      hyperparams: the grid, ``{name: [S] array}`` (empty for a sweep over seeds only).
      seeds: ``[R]``.
    """

    params: PyTree
    history: dict
    state: TrainState
    diverged_step: np.ndarray
    hyperparams: dict
    seeds: np.ndarray



def _check_grid(hyperparams, seeds) -> tuple[dict, np.ndarray]:
    if not isinstance(hyperparams, Mapping):
        raise ValueError(f"hyperparams must be a dict {{name: 1-D values}} ({{}} for seeds only), got {hyperparams!r}")
    grid = {}
    for name, values in hyperparams.items():
        v = np.asarray(values)
        if v.ndim != 1 or v.size == 0 or not np.issubdtype(v.dtype, np.number) or v.dtype == bool:
            raise ValueError(f"hyperparams[{name!r}] must be a non-empty 1-D sequence of numbers, got {values!r}")
        if not np.all(np.isfinite(v)) or (name == "sigma" and np.any(v < 0)):
            raise ValueError(f"hyperparams[{name!r}] must be finite{' and >= 0' if name == 'sigma' else ''}, got {v}")
        grid[name] = v
    sizes = {name: v.size for name, v in grid.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"hyperparams values must all have the same length (they are zipped); got {sizes}")
    seeds_np = np.asarray(seeds)
    if seeds_np.ndim != 1 or seeds_np.size == 0 or not np.issubdtype(seeds_np.dtype, np.integer):
        raise ValueError(f"seeds must be a non-empty 1-D sequence of integers, got {seeds!r}")
    if np.any(seeds_np < 0) or np.any(seeds_np >= 2**31):
        raise ValueError(f"seeds must be integers in [0, 2**31) (they travel as int32), got {seeds_np}")
    return grid, seeds_np


def _traced_hint(hyper) -> str:
    names = ", ".join([*hyper, "seed"])
    return (
        f"optimizer_fn receives its hyperparameters and seed ({names}) as traced jax scalars (the sweep is "
        f"vmapped over them), so it cannot branch on them with Python if/int()/float(); use jnp.where, "
        f"optax schedules or a separate sweep per branch"
    )


def _make_optimizer(optimizer_fn, hyper, seed, params):
    """``optimizer_fn(**hyper, seed=seed)`` and its state at ``params``, with errors that name ``optimizer_fn``."""
    try:
        optimizer = optimizer_fn(**hyper, seed=seed)
    except jax.errors.ConcretizationTypeError as e:
        raise TypeError(_traced_hint(hyper)) from e
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer_fn must return an optax.GradientTransformation, got {type(optimizer).__name__}: "
            f"{optimizer!r:.200}"
        )
    try:
        optimizer.init(params)
    except jax.errors.ConcretizationTypeError as e:
        raise TypeError(_traced_hint(hyper) + " (raised by the returned optimizer's init)") from e
    return optimizer


def _member_start(objective, optimizer_fn, eval_fn, schedule, init_fns, params, model_state, hyper, seed, data, eval_data):
    """``start_state`` of one member, its optimizer ``optimizer_fn(**hyper, seed=seed)`` made at its initial params."""
    params, model_state = run_lib.initial_values(init_fns, params, model_state, seed)
    optimizer = _make_optimizer(optimizer_fn, hyper, seed, params)
    return run_lib.start_state(objective, optimizer, eval_fn, schedule, (None, None), params, model_state, seed, data,
                               eval_data)  # the initial values drawn: no init_fns left


def _over_members(fn, members, mesh):
    """``fn`` over ``members`` (leaves ``[C, B, ...]``): ``lax.map`` over the C chunks of a ``vmap`` over B."""

    def one_chunk(chunk):
        if mesh is not None:
            chunk = jax.lax.with_sharding_constraint(chunk, NamedSharding(mesh, P("data")))
        return jax.vmap(fn)(*chunk)

    return jax.lax.map(one_chunk, members)


def _sweep_start(objective, optimizer_fn, eval_fn, schedule, init_fns, params, model_state, hyper, seeds, data, eval_data):
    def fn(h, s):
        return _member_start(objective, optimizer_fn, eval_fn, schedule, init_fns, params, model_state, h, s, data,
                             eval_data)

    return _over_members(fn, (hyper, seeds), schedule.mesh)


def _sweep_chunk(objective, optimizer_fn, eval_fn, schedule, state, hyper, seeds, data, eval_data):
    def fn(st, h, s):
        return run_chunk(objective, optimizer_fn(**h, seed=s), eval_fn, schedule, st, data, eval_data)

    return _over_members(fn, (state, hyper, seeds), schedule.mesh)


def _sweep_measure(schedule, state, data):
    """The measurement of every member (``lsgeo.train.chunk.measure_at``), chunked and vmapped as the training."""
    return _over_members(lambda st: measure_at(schedule, st, data), (state,), schedule.mesh)


_STATIC = ("objective", "optimizer_fn", "eval_fn", "schedule")
_sweep_start_jit = jax.jit(_sweep_start, static_argnames=_STATIC + ("init_fns",))
_sweep_chunk_jit = jax.jit(_sweep_chunk, static_argnames=_STATIC)
_sweep_measure_jit = jax.jit(_sweep_measure, static_argnames="schedule")


@run_lib.with_run_options
def sweep(
    objective: Callable,
    optimizer_fn: Callable,
    params,
    data,
    hyperparams: Mapping[str, Sequence[float]],
    seeds: Sequence[int],
    *,
    members_per_chunk: int | None = None,
    **options,
) -> SweepResult:
    """:func:`lsgeo.train.train` for every (hyperparameter values, seed) member, vmapped, compiled once.

    Args:
      objective, data: as in :func:`lsgeo.train.train`.
      optimizer_fn: ``optimizer_fn(**values, seed=seed) -> optax.GradientTransformation``, e.g.
        ``lambda sigma, seed: noise_injection(optax.sgd(0.1), sigma, seed=seed)``. The values and the
        seed arrive traced: Python branching on them is a TypeError (use ``jnp.where``, schedules).
      params: the clean w_0 shared by all members, or a callable ``init_key -> params`` (one
        initialisation per seed); ``model_state`` likewise. Not a ``TrainState``: a sweep starts its runs, it
        does not resume one (ValueError).
      hyperparams: ``{name: [S] values}``, zipped (all the same length S); the names are the keywords
        of ``optimizer_fn``. ``sigma`` values must be >= 0. ``{}``: S = 1, ``optimizer_fn(seed=seed)``
        (a sweep over seeds only).
      seeds: ``[R]`` integers in [0, 2**31): the init, data and noise seed of each member (disjoint
        streams of one seed, :mod:`lsgeo.streams`).
      members_per_chunk: members evaluated together (``vmap``); default all S * R. Rounded up to a
        multiple of the device count.
      **options: the keywords of :class:`lsgeo.train.run.RunOptions`, as in :func:`lsgeo.train.train`, except
        that ``devices`` shard the members, ``callback(step, metrics)`` gets ``[S, R]`` metric arrays, and every
        member carries its own measurement state (a tracked sweep compiles once; ``measure_data``, shared by all
        members, is an argument of the compiled measurement program, replicated like ``eval_data``).

    Returns:
      :class:`SweepResult`. Diverged members do not raise (module docstring).

    Cost: S R num_steps gradient steps; one compilation for any grid of the same shape (reuse the same
    ``objective``/``optimizer_fn``/``eval_fn`` objects). Memory: every member's state, plus the
    activations of ``members_per_chunk`` runs.
    """
    check_callable(optimizer_fn, "optimizer_fn")
    if isinstance(params, TrainState):
        raise ValueError(
            "sweep takes params, the clean initial parameters w_0 of every member (or a callable init_key -> params), "
            "not a TrainState: a sweep starts its runs and cannot resume one; pass result.params to start from "
            "trained parameters, or resume a run with lsgeo.train.train(..., params=state)"
        )
    run, n = run_lib.checked_run("sweep", objective, params, data, options)
    measure, model_state = run.measure, run.model_state
    grid, seeds_np = _check_grid(hyperparams, seeds)
    S, R = next(iter(grid.values())).size if grid else 1, seeds_np.size
    G = S * R
    mesh = data_mesh(run.devices)
    num_devices = 1 if mesh is None else mesh.size
    B = G if members_per_chunk is None else members_per_chunk
    check_positive_int(B, "members_per_chunk")
    B = -(-min(B, G) // num_devices) * num_devices
    C = -(-G // B)

    def members(values):  # [S, R] -> [C, B], padded by repeating the last member
        flat = np.asarray(values).reshape(G)
        return np.concatenate([flat, np.repeat(flat[-1:], C * B - G)]).reshape(C, B)

    dtype = jnp.zeros(()).dtype  # float32, or float64 under x64
    hyper = {k: jnp.asarray(members(np.repeat(v, R).reshape(S, R)), dtype) for k, v in grid.items()}
    keys = jnp.asarray(members(np.tile(seeds_np, (S, 1))).astype(np.int32))
    if mesh is not None:
        hyper, keys = jax.device_put((hyper, keys), NamedSharding(mesh, P(None, "data")))
        data = replicate(mesh, data)
        params = params if callable(params) else replicate(mesh, params)
        model_state = model_state if callable(model_state) or model_state is None else replicate(mesh, model_state)
    inputs = run_lib.RunInputs.of(run, mesh, data)
    schedule = run.schedule(mesh, False, inputs.measure_source)
    static = dict(objective=objective, optimizer_fn=optimizer_fn, eval_fn=inputs.eval_fn,
                  schedule=chunk_schedule(schedule))
    eval_data, measure_data = inputs.eval_data, inputs.measure_data

    init_fns, params, model_state = run_lib.split_init_fns(params, model_state)
    state, metrics = _sweep_start_jit(init_fns=init_fns, params=params, model_state=model_state, hyper=hyper,
                                      seeds=keys, data=data, eval_data=eval_data, **{**static, "schedule": schedule})
    def first_member():  # the clean w_0 of member (0, 0), gathered to the host
        clean = to_host(clean_params(state.params, state.opt_state))
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[0, 0], clean)

    not_due = run_lib.measurement_rows(  # NaN where not due (shapes only: the measurement program's cached trace)
        measure, first_member, inputs,
        lambda: _sweep_measure_jit.eval_shape(schedule=schedule, state=state, data=measure_data)[1], metrics,
    )  # fmt: skip

    program = None if measure is None else lambda st: _sweep_measure_jit(schedule=schedule, state=st, data=measure_data)

    def unflat(x):  # [C, B, ...] -> [S, R, ...]
        x = x.reshape((C * B,) + x.shape[2:])[:G]
        return x.reshape((S, R) + x.shape[1:])

    state, metrics = run_lib.measured(program, not_due, state, metrics, True)
    history = [metrics]
    for chunk in range(1, run.num_steps // run.eval_every + 1):
        state, metrics = _sweep_chunk_jit(state=state, hyper=hyper, seeds=keys, data=data, eval_data=eval_data, **static)
        due = chunk * run.eval_every % run.measure_every == 0
        state, metrics = run_lib.measured(program, not_due, state, metrics, due)
        history.append(metrics)
        if run.callback is not None:
            run.callback(chunk * run.eval_every, {k: unflat(v) for k, v in history[-1].items()})

    state = to_host(state)  # several processes: every process gets the whole result
    steps = np.arange(0, run.num_steps + 1, run.eval_every)
    diverged = np.asarray(unflat(state.divergence.step))
    after = (diverged[..., None] >= 0) & (steps > diverged[..., None])
    hist = {k: np.where(after, np.nan, unflat(v)) for k, v in run_lib.stack_history(history).items()}
    final = jax.tree_util.tree_map(unflat, state)
    return SweepResult(
        params=clean_params(final.params, final.opt_state),
        history={"step": np.broadcast_to(steps, (S, R, steps.size)).copy(), **hist},
        state=final,
        diverged_step=diverged,
        hyperparams=grid,
        seeds=seeds_np,
    )
