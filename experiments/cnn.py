"""Noise injection in small convolutional networks without normalisation (Figure 5).

Claim (Orvieto et al., AISTATS 2023, Figure 5): beyond the theory, with SGD (batch 1024) on
CIFAR-10, layer-wise noise injection still improves on plain SGD, both in a toy CNN (2 conv layers
with 5 channels, then an MLP) and in a wider fully convolutional net (4 conv layers with 128
channels, one linear layer). (The paper adds that the gain is less marked than for MLPs and that the
wide net's Hessian trace decreases a little with noise; neither is judged here: the first needs the
MLP runs, the second is recorded and plotted.)

Setup (paper preset): CIFAR-10 (``--download`` fetches it), the whole training split but for the
validation points, minibatch SGD with batch 1024, ``lsgeo.models.ToyCNN`` and ``lsgeo.models.WideConvNet``
(width 128), a sigma grid, 3 seeds.
Default (CPU): scikit-learn's 8x8 digits as images (1000 train / 300 validation / 497 test), batch
256, WideConvNet of width 16 (the paper's 128 in the preset), 600 steps, lr 0.05, sigma 0.02 or 0.05
(chosen on validation), SGD and SGD+noise (layer) only (``--methods gd noise layer`` adds the full
noise of the paper's figure, not judged), 3 seeds. Recorded at the clean iterate:
validation and test accuracy and a Hutchinson estimate of the Hessian trace of the training loss
(``lsgeo.curvature.hessian_trace``, on ``trace_examples`` training points, ``trace_probes`` probes).

Verdict, per architecture, on each run's *mean over the last ``judge_last`` of the steps* (default the last half;
``records.judged``), not its last evaluation, so that a spike at one evaluation does not decide (loss spikes in
that window, ``records.spikes``, and the gain at the last step alone are reported in ``summary.json`` and the
printed reason, not decisive): sigma chosen on the validation split; the test-accuracy
gain of SGD+noise (layer) over SGD paired over seeds (``verdicts.paired_gain``: beyond t s.e. plus one
test example, 95% Student-t). Supported when it holds for both architectures, false when one is
contradicted beyond noise after Holm's correction for the two (``verdicts.combine``), null otherwise, and
null when SGD's or the chosen layer-wise run's median train loss over the window is above ``fit_loss``
(under-trained: not a test).
Negative control per architecture (``discrimination.judge``): the same paired test with layer-wise noise replaced
by plain SGD from other initialisations and batch orders (``gd_control``, ``discrimination.control_seeds``), which
must fail. Power: the minimum detectable effect in points against the source's (about) 1 point; above it, a
"supported" is null.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import numpy as np
import optax

from experiments import cli, discrimination, experiment, nets, plots, records, training, verdicts
from lsgeo import curvature, models

ARCHS = ("toy", "wide")
ARCH_NAMES = {"toy": "toy CNN", "wide": "wide conv net"}

CLAIM = (
    "Layer-wise noise injection, at the sigma chosen on validation data, improves the test accuracy of SGD "
    "(batch 1024 in the source) in both a toy CNN and a wider fully convolutional net without normalisation, by "
    "0.3-1 point on CIFAR-10 in the source, beyond what SGD from other initialisations gains (Orvieto et al. 2023, "
    "Section 5, Figure 5)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Figure 5: toy CNN and wide fully convolutional net with SGD, with and without noise.

    The default (3 seeds) cannot detect the source's effect of about 1 point: its rule's minimum detectable effect
    (``discrimination.minimum_detectable_effect``: 80% power, 95% paired t plus one of the 497 test digits) was 3.96
    points for the toy CNN. ``--preset cpu-long`` is the toy CNN's part at a size that can: 16 seeds, one sigma
    (0.02, the one the default run chose on validation for the toy CNN), SGD, layer-wise noise and the SGD control.
    Pilot (``--preset cpu-long --seeds 0 1 2 3 4``, this 2-core CPU at load average ~5): 186 s for 15 runs (12.4 s a
    run), paired differences of the judged statistic spread by 0.92 points (s.e. 0.41 over 5 seeds), MDE 1.69 points.
    At that spread the rule reaches 1 point with 10 seeds; 16 seeds give 0.73 points (0.90 at the 1.14-point spread
    of the default's last-step statistic), in 16 x 3 runs x 12.4 s ~ 10 minutes. ``--preset cpu-long-wide`` is the
    wide net's part: 9 seeds, sigma 0.05 (the default run's validation choice for it). Pilot (``--archs wide
    --methods gd layer --sigmas 0.05 --seeds 0 1``, load average ~6): 499 s for 6 runs, ~53 s a run plus ~60 s of
    compilation per method; the paired spread, pooled over that pilot (1.0 and 0.57 points, 1 degree of freedom
    each) and the default's 3 seeds (0.69 points), is 0.75 points, at which 9 seeds give an MDE of 0.88 points (8:
    0.95), in ~27 minutes (3 x (60 s + 9 x 53 s)); the spread rests on 4 degrees of freedom: at 1.0 points the MDE
    of 9 seeds would be 1.14 (the run then says it cannot detect the effect). Both parts in one run, with the seeds
    the toy CNN needs, would take about 50 minutes here: they are two presets.
    """

    dataset: str = "digits"  # "cifar10" (paper) or any image set of lsgeo.data
    n_train: int | None = None  # training points (None: all but the validation points)
    n_val: int = 300  # validation points (from the training split) on which sigma is chosen
    n_test: int | None = None  # test points (None: all)
    archs: tuple[Literal[ARCHS], ...] = ARCHS  # "toy": ToyCNN (5 channels), "wide": WideConvNet
    toy_channels: int = 5  # channels of the toy CNN
    wide_width: int = 16  # channels of the wide net (paper: 128)
    batch_size: int = 256  # SGD batch (paper: 1024)
    lr: float = 0.05  # SGD step size
    steps: int = 600  # SGD steps
    eval_every: int = 150  # steps between evaluations
    sigmas: tuple[float, ...] = (0.02, 0.05)  # noise levels: the one of each method chosen on validation
    trace_examples: int = 256  # training points for the Hessian trace
    trace_probes: int = 2  # Hutchinson probes
    methods: tuple[Literal[training.METHODS], ...] = ("gd", "layer")  # add "noise" for the paper's full noise
    fit_loss: float = 0.3  # SGD or the chosen layer-wise run's median train loss over the window above this: unfit
    judge_last: float = 0.5  # the verdict uses each run's mean over its evaluations in this last fraction of the steps
    spike_factor: float = 10.0  # a train loss above this times the run's lowest before it is a spike (reported)
    members_per_chunk: int | None = 1  # runs vmapped at once (None: all); on CPU 1, since XLA:CPU runs the
    # grouped convolutions of vmapped kernels slowly
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation, batch order and noise seeds


PRESETS = {
    "paper": Config(
        dataset="cifar10",
        n_val=5000,
        wide_width=128,
        batch_size=1024,
        steps=20_000,
        eval_every=1000,
        sigmas=(0.01, 0.05, 0.1),
        trace_examples=1024,
        trace_probes=32,
        members_per_chunk=None,
        seeds=(0, 1, 2),
    ),
    # each architecture's part at a size whose MDE is at or below the source's 1 point, under 30 minutes on a 2-core
    # CPU (the Config docstring gives the pilots and the numbers)
    "cpu-long": Config(archs=("toy",), sigmas=(0.02,), seeds=tuple(range(16))),
    "cpu-long-wide": Config(archs=("wide",), sigmas=(0.05,), seeds=tuple(range(9))),
}


def cells(cfg: Config) -> list[dict]:
    for a in cfg.archs:
        if a not in ARCHS:
            raise ValueError(f"archs must be among {ARCHS}, got {a!r}")
    out = [c for a in cfg.archs for c in training.method_cells(cfg.methods, cfg.sigmas, cfg.seeds, arch=a)]
    if "gd" in cfg.methods:  # the negative control: plain SGD from other initialisations, paired with seed k
        out += [dict(arch=a, method=CONTROL, sigma=0.0, seed=k) for a in cfg.archs
                for k in discrimination.control_seeds(cfg.seeds)]  # fmt: skip
    return out


CONTROL = "gd_control"  # plain SGD from other initialisations (and batch orders), in place of layer-wise noise


def prepare(cfg: Config) -> nets.Splits:
    return nets.splits(cfg.dataset, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, flatten=False)


def _model(cfg: Config, arch: str, num_classes: int):
    if arch == "toy":
        return models.ToyCNN(num_classes=num_classes, channels=cfg.toy_channels)
    return models.WideConvNet(num_classes=num_classes, width=cfg.wide_width)


def run(cfg: Config, data: nets.Splits, group: list[dict]) -> list[list[dict]]:
    model = _model(cfg, group[0]["arch"], data.num_classes)
    objective, evaluate = nets.Objective(model), nets.Evaluate(model)

    def eval_fn(params, eval_data):
        trace = curvature.hessian_trace(
            objective, params, eval_data["train"], jax.random.key(0), num_probes=cfg.trace_probes
        )
        return {**evaluate(params, eval_data), "hessian_trace": trace}

    trace_batch = jax.tree_util.tree_map(lambda a: a[: cfg.trace_examples], data.train)
    group = [dict(c, method="gd") if c["method"] == CONTROL else c for c in group]
    return training.train_cells(
        objective, nets.init_fn(model, data.train[0]), data.train, group, inner=optax.sgd(cfg.lr),
        num_steps=cfg.steps, eval_every=cfg.eval_every, batch_size=cfg.batch_size, eval_fn=eval_fn,
        eval_data={"val": data.val, "test": data.test, "train": trace_batch}, members_per_chunk=cfg.members_per_chunk,
    )  # fmt: skip


def comparisons(cfg: Config, rows: list[dict]) -> dict[str, tuple[float, verdicts.Gain]]:
    """{arch: (validation-best sigma, paired test-accuracy gain of SGD+noise (layer) over SGD)}."""
    if not {"gd", "layer"} <= set(cfg.methods):
        return {}
    return {a: training.compare_to_gd(rows, "layer", cfg.sigmas, cfg.seeds, cfg.steps, cfg.judge_last, arch=a)
            for a in cfg.archs}  # fmt: skip


SOURCE_POINTS = 1.0  # the paper's gains of layer-wise noise over SGD are 0.3-1 point (Figure 5): the largest
SOURCE = "Orvieto et al. 2023, Figure 5: layer-wise gains over SGD of at most about 1 point"


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    table = [
        t
        for a in cfg.archs
        for t in training.method_table(
            rows,
            cfg.methods,
            cfg.sigmas,
            cfg.seeds,
            cfg.steps,
            minibatch=True,
            keys=("test_acc", "val_acc", "hessian_trace", "train_loss"),
            last=cfg.judge_last,
            arch=a,
        )
    ]
    grid = [(a, m, s) for a in cfg.archs for m, s in training.method_grid(cfg.methods, cfg.sigmas)]
    figures = {
        f"{k}_{a}_{m}_sigma={s:g}": t[k] for (a, m, s), t in zip(grid, table) for k in ("test_acc", "hessian_trace")
    }
    gains, reasons = comparisons(cfg, rows), []
    for a, (best, gain) in gains.items():
        figures.update(
            {
                f"{a}_layer_best_sigma": best,
                f"{a}_layer_gain": gain.mean,
                f"{a}_layer_gain_se": gain.se,
                f"{a}_layer_gain_margin": gain.margin,
            }
        )
        reasons.append(
            gain.describe(
                f"{ARCH_NAMES[a]}: SGD+noise (layer) at sigma {best:g} (validation) minus SGD, test accuracy (mean "
                "over the judged window)",
                scale=100,
                unit=" points",
            )
        )
    controls, description = control_gains(cfg, rows), "plain SGD from other initialisations in place of layer-wise noise"
    for a, g in controls.items():
        figures[f"{a}_control_gain"], figures[f"{a}_control_gain_se"] = g.mean, g.se
        reasons.append(g.describe(f"{ARCH_NAMES[a]} control, {description}, minus SGD", scale=100, unit=" points"))
    parts = {a: discrimination.Part(g, controls.get(a), description if a in controls else "not run: cannot tell")
             for a, (_, g) in gains.items()}  # fmt: skip
    judgement = discrimination.judge(parts) if gains else None
    supported = judgement.supported if gains else None
    if gains:
        if len(controls) < len(gains) and supported is True:
            supported = None
        reasons.append(judgement.reason)
        fit = training.unfit(rows, {
            f"{ARCH_NAMES[a]} {name}": dict(arch=a, **fields)
            for a, (best, _) in gains.items()
            for name, fields in (("SGD", dict(method="gd")), ("layer-wise", dict(method="layer", sigma=best)))
        }, cfg.seeds, cfg.steps, cfg.fit_loss, cfg.judge_last)  # fmt: skip
        reasons += [last_step_clause(cfg, rows, a, best, figures) for a, (best, _) in gains.items()]
        if fit:
            supported, reasons = None, [fit, *reasons]
    powers = {f"{a}_layer_gain": discrimination.Power(100 * discrimination.minimum_detectable_effect(g), SOURCE_POINTS,
                                                      " points", SOURCE) for a, (_, g) in gains.items()}  # fmt: skip
    supported, power_clause = discrimination.with_power(supported, powers)
    figures.update({f"mde_{name}_points": p.mde for name, p in powers.items()})
    runs = [dict(arch=c["arch"], method=c["method"], sigma=c["sigma"], seed=c["seed"]) for c in cells(cfg)]
    found = records.spikes(rows, runs, cfg.steps, cfg.judge_last, cfg.spike_factor)
    figures["loss_spikes"] = len(found)
    window = (f"judged on each run's mean over the last {100 * cfg.judge_last:g}% of the steps (evaluations at steps "
              f">= {cfg.steps * (1 - cfg.judge_last):g})")  # fmt: skip
    reasons = [window, records.spike_clause(found, cfg.spike_factor), *reasons]
    return experiment.Verdict(supported, figures, table, "; ".join([*reasons, power_clause]),
                              judgement.controls if judgement else {},
                              power={k: p.record() for k, p in powers.items()})  # fmt: skip


def last_step_clause(cfg: Config, rows: list[dict], arch: str, sigma: float, figures: dict) -> str:
    """The layer-wise gain of ``arch`` at ``sigma`` from the last evaluation alone, stored (``ARCH_gain_last_step``)
    and said, not judged: where it differs from the window's verdict, the last step was not representative."""
    gain = verdicts.paired_gain(
        records.per_seed(rows, "test_acc", cfg.seeds, arch=arch, method="layer", sigma=sigma, step=cfg.steps),
        records.per_seed(rows, "test_acc", cfg.seeds, arch=arch, method="gd", step=cfg.steps),
        resolution=records.resolution(rows),
    )
    figures.update({f"{arch}_layer_gain_last_step": gain.mean, f"{arch}_layer_gain_last_step_se": gain.se})
    return gain.describe(f"(reported, not judged) {ARCH_NAMES[arch]} at the last step alone, layer-wise at sigma "
                         f"{sigma:g} minus SGD", scale=100, unit=" points")  # fmt: skip


def control_gains(cfg: Config, rows: list[dict]) -> dict[str, verdicts.Gain]:
    """{arch: the control's paired test-accuracy "gain", SGD from other initialisations minus SGD, each run's mean
    over the judged window} (where run)."""
    out = {}
    for a in cfg.archs:
        if records.select(rows, arch=a, method=CONTROL):
            treated = records.judged(rows, "test_acc", discrimination.control_seeds(cfg.seeds), cfg.steps,
                                     cfg.judge_last, arch=a, method=CONTROL)  # fmt: skip
            reference = records.judged(rows, "test_acc", cfg.seeds, cfg.steps, cfg.judge_last, arch=a, method="gd")
            out[a] = verdicts.paired_gain(treated, reference, resolution=records.resolution(rows))
    return out


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    fig, axes = plt.subplots(4, len(cfg.archs), figsize=(6 * len(cfg.archs), 16), squeeze=False)
    gains, controls = comparisons(cfg, rows), control_gains(cfg, rows)
    for col, a in enumerate(cfg.archs):
        size = f", width {cfg.wide_width} (paper: 128)" if a == "wide" else f", {cfg.toy_channels} channels"
        arch = ARCH_NAMES[a] + size
        ax = axes[0, col]  # final test accuracy per sigma, on an axis that resolves the differences
        for i, m in enumerate(cfg.methods):
            sigmas = (0.0,) if m == "gd" else cfg.sigmas
            ms = np.array([verdicts.mean_se(records.judged(rows, "test_acc", cfg.seeds, cfg.steps, cfg.judge_last,
                                                        arch=a, method=m, sigma=s)) for s in sigmas])  # fmt: skip
            if m == "gd":
                ax.axhline(100 * ms[0, 0], color=training.COLORS[m], label="SGD (± s.e.)")
                low, high = 100 * (ms[0, 0] - ms[0, 1]), 100 * (ms[0, 0] + ms[0, 1])
                ax.axhspan(low, high, color=training.COLORS[m], alpha=0.15)
                continue
            dodge = 1.0 + 0.05 * (i - 1)
            ax.errorbar(np.array(cfg.sigmas) * dodge, 100 * ms[:, 0], yerr=100 * ms[:, 1], marker="o", capsize=3,
                        color=training.COLORS[m], label=training.label(m, minibatch=True) + " (± s.e.)")  # fmt: skip
        if a in gains:
            best, gain = gains[a]
            ax.axvline(best, color=training.COLORS["layer"], ls=":", lw=1,
                       label=f"layer-wise sigma chosen on validation ({best:g}); gain {100 * gain.mean:+.2g} "
                             f"± {100 * gain.se:.2g} points")  # fmt: skip
        plots.sigma_axis(ax, cfg.sigmas)
        ax.set_xlim(min(cfg.sigmas) / 1.3, max(cfg.sigmas) * 1.3)  # the end points' error bars off the frame
        ax.set(ylabel=f"test accuracy (%), mean over steps >= {cfg.steps * (1 - cfg.judge_last):g}",
               title=f"{arch} ({cfg.dataset}), {len(cfg.seeds)} seeds")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.4 * (high - low))  # headroom: the legend above the error bars, not on them
        ax.legend(fontsize=7, loc="upper center")
        series = {}
        for m, s in training.method_grid(cfg.methods, cfg.sigmas):
            if m != "gd" and a in gains and s != gains[a][0]:
                continue  # the curves at the chosen sigma only
            name = training.label(m, minibatch=True) + ("" if m == "gd" else f", sigma={s:g}")
            series[name] = (dict(arch=a, method=m, sigma=s), training.COLORS[m])
        keys = (("train_loss", "training loss (under-training check)"),
                ("hessian_trace",
                 f"Hessian trace (Hutchinson, {cfg.trace_probes} probes, {cfg.trace_examples} points)"))
        if "gd" in cfg.methods:
            series["SGD, other inits (control)"] = (dict(arch=a, method=CONTROL), "tab:gray")
        for row, (key, name) in enumerate(keys, start=1):
            plots.plot_band_curves(axes[row, col], rows, key, series, alpha=0.85)
            axes[row, col].set(ylabel=name, xlabel="SGD step", yscale="log" if key == "train_loss" else "linear")
            axes[row, col].legend(fontsize=7)
        axes[1, col].axhline(cfg.fit_loss, color="gray", ls=":", lw=1)
        axes[1, col].axvspan(cfg.steps * (1 - cfg.judge_last), cfg.steps, color="gold", alpha=0.12,
                             label="judged window (accuracy: mean; fit check: median)")  # fmt: skip
        axes[1, col].legend(fontsize=7)
        if a in gains:  # the judged statistic with its interval, beside the control's, and the power
            shown = {"layer-wise minus SGD": gains[a][1]}
            if a in controls:
                shown["SGD' minus SGD"] = controls[a]
            mde = {"layer-wise minus SGD": discrimination.minimum_detectable_effect(gains[a][1])}
            plots.gain_panel(axes[3, col], shown, controls=["SGD' minus SGD"], scale=100, unit="points", mde=mde)
            axes[3, col].axhline(SOURCE_POINTS, color="tab:green", ls="--", lw=1, label=f"the source's effect "
                                 f"(about {SOURCE_POINTS:g} point)")  # fmt: skip
            axes[3, col].set_title("judged: test-accuracy gain at the chosen sigma; control: SGD' (other inits)",
                                   fontsize=9)  # fmt: skip
            axes[3, col].legend(fontsize=7)
    fig.tight_layout()
    return {"cnn.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("sigma", "seed"))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
