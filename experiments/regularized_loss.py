"""Minimisation of the regularised loss, and the variance explosion of full noise (Figure 2).

Claim (Orvieto et al., AISTATS 2023, Sections 3.1-3.2 and Figure 2): noise injection minimises the
effective risk R_sigma^(eff) = R + sigma^2/2 tr(D2L DPhi DPhi^T); for a strongly overparametrised
(wide) network this works only with layer-wise noise, because full noise adds a term
sigma^4 d1 d2 ||X||_F^2 / (2n) to R_sigma (and a gradient variance) that grows with the width d1.

Setup: one-hidden-layer linear network Phi = W2 W1 X^T (``lsgeo.models.LinearNet``, no biases,
LeCun init), inputs in R^10, a random sparse regression problem (``lsgeo.data.sparse_regression``:
3 of 10 coefficients non-zero, noise 0.1), widths 50 and 300; full-batch GD, GD+noise (full, std
sigma) and GD+noise (layer-wise, one of the M = 2 layers per step with std sigma sqrt(2)).
Recorded at the clean iterate every ``eval_every`` steps: R, the Gauss-Newton trace, and
R_sigma^(eff) (closed form of Section 2.4, ``lsgeo.theory.linear_net_effective_risk``; the same
sigma for every method, so the curves are comparable), plus the exact full-noise risk R_sigma
(``lsgeo.theory.linear_net_full_noise_risk``) whose excess over R_sigma^(eff) is the exploding term.

Verdict: supported if at the largest width layer-wise noise ends with a lower R_sigma^(eff) than full
noise (mean over seeds of the last evaluation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

from experiments import _methods, _runner
from lsgeo import data as data_lib
from lsgeo import losses, models, theory


@dataclasses.dataclass(frozen=True)
class Config:
    """Figure 2: R and R_sigma^(eff) over GD iterations, linear network of width 50 and 300."""

    widths: tuple[int, ...] = (50, 300)  # hidden widths d1
    n_train: int = 100  # training points (x in R^10)
    d: int = 10  # input dimension
    num_nonzero: int = 3  # non-zero coefficients of the sparse target
    label_noise: float = 0.1  # std of the label noise
    sigma: float = 0.2  # noise level (full: std sigma; layer-wise: std sigma sqrt(2))
    lr: float = 0.02  # full-batch GD step size
    steps: int = 3000  # GD steps
    eval_every: int = 50  # steps between evaluations
    methods: tuple[str, ...] = _methods.METHODS
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation and noise seeds (the data are fixed)


PAPER = Config(seeds=(0, 1, 2, 3, 4), steps=10_000)


def prepare(cfg: Config):
    ds = data_lib.sparse_regression(n_train=cfg.n_train, n_test=1, d=cfg.d, num_nonzero=cfg.num_nonzero,
                                    noise=cfg.label_noise, seed=0)
    return jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)


def cells(cfg: Config) -> list[dict]:
    return [c for w in cfg.widths for c in _methods.method_cells(cfg.methods, (cfg.sigma,), cfg.seeds, width=w)]


def _regulariser(params, batch):
    """tr(D2L DPhi DPhi^T) of the linear net: (d2 ||W1 X^T||^2 + ||W2||^2 ||X||^2) / n (Eq. 9)."""
    X, Y = batch
    W1, W2 = models.linear_params_to_matrices(params)
    return 2.0 * (theory.linear_net_effective_risk(W1, W2, X, Y, 1.0) - theory.linear_net_risk(W1, W2, X, Y))


def run(cfg: Config, data, group: list[dict]) -> list[list[dict]]:
    width = group[0]["width"]
    model = models.LinearNet(d1=width, d_out=1)
    predict = models.make_predict(model)

    def objective(params, batch):
        return losses.squared_loss(predict(params, batch[0]), batch[1])

    def eval_fn(params, batch):
        W1, W2 = models.linear_params_to_matrices(params)
        X, Y = batch
        return {"gn_trace": _regulariser(params, batch),
                "R_sigma_full": theory.linear_net_full_noise_risk(W1, W2, X, Y, cfg.sigma)}

    results = _methods.train_cells(
        objective, _methods.init_params(model, data[0]), data, group, inner=optax.sgd(cfg.lr),
        num_steps=cfg.steps, eval_every=cfg.eval_every, eval_fn=eval_fn, eval_data=data,
    )  # fmt: skip
    for rows in results:
        for r in rows:
            r["R_eff"] = r["train_loss"] + 0.5 * cfg.sigma**2 * r["gn_trace"]
    return results


def final(cfg: Config, rows, width, method, key) -> tuple[float, float]:
    """Mean and standard error over seeds of ``key`` at the last evaluation."""
    return _runner.mean_se([r[key] for r in _runner.select(rows, width=width, method=method, step=cfg.steps)])


def summarize(cfg: Config, rows: list[dict]) -> _runner.Verdict:
    figures, table = {}, []
    for w in cfg.widths:
        for m in cfg.methods:
            R, _ = final(cfg, rows, w, m, "train_loss")
            eff, eff_se = final(cfg, rows, w, m, "R_eff")
            full, _ = final(cfg, rows, w, m, "R_sigma_full")
            figures[f"R_eff_w{w}_{m}"] = eff
            figures[f"R_w{w}_{m}"] = R
            table.append({"width": w, "method": _methods.LABELS[m], "R": R, "R_eff": eff, "se": eff_se,
                          "R_sigma_full - R_eff": full - eff})
    widest = max(cfg.widths)
    supported = None
    if {"noise", "layer"} <= set(cfg.methods):
        gap = figures[f"R_eff_w{widest}_noise"] - figures[f"R_eff_w{widest}_layer"]
        figures[f"R_eff_gap_full_minus_layer_w{widest}"] = gap
        supported = bool(gap > 0)
    return _runner.Verdict(supported, figures, table)


def plot(cfg: Config, rows: list[dict], out_dir: Path) -> None:
    plt = _runner.plt
    fig, axes = plt.subplots(2, len(cfg.widths), figsize=(5 * len(cfg.widths), 7), squeeze=False, sharex=True)
    for col, w in enumerate(cfg.widths):
        for row, (key, name) in enumerate((("train_loss", "R"), ("R_eff", f"R_sigma^(eff), sigma={cfg.sigma:g}"))):
            ax = axes[row, col]
            for m in cfg.methods:
                rs = _runner.select(rows, width=w, method=m)
                steps = sorted({r["step"] for r in rs})
                mean = [np.mean([r[key] for r in rs if r["step"] == t]) for t in steps]
                ax.plot(steps, mean, color=_methods.COLORS[m], label=_methods.LABELS[m])
            ax.set(yscale="log", ylabel=name, title=f"width {w}")
            if row == 1:
                ax.set_xlabel("GD step")
        axes[0, col].legend()
    _runner.save_figure(fig, out_dir / "regularized_loss.png")


EXPERIMENT = _runner.Experiment(
    name="regularized_loss",
    claim="In a wide one-hidden-layer linear network, layer-wise noise injection minimises the effective "
    "risk R_sigma^(eff) while full noise does not, because of its variance explosion (Figure 2).",
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
