"""Stochastic weight averaging (Izmailov et al. 2018) against SGD: flatness and test accuracy.

Claim (Izmailov et al. 2018, Sections 3-5): averaging the SGD iterates of a constant (high) learning
rate phase finds a solution in a flatter region of the loss surface than conventional SGD with a
decaying learning rate, with equal or better test accuracy.

Setup: a ReLU MLP (``lsgeo.models.MLP``; no BatchNorm, so no statistics need recomputing after
averaging) on scikit-learn digits (or MNIST-1D), softmax cross-entropy, minibatch SGD with
``batch_size`` examples per step for ``steps`` steps; both methods share the first half of the budget:

- ``sgd``: Izmailov et al.'s baseline schedule: lr for the first 50% of the steps, a linear decay
  to 0.01 lr until 90%, then constant;
- ``swa``: lr for the first 50%, a linear decay to ``swa_lr`` until ``swa_start``, then constant
  ``swa_lr``; the running mean of the iterates at every epoch end from ``swa_start`` on
  (``lsgeo.train.sweep(swa_start=..., swa_every=steps per epoch)``) is the SWA solution.

Both are vmapped over seeds. At the end, on the whole training set: lambda_max of the Hessian
(``lsgeo.curvature.top_eigenvalues``, Lanczos) and its trace (``lsgeo.curvature.hessian_trace``,
Hutch++); test accuracy on the held-out set.

Verdict (means over seeds): supported when SWA has both a lower lambda_max and a lower trace than
SGD and its test accuracy is not lower than SGD's by more than two standard errors of the paired
difference (by more than 0 with one seed); false otherwise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import optax

from experiments import _methods, _runner
from lsgeo import curvature, models, train

METHODS = ("sgd", "swa")
COLORS = {"sgd": "black", "swa": "tab:green"}


@dataclasses.dataclass(frozen=True)
class Config:
    """SGD vs SWA on an MLP; the defaults run in about a minute on a CPU."""

    dataset: str = "digits"  # "digits" or "mnist1d"
    n_train: int | None = 1024  # training points (None: all)
    widths: tuple[int, ...] = (64, 64)
    batch_size: int = 32
    steps: int = 3200  # SGD steps of both methods (100 epochs of 32 steps by default)
    lr: float = 0.1  # initial learning rate of both methods
    swa_lr: float = 0.05  # constant learning rate of the SWA phase
    swa_start: float = 0.75  # SWA averages from this fraction of the steps on
    eval_every: int = 320  # steps between evaluations
    lanczos_iters: int = 30
    trace_probes: int = 60  # Hutch++ Hessian-vector products
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation, data order, curvature probes


PAPER = Config(dataset="mnist1d", n_train=4000, widths=(256, 256), batch_size=128, steps=31_250, eval_every=3125,
               lanczos_iters=60, trace_probes=150, seeds=(0, 1, 2, 3, 4))


def prepare(cfg: Config):
    return _methods.flat_data(cfg.dataset, cfg.n_train)


def make_model(cfg: Config) -> models.MLP:
    return models.MLP(widths=cfg.widths, num_outputs=10)



def swa_start_step(cfg: Config, steps_per_epoch: int) -> int:
    """The first averaged step: the fraction ``swa_start`` of the budget, rounded down to an epoch end."""
    return int(cfg.swa_start * cfg.steps) // steps_per_epoch * steps_per_epoch


def schedule(cfg: Config, method: str, swa_start: int) -> optax.Schedule:
    """The learning-rate schedule of ``method`` (Izmailov et al. 2018, Section 5)."""
    half = cfg.steps // 2
    end, final = (int(0.9 * cfg.steps), 0.01 * cfg.lr) if method == "sgd" else (swa_start, cfg.swa_lr)
    decay = optax.linear_schedule(cfg.lr, final, max(end - half, 1))
    return optax.join_schedules([optax.constant_schedule(cfg.lr), decay], [half])


def cells(cfg: Config) -> list[dict]:
    return [dict(method=m, seed=s) for m in METHODS for s in cfg.seeds]


def run(cfg: Config, data, group: list[dict]) -> list[list[dict]]:
    (train_batch, test_batch), method = data, group[0]["method"]
    model = make_model(cfg)

    objective = _methods.Objective(model)

    def eval_fn(params, test):
        return {"test_acc": _methods.Objective(model, "accuracy")(params, test), "test_loss": objective(params, test)}

    steps_per_epoch = train_batch[0].shape[0] // cfg.batch_size
    swa_start = swa_start_step(cfg, steps_per_epoch)
    swa = dict(swa_start=swa_start, swa_every=steps_per_epoch) if method == "swa" else {}
    lr = schedule(cfg, method, swa_start)
    result = train.sweep(
        objective, lambda seed: optax.sgd(lr), lambda k: model.init(k, train_batch[0][:1])["params"], train_batch,
        {}, [c["seed"] for c in group], num_steps=cfg.steps, eval_every=cfg.eval_every,
        batch_size=cfg.batch_size, eval_fn=eval_fn, eval_data=test_batch, **swa,
    )  # fmt: skip
    final = jax.tree_util.tree_map(lambda p: np.asarray(p)[0], result.swa_params if method == "swa" else result.params)

    def measures(params, seed, train_data, test_data):
        k1, k2 = jax.random.split(jax.random.key(seed))
        return dict(
            lambda_max=curvature.top_eigenvalues(objective, params, train_data, k1, num_iters=cfg.lanczos_iters)[0],
            hessian_trace=curvature.hessian_trace(objective, params, train_data, k2, num_probes=cfg.trace_probes,
                                                  method="hutch++"),
            train_loss=objective(params, train_data),
            **eval_fn(params, test_data),
        )

    seeds = np.asarray([c["seed"] for c in group])
    final_measures = jax.jit(jax.vmap(measures, in_axes=(0, 0, None, None)))(final, seeds, train_batch, test_batch)
    final_measures = {k: np.asarray(v) for k, v in final_measures.items()}
    prefix = "swa_" if method == "swa" else ""
    history = {k: np.asarray(result.history[prefix + k][0]) for k in ("train_loss", "test_acc", "test_loss")}
    out = []
    for i, _ in enumerate(group):
        rows = [dict(kind="history", step=int(t), **{k: float(v[i, e]) for k, v in history.items()})
                for e, t in enumerate(np.asarray(result.history["step"][0, i]))]
        rows.append(dict(kind="final", step=cfg.steps, **{k: float(v[i]) for k, v in final_measures.items()}))
        out.append(rows)
    return out


def final_rows(rows: list[dict], method: str, seeds) -> list[dict]:
    return [_runner.select(rows, method=method, seed=s, kind="final")[0] for s in seeds]


def summarize(cfg: Config, rows: list[dict]) -> _runner.Verdict:
    final = {m: final_rows(rows, m, cfg.seeds) for m in METHODS}
    keys = ("lambda_max", "hessian_trace", "test_acc", "test_loss", "train_loss")
    table, figures = [], {}
    for m in METHODS:
        entry = dict(method=m)
        for k in keys:
            entry[k], entry[f"{k}_se"] = _runner.mean_se([r[k] for r in final[m]])
            figures[f"{m}_{k}"] = entry[k]
        table.append({k: v for k, v in entry.items() if not k.endswith("_se") or k == "test_acc_se"})
    gains = [a["test_acc"] - b["test_acc"] for a, b in zip(final["swa"], final["sgd"])]
    gain, gain_se = _runner.mean_se(gains)
    figures.update(acc_gain=gain, acc_gain_se=gain_se)
    for k in ("lambda_max", "hessian_trace"):
        figures[f"{k}_ratio"] = float(np.divide(figures[f"swa_{k}"], figures[f"sgd_{k}"]))
    flatter = all(figures[f"swa_{k}"] < figures[f"sgd_{k}"] for k in ("lambda_max", "hessian_trace"))
    supported = bool(flatter and gain >= -2 * gain_se)
    return _runner.Verdict(supported=supported, figures=figures, table=table)


def plot(cfg: Config, rows: list[dict], out_dir: Path) -> None:
    plt = _runner.plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for m in METHODS:
        for s in cfg.seeds:
            hist = _runner.select(rows, method=m, seed=s, kind="history")
            steps = [r["step"] for r in hist]
            label = m.upper() if s == cfg.seeds[0] else None
            axes[0].plot(steps, [r["train_loss"] for r in hist], color=COLORS[m], alpha=0.7, label=label)
            axes[1].plot(steps, [r["test_acc"] for r in hist], color=COLORS[m], alpha=0.7, label=label)
        final = final_rows(rows, m, cfg.seeds)
        axes[2].scatter([r["lambda_max"] for r in final], [r["test_acc"] for r in final], color=COLORS[m],
                        label=m.upper())
    axes[0].set(yscale="log", xlabel="step", ylabel="train loss (SWA: at the running average)")
    axes[1].set(xlabel="step", ylabel="test accuracy", ylim=(0.9, 1.0) if cfg.dataset == "digits" else None)
    axes[2].set(xlabel="lambda_max of the Hessian at the end", ylabel="final test accuracy",
                title="one point per seed")
    for ax in axes:
        ax.legend()
    _runner.save_figure(fig, out_dir / "swa.png")


EXPERIMENT = _runner.Experiment(
    name="swa",
    claim=("Stochastic weight averaging finds flatter solutions than SGD (lower Hessian lambda_max and trace) with "
           "equal or better test accuracy (Izmailov et al. 2018)."),
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
