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
256, WideConvNet of width 16, 600 steps, lr 0.05, sigma 0.05, 3 seeds. Recorded at the clean iterate:
validation and test accuracy and a Hutchinson estimate of the Hessian trace of the training loss
(``lsgeo.curvature.hessian_trace``, on ``trace_examples`` training points, ``trace_probes`` probes).

Verdict, per architecture (final evaluation): sigma chosen on the validation split; the test-accuracy
gain of SGD+noise (layer) over SGD paired over seeds (``common.paired_gain``: beyond 2 s.e. plus one
test example). Supported when it holds for both architectures, false when one is contradicted beyond
noise, null otherwise.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from experiments import common, runner
from lsgeo import curvature, models

ARCHS = ("toy", "wide")
ARCH_NAMES = {"toy": "toy CNN", "wide": "wide conv net"}

CLAIM = (
    "Layer-wise noise injection improves the test accuracy of SGD in both a toy CNN and a wider fully "
    "convolutional net without normalisation (Figure 5)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Figure 5: toy CNN and wide fully convolutional net with SGD, with and without noise."""

    dataset: str = "digits"  # "cifar10" (paper) or any image set of lsgeo.data
    n_train: int | None = None  # training points (None: all but the validation points)
    n_val: int = 300  # validation points (from the training split) on which sigma is chosen
    n_test: int | None = None  # test points (None: all)
    archs: tuple[str, ...] = ARCHS  # "toy": ToyCNN (5 channels), "wide": WideConvNet
    toy_channels: int = 5  # channels of the toy CNN
    wide_width: int = 16  # channels of the wide net (paper: 128)
    batch_size: int = 256  # SGD batch (paper: 1024)
    lr: float = 0.05  # SGD step size
    steps: int = 600  # SGD steps
    eval_every: int = 150  # steps between evaluations
    sigmas: tuple[float, ...] = (0.05,)  # noise levels
    trace_examples: int = 256  # training points for the Hessian trace
    trace_probes: int = 2  # Hutchinson probes
    methods: tuple[str, ...] = common.METHODS
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
    )
}


def cells(cfg: Config) -> list[dict]:
    for a in cfg.archs:
        if a not in ARCHS:
            raise ValueError(f"archs must be among {ARCHS}, got {a!r}")
    return [c for a in cfg.archs for c in common.method_cells(cfg.methods, cfg.sigmas, cfg.seeds, arch=a)]


def prepare(cfg: Config) -> common.Splits:
    return common.splits(cfg.dataset, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, flatten=False)


def _model(cfg: Config, arch: str, num_classes: int):
    if arch == "toy":
        return models.ToyCNN(num_classes=num_classes, channels=cfg.toy_channels)
    return models.WideConvNet(num_classes=num_classes, width=cfg.wide_width)


def run(cfg: Config, data: common.Splits, group: list[dict]) -> list[list[dict]]:
    model = _model(cfg, group[0]["arch"], data.num_classes)
    objective, evaluate = common.Objective(model), common.Evaluate(model)

    def eval_fn(params, eval_data):
        trace = curvature.hessian_trace(
            objective, params, eval_data["train"], jax.random.key(0), num_probes=cfg.trace_probes
        )
        return {**evaluate(params, eval_data), "hessian_trace": trace}

    trace_batch = jax.tree_util.tree_map(lambda a: a[: cfg.trace_examples], data.train)
    return common.train_cells(
        objective, common.init_fn(model, data.train[0]), data.train, group, inner=optax.sgd(cfg.lr),
        num_steps=cfg.steps, eval_every=cfg.eval_every, batch_size=cfg.batch_size, eval_fn=eval_fn,
        eval_data={"val": data.val, "test": data.test, "train": trace_batch}, members_per_chunk=cfg.members_per_chunk,
    )  # fmt: skip


def comparisons(cfg: Config, rows: list[dict]) -> dict[str, tuple[float, common.Gain]]:
    """{arch: (validation-best sigma, paired test-accuracy gain of SGD+noise (layer) over SGD)}."""
    if not {"gd", "layer"} <= set(cfg.methods):
        return {}
    return {a: common.compare_to_gd(rows, "layer", cfg.sigmas, cfg.seeds, cfg.steps, arch=a) for a in cfg.archs}


def summarize(cfg: Config, rows: list[dict]) -> runner.Verdict:
    table = [
        t
        for a in cfg.archs
        for t in common.method_table(
            rows,
            cfg.methods,
            cfg.sigmas,
            cfg.seeds,
            cfg.steps,
            minibatch=True,
            keys=("test_acc", "val_acc", "hessian_trace"),
            arch=a,
        )
    ]
    grid = [(a, m, s) for a in cfg.archs for m, s in common.method_grid(cfg.methods, cfg.sigmas)]
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
                f"{ARCH_NAMES[a]}: SGD+noise (layer) at sigma {best:g} (validation) minus SGD, test accuracy",
                scale=100,
                unit=" points",
            )
        )
    supported = common.combine({a: g.supported for a, (_, g) in gains.items()}) if gains else None
    return runner.Verdict(supported, figures, table, "; ".join(reasons))


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = runner.plt
    fig, axes = plt.subplots(2, len(cfg.archs), figsize=(5.5 * len(cfg.archs), 8), squeeze=False, sharex=True)
    for col, a in enumerate(cfg.archs):
        series = {}
        for m, s in common.method_grid(cfg.methods, cfg.sigmas):
            name = common.label(m, minibatch=True) + ("" if m == "gd" else f", sigma={s:g}")
            series[name] = (dict(arch=a, method=m, sigma=s), common.COLORS[m])
        for row, (key, name) in enumerate(
            (("test_acc", "test accuracy"), ("hessian_trace", "Hessian trace (Hutchinson)"))
        ):
            common.plot_curves(axes[row, col], rows, key, series, alpha=0.85)
            axes[row, col].set(ylabel=name)
        axes[0, col].set_title(f"{ARCH_NAMES[a]} ({cfg.dataset}), mean over {len(cfg.seeds)} seeds", fontsize=10)
        axes[1, col].set_xlabel("SGD step")
        axes[0, col].legend(fontsize=7)
    return {"cnn.png": fig}


EXPERIMENT = runner.Experiment.from_module(__name__, batch_over=("sigma", "seed"))

if __name__ == "__main__":
    runner.main(EXPERIMENT)
