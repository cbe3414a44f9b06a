"""Data and models of the experiments: data splits (validation carved from the training data), the model
contract as objectives ``f(params, batch)``, evaluation functions, the classifiers (MLP / ResNet18) and the
final curvature measures at trained parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import context
from lsgeo import curvature, losses, models, risk, sharpness
from lsgeo import data as data_lib


METRICS = {"loss": losses.softmax_cross_entropy, "accuracy": losses.accuracy, "squared_loss": losses.squared_loss}


def load_dataset(name: str, **kwargs) -> data_lib.Dataset:
    """``lsgeo.data.load_dataset`` with the run's ``--data-dir`` and ``--download`` (``context.data_options``)."""
    options = context.data_options()
    return data_lib.load_dataset(name, data_dir=options.data_dir, download=options.download, **kwargs)


class Splits(NamedTuple):
    """Train, validation (None without one) and test batches ``(x, y)`` of jax arrays of a classification set."""

    train: tuple
    val: tuple | None
    test: tuple
    num_classes: int


def splits(
    dataset: str, *, n_train: int | None, n_val: int = 0, n_test: int | None = None, flatten: bool | None = None
) -> Splits:
    """``n_train`` training and ``n_val`` validation points drawn disjointly from the training split of
    ``dataset`` (``n_train=None``: all but ``n_val``), and ``n_test`` test points (None: all); deterministic.

    The inputs are standardised with the statistics of the training and validation inputs together
    (``lsgeo.data.load_dataset``: no labels involved); sigma is chosen on ``val``, never on ``test``."""
    ds = load_dataset(
        dataset, n_train=None if n_train is None else n_train + n_val, n_test=n_test, seed=0, flatten=flatten
    )
    if not 0 <= n_val < len(ds.x_train):
        raise ValueError(f"n_val={n_val} must leave training points of the {len(ds.x_train)} in {dataset}")
    order = np.random.default_rng(0).permutation(len(ds.x_train)) if n_val else np.arange(len(ds.x_train))
    val, tr = order[:n_val], order[n_val:]
    as_jax = lambda x, y: (jnp.asarray(x), jnp.asarray(y))
    return Splits(
        as_jax(ds.x_train[tr], ds.y_train[tr]),
        as_jax(ds.x_train[val], ds.y_train[val]) if n_val else None,
        as_jax(ds.x_test, ds.y_test),
        ds.num_classes,
    )


@dataclasses.dataclass(frozen=True)
class Objective:
    """``f(params, batch)``: the mean ``metric`` ("loss": softmax cross-entropy, "accuracy",
    "squared_loss") of the flax ``model`` on ``batch = (x, y)``: ``lsgeo.risk.risk`` of
    ``lsgeo.models.make_predict``. For a BatchNorm model the batch carries the statistics, and ``stats``
    says which are used:

    - ``"running"``:   ``batch = (x, y, model_state)``, evaluation mode with those statistics;
    - ``"batch"``:     ``batch = (x, y, model_state)``, training mode: the statistics of ``x`` itself (on a
      full data set, the exact population statistics at ``params``);
    - ``"recompute"``: ``batch = (x, y, model_state, x_stats)``, evaluation mode with the statistics of
      ``x_stats`` recomputed at ``params`` (``lsgeo.models.recompute_batch_stats``: test data at a path point).

    Hashable by value, so jit-compiled library functions (``f`` static) compile once per model."""

    model: Any
    metric: str = "loss"
    stats: str = "running"

    def __call__(self, params, batch):
        x, y, *rest = batch
        state = rest[0] if rest else None
        if self.stats == "recompute" and state:
            state = models.recompute_batch_stats(self.model, params, state, rest[1])
        predict = models.make_predict(self.model, state, train=self.stats == "batch")
        return risk.risk(predict, METRICS[self.metric], params, (x, y))


@dataclasses.dataclass(frozen=True)
class TrainObjective:
    """The training objective of a BatchNorm model, ``f(params, model_state, batch) -> (loss, new_state)``:
    batch statistics, running averages updated (``lsgeo.models.make_train_apply``)."""

    model: Any
    metric: str = "loss"

    def __call__(self, params, model_state, batch):
        outputs, new_state = models.make_train_apply(self.model)(params, model_state, batch[0])
        return METRICS[self.metric](outputs, batch[1]), new_state


def init_fn(model, x_example) -> Callable:
    """``key -> params`` of a flax model, traceable (``lsgeo.train.sweep`` vmaps it over seeds)."""
    x = jnp.asarray(x_example[:1])
    return lambda key: model.init(key, x, train=False)["params"]


def state_init_fn(model, x_example) -> Callable:
    """``key -> model_state`` (the non-parameter collections, BatchNorm statistics) of a flax model."""
    x = jnp.asarray(x_example[:1])
    return lambda key: {k: v for k, v in model.init(key, x, train=False).items() if k != "params"}


@dataclasses.dataclass(frozen=True)
class Evaluate:
    """``eval_fn`` of ``lsgeo.train``: ``{split}_acc`` and ``{split}_loss`` for the splits ``"val"`` and ``"test"``
    (batches ``(x, y)``) of the dict ``eval_data`` (other entries are ignored). With a model state
    (``eval_fn(params, model_state, eval_data)``)
    and ``recompute=True``, the BatchNorm statistics are first recomputed at ``params`` on the inputs
    ``eval_data["stats"]`` (``lsgeo.models.recompute_batch_stats``: right for SWA averages and path points)."""

    model: Any
    recompute: bool = False
    batch_size: int | None = None

    def __call__(self, params, *args):
        state, eval_data = (None, args[0]) if len(args) == 1 else args
        if self.recompute and state:
            state = models.recompute_batch_stats(
                self.model, params, state, eval_data["stats"], batch_size=self.batch_size
            )
        predict = models.make_predict(self.model, state)
        out = {}
        for name in ("val", "test"):
            if name in eval_data:
                logits = predict(params, eval_data[name][0])
                out[f"{name}_acc"] = losses.accuracy(logits, eval_data[name][1])
                out[f"{name}_loss"] = losses.softmax_cross_entropy(logits, eval_data[name][1])
        return out


ARCHS = ("mlp", "resnet")


def check_arch(arch: str) -> None:
    """``arch`` must be one of ``ARCHS`` (a ValueError naming it otherwise)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


@dataclasses.dataclass(frozen=True)
class Net:
    """A classifier of the experiments, a ReLU ``MLP`` or a ``ResNet18`` with BatchNorm, and what training
    and measuring it need, alike for both (``batch_norm``: whether there are statistics to carry)."""

    model: Any
    x_example: Any = dataclasses.field(compare=False, hash=False)
    batch_norm: bool = False

    @classmethod
    def of(cls, cfg, data: Splits) -> Net:
        """The net of ``cfg.arch`` ("mlp": ``cfg.widths``; "resnet": ``cfg.resnet_width``, ``cfg.stage_sizes``)."""
        check_arch(cfg.arch)
        if cfg.arch == "mlp":
            return cls(models.MLP(widths=cfg.widths, num_outputs=data.num_classes), data.train[0][:1])
        model = models.ResNet18(num_classes=data.num_classes, width=cfg.resnet_width, stage_sizes=cfg.stage_sizes)
        return cls(model, data.train[0][:1], batch_norm=True)

    @property
    def objective(self) -> Objective:
        """``f(params, (x, y[, model_state]))``, evaluation mode."""
        return Objective(self.model)

    @property
    def train_objective(self):
        """The objective ``lsgeo.train`` differentiates (BatchNorm: training mode, statistics threaded)."""
        return TrainObjective(self.model) if self.batch_norm else Objective(self.model)

    @property
    def init(self) -> Callable:
        return init_fn(self.model, self.x_example)

    @property
    def init_state(self) -> Callable | None:
        return state_init_fn(self.model, self.x_example) if self.batch_norm else None

    @property
    def evaluate(self) -> Evaluate:
        """``eval_fn``: accuracy and loss on val / test, with recomputed statistics for a BatchNorm net."""
        return Evaluate(self.model, recompute=self.batch_norm)

    def eval_data(self, data: Splits) -> dict:
        out = {"test": data.test} if data.val is None else {"val": data.val, "test": data.test}
        return {**out, "stats": data.train[0]} if self.batch_norm else out

    def population_stats(self, params, states, x):
        """``[R]`` stacked BatchNorm states with the exact statistics of ``x`` at the ``[R]`` stacked ``params``
        (``lsgeo.models.recompute_batch_stats``); None for a net without BatchNorm."""
        if not self.batch_norm:
            return None
        recompute = jax.vmap(lambda p, s, xx: models.recompute_batch_stats(self.model, p, s, xx), in_axes=(0, 0, None))
        return jax.jit(recompute)(params, states, x)


def final_measures(
    objective,
    params,
    seeds,
    train_batch,
    test_batch,
    *,
    lanczos_iters: int,
    trace_probes: int,
    states=None,
    rho: float | None = None,
    sharpness_steps: int = 10,
) -> dict[str, np.ndarray]:
    """At each of the ``[R]`` stacked ``params`` (seed r's probes from ``seeds[r]``), on the whole training
    set: lambda_max of the Hessian (Lanczos), its trace (Hutch++), the train loss, the test accuracy and
    loss, and with ``rho`` Keskar's epsilon-sharpness and the weight norm. ``states``: ``[R]`` stacked
    BatchNorm statistics (evaluation mode) for BatchNorm models. One vmapped, compiled program."""
    accuracy = dataclasses.replace(objective, metric="accuracy")

    def one(w, state, seed, train_data, test_data):
        if state is not None:
            train_data, test_data = (*train_data, state), (*test_data, state)
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        out = dict(
            lambda_max=curvature.top_eigenvalues(objective, w, train_data, k1, num_iters=lanczos_iters)[0],
            hessian_trace=curvature.hessian_trace(
                objective, w, train_data, k2, num_probes=trace_probes, method="hutch++"
            ),
            train_loss=objective(w, train_data),
            test_acc=accuracy(w, test_data),
            test_loss=objective(w, test_data),
        )
        if rho is not None:
            out["epsilon_sharpness"] = sharpness.epsilon_sharpness(
                objective, w, train_data, rho, key=k3, steps=sharpness_steps
            )
            out["weight_norm"] = optax.tree.norm(w)
        return out

    fn = jax.vmap(one, in_axes=(0, None if states is None else 0, 0, None, None))
    values = jax.jit(fn)(params, states, jnp.asarray(seeds), train_batch, test_batch)
    return {k: np.asarray(v) for k, v in values.items()}
