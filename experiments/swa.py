"""Stochastic weight averaging (Izmailov et al. 2018) against SGD: flatness at equal loss and test accuracy.

Claim (Izmailov et al. 2018, Section 3.4 "solution width" and Section 4): the average of the SGD iterates of a
constant (high) learning-rate phase lies in a flatter region of the training loss than conventional SGD with a
decaying learning rate, with equal or better test accuracy. Izmailov et al. measure width along random rays;
the statistic here is the Hessian's lambda_max, compared at the same training loss.

Setup: a ReLU MLP (``arch="mlp"``, ``lsgeo.models.MLP``) or a ResNet with BatchNorm (``arch="resnet"``,
``lsgeo.models.ResNet18`` with ``stage_sizes``) on scikit-learn digits (or MNIST-1D), softmax
cross-entropy, minibatch SGD with ``batch_size`` examples per step for ``steps`` steps; both methods
share the first half of the budget:

- ``sgd``: Izmailov et al.'s baseline schedule: lr for the first 50% of the steps, a linear decay
  to 0.01 lr until 90%, then constant;
- ``swa``: lr for the first 50%, a linear decay to ``swa_lr`` until ``swa_start``, then constant
  ``swa_lr``; the running mean of the iterates at every epoch end from ``swa_start`` on
  (``lsgeo.train.sweep(swa_start=..., swa_every=steps per epoch)``) is the SWA solution.

For a BatchNorm net the statistics of the SWA average are recomputed on the training inputs
(Izmailov et al.'s bn_update; ``lsgeo.models.recompute_batch_stats``: exact population statistics), at
every evaluation and at the end; the SGD solution gets its population statistics the same way, so
both are measured alike. Both methods are vmapped over seeds (a seed fixes the initialisation and the
data order, so the methods are paired).

Flatness at equal training loss (the curvature of a cross-entropy minimum falls with its loss, so a method that
merely ends at a lower loss looks flatter): at every evaluation (every ``eval_every`` steps) the whole training
set's loss and the Hessian's lambda_max (Lanczos, ``track_iters`` steps, ``lsgeo.curvature.top_eigenvalues``) are
recorded for the SGD iterate, the SWA average and the SWA run's own (un-averaged) iterate. Per seed the common
loss L* is the higher of the two final losses (a loss both runs reach), and each run's lambda_max at L* is read
where its loss first falls to L*, log-linear between the two evaluations around it (``records.at_loss``). A seed
where a run's curve does not reach L* (the SWA average starts below it) is left out of the pairs.

Verdict (``discrimination.judge``), two parts, paired over seeds (``verdicts.paired_gain``, 95% Student-t):

- ``flatter_at_equal_loss``: log lambda_max(SGD) - log lambda_max(SWA) at L* above t s.e.; negative control: the
  same test with the SWA run's last iterate, un-averaged, in place of the average (the same schedule without the
  averaging the claim credits: it must not be flatter, or the flatness comes from the learning rate);
- ``accuracy_not_worse``: "equal or better" test accuracy at the end as a non-inferiority test
  (``Gain.noninferior``): the interval gain ± (t s.e. + one test example's worth) above -``acc_bound``;
  negative control: the same test on SWA's accuracy lowered by 2 ``acc_bound`` (a model known to be worse by
  twice the bound must not be called equal: the rule is not vacuous).

Supported when both hold and both controls fail; null when a control passes ("does not discriminate"); false
when a part is contradicted (Holm over the parts). Power: the minimum detectable effect of each rule at the
run's spread (``discrimination.Power``), in log lambda_max (Izmailov et al. report no Hessian numbers) and
against the non-inferiority bound. The final lambda_max and Hutch++ trace at the end of the budget (unequal
losses) are recorded, not judged.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import numpy as np
import optax

from experiments import cli, context, discrimination, experiment, nets, plots, records, verdicts
from lsgeo import curvature, models, train

METHODS = ("sgd", "swa")
COLORS = {"sgd": "black", "swa": "tab:green", "iterate": "tab:olive"}
LABELS = {"sgd": "SGD (decaying lr)", "swa": "SWA average", "iterate": "SWA run's iterate (control)"}
SOURCE = "Izmailov et al. 2018, Sec. 3.4: widths along random rays (Fig. 5), no Hessian eigenvalues"

CLAIM = (
    "At equal training loss the SWA average of a constant-learning-rate SGD phase has a smaller Hessian lambda_max "
    "than SGD with a decaying learning rate, with test accuracy not worse by more than acc_bound (Izmailov et al. "
    "2018, Sections 3.4 and 4)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """SGD vs SWA on an MLP (or a BatchNorm ResNet); the defaults run in about a minute on a CPU."""

    dataset: str = "digits"  # "digits" or "mnist1d" (arch "resnet": an image set, e.g. digits)
    n_train: int | None = 1024  # training points (None: all)
    arch: Literal[nets.ARCHS] = "mlp"  # "mlp" or "resnet" (BatchNorm: the SWA statistics are recomputed)
    widths: tuple[int, ...] = (64, 64)  # hidden widths of the MLP
    resnet_width: int = 4  # base width of the ResNet
    stage_sizes: tuple[int, ...] = (1, 1, 1, 1)  # BasicBlocks per stage of the ResNet
    batch_size: int = 32
    steps: int = 3200  # SGD steps of both methods (100 epochs of 32 steps by default)
    lr: float = 0.1  # initial learning rate of both methods
    swa_lr: float = 0.05  # constant learning rate of the SWA phase
    swa_start: float = 0.75  # SWA averages from this fraction of the steps on
    eval_every: int = 160  # steps between evaluations (the curves lambda_max is read from at equal loss)
    track_iters: int = 12  # Lanczos steps of the lambda_max recorded at every evaluation
    lanczos_iters: int = 30
    trace_probes: int = 60  # Hutch++ Hessian-vector products
    acc_bound: float = 0.01  # "equal or better": SWA's accuracy interval must lie above -acc_bound (1 point)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # initialisation, data order, curvature probes


PRESETS = {
    "paper": Config(
        dataset="mnist1d",
        n_train=4000,
        widths=(256, 256),
        batch_size=128,
        steps=31_250,
        eval_every=625,
        lanczos_iters=60,
        trace_probes=150,
    )
}


@dataclasses.dataclass(frozen=True)
class EvaluateCurvature:
    """``eval_fn``: accuracy and loss on val / test (``nets.Evaluate``) and lambda_max of the Hessian of the training
    loss (``eval_data["train"]``; a BatchNorm net in evaluation mode at recomputed statistics)."""

    evaluate: nets.Evaluate
    num_iters: int

    def __call__(self, params, *args):
        out = self.evaluate(params, *args)
        state, eval_data = (None, args[0]) if len(args) == 1 else args
        batch = eval_data["train"]
        if state:
            batch = (*batch, models.recompute_batch_stats(self.evaluate.model, params, state, eval_data["stats"]))
        objective = nets.Objective(self.evaluate.model)
        out["lambda_max"] = curvature.top_eigenvalues(objective, params, batch, jax.random.key(0),
                                                      num_iters=self.num_iters)[0]  # fmt: skip
        return out


def cells(cfg: Config) -> list[dict]:
    nets.check_arch(cfg.arch)
    return [dict(method=m, seed=s) for m in METHODS for s in cfg.seeds]


def prepare(cfg: Config) -> nets.Splits:
    return nets.splits(cfg.dataset, n_train=cfg.n_train, flatten=cfg.arch == "mlp")


def swa_start_step(cfg: Config, steps_per_epoch: int) -> int:
    """The first averaged step: the fraction ``swa_start`` of the budget, rounded down to an epoch end."""
    return int(cfg.swa_start * cfg.steps) // steps_per_epoch * steps_per_epoch


def schedule(cfg: Config, method: str, swa_start: int) -> optax.Schedule:
    """The learning-rate schedule of ``method`` (Izmailov et al. 2018, Section 5)."""
    half = cfg.steps // 2
    end, final = (int(0.9 * cfg.steps), 0.01 * cfg.lr) if method == "sgd" else (swa_start, cfg.swa_lr)
    decay = optax.linear_schedule(cfg.lr, final, max(end - half, 1))
    return optax.join_schedules([optax.constant_schedule(cfg.lr), decay], [half])


def run(cfg: Config, data: nets.Splits, group: list[dict]) -> list[list[dict]]:
    method, seeds = group[0]["method"], [c["seed"] for c in group]
    net = nets.Net.of(cfg, data)
    steps_per_epoch = len(data.train[1]) // cfg.batch_size
    swa_start = swa_start_step(cfg, steps_per_epoch)
    swa = dict(swa_start=swa_start, swa_every=steps_per_epoch) if method == "swa" else {}
    with context.progress_bar(cfg.steps, f"{method} x {len(seeds)} seeds") as callback:
        result = train.sweep(
            net.train_objective, lambda seed: optax.sgd(schedule(cfg, method, swa_start)), net.init, data.train, {},
            seeds, num_steps=cfg.steps, eval_every=cfg.eval_every, batch_size=cfg.batch_size,
            eval_fn=EvaluateCurvature(net.evaluate, cfg.track_iters),
            eval_data={**net.eval_data(data), "train": data.train}, model_state=net.init_state, callback=callback,
            **swa,
        )  # fmt: skip
    final = jax.tree_util.tree_map(lambda p: np.asarray(p)[0], result.swa_params if method == "swa" else result.params)
    states = net.population_stats(
        final, jax.tree_util.tree_map(lambda s: np.asarray(s)[0], result.model_state), data.train[0]
    )
    measures = nets.final_measures(
        net.objective,
        final,
        seeds,
        data.train,
        data.test,
        states=states,
        lanczos_iters=cfg.lanczos_iters,
        trace_probes=cfg.trace_probes,
    )
    out = []
    for i in range(len(seeds)):
        rows = records.history_rows(result.history, (0, i), kind="iterate" if method == "swa" else "history")
        if method == "swa":
            rows += records.history_rows(result.history, (0, i), "swa_", kind="history")
        final = {k: float(v[i]) for k, v in measures.items()}
        rows.append(dict(kind="final", step=cfg.steps, swa_start=swa_start, n_test=len(data.test[1]), **final))
        out.append(rows)
    return out


CURVES = {"sgd": dict(method="sgd", kind="history"), "swa": dict(method="swa", kind="history"),
          "iterate": dict(method="swa", kind="iterate")}  # fmt: skip


def final_loss(rows: list[dict], seed: int, curve: str) -> float:
    """The training loss of ``curve`` ("sgd", "swa", "iterate") at its last evaluation."""
    return max(records.select(rows, seed=seed, **CURVES[curve]), key=lambda r: r["step"])["train_loss"]


def at_equal_loss(rows: list[dict], seed: int, reference: str, other: str) -> tuple[float, float, float]:
    """(L*, lambda_max of ``reference`` at L*, that of ``other`` at L*): L* is the higher of the two curves' final
    training losses (a loss both reach); each lambda_max is read where its curve first falls to L*, log-linear
    between evaluations (``records.at_loss``); NaN where a curve never gets there (it starts below L*)."""
    loss = max(final_loss(rows, seed, reference), final_loss(rows, seed, other))
    read = lambda c: records.at_loss(rows, "lambda_max", loss, seed=seed, **CURVES[c])  # noqa: E731
    return loss, read(reference), read(other)


def equal_loss_gain(cfg: Config, rows: list[dict], other: str) -> tuple[verdicts.Gain, dict]:
    """log lambda_max(SGD) - log lambda_max(``other``) at the loss both reach, paired over the seeds where both
    curves reach it; and the per-seed values (for the figures)."""
    values = {k: at_equal_loss(rows, k, "sgd", other) for k in cfg.seeds}
    matched = [k for k, (_, a, b) in values.items() if np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0]
    sgd = np.log([values[k][1] for k in matched])
    gain = verdicts.paired_gain(sgd, np.log([values[k][2] for k in matched]))
    return gain, {k: values[k] for k in matched}


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    keys = ("lambda_max", "hessian_trace", "test_acc", "test_loss", "train_loss")
    final = {(m, k): records.per_seed(rows, k, cfg.seeds, method=m, kind="final") for m in METHODS for k in keys}
    flat, per_seed = equal_loss_gain(cfg, rows, "swa")
    control, control_seed = equal_loss_gain(cfg, rows, "iterate")
    table, figures = [], {}
    for m in METHODS:
        entry = dict(method=m)
        for k in keys:
            entry[k], se = verdicts.mean_se(final[(m, k)])
            figures[f"{m}_{k}"] = entry[k]
            if k == "test_acc":
                entry["test_acc_se"] = se
        column = 1 if m == "sgd" else 2
        entry["lambda_max_at_equal_loss"] = figures[f"{m}_lambda_max_at_equal_loss"] = (
            float(np.exp(np.mean(np.log([v[column] for v in per_seed.values()])))) if per_seed else float("nan"))
        table.append(entry)
    for k in ("lambda_max", "hessian_trace", "train_loss"):  # at the end of the budget, unequal losses: recorded
        figures[f"{k}_ratio"] = figures[f"swa_{k}"] / figures[f"sgd_{k}"]
    figures.update(equal_loss=float(np.mean([v[0] for v in per_seed.values()])) if per_seed else float("nan"),
                   log_ratio_at_equal_loss=flat.mean, log_ratio_at_equal_loss_se=flat.se,
                   log_ratio_at_equal_loss_margin=flat.margin, matched_pairs=flat.n,
                   control_log_ratio=control.mean, control_log_ratio_se=control.se, control_matched_pairs=control.n)
    resolution = records.resolution(rows)
    acc = verdicts.paired_gain(final[("swa", "test_acc")], final[("sgd", "test_acc")], resolution=resolution)
    worse = verdicts.paired_gain(final[("swa", "test_acc")] - 2 * cfg.acc_bound, final[("sgd", "test_acc")],
                                 resolution=resolution)  # fmt: skip
    figures.update(acc_gain=acc.mean, acc_gain_se=acc.se, acc_gain_margin=acc.margin)
    parts = {
        "flatter_at_equal_loss": discrimination.Part(
            flat, control, "the SWA run's last iterate, un-averaged, in place of the SWA average"),
        "accuracy_not_worse": discrimination.Part(
            acc.noninferior(cfg.acc_bound), worse.noninferior(cfg.acc_bound),
            f"SWA's accuracy lowered by {200 * cfg.acc_bound:g} points (twice the bound)"),
    }  # fmt: skip
    judgement = discrimination.judge(parts)
    powers = {
        "flatter_at_equal_loss": discrimination.Power.of(flat, None, " (log lambda_max)", SOURCE),
        "accuracy_not_worse": discrimination.Power.of(
            acc, cfg.acc_bound, " (accuracy)", "the non-inferiority bound acc_bound: a drop this large must be seen"),
    }
    supported, power_clause = discrimination.with_power(judgement.supported, powers)
    low, high = 100 * (acc.mean - acc.margin), 100 * (acc.mean + acc.margin)
    left_out = sorted(set(cfg.seeds) - set(per_seed))
    reason = "; ".join(
        [flat.describe(f"log lambda_max at equal training loss (L* = {figures['equal_loss']:.3g}), SGD minus SWA")
         + (f" (seeds {left_out} left out: a curve never reaches L*)" if left_out else ""),
         control.describe("control: the same with the SWA run's un-averaged iterate"),
         f"at the end (unequal losses, recorded): lambda_max ratio SWA/SGD {figures['lambda_max_ratio']:.3g}, "
         f"train-loss ratio {figures['train_loss_ratio']:.3g}",
         acc.describe("test accuracy, SWA minus SGD", scale=100, unit=" points"),
         f"equal or better: interval [{low:+.2g}, {high:+.2g}] points "
         f"{'above' if parts['accuracy_not_worse'].claim else 'not above'} -{100 * cfg.acc_bound:g} (non-inferiority)",
         judgement.reason, power_clause]
    )  # fmt: skip
    return experiment.Verdict(supported, figures, table, reason, judgement.controls,
                              {k: p.record() for k, p in powers.items()})  # fmt: skip


def _band(ax, rows: list[dict], key: str, fields: dict, color, label: str, **style) -> None:
    """Mean over seeds of ``key`` against the step, with a band from the lowest to the highest seed."""
    seeds = sorted({r["seed"] for r in records.select(rows, **fields)})
    steps = sorted({r["step"] for r in records.select(rows, **fields)})
    table = np.full((len(seeds), len(steps)), np.nan)
    for r in records.select(rows, **fields):
        table[seeds.index(r["seed"]), steps.index(r["step"])] = r[key]
    ax.plot(steps, np.nanmean(table, axis=0), color=color, label=f"{label} (mean, band: seed range)", **style)
    ax.fill_between(steps, np.nanmin(table, axis=0), np.nanmax(table, axis=0), color=color, alpha=0.15, lw=0)


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    start = records.select(rows, kind="final")[0]["swa_start"]
    for curve in ("sgd", "iterate", "swa"):
        _band(axes[0], rows, "train_loss", CURVES[curve], COLORS[curve], LABELS[curve])
        for k in cfg.seeds:  # lambda_max against the training loss: equal loss is a vertical line
            sel = sorted(records.select(rows, seed=k, **CURVES[curve]), key=lambda r: r["step"])
            sel = [r for r in sel if r["step"] >= cfg.steps // 2]
            axes[1].plot([r["train_loss"] for r in sel], [r["lambda_max"] for r in sel], ".-", color=COLORS[curve],
                         lw=0.8, ms=3, alpha=0.8, label=LABELS[curve] if k == cfg.seeds[0] else None)  # fmt: skip
    for k in cfg.seeds:
        loss, sgd, swa = at_equal_loss(rows, k, "sgd", "swa")
        axes[1].plot([loss, loss], [sgd, swa], "k-", lw=2, alpha=0.6,
                     label="judged pair at L*" if k == cfg.seeds[0] else None)
    axes[0].axvline(start, color="gray", lw=0.8, ls="--")
    axes[0].set(yscale="log", xlabel="step", ylabel="training loss (whole set)", title="dashed: averaging starts")
    axes[1].set(xscale="log", yscale="log", xlabel="training loss (whole set)", ylabel="lambda_max of the Hessian",
                title="second half of training; L* = the higher final loss")
    verdict = summarize(cfg, rows)
    for x, (name, other, color) in enumerate((("claim: SWA average", "swa", COLORS["swa"]),
                                              ("control: un-averaged iterate", "iterate", COLORS["iterate"]))):
        gain, per_seed = equal_loss_gain(cfg, rows, other)
        diff = [np.log(a / b) for _, a, b in per_seed.values()]
        axes[2].plot(x + np.linspace(-0.12, 0.12, len(diff)), diff, "o", color=color, label=f"{name}, per seed")
        if np.isfinite(gain.margin):
            axes[2].errorbar([x + 0.3], [gain.mean], yerr=[gain.margin], fmt="s", capsize=4, color="k",
                             label="mean ± t s.e. (95%)" if x == 0 else None)  # fmt: skip
    axes[2].axhline(0.0, color="k", lw=0.8)
    axes[2].set(xticks=[0, 1], xticklabels=["SGD vs SWA average", "SGD vs SWA iterate\n(control)"], xlim=(-0.5, 1.6),
                ylabel="log lambda_max(SGD) - log lambda_max(other) at L*", title="judged: > 0 = flatter than SGD")
    axes[2].legend(fontsize=7)
    seeds = list(cfg.seeds)
    n_test = max(r.get("n_test", 0) for r in rows) or None
    diff = 100 * (records.per_seed(rows, "test_acc", seeds, method="swa", kind="final")
                  - records.per_seed(rows, "test_acc", seeds, method="sgd", kind="final"))  # fmt: skip
    axes[3].plot(np.linspace(-0.15, 0.15, len(seeds)), diff, "o", color=COLORS["swa"], label="per seed")
    acc = verdicts.paired_gain(diff / 100, np.zeros_like(diff), resolution=1.0 / n_test if n_test else 0.0)
    if np.isfinite(acc.margin):
        axes[3].errorbar([0.4], [100 * acc.mean], yerr=[100 * acc.margin], fmt="s", capsize=4, color="k",
                         label="mean ± margin (t s.e. + one example)")
        axes[3].errorbar([0.8], [100 * (acc.mean - 2 * cfg.acc_bound)], yerr=[100 * acc.margin], fmt="s", capsize=4,
                         color="tab:red", label=f"control: {200 * cfg.acc_bound:g} points worse")  # fmt: skip
    axes[3].axhspan(-100 * cfg.acc_bound, max(axes[3].get_ylim()[1], 100 * cfg.acc_bound), color=COLORS["swa"],
                    alpha=0.1, label=f"equal or better (above -{100 * cfg.acc_bound:g} point)")  # fmt: skip
    axes[3].axhline(0.0, color="k", lw=0.8)
    axes[3].set(xticks=[], xlim=(-0.5, 1.1), ylabel="test accuracy, SWA minus SGD (points)",
                title=f"paired by seed{f'; one test example = {100 / n_test:.2g} points' if n_test else ''}")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    axes[3].legend(fontsize=7)
    fig.suptitle(f"verdict: {verdict.word}")
    fig.tight_layout()
    return {"swa.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
