"""The three training methods of Orvieto et al. (AISTATS 2023, Section 5) as runner cells.

- ``gd``:    (S)GD, w_{t+1} = w_t - lr grad R(w_t);
- ``noise``: "GD+noise", the gradient taken at w_t + sigma eps (every parameter perturbed);
- ``layer``: "GD+noise (layer)", the gradient taken at w_t + sigma sqrt(M) eps_j on one layer j,
  uniform at random (M = number of layers; the same second-order regulariser as ``noise``, without
  its variance explosion at large width, Sections 3.2 and 4).

The noise goes through ``lsgeo.optim.noise_injection`` and the runs through ``lsgeo.train.sweep``:
the cells of one method are one vmapped sweep over (sigma, seed), compiled once. Models are
evaluated at the clean iterate w_t. ``gd`` has the single cell sigma = 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsgeo import data as data_lib
from lsgeo import losses, models, optim, risk, train

METHODS = ("gd", "noise", "layer")
LABELS = {"gd": "GD", "noise": "GD+noise", "layer": "GD+noise (layer)"}
COLORS = {"gd": "black", "noise": "tab:blue", "layer": "tab:red"}
_MODES = {"noise": "full", "layer": "layerwise"}


_METRICS = {"loss": losses.softmax_cross_entropy, "accuracy": losses.accuracy, "squared_loss": losses.squared_loss}


@dataclasses.dataclass(frozen=True)
class Objective:
    """``f(params, batch)`` of the flax ``model`` on ``batch = (x, y)``: softmax cross-entropy
    (``metric="loss"``), accuracy (``"accuracy"``) or the squared loss (``"squared_loss"``).
    Hashable by value, so the jit-compiled library functions (``f`` static) compile once per architecture."""

    model: Any
    metric: str = "loss"  # "loss", "accuracy" or "squared_loss"

    def __call__(self, params, batch):
        return _METRICS[self.metric](self.model.apply({"params": params}, batch[0]), batch[1])


def flat_data(dataset: str, n_train: int | None):
    """``(train, test)`` batches ``(x, y)`` of jax arrays of a ``lsgeo.data`` set, inputs flattened (for MLPs)."""
    ds = data_lib.load_dataset(dataset, n_train=n_train, seed=0, flatten=True)
    return (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)), (jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))


def method_cells(methods, sigmas, seeds, **fixed) -> list[dict]:
    """The (method, sigma, seed) grid; ``gd`` gets sigma = 0 only. ``fixed`` fields come first."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be among {METHODS}, got {m!r}")
    return [
        dict(**fixed, method=m, sigma=float(s), seed=int(k))
        for m in methods
        for s in ((0.0,) if m == "gd" else sigmas)
        for k in seeds
    ]


class Task(NamedTuple):
    """A classification problem in the form ``lsgeo.train.sweep`` takes."""

    objective: Callable  # (params, (x, y)) -> mean cross-entropy
    init_params: Callable  # key -> params
    data: tuple  # (x_train, y_train)
    eval_fn: Callable  # (params, eval_data) -> {test_acc, test_loss[, gn_trace]}
    eval_data: dict


def classification_task(model, ds, *, gn_trace: bool = False) -> Task:
    """Cross-entropy training of a flax ``model`` on a ``lsgeo.data.Dataset``, evaluated on its test
    split; ``gn_trace``: also the Gauss-Newton trace tr(D2L DPhi DPhi^T) on the training data (exact,
    ``lsgeo.risk.gauss_newton_trace``), the regulariser that noise injection adds (times sigma^2/2)."""
    predict = models.make_predict(model)

    def objective(params, batch):
        return losses.softmax_cross_entropy(predict(params, batch[0]), batch[1])

    def eval_fn(params, eval_data):
        x, y = eval_data["test"]
        logits = predict(params, x)
        out = {"test_acc": losses.accuracy(logits, y), "test_loss": losses.softmax_cross_entropy(logits, y)}
        if gn_trace:
            out["gn_trace"] = risk.gauss_newton_trace(predict, losses.softmax_cross_entropy, params, eval_data["train"])
        return out

    data = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    eval_data = {"test": (jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))}
    if gn_trace:
        eval_data["train"] = data
    return Task(objective, init_params(model, ds.x_train), data, eval_fn, eval_data)


def init_params(model, x_example) -> Callable:
    """``key -> params`` of a flax model, traceable (``lsgeo.train.sweep`` vmaps it over seeds)."""
    x = jnp.asarray(x_example[:1])
    return lambda key: model.init(key, x, train=False)["params"]


def optimizer_fn(method: str, inner: optax.GradientTransformation, *, noise_until: int | None = None) -> Callable:
    """``(sigma, seed) -> optimizer`` for ``lsgeo.train.sweep``; ``noise_until``: noise off from that step on."""
    if method == "gd":
        return lambda sigma, seed: inner

    def make(sigma, seed):
        level = sigma if noise_until is None else (lambda t: jnp.where(t < noise_until, sigma, 0.0))
        return optim.noise_injection(inner, level, mode=_MODES[method], seed=seed)

    return make


def train_cells(objective, init_params, data, cells, *, inner, num_steps, eval_every, eval_fn, eval_data,
                batch_size=None, model_state=None, noise_until=None, members_per_chunk=None,
                final_fn=None) -> list[list[dict]]:
    """Trains the cells of one method (same ``method`` field) with one ``lsgeo.train.sweep``.

    The sweep runs the grid of the cells' distinct sigmas x seeds (on a resume, possibly a few
    finished cells again) and returns, per cell, its history as rows ``{step, train_loss, ...}``.
    A diverged run has NaN rows after its divergence (``lsgeo.train.sweep`` semantics).
    ``final_fn(params, model_state) -> dict`` adds measurements at the final clean parameters of each
    run to its last row, outside the vmapped training program (which it would make larger to compile).
    """
    (method,) = {c["method"] for c in cells}
    sigmas = sorted({c["sigma"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    result = train.sweep(
        objective, optimizer_fn(method, inner, noise_until=noise_until), init_params, data, {"sigma": sigmas}, seeds,
        num_steps=num_steps, eval_every=eval_every, batch_size=batch_size, eval_fn=eval_fn, eval_data=eval_data,
        model_state=model_state, members_per_chunk=members_per_chunk,
    )  # fmt: skip
    out = []
    for c in cells:
        index = (sigmas.index(c["sigma"]), seeds.index(c["seed"]))
        rows = history_rows(result.history, index)
        if final_fn is not None:
            member = jax.tree_util.tree_map(lambda a: a[index], (result.params, result.model_state))
            rows[-1].update({k: float(v) for k, v in final_fn(*member).items()})
        out.append(rows)
    return out


def train_methods(objective, init_params, data, cells, **kwargs) -> list[list[dict]]:
    """``train_cells`` for cells of several methods, with one compiled program per noise mode.

    The ``gd`` cells join the sweep of a noise method in ``cells`` (``noise`` if present, else ``layer``)
    as its members at sigma = 0: the noise xi = 0 * eps is exactly zero, so the iterates are those of
    plain (S)GD bit for bit, and the (S)GD program is not compiled separately. ``kwargs``: those of
    ``train_cells``. Returns the rows of each cell, in the order of ``cells``."""
    methods = {c["method"] for c in cells}
    host = next((m for m in ("noise", "layer") if m in methods), "gd")
    programs: dict[str, list[int]] = {}
    for i, c in enumerate(cells):
        programs.setdefault(host if c["method"] == "gd" else c["method"], []).append(i)
    out: list = [None] * len(cells)
    for method, index in programs.items():
        group = [dict(cells[i], method=method) for i in index]
        for i, rows in zip(index, train_cells(objective, init_params, data, group, **kwargs)):
            out[i] = rows
    return out


def history_rows(history: dict, index: tuple = ()) -> list[dict]:
    """Rows ``{step, train_loss, ...}`` of one run of a ``lsgeo.train`` history (``index`` picks the
    member of a sweep's ``[num_sigmas, num_seeds]`` axes)."""
    history = {k: np.asarray(v)[index] for k, v in history.items()}
    return [
        {"step": int(t), **{k: float(v[e]) for k, v in history.items() if k != "step"}}
        for e, t in enumerate(history["step"])
    ]
