"""Noise injection in deep ReLU MLPs, narrow and wide (Orvieto et al., AISTATS 2023, Figure 4).

Claim: with 5 hidden ReLU layers, layer-wise noise injection gives the best test accuracy of GD,
GD+noise and GD+noise (layer), and the regulariser it adds, the Gauss-Newton trace
tr(D2L DPhi DPhi^T) (Section 4, Eq. 11), is smallest for the best-performing method.

Setup (paper): the data of Figure 3 (1024 Fashion-MNIST training points), MLPs with 5 hidden
layers of width 1000 (narrow, lr 0.005) and 5000 (wide, lr 0.001), full-batch GD, sigma = 0.05
(GD+noise (layer): std sigma sqrt(M) on one of the M = 6 layers per step).
Default (CPU): MNIST-1D, widths 32 and 128, lr 0.1 and 0.05 (larger than the paper's so that about a
thousand CPU steps train), 1200 steps, 2 seeds. Recorded at the clean iterate: test accuracy, test
loss and the exact Gauss-Newton trace on the training data.

Verdict (at the widest width, final evaluation, mean over seeds): supported if layer-wise noise
beats GD by more than 2 standard errors and is not below GD+noise; false if it does not beat GD;
null otherwise (or with a single seed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import optax

from experiments import _methods, _runner
from lsgeo import data as data_lib
from lsgeo import models


@dataclasses.dataclass(frozen=True)
class Config:
    """Figure 4: test accuracy and Gauss-Newton trace of 5-hidden-layer MLPs, narrow and wide."""

    dataset: str = "mnist1d"  # any lsgeo.data classification set ("fashion_mnist": paper)
    n_train: int = 1024  # training points (fixed subsample)
    n_test: int | None = None  # test points (None: all)
    depth: int = 5  # hidden layers
    widths: tuple[int, ...] = (32, 128)  # narrow and wide hidden width
    lrs: tuple[float, ...] = (0.1, 0.05)  # GD step size for each width (paper: 0.005, 0.001)
    sigma: float = 0.05  # noise level
    steps: int = 1200  # GD steps
    eval_every: int = 200  # steps between evaluations (each computes the Gauss-Newton trace)
    methods: tuple[str, ...] = _methods.METHODS
    seeds: tuple[int, ...] = (0, 1)  # initialisation and noise seeds


PAPER = Config(dataset="fashion_mnist", n_test=10_000, widths=(1000, 5000), lrs=(0.005, 0.001), steps=20_000,
               eval_every=1000, seeds=(0, 1, 2))


def prepare(cfg: Config):
    if len(cfg.widths) != len(cfg.lrs):
        raise ValueError(f"widths and lrs must have the same length, got {cfg.widths} and {cfg.lrs}")
    return data_lib.load_dataset(cfg.dataset, n_train=cfg.n_train, n_test=cfg.n_test, seed=0, flatten=True)


def cells(cfg: Config) -> list[dict]:
    return [c for w in cfg.widths for c in _methods.method_cells(cfg.methods, (cfg.sigma,), cfg.seeds, width=w)]


def run(cfg: Config, ds, group: list[dict]) -> list[list[dict]]:
    width = group[0]["width"]
    model = models.MLP(widths=(width,) * cfg.depth, num_outputs=ds.num_classes)
    task = _methods.classification_task(model, ds, gn_trace=True)
    return _methods.train_cells(
        task.objective, task.init_params, task.data, group, inner=optax.sgd(cfg.lrs[cfg.widths.index(width)]),
        num_steps=cfg.steps, eval_every=cfg.eval_every, eval_fn=task.eval_fn, eval_data=task.eval_data,
    )  # fmt: skip


def _final(cfg, rows, width, method, key):
    return _runner.mean_se([r[key] for r in _runner.select(rows, width=width, method=method, step=cfg.steps)])


def summarize(cfg: Config, rows: list[dict]) -> _runner.Verdict:
    figures, table = {}, []
    for w in cfg.widths:
        for m in cfg.methods:
            acc, se = _final(cfg, rows, w, m, "test_acc")
            trace, _ = _final(cfg, rows, w, m, "gn_trace")
            figures[f"acc_w{w}_{m}"] = acc
            figures[f"acc_se_w{w}_{m}"] = se
            figures[f"gn_trace_w{w}_{m}"] = trace
            table.append({"width": w, "method": _methods.LABELS[m], "test_acc": acc, "se": se, "gn_trace": trace,
                          "train_loss": _final(cfg, rows, w, m, "train_loss")[0]})
    supported = None
    w = max(cfg.widths)
    if set(_methods.METHODS) <= set(cfg.methods):
        gain = figures[f"acc_w{w}_layer"] - figures[f"acc_w{w}_gd"]
        se = float(np.hypot(figures[f"acc_se_w{w}_layer"], figures[f"acc_se_w{w}_gd"]))
        figures[f"layer_gain_w{w}"], figures[f"layer_gain_se_w{w}"] = gain, se
        best = gain > 2 * se and figures[f"acc_w{w}_layer"] >= figures[f"acc_w{w}_noise"] and len(cfg.seeds) > 1
        supported = False if gain <= 0 else (True if best else None)
    return _runner.Verdict(supported, figures, table)


def plot(cfg: Config, rows: list[dict], out_dir: Path) -> None:
    plt = _runner.plt
    fig, axes = plt.subplots(2, len(cfg.widths), figsize=(5 * len(cfg.widths), 7), squeeze=False, sharex=True)
    for col, w in enumerate(cfg.widths):
        for row, (key, name) in enumerate((("test_acc", "test accuracy"), ("gn_trace", "Gauss-Newton trace"))):
            ax = axes[row, col]
            for m in cfg.methods:
                rs = _runner.select(rows, width=w, method=m)
                steps = sorted({r["step"] for r in rs})
                ax.plot(steps, [np.mean([r[key] for r in rs if r["step"] == t]) for t in steps],
                        color=_methods.COLORS[m], label=_methods.LABELS[m])
            ax.set(ylabel=name, title=f"{cfg.depth} x {w}, lr {cfg.lrs[col]:g}, sigma {cfg.sigma:g}")
            if row == 1:
                ax.set(xlabel="GD step", yscale="log")
        axes[0, col].legend()
    _runner.save_figure(fig, out_dir / "deep_mlp.png")


EXPERIMENT = _runner.Experiment(
    name="deep_mlp",
    claim="In deep (5 hidden layers) ReLU MLPs, layer-wise noise injection gives the best test accuracy of "
    "GD, GD+noise and GD+noise (layer), with the smallest Gauss-Newton trace (Figure 4).",
    config=Config,
    presets={"paper": PAPER},
    prepare=prepare,
    cells=cells,
    run=run,
    summarize=summarize,
    plot=plot,
    batch_over=("sigma", "seed"),
)

if __name__ == "__main__":
    _runner.main(EXPERIMENT)
