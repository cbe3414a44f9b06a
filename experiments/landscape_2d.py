"""Filter-normalised loss landscapes around minima (Li et al. 2018): batch size, noise, skip connections.

Claim (Li et al. 2018, Sections 5-6; Keskar et al. 2017; Orvieto et al. 2023): with filter-normalised
directions, which remove the scale invariance of ReLU networks from the picture, the minimum that
small-batch SGD reaches is flatter than the large-batch (full-batch GD) one, the minimum that GD with
layer-wise noise injection reaches is flatter than plain GD's, and a deep network with skip
connections has a flatter, smoother landscape around its minimum than the same network without them.

Setup: scikit-learn digits (or MNIST-1D), softmax cross-entropy, ``lsgeo.models.MLP`` (ReLU). Five
trained networks ("variants"), each from every seed (one vmapped ``lsgeo.train.sweep`` per variant),
all with plain SGD steps of size ``lr`` (base MLP) or ``deep_lr`` (deep MLPs) for ``steps`` steps:

- ``small_batch``: the base MLP, minibatch SGD with ``small_batch`` examples per step;
- ``large_batch``: the base MLP, full-batch GD (also the reference of ``noise``);
- ``noise``:       the base MLP, full-batch GD + layer-wise noise (``lsgeo.optim.noise_injection``,
                   ``mode="layerwise"``, std ``sigma`` sqrt(M) on one random layer), evaluated clean;
- ``deep_plain``:  a deep MLP (``deep_depth`` hidden layers of width ``deep_width``), full-batch GD;
- ``deep_skip``:   the same network with residual hidden layers (``MLP(skip_connections=True)``).

Around each minimum w: ``num_directions`` filter-normalised random directions
(``lsgeo.landscape.random_direction(normalization="filter")``, biases fixed) give 1-D slices of the
training loss on ``num_alphas`` points of [-radius, radius] (``slice_1d``); the first two span the
2-D surface on a ``grid`` x ``grid`` mesh (``slice_2d``). Flatness, per minimum:

- ``curvature``: the second derivative at 0 of the 1-D slices, from a least-squares parabola through
  the points with |alpha| <= ``fit_radius``, averaged over the directions (lower = flatter);
- ``area``: the fraction of the 2-D grid whose loss is within ``level`` of the loss at w (higher = flatter).

The residual MLP has no normalisation layer (Li et al.'s ResNets have BatchNorm): its hidden scale
grows with depth, and at ``deep_lr = 0.1`` it trains at the edge of stability and ends *sharper* than
the plain net (seen: curvature 50 vs 15 at depth 10, width 32); at 0.05 it ends flatter (14 vs 27).
The skip comparison is therefore sensitive to the step size at this size; at depth 20 the plain net
does not train and the residual one diverges at 0.1.

Verdict: a comparison (small_batch < large_batch, noise < large_batch, deep_skip < deep_plain, in
curvature) is the curvature gap of the pair paired over seeds (a seed fixes the initialisation of
both; ``verdicts.paired_gain``, 95% Student-t): it holds beyond t s.e., fails below minus t s.e., and is
null in between. Only seeds whose two minima both converged (train loss <= ``converged_loss``) are
paired: a run stuck at a high loss is not a minimum (fewer than 3 such seeds: null). "Smoother" (skip) is
a part of its own: the ``roughness`` of the 1-D slices (the fraction of points where a slice bends down)
of the plain net minus the residual one. Supported when all parts hold, false when one fails after
Holm's correction for their number, null otherwise. The curvatures are compared at the losses the
minima reach, which differ between variants (reported next to each comparison).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import numpy as np
import optax

from experiments import cli, experiment, nets, plots, records, verdicts
from lsgeo import landscape, models, optim, train

VARIANTS = ("small_batch", "large_batch", "noise", "deep_plain", "deep_skip")
# comparison -> (variant expected flatter, variant expected sharper)
COMPARISONS = {
    "batch": ("small_batch", "large_batch"),
    "noise": ("noise", "large_batch"),
    "skip": ("deep_skip", "deep_plain"),
}

CLAIM = (
    "In filter-normalised loss landscapes, small-batch SGD reaches flatter minima than large-batch training, "
    "layer-wise noise injection flatter minima than plain GD, and a deep network with skip connections a "
    "flatter minimum than the same network without them (Li et al. 2018)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Five minima and their filter-normalised landscapes; the defaults run in about two minutes on a CPU."""

    dataset: str = "digits"  # "digits" or "mnist1d"
    n_train: int | None = 1024  # training points (None: all)
    widths: tuple[int, ...] = (64, 64)  # base MLP (small_batch, large_batch, noise)
    deep_width: int = 32  # deep MLP (deep_plain, deep_skip)
    deep_depth: int = 10  # hidden layers of the deep MLP
    steps: int = 2000  # SGD steps of every variant
    lr: float = 0.1  # SGD step of the base MLP
    deep_lr: float = 0.05  # SGD step of both deep MLPs (see the module docstring)
    small_batch: int = 32  # examples per step of small_batch (the others are full-batch)
    sigma: float = 0.05  # layer-wise noise level of ``noise``
    num_directions: int = 4  # filter-normalised directions per minimum (the first two span the surface)
    radius: float = 1.0  # slices on [-radius, radius] (1 = one filter norm)
    num_alphas: int = 41  # points of a 1-D slice
    grid: int = 25  # points per axis of the 2-D surface
    fit_radius: float = 0.2  # the parabola of the curvature is fitted on |alpha| <= fit_radius
    level: float = 0.1  # the area counts grid points within this loss of the minimum's
    comparisons: tuple[Literal[tuple(COMPARISONS)], ...] = ("batch", "noise", "skip")  # and so which variants run
    converged_loss: float = 0.05  # a "minimum" with a higher train loss has not converged: its seed is left out
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # initialisation, data order, noise and directions (5: a deep run
    # that has not converged is left out and still leaves 3 pairs or more)


PRESETS = {
    "paper": Config(
        dataset="mnist1d",
        n_train=4000,
        widths=(256, 256),
        deep_width=64,
        deep_depth=20,
        steps=20_000,
        num_directions=10,
        num_alphas=101,
        grid=51,
        seeds=(0, 1, 2),
    )
}


def prepare(cfg: Config):
    data = nets.splits(cfg.dataset, n_train=cfg.n_train, flatten=True)
    return data.train, data.test


def variants(cfg: Config) -> list[str]:
    """The variants that ``cfg.comparisons`` needs, in the order of ``VARIANTS``."""
    for c in cfg.comparisons:
        if c not in COMPARISONS:
            raise ValueError(f"comparisons must be among {tuple(COMPARISONS)}, got {c!r}")
    return [v for v in VARIANTS if any(v in COMPARISONS[c] for c in cfg.comparisons)]


def make_model(cfg: Config, variant: str) -> models.MLP:
    if variant.startswith("deep"):
        return models.MLP(
            widths=(cfg.deep_width,) * cfg.deep_depth, num_outputs=10, skip_connections=variant == "deep_skip"
        )
    return models.MLP(widths=cfg.widths, num_outputs=10)


def optimizer_fn(cfg: Config, variant: str):
    """``(sigma, seed) -> optimizer`` of ``variant`` for ``lsgeo.train.sweep``."""
    sgd = optax.sgd(cfg.deep_lr if variant.startswith("deep") else cfg.lr)
    if variant == "noise":
        return lambda sigma, seed: optim.noise_injection(sgd, sigma, mode="layerwise", seed=seed)
    return lambda sigma, seed: sgd  # sigma = 0: plain SGD


def curvature_at_zero(alphas: np.ndarray, values: np.ndarray, fit_radius: float) -> float:
    """Second derivative at 0 of the least-squares parabola through the points with |alpha| <= fit_radius."""
    near = np.abs(alphas) <= fit_radius + 1e-9
    return float(2.0 * np.polyfit(alphas[near], values[near], 2)[0])


def cells(cfg: Config) -> list[dict]:
    return [dict(variant=v, seed=s) for v in variants(cfg) for s in cfg.seeds]


def run(cfg: Config, data, group: list[dict]) -> list[list[dict]]:
    (train_batch, test_batch), variant = data, group[0]["variant"]
    model = make_model(cfg, variant)
    objective = nets.Objective(model)
    result = train.sweep(
        objective, optimizer_fn(cfg, variant), nets.init_fn(model, train_batch[0]), train_batch,
        {"sigma": [cfg.sigma if variant == "noise" else 0.0]}, [c["seed"] for c in group], num_steps=cfg.steps,
        batch_size=cfg.small_batch if variant == "small_batch" else None,
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
    params = jax.tree_util.tree_map(np.asarray, result.params)
    out = []
    for i, c in enumerate(group):
        w = jax.tree_util.tree_map(lambda p: p[0, i], params)
        keys = jax.random.split(jax.random.key(c["seed"]), cfg.num_directions)
        directions = [landscape.random_direction(w, k, normalization="filter") for k in keys]
        slices = np.stack([np.asarray(landscape.slice_1d(objective, w, train_batch, d, alphas)) for d in directions])
        surface = np.asarray(landscape.slice_2d(objective, w, train_batch, directions[0], directions[1], grid, grid))
        center, test_acc, test_loss = (float(v) for v in evaluate(w, train_batch, test_batch))
        rows = [
            dict(
                kind="minimum",
                train_loss=center,
                test_acc=test_acc,
                test_loss=test_loss,
                curvature=float(np.mean([curvature_at_zero(alphas, s, cfg.fit_radius) for s in slices])),
                area=float(np.mean(surface <= center + cfg.level)),
            )
        ]
        rows += [
            dict(kind="slice", direction=j, alpha=float(a), loss=float(slices[j, k]))
            for j in range(cfg.num_directions)
            for k, a in enumerate(alphas)
        ]
        rows += [
            dict(kind="surface", alpha=float(a), beta=float(b), loss=float(surface[j, k]))
            for j, a in enumerate(grid)
            for k, b in enumerate(grid)
        ]
        out.append(rows)
    return out


def minimum(rows: list[dict], variant: str, seed: int) -> dict:
    return records.select(rows, variant=variant, seed=seed, kind="minimum")[0]


def roughness(rows: list[dict], variant: str, seed: int) -> float:
    """The fraction of the points of the 1-D slices around a minimum where the slice bends down (a negative
    second difference beyond rounding): 0 for a convex bowl, large for a chaotic landscape (Li et al.'s
    "smoother"), averaged over the directions."""
    out = []
    for j in sorted({r["direction"] for r in records.select(rows, variant=variant, seed=seed, kind="slice")}):
        sel = records.select(rows, variant=variant, seed=seed, kind="slice", direction=j)
        sel = sorted(sel, key=lambda r: r["alpha"])
        loss = np.array([r["loss"] for r in sel])
        d2 = loss[2:] - 2 * loss[1:-1] + loss[:-2]
        out.append(float(np.mean(d2 < -1e-6 * np.max(np.abs(loss)))))
    return float(np.mean(out))


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    table, figures = [], {}
    for v in variants(cfg):
        ms = [minimum(rows, v, s) for s in cfg.seeds]
        entry = dict(
            variant=v,
            **{k: float(np.mean([m[k] for m in ms])) for k in ("train_loss", "test_acc", "curvature", "area")},
        )
        table.append(entry)
        figures.update({f"{v}_{k}": entry[k] for k in ("curvature", "area", "train_loss", "test_acc")})
    for v in variants(cfg):
        figures[f"{v}_roughness"] = float(np.mean([roughness(rows, v, k) for k in cfg.seeds]))
    gains, reasons = {}, []
    for name in cfg.comparisons:
        flat, sharp = COMPARISONS[name]
        # a pair counts only when both minima converged (a run stuck at a high loss is no minimum to compare)
        seeds = [
            k for k in cfg.seeds if all(minimum(rows, v, k)["train_loss"] <= cfg.converged_loss for v in (flat, sharp))
        ]
        left_out = [k for k in cfg.seeds if k not in seeds]
        curvature = {v: records.per_seed(rows, "curvature", seeds, variant=v, kind="minimum") for v in (flat, sharp)}
        gains[name] = verdicts.paired_gain(curvature[sharp], curvature[flat])
        figures[f"{name}_curvature_ratio"] = float(
            np.divide(figures[f"{sharp}_curvature"], figures[f"{flat}_curvature"])
        )
        figures[f"{name}_area_ratio"] = float(np.divide(figures[f"{flat}_area"], figures[f"{sharp}_area"]))
        figures[f"{name}_curvature_gap"], figures[f"{name}_curvature_gap_se"] = gains[name].mean, gains[name].se
        figures[f"{name}_converged_pairs"] = len(seeds)
        reasons.append(
            gains[name].describe(f"{name}: curvature of {sharp} minus {flat}")
            + f" (train loss {figures[f'{sharp}_train_loss']:.2g} vs {figures[f'{flat}_train_loss']:.2g}"
            + (f"; seeds {left_out} left out, train loss > {cfg.converged_loss:g})" if left_out else ")")
        )
        if name == "skip":  # "a flatter, smoother landscape": smoothness is a part of its own
            rough = {v: np.array([roughness(rows, v, k) for k in seeds]) for v in (flat, sharp)}
            gains["skip_smoother"] = verdicts.paired_gain(rough[sharp], rough[flat])
            reasons.append(gains["skip_smoother"].describe(
                f"skip: roughness (fraction of slice points bending down) of {sharp} minus {flat}"))
    supported = verdicts.combine(gains)
    reasons.append(verdicts.combine_reason(gains))
    return experiment.Verdict(supported, figures, table, "; ".join(reasons))


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt, seed = plots.plt, cfg.seeds[0]
    surfaces = {}
    for v in variants(cfg):
        sel = records.select(rows, variant=v, seed=seed, kind="surface")
        grid = np.array(sorted({r["alpha"] for r in sel}))
        surfaces[v] = np.log10(np.maximum([r["loss"] for r in sel], 1e-12)).reshape(grid.size, grid.size)
    low, high = min(z.min() for z in surfaces.values()), max(z.max() for z in surfaces.values())
    levels = np.linspace(low, high, 25)  # shared by every panel: equal spacing = equal flatness
    fig, axes = plt.subplots(1, len(surfaces) + 1, figsize=(4.2 * len(surfaces) + 1, 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * len(surfaces) + [0.06]})  # fmt: skip
    axes, cax = axes[0][:-1], axes[0][-1]
    for ax, v in zip(axes, surfaces):
        cs = ax.contourf(grid, grid, surfaces[v], levels=levels, cmap="viridis")
        ax.contour(grid, grid, surfaces[v], levels=levels[::4], colors="white", linewidths=0.5)
        ax.plot(0, 0, "r*")
        m = minimum(rows, v, seed)
        ax.set(title=f"{v}\ncurv {m['curvature']:.3g}, area {m['area']:.2f}", xlabel="beta (d2)", aspect="equal")
    axes[0].set_ylabel("alpha (d1)")
    fig.colorbar(cs, cax=cax, label="log10 training loss (same levels in every panel)")
    fig.suptitle(f"log10 training loss on filter-normalised planes (seed {seed})")
    figures = {"surfaces.png": fig}

    fig, axes = plt.subplots(1, len(cfg.comparisons), figsize=(5 * len(cfg.comparisons), 4), squeeze=False)
    for ax, name in zip(axes[0], cfg.comparisons):
        pair = COMPARISONS[name]
        for v, color in zip(pair, ("tab:blue", "tab:red")):
            for s in cfg.seeds:
                for j in range(cfg.num_directions):
                    sel = sorted(
                        records.select(rows, variant=v, seed=s, kind="slice", direction=j), key=lambda r: r["alpha"]
                    )
                    ax.plot(
                        [r["alpha"] for r in sel],
                        [r["loss"] for r in sel],
                        color=color,
                        alpha=0.5,
                        lw=1,
                        label=v if (s, j) == (seed, 0) else None,
                    )
        ax.set(yscale="log", xlabel="alpha (filter-normalised)", ylabel="training loss", title=f"1-D slices: {name}")
        ax.legend()
    figures["slices.png"] = fig

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, v in enumerate(surfaces):
        ms = [minimum(rows, v, s) for s in cfg.seeds]
        ok = [m["train_loss"] <= cfg.converged_loss for m in ms]
        curv = np.array([m["curvature"] for m in ms])
        ax.scatter(np.full(len(curv), i)[ok], curv[ok], color=f"C{i}", zorder=3)
        ax.scatter(np.full(len(curv), i)[~np.array(ok)], curv[~np.array(ok)], facecolors="none", edgecolors=f"C{i}",
                   zorder=3, label="not converged (left out)" if not all(ok) else None)  # fmt: skip
        ax.plot([i - 0.25, i + 0.25], [np.exp(np.mean(np.log(curv)))] * 2, color=f"C{i}", lw=2)
    ax.set_xticks(range(len(surfaces)), list(surfaces))
    ax.set(yscale="log", ylabel="curvature of the 1-D slices at 0 (lower = flatter)",
           title="flatness per minimum (line: geometric mean, dots: seeds)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    figures["flatness.png"] = fig
    return figures


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
