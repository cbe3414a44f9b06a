"""Training engine on ``lax.scan``: GD / minibatch SGD, noise injection, SAM, SWA, vmapped sweeps.

One training run is ``num_steps`` optimizer steps, scanned in chunks of ``eval_every`` steps; after
each chunk the model is evaluated at the *clean* parameters (``lsgeo.optim.clean_params``: the
iterate w_t of the noise-injection step of Orvieto et al. 2023, Section 5, not the perturbed point
the loop holds). The chunk function is compiled once and called ``num_steps / eval_every`` times
from Python, which checks for divergence and drives an optional tqdm bar between chunks.

Objectives (the lsgeo contract, DESIGN sections 2-3):

- stateless: ``objective(params, batch) -> scalar``;
- with non-parameter state (BatchNorm): ``objective(params, model_state, batch) -> (loss, new_model_state)``,
  selected by passing ``model_state``. The statistics are updated by the forward pass at the point
  the loop holds (the perturbed point, under noise injection) and are never perturbed themselves.

Data: ``data`` is a pytree of arrays with a common leading axis n (e.g. ``(x, y)``), passed as an
argument to the compiled function (never a closure constant). ``batch_size=None`` is full-batch GD
(the paper's setting). Otherwise minibatch SGD: epoch e = t // (n // batch_size) visits
``jax.random.permutation(fold_in(data_key, e), n)`` in order, batch_size at a time (the remainder
n mod batch_size is dropped), with ``init_key, data_key = jax.random.split(key)``.

Optimizers: any optax transformation. ``lsgeo.optim.noise_injection`` (the loop starts at
``perturbed_params(w0, opt_state)``); ``optax.contrib.sam`` in either mode (``opaque_mode=True``: the
loop passes ``grad_fn(params, i)``, one loop step = one SAM step; transparent mode: one loop step =
one adversarial or outer step, and evaluation uses the outer iterate). ``GradientTransformationExtraArgs``
receive ``grad_fn`` (the gradient of the objective on the current batch, model state fixed).

History: a dict of numpy arrays ``[num_evals]`` with ``num_evals = num_steps // eval_every + 1``
(step 0 included):
  ``step``        the step count t at the evaluation;
  ``train_loss``  objective at the clean parameters on the training data (full batch; with
                  ``batch_size``, the mean over the n // batch_size batches in order);
  ``batch_loss``  mean objective the optimizer saw (perturbed point, minibatches) over the chunk that
                  ended at this evaluation (at step 0: ``train_loss``);
  every key of ``eval_fn(params, eval_data)`` (or ``eval_fn(params, model_state, eval_data)``);
  with SWA, the same keys prefixed ``swa_`` at the averaged parameters.

Divergence: a step whose loss, gradient or updated parameters are non-finite freezes the run (the state stays at the last
finite step, so no NaNs propagate); ``train`` then raises :class:`TrainingDiverged` with the step,
the quantity and the history up to the last finite evaluation. A non-finite evaluated metric raises
the same error. ``sweep`` does not raise: it returns ``diverged_step`` and NaN history entries after it.

Devices: with several ``jax.devices()`` (or ``devices=[...]``), ``train`` shards the data and each
batch along the example axis over a 1-D ``Mesh`` (data parallel; XLA inserts the gradient all-reduce)
and ``sweep`` shards the (sigma, seed) members over it. On one device nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lsgeo.optim import clean_params, perturbed_params
from lsgeo.validation import check_nonnegative_int, check_positive_int

PyTree = Any

__all__ = ["TrainResult", "SweepResult", "TrainingDiverged", "train", "sweep", "split_key", "epoch_permutation"]

_QUANTITIES = {1: "loss", 2: "gradient", 3: "params"}


class TrainingDiverged(FloatingPointError):
    """A training run produced a non-finite value.

    Attributes:
      step: the step t at which ``quantity`` went non-finite (for an evaluated metric: the evaluation step).
      quantity: ``"loss"``, ``"gradient"`` or the name of a history metric.
      history: dict of numpy arrays up to the last finite evaluation.
    """

    def __init__(self, step: int, quantity: str, history: dict):
        self.step = int(step)
        self.quantity = quantity
        self.history = history
        super().__init__(f"training diverged at step {self.step}: {quantity} is not finite")


class TrainResult(NamedTuple):
    """Result of :func:`train`.

    Attributes:
      params: the clean final parameters w_T (``clean_params`` of the point the loop held).
      opt_state: final optimizer state (resume with ``train(..., params, opt_state=...)``).
      model_state: final non-parameter state (None for stateless objectives).
      history: dict of numpy arrays ``[num_evals]`` (see the module docstring).
      swa_params: the SWA average (None without ``swa_start``).
      steps: the number of steps done (the final step count).
    """

    params: PyTree
    opt_state: Any
    model_state: Any
    history: dict
    swa_params: Any
    steps: int


class SweepResult(NamedTuple):
    """Result of :func:`sweep`: every leaf has leading axes ``[num_sigmas, num_seeds]``.

    ``history`` values are ``[num_sigmas, num_seeds, num_evals]``; ``diverged_step`` is -1 for runs
    that stayed finite, else the step at which the run froze (later history entries are NaN).
    """

    params: PyTree
    opt_state: Any
    model_state: Any
    history: dict
    swa_params: Any
    diverged_step: np.ndarray
    sigmas: np.ndarray
    seeds: np.ndarray


class _Carry(NamedTuple):
    params: PyTree  # the point the loop holds (z_t under noise injection)
    opt_state: Any
    model_state: Any
    data_key: jax.Array  # raw key data
    perm: Any  # current epoch's permutation [n] (minibatch) or None
    step: jax.Array
    loss_sum: jax.Array
    swa_params: Any
    swa_count: Any
    diverged_at: jax.Array  # -1 while finite
    diverged_what: jax.Array  # 0, or a key of _QUANTITIES


@dataclass(frozen=True)
class _Config:
    eval_every: int
    batch_size: Optional[int]
    num_examples: int
    stateful: bool
    swa_start: Optional[int]
    swa_every: int
    mesh: Optional[Mesh]
    shard_batch: bool


def split_key(key) -> tuple[jax.Array, jax.Array]:
    """``(init_key, data_key)`` from ``key`` (an int seed, possibly traced, or a PRNG key)."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        k = key
    elif isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.ndim == 1:
        k = jax.random.wrap_key_data(key)
    else:
        k = jax.random.key(key)
    init_key, data_key = jax.random.split(k)
    return init_key, data_key


def epoch_permutation(data_key, epoch, num_examples: int) -> jax.Array:
    """The order in which minibatch SGD visits the examples in ``epoch``."""
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)


# --------------------------------------------------------------------------------------------------
# one step, one chunk, evaluation


def _value_and_grad(objective, cfg: _Config, params, model_state, batch):
    if cfg.stateful:
        (loss, new_ms), grads = jax.value_and_grad(lambda p: objective(p, model_state, batch), has_aux=True)(params)
        return loss, grads, new_ms
    loss, grads = jax.value_and_grad(objective)(params, batch)
    return loss, grads, model_state


def _loss(objective, cfg: _Config, params, model_state, batch):
    return objective(params, model_state, batch)[0] if cfg.stateful else objective(params, batch)


def _constrain(cfg: _Config, batch):
    if cfg.mesh is None or not cfg.shard_batch:
        return batch
    return jax.lax.with_sharding_constraint(batch, NamedSharding(cfg.mesh, P("data")))


def _take(data, idx):
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), data)


def _get_batch(cfg: _Config, carry: _Carry, data):
    if cfg.batch_size is None:
        return carry.perm, data
    spe = cfg.num_examples // cfg.batch_size
    epoch, i = carry.step // spe, carry.step % spe
    key = jax.random.wrap_key_data(carry.data_key)
    perm = jax.lax.cond(
        i == 0, lambda: epoch_permutation(key, epoch, cfg.num_examples).astype(jnp.int32), lambda: carry.perm
    )
    idx = jax.lax.dynamic_slice_in_dim(perm, i * cfg.batch_size, cfg.batch_size)
    return perm, _constrain(cfg, _take(data, idx))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(ok, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def _step(objective, optimizer, cfg: _Config, carry: _Carry, data) -> _Carry:
    perm, batch = _get_batch(cfg, carry, data)
    loss, grads, new_ms = _value_and_grad(objective, cfg, carry.params, carry.model_state, batch)
    extra = {}
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
        ms = carry.model_state

        def grad_fn(p, _i):
            return jax.grad(lambda q: _loss(objective, cfg, q, ms, batch))(p)

        extra["grad_fn"] = grad_fn
    updates, opt_state = optimizer.update(grads, carry.opt_state, carry.params, **extra)
    params = optax.apply_updates(carry.params, updates)
    step = carry.step + 1

    swa_params, swa_count = carry.swa_params, carry.swa_count
    if cfg.swa_start is not None:
        w = clean_params(params, opt_state)
        take = (step >= cfg.swa_start) & ((step - cfg.swa_start) % cfg.swa_every == 0)
        cnt = swa_count.astype(jnp.float32)
        avg = jax.tree_util.tree_map(lambda s, x: s + (x - s) / (cnt + 1).astype(s.dtype), swa_params, w)
        avg = jax.tree_util.tree_map(lambda a, x: jnp.where(swa_count == 0, x, a), avg, w)
        swa_params = _select(take, avg, swa_params)
        swa_count = swa_count + take.astype(swa_count.dtype)

    loss_ok = jnp.isfinite(loss)
    grad_ok = _all_finite(grads)
    params_ok = _all_finite(params)
    finite = loss_ok & grad_ok & params_ok
    ok = finite & (carry.diverged_at < 0)
    new = _Carry(
        params=params,
        opt_state=opt_state,
        model_state=new_ms,
        data_key=carry.data_key,
        perm=perm,
        step=step,
        loss_sum=carry.loss_sum + loss.astype(carry.loss_sum.dtype),
        swa_params=swa_params,
        swa_count=swa_count,
        diverged_at=carry.diverged_at,
        diverged_what=carry.diverged_what,
    )
    first_bad = (~finite) & (carry.diverged_at < 0)
    what = jnp.where(~loss_ok, 1, jnp.where(~grad_ok, 2, 3))
    frozen = carry._replace(
        diverged_at=jnp.where(first_bad, carry.step, carry.diverged_at),
        diverged_what=jnp.where(first_bad, what, carry.diverged_what).astype(jnp.int32),
    )
    return _select(ok, new, frozen)


def _train_loss(objective, cfg: _Config, params, model_state, data):
    if cfg.batch_size is None:
        return _loss(objective, cfg, params, model_state, data)
    nb = cfg.num_examples // cfg.batch_size
    chunks = jax.tree_util.tree_map(
        lambda a: a[: nb * cfg.batch_size].reshape((nb, cfg.batch_size) + a.shape[1:]), data
    )
    return jnp.mean(jax.lax.map(lambda b: _loss(objective, cfg, params, model_state, _constrain(cfg, b)), chunks))


def _metrics_at(objective, eval_fn, cfg: _Config, params, model_state, data, eval_data, prefix=""):
    out = {prefix + "train_loss": _train_loss(objective, cfg, params, model_state, data)}
    if eval_fn is not None:
        extra = eval_fn(params, model_state, eval_data) if cfg.stateful else eval_fn(params, eval_data)
        if not isinstance(extra, dict):
            raise ValueError(f"eval_fn must return a dict of scalars, got {type(extra).__name__}")
        for k, v in extra.items():
            out[prefix + str(k)] = jnp.asarray(v)
    return out


def _evaluate(objective, eval_fn, cfg: _Config, carry: _Carry, data, eval_data, batch_loss=None):
    w = clean_params(carry.params, carry.opt_state)
    m = _metrics_at(objective, eval_fn, cfg, w, carry.model_state, data, eval_data)
    out = {"step": carry.step, "train_loss": m["train_loss"]}
    out["batch_loss"] = m["train_loss"] if batch_loss is None else batch_loss
    out.update({k: v for k, v in m.items() if k != "train_loss"})
    if cfg.swa_start is not None:
        out.update(_metrics_at(objective, eval_fn, cfg, carry.swa_params, carry.model_state, data, eval_data, "swa_"))
    return out


def _init(objective, make_opt, eval_fn, cfg: _Config, init_fns, params, model_state, hyper, key, opt_state, start_step, data, eval_data):
    init_key, data_key = split_key(key)
    params_fn, state_fn = init_fns
    if params_fn is not None:
        params = params_fn(init_key)
    if state_fn is not None:
        model_state = state_fn(init_key)
    optimizer = make_opt(*hyper)
    if opt_state is None:
        opt_state = optimizer.init(params)
    z = perturbed_params(params, opt_state)
    step = jnp.asarray(start_step, jnp.int32)
    carry = _Carry(
        params=z,
        opt_state=opt_state,
        model_state=model_state,
        data_key=jax.random.key_data(data_key),
        perm=None if cfg.batch_size is None else jnp.arange(cfg.num_examples, dtype=jnp.int32),
        step=step,
        loss_sum=jnp.zeros((), jnp.result_type(float)),
        swa_params=params if cfg.swa_start is not None else None,
        swa_count=jnp.zeros((), jnp.int32) if cfg.swa_start is not None else None,
        diverged_at=jnp.asarray(-1, jnp.int32),
        diverged_what=jnp.asarray(0, jnp.int32),
    )
    return carry, _evaluate(objective, eval_fn, cfg, carry, data, eval_data)


def _chunk(objective, make_opt, eval_fn, cfg: _Config, carry: _Carry, hyper, data, eval_data):
    optimizer = make_opt(*hyper)
    carry = carry._replace(loss_sum=jnp.zeros_like(carry.loss_sum))
    start = carry.step

    def body(c, _):
        return _step(objective, optimizer, cfg, c, data), None

    carry, _ = jax.lax.scan(body, carry, None, length=cfg.eval_every)
    done = jnp.maximum(carry.step - start, 1).astype(carry.loss_sum.dtype)
    return carry, _evaluate(objective, eval_fn, cfg, carry, data, eval_data, carry.loss_sum / done)


_STATIC = ("objective", "make_opt", "eval_fn", "cfg")
_init_jit = jax.jit(_init, static_argnames=_STATIC + ("init_fns",))
_chunk_jit = jax.jit(_chunk, static_argnames=_STATIC)


# vmapped over members: lax.map over chunks of members, vmap within a chunk (bounded memory)


def _grid_map(fn, member_args, shared_args, members_per_chunk: int, mesh: Optional[Mesh]):
    """fn(*member, *shared) over the leading member axis of ``member_args`` (already [C, B, ...])."""

    def one_chunk(member):
        if mesh is not None:
            member = jax.lax.with_sharding_constraint(member, NamedSharding(mesh, P("data")))
        return jax.vmap(lambda *m: fn(*m, *shared_args))(*member)

    return jax.lax.map(one_chunk, member_args)


def _sweep_init(objective, make_opt, eval_fn, cfg: _Config, members_per_chunk, init_fns, params, model_state, hyper, keys, data, eval_data):
    def fn(h, k, data, eval_data):
        return _init(objective, make_opt, eval_fn, cfg, init_fns, params, model_state, h, k, None, 0, data, eval_data)

    return _grid_map(fn, (hyper, keys), (data, eval_data), members_per_chunk, cfg.mesh)


def _sweep_chunk(objective, make_opt, eval_fn, cfg: _Config, members_per_chunk, carry, hyper, data, eval_data):
    def fn(c, h, data, eval_data):
        return _chunk(objective, make_opt, eval_fn, cfg, c, h, data, eval_data)

    return _grid_map(fn, (carry, hyper), (data, eval_data), members_per_chunk, cfg.mesh)


_sweep_init_jit = jax.jit(_sweep_init, static_argnames=_STATIC + ("members_per_chunk", "init_fns"))
_sweep_chunk_jit = jax.jit(_sweep_chunk, static_argnames=_STATIC + ("members_per_chunk",))


# --------------------------------------------------------------------------------------------------
# drivers


@dataclass(frozen=True)
class _Fixed:
    """Hashable constant optimizer factory (jit caches on the optimizer's functions)."""

    optimizer: Any

    def __call__(self):
        return self.optimizer


def _num_examples(data) -> int:
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("data must be a non-empty pytree of arrays with a leading example axis")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"data leaves must share a leading example axis; got leading sizes {sorted(map(str, sizes))}")
    return int(sizes.pop())


def _check_common(num_steps, eval_every, batch_size, n, swa_start, swa_every):
    check_positive_int(num_steps, "num_steps")
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


def _mesh(devices) -> Optional[Mesh]:
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) <= 1:
        return None
    return Mesh(np.asarray(devices), ("data",))


def _place_data(mesh, data, n, batch_size):
    """Shards the example axis over the mesh when it divides evenly (else replicates)."""
    if mesh is None:
        return data, False
    nd = mesh.size
    shard = n % nd == 0 and (batch_size is None or batch_size % nd == 0)
    spec = P("data") if shard else P()
    return jax.device_put(data, NamedSharding(mesh, spec)), shard


def _replicate(mesh, tree):
    if mesh is None or tree is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _to_numpy(metrics: dict) -> dict:
    return {k: np.asarray(v) for k, v in metrics.items()}


def _stack(history: list[dict]) -> dict:
    if not history:
        return {}
    return {k: np.stack([h[k] for h in history], axis=-1) for k in history[0]}


def _progress(total, enabled, desc):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def train(
    objective: Callable,
    optimizer: optax.GradientTransformation,
    params,
    data,
    *,
    num_steps: int,
    eval_every: Optional[int] = None,
    batch_size: Optional[int] = None,
    eval_fn: Optional[Callable] = None,
    eval_data=None,
    model_state=None,
    key=0,
    opt_state=None,
    start_step: int = 0,
    swa_start: Optional[int] = None,
    swa_every: int = 1,
    devices=None,
    progress: bool = False,
) -> TrainResult:
    """Trains ``params`` with ``optimizer`` on ``objective`` for ``num_steps`` steps (``lax.scan``).

    Args:
      objective: ``f(params, batch) -> scalar``, or with ``model_state`` given,
        ``f(params, model_state, batch) -> (loss, new_model_state)``.
      optimizer: any optax transformation, e.g. ``lsgeo.optim.noise_injection(optax.sgd(lr), sigma)``
        or ``optax.contrib.sam(...)``.
      params: the clean initial parameters w_0, or a callable ``init_key -> params``.
      data: pytree of arrays with a leading example axis n (e.g. ``(x, y)``).
      num_steps: number of optimizer steps (a multiple of ``eval_every``).
      eval_every: evaluate every this many steps (default: ``num_steps``, i.e. at the start and end).
      batch_size: None for full-batch GD, else minibatch SGD with per-epoch shuffling.
      eval_fn: ``eval_fn(params, eval_data) -> dict of scalars`` (``eval_fn(params, model_state,
        eval_data)`` with ``model_state``), called at the clean parameters, e.g. test loss, accuracy,
        a Gauss-Newton trace.
      eval_data: any pytree passed to ``eval_fn`` as an argument.
      model_state: initial non-parameter state (or a callable ``init_key -> state``); selects the
        stateful objective signature.
      key: int seed or PRNG key; ``init_key, data_key = split_key(key)``.
      opt_state: resume from this optimizer state (``params`` are then the clean w_t of that state).
      start_step: step count to resume from (selects the epoch permutation and SWA schedule).
      swa_start, swa_every: stochastic weight averaging (Izmailov et al., 2018): the running mean of
        the clean iterates w_t for t >= swa_start, t - swa_start a multiple of swa_every.
      devices: devices for data parallelism (default ``jax.devices()``; one device: unsharded).
      progress: show a tqdm bar over steps.

    Returns:
      :class:`TrainResult`. Raises :class:`TrainingDiverged` on a non-finite loss, gradient or metric.

    Cost: num_steps forward+backward passes plus num_evals evaluations; one compilation of the
    chunk function per (objective, optimizer, eval_fn, shapes), reused across calls.
    """
    n = _num_examples(data)
    eval_every = num_steps if eval_every is None else eval_every
    _check_common(num_steps, eval_every, batch_size, n, swa_start, swa_every)
    check_nonnegative_int(start_step, "start_step")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    mesh = _mesh(devices)
    data, shard = _place_data(mesh, data, n, batch_size)
    eval_data = _replicate(mesh, eval_data)
    if not callable(params):
        params = _replicate(mesh, params)
    if model_state is not None and not callable(model_state):
        model_state = _replicate(mesh, model_state)
    opt_state = _replicate(mesh, opt_state)
    cfg = _Config(eval_every, batch_size, n, model_state is not None, swa_start, swa_every, mesh, shard)
    make_opt = _Fixed(optimizer)
    static = dict(objective=objective, make_opt=make_opt, eval_fn=eval_fn, cfg=cfg)

    init_fns, params, model_state = _split_init_fns(params, model_state)
    carry, metrics = _init_jit(
        init_fns=init_fns, params=params, model_state=model_state, hyper=(), key=key, opt_state=opt_state,
        start_step=start_step, data=data, eval_data=eval_data, **static,
    )  # fmt: skip
    history = [_to_numpy(metrics)]
    _check_metrics(history, start_step)
    bar = _progress(num_steps, progress, "train")
    try:
        for _ in range(num_steps // eval_every):
            carry, metrics = _chunk_jit(carry=carry, hyper=(), data=data, eval_data=eval_data, **static)
            diverged_at = int(carry.diverged_at)
            if diverged_at >= 0:
                raise TrainingDiverged(diverged_at, _QUANTITIES[int(carry.diverged_what)], _stack(history))
            history.append(_to_numpy(metrics))
            _check_metrics(history, int(metrics["step"]))
            if bar is not None:
                bar.update(eval_every)
                bar.set_postfix(train_loss=float(metrics["train_loss"]))
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(
        params=clean_params(carry.params, carry.opt_state),
        opt_state=carry.opt_state,
        model_state=carry.model_state,
        history=_stack(history),
        swa_params=carry.swa_params,
        steps=int(carry.step),
    )


def _split_init_fns(params, model_state):
    params_fn = params if callable(params) else None
    state_fn = model_state if callable(model_state) else None
    return (params_fn, state_fn), (None if params_fn else params), (None if state_fn else model_state)


def _check_metrics(history: list[dict], step: int) -> None:
    for k, v in history[-1].items():
        if not np.all(np.isfinite(v)):
            raise TrainingDiverged(step, k, _stack(history[:-1]))


def sweep(
    objective: Callable,
    optimizer_fn: Callable,
    params,
    data,
    sigmas,
    seeds,
    *,
    num_steps: int,
    eval_every: Optional[int] = None,
    batch_size: Optional[int] = None,
    eval_fn: Optional[Callable] = None,
    eval_data=None,
    model_state=None,
    swa_start: Optional[int] = None,
    swa_every: int = 1,
    members_per_chunk: Optional[int] = None,
    devices=None,
    progress: bool = False,
) -> SweepResult:
    """The same training as :func:`train`, vmapped over a grid of noise levels and seeds.

    Member (i, j) runs ``train(objective, optimizer_fn(sigmas[i], seeds[j]), params, data,
    key=seeds[j], ...)``; ``sigma`` and ``seed`` reach ``optimizer_fn`` as traced scalars, e.g.
    ``lambda s, seed: noise_injection(optax.sgd(0.1), s, mode="layerwise", seed=seed)``. ``params``
    (and ``model_state``) may be callables of the init key, giving each seed its own initialisation.

    The S * R members are processed ``members_per_chunk`` at a time (``lax.map`` over chunks of a
    ``vmap``; default: all at once), so activation memory is that of ``members_per_chunk`` runs;
    every member's parameters and optimizer state stay resident. One compilation for any grid of
    the same shape, reused across calls with the same ``objective``/``optimizer_fn``/``eval_fn``.
    With several devices the members of a chunk are sharded over them (``members_per_chunk`` is
    rounded up to a multiple of the device count).

    Returns:
      :class:`SweepResult` with leading axes ``[num_sigmas, num_seeds]``. Diverged runs do not raise.
    """
    n = _num_examples(data)
    eval_every = num_steps if eval_every is None else eval_every
    _check_common(num_steps, eval_every, batch_size, n, swa_start, swa_every)
    sigmas_np = np.asarray(sigmas, dtype=np.float64)
    seeds_np = np.asarray(seeds)
    if sigmas_np.ndim != 1 or sigmas_np.size == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {sigmas_np.shape}")
    if not np.all(np.isfinite(sigmas_np)) or np.any(sigmas_np < 0):
        raise ValueError(f"sigmas must be finite numbers >= 0, got {sigmas_np}")
    if seeds_np.ndim != 1 or seeds_np.size == 0 or not np.issubdtype(seeds_np.dtype, np.integer):
        raise ValueError(f"seeds must be a non-empty 1-D sequence of integers, got {seeds!r}")
    if not callable(optimizer_fn):
        raise ValueError("optimizer_fn must be a callable (sigma, seed) -> optax.GradientTransformation")
    S, R = sigmas_np.size, seeds_np.size
    G = S * R
    mesh = _mesh(devices)
    nd = 1 if mesh is None else mesh.size
    B = G if members_per_chunk is None else members_per_chunk
    check_positive_int(B, "members_per_chunk")
    B = -(-min(B, G) // nd) * nd
    C = -(-G // B)
    pad = C * B - G

    dtype = jnp.zeros(()).dtype  # float32, or float64 under x64
    sig = np.repeat(sigmas_np, R)
    sd = np.tile(seeds_np, S).astype(np.int32)
    sig = np.concatenate([sig, np.repeat(sig[-1:], pad)]).reshape(C, B)
    sd = np.concatenate([sd, np.repeat(sd[-1:], pad)]).reshape(C, B)
    hyper = (jnp.asarray(sig, dtype), jnp.asarray(sd))
    keys = jnp.asarray(sd)
    if mesh is not None:
        member_sharding = NamedSharding(mesh, P(None, "data"))
        hyper, keys = jax.device_put((hyper, keys), member_sharding)
        data = _replicate(mesh, data)
        eval_data = _replicate(mesh, eval_data)
        if not callable(params):
            params = _replicate(mesh, params)
        if model_state is not None and not callable(model_state):
            model_state = _replicate(mesh, model_state)
    cfg = _Config(eval_every, batch_size, n, model_state is not None, swa_start, swa_every, mesh, False)
    static = dict(objective=objective, make_opt=optimizer_fn, eval_fn=eval_fn, cfg=cfg, members_per_chunk=B)

    init_fns, params, model_state = _split_init_fns(params, model_state)
    carry, metrics = _sweep_init_jit(
        init_fns=init_fns, params=params, model_state=model_state, hyper=hyper, keys=keys, data=data, eval_data=eval_data, **static
    )
    history = [_to_numpy(metrics)]
    bar = _progress(num_steps, progress, "sweep")
    try:
        for _ in range(num_steps // eval_every):
            carry, metrics = _sweep_chunk_jit(carry=carry, hyper=hyper, data=data, eval_data=eval_data, **static)
            history.append(_to_numpy(metrics))
            if bar is not None:
                bar.update(eval_every)
    finally:
        if bar is not None:
            bar.close()

    def unflat(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        x = x.reshape((C * B,) + x.shape[2:])[:G]
        return x.reshape((S, R) + x.shape[1:])

    hist = {k: unflat(v) for k, v in _stack(history).items()}
    diverged = np.asarray(unflat(carry.diverged_at))
    steps = hist["step"]
    bad = (diverged[..., None] >= 0) & (steps > diverged[..., None])
    hist = {k: (v if k == "step" else np.where(bad, np.nan, v)) for k, v in hist.items()}
    final = jax.tree_util.tree_map(unflat, carry)
    return SweepResult(
        params=clean_params(final.params, final.opt_state),
        opt_state=final.opt_state,
        model_state=final.model_state,
        history=hist,
        swa_params=final.swa_params,
        diverged_step=diverged,
        sigmas=sigmas_np,
        seeds=seeds_np,
    )
