"""Mode connectivity: two minima joined by a straight line and by a trained quadratic Bezier curve.

Claim (Garipov et al. 2018; Draxler et al. 2018): minima that training reaches from different
initialisations are not isolated: a simple curve (here a quadratic Bezier curve with one trained
control point) joins them along which the training loss stays near-constant and low, while the
straight line between them crosses a loss barrier.

Setup: a ReLU MLP (``lsgeo.models.MLP``) on scikit-learn digits (or MNIST-1D), softmax
cross-entropy. Pair s trains two minima a, b from the initialisation seeds 2s and 2s + 1 with
full-batch Adam (both in one vmapped ``lsgeo.train.sweep``). The control point theta of the curve
phi(t) = (1-t)^2 a + 2t(1-t) theta + t^2 b is fitted by Adam on E_{t~U(0,1)} R(phi(t)) over the whole
training set (``lsgeo.landscape.fit_bezier``, starting at the midpoint of the line). Along both paths
on ``num_points`` equally spaced t in [0, 1] (``lsgeo.landscape.path_losses``; the line is evaluated
as the Bezier curve bent at the midpoint (a + b) / 2, which it equals): training loss, test loss and
test accuracy.

Barrier (``lsgeo.landscape.barrier_height``, reference "max"): max_t R(path(t)) - max(R(a), R(b)) on
the training loss; it is computed from the stored path, i.e. on the same grid of t.
Verdict: supported when, for every pair, the line's barrier exceeds ``min_line_barrier`` and the
curve's barrier is at most ``max_curve_fraction`` of it; false otherwise.
The ``paper`` preset is larger (wider network, more steps, several pairs), not Garipov et al.'s
CIFAR ResNets, which need images and a GPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _methods, _runner
from lsgeo import landscape, models, train

PATHS = ("line", "curve")
COLORS = {"line": "tab:red", "curve": "tab:blue"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Two minima per pair, their line and their fitted Bezier curve; the defaults run in about a minute on a CPU."""

    dataset: str = "digits"  # "digits" or "mnist1d"
    n_train: int | None = None  # training points (None: all; digits has 1300)
    widths: tuple[int, ...] = (64, 64)  # hidden widths of the ReLU MLP
    steps: int = 1000  # full-batch Adam steps per minimum
    lr: float = 1e-2
    curve_steps: int = 600  # Adam steps of the Bezier fit
    curve_lr: float = 1e-2
    curve_num_t: int = 8  # points t ~ U(0, 1) per step of the fit
    num_points: int = 21  # t grid on which both paths are evaluated (end points included)
    min_line_barrier: float = 0.1  # the line must climb at least this far above the worse end point
    max_curve_fraction: float = 0.1  # the curve's barrier may be at most this fraction of the line's
    seeds: tuple[int, ...] = (0,)  # pair s joins the minima trained from the initialisation seeds 2s and 2s + 1


PAPER = Config(dataset="mnist1d", n_train=4000, widths=(256, 256), steps=5000, curve_steps=5000,
               num_points=61, seeds=(0, 1, 2))


def prepare(cfg: Config):
    return _methods.flat_data(cfg.dataset, cfg.n_train)


def make_model(cfg: Config) -> models.MLP:
    return models.MLP(widths=cfg.widths, num_outputs=10)



def cells(cfg: Config) -> list[dict]:
    return [dict(seed=s) for s in cfg.seeds]


def run(cfg: Config, data, group: list[dict]) -> list[list[dict]]:
    train_batch, test_batch = data
    model = make_model(cfg)
    loss, accuracy = _methods.Objective(model), _methods.Objective(model, "accuracy")
    init_seeds = [k for c in group for k in (2 * c["seed"], 2 * c["seed"] + 1)]
    minima = train.sweep(
        loss, lambda seed: optax.adam(cfg.lr), lambda k: model.init(k, train_batch[0][:1])["params"],
        train_batch, {}, init_seeds, num_steps=cfg.steps,
    ).params  # fmt: skip
    minima = jax.tree_util.tree_map(np.asarray, minima)
    ts = jnp.linspace(0.0, 1.0, cfg.num_points)
    out = []
    for i, c in enumerate(group):
        a, b = (jax.tree_util.tree_map(lambda p, j=j: p[0, j], minima) for j in (2 * i, 2 * i + 1))
        bend, _ = landscape.fit_bezier(loss, a, b, train_batch, jax.random.key(c["seed"]),
                                       optimizer=optax.adam(cfg.curve_lr), num_steps=cfg.curve_steps,
                                       num_t=cfg.curve_num_t)
        rows = []
        # the line is the Bezier curve bent at the midpoint: one compiled path program serves both paths
        for path, path_bend in (("line", landscape.interpolate(a, b, 0.5)), ("curve", bend)):
            values = {
                name: np.asarray(landscape.path_losses(f, a, b, batch, ts, bend=path_bend))
                for name, f, batch in (("train_loss", loss, train_batch), ("test_loss", loss, test_batch),
                                       ("test_acc", accuracy, test_batch))
            }
            rows += [dict(path=path, t=float(t), **{k: float(v[j]) for k, v in values.items()})
                     for j, t in enumerate(np.asarray(ts))]
        out.append(rows)
    return out


def barrier(rows: list[dict], key: str = "train_loss") -> float:
    """max_t value(t) - max(value(0), value(1)) of one path's rows (``landscape.barrier_height``, "max")."""
    rows = sorted(rows, key=lambda r: r["t"])
    values = [r[key] for r in rows]
    return max(values) - max(values[0], values[-1])


def accuracy_drop(rows: list[dict]) -> float:
    """min(acc(0), acc(1)) - min_t acc(t): how far the test accuracy falls below the worse end point."""
    rows = sorted(rows, key=lambda r: r["t"])
    acc = [r["test_acc"] for r in rows]
    return min(acc[0], acc[-1]) - min(acc)


def summarize(cfg: Config, rows: list[dict]) -> _runner.Verdict:
    table, ok = [], []
    for s in cfg.seeds:
        line, curve = (_runner.select(rows, seed=s, path=p) for p in PATHS)
        ends = sorted(line, key=lambda r: r["t"])
        entry = dict(pair=s, loss_a=ends[0]["train_loss"], loss_b=ends[-1]["train_loss"],
                     acc_a=ends[0]["test_acc"], acc_b=ends[-1]["test_acc"],
                     line_barrier=barrier(line), curve_barrier=barrier(curve),
                     line_acc_drop=accuracy_drop(line), curve_acc_drop=accuracy_drop(curve),
                     line_test_barrier=barrier(line, "test_loss"), curve_test_barrier=barrier(curve, "test_loss"))
        table.append(entry)
        ok.append(entry["line_barrier"] >= cfg.min_line_barrier
                  and entry["curve_barrier"] <= cfg.max_curve_fraction * entry["line_barrier"])
    figures = {k: float(np.mean([e[k] for e in table])) for k in table[0] if k != "pair"}
    figures["max_curve_barrier"] = max(e["curve_barrier"] for e in table)
    figures["min_line_barrier"] = min(e["line_barrier"] for e in table)
    return _runner.Verdict(supported=all(ok), figures=figures, table=table)


def plot(cfg: Config, rows: list[dict], out_dir: Path) -> None:
    fig, axes = _runner.plt.subplots(1, 3, figsize=(15, 4))
    for s in cfg.seeds:
        for path in PATHS:
            sel = sorted(_runner.select(rows, seed=s, path=path), key=lambda r: r["t"])
            t = [r["t"] for r in sel]
            label = path if s == cfg.seeds[0] else None
            for ax, key in zip(axes, ("train_loss", "test_loss", "test_acc")):
                ax.plot(t, [r[key] for r in sel], "o-", ms=3, color=COLORS[path], alpha=0.8, label=label)
    for ax, key in zip(axes, ("train loss", "test loss", "test accuracy")):
        ax.set(xlabel="t  (0: minimum a, 1: minimum b)", ylabel=key)
        ax.legend()
    axes[0].set_title(f"{cfg.dataset}, MLP {cfg.widths}: line vs Bezier curve")
    _runner.save_figure(fig, out_dir / "paths.png")


EXPERIMENT = _runner.Experiment(
    name="mode_connectivity",
    claim=("Minima found from different initialisations are connected by a simple curve (a quadratic Bezier curve) "
           "of near-constant low training loss, while the straight line between them crosses a loss barrier "
           "(Garipov et al. 2018; Draxler et al. 2018)."),
    config=Config,
    presets={"paper": PAPER},
    prepare=prepare,
    cells=cells,
    run=run,
    summarize=summarize,
    plot=plot,
    batch_over=("seed",),
)

if __name__ == "__main__":
    _runner.main(EXPERIMENT)
