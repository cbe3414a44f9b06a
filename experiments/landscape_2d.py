"""Filter-normalised loss landscapes at equal training loss (Li et al. 2018): batch size, noise, skip connections.

Claim (Li et al. 2018, Sections 5-6 and Fig. 5; Keskar et al. 2017; Orvieto et al. 2023, Section 5): with
filter-normalised directions, which remove the scale invariance of ReLU networks from the picture, small-batch
SGD reaches flatter regions than large-batch (full-batch) GD, GD with layer-wise noise injection flatter regions
than plain GD, and a deep network with skip connections a flatter, smoother landscape than the same network
without them, each compared at the same training loss.

Setup: scikit-learn digits (or MNIST-1D), softmax cross-entropy, ``lsgeo.models.MLP`` (ReLU). Trained networks
("variants"), each from every seed (one vmapped ``lsgeo.train.sweep`` per variant and step size), all with plain
SGD steps for at most ``steps`` steps:

- ``small_batch``: the base MLP, step ``lr``, minibatch SGD with ``small_batch`` examples per step;
- ``large_batch``: the base MLP, step ``lr``, full-batch GD (the reference of ``batch`` and ``noise``);
- ``large_twin``:  full-batch GD again from seed + ``TWIN_OFFSET`` (another initialisation): the negative control
                   of ``batch`` and ``noise`` (two runs of one procedure: the test must not find a difference);
- ``noise``:       the base MLP, full-batch GD + layer-wise noise (``lsgeo.optim.noise_injection``,
                   ``mode="layerwise"``, std ``sigma`` sqrt(M) on one random layer), measured clean;
- ``deep_plain`` / ``deep_skip``: a deep MLP (``deep_depth`` hidden layers of width ``deep_width``) without and
                   with residual hidden layers (``MLP(skip_connections=True)``), full-batch GD;
- ``shallow_plain`` / ``shallow_skip``: the same pair at depth ``shallow_depth``, the negative control of ``skip``
                   (Li et al., Section 6: skip connections matter for deep networks; at small depth the two
                   landscapes are alike, so the test must fail there).

Equal loss: every run keeps its clean iterate at the first check (every ``check_every`` steps) where its
training loss on the whole training set is <= ``target_loss`` (an in-loop measurement, ``first_at_loss``); the
landscapes are taken there, so all variants are compared at the same loss (within one check's decrease; the loss
is recorded). A run that never gets there is left out of its pairs (fewer than 3 pairs: null).

Step size of the deep pair (a rule, not a choice): every network takes the same SGD step, ``lr`` (``deep_lrs =
(lr,)``); with several values the ``skip`` parts are judged at each and must hold at each, so no step size is
picked by the verdict. The residual MLP has no normalisation layer, its hidden scale grows with depth (lambda_max at
initialisation 400-1400 against the plain net's 0.3-0.6 at depth 10, width 32), and an earlier version of this
experiment, comparing the minima at the end of the budget, set the deep step to 0.05 after 0.1 had reversed the
result. At equal loss the two agree (measured with ``--deep-lrs 0.05 0.1``, 8 seeds: log curvature plain minus
residual -0.19 ± 0.24 at 0.05, -0.61 ± 0.29 at 0.1, both within noise; roughness +0.038 ± 0.008 at both). The deep
runs are chaotic (the last digits of a reduction change the trajectory, and 1-2 of 8 residual runs never reach
the target loss): the statistic is the log curvature ratio paired over ``seeds`` (8), whose sign does not hinge on
one run, and a test re-runs a residual cell in two fresh processes to the same bits.

Around each kept iterate w: ``num_directions`` filter-normalised random directions
(``lsgeo.landscape.random_direction(normalization="filter")``, biases fixed) give 1-D slices of the
training loss on ``num_alphas`` points of [-radius, radius] (``slice_1d``); for the first seed the first two
span the 2-D surface on a ``grid`` x ``grid`` mesh (``slice_2d``, drawn). Flatness, per run:

- ``curvature``: the second derivative at 0 of the 1-D slices, from a least-squares parabola through
  the points with |alpha| <= ``fit_radius``, averaged over the directions (lower = flatter);
- ``roughness``: the fraction of slice points where a slice bends down (Li et al.'s "smoother").

Verdict (``discrimination.judge``): each comparison is the paired difference over seeds of log curvature (the
sharper variant's minus the flatter one's; ``verdicts.paired_gain``, 95% Student-t) beside its control; "smoother"
(skip) is a part of its own, roughness plain minus residual. Supported when every part holds and every control
fails, null when a control passes ("does not discriminate") or a part is within noise, false when a part is
contradicted after Holm's correction. Li et al. report pictures, not numbers: the minimum detectable effect of
each rule is stored with no source effect.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli, discrimination, experiment, nets, plots, records, verdicts
from lsgeo import landscape, models, optim, train
from lsgeo.curvature import track

VARIANTS = ("small_batch", "large_batch", "large_twin", "noise", "deep_plain", "deep_skip", "shallow_plain",
            "shallow_skip")  # fmt: skip
# comparison -> (variant expected flatter, variant expected sharper), and the same for its negative control
COMPARISONS = {
    "batch": ("small_batch", "large_batch"),
    "noise": ("noise", "large_batch"),
    "skip": ("deep_skip", "deep_plain"),
}
CONTROLS = {
    "batch": ("large_twin", "large_batch"),
    "noise": ("large_twin", "large_batch"),
    "skip": ("shallow_skip", "shallow_plain"),
}
CONTROL_TEXT = {
    "batch": "full-batch GD from another seed in place of small-batch SGD",
    "noise": "full-batch GD from another seed in place of GD + noise",
    "skip": "the same pair of nets at depth shallow_depth",
}
TWIN_OFFSET = 1000  # large_twin of seed s trains from seed s + TWIN_OFFSET
SOURCE = "Li et al. 2018 show filter-normalised surfaces (Figs. 3, 5), no curvature numbers"

CLAIM = (
    "At equal training loss, filter-normalised 1-D slices are flatter (lower curvature) for small-batch SGD than "
    "for full-batch GD, for GD with layer-wise noise than for plain GD, and for a deep MLP with skip connections "
    "than without them, whose slices are also smoother (Li et al. 2018, Sections 5-6; Orvieto et al. 2023, "
    "Section 5)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Flatness of filter-normalised landscapes at equal loss; the defaults run in a few minutes on a CPU."""

    dataset: str = "digits"  # "digits" or "mnist1d"
    n_train: int | None = 1024  # training points (None: all)
    widths: tuple[int, ...] = (64, 64)  # base MLP (small_batch, large_batch, large_twin, noise)
    deep_width: int = 32  # deep MLP (deep_plain, deep_skip) and its shallow control
    deep_depth: int = 10  # hidden layers of the deep MLP
    shallow_depth: int = 2  # hidden layers of the control pair (shallow_plain, shallow_skip)
    steps: int = 2000  # at most this many SGD steps per deep run (the residual net needs up to 1700)
    base_steps: int = 600  # at most min(steps, this) steps per run of the base MLP and the shallow pair (they reach
    # the target loss by about 420)
    target_loss: float = 0.05  # every run is measured at the first check with a training loss <= this
    check_every: int = 20  # steps between checks of the training loss
    lr: float = 0.1  # SGD step of the base MLP
    deep_lrs: tuple[float, ...] = (0.1,)  # SGD steps of the deep pair and its control (rule: lr); judged at each
    small_batch: int = 32  # examples per step of small_batch (the others are full-batch)
    sigma: float = 0.05  # layer-wise noise level of ``noise``
    num_directions: int = 4  # filter-normalised directions per run (the first two span the surface)
    radius: float = 1.0  # slices on [-radius, radius] (1 = one filter norm)
    num_alphas: int = 41  # points of a 1-D slice
    grid: int = 25  # points per axis of the 2-D surface (first seed only: drawn)
    fit_radius: float = 0.2  # the parabola of the curvature is fitted on |alpha| <= fit_radius
    level: float = 0.1  # the area counts grid points within this loss of the centre's
    comparisons: tuple[Literal[tuple(COMPARISONS)], ...] = ("batch", "noise", "skip")  # and so which variants run
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)  # initialisation, data order, noise and directions


PRESETS = {
    "paper": Config(
        dataset="mnist1d",
        n_train=4000,
        widths=(256, 256),
        deep_width=64,
        deep_depth=20,
        steps=20_000,
        target_loss=0.01,
        check_every=100,
        num_directions=10,
        num_alphas=101,
        grid=51,
    )
}


def validate(cfg: Config) -> None:
    """Checks beyond the runner's field conventions (``config_checks.check_config``), before a run folder exists."""
    for name in ("steps", "base_steps"):
        if getattr(cfg, name) % cfg.check_every:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be a multiple of --check-every "
                             f"{cfg.check_every}")
    if not cfg.deep_lrs:
        raise ValueError("--deep-lrs must hold at least one step size")


def prepare(cfg: Config):
    data = nets.splits(cfg.dataset, n_train=cfg.n_train, flatten=True)
    return data.train, data.test


def variants(cfg: Config) -> list[str]:
    """The variants that ``cfg.comparisons`` (and their controls) need, in the order of ``VARIANTS``."""
    for c in cfg.comparisons:
        if c not in COMPARISONS:
            raise ValueError(f"comparisons must be among {tuple(COMPARISONS)}, got {c!r}")
    return [v for v in VARIANTS if any(v in COMPARISONS[c] + CONTROLS[c] for c in cfg.comparisons)]


def step_sizes(cfg: Config, variant: str) -> tuple[float, ...]:
    return cfg.deep_lrs if variant.startswith(("deep", "shallow")) else (cfg.lr,)


def make_model(cfg: Config, variant: str) -> models.MLP:
    if variant.startswith(("deep", "shallow")):
        depth = cfg.deep_depth if variant.startswith("deep") else cfg.shallow_depth
        return models.MLP(widths=(cfg.deep_width,) * depth, num_outputs=10, skip_connections=variant.endswith("skip"))
    return models.MLP(widths=cfg.widths, num_outputs=10)


def optimizer_fn(variant: str, step_size: float):
    """``(sigma, seed) -> optimizer`` of ``variant`` for ``lsgeo.train.sweep``."""
    sgd = optax.sgd(step_size)
    if variant == "noise":
        return lambda sigma, seed: optim.noise_injection(sgd, sigma, mode="layerwise", seed=seed)
    return lambda sigma, seed: sgd  # sigma = 0: plain SGD


def first_at_loss(objective, target: float) -> track.Measurement:
    """A measurement (the ``lsgeo.curvature.track`` protocol) that keeps the clean iterate of the first check whose
    loss on the measurement data is <= ``target``: its state is ``{params, reached, loss, checks}`` (``checks``: the
    checks before it, so the kept step is ``checks * measure_every``; ``loss`` -1 until reached)."""

    def init(params):
        return dict(params=params, reached=jnp.zeros((), bool), loss=-jnp.ones(()), checks=jnp.zeros((), jnp.int32))

    def update(params, batch, state):
        loss = objective(params, batch)
        now = jnp.logical_and(jnp.logical_not(state["reached"]), loss <= target)
        reached = jnp.logical_or(state["reached"], now)
        new = dict(params=jax.tree_util.tree_map(lambda p, s: jnp.where(now, p, s), params, state["params"]),
                   reached=reached, loss=jnp.where(now, loss, state["loss"]),
                   checks=state["checks"] + jnp.logical_not(reached).astype(jnp.int32))  # fmt: skip
        return {"kept_loss": new["loss"]}, new

    return track.Measurement(init, update)


def curvature_at_zero(alphas: np.ndarray, values: np.ndarray, fit_radius: float) -> float:
    """Second derivative at 0 of the least-squares parabola through the points with |alpha| <= fit_radius."""
    near = np.abs(alphas) <= fit_radius + 1e-9
    return float(2.0 * np.polyfit(alphas[near], values[near], 2)[0])


def roughness_of(slices: np.ndarray) -> float:
    """The fraction of the points of the 1-D slices ``[directions, alphas]`` where a slice bends down (a negative
    second difference beyond rounding): 0 for a convex bowl, large for a chaotic landscape (Li et al.'s
    "smoother"), averaged over the directions."""
    d2 = slices[:, 2:] - 2 * slices[:, 1:-1] + slices[:, :-2]
    return float(np.mean(d2 < -1e-6 * np.max(np.abs(slices), axis=1, keepdims=True)))


def cells(cfg: Config) -> list[dict]:
    return [
        dict(variant=v, step_size=lr, seed=s) for v in variants(cfg) for lr in step_sizes(cfg, v) for s in cfg.seeds
    ]


def run(cfg: Config, data, group: list[dict]) -> list[list[dict]]:
    (train_batch, test_batch), variant, step_size = data, group[0]["variant"], group[0]["step_size"]
    model = make_model(cfg, variant)
    objective = nets.Objective(model)
    seeds = [c["seed"] + (TWIN_OFFSET if variant == "large_twin" else 0) for c in group]
    result = train.sweep(
        objective, optimizer_fn(variant, step_size), nets.init_fn(model, train_batch[0]), train_batch,
        {"sigma": [cfg.sigma if variant == "noise" else 0.0]}, seeds,
        num_steps=cfg.steps if variant.startswith("deep") else min(cfg.steps, cfg.base_steps),
        eval_every=cfg.check_every, batch_size=cfg.small_batch if variant == "small_batch" else None,
        measure=first_at_loss(objective, cfg.target_loss), measure_every=cfg.check_every,
    )  # fmt: skip
    alphas = np.linspace(-cfg.radius, cfg.radius, cfg.num_alphas)
    grid = np.linspace(-cfg.radius, cfg.radius, cfg.grid)
    evaluate = jax.jit(
        lambda w, train_data, test_data: (
            objective(w, train_data),
            nets.Objective(model, "accuracy")(w, test_data),
            objective(w, test_data),
        )
    )
    kept = jax.tree_util.tree_map(np.asarray, result.state.measure)
    out = []
    for i, c in enumerate(group):
        w = jax.tree_util.tree_map(lambda p: p[0, i], kept["params"])
        keys = jax.random.split(jax.random.key(c["seed"]), cfg.num_directions)
        directions = [landscape.random_direction(w, k, normalization="filter") for k in keys]
        slices = np.stack([np.asarray(landscape.slice_1d(objective, w, train_batch, d, alphas)) for d in directions])
        center, test_acc, test_loss = (float(v) for v in evaluate(w, train_batch, test_batch))
        minimum = dict(kind="minimum", reached=bool(kept["reached"][0, i]),
                       step=int(kept["checks"][0, i]) * cfg.check_every,
                       train_loss=center, test_acc=test_acc, test_loss=test_loss,
                       curvature=float(np.mean([curvature_at_zero(alphas, s, cfg.fit_radius) for s in slices])),
                       roughness=roughness_of(slices))  # fmt: skip
        rows = [minimum]
        rows += [dict(kind="slice", direction=j, alpha=float(a), loss=float(slices[j, k]))
                 for j in range(cfg.num_directions) for k, a in enumerate(alphas)]  # fmt: skip
        if c["seed"] == cfg.seeds[0]:  # the 2-D surface is drawn, not judged: the first seed only
            surface = np.asarray(
                landscape.slice_2d(objective, w, train_batch, directions[0], directions[1], grid, grid)
            )
            minimum["area"] = float(np.mean(surface <= center + cfg.level))
            rows += [dict(kind="surface", alpha=float(a), beta=float(b), loss=float(surface[j, k]))
                     for j, a in enumerate(grid) for k, b in enumerate(grid)]  # fmt: skip
        out.append(rows)
    return out


def minimum(rows: list[dict], variant: str, seed: int, step_size: float | None = None) -> dict:
    fields = {} if step_size is None else dict(step_size=step_size)
    return records.select(rows, variant=variant, seed=seed, kind="minimum", **fields)[0]


def pairs(cfg: Config) -> dict[str, tuple[str, str, str, float]]:
    """Every judged part: name -> (comparison, statistic, step size of the pair, ...): the parts of ``comparisons``,
    ``skip`` (and ``skip_smoother``) once per step size of ``deep_lrs``."""
    out = {}
    for name in cfg.comparisons:
        if name == "skip":
            for lr in cfg.deep_lrs:
                out[f"skip_lr={lr:g}"] = ("skip", "curvature", lr)
                out[f"skip_smoother_lr={lr:g}"] = ("skip", "roughness", lr)
        else:
            out[name] = (name, "curvature", cfg.lr)
    return out


def paired(cfg: Config, rows: list[dict], flat: str, sharp: str, statistic: str, step_size: float):
    """(gain, per-seed values): log curvature of ``sharp`` minus ``flat`` (or roughness, unlogged), paired over the
    seeds where both runs reached the target loss (and both curvatures are positive)."""
    values = {}
    for k in cfg.seeds:
        a, b = minimum(rows, sharp, k, step_size), minimum(rows, flat, k, step_size)
        if not (_true(a["reached"]) and _true(b["reached"])):
            continue
        if statistic == "curvature":
            if a["curvature"] > 0 and b["curvature"] > 0:
                values[k] = float(np.log(a["curvature"]) - np.log(b["curvature"]))
        else:
            values[k] = float(a[statistic] - b[statistic])
    return verdicts.paired_gain(list(values.values()), np.zeros(len(values))), values


def _true(value) -> bool:
    return value is True or value == "True" or value == 1


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    table, figures = [], {}
    for v in variants(cfg):
        for lr in step_sizes(cfg, v):
            every = [minimum(rows, v, s, lr) for s in cfg.seeds]
            reached = [m for m in every if _true(m["reached"])]
            ms = reached or every  # means over the runs that reached the target loss (all when none did)
            curv = np.array([m["curvature"] for m in ms])
            entry = dict(variant=v, step_size=lr, reached=len(reached),
                         train_loss=float(np.mean([m["train_loss"] for m in ms])),
                         test_acc=float(np.mean([m["test_acc"] for m in ms])),
                         curvature=float(np.exp(np.mean(np.log(curv)))) if np.all(curv > 0) else float(np.mean(curv)),
                         roughness=float(np.mean([m["roughness"] for m in ms])))  # fmt: skip
            table.append(entry)
            tag = v if len(step_sizes(cfg, v)) == 1 else f"{v}_lr={lr:g}"
            figures.update({f"{tag}_{k}": entry[k] for k in ("curvature", "roughness", "train_loss", "test_acc")})
    parts, powers, reasons = {}, {}, []
    for part, (name, statistic, lr) in pairs(cfg).items():
        flat, sharp = COMPARISONS[name]
        c_flat, c_sharp = CONTROLS[name]
        claim, per_seed = paired(cfg, rows, flat, sharp, statistic, lr)
        control, _ = paired(cfg, rows, c_flat, c_sharp, statistic, lr)
        parts[part] = discrimination.Part(claim, control, CONTROL_TEXT[name])
        unit = " (log curvature ratio)" if statistic == "curvature" else " (roughness)"
        powers[part] = discrimination.Power.of(claim, None, unit, SOURCE)
        figures.update({f"{part}_gain": claim.mean, f"{part}_gain_se": claim.se, f"{part}_pairs": claim.n,
                        f"{part}_control_gain": control.mean, f"{part}_control_gain_se": control.se})  # fmt: skip
        what = "log curvature" if statistic == "curvature" else "roughness"
        reasons.append(claim.describe(f"{part}: {what} of {sharp} minus {flat}")
                       + "; control " + control.describe(f"{c_sharp} minus {c_flat}"))  # fmt: skip
    losses = ", ".join(f"{e['variant']} (lr {e['step_size']:g}) {e['train_loss']:.3g} "
                       f"({e['reached']}/{len(cfg.seeds)} reached)" for e in table)  # fmt: skip
    judgement = discrimination.judge(parts)
    supported, power_clause = discrimination.with_power(judgement.supported, powers)
    reason = "; ".join([f"measured at the first check with training loss <= {cfg.target_loss:g}: {losses}", *reasons,
                        judgement.reason, power_clause])  # fmt: skip
    return experiment.Verdict(supported, figures, table, reason, judgement.controls,
                              {k: p.record() for k, p in powers.items()})  # fmt: skip


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt, seed = plots.plt, cfg.seeds[0]
    controls_only = ("large_twin", "shallow_plain", "shallow_skip")
    drawn = [(v, step_sizes(cfg, v)[0]) for v in variants(cfg) if v not in controls_only]
    surfaces = {}
    for v, lr in drawn:
        sel = records.select(rows, variant=v, step_size=lr, seed=seed, kind="surface")
        grid = np.array(sorted({r["alpha"] for r in sel}))
        surfaces[v] = np.log10(np.maximum([r["loss"] for r in sel], 1e-12)).reshape(grid.size, grid.size)
    low, high = min(z.min() for z in surfaces.values()), max(z.max() for z in surfaces.values())
    levels = np.linspace(low, high, 25)  # shared by every panel: equal spacing = equal flatness
    fig, axes = plt.subplots(1, len(surfaces) + 1, figsize=(4.2 * len(surfaces) + 1, 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * len(surfaces) + [0.06]})  # fmt: skip
    axes, cax = axes[0][:-1], axes[0][-1]
    for ax, (v, lr) in zip(axes, drawn):
        cs = ax.contourf(grid, grid, surfaces[v], levels=levels, cmap="viridis")
        ax.contour(grid, grid, surfaces[v], levels=levels[::4], colors="white", linewidths=0.5)
        ax.plot(0, 0, "r*")
        m = minimum(rows, v, seed, lr)
        ax.set(title=f"{v}{'' if len(step_sizes(cfg, v)) == 1 else f' (lr {lr:g})'}\n"
                     f"loss {m['train_loss']:.2g}, curv {m['curvature']:.3g}, area {m['area']:.2f}",
               xlabel="beta (d2)", aspect="equal")  # fmt: skip
    axes[0].set_ylabel("alpha (d1)")
    fig.colorbar(cs, cax=cax, label="log10 training loss (same levels in every panel)")
    fig.suptitle(f"log10 training loss on filter-normalised planes at training loss ~{cfg.target_loss:g} (seed {seed})")
    figures = {"surfaces.png": fig}

    comps = [(n, lr) for n in cfg.comparisons for lr in (cfg.deep_lrs if n == "skip" else (cfg.lr,))]
    fig, axes = plt.subplots(1, len(comps), figsize=(4.6 * len(comps), 4), squeeze=False)
    for ax, (name, lr) in zip(axes[0], comps):
        for v, color in zip(COMPARISONS[name], ("tab:blue", "tab:red")):
            for s in cfg.seeds:
                if not _true(minimum(rows, v, s, lr)["reached"]):
                    continue
                for j in range(cfg.num_directions):
                    sel = sorted(records.select(rows, variant=v, step_size=lr, seed=s, kind="slice", direction=j),
                                 key=lambda r: r["alpha"])  # fmt: skip
                    ax.plot([r["alpha"] for r in sel], [r["loss"] for r in sel], color=color, alpha=0.3, lw=0.8,
                            label=v if (s, j) == (seed, 0) else None)  # fmt: skip
        ax.set(yscale="log", xlabel="alpha (filter-normalised)", ylabel="training loss",
               title=f"1-D slices: {name}{'' if name != 'skip' else f' (lr {lr:g})'}, all seeds")  # fmt: skip
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    figures["slices.png"] = fig

    verdict = summarize(cfg, rows)
    fig, (ax, ax_v) = plt.subplots(1, 2, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1.1, 1]})
    names = list(pairs(cfg))
    for i, part in enumerate(names):  # the judged statistic per seed, claim and control, with mean ± margin
        name, statistic, lr = pairs(cfg)[part]
        for dx, (flat, sharp), color, who in ((-0.17, COMPARISONS[name], "tab:blue", "claim"),
                                              (0.17, CONTROLS[name], "tab:gray", "control")):  # fmt: skip
            gain, values = paired(cfg, rows, flat, sharp, statistic, lr)
            ax.plot(i + dx + np.linspace(-0.06, 0.06, len(values)), list(values.values()), "o", ms=3, color=color,
                    alpha=0.7, label=f"{who}, per seed" if i == 0 else None)  # fmt: skip
            if np.isfinite(gain.margin):
                ax.errorbar([i + dx], [gain.mean], yerr=[gain.margin], fmt="s", capsize=4, color="k",
                            label="mean ± t s.e. (95%)" if i == 0 and who == "claim" else None)  # fmt: skip
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), [n.replace("_lr", "\nlr") for n in names], fontsize=8)
    ax.set(ylabel="sharper minus flatter: log curvature (roughness for smoother)",
           title=f"judged (> 0: the claimed order); verdict: {verdict.word}")  # fmt: skip
    ax.legend(fontsize=7)
    for i, entry in enumerate(verdict.table):  # curvature per run, log axis (it spans decades)
        v, lr = entry["variant"], entry["step_size"]
        ms = [minimum(rows, v, s, lr) for s in cfg.seeds]
        ok = np.array([_true(m["reached"]) for m in ms])
        curv = np.array([m["curvature"] for m in ms])
        ax_v.scatter(np.full(ok.sum(), i), curv[ok], color=f"C{i % 10}", s=12, zorder=3)
        ax_v.scatter(np.full((~ok).sum(), i), curv[~ok], facecolors="none", edgecolors=f"C{i % 10}", zorder=3,
                     label="target loss not reached (left out)" if (~ok).any() and i == 0 else None)  # fmt: skip
        if np.all(curv[ok] > 0) and ok.any():
            ax_v.plot([i - 0.25, i + 0.25], [np.exp(np.mean(np.log(curv[ok])))] * 2, color=f"C{i % 10}", lw=2)
    labels = [e["variant"] + ("" if len(step_sizes(cfg, e["variant"])) == 1 else f"\nlr {e['step_size']:g}")
              for e in verdict.table]  # fmt: skip
    ax_v.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30)
    ax_v.set(yscale="log", ylabel="curvature of the 1-D slices at 0 (lower = flatter)",
             title=f"per run at training loss <= {cfg.target_loss:g} (line: geometric mean)")  # fmt: skip
    if ax_v.get_legend_handles_labels()[0]:
        ax_v.legend(fontsize=8)
    fig.tight_layout()
    figures["flatness.png"] = fig
    return figures


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
