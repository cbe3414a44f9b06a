"""Training methods of Orvieto et al. (AISTATS 2023, Section 5), as runner cells (``method_cells``):

- ``gd``:    (S)GD, w_{t+1} = w_t - lr grad R(w_t);
- ``noise``: "GD+noise", the gradient taken at w_t + sigma eps (every parameter perturbed);
- ``layer``: "GD+noise (layer)", the gradient taken at w_t + sigma sqrt(M) eps_j on one layer j,
  uniform at random (M = number of layers; the same second-order regulariser as ``noise``, without
  its variance explosion at large width, Sections 3.2 and 4).

The noise goes through ``lsgeo.optim.noise_injection`` and the runs through ``lsgeo.train.sweep``:
the cells of one method are one vmapped sweep over (sigma, seed), compiled once, evaluated at the
clean iterate w_t. ``gd`` has the single cell sigma = 0. A seed fixes the initialisation (and the
minibatch order), so the methods are *paired* by seed. Hyperparameters (sigma) are chosen on a
validation split carved from the training data (``nets.splits``, ``best_sigma``), never on the test set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import context, records, verdicts
from lsgeo import optim, train


METHODS = ("gd", "noise", "layer")


COLORS = {"gd": "black", "noise": "tab:blue", "layer": "tab:red"}


_SUFFIX = {"gd": "", "noise": "+noise", "layer": "+noise (layer)"}


_MODES = {"noise": "full", "layer": "layerwise"}


def label(method: str, *, minibatch: bool = False) -> str:
    """ "GD", "GD+noise", "GD+noise (layer)", or with ``minibatch`` the same with "SGD"."""
    return ("SGD" if minibatch else "GD") + _SUFFIX[method]


def method_grid(methods, sigmas) -> list[tuple[str, float]]:
    """The (method, sigma) pairs; ``gd`` gets sigma = 0 only."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be among {METHODS}, got {m!r}")
    return [(m, float(s)) for m in methods for s in ((0.0,) if m == "gd" else sigmas)]


def method_cells(methods, sigmas, seeds, **fixed) -> list[dict]:
    """The (method, sigma, seed) grid (``method_grid`` x seeds). ``fixed`` fields come first."""
    return [dict(**fixed, method=m, sigma=s, seed=int(k)) for m, s in method_grid(methods, sigmas) for k in seeds]


def optimizer_fn(method: str, inner: optax.GradientTransformation, *, noise_until: int | None = None) -> Callable:
    """``(sigma, seed) -> optimizer`` for ``lsgeo.train.sweep``; ``noise_until``: noise off from that step on."""
    if method == "gd":
        return lambda sigma, seed: inner

    def make(sigma, seed):
        level = sigma if noise_until is None else (lambda t: jnp.where(t < noise_until, sigma, 0.0))
        return optim.noise_injection(inner, level, mode=_MODES[method], seed=seed)

    return make


def train_cells(
    objective,
    init_params,
    data,
    cells,
    *,
    inner,
    num_steps,
    eval_every,
    eval_fn,
    eval_data,
    batch_size=None,
    model_state=None,
    noise_until=None,
    members_per_chunk=None,
    augment=None,
    final_fn=None,
) -> list[list[dict]]:
    """Trains the cells of one method (same ``method`` field) with one ``lsgeo.train.sweep``.

    The sweep runs the grid of the cells' distinct sigmas x seeds (on a resume, possibly a few
    finished cells again) and returns, per cell, its history as rows ``{step, train_loss, ...}``.
    A diverged run has NaN rows after its divergence (``lsgeo.train.sweep`` semantics).
    ``final_fn(params, model_state) -> dict`` adds measurements at the final clean parameters of each
    run to its last row, outside the vmapped training program (which it would make larger to compile).
    With a test split in ``eval_data`` (a dict), the last row records its size ``n_test`` (``resolution``).
    """
    (method,) = {c["method"] for c in cells}
    sigmas = sorted({c["sigma"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    with context.progress_bar(num_steps, f"{method} x {len(sigmas) * len(seeds)} runs") as callback:
        result = train.sweep(
            objective, optimizer_fn(method, inner, noise_until=noise_until), init_params, data, {"sigma": sigmas},
            seeds, num_steps=num_steps, eval_every=eval_every, batch_size=batch_size, eval_fn=eval_fn,
            eval_data=eval_data, model_state=model_state, members_per_chunk=members_per_chunk, augment=augment,
            callback=callback,
        )  # fmt: skip
    out = []
    for c in cells:
        index = (sigmas.index(c["sigma"]), seeds.index(c["seed"]))
        rows = records.history_rows(result.history, index)
        if final_fn is not None:
            member = jax.tree_util.tree_map(lambda a: a[index], (result.params, result.model_state))
            rows[-1].update({k: float(v) for k, v in final_fn(*member).items()})
        if isinstance(eval_data, dict) and "test" in eval_data:
            rows[-1]["n_test"] = int(eval_data["test"][1].shape[0])
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


def best_sigma(
    rows: list[dict], method: str, sigmas: Sequence[float], step: int, key: str = "val_acc", last: float | None = None,
    **fields,
) -> float:
    """The sigma of ``method`` with the highest mean validation ``key`` at ``step`` (never the test set); with
    ``last``, of the runs' means over their last ``last`` of the steps (``records.judged``).

    A sigma at which any seed diverged (a NaN value) ranks last: it is never chosen on its survivors.
    """

    def score(sigma):
        runs = records.select(rows, method=method, sigma=sigma, **fields)
        mean = np.mean([r[key] for r in (records.select(runs, step=step) if last is None
                                         else records.window(runs, step, last))])  # fmt: skip
        return mean if np.isfinite(mean) else -np.inf

    return max(sigmas, key=score)


def compare_to_gd(
    rows: list[dict], method: str, sigmas: Sequence[float], seeds: Sequence[int], step: int,
    last: float | None = None, **fields,
) -> tuple[float, verdicts.Gain]:  # fmt: skip
    """``(best sigma on validation, paired test-accuracy gain of method at it over (S)GD)``: the values at ``step``,
    or with ``last`` each run's mean over its last ``last`` of the steps (``records.judged``: a spike at one
    evaluation does not decide)."""
    best = best_sigma(rows, method, sigmas, step, last=last, **fields)
    treated = records.judged(rows, "test_acc", seeds, step, last, method=method, sigma=best, **fields)
    control = records.judged(rows, "test_acc", seeds, step, last, method="gd", **fields)
    return best, verdicts.paired_gain(treated, control, resolution=records.resolution(rows))


def unfit(rows: list[dict], cells: Mapping[str, dict], seeds, step: int, fit_loss: float,
          last: float | None = None) -> str:  # fmt: skip
    """The fit check of a comparison: "" when every run named in ``cells`` (``name -> fields``, e.g.
    ``{"GD": dict(method="gd")}``) ends (at ``step``; with ``last``, the median over its last ``last`` of the
    steps, which one spike does not move) with a mean train loss over ``seeds`` at most ``fit_loss``,
    else a clause naming the under-trained ones: a comparison of runs that have not fit their data does not
    test a claim about trained networks (the verdict is then null)."""
    losses = {
        name: float(np.mean(records.judged(rows, "train_loss", seeds, step, last, np.median, **f)))
        for name, f in cells.items()
    }
    bad = {name: v for name, v in losses.items() if not v <= fit_loss}
    if not bad:
        return ""
    listed = ", ".join(f"{name} {v:.3g}" for name, v in bad.items())
    where = "final train loss" if last is None else f"median train loss over the last {100 * last:g}% of the steps"
    return f"under-trained, cannot test the claim: {where} above fit_loss={fit_loss:g} ({listed})"


def method_table(
    rows: list[dict],
    methods,
    sigmas,
    seeds,
    step: int,
    *,
    minibatch: bool = False,
    keys=("test_acc", "val_acc", "train_loss"),
    last: float | None = None,
    **fields,
) -> list[dict]:
    """One table row per (method, sigma): the mean (and the s.e. of the first key) over seeds at ``step``, or with
    ``last`` of each run's mean over its last ``last`` of the steps (``records.judged``)."""
    table = []
    for m, s in method_grid(methods, sigmas):
        entry = {**fields, "method": label(m, minibatch=minibatch), "sigma": s}
        for i, k in enumerate(keys):
            entry[k], se = verdicts.mean_se(records.judged(rows, k, seeds, step, last, method=m, sigma=s, **fields))
            if i == 0:
                entry[f"{k}_se"] = se
        table.append(entry)
    return table
