"""Noise injection in small convolutional networks without normalisation (Figure 5).

Claim (Orvieto et al., AISTATS 2023, Figure 5): beyond the theory, with SGD (batch 1024) on
CIFAR-10, layer-wise noise injection still improves on plain SGD in a toy CNN (2 conv layers with 5
channels, then an MLP) and in a wider fully convolutional net (4 conv layers with 128 channels, one
linear layer), less markedly than for MLPs; the Hessian trace of the wide net decreases a little
with noise but oscillates around 0.

Setup (paper preset): CIFAR-10 from local files, full training set, minibatch SGD with batch 1024,
``lsgeo.models.ToyCNN`` and ``lsgeo.models.WideConvNet`` (width 128).
Default (CPU): scikit-learn's 8x8 digits as images (1300 train / 497 test), batch 256, WideConvNet of
width 16, 400 steps, lr 0.05, sigma 0.05, 2 seeds. Recorded at the clean iterate: test accuracy and
a Hutchinson estimate of the Hessian trace of the training loss (``lsgeo.curvature.hessian_trace``,
on ``trace_examples`` training points, ``trace_probes`` Rademacher probes).

Verdict (per architecture, final evaluation, mean over seeds): supported if layer-wise noise beats
SGD by more than 2 standard errors on the wide net; false if it does not beat SGD; null otherwise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import optax

from experiments import _methods, _runner
from lsgeo import curvature, models
from lsgeo import data as data_lib

ARCHS = ("toy", "wide")


@dataclasses.dataclass(frozen=True)
class Config:
    """Figure 5: toy CNN and wide fully convolutional net with SGD, with and without noise."""

    dataset: str = "digits"  # "cifar10" (paper) or any image set of lsgeo.data
    n_train: int | None = None  # training points (None: all)
    n_test: int | None = None  # test points (None: all)
    archs: tuple[str, ...] = ARCHS  # "toy": ToyCNN (5 channels), "wide": WideConvNet
    toy_channels: int = 5  # channels of the toy CNN
    wide_width: int = 16  # channels of the wide net (paper: 128)
    batch_size: int = 256  # SGD batch (paper: 1024)
    lr: float = 0.05  # SGD step size
    steps: int = 400  # SGD steps
    eval_every: int = 100  # steps between evaluations
    sigmas: tuple[float, ...] = (0.05,)  # noise levels
    trace_examples: int = 256  # training points for the Hessian trace
    trace_probes: int = 2  # Hutchinson probes
    methods: tuple[str, ...] = _methods.METHODS
    members_per_chunk: int | None = 1  # runs vmapped at once (None: all); on CPU 1, since XLA:CPU runs the
    # grouped convolutions of vmapped kernels slowly
    seeds: tuple[int, ...] = (0, 1)  # initialisation, batch order and noise seeds


PAPER = Config(dataset="cifar10", wide_width=128, batch_size=1024, lr=0.05, steps=20_000, eval_every=1000,
               sigmas=(0.01, 0.05, 0.1), trace_examples=1024, trace_probes=32, members_per_chunk=None,
               seeds=(0, 1, 2))


def prepare(cfg: Config):
    return data_lib.load_dataset(cfg.dataset, n_train=cfg.n_train, n_test=cfg.n_test, seed=0, flatten=False)


def cells(cfg: Config) -> list[dict]:
    return [c for a in cfg.archs for c in _methods.method_cells(cfg.methods, cfg.sigmas, cfg.seeds, arch=a)]


def _model(cfg: Config, arch: str, num_classes: int):
    if arch == "toy":
        return models.ToyCNN(num_classes=num_classes, channels=cfg.toy_channels)
    if arch == "wide":
        return models.WideConvNet(num_classes=num_classes, width=cfg.wide_width)
    raise ValueError(f"archs must be among {ARCHS}, got {arch!r}")


def run(cfg: Config, ds, group: list[dict]) -> list[list[dict]]:
    task = _methods.classification_task(_model(cfg, group[0]["arch"], ds.num_classes), ds)
    trace_batch = jax.tree_util.tree_map(lambda a: a[: cfg.trace_examples], task.data)

    def eval_fn(params, eval_data):
        trace = curvature.hessian_trace(task.objective, params, eval_data["trace"], jax.random.key(0),
                                        num_probes=cfg.trace_probes)
        return {**task.eval_fn(params, eval_data), "hessian_trace": trace}

    return _methods.train_cells(
        task.objective, task.init_params, task.data, group, inner=optax.sgd(cfg.lr), num_steps=cfg.steps,
        eval_every=cfg.eval_every, batch_size=cfg.batch_size, eval_fn=eval_fn,
        eval_data={**task.eval_data, "trace": trace_batch}, members_per_chunk=cfg.members_per_chunk,
    )  # fmt: skip


def _final(cfg, rows, **fields):
    return _runner.mean_se([r["test_acc"] for r in _runner.select(rows, step=cfg.steps, **fields)])


def summarize(cfg: Config, rows: list[dict]) -> _runner.Verdict:
    figures, table = {}, []
    for a in cfg.archs:
        for m in cfg.methods:
            for s in (0.0,) if m == "gd" else cfg.sigmas:
                acc, se = _final(cfg, rows, arch=a, method=m, sigma=s)
                trace = float(np.mean([r["hessian_trace"] for r in _runner.select(rows, arch=a, method=m, sigma=s, step=cfg.steps)]))
                figures[f"acc_{a}_{m}_sigma={s:g}"] = acc
                figures[f"hessian_trace_{a}_{m}_sigma={s:g}"] = trace
                table.append({"arch": a, "method": _methods.LABELS[m], "sigma": s, "test_acc": acc, "se": se,
                              "hessian_trace": trace})
    supported = None
    if "wide" in cfg.archs and {"gd", "layer"} <= set(cfg.methods):
        gd, gd_se = _final(cfg, rows, arch="wide", method="gd")
        best = max(cfg.sigmas, key=lambda s: _final(cfg, rows, arch="wide", method="layer", sigma=s)[0])
        acc, se = _final(cfg, rows, arch="wide", method="layer", sigma=best)
        gain, gain_se = acc - gd, float(np.hypot(se, gd_se))
        figures.update(wide_layer_best_sigma=best, wide_layer_gain=gain, wide_layer_gain_se=gain_se)
        supported = False if gain <= 0 else (True if gain > 2 * gain_se and len(cfg.seeds) > 1 else None)
    return _runner.Verdict(supported, figures, table)


def plot(cfg: Config, rows: list[dict], out_dir: Path) -> None:
    plt = _runner.plt
    fig, axes = plt.subplots(2, len(cfg.archs), figsize=(5 * len(cfg.archs), 7), squeeze=False, sharex=True)
    for col, a in enumerate(cfg.archs):
        for row, (key, name) in enumerate((("test_acc", "test accuracy"), ("hessian_trace", "Hessian trace"))):
            ax = axes[row, col]
            for m in cfg.methods:
                for i, s in enumerate((0.0,) if m == "gd" else cfg.sigmas):
                    rs = _runner.select(rows, arch=a, method=m, sigma=s)
                    steps = sorted({r["step"] for r in rs})
                    ax.plot(steps, [np.mean([r[key] for r in rs if r["step"] == t]) for t in steps],
                            color=_methods.COLORS[m], alpha=1.0 - 0.25 * i,
                            label=_methods.LABELS[m] + ("" if m == "gd" else f", sigma={s:g}"))
            ax.set(ylabel=name, title=f"{a} ({cfg.dataset})")
            if row == 1:
                ax.set_xlabel("SGD step")
        axes[0, col].legend(fontsize=7)
    _runner.save_figure(fig, out_dir / "cnn.png")


EXPERIMENT = _runner.Experiment(
    name="cnn",
    claim="Layer-wise noise injection improves the test accuracy of SGD-trained convolutional networks "
    "without normalisation, less markedly than for MLPs (Figure 5).",
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
