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

Verdict (every width, paired over seeds, ``verdicts.paired_gain``, 95% Student-t; ``discrimination.judge``): per
width four parts, layer-wise noise beats GD and beats full noise in test accuracy, and its Gauss-Newton trace is
below GD's and below full noise's at equal training loss (the loss all runs reach in a seed; the trace interpolated
in log-loss between evaluations, ``records.at_loss``), since the trace still falls while a run trains.
The judged accuracy is each run's *mean over the last ``judge_last`` of the steps* (default: the last half), not
its last evaluation: a full-batch run can spike at one step (train loss 0.005 -> 1.4 seen at the last step of a
default run), and a verdict must not hinge on when a spike lands. Spikes in that window (train loss above
``spike_factor`` times the run's lowest before it) are listed in ``summary.json`` (``figures.loss_spikes`` and the
reason), not decisive. Negative control of every part: the same paired test with layer-wise noise replaced by
plain GD from other initialisations (``discrimination.control_seeds``), which must fail: a rule that it passes
reads seed-to-seed variation as a gain. Supported when all parts of all widths hold and every control fails,
false when a part is contradicted after Holm's correction for their number, null otherwise. A run whose median
train loss over the window is above ``fit_loss`` has not fit its data: the comparison then cannot test the claim
(the paper's networks are trained to fit), and the verdict is null, saying so. Power: the minimum detectable effect
of each accuracy part in points, stored next to the source's effect (Figure 4 is a figure: no number to compare).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import optax

from experiments import cli, discrimination, experiment, nets, plots, records, training, verdicts
from lsgeo import losses, models, risk

CLAIM = (
    "In deep (5 hidden layers) ReLU MLPs trained to fit, layer-wise noise injection gives a higher test accuracy "
    "than GD and than GD+noise (full), and a smaller Gauss-Newton trace tr(D2L DPhi DPhi^T) than both at equal "
    "training loss (Orvieto et al. 2023, Section 5, Figure 4)."
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
    fit_loss: float = 0.3  # a run whose median train loss over the judged window is above this has not fit (null)
    judge_last: float = 0.5  # the verdict uses each run's mean over the evaluations in this last fraction of the steps
    spike_factor: float = 10.0  # a train loss above this times the run's lowest before it is a spike (reported)
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
    if not 0 < cfg.judge_last <= 1:
        raise ValueError(f"--judge-last must be in (0, 1], the judged fraction of the steps; got {cfg.judge_last}")
    if len(cfg.widths) != len(cfg.lrs):
        raise ValueError(
            f"--widths and --lrs must have the same length (one step size per width); got {cfg.widths} and {cfg.lrs}"
        )


def cells(cfg: Config) -> list[dict]:
    if len(cfg.widths) != len(cfg.lrs):
        raise ValueError(f"widths and lrs must have the same length, got {cfg.widths} and {cfg.lrs}")
    out = [c for w in cfg.widths for c in training.method_cells(cfg.methods, (cfg.sigma,), cfg.seeds, width=w)]
    if "gd" in cfg.methods:  # the negative control: plain GD from other initialisations, paired with seed k
        out += [dict(width=w, method=CONTROL, sigma=0.0, seed=k) for w in cfg.widths
                for k in discrimination.control_seeds(cfg.seeds)]  # fmt: skip
    return out


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

    group = [dict(c, method="gd") if c["method"] == CONTROL else c for c in group]
    return training.train_cells(
        nets.Objective(model), nets.init_fn(model, train_batch[0]), train_batch, group,
        inner=optax.sgd(cfg.lrs[cfg.widths.index(width)]), num_steps=cfg.steps, eval_every=cfg.eval_every,
        eval_fn=eval_fn, eval_data={"test": test_batch, "train": train_batch},
    )  # fmt: skip


CONTROL = "gd_control"  # plain GD from other initialisations (``discrimination.control_seeds``), in place of layer-wise
ARMS = (*training.METHODS, CONTROL)
SOURCE = "Orvieto et al. 2023, Figure 4 (curves only; the source text gives no number for the gain)"


def equal_loss_targets(cfg: Config, rows: list[dict], width: int) -> np.ndarray:
    """``[seeds]``: per seed, the training loss every method (and the control, where run) reaches at this width
    (the largest of their lowest evaluated losses), at which their Gauss-Newton traces are compared."""
    arms = [m for m in ARMS if records.select(rows, width=width, method=m)]
    return np.array([
        max(min(r["train_loss"] for r in records.select(rows, width=width, method=m, seed=_seed(m, k))) for m in arms)
        for k in cfg.seeds
    ])  # fmt: skip


def _seed(method: str, seed: int) -> int:
    """The seed of ``method``'s run paired with ``seed`` (the control's runs start from other initialisations)."""
    return discrimination.control_seeds([seed])[0] if method == CONTROL else seed


def window(cfg: Config, rows: list[dict], width: int, method: str, seed: int) -> list[dict]:
    """The evaluations of one run in the judged window: the last ``judge_last`` fraction of the steps."""
    return records.window(rows, cfg.steps, cfg.judge_last, width=width, method=method, seed=_seed(method, seed))


def judged(cfg: Config, rows: list[dict], width: int, method: str, key: str, how=np.mean) -> np.ndarray:
    """``[seeds]``: per seed, ``how`` (mean) of ``key`` over the judged window of the run (not its last step)."""
    seeds = [_seed(method, k) for k in cfg.seeds]
    return records.judged(rows, key, seeds, cfg.steps, cfg.judge_last, how, width=width, method=method)


def spikes(cfg: Config, rows: list[dict]) -> list[dict]:
    """The loss spikes in the judged windows (``records.spikes``): an evaluation whose train loss is above
    ``spike_factor`` times the run's lowest before it. Reported (``summary.json``), not decisive: the verdict's
    statistic is the mean over the window and the fit check its median."""
    runs = [dict(width=c["width"], method=c["method"], seed=c["seed"]) for c in cells(cfg)]
    return records.spikes(rows, runs, cfg.steps, cfg.judge_last, cfg.spike_factor)


WHAT = {
    "acc_vs_gd": "test accuracy (mean over the judged window), layer-wise minus GD",
    "acc_vs_noise": "test accuracy (mean over the judged window), layer-wise minus full",
    "gn_trace_vs_gd": "Gauss-Newton trace at train loss {loss:.3g}, GD minus layer-wise",
    "gn_trace_vs_noise": "Gauss-Newton trace at train loss {loss:.3g}, full minus layer-wise",
}


def gains(cfg: Config, rows: list[dict], width: int, figures: dict | None = None) -> tuple[dict, dict, float]:
    """``({part: Gain}, {part: Gain of the control}, equal train loss)`` at one width. The control of each part is
    the same paired test with layer-wise noise replaced by plain GD from other initialisations (it must fail)."""
    resolution = records.resolution(rows)
    arms = [m for m in ARMS if records.select(rows, width=width, method=m)]
    acc = {m: judged(cfg, rows, width, m, "test_acc") for m in arms}
    targets = equal_loss_targets(cfg, rows, width)
    trace = {
        m: np.array([records.at_loss(rows, "gn_trace", t, width=width, method=m, seed=_seed(m, k))
                     for t, k in zip(targets, cfg.seeds)])
        for m in arms
    }  # fmt: skip
    if figures is not None:
        figures.update({f"gn_trace_at_equal_loss_w{width}_{m}": float(np.mean(trace[m])) for m in arms})
    claim, control = {}, {}
    for ref in ("gd", "noise"):
        claim[f"acc_vs_{ref}"] = verdicts.paired_gain(acc["layer"], acc[ref], resolution=resolution)
        claim[f"gn_trace_vs_{ref}"] = verdicts.paired_gain(-trace["layer"], -trace[ref])
        if CONTROL in arms:
            control[f"acc_vs_{ref}"] = verdicts.paired_gain(acc[CONTROL], acc[ref], resolution=resolution)
            control[f"gn_trace_vs_{ref}"] = verdicts.paired_gain(-trace[CONTROL], -trace[ref])
    return claim, control, float(np.mean(targets))


def judge(cfg: Config, rows: list[dict]) -> tuple[bool | None, dict, str, dict, dict]:
    """(verdict, figures, reason, controls, power), every width judged.

    Per width, four paired tests: layer-wise noise beats GD and beats full noise in test accuracy averaged over the
    judged window (the last ``judge_last`` of the steps: a spike at one evaluation does not decide), and its
    Gauss-Newton trace is below theirs *at equal training loss* (``equal_loss_targets``, ``records.at_loss``): the
    trace falls while a run trains, so traces at the same step would reward the method that trains slowest or
    fastest, not the flattest. Each part beside its negative control (``discrimination.judge``): the same test with
    plain GD from other initialisations in place of layer-wise noise, which must fail. All widths' parts together,
    Holm-corrected. Power: the minimum detectable effect of each accuracy part, in points."""
    parts, figures, reasons, unfit, powers = {}, {}, [], {}, {}
    for w in cfg.widths:
        claim, control, loss = gains(cfg, rows, w, figures)
        figures[f"equal_train_loss_w{w}"] = loss
        for name, g in claim.items():
            figures.update({f"layer_{name}_w{w}": g.mean, f"layer_{name}_se_w{w}": g.se})
            reasons.append(g.describe(f"width {w}: " + WHAT[name].format(loss=loss), **_units(name)))
            if name in control:
                figures[f"control_{name}_w{w}"] = control[name].mean
                parts[f"w{w}_{name}"] = discrimination.Part(g, control[name], "plain GD from other initialisations "
                                                            "in place of layer-wise noise")  # fmt: skip
            else:
                parts[f"w{w}_{name}"] = discrimination.Part(g, None, "not run (needs gd in --methods)")
            if name.startswith("acc"):
                p = discrimination.Power(100 * discrimination.minimum_detectable_effect(g), None, " points", SOURCE)
                powers[f"w{w}_{name}"] = p
                figures[f"mde_w{w}_{name}_points"] = p.mde
        for m in training.METHODS:
            median_loss = float(np.mean(judged(cfg, rows, w, m, "train_loss", np.median)))
            if median_loss > cfg.fit_loss:
                unfit[f"{training.label(m)} at width {w}"] = median_loss
    judgement = discrimination.judge(parts)
    supported, power_clause = discrimination.with_power(judgement.supported, powers)
    reason = "; ".join(reasons + [judgement.reason, power_clause])
    if unfit:
        losses_text = ", ".join(f"{name} {v:.3g}" for name, v in unfit.items())
        text = (f"cannot test the claim: median train loss over the judged window above fit_loss={cfg.fit_loss:g} "
                f"({losses_text}); {reason}")  # fmt: skip
        return None, figures, text, judgement.controls, powers
    return supported, figures, reason, judgement.controls, powers


def _units(name: str) -> dict:
    return dict(scale=100, unit=" points") if name.startswith("acc") else {}


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    figures, table = {}, []
    arms = [m for m in ARMS if m in cfg.methods or (m == CONTROL and "gd" in cfg.methods)]
    for w in cfg.widths:
        for m in arms:
            entry = {"width": w, "method": training.label(m) if m != CONTROL else "GD, other inits (control)"}
            for k in ("test_acc", "gn_trace", "train_loss"):
                entry[k], se = verdicts.mean_se(judged(cfg, rows, w, m, k))
                figures[f"{k}_w{w}_{m}"] = entry[k]
                if k == "test_acc":
                    entry["se"] = figures[f"test_acc_se_w{w}_{m}"] = se
            entry["final_train_loss"] = float(np.mean([window(cfg, rows, w, m, k)[-1]["train_loss"] for k in cfg.seeds]))
            table.append(entry)
    found = spikes(cfg, rows)
    figures["loss_spikes"] = len(found)
    spike_text = records.spike_clause(
        found, cfg.spike_factor, lambda s: f"width {s['width']} {s['method']} seed {s['seed']}"
    )
    supported, reason, controls, powers = None, "needs the three methods", {}, {}
    if set(training.METHODS) <= set(cfg.methods):
        supported, judged_figures, reason, controls, powers = judge(cfg, rows)
        figures.update(judged_figures)
    window_text = (f"judged on each run's mean over the last {100 * cfg.judge_last:g}% of the steps "
                   f"(evaluations at steps >= {cfg.steps * (1 - cfg.judge_last):g})")  # fmt: skip
    return experiment.Verdict(supported, figures, table, "; ".join([window_text, spike_text, reason]), controls,
                              {k: p.record() for k, p in powers.items()})  # fmt: skip


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    judging = set(training.METHODS) <= set(cfg.methods)
    fig, axes = plt.subplots(4 if judging else 3, len(cfg.widths), figsize=(5.5 * len(cfg.widths), 15 if judging else 11),
                             squeeze=False)  # fmt: skip
    keys = (("test_acc", "test accuracy (%)", 100.0), ("train_loss", "train loss", 1.0))
    arms = [m for m in ARMS if m in cfg.methods or (m == CONTROL and "gd" in cfg.methods)]
    colors = {**training.COLORS, CONTROL: "tab:gray"}
    names = {m: training.label(m) for m in training.METHODS} | {CONTROL: "GD, other inits (control)"}
    for col, w in enumerate(cfg.widths):
        series = {names[m]: (dict(width=w, method=m), colors[m]) for m in arms}
        for row, (key, name, scale) in enumerate(keys):
            plots.plot_band_curves(axes[row, col], rows, key, series, scale=scale)
            axes[row, col].set(ylabel=name, yscale="linear" if row == 0 else "log", xlabel="GD step")
            axes[row, col].axvspan(cfg.steps * (1 - cfg.judge_last), cfg.steps, color="gold", alpha=0.12,
                                   label="judged window (mean)" if row == 0 else None)  # fmt: skip
        axes[0, col].legend(fontsize=7)
        for m in arms:  # the trace against the training loss: the comparison the verdict makes
            _, loss = records.curve(rows, "train_loss", width=w, method=m)
            _, trace = records.curve(rows, "gn_trace", width=w, method=m)
            axes[2, col].plot(loss, trace, "o-", ms=3, color=colors[m], label=names[m])
        if judging:
            axes[2, col].axvline(np.mean(equal_loss_targets(cfg, rows, w)), color="gray", ls=":",
                                 label="compared at this train loss")  # fmt: skip
            claim, control, _ = gains(cfg, rows, w)
            shown = {f"{n}": g for n, g in claim.items() if n.startswith("acc")}
            shown.update({f"GD' {n}": g for n, g in control.items() if n.startswith("acc")})
            mde = {n: discrimination.minimum_detectable_effect(g) for n, g in shown.items()}
            plots.gain_panel(axes[3, col], shown, controls=[n for n in shown if n.startswith("GD'")], scale=100,
                             unit="points", mde=mde)  # fmt: skip
            axes[3, col].set_title("judged: layer-wise minus GD / full (red); control: GD' (other inits) in its place",
                                   fontsize=8)  # fmt: skip
            if axes[3, col].get_legend_handles_labels()[0]:  # the MDE diamond (none with too few seeds)
                axes[3, col].legend(fontsize=7)
        axes[2, col].set(xscale="log", yscale="log", xlabel="train loss (seed mean; training runs left to right)",
                         ylabel="Gauss-Newton trace (seed mean)")  # fmt: skip
        axes[2, col].invert_xaxis()
        axes[2, col].tick_params(axis="x", which="both", labelsize=7, labelrotation=30)
        axes[2, col].legend(fontsize=8)
        axes[0, col].set_title(f"{cfg.depth} x {w}, lr {cfg.lrs[col]:g}, sigma {cfg.sigma:g}", fontsize=10)
        axes[1, col].axhline(cfg.fit_loss, color="gray", ls=":", lw=1, label="fit_loss")
        axes[1, col].legend(fontsize=7)
    fig.tight_layout()
    return {"deep_mlp.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("sigma", "seed"))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
