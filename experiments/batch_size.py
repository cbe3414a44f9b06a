"""Small against large batches, trained to the same training loss: sharpness and generalisation.

Claim (Keskar et al. 2017, Sections 2-3): large-batch training converges to sharper minima of the
training loss (larger Hessian eigenvalues, larger epsilon-sharpness) than small-batch SGD, and these
minima generalise worse (lower test accuracy), at the same training loss.

Setup: a ReLU MLP (``lsgeo.models.MLP``) on scikit-learn digits (or MNIST-1D), softmax
cross-entropy, SGD with the same step size ``lr`` for both batch sizes (Keskar et al. keep the
optimiser and change only the batch): ``small`` draws ``small_batch`` examples per step, ``large``
``large_batch`` (the whole training set by default, i.e. full-batch GD). Each run stops at the
first check (every ``check_every`` steps, ``lsgeo.train.train`` resumed from its state) at which its
training loss is <= ``target_loss`` (at most ``max_steps`` steps), so both are compared at the same
training loss. At that point, on the whole training set: lambda_max of the Hessian
(``lsgeo.curvature.top_eigenvalues``), its trace (``lsgeo.curvature.hessian_trace``, Hutch++) and
Keskar's epsilon-sharpness [max_{||delta||_2 <= rho} R(w + delta) - R(w)] / (1 + R(w))
(``lsgeo.sharpness.epsilon_sharpness``, projected gradient ascent from a random start); the test
accuracy on the held-out set (497 digits). A seed fixes the initialisation of both batch sizes.

Verdict (paired over seeds, ``verdicts.paired_gain``, 95% Student-t): three parts, large-batch lambda_max
above small-batch's beyond t s.e., the same for epsilon-sharpness, and small-batch test accuracy above
large-batch's beyond t s.e. plus one test example (so that no single test image decides it).
Supported when all three hold, false when one is contradicted beyond noise after Holm's correction for
the three (``verdicts.combine``), null otherwise, and null
when a run did not reach the target loss (the comparison is then not at equal loss).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optax

from experiments import cli, context, experiment, nets, plots, records, verdicts
from lsgeo import models, train

BATCHES = ("small", "large")
COLORS = {"small": "tab:blue", "large": "tab:red"}
SHARPNESS = ("lambda_max", "epsilon_sharpness")

CLAIM = (
    "Large-batch training converges to sharper minima (larger lambda_max and epsilon-sharpness) than "
    "small-batch SGD at the same training loss, and these minima generalise worse (Keskar et al. 2017)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Small- vs large-batch SGD to the same training loss; the defaults run in about a minute on a CPU."""

    dataset: str = "digits"  # "digits" or "mnist1d"
    n_train: int | None = 1024  # training points (None: all)
    widths: tuple[int, ...] = (64, 64)
    lr: float = 0.1  # SGD step size of both batch sizes
    small_batch: int = 32
    large_batch: int | None = None  # None: the whole training set (full-batch GD)
    target_loss: float = 0.01  # both stop at the first check with a training loss <= this
    check_every: int = 100  # steps between checks of the training loss
    max_steps: int = 20_000
    rho: float = 0.2  # radius of the epsilon-sharpness ball (l2)
    sharpness_steps: int = 20  # projected gradient-ascent steps
    lanczos_iters: int = 30
    trace_probes: int = 60  # Hutch++ Hessian-vector products
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # initialisation, data order, probes


PRESETS = {
    "paper": Config(
        dataset="mnist1d",
        n_train=4000,
        widths=(512, 512),
        small_batch=256,
        large_batch=4000,
        target_loss=0.001,
        max_steps=100_000,
        lanczos_iters=60,
        trace_probes=150,
    )
}


def validate(cfg: Config) -> None:
    """Checks beyond the runner's field conventions (``config_checks.check_config``), before a run folder exists."""
    if cfg.large_batch is not None and cfg.large_batch <= cfg.small_batch:
        raise ValueError(f"--large-batch {cfg.large_batch} must exceed --small-batch {cfg.small_batch}")


def cells(cfg: Config) -> list[dict]:
    return [dict(batch=b, seed=s) for b in BATCHES for s in cfg.seeds]


def prepare(cfg: Config) -> nets.Splits:
    return nets.splits(cfg.dataset, n_train=cfg.n_train, flatten=True)


def train_to_target(cfg: Config, objective, init, data, batch_size: int, seed: int):
    """SGD from ``init(key)`` until the training loss is <= ``target_loss``; returns (params, steps, history)."""
    optimizer = optax.sgd(cfg.lr)
    start, key, steps, history = init, seed, 0, []
    with context.progress_bar(cfg.max_steps, f"batch {batch_size}, seed {seed}") as callback:
        while steps < cfg.max_steps:
            result = train.train(
                objective, optimizer, start, data, num_steps=cfg.check_every, batch_size=batch_size, key=key
            )
            start, key, steps = result.state, None, result.steps  # resume from the state: the same run, checked
            history.append((steps, float(result.history["train_loss"][-1])))
            if callback is not None:
                callback(steps, {})
            if history[-1][1] <= cfg.target_loss:
                break
    return result.params, steps, history


def run(cfg: Config, data: nets.Splits, group: list[dict]) -> list[list[dict]]:
    n, which = len(data.train[1]), group[0]["batch"]
    model = models.MLP(widths=cfg.widths, num_outputs=data.num_classes)
    batch_size = cfg.small_batch if which == "small" else (cfg.large_batch or n)
    objective = nets.Objective(model)
    seeds = [c["seed"] for c in group]
    runs = [
        train_to_target(cfg, objective, nets.init_fn(model, data.train[0]), data.train, batch_size, s) for s in seeds
    ]
    params = records.stack([r[0] for r in runs])
    final = nets.final_measures(
        objective,
        params,
        seeds,
        data.train,
        data.test,
        lanczos_iters=cfg.lanczos_iters,
        trace_probes=cfg.trace_probes,
        rho=cfg.rho,
        sharpness_steps=cfg.sharpness_steps,
    )
    out = []
    for i, (_, steps, history) in enumerate(runs):
        rows = [dict(kind="history", step=t, train_loss=loss) for t, loss in history]
        rows.append(
            dict(
                kind="final",
                step=steps,
                batch_size=batch_size,
                epochs=steps * batch_size / n,
                reached=history[-1][1] <= cfg.target_loss,
                n_test=len(data.test[1]),
                **{k: float(v[i]) for k, v in final.items()},
            )
        )
        out.append(rows)
    return out


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    keys = (
        "step",
        "epochs",
        "train_loss",
        "test_acc",
        "lambda_max",
        "hessian_trace",
        "epsilon_sharpness",
        "weight_norm",
    )
    final = {(b, k): records.per_seed(rows, k, cfg.seeds, batch=b, kind="final") for b in BATCHES for k in keys}
    table, figures = [], {}
    for b in BATCHES:
        entry = dict(batch=b, batch_size=records.select(rows, batch=b, kind="final")[0]["batch_size"])
        for k in keys:
            entry[k] = figures[f"{b}_{k}"] = float(np.mean(final[(b, k)]))
        table.append(entry)
    gains = {f"large_sharper_{k}": verdicts.paired_gain(final[("large", k)], final[("small", k)]) for k in SHARPNESS}
    gains["small_generalises_better"] = verdicts.paired_gain(
        final[("small", "test_acc")], final[("large", "test_acc")], resolution=records.resolution(rows)
    )
    for k in (*SHARPNESS, "hessian_trace"):
        figures[f"{k}_ratio"] = figures[f"large_{k}"] / figures[f"small_{k}"]
    g = gains["small_generalises_better"]
    figures.update(acc_gap=g.mean, acc_gap_se=g.se, acc_gap_margin=g.margin)
    what = {
        "large_sharper_lambda_max": "lambda_max, large minus small",
        "large_sharper_epsilon_sharpness": "epsilon-sharpness, large minus small",
        "small_generalises_better": "test accuracy, small minus large",
    }
    reason = "; ".join(
        g.describe(
            what[k], scale=100 if k.startswith("small") else 1.0, unit=" points" if k.startswith("small") else ""
        )
        for k, g in gains.items()
    )
    supported = verdicts.combine(gains)
    if not all(r["reached"] for r in records.select(rows, kind="final")):
        supported, reason = (
            None,
            f"cannot test the claim: a run did not reach the target loss {cfg.target_loss:g}; {reason}",
        )
    return experiment.Verdict(supported, figures, table, reason)


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    groups = {}
    for b in BATCHES:
        final = records.select(rows, batch=b, kind="final")
        groups[f"{b} (batch {final[0]['batch_size']})"] = (final, COLORS[b])
        for s in cfg.seeds:
            hist = records.select(rows, batch=b, seed=s, kind="history")
            axes[0].plot([r["step"] for r in hist], [r["train_loss"] for r in hist], color=COLORS[b], alpha=0.6,
                         label=f"{b} (batch {final[0]['batch_size']})" if s == cfg.seeds[0] else None)
    for ax, key in zip(axes[1:], SHARPNESS):
        plots.paired_scatter(ax, groups, key, "test_acc")
    axes[0].axhline(cfg.target_loss, color="k", ls=":", label="target loss")
    axes[0].set(xscale="log", yscale="log", xlabel="step", ylabel="train loss", title="training to the same loss")
    axes[1].set(xlabel="lambda_max of the Hessian", ylabel="test accuracy", title="one point per seed, joined by seed")
    axes[2].set(xlabel=f"epsilon-sharpness (rho = {cfg.rho:g})", ylabel="test accuracy",
                title="one point per seed, joined by seed")
    for ax in axes:
        ax.legend(fontsize=8)
    return {"batch_size.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
