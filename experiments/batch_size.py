"""Small against large batches, trained to the same training loss: sharpness and generalisation.

Claim (Keskar et al. 2017, Sections 2-3): large-batch training converges to sharper minima of the
training loss (larger Hessian eigenvalues, larger epsilon-sharpness) than small-batch SGD, and these
minima generalise worse (lower test accuracy), at the same training loss.

Setup: a ReLU MLP (``lsgeo.models.MLP``) on scikit-learn digits (or MNIST-1D), softmax
cross-entropy, SGD with the same step size ``lr`` for both batch sizes (Keskar et al. keep the
optimiser and change only the batch): ``small`` draws ``small_batch`` examples per step, ``large``
``large_batch`` (the whole training set by default, i.e. full-batch GD). Each run stops at the
first check (every ``check_every`` steps, ``lsgeo.train.train`` resumed from its optimizer state)
at which its training loss is <= ``target_loss`` (at most ``max_steps`` steps), so both are compared
at the same training loss. At that point, on the whole training set: lambda_max of the Hessian
(``lsgeo.curvature.top_eigenvalues``), its trace (``lsgeo.curvature.hessian_trace``, Hutch++) and
Keskar's epsilon-sharpness [max_{||delta||_2 <= rho} R(w + delta) - R(w)] / (1 + R(w))
(``lsgeo.sharpness.epsilon_sharpness``, projected gradient ascent from a random start); the test
accuracy on the held-out set.

Verdict (means over seeds): false when the large-batch minima are not sharper in both lambda_max and
epsilon-sharpness or their test accuracy is not lower; true when they are sharper and the accuracy
gap exceeds two standard errors of the paired difference; null in between (or with one seed, or when
a run did not reach the target loss).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import optax

from experiments import _methods, _runner
from lsgeo import curvature, models, sharpness, train

BATCHES = ("small", "large")
COLORS = {"small": "tab:blue", "large": "tab:red"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Small- vs large-batch SGD to the same training loss; the defaults run in about a minute on a CPU."""

    dataset: str = "digits"  # "digits" or "mnist1d"
    n_train: int | None = 1024  # training points (None: all)
    widths: tuple[int, ...] = (64, 64)
    lr: float = 0.1  # SGD step size of both batch sizes
    small_batch: int = 32
    large_batch: int | None = None  # None: the whole training set (full-batch GD)
    target_loss: float = 0.01  # both stop at the first check with a training loss <= this
    check_every: int = 100  # steps between checks of the training loss
    max_steps: int = 20_000
    rho: float = 0.2  # radius of the epsilon-sharpness ball (l2)
    sharpness_steps: int = 20  # projected gradient-ascent steps
    lanczos_iters: int = 30
    trace_probes: int = 60  # Hutch++ Hessian-vector products
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation, data order, probes


PAPER = Config(dataset="mnist1d", n_train=4000, widths=(512, 512), small_batch=256, large_batch=4000,
               target_loss=0.001, max_steps=100_000, lanczos_iters=60, trace_probes=150, seeds=(0, 1, 2, 3, 4))


def prepare(cfg: Config):
    return _methods.flat_data(cfg.dataset, cfg.n_train)


def make_model(cfg: Config) -> models.MLP:
    return models.MLP(widths=cfg.widths, num_outputs=10)



def train_to_target(cfg: Config, objective, init, data, batch_size: int, seed: int):
    """SGD from ``init(key)`` until the training loss is <= ``target_loss``; returns (params, steps, history)."""
    optimizer = optax.sgd(cfg.lr)
    start, key, steps, history = init, seed, 0, []
    while steps < cfg.max_steps:
        result = train.train(objective, optimizer, start, data, num_steps=cfg.check_every, batch_size=batch_size, key=key)
        start, key, steps = result.state, None, result.steps  # resume from the state: the same run, checked
        history.append((steps, float(result.history["train_loss"][-1])))
        if history[-1][1] <= cfg.target_loss:
            break
    return result.params, steps, history


def cells(cfg: Config) -> list[dict]:
    return [dict(batch=b, seed=s) for b in BATCHES for s in cfg.seeds]


def run(cfg: Config, data, group: list[dict]) -> list[list[dict]]:
    (train_batch, test_batch), which = data, group[0]["batch"]
    model = make_model(cfg)
    n = train_batch[0].shape[0]
    batch_size = cfg.small_batch if which == "small" else (cfg.large_batch or n)

    objective = _methods.Objective(model)

    def init(key):
        return model.init(key, train_batch[0][:1])["params"]

    runs = [train_to_target(cfg, objective, init, train_batch, batch_size, c["seed"]) for c in group]
    params = jax.tree_util.tree_map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *[r[0] for r in runs])

    def measures(w, seed, train_data, test_data):
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        return dict(
            train_loss=objective(w, train_data),
            test_acc=_methods.Objective(model, "accuracy")(w, test_data),
            test_loss=objective(w, test_data),
            lambda_max=curvature.top_eigenvalues(objective, w, train_data, k1, num_iters=cfg.lanczos_iters)[0],
            hessian_trace=curvature.hessian_trace(objective, w, train_data, k2, num_probes=cfg.trace_probes,
                                                  method="hutch++"),
            epsilon_sharpness=sharpness.epsilon_sharpness(objective, w, train_data, cfg.rho, key=k3,
                                                          steps=cfg.sharpness_steps),
            weight_norm=optax.tree.norm(w),
        )

    seeds = np.asarray([c["seed"] for c in group])
    final = jax.jit(jax.vmap(measures, in_axes=(0, 0, None, None)))(params, seeds, train_batch, test_batch)
    final = {k: np.asarray(v) for k, v in final.items()}
    out = []
    for i, (_, steps, history) in enumerate(runs):
        rows = [dict(kind="history", step=t, train_loss=loss) for t, loss in history]
        rows.append(dict(kind="final", step=steps, batch_size=batch_size, epochs=steps * batch_size / n,
                         reached=history[-1][1] <= cfg.target_loss, **{k: float(v[i]) for k, v in final.items()}))
        out.append(rows)
    return out


def final_rows(rows: list[dict], which: str, seeds) -> list[dict]:
    return [_runner.select(rows, batch=which, seed=s, kind="final")[0] for s in seeds]


def summarize(cfg: Config, rows: list[dict]) -> _runner.Verdict:
    final = {b: final_rows(rows, b, cfg.seeds) for b in BATCHES}
    keys = ("steps", "epochs", "train_loss", "test_acc", "lambda_max", "hessian_trace", "epsilon_sharpness",
            "weight_norm")
    table, figures = [], {}
    for b in BATCHES:
        entry = dict(batch=b, batch_size=final[b][0]["batch_size"])
        for k in keys:
            entry[k] = _runner.mean_se([r["step" if k == "steps" else k] for r in final[b]])[0]
            figures[f"{b}_{k}"] = entry[k]
        table.append(entry)
    gap, gap_se = _runner.mean_se([s["test_acc"] - l["test_acc"] for s, l in zip(final["small"], final["large"])])
    figures.update(acc_gap=gap, acc_gap_se=gap_se)
    for k in ("lambda_max", "hessian_trace", "epsilon_sharpness"):
        figures[f"{k}_ratio"] = float(np.divide(figures[f"large_{k}"], figures[f"small_{k}"]))
    sharper = all(figures[f"large_{k}"] > figures[f"small_{k}"] for k in ("lambda_max", "epsilon_sharpness"))
    reached = all(r["reached"] for b in BATCHES for r in final[b])
    if not sharper or gap <= 0:
        supported = False
    elif reached and len(cfg.seeds) > 1 and gap > 2 * gap_se:
        supported = True
    else:
        supported = None
    return _runner.Verdict(supported=supported, figures=figures, table=table)


def plot(cfg: Config, rows: list[dict], out_dir: Path) -> None:
    plt = _runner.plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for b in BATCHES:
        for s in cfg.seeds:
            hist = _runner.select(rows, batch=b, seed=s, kind="history")
            axes[0].plot([r["step"] for r in hist], [r["train_loss"] for r in hist], color=COLORS[b], alpha=0.7,
                         label=b if s == cfg.seeds[0] else None)
        final = final_rows(rows, b, cfg.seeds)
        for ax, key in zip(axes[1:], ("lambda_max", "epsilon_sharpness")):
            ax.scatter([r[key] for r in final], [r["test_acc"] for r in final], color=COLORS[b],
                       label=f"{b} (batch {final[0]['batch_size']})")
    axes[0].axhline(cfg.target_loss, color="k", ls=":", label="target")
    axes[0].set(xscale="log", yscale="log", xlabel="step", ylabel="train loss", title="training to the same loss")
    axes[1].set(xlabel="lambda_max of the Hessian", ylabel="test accuracy", title="one point per seed")
    axes[2].set(xlabel=f"epsilon-sharpness (rho = {cfg.rho:g})", ylabel="test accuracy")
    for ax in axes:
        ax.legend()
    _runner.save_figure(fig, out_dir / "batch_size.png")


EXPERIMENT = _runner.Experiment(
    name="batch_size",
    claim=("Large-batch training converges to sharper minima (larger lambda_max and epsilon-sharpness) than "
           "small-batch SGD at the same training loss, and these minima generalise worse (Keskar et al. 2017)."),
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
