"""Small against large batches, trained to the same training loss: sharpness and generalisation.

Claim (Keskar et al. 2017, Section 2, Tables 2-3): at the same training loss, large-batch training ends at
sharper minima of the training loss (larger Hessian eigenvalues, larger epsilon-sharpness) than small-batch SGD,
and these minima generalise worse (lower test accuracy).

Setup: a ReLU MLP (``lsgeo.models.MLP``) on scikit-learn digits (or MNIST-1D), softmax
cross-entropy, SGD with the same step size ``lr`` for both batch sizes (Keskar et al. keep the
optimiser and change only the batch): ``small`` draws ``small_batch`` examples per step, ``large``
``large_batch`` (the whole training set by default, i.e. full-batch GD). Each run stops at the
first check (every ``check_every`` steps, ``lsgeo.train.train`` resumed from its state) at which its
training loss on the whole training set is <= ``target_loss`` (at most ``max_steps`` steps), so both are compared
at the same training loss (the two stopping losses are recorded: they differ by at most one check's decrease).
At that point, on the whole training set: lambda_max of the Hessian (``lsgeo.curvature.top_eigenvalues``), its
trace (``lsgeo.curvature.hessian_trace``, Hutch++) and Keskar's epsilon-sharpness
[max_{||delta||_2 <= rho} R(w + delta) - R(w)] / (1 + R(w)) (``lsgeo.sharpness.epsilon_sharpness``, projected
gradient ascent from a random start); the test accuracy on the held-out set (497 digits). A seed fixes the
initialisation of both batch sizes. The negative control ``twin`` is the small-batch run again from another
seed (seed + ``TWIN_OFFSET``: another initialisation and data order), trained to the same loss.

Verdict (``discrimination.judge``), three parts paired over seeds (``verdicts.paired_gain``, 95% Student-t), each
beside its control, the same test with the small-batch twin in place of the large batch (two runs of one
procedure: the test must not find a difference):
  ``large_sharper_lambda_max``:        log lambda_max(large) - log lambda_max(small) above t s.e.;
  ``large_sharper_epsilon_sharpness``: the same for epsilon-sharpness;
  ``small_generalises_better``:        test accuracy small minus large above t s.e. plus one test example.
Supported when all three hold and no control passes, false when one is contradicted beyond noise after Holm's
correction for the three, null otherwise, and null when a run did not reach the target loss (the comparison is
then not at equal loss). Power (``discrimination.Power``): the minimum detectable effect of each rule at the run's
spread next to the smallest effect Keskar et al. report (checked against the paper, ICLR 2017, arXiv:1609.04836; their
runs use ADAM with batch 256 (SB) against 10% of the training set (LB), 5 starting points each):
  epsilon-sharpness, Table 3 (full space, epsilon 1e-3): large batch 8.7x (C3, CIFAR-100: 258.75 vs 29.85) to 223x
  (F2, TIMIT: 310.64 vs 1.39) small batch's, "a 1-2 order-of-magnitude difference" in their words; the source
  effect here is the smallest, log(258.75 / 29.85). Their metric (Metric 2.1) maximises over a box of half-width
  epsilon (|x_i| + 1) by 10 L-BFGS-B steps and is scaled by 100; ``lsgeo.sharpness.epsilon_sharpness`` maximises
  over an L2 ball of radius ``rho``: only the ratio, not the values, is compared;
  test accuracy, Table 2: small minus large batch from 0.22 points (F1, MNIST: 98.03% vs 97.81%, each +- 0.07) to
  5.27 points (C4, CIFAR-100: 63.08% vs 57.81%); the source effect here is the smallest, 0.22 points.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optax

from experiments import cli, context, discrimination, experiment, nets, plots, records, verdicts
from lsgeo import models, train

BATCHES = ("small", "large", "twin")  # twin: the small-batch run from another seed, the negative control
COLORS = {"small": "tab:blue", "large": "tab:red", "twin": "tab:gray"}
TWIN_OFFSET = 1000  # the twin of seed s trains from seed s + TWIN_OFFSET
SHARPNESS = ("lambda_max", "epsilon_sharpness")

CLAIM = (
    "At the same training loss, large-batch training ends at sharper minima (larger lambda_max and "
    "epsilon-sharpness) than small-batch SGD, and these minima generalise worse (Keskar et al. 2017, Section 2, "
    "Tables 2-3)."
)
SOURCE = {
    "large_sharper_lambda_max": (None, " (log ratio)", "Keskar et al. 2017 report epsilon-sharpness, not lambda_max"),
    "large_sharper_epsilon_sharpness": (float(np.log(258.75 / 29.85)), " (log ratio)",
                                        "Keskar et al. 2017, Table 3 (epsilon 1e-3): large-batch sharpness 8.7x (C3) "
                                        "to 223x (F2) small-batch's; the smallest here"),
    "small_generalises_better": (0.0022, " (accuracy)",
                                 "Keskar et al. 2017, Table 2: test-accuracy gaps 0.22 (F1, MNIST) to 5.27 points "
                                 "(C4); the smallest here"),
}


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
    batch_size = (cfg.large_batch or n) if which == "large" else cfg.small_batch
    objective = nets.Objective(model)
    seeds = [c["seed"] + (TWIN_OFFSET if which == "twin" else 0) for c in group]
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
    resolution = records.resolution(rows)

    def gains(sharp: str) -> dict[str, verdicts.Gain]:
        """The three tests with ``sharp`` ("large", or the control "twin") as the batch claimed sharper."""
        out = {f"large_sharper_{k}": verdicts.paired_gain(np.log(final[(sharp, k)]), np.log(final[("small", k)]))
               for k in SHARPNESS}  # fmt: skip
        out["small_generalises_better"] = verdicts.paired_gain(
            final[("small", "test_acc")], final[(sharp, "test_acc")], resolution=resolution
        )
        return out

    claims, controls = gains("large"), gains("twin")
    for k in (*SHARPNESS, "hessian_trace", "train_loss"):
        figures[f"{k}_ratio"] = figures[f"large_{k}"] / figures[f"small_{k}"]
        figures[f"control_{k}_ratio"] = figures[f"twin_{k}"] / figures[f"small_{k}"]
    for name in claims:
        figures[f"{name}_gain"], figures[f"{name}_se"] = claims[name].mean, claims[name].se
        figures[f"{name}_control_gain"], figures[f"{name}_control_se"] = controls[name].mean, controls[name].se
    g = claims["small_generalises_better"]
    figures.update(acc_gap=g.mean, acc_gap_se=g.se, acc_gap_margin=g.margin)
    what = {
        "large_sharper_lambda_max": "log lambda_max, large minus small",
        "large_sharper_epsilon_sharpness": "log epsilon-sharpness, large minus small",
        "small_generalises_better": "test accuracy, small minus large",
    }
    control = f"the small-batch run from seed + {TWIN_OFFSET} in place of the large batch"
    parts = {name: discrimination.Part(claims[name], controls[name], control) for name in claims}
    judgement = discrimination.judge(parts)
    powers = {name: discrimination.Power.of(claims[name], *SOURCE[name]) for name in claims}
    supported, power_clause = discrimination.with_power(judgement.supported, powers)
    scale = lambda k: (100.0, " points") if k.startswith("small") else (1.0, "")  # noqa: E731
    reason = "; ".join(
        [f"stopped at training loss {figures['small_train_loss']:.3g} (small) vs {figures['large_train_loss']:.3g} "
         f"(large), target {cfg.target_loss:g}"]
        + [claims[k].describe(what[k], *scale(k)) + "; control " + controls[k].describe("(twin)", *scale(k))
           for k in claims]
        + [judgement.reason, power_clause]
    )  # fmt: skip
    if not all(r["reached"] for r in records.select(rows, kind="final")):
        supported, reason = (
            None,
            f"cannot test the claim: a run did not reach the target loss {cfg.target_loss:g}; {reason}",
        )
    return experiment.Verdict(supported, figures, table, reason, judgement.controls,
                              {k: p.record() for k, p in powers.items()})  # fmt: skip


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    groups = {}
    for b in BATCHES:
        final = records.select(rows, batch=b, kind="final")
        label = f"{b} (batch {final[0]['batch_size']})" + (" control" if b == "twin" else "")
        groups[label] = (final, COLORS[b])
        for s in cfg.seeds:
            hist = records.select(rows, batch=b, seed=s, kind="history")
            axes[0].plot([r["step"] for r in hist], [r["train_loss"] for r in hist], color=COLORS[b], alpha=0.6,
                         ls="--" if b == "twin" else "-", label=label if s == cfg.seeds[0] else None)  # fmt: skip
    claimed = {k: v for k, v in groups.items() if not k.endswith("control")}
    plots.paired_scatter(axes[1], claimed, "lambda_max", "test_acc")  # small and large joined by seed
    (twin, color), = [v for k, v in groups.items() if k.endswith("control")]
    axes[1].scatter([r["lambda_max"] for r in twin], [r["test_acc"] for r in twin], color=color, marker="x",
                    label=next(k for k in groups if k.endswith("control")), zorder=3)
    axes[0].axhline(cfg.target_loss, color="k", ls=":", label="target loss")
    axes[0].set(xscale="log", yscale="log", xlabel="step", ylabel="train loss (whole set)",
                title="every run stops at the same loss (one line per seed)")  # fmt: skip
    axes[1].set(xscale="log", xlabel="lambda_max of the Hessian at the stop", ylabel="test accuracy",
                title="one point per seed, joined by seed")  # fmt: skip
    verdict = summarize(cfg, rows)
    names = list(verdict.controls)
    for i, name in enumerate(names):  # the judged statistic, claim and control, in units of its own margin
        record = verdict.controls[name]
        for dx, who, color in ((-0.15, "claim", COLORS["large"]), (0.15, "control", COLORS["twin"])):
            mean, margin = record.get(f"{who}_mean"), record.get(f"{who}_margin")
            if mean is None or not np.isfinite(margin) or margin <= 0:
                continue
            axes[2].errorbar([i + dx], [mean / margin], yerr=[1.0], fmt="o", capsize=4, color=color,
                             label=("large vs small (claim)" if who == "claim" else "twin vs small (control)")
                             if i == 0 else None)  # fmt: skip
    axes[2].axhline(1.0, color="k", ls=":", lw=0.8, label="supported above 1 (mean > margin)")
    axes[2].axhline(0.0, color="k", lw=0.8)
    axes[2].set(xticks=range(len(names)), xticklabels=["log lambda_max\n(large - small)", "log eps-sharpness\n"
                "(large - small)", "test accuracy\n(small - large)"][: len(names)],
                ylabel="mean difference / its 95% margin (± 1 = interval)",
                title=f"judged, paired over {len(cfg.seeds)} seeds; verdict: {verdict.word}")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return {"batch_size.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
