"""Mode connectivity: two minima joined by a straight line and by a trained quadratic Bezier curve.

Claim (Garipov et al. 2018; Draxler et al. 2018): minima that training reaches from different
initialisations are not isolated: a simple curve (here a quadratic Bezier curve with one trained
control point) joins them along which the training loss stays near-constant and low, while the
straight line between them crosses a loss barrier.

Setup: a ReLU MLP (``arch="mlp"``) or a ResNet with BatchNorm (``arch="resnet"``) on scikit-learn
digits (or MNIST-1D), softmax cross-entropy. Pair s trains two minima a, b from the initialisation
seeds 2s and 2s + 1 with full-batch Adam (both in one vmapped ``lsgeo.train.sweep``). The control
point theta of the curve phi(t) = (1-t)^2 a + 2t(1-t) theta + t^2 b is fitted by Adam on
E_{t~U(0,1)} R(phi(t)) over the whole training set (``lsgeo.landscape.fit_bezier``, starting at the
midpoint of the line). Along both paths on ``num_points`` equally spaced t in [0, 1]
(``lsgeo.landscape.path_losses``): training loss, test loss and test accuracy.

BatchNorm: a point on a path has no running statistics of its own (Garipov et al., Section 5). The
training loss along a path, and the curve fit, use training mode on the whole training set, i.e. the
exact population statistics at that point; test loss and accuracy use evaluation mode with the
statistics recomputed at that point on the training inputs (``lsgeo.models.recompute_batch_stats``,
``nets.Objective(stats=...)``): the same statistics.

Barrier (``lsgeo.landscape.barrier_height``, reference "max"): max_t R(path(t)) - max(R(a), R(b)) on
the training loss, on the same grid of t. Verdict (``discrimination.judge``), two parts, each deterministic on
every pair (3 by default; null with fewer, since one pair speaks for one pair of minima only) and beside its
negative control, which must fail: ``line``: the line's barrier is at least ``min_line_barrier`` (control: the same
test on the trained curve); ``curve``: the trained curve's barrier is at most ``max_curve_fraction`` of the line's
(control: a Bezier curve whose control point is the line's midpoint moved by a random direction of the trained
bend's size, ``random_bend``: curved, but not trained). False when a pair fails a part. The ``paper`` preset is larger (wider network, more steps, several pairs), not Garipov et
al.'s CIFAR ResNets, which need a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli, discrimination, experiment, nets, plots, records, verdicts
from lsgeo import landscape, train

PATHS = ("line", "curve", "random_bend")
COLORS = {"line": "tab:red", "curve": "tab:blue", "random_bend": "tab:gray"}
LABELS = {"line": "straight line", "curve": "trained Bezier curve",
          "random_bend": "Bezier, random bend of the trained size (control)"}  # fmt: skip

CLAIM = (
    "Minima found from different initialisations are connected by a simple curve (a quadratic Bezier curve) "
    "of near-constant low training loss, while the straight line between them crosses a loss barrier "
    "(Garipov et al. 2018, Section 3 and Figure 1; Draxler et al. 2018): for every pair the line's barrier is at "
    "least min_line_barrier and the trained curve's at most max_curve_fraction of it, where a random bend of the same "
    "size does not reach that."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Two minima per pair, their line and their fitted Bezier curve; the defaults run in about a minute on a CPU."""

    dataset: str = "digits"  # "digits" or "mnist1d" (arch "resnet": an image set, e.g. digits)
    n_train: int | None = None  # training points (None: all; digits has 1300)
    arch: Literal[nets.ARCHS] = "mlp"  # "mlp" or "resnet" (BatchNorm: statistics recomputed along the paths)
    widths: tuple[int, ...] = (64, 64)  # hidden widths of the ReLU MLP
    resnet_width: int = 4  # base width of the ResNet
    stage_sizes: tuple[int, ...] = (1, 1, 1, 1)  # BasicBlocks per stage of the ResNet
    steps: int = 1000  # full-batch Adam steps per minimum
    lr: float = 1e-2
    curve_steps: int = 600  # Adam steps of the Bezier fit
    curve_lr: float = 1e-2
    curve_num_t: int = 8  # points t ~ U(0, 1) per step of the fit
    num_points: int = 21  # t grid on which both paths are evaluated (end points included)
    min_line_barrier: float = 0.1  # the line must climb at least this far above the worse end point
    max_curve_fraction: float = 0.1  # the curve's barrier may be at most this fraction of the line's
    seeds: tuple[int, ...] = (0, 1, 2)  # pair s joins the minima trained from the initialisation seeds 2s and 2s + 1


PRESETS = {
    "paper": Config(
        dataset="mnist1d", n_train=4000, widths=(256, 256), steps=5000, curve_steps=5000, num_points=61, seeds=(0, 1, 2)
    )
}


def cells(cfg: Config) -> list[dict]:
    nets.check_arch(cfg.arch)
    return [dict(seed=s) for s in cfg.seeds]


def prepare(cfg: Config) -> nets.Splits:
    return nets.splits(cfg.dataset, n_train=cfg.n_train, flatten=cfg.arch == "mlp")


def run(cfg: Config, data: nets.Splits, group: list[dict]) -> list[list[dict]]:
    net = nets.Net.of(cfg, data)
    init_seeds = [k for c in group for k in (2 * c["seed"], 2 * c["seed"] + 1)]
    result = train.sweep(
        net.train_objective,
        lambda seed: optax.adam(cfg.lr),
        net.init,
        data.train,
        {},
        init_seeds,
        num_steps=cfg.steps,
        model_state=net.init_state,
    )
    minima = jax.tree_util.tree_map(lambda p: np.asarray(p)[0], (result.params, result.model_state))
    ts = jnp.linspace(0.0, 1.0, cfg.num_points)
    train_loss = nets.Objective(net.model, stats="batch")
    test = {
        "test_loss": nets.Objective(net.model, stats="recompute"),
        "test_acc": nets.Objective(net.model, "accuracy", stats="recompute"),
    }
    out = []
    for i, c in enumerate(group):
        (a, state), (b, _) = (jax.tree_util.tree_map(lambda p, j=j: p[j], minima) for j in (2 * i, 2 * i + 1))
        train_batch = (*data.train, state) if net.batch_norm else data.train
        test_batch = (*data.test, state, data.train[0]) if net.batch_norm else data.test
        bend, _ = landscape.fit_bezier(
            train_loss,
            a,
            b,
            train_batch,
            jax.random.key(c["seed"]),
            optimizer=optax.adam(cfg.curve_lr),
            num_steps=cfg.curve_steps,
            num_t=cfg.curve_num_t,
        )
        rows = []
        for path, path_bend in (("line", None), ("curve", bend), ("random_bend", random_bend(a, b, bend, c["seed"]))):
            barrier = landscape.barrier_height(train_loss, a, b, train_batch, bend=path_bend, num_points=cfg.num_points)
            values = {"train_loss": landscape.path_losses(train_loss, a, b, train_batch, ts, bend=path_bend)}
            values.update(
                {
                    k: landscape.path_losses(f, a, b, test_batch, ts, bend=path_bend, points_per_pass=4)
                    for k, f in test.items()
                }
            )
            rows += [
                dict(path=path, t=float(t), barrier=float(barrier), **{k: float(v[j]) for k, v in values.items()})
                for j, t in enumerate(np.asarray(ts))
            ]
        out.append(rows)
    return out


def random_bend(a, b, bend, seed: int):
    """The control point of the control curve: the line's midpoint moved by a random Gaussian direction scaled to
    the trained bend's distance from that midpoint. A curve that leaves the line by the same distance, but in no
    trained direction: if it avoids the barrier too, "a trained curve avoids it" tests nothing."""
    mid = jax.tree_util.tree_map(lambda x, y: (x + y) / 2, a, b)
    offset = jax.tree_util.tree_map(jnp.subtract, bend, mid)
    direction = optax.tree.random_like(jax.random.key(10_000 + seed), mid, jax.random.normal)
    scale = optax.tree.norm(offset) / optax.tree.norm(direction)
    return jax.tree_util.tree_map(lambda m, d: m + scale * d, mid, direction)


def accuracy_drop(rows: list[dict]) -> float:
    """min(acc(0), acc(1)) - min_t acc(t): how far the test accuracy falls below the worse end point."""
    acc = [r["test_acc"] for r in sorted(rows, key=lambda r: r["t"])]
    return min(acc[0], acc[-1]) - min(acc)


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    table = []
    for s in cfg.seeds:
        paths = {p: sorted(records.select(rows, seed=s, path=p), key=lambda r: r["t"]) for p in PATHS}
        line, curve = paths["line"], paths["curve"]
        entry = dict(
            pair=s,
            loss_a=line[0]["train_loss"],
            loss_b=line[-1]["train_loss"],
            acc_a=line[0]["test_acc"],
            acc_b=line[-1]["test_acc"],
            line_barrier=line[0]["barrier"],
            curve_barrier=curve[0]["barrier"],
            line_acc_drop=accuracy_drop(line),
            curve_acc_drop=accuracy_drop(curve),
        )
        if paths["random_bend"]:
            entry["random_bend_barrier"] = paths["random_bend"][0]["barrier"]
        table.append(entry)
    low = lambda barrier, e: barrier <= cfg.max_curve_fraction * e["line_barrier"]  # noqa: E731
    claim = {"line": all(e["line_barrier"] >= cfg.min_line_barrier for e in table),
             "curve": all(low(e["curve_barrier"], e) for e in table)}  # fmt: skip
    control = {"line": all(e["curve_barrier"] >= cfg.min_line_barrier for e in table),
               "curve": all(low(e["random_bend_barrier"], e) for e in table) if "random_bend_barrier" in table[0]
               else None}  # fmt: skip
    parts = {
        "line": discrimination.Part(claim["line"], control["line"], "the same barrier test on the trained curve "
                                    "(a path the claim says has no barrier)"),  # fmt: skip
        "curve": discrimination.Part(claim["curve"], control["curve"], "a Bezier curve with a random bend of the "
                                     "trained bend's size (curved, but not trained)"),  # fmt: skip
    }
    judgement = discrimination.judge(parts)
    figures = {k: float(np.mean([e[k] for e in table])) for k in table[0] if k != "pair"}
    figures["max_curve_barrier"] = max(e["curve_barrier"] for e in table)
    figures["min_line_barrier"] = min(e["line_barrier"] for e in table)
    reason = (
        f"line barrier {figures['min_line_barrier']:.3g} (min over {len(table)} pairs; needs >= "
        f"{cfg.min_line_barrier:g}), curve barrier {figures['max_curve_barrier']:.3g} (max; needs <= "
        f"{cfg.max_curve_fraction:g} x line's); each pair is deterministic: all must pass"
    )
    if "random_bend_barrier" in table[0]:
        figures["min_random_bend_barrier"] = min(e["random_bend_barrier"] for e in table)
        reason += (f"; control: random bend of the trained size, barrier {figures['min_random_bend_barrier']:.3g} "
                   f"(min over pairs; must exceed {cfg.max_curve_fraction:g} x the line's in some pair)")  # fmt: skip
    reason += "; " + judgement.reason + "; " + POWER_TEXT.format(line=cfg.min_line_barrier, frac=cfg.max_curve_fraction)
    supported = judgement.supported
    if control["curve"] is None and supported is True:
        supported, reason = None, f"no control curve in the rows: cannot tell whether the test discriminates; {reason}"
    if len(table) < verdicts.MIN_SEEDS and supported:
        supported, reason = None, f"{len(table)} pair(s) of minima: too few to speak of minima in general; {reason}"
    garipov = "Garipov et al. 2018, Figure 1 / Table 1: line barriers of order 1 in train loss, curve barriers near 0"
    power = {"line": discrimination.Power(cfg.min_line_barrier, 1.0, " (train loss)", garipov, "tolerance"),
             "curve": discrimination.Power(cfg.max_curve_fraction, None, " (of the line's barrier)", garipov,
                                                   "tolerance")}  # fmt: skip
    return experiment.Verdict(supported, figures, table, reason, judgement.controls,
                              {n: p.record() for n, p in power.items()})  # fmt: skip


POWER_TEXT = (
    "power: deterministic checks per pair (no sampling noise), resolved to the thresholds: a line barrier >= {line:g} "
    "(Garipov et al. 2018, Figure 1 / Table 1: line barriers of order 1 in train loss, curve barriers near 0) and a "
    "curve barrier <= {frac:g} x the line's"
)


def plot(cfg: Config, rows: list[dict]) -> dict:
    fig, axes = plots.plt.subplots(1, 4, figsize=(21, 4.8))
    keys = (("train_loss", "train loss", 1.0), ("test_loss", "test loss", 1.0), ("test_acc", "test accuracy (%)", 100.0))
    for path in PATHS:
        runs = [sorted(records.select(rows, seed=s, path=path), key=lambda r: r["t"]) for s in cfg.seeds]
        if not runs[0]:
            continue
        ts = [r["t"] for r in runs[0]]
        for ax, (key, _, scale) in zip(axes, keys):
            values = scale * np.array([[r[key] for r in run] for run in runs])
            ax.plot(ts, values.mean(0), "o-", ms=3, color=COLORS[path], label=f"{LABELS[path]} (mean over pairs)")
            ax.fill_between(ts, values.min(0), values.max(0), color=COLORS[path], alpha=0.2, lw=0)
    for ax, (_, name, _) in zip(axes, keys):
        ax.set(xlabel="t  (0: minimum a, 1: minimum b)", ylabel=f"{name} (band: min-max over pairs)")
    axes[0].set_yscale("log")  # the line climbs over decades above the minima
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"{cfg.dataset}, {cfg.arch}: line vs Bezier curve", fontsize=10)
    table = summarize(cfg, rows).table
    for i, key in enumerate(("line_barrier", "curve_barrier", "random_bend_barrier")):
        values = [max(e[key], 1e-6) for e in table if key in e]
        axes[3].plot([i] * len(values), values, "o", color=COLORS[PATHS[i]], ms=7)
    line = np.array([e["line_barrier"] for e in table])
    axes[3].axhline(cfg.min_line_barrier, color="tab:red", ls=":", label=f"line must be >= {cfg.min_line_barrier:g}")
    axes[3].axhline(cfg.max_curve_fraction * line.min(), color="tab:blue", ls=":",
                    label=f"curve must be <= {cfg.max_curve_fraction:g} x line (smallest pair's)")  # fmt: skip
    axes[3].set_xticks(range(3), ["line", "trained curve", "random bend\n(control)"])
    axes[3].set(yscale="log", ylabel="barrier (train loss; values < 1e-6 drawn at 1e-6)",
                title="judged: barrier per pair of minima")  # fmt: skip
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    return {"paths.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
