"""Stochastic weight averaging (Izmailov et al. 2018) against SGD: flatness and test accuracy.

Claim (Izmailov et al. 2018, Sections 3-5): averaging the SGD iterates of a constant (high) learning
rate phase finds a solution in a flatter region of the loss surface than conventional SGD with a
decaying learning rate, with equal or better test accuracy.

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
data order, so the methods are paired). At the end, on the whole training set: lambda_max of the
Hessian (``lsgeo.curvature.top_eigenvalues``, Lanczos) and its trace (``lsgeo.curvature.hessian_trace``,
Hutch++); test accuracy on the held-out set. The SWA curves start where averaging starts (before it
there is no average to evaluate).

Verdict (paired over seeds, ``verdicts.paired_gain``, 95% Student-t): SWA's lambda_max and its trace
below SGD's beyond t s.e. (two parts), and "equal or better" test accuracy as a non-inferiority test
(``Gain.noninferior``): the whole interval gain ± (t s.e. + one test example's worth) lies above
-``acc_bound`` (1 point), false when it lies below. Supported when all hold, false when one is
contradicted (Holm over the two curvature tests), null otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import numpy as np
import optax

from experiments import cli, context, experiment, nets, plots, records, verdicts
from lsgeo import train

METHODS = ("sgd", "swa")
COLORS = {"sgd": "black", "swa": "tab:green"}
LABELS = {"sgd": "SGD (decaying lr)", "swa": "SWA average"}

CLAIM = (
    "Stochastic weight averaging finds flatter solutions than SGD (lower Hessian lambda_max and trace) with "
    "equal or better test accuracy (Izmailov et al. 2018)."
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
    eval_every: int = 320  # steps between evaluations
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
        eval_every=3125,
        lanczos_iters=60,
        trace_probes=150,
    )
}


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
            seeds, num_steps=cfg.steps, eval_every=cfg.eval_every, batch_size=cfg.batch_size, eval_fn=net.evaluate,
            eval_data=net.eval_data(data), model_state=net.init_state, callback=callback, **swa,
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


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    final = {
        (m, k): records.per_seed(rows, k, cfg.seeds, method=m, kind="final")
        for m in METHODS
        for k in ("lambda_max", "hessian_trace", "test_acc", "test_loss", "train_loss")
    }
    table, figures = [], {}
    for m in METHODS:
        entry = dict(method=m)
        for k in ("lambda_max", "hessian_trace", "test_acc", "test_loss", "train_loss"):
            entry[k], se = verdicts.mean_se(final[(m, k)])
            figures[f"{m}_{k}"] = entry[k]
            if k == "test_acc":
                entry["test_acc_se"] = se
        table.append(entry)
    gains = {k: verdicts.paired_gain(-final[("swa", k)], -final[("sgd", k)]) for k in ("lambda_max", "hessian_trace")}
    acc = verdicts.paired_gain(
        final[("swa", "test_acc")], final[("sgd", "test_acc")], resolution=records.resolution(rows)
    )
    for k, g in gains.items():
        figures.update(
            {f"{k}_ratio": figures[f"swa_{k}"] / figures[f"sgd_{k}"], f"{k}_drop": g.mean, f"{k}_drop_se": g.se}
        )
    figures.update(acc_gain=acc.mean, acc_gain_se=acc.se, acc_gain_margin=acc.margin)
    # "equal or better": a non-inferiority test with an explicit bound (null with too few seeds to tell).
    not_worse = acc.noninferior(cfg.acc_bound)
    parts = {**{f"lower_{k}": g for k, g in gains.items()}, "accuracy_not_worse": not_worse}
    low, high = 100 * (acc.mean - acc.margin), 100 * (acc.mean + acc.margin)
    reason = "; ".join(
        [g.describe(f"{k}, SGD minus SWA") for k, g in gains.items()]
        + [acc.describe("test accuracy, SWA minus SGD", scale=100, unit=" points")]
        + [f"equal or better: interval [{low:+.2g}, {high:+.2g}] points "
           f"{'above' if not_worse else 'not above'} -{100 * cfg.acc_bound:g} (non-inferiority bound)"]
        + [verdicts.combine_reason(parts)]
    )  # fmt: skip
    return experiment.Verdict(verdicts.combine(parts), figures, table, reason)


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    start = records.select(rows, kind="final")[0]["swa_start"]
    late = [r for r in rows if r["step"] >= cfg.steps // 2]  # test accuracy: the second half, where they differ
    n_test = max(r.get("n_test", 0) for r in rows) or None
    for key, ax, sel in (("train_loss", axes[0], rows), ("test_acc", axes[1], late)):
        plots.plot_curves(ax, sel, key, {LABELS[m]: (dict(method=m, kind="history"), COLORS[m]) for m in METHODS})
        plots.plot_curves(ax, sel, key, {"SWA run's SGD iterate": (dict(method="swa", kind="iterate"), COLORS["swa"])},
                           ls=":", lw=1)
        ax.axvline(start, color="gray", lw=0.8, ls="--")
        ax.legend(fontsize=8)
    lo, hi = axes[1].get_ylim()  # at least 2 points of accuracy tall: one test example is not a "steep drop"
    mid = (lo + hi) / 2
    axes[1].set_ylim(min(lo, mid - 0.01), max(hi, mid + 0.01))
    final = {m: records.select(rows, method=m, kind="final") for m in METHODS}
    seeds = sorted({r["seed"] for r in final["sgd"]})
    x = np.arange(len(METHODS))
    for k in seeds:  # lambda_max per seed, SGD -> SWA, one line per seed
        values = [records.select(final[m], seed=k)[0]["lambda_max"] for m in METHODS]
        axes[2].plot(x, values, "o-", color="gray", lw=0.8, ms=4)
    axes[2].set(xticks=x, xticklabels=[LABELS[m] for m in METHODS], xlim=(-0.4, len(METHODS) - 0.6),
                ylabel="lambda_max of the Hessian at the end", title=f"one line per seed ({len(seeds)} seeds)")
    diff = 100 * (records.per_seed(rows, "test_acc", seeds, method="swa", kind="final")
                  - records.per_seed(rows, "test_acc", seeds, method="sgd", kind="final"))  # fmt: skip
    jitter = np.linspace(-0.15, 0.15, len(seeds))
    axes[3].plot(jitter, diff, "o", color=COLORS["swa"], label="per seed")
    acc = verdicts.paired_gain(diff / 100, np.zeros_like(diff), resolution=1.0 / n_test if n_test else 0.0)
    if np.isfinite(acc.margin):
        axes[3].errorbar([0.4], [100 * acc.mean], yerr=[100 * acc.margin], fmt="s", capsize=4, color="k",
                         label="mean ± margin (t s.e. + one example)")  # fmt: skip
    axes[3].axhspan(-100 * cfg.acc_bound, max(axes[3].get_ylim()[1], 100 * cfg.acc_bound), color=COLORS["swa"],
                    alpha=0.1, label=f"equal or better (above -{100 * cfg.acc_bound:g} point)")  # fmt: skip
    axes[3].axhline(0.0, color="k", lw=0.8)
    axes[3].set(xticks=[], xlim=(-0.5, 0.7), ylabel="test accuracy, SWA minus SGD (points)",
                title=f"paired by seed{f'; one test example = {100 / n_test:.2g} points' if n_test else ''}")
    axes[3].legend(fontsize=7)
    axes[0].set(yscale="log", xlabel="step", ylabel="train loss (mean over seeds)", title="dashed: SWA starts")
    axes[1].set(xlabel="step", ylabel="test accuracy (mean over seeds)", title="second half of training")
    fig.tight_layout()
    return {"swa.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
