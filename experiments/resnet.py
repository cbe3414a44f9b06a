"""Noise injection in a ResNet with BatchNorm (Orvieto et al., AISTATS 2023, Figure 6).

Claim: on CIFAR-10 with a strong SGD baseline, layer-wise noise is a consistent regulariser that
improves the test accuracy (about +0.3%), while noise on all parameters hurts for sigma > 0.1 (the
paper adds that it helps only at very small sigma, with a jump of the Hessian trace; recorded, not
judged).

Setup (paper preset): ``lsgeo.models.ResNet18`` (width 64, BatchNorm) on CIFAR-10 (``--download``
fetches it), the standard augmentation (random crop with 4-pixel padding and horizontal flip,
``lsgeo.train.augment.random_crop_flip``), SGD with batch 128, lr 0.01 with cosine annealing
(``optax.cosine_decay_schedule``) over 150 epochs, noise switched off after epoch 135 (a sigma
schedule), a sigma grid, 3 seeds; final test accuracy and Hessian trace. The paper does not state
momentum or weight decay; the preset uses the usual CIFAR values (momentum 0.9, weight decay 5e-4 on
the clean weights). It needs a GPU (33 ResNet-18 runs of 150 epochs: days on one GPU; run subsets via
--sigmas/--seeds).

Default: a smoke configuration that exercises BatchNorm, full and layer-wise noise with a noise
schedule, and the Hessian trace on a 2-core CPU in about a minute: 256 of scikit-learn's 8x8 digits
as 8x8x1 images (and 128 validation points), a ResNet-10 (one BasicBlock per stage; ResNet-18 has
two) of width 4, 6 epochs of batch 64, noise off after epoch 5, sigmas 0.05 and 0.2 (above 0.1: both parts
of the claim are tested), three seeds, no augmentation
(``augment_padding=0``; 4 pixels would be half of a digit). Its cost is XLA compilation, so on a
CPU-only machine the CLI compiles at XLA backend optimisation level 0 (``cli.fast_cpu_compile``),
the SGD runs share the compiled program of full noise (as its sigma = 0 members,
``training.train_methods``), all methods are trained in one ``run`` call, and the runs of a sweep go
one at a time (``members_per_chunk=1``: XLA:CPU runs the grouped convolutions of vmapped kernels
slowly). It is far too small to reproduce the claim's +0.3 points: with 3 seeds (t = 4.30) a verdict needs a
gain of several points, so it tests the pipeline and is usually null.

The Hessian trace is a Hutchinson estimate (``lsgeo.curvature.hessian_trace``) of the training loss in
evaluation mode (BatchNorm running averages), on ``trace_examples`` training points, at the end.
Verdict (paired over seeds, ``verdicts.paired_gain``, sigma of layer-wise noise chosen on validation):
part 1, SGD+noise (layer) beats SGD beyond t s.e. plus one test example (95% Student-t for the number of
seeds); part 2, full noise at every sigma > 0.1 of the grid is below SGD beyond that margin (not tested
without such a sigma). Supported when all hold, false when one is contradicted after Holm's correction
for the number of parts (``verdicts.combine``), null otherwise. Negative control of every part
(``discrimination.judge``): the same paired test with the noisy run replaced by plain SGD from other
initialisations and batch orders (``gd_control``, seeds ``discrimination.control_seeds``): "SGD' beats SGD" for
part 1, "SGD' is below SGD" for part 2; each must fail (a rule that passes it reads seed-to-seed variation as an
effect), else the verdict is null ("does not discriminate"). Power: the minimum detectable effect of part 1 in
points against the source's +0.3; above it, a "supported" is null.
"""

from __future__ import annotations

import dataclasses
from typing import Literal
import functools

import jax
import numpy as np
import optax

from experiments import cli, discrimination, experiment, nets, plots, records, training, verdicts
from lsgeo import curvature, models
from lsgeo.train.augment import random_crop_flip

CLAIM = (
    "In ResNet-18 with BatchNorm on CIFAR-10, layer-wise noise injection is a consistent regulariser that "
    "improves the test accuracy of SGD (about +0.3%), while full noise hurts for sigma > 0.1 (Figure 6)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Figure 6: ResNet + BatchNorm, SGD with cosine annealing, noise off for the last epochs.

    No ``cpu-long`` preset: no size that a 2-core CPU runs in 30 minutes can detect the source's +0.3 points. The
    default run's paired layer-wise-minus-SGD differences spread by 2.1 points (s.e. 1.2 over 3 seeds); at that
    spread the verdict rule's minimum detectable effect (``discrimination.minimum_detectable_effect``, 80% power,
    95% paired t plus one of the 497 test digits) is 6.9 points with 3 seeds and reaches 0.3 only at 384 seeds:
    384 x 3 runs (SGD, layer-wise at one sigma, the SGD control) at the default's ~3 s a run (46 s for its 15 runs
    before the control was added, 18 now) is ~58 minutes, at a size whose SGD baseline (75.5%) is far from the
    strong one the claim is about. A larger ResNet fits better but costs far more per run (the wide conv net of
    ``cnn``, width 16: 0.19 s a step on this CPU), and the 497 test digits bound how small the spread can get: two
    nets that disagree on 3% of them give a paired spread of ~0.8 points (sqrt(0.03 / 497)), which needs 59 seeds
    for an MDE of 0.3 points.
    """

    dataset: str = "digits"  # "cifar10" (paper) or any image set of lsgeo.data
    n_train: int | None = 256  # training points (None: all but the validation points)
    n_val: int = 128  # validation points (from the training split) on which sigma is chosen
    n_test: int | None = None  # test points (None: all)
    width: int = 4  # base width (paper: 64)
    stage_sizes: tuple[int, ...] = (1, 1, 1, 1)  # BasicBlocks per stage (ResNet-18, the paper: 2, 2, 2, 2)
    augment_padding: int = 0  # random crop (this padding) + flip of every training batch; 0: none (paper: 4)
    batch_size: int = 64  # SGD batch (paper: 128)
    lr: float = 0.05  # peak step size of the cosine schedule (paper: 0.01)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # on the clean weights
    epochs: int = 6  # training epochs (paper: 150)
    noise_off_epoch: int = 5  # noise is switched off from this epoch on (paper: 135)
    evals: int = 2  # evaluations after the start (the last one at the end)
    sigmas: tuple[float, ...] = (0.05, 0.2)  # noise levels (0.2 > 0.1: the "full noise hurts" part)
    trace_examples: int = 128  # training points for the Hessian trace
    trace_probes: int = 2  # Hutchinson probes
    fit_loss: float = 0.3  # SGD or the chosen layer-wise run ending above this train loss: under-trained (null)
    methods: tuple[Literal[training.METHODS], ...] = training.METHODS
    members_per_chunk: int | None = 1  # runs vmapped at once (None: all); on CPU 1, since XLA:CPU runs the
    # grouped convolutions of vmapped kernels slowly
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation, batch order and noise seeds


PRESETS = {
    "paper": Config(
        dataset="cifar10",
        n_train=None,
        n_val=5000,
        width=64,
        stage_sizes=(2, 2, 2, 2),
        augment_padding=4,
        batch_size=128,
        lr=0.01,
        epochs=150,
        noise_off_epoch=135,
        evals=15,
        members_per_chunk=None,
        sigmas=(0.01, 0.025, 0.05, 0.1, 0.2),
        trace_examples=1000,
        trace_probes=32,
        seeds=(0, 1, 2),
    )
}


def validate(cfg: Config) -> None:
    """Checks beyond the runner's field conventions (``config_checks.check_config``), before a run folder exists."""
    if cfg.n_train is not None and cfg.batch_size <= cfg.n_train:  # else checked on the data (prepare)
        steps = cfg.epochs * (cfg.n_train // cfg.batch_size)
        if steps % cfg.evals:
            raise ValueError(
                f"--evals {cfg.evals} must divide the {steps} training steps (--epochs {cfg.epochs} x "
                f"--n-train {cfg.n_train} // --batch-size {cfg.batch_size})"
            )


def cells(cfg: Config) -> list[dict]:
    out = training.method_cells(cfg.methods, cfg.sigmas, cfg.seeds)
    if "gd" in cfg.methods:  # the negative control: plain SGD from other initialisations, paired with seed k
        out += [dict(method=CONTROL, sigma=0.0, seed=k) for k in discrimination.control_seeds(cfg.seeds)]
    return out


CONTROL = "gd_control"  # plain SGD from other initialisations (and batch orders), in place of the noisy run
CONTROL_DESCRIPTION = "plain SGD from other initialisations in place of the noisy run"


def prepare(cfg: Config):
    data = nets.splits(cfg.dataset, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, flatten=False)
    steps_per_epoch = len(data.train[1]) // cfg.batch_size
    if cfg.epochs * steps_per_epoch % cfg.evals:
        raise ValueError(f"evals={cfg.evals} must divide the {cfg.epochs * steps_per_epoch} training steps")
    return data, steps_per_epoch


def title(cfg: Config) -> str:
    """ "ResNet-18 (2-2-2-2 blocks, width 64)": the depth of the configured network, not the paper's."""
    blocks = "-".join(map(str, cfg.stage_sizes))
    return f"ResNet-{models.resnet_depth(cfg.stage_sizes)} ({blocks} blocks, width {cfg.width})"


def run(cfg: Config, prep, group: list[dict]) -> list[list[dict]]:
    data, steps_per_epoch = prep
    steps = cfg.epochs * steps_per_epoch
    model = models.ResNet18(num_classes=data.num_classes, width=cfg.width, stage_sizes=cfg.stage_sizes)
    objective = nets.Objective(model)

    @jax.jit
    def hessian_trace(params, model_state, batch):
        return curvature.hessian_trace(
            objective, params, (*batch, model_state), jax.random.key(0), num_probes=cfg.trace_probes
        )

    inner = optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(optax.cosine_decay_schedule(cfg.lr, steps), momentum=cfg.momentum),
    )
    trace_batch = jax.tree_util.tree_map(lambda a: a[: cfg.trace_examples], data.train)
    augment = functools.partial(random_crop_flip, padding=cfg.augment_padding) if cfg.augment_padding else None
    group = [dict(c, method="gd") if c["method"] == CONTROL else c for c in group]  # the control is plain SGD
    return training.train_methods(
        nets.TrainObjective(model), nets.init_fn(model, data.train[0]), data.train, group, inner=inner,
        num_steps=steps, eval_every=steps // cfg.evals, batch_size=cfg.batch_size, eval_fn=nets.Evaluate(model),
        eval_data={"val": data.val, "test": data.test}, model_state=nets.state_init_fn(model, data.train[0]),
        noise_until=cfg.noise_off_epoch * steps_per_epoch, members_per_chunk=cfg.members_per_chunk, augment=augment,
        final_fn=lambda params, model_state: {"hessian_trace": hessian_trace(params, model_state, trace_batch)},
    )  # fmt: skip


def judge(cfg: Config, rows: list[dict], last: int) -> tuple[dict, dict, list[str], dict]:
    """(parts, figures, reasons, controls) of the two parts of the claim; ``controls``: {part: the same paired test
    with the noisy run replaced by SGD from other initialisations} where the control was run."""
    parts, figures, reasons, controls = {}, {}, [], {}
    sgd = records.per_seed(rows, "test_acc", cfg.seeds, method="gd", step=last) if "gd" in cfg.methods else None
    other = None
    if sgd is not None and records.select(rows, method=CONTROL):
        other = records.per_seed(rows, "test_acc", discrimination.control_seeds(cfg.seeds), method=CONTROL, step=last)
    if {"gd", "layer"} <= set(cfg.methods):
        best, gain = training.compare_to_gd(rows, "layer", cfg.sigmas, cfg.seeds, last)
        parts["layer_improves"] = gain
        figures.update(
            layer_best_sigma=best, layer_gain=gain.mean, layer_gain_se=gain.se, layer_gain_margin=gain.margin
        )
        reasons.append(
            gain.describe(
                f"SGD+noise (layer) at sigma {best:g} (validation) minus SGD, test accuracy", scale=100, unit=" points"
            )
        )
        if other is not None:
            controls["layer_improves"] = verdicts.paired_gain(other, sgd, resolution=records.resolution(rows))
            figures.update(control_gain=controls["layer_improves"].mean, control_gain_se=controls["layer_improves"].se)
            reasons.append(controls["layer_improves"].describe(f"control, {CONTROL_DESCRIPTION}: SGD' minus SGD",
                                                               scale=100, unit=" points"))  # fmt: skip
    large = [s for s in cfg.sigmas if s > 0.1]
    if {"gd", "noise"} <= set(cfg.methods) and large:
        for s in large:
            treated = records.per_seed(rows, "test_acc", cfg.seeds, method="noise", sigma=s, step=last)
            hurt = verdicts.paired_gain(sgd, treated, resolution=records.resolution(rows))  # > 0: noise hurts
            parts[f"full_noise_hurts_sigma={s:g}"] = hurt
            figures[f"noise_gain_sigma={s:g}"] = -hurt.mean
            reasons.append(hurt.describe(f"SGD minus SGD+noise at sigma {s:g}", scale=100, unit=" points"))
            if other is not None:  # the same control, in the direction of this part: SGD minus SGD'
                controls[f"full_noise_hurts_sigma={s:g}"] = verdicts.paired_gain(
                    sgd, other, resolution=records.resolution(rows))
    else:
        reasons.append("full noise above sigma 0.1 not tested (no such sigma in the grid)")
        parts["full_noise_hurts_above_0.1"] = None
    if len(cfg.seeds) < verdicts.MIN_SEEDS:
        reasons.insert(0, f"{len(cfg.seeds)} seed(s): a paired test needs {verdicts.MIN_SEEDS} or more, so null")
    if "layer_best_sigma" in figures:
        fit = training.unfit(rows, {"SGD": dict(method="gd"), "layer-wise at the chosen sigma": dict(
            method="layer", sigma=figures["layer_best_sigma"])}, cfg.seeds, last, cfg.fit_loss)  # fmt: skip
        if fit:
            parts["fitted"] = None  # the run cannot test the claim: the verdict is null at best
            reasons.insert(0, fit)
    return parts, figures, reasons, controls


SOURCE_POINTS = 0.3  # the paper's layer-wise gain over SGD (Figure 6: +0.3 points over 94.4%)
SOURCE = "Orvieto et al. 2023, Figure 6: layer-wise +0.3 points over a 94.4% SGD baseline"


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    last = max(r["step"] for r in rows)
    table = training.method_table(
        rows,
        cfg.methods,
        cfg.sigmas,
        cfg.seeds,
        last,
        minibatch=True,
        keys=("test_acc", "val_acc", "hessian_trace", "train_loss"),
    )
    grid = training.method_grid(cfg.methods, cfg.sigmas)
    figures = {f"{k}_{m}_sigma={s:g}": t[k] for (m, s), t in zip(grid, table) for k in ("test_acc", "hessian_trace")}
    parts, judged, reasons, controls = judge(cfg, rows, last)
    figures.update(judged)
    claims = {
        name: discrimination.Part(claim, controls.get(name), CONTROL_DESCRIPTION if name in controls else
                                  "not run: cannot tell")
        for name, claim in parts.items() if name != "fitted"
    }  # fmt: skip
    judgement = discrimination.judge(claims)
    reasons.append(judgement.reason)
    supported = judgement.supported
    if supported is True and any(isinstance(c, verdicts.Gain) and n not in controls for n, c in parts.items()):
        supported = None  # a part without its control cannot tell whether the rule discriminates
    supported = None if "fitted" in parts else supported  # under-trained: no test, either way
    powers = {}
    if isinstance(parts.get("layer_improves"), verdicts.Gain):
        mde = 100 * discrimination.minimum_detectable_effect(parts["layer_improves"])
        powers["layer_improves"] = discrimination.Power(mde, SOURCE_POINTS, " points", SOURCE)
        figures["mde_layer_gain_points"] = mde
    supported, power_clause = discrimination.with_power(supported, powers)
    return experiment.Verdict(supported, figures, table, "; ".join([*reasons, power_clause] if powers else reasons),
                              judgement.controls, power={k: p.record() for k, p in powers.items()})  # fmt: skip


def plot(cfg: Config, rows: list[dict]) -> dict:
    """Test accuracy (percent), the Hessian trace and the training loss at the end per sigma (mean ± s.e. over
    seeds; the control and SGD as bands), and the judged statistic: the paired gains with their 95% margins, the
    control's beside them, the minimum detectable effect and the source's effect."""
    plt = plots.plt
    last = max(r["step"] for r in rows)
    keys = {"test_acc": "final test accuracy (%)", "hessian_trace": "Hessian trace at the end (eval mode)",
            "train_loss": "final training loss (under-training check)"}  # fmt: skip
    scales = {"test_acc": 100.0, "hessian_trace": 1.0, "train_loss": 1.0}
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    bars = len(cfg.seeds) > 1
    ends = [min(cfg.sigmas) / 1.2, max(cfg.sigmas) * 1.2]  # a segment, so autoscaling keeps it in view
    for m in cfg.methods:
        name = training.label(m, minibatch=True) + (" (mean ± s.e.)" if bars else " (1 seed)")
        for ax, k in zip(axes, keys):
            values = scales[k] * np.array([
                verdicts.mean_se(records.per_seed(rows, k, cfg.seeds, method=m, sigma=s, step=last))
                for s in ((0.0,) if m == "gd" else cfg.sigmas)
            ])  # fmt: skip
            if m == "gd":
                (mean, se), = values
                ax.plot(ends, [mean, mean], color=training.COLORS[m], label=name)
                if bars:
                    ax.fill_between(ends, mean - se, mean + se, color=training.COLORS[m], alpha=0.15)
                continue
            ax.errorbar(cfg.sigmas, values[:, 0], yerr=values[:, 1] if bars else None, marker="o", capsize=3,
                        color=training.COLORS[m], label=name)  # fmt: skip
    if records.select(rows, method=CONTROL):  # the negative control: SGD from other initialisations
        for ax, k in zip(axes, keys):
            mean, se = scales[k] * np.array(verdicts.mean_se(
                records.per_seed(rows, k, discrimination.control_seeds(cfg.seeds), method=CONTROL, step=last)))
            ax.plot(ends, [mean, mean], color="tab:gray", ls="--",
                    label="SGD, other inits (control)" + (" (mean ± s.e.)" if bars else ""))  # fmt: skip
            if bars:
                ax.fill_between(ends, mean - se, mean + se, color="tab:gray", alpha=0.12)
    for ax, k in zip(axes, keys):
        plots.sigma_axis(ax, cfg.sigmas)
        ax.set(ylabel=keys[k])
    axes[0].set_title(f"{title(cfg)}, {cfg.dataset}, {len(cfg.seeds)} seed(s)", fontsize=10)
    axes[2].axhline(cfg.fit_loss, color="gray", ls=":", lw=1, label=f"fit_loss {cfg.fit_loss:g} (above: under-trained)")
    axes[2].set_yscale("log")
    for ax in axes[:3]:
        ax.legend(fontsize=8)
    parts, _, _, controls = judge(cfg, rows, last)
    shown = {name: gain for name, gain in parts.items() if isinstance(gain, verdicts.Gain)}
    if "layer_improves" in controls:
        shown["SGD' minus SGD"] = controls["layer_improves"]
    if shown:  # the judged statistic with its interval, beside the control's, and the power
        mde = {n: discrimination.minimum_detectable_effect(g) for n, g in shown.items() if n == "layer_improves"}
        plots.gain_panel(axes[3], shown, controls=["SGD' minus SGD"], scale=100, unit="points", mde=mde)
        axes[3].axhline(SOURCE_POINTS, color="tab:green", ls="--", lw=1,
                        label=f"the source's layer-wise gain ({SOURCE_POINTS:g} points)")
        axes[3].set_title("judged: paired test-accuracy gains (full_noise_hurts: SGD minus SGD+noise)", fontsize=9)
        axes[3].legend(fontsize=8)
    fig.tight_layout()
    return {"resnet.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("method", "sigma", "seed"))

if __name__ == "__main__":
    cli.fast_cpu_compile()
    cli.main(EXPERIMENT)
