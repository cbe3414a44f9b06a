"""The Hessian spectrum during training, and full-batch GD at the edge of stability.

Claim (seed 000, stability lr < 2 / lambda_max; Cohen et al. 2021, "edge of stability"): under
full-batch gradient descent with step lr the sharpness lambda_max of the training-loss Hessian is
driven to the stability edge 2 / lr and hovers there while the loss keeps decreasing; GD does not
train with lambda_max far above 2 / lr. Here every lr starts above its edge (lambda_max at
initialisation > 2 / lr), so the sharpness must fall to the edge (self-stabilisation; progressive
sharpening towards the edge from below takes far longer than a CPU budget at this size). Alongside,
(seed 001) the spectral density, the top eigenvalues and the saddle index (the fraction of negative
eigenvalues) are reported at initialisation, mid-training and the end (not judged).

Negative control (``control_lr``, run beside the claimed lrs): GD at a learning rate whose edge 2/lr lies far above
the sharpness at initialisation; the same test must fail there (lambda_max stays well below its edge), else the
test would pass whatever GD did (e.g. a tracker that returned 2/lr). The verdict requires it to fail
(``discrimination.judge``).

Verdict: GD is deterministic given its initialisation, so the claim is checked on each of ``seeds``
(3 initialisations; null with fewer): supported when, for every lr and every initialisation, the median
of lambda_max / (2/lr) over the last half of training lies in [edge_low, edge_high] and the training loss
at the end is below its value at the half (the loss keeps falling); false otherwise. A run has no sampling
noise, so one initialisation outside the band is a counterexample, and "every initialisation" is stricter than
a t-interval of the mean over them. The paired statistics over seeds are reported alongside (figures, not the
verdict): per lr, the mean of the per-seed medians with its 95% Student-t interval (``verdicts.t_critical``).

Setup: a two-hidden-layer ReLU MLP (``lsgeo.models.MLP``, 1482 parameters) on a subset of
scikit-learn digits (pixels in [0, 1], not standardised), squared loss on one-hot targets (the MSE
setting of Cohen et al.), full-batch GD (``optax.sgd``).
- Spectrum: one run at ``spectrum_lr`` (``lsgeo.train.train``, resumed at the midpoint) gives the
  parameters at initialisation, mid-training and the end; at each, the SLQ spectral density
  (``lsgeo.curvature.spectral_density``), the top-k eigenvalues (``top_eigenvalues``) and the exact
  saddle index (``saddle_index``, dense Hessian, eigenvalues below -saddle_tol max|lambda| count as negative).
- Edge of stability: GD at every lr in ``lrs`` and every initialisation in ``seeds`` (``lsgeo.train.sweep``;
  the learning rate is the swept hyperparameter (``{"lr": lrs}``), one compilation for all of them),
  with lambda_max recorded along the whole run, every ``eval_every`` steps, by the curvature tracker inside the
  vmapped sweep (``measure=lsgeo.train.top_eigenvalue_tracker(objective, ...)``: Lanczos warm-started from the
  previous measurement's Ritz vector, stopped at a relative residual of ``lanczos_tol``, at most
  ``lanczos_iters`` products; the products per measurement are recorded) and compared to 2 / lr.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli, discrimination, experiment, nets, plots, records, verdicts
from lsgeo import curvature, models, train
from lsgeo.data import load_dataset

DIGITS_TRAIN = 1300  # scikit-learn digits: 1797 images, 497 held out for the test split

PHASES = ("init", "mid", "end")

CLAIM = (
    "Under full-batch GD started above its stability edge, the sharpness lambda_max of the training loss is driven "
    "to 2/lr (median over the last half of training within [0.8, 1.25] x 2/lr in every run) and hovers there while "
    "the loss keeps falling (Cohen et al. 2021, Sections 3-4; seed 000)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Digits, a small ReLU MLP, full-batch GD; the defaults run in a few minutes on a CPU."""

    seeds: tuple[int, ...] = (0, 1, 2)  # initialisations: the verdict must hold for each
    n_train: int = 256
    widths: tuple[int, ...] = (16, 16)  # m = 1482 parameters: the dense Hessian is cheap
    activation: Literal[tuple(models.ACTIVATIONS)] = "relu"
    lrs: tuple[float, ...] = (0.25, 0.3, 0.4)  # 2 / lr = 8, 6.7, 5, all below lambda_max at initialisation (~10)
    steps: int = 1500
    eval_every: int = 50
    spectrum_lr: float = 0.3
    lanczos_iters: int = 20  # at most, per lambda_max measurement along training (warm-started tracker)
    lanczos_tol: float = 1e-3  # relative Ritz residual at which a measurement stops (lambda_max within 0.1%)
    top_k: int = 10
    slq_iters: int = 80
    slq_runs: int = 4
    density_points: int = 200
    saddle_tol: float = 1e-4  # eigenvalues below -saddle_tol * max|lambda| count as negative
    edge_low: float = 0.8  # supported if lambda_max / (2 / lr) over the last half lies in [edge_low, edge_high]
    edge_high: float = 1.25
    control_lr: float | None = 0.05  # negative control: 2 / lr = 40, far above lambda_max at init; must not be at the edge


PRESETS = {
    "paper": Config(
        seeds=(0, 1, 2),
        n_train=1300,
        widths=(32, 32),
        lrs=(0.05, 0.1, 0.15, 0.2, 0.3),
        steps=10_000,
        spectrum_lr=0.1,
        slq_iters=120,
        slq_runs=8,
    )
}


def prepare(cfg: Config):
    ds = load_dataset("digits", n_train=cfg.n_train, seed=0, standardize=False)
    return jnp.asarray(ds.x_train), jax.nn.one_hot(ds.y_train, 10)


def make_model(cfg: Config) -> models.MLP:
    return models.MLP(widths=cfg.widths, num_outputs=10, activation=cfg.activation)


def sharpness_tracker(cfg: Config, objective):
    """The measurement of the sweep: lambda_max (and ``lambda_max_products``) by warm-started Lanczos."""
    return train.top_eigenvalue_tracker(objective, k=1, num_iters=cfg.lanczos_iters, tol=cfg.lanczos_tol)


def validate(cfg: Config) -> None:
    if cfg.n_train > DIGITS_TRAIN:
        raise ValueError(f"--n-train must be <= {DIGITS_TRAIN} (the digits training split), got {cfg.n_train}")


def eos_lrs(cfg: Config) -> tuple[float, ...]:
    """The learning rates of the edge-of-stability sweep: the claimed ones and the control's."""
    return (*cfg.lrs, *([] if cfg.control_lr is None or cfg.control_lr in cfg.lrs else [cfg.control_lr]))


def cells(cfg: Config):
    return [dict(part="spectrum", seed=s) for s in cfg.seeds] + [
        dict(part="eos", lr=lr, seed=s) for lr in eos_lrs(cfg) for s in cfg.seeds
    ]


def run(cfg: Config, batch, group):
    model = make_model(cfg)
    objective = nets.Objective(model, "squared_loss")
    if group[0]["part"] == "spectrum":
        return [spectrum_run(cfg, model, objective, batch, c["seed"]) for c in group]
    return eos_run(cfg, model, objective, batch, group)


def spectrum_at(cfg: Config, objective, params, batch, key):
    """Top-k eigenvalues, exact saddle index and the SLQ density (on its own grid) at ``params``."""
    k1, k2 = jax.random.split(key)
    top = curvature.top_eigenvalues(objective, params, batch, k1, k=cfg.top_k, num_iters=max(2 * cfg.top_k + 20, 40))
    index = curvature.saddle_index(objective, params, batch, method="exact", rtol=cfg.saddle_tol)
    grid, density = curvature.spectral_density(
        objective, params, batch, k2, num_iters=cfg.slq_iters, num_runs=cfg.slq_runs, num_points=cfg.density_points
    )
    return np.asarray(top), float(index), np.asarray(grid), np.asarray(density)


def spectrum_run(cfg: Config, model, objective, batch, seed: int):
    """GD at ``spectrum_lr``: the spectrum at initialisation, after steps/2 and after steps."""
    params = nets.init_fn(model, batch[0])(train.split_key(seed)[0])  # the initialisation the sweep uses
    optimizer = optax.sgd(cfg.spectrum_lr)
    half = cfg.steps // 2
    snapshots, start, key = {"init": (params, float(objective(params, batch)))}, params, seed
    for phase in ("mid", "end"):
        result = train.train(objective, optimizer, start, batch, num_steps=half, eval_every=half, key=key)
        start, key = result.state, None  # the second half resumes the first
        snapshots[phase] = (result.params, float(result.history["train_loss"][-1]))
    rows = []
    for i, phase in enumerate(PHASES):
        params, loss = snapshots[phase]
        top, index, grid, density = spectrum_at(cfg, objective, params, batch, jax.random.key(seed))
        rows.append(
            dict(
                kind="snapshot",
                phase=phase,
                step=i * half,
                train_loss=loss,
                saddle_index=index,
                **{f"top_{j + 1}": float(v) for j, v in enumerate(top)},
            )
        )
        rows += [
            dict(kind="density", phase=phase, eigenvalue=float(g), density=float(d)) for g, d in zip(grid, density)
        ]
    return rows


def eos_run(cfg: Config, model, objective, batch, group):
    """Full-batch GD at every lr and seed of the group (one sweep), lambda_max tracked every eval_every steps."""
    lrs = sorted({c["lr"] for c in group})
    seeds = sorted({c["seed"] for c in group})
    result = train.sweep(
        objective,
        lambda lr, seed: optax.sgd(lr),
        nets.init_fn(model, batch[0]),
        batch,
        {"lr": lrs},
        seeds,
        num_steps=cfg.steps,
        eval_every=cfg.eval_every,
        measure=sharpness_tracker(cfg, objective),
        measure_every=cfg.eval_every,
    )
    h = {k: np.asarray(v) for k, v in result.history.items()}
    out = []
    for c in group:
        i, j = lrs.index(c["lr"]), seeds.index(c["seed"])
        out.append(
            [
                dict(
                    kind="eos",
                    step=int(h["step"][i, j, t]),
                    train_loss=float(h["train_loss"][i, j, t]),
                    lambda_max=float(h["lambda_max"][i, j, t]),
                    lambda_max_products=float(h["lambda_max_products"][i, j, t]),  # NaN after a divergence
                    two_over_lr=2.0 / c["lr"],
                )
                for t in range(h["step"].shape[-1])
            ]
        )
    return out


def _edge_ratios(cfg: Config, rows, lr: float, **fields):
    """lambda_max / (2 / lr) over the last half of training, pooled over seeds (NaN after divergence)."""
    sel = [r for r in records.select(rows, part="eos", lr=lr, **fields) if r["step"] >= cfg.steps // 2]
    return np.array([r["lambda_max"] * lr / 2.0 for r in sel])


def _loss_drop(cfg: Config, rows, lr: float, seed: int) -> float:
    """log(loss at the half / loss at the end) of one run: > 0 when the loss still falls over the last half."""
    loss = {r["step"]: r["train_loss"] for r in records.select(rows, part="eos", lr=lr, seed=seed)}
    return float(np.log(loss[cfg.steps // 2 // cfg.eval_every * cfg.eval_every] / loss[cfg.steps]))


def seed_interval(values) -> tuple[float, float, float, float]:
    """``(mean, se, low, high)`` of per-seed values: the mean with its two-sided 95% Student-t interval
    (``verdicts.t_critical`` for the number of seeds; infinite with one seed)."""
    mean, se = verdicts.mean_se(values)
    half = verdicts.t_critical(len(values)) * se if len(values) > 1 else float("inf")
    return mean, se, mean - half, mean + half


def _products(rows, lr: float) -> tuple[float, float]:
    """Lanczos products per lambda_max measurement at ``lr``: ``(first, median of the later ones)``, over seeds
    (the first measurement starts cold, the later ones warm)."""
    sel = [r for r in records.select(rows, part="eos", lr=lr) if "lambda_max_products" in r]
    first = [r["lambda_max_products"] for r in sel if r["step"] == 0]
    later = [r["lambda_max_products"] for r in sel if r["step"] > 0 and np.isfinite(r["lambda_max_products"])]
    nan = float("nan")
    return (float(np.mean(first)) if first else nan), (float(np.median(later)) if later else nan)


def summarize(cfg: Config, rows):
    table, figures, ok, falls = [], {}, True, True
    for lr in cfg.lrs:
        ratios = _edge_ratios(cfg, rows, lr)
        per_seed = [float(np.nanmedian(_edge_ratios(cfg, rows, lr, seed=k))) for k in cfg.seeds]
        drops = [_loss_drop(cfg, rows, lr, k) for k in cfg.seeds]
        start = [r["lambda_max"] for r in records.select(rows, part="eos", lr=lr, step=0)]
        mean, se, low, high = seed_interval(per_seed)
        products_first, products_warm = _products(rows, lr)
        entry = dict(
            lr=lr,
            two_over_lr=2.0 / lr,
            lambda_max_init=float(np.mean(start)),
            ratio_median_last_half=float(np.nanmedian(ratios)),
            ratio_max_last_half=float(np.nanmax(ratios)),
            ratio_median_min_seed=min(per_seed),
            ratio_median_max_seed=max(per_seed),
            ratio_seed_mean=mean,
            ratio_seed_ci_low=low,
            ratio_seed_ci_high=high,
            loss_drop_last_half_min=min(drops),
            products_first=products_first,
            products_warm_median=products_warm,
            final_loss=float(
                np.mean([r["train_loss"] for r in records.select(rows, part="eos", lr=lr, step=cfg.steps)])
            ),
        )
        table.append(entry)
        figures[f"lr_{lr:g}_lambda_max_over_edge_median"] = entry["ratio_median_last_half"]
        figures[f"lr_{lr:g}_lambda_max_over_edge_max"] = entry["ratio_max_last_half"]
        figures[f"lr_{lr:g}_lambda_max_over_edge_seed_mean"] = mean
        figures[f"lr_{lr:g}_lambda_max_over_edge_seed_se"] = se
        figures[f"lr_{lr:g}_lambda_max_over_edge_seed_ci_low"] = low if np.isfinite(low) else None
        figures[f"lr_{lr:g}_lambda_max_over_edge_seed_ci_high"] = high if np.isfinite(high) else None
        figures[f"lr_{lr:g}_loss_drop_last_half_min"] = entry["loss_drop_last_half_min"]
        figures[f"lr_{lr:g}_lanczos_products_first"] = products_first if np.isfinite(products_first) else None
        figures[f"lr_{lr:g}_lanczos_products_warm_median"] = products_warm if np.isfinite(products_warm) else None
        ok = ok and bool(np.all(np.isfinite(ratios))) and all(cfg.edge_low <= r <= cfg.edge_high for r in per_seed)
        falls = falls and all(np.isfinite(d) and d > 0 for d in drops)
    snaps = [r for r in rows if r.get("kind") == "snapshot"]
    for phase in PHASES:
        sel = [r for r in snaps if r["phase"] == phase]
        entry = dict(
            phase=phase,
            step=sel[0]["step"],
            train_loss=float(np.mean([r["train_loss"] for r in sel])),
            saddle_index=float(np.mean([r["saddle_index"] for r in sel])),
            **{f"top_{j}": float(np.mean([r[f"top_{j}"] for r in sel])) for j in (1, 2, cfg.top_k)},
        )
        table.append(entry)
        figures[f"{phase}_saddle_index"] = entry["saddle_index"]
        figures[f"{phase}_lambda_max"] = entry["top_1"]
        figures[f"{phase}_train_loss"] = entry["train_loss"]
    medians = ", ".join(
        f"{t['ratio_median_min_seed']:.3g}-{t['ratio_median_max_seed']:.3g} (lr {t['lr']:g})"
        for t in table
        if "lr" in t
    )
    drops = ", ".join(f"{np.exp(t['loss_drop_last_half_min']):.3g}x (lr {t['lr']:g})" for t in table if "lr" in t)
    intervals = ", ".join(
        f"{t['ratio_seed_mean']:.3g} [{t['ratio_seed_ci_low']:.3g}, {t['ratio_seed_ci_high']:.3g}] (lr {t['lr']:g})"
        for t in table
        if "lr" in t
    )
    reason = (
        f"median lambda_max / (2/lr) over the last half, range over {len(cfg.seeds)} initialisations: {medians}; "
        f"needs [{cfg.edge_low:g}, {cfg.edge_high:g}] in each; the loss falls over the last half by at least "
        f"{drops} (needs > 1x in each run). Each initialisation is a deterministic GD run, so the claim must hold in "
        f"every one (no averaging). Over seeds (reported, not judged): mean of the per-seed medians with its 95% "
        f"Student-t interval: {intervals}"
    )
    claim = bool(ok and falls) if len(cfg.seeds) >= verdicts.MIN_SEEDS else None
    control, control_text = None, "no control run (--control-lr None): cannot tell whether the test discriminates"
    if cfg.control_lr is not None and cfg.control_lr not in cfg.lrs:
        per_seed = [float(np.nanmedian(_edge_ratios(cfg, rows, cfg.control_lr, seed=k))) for k in cfg.seeds]
        drops = [_loss_drop(cfg, rows, cfg.control_lr, k) for k in cfg.seeds]
        control = all(cfg.edge_low <= r <= cfg.edge_high for r in per_seed) and all(d > 0 for d in drops)
        figures["control_lr"] = cfg.control_lr
        figures["control_lambda_max_over_edge_median_min_seed"] = min(per_seed)
        figures["control_lambda_max_over_edge_median_max_seed"] = max(per_seed)
        control_text = (f"control lr {cfg.control_lr:g} (2/lr = {2 / cfg.control_lr:.3g}, above lambda_max at "
                        f"initialisation): median lambda_max / (2/lr) {min(per_seed):.3g}-{max(per_seed):.3g}, "
                        f"{'inside' if control else 'outside'} the band: the test "
                        f"{'passes too' if control else 'fails, as it must'}")  # fmt: skip
    judgement = discrimination.judge({"edge": discrimination.Part(
        claim, control, f"GD at lr {cfg.control_lr} whose edge 2/lr lies far above the sharpness (not at the edge)")})
    supported = judgement.supported if control is not None else (None if claim else claim)
    reason = "; ".join([reason, control_text, judgement.reason, POWER_TEXT.format(low=cfg.edge_low, high=cfg.edge_high)])
    if claim is None:
        reason = f"{len(cfg.seeds)} initialisation(s): too few to speak for GD in general (needs 3); {reason}"
    power = {"edge": discrimination.Power(
        max(1.0 - cfg.edge_low, cfg.edge_high - 1.0), None, " (lambda_max / (2/lr) away from 1)",
        "Cohen et al. 2021, Section 3: lambda_max hovers at or just above 2/lr (ratio about 1-1.1)", "tolerance")}
    return experiment.Verdict(supported, figures, table, reason, judgement.controls,
                              {n: p.record() for n, p in power.items()})  # fmt: skip


POWER_TEXT = (
    "power: a deterministic check per run (no sampling noise), so its resolution is the band [{low:g}, {high:g}] "
    "itself; Cohen et al. (2021, Section 3) report lambda_max hovering at or just above 2/lr (ratio about 1-1.1), "
    "inside the band, and a sharpness at half or double the edge outside it"
)


def plot(cfg: Config, rows: list[dict]) -> dict:
    fig, axes = plots.plt.subplots(1, 5, figsize=(30, 4.8))
    ax_loss, ax_products, ax_ratio = axes[2], axes[3], axes[4]
    axes = axes[:2]
    for i, lr in enumerate(eos_lrs(cfg)):
        for j, seed in enumerate(cfg.seeds):
            sel = records.select(rows, part="eos", lr=lr, seed=seed)
            steps = [r["step"] for r in sel]
            label = (f"lr = {lr:g}" + (" (control)" if lr not in cfg.lrs else "")) if j == 0 else None
            axes[0].plot(steps, [r["lambda_max"] for r in sel], color=f"C{i}", lw=1.2 if j == 0 else 0.6, label=label)
            ax_loss.plot(steps, [r["train_loss"] for r in sel], color=f"C{i}", lw=1.2 if j == 0 else 0.6, label=label)
            ax_products.plot(steps, [r.get("lambda_max_products", np.nan) for r in sel], color=f"C{i}",
                             lw=1.2 if j == 0 else 0.6, marker=".", ms=3, label=label)
        axes[0].axhline(2.0 / lr, color=f"C{i}", ls="--", lw=1)
    axes[0].axvline(cfg.steps // 2, color="gray", ls=":", lw=1, label="judged from here")
    ax_loss.axvline(cfg.steps // 2, color="gray", ls=":", lw=1)
    axes[0].set(xlabel="GD step", ylabel="lambda_max", yscale="log",
                title=f"sharpness vs 2 / lr (dashed); {len(cfg.seeds)} initialisations")  # fmt: skip
    ax_loss.set(xlabel="GD step", ylabel="training loss (squared)", yscale="log",
                title="the loss keeps falling at the edge")  # fmt: skip
    ax_products.axhline(cfg.lanczos_iters, color="gray", ls="--", lw=1, label="cap (lanczos_iters)")
    ax_products.set(xlabel="GD step", ylabel="Hessian-vector products", ylim=(0, cfg.lanczos_iters + 1),
                    title=f"products per lambda_max measurement (warm-started, tol {cfg.lanczos_tol:g})")  # fmt: skip
    axes[0].legend(fontsize=8)
    ax_loss.legend(fontsize=8)
    ax_products.legend(fontsize=8)
    for i, phase in enumerate(PHASES):
        sel = [r for r in rows if r.get("kind") == "density" and r["phase"] == phase and r["seed"] == cfg.seeds[0]]
        (snap,) = [r for r in rows if r.get("kind") == "snapshot" and r["phase"] == phase and r["seed"] == cfg.seeds[0]]
        axes[1].plot([r["eigenvalue"] for r in sel], [max(r["density"], 1e-8) for r in sel], color=f"C{i}",
                     label=f"{phase} (step {snap['step']}, saddle index {snap['saddle_index']:.3g})")
    axes[1].set(
        yscale="log",
        ylim=(1e-6, None),
        xlabel="eigenvalue",
        ylabel="density (SLQ)",
        title=f"Hessian spectrum, GD lr = {cfg.spectrum_lr:g} (index: eigenvalues < -{cfg.saddle_tol:g} max|lambda|)",
    )
    axes[1].legend()
    for i, lr in enumerate(eos_lrs(cfg)):  # the judged statistic: per-seed medians of lambda_max / (2/lr), last half
        per_seed = [float(np.nanmedian(_edge_ratios(cfg, rows, lr, seed=k))) for k in cfg.seeds]
        mean, _, low, high = seed_interval(per_seed)
        color = f"C{i}" if lr in cfg.lrs else "tab:gray"
        ax_ratio.plot([i] * len(per_seed), per_seed, "o", color=color, alpha=0.6, ms=5)
        ax_ratio.errorbar([i + 0.15], [mean], yerr=[[mean - low], [high - mean]] if np.isfinite(low) else None,
                          fmt="s", capsize=5, color=color)  # fmt: skip
    ax_ratio.axhspan(cfg.edge_low, cfg.edge_high, color="gold", alpha=0.2, label="band every run must lie in")
    ax_ratio.set_xticks(range(len(eos_lrs(cfg))),
                        [f"lr {lr:g}" + ("\n(control)" if lr not in cfg.lrs else "") for lr in eos_lrs(cfg)])
    ax_ratio.set(yscale="log", ylabel="median lambda_max / (2/lr), last half",
                 title="judged: every run (dots) in the band; mean with 95% t interval (squares)")  # fmt: skip
    ax_ratio.legend(fontsize=8)
    return {"hessian_spectrum.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("lr", "seed"))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
