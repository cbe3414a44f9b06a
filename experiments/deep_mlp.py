"""Noise injection in deep ReLU MLPs, narrow and wide (Orvieto et al., AISTATS 2023, Figure 4).

Claim: with 5 hidden ReLU layers, layer-wise noise injection gives the best test accuracy of GD,
GD+noise and GD+noise (layer), and the regulariser it adds, the Gauss-Newton trace
tr(D2L DPhi DPhi^T) (Section 4, Eq. 11), is smallest for it.

Setup (paper): the data of Figure 3 (1024 Fashion-MNIST training points), MLPs with 5 hidden
layers of width 1000 (narrow, lr 0.005) and 5000 (wide, lr 0.001), full-batch GD, sigma = 0.05
(GD+noise (layer): std sigma sqrt(M) on one of the M = 6 layers per step). ``paper-mnist1d``: the
paper's widths and step sizes on 1024 MNIST-1D points (a GPU preset). The paper does not state the
number of steps; the presets run 100k, so that lr x steps at the wide net's lr 0.001 (100) matches what
the default needs to fit its data (lr 0.05, 2000 steps); the fit check (``fit_loss``) says when a run
still has not fitted.
Default (CPU): MNIST-1D, widths 32 and 128, lr 0.1 and 0.05 (larger than the paper's so that a
couple of thousand CPU steps train), sigma 0.02, 3 seeds. Recorded at the clean iterate: test
accuracy, test loss and the exact Gauss-Newton trace on the training data.

Verdict (every width, paired over seeds, ``verdicts.paired_gain``, 95% Student-t): per width four parts,
layer-wise noise beats GD and beats full noise in final test accuracy (beyond t s.e. plus one test
example), and its Gauss-Newton trace is below GD's and below full noise's at equal training loss (the
loss all three methods reach in a seed; the trace interpolated in log-loss between evaluations,
``records.at_loss``), since the trace still falls while a run trains; supported when all parts of all
widths hold, false when one is contradicted after Holm's correction for their number, null otherwise.
A run whose final train loss is above ``fit_loss`` has not fit its data: the comparison then cannot test
the claim (the paper's networks are trained to fit), and the verdict is null, saying so.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import optax

from experiments import cli, experiment, nets, plots, records, training, verdicts
from lsgeo import losses, models, risk

CLAIM = (
    "In deep (5 hidden layers) ReLU MLPs, layer-wise noise injection gives the best test accuracy of "
    "GD, GD+noise and GD+noise (layer), with the smallest Gauss-Newton trace (Figure 4)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Figure 4: test accuracy and Gauss-Newton trace of 5-hidden-layer MLPs, narrow and wide."""

    dataset: str = "mnist1d"  # any lsgeo.data classification set ("fashion_mnist": paper)
    n_train: int = 1024  # training points (fixed subsample)
    n_test: int | None = None  # test points (None: all)
    depth: int = 5  # hidden layers
    widths: tuple[int, ...] = (32, 128)  # narrow and wide hidden width
    lrs: tuple[float, ...] = (0.1, 0.05)  # GD step size for each width (paper: 0.005, 0.001)
    sigma: float = 0.02  # noise level
    steps: int = 2000  # GD steps
    eval_every: int = 250  # steps between evaluations (each computes the Gauss-Newton trace)
    fit_loss: float = 0.3  # a run ending above this train loss has not fit its data (verdict: null)
    methods: tuple[Literal[training.METHODS], ...] = training.METHODS
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation and noise seeds


PRESETS = {
    "paper": Config(
        dataset="fashion_mnist",
        n_test=10_000,
        widths=(1000, 5000),
        lrs=(0.005, 0.001),
        sigma=0.05,
        steps=100_000,
        eval_every=5000,
    ),
    "paper-mnist1d": Config(widths=(1000, 5000), lrs=(0.005, 0.001), sigma=0.05, steps=100_000, eval_every=5000),
}


def validate(cfg: Config) -> None:
    """Checks beyond the runner's field conventions (``config_checks.check_config``), before a run folder exists."""
    if len(cfg.widths) != len(cfg.lrs):
        raise ValueError(
            f"--widths and --lrs must have the same length (one step size per width); got {cfg.widths} and {cfg.lrs}"
        )


def cells(cfg: Config) -> list[dict]:
    if len(cfg.widths) != len(cfg.lrs):
        raise ValueError(f"widths and lrs must have the same length, got {cfg.widths} and {cfg.lrs}")
    return [c for w in cfg.widths for c in training.method_cells(cfg.methods, (cfg.sigma,), cfg.seeds, width=w)]


def prepare(cfg: Config):
    return nets.splits(cfg.dataset, n_train=cfg.n_train, n_test=cfg.n_test, flatten=True)


def run(cfg: Config, data: nets.Splits, group: list[dict]) -> list[list[dict]]:
    train_batch, test_batch, width = data.train, data.test, group[0]["width"]
    model = models.MLP(widths=(width,) * cfg.depth, num_outputs=data.num_classes)
    evaluate = nets.Evaluate(model)

    def eval_fn(params, eval_data):
        gn = risk.gauss_newton_trace(
            models.make_predict(model), losses.softmax_cross_entropy, params, eval_data["train"]
        )
        return {**evaluate(params, eval_data), "gn_trace": gn}

    return training.train_cells(
        nets.Objective(model), nets.init_fn(model, train_batch[0]), train_batch, group,
        inner=optax.sgd(cfg.lrs[cfg.widths.index(width)]), num_steps=cfg.steps, eval_every=cfg.eval_every,
        eval_fn=eval_fn, eval_data={"test": test_batch, "train": train_batch},
    )  # fmt: skip


def equal_loss_targets(cfg: Config, rows: list[dict], width: int) -> np.ndarray:
    """``[seeds]``: per seed, the training loss every method reaches at this width (the largest of their lowest
    evaluated losses), at which their Gauss-Newton traces are compared."""
    return np.array([
        max(min(r["train_loss"] for r in records.select(rows, width=width, method=m, seed=k)) for m in training.METHODS)
        for k in cfg.seeds
    ])  # fmt: skip


def judge(cfg: Config, rows: list[dict]) -> tuple[bool | None, dict, str]:
    """(verdict, figures, reason), every width judged.

    Per width, four paired tests: layer-wise noise beats GD and beats full noise in final test accuracy, and
    its Gauss-Newton trace is below theirs *at equal training loss* (``equal_loss_targets``,
    ``records.at_loss``): the trace falls while a run trains, so traces at the same step would reward the method
    that trains slowest or fastest, not the flattest. All widths' parts together, Holm-corrected
    (``verdicts.combine``)."""
    resolution = records.resolution(rows)
    what = {
        "acc_vs_gd": "test accuracy, layer-wise minus GD",
        "acc_vs_noise": "test accuracy, layer-wise minus full",
        "gn_trace_vs_gd": "Gauss-Newton trace at train loss {loss:.3g}, GD minus layer-wise",
        "gn_trace_vs_noise": "Gauss-Newton trace at train loss {loss:.3g}, full minus layer-wise",
    }
    gains, figures, reasons, unfit = {}, {}, [], {}
    for w in cfg.widths:
        final = {
            (m, k): records.per_seed(rows, k, cfg.seeds, width=w, method=m, step=cfg.steps)
            for m in training.METHODS
            for k in ("test_acc", "train_loss")
        }
        targets = equal_loss_targets(cfg, rows, w)
        trace = {
            m: np.array([
                records.at_loss(rows, "gn_trace", t, width=w, method=m, seed=k) for t, k in zip(targets, cfg.seeds)
            ])
            for m in training.METHODS
        }  # fmt: skip
        figures[f"equal_train_loss_w{w}"] = float(np.mean(targets))
        for m in training.METHODS:
            figures[f"gn_trace_at_equal_loss_w{w}_{m}"] = float(np.mean(trace[m]))
        for m in ("gd", "noise"):
            gains[f"w{w}_acc_vs_{m}"] = verdicts.paired_gain(
                final[("layer", "test_acc")], final[(m, "test_acc")], resolution=resolution
            )
            gains[f"w{w}_gn_trace_vs_{m}"] = verdicts.paired_gain(-trace["layer"], -trace[m])
        for name in what:
            g = gains[f"w{w}_{name}"]
            figures.update({f"layer_{name}_w{w}": g.mean, f"layer_{name}_se_w{w}": g.se})
            reasons.append(g.describe(f"width {w}: " + what[name].format(loss=np.mean(targets))))
        for m in training.METHODS:
            if np.mean(final[(m, "train_loss")]) > cfg.fit_loss:
                unfit[f"{training.label(m)} at width {w}"] = float(np.mean(final[(m, "train_loss")]))
    reason = "; ".join(reasons + [verdicts.combine_reason(gains)])
    if unfit:
        losses_text = ", ".join(f"{name} {v:.3g}" for name, v in unfit.items())
        text = f"cannot test the claim: final train loss above fit_loss={cfg.fit_loss:g} ({losses_text}); {reason}"
        return None, figures, text
    return verdicts.combine(gains), figures, reason


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    figures, table = {}, []
    for w in cfg.widths:
        for m in cfg.methods:
            entry = {"width": w, "method": training.label(m)}
            for k in ("test_acc", "gn_trace", "train_loss"):
                entry[k], se = verdicts.mean_se(records.per_seed(rows, k, cfg.seeds, width=w, method=m, step=cfg.steps))
                figures[f"{k}_w{w}_{m}"] = entry[k]
                if k == "test_acc":
                    entry["se"] = figures[f"test_acc_se_w{w}_{m}"] = se
            table.append(entry)
    supported, reason = None, "needs the three methods"
    if set(training.METHODS) <= set(cfg.methods):
        supported, judged, reason = judge(cfg, rows)
        figures.update(judged)
    return experiment.Verdict(supported, figures, table, reason)


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    fig, axes = plt.subplots(3, len(cfg.widths), figsize=(5.5 * len(cfg.widths), 11), squeeze=False)
    keys = (("test_acc", "test accuracy"), ("train_loss", "train loss"))
    for col, w in enumerate(cfg.widths):
        series = {training.label(m): (dict(width=w, method=m), training.COLORS[m]) for m in cfg.methods}
        for row, (key, name) in enumerate(keys):
            plots.plot_curves(axes[row, col], rows, key, series)
            axes[row, col].set(ylabel=f"{name} (seed mean)", yscale="linear" if row == 0 else "log", xlabel="GD step")
        for m in cfg.methods:  # the trace against the training loss: the comparison the verdict makes
            _, loss = records.curve(rows, "train_loss", width=w, method=m)
            _, trace = records.curve(rows, "gn_trace", width=w, method=m)
            axes[2, col].plot(loss, trace, "o-", ms=3, color=training.COLORS[m], label=training.label(m))
        if set(training.METHODS) <= set(cfg.methods):
            axes[2, col].axvline(np.mean(equal_loss_targets(cfg, rows, w)), color="gray", ls=":",
                                 label="compared at this train loss")  # fmt: skip
        axes[2, col].set(xscale="log", yscale="log", xlabel="train loss (seed mean; training runs left to right)",
                         ylabel="Gauss-Newton trace (seed mean)")  # fmt: skip
        axes[2, col].invert_xaxis()
        axes[2, col].tick_params(axis="x", which="both", labelsize=7, labelrotation=30)
        axes[2, col].legend(fontsize=8)
        axes[0, col].set_title(f"{cfg.depth} x {w}, lr {cfg.lrs[col]:g}, sigma {cfg.sigma:g}", fontsize=10)
        axes[1, col].axhline(cfg.fit_loss, color="gray", ls=":", lw=1, label="fit_loss")
        axes[1, col].legend(fontsize=8)
    fig.tight_layout()
    return {"deep_mlp.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("sigma", "seed"))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
