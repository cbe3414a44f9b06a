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

Verdict: at the largest width, the final R_sigma^(eff) of full noise minus that of layer-wise noise,
paired over seeds (a seed fixes the initialisation of both, ``common.paired_gain``): supported beyond
2 s.e., false below minus 2 s.e., null in between.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

from experiments import common, runner
from lsgeo import data as data_lib
from lsgeo import models, theory

CLAIM = (
    "In a wide one-hidden-layer linear network, layer-wise noise injection minimises the effective "
    "risk R_sigma^(eff) while full noise does not, because of its variance explosion (Figure 2)."
)


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
    methods: tuple[str, ...] = common.METHODS
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation and noise seeds (the data are fixed)


PRESETS = {"paper": Config(seeds=(0, 1, 2, 3, 4), steps=10_000)}


def prepare(cfg: Config):
    ds = data_lib.sparse_regression(
        n_train=cfg.n_train, n_test=1, d=cfg.d, num_nonzero=cfg.num_nonzero, noise=cfg.label_noise, seed=0
    )
    return jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)


def cells(cfg: Config) -> list[dict]:
    return [c for w in cfg.widths for c in common.method_cells(cfg.methods, (cfg.sigma,), cfg.seeds, width=w)]


def _regulariser(params, batch):
    """tr(D2L DPhi DPhi^T) of the linear net: (d2 ||W1 X^T||^2 + ||W2||^2 ||X||^2) / n (Eq. 9)."""
    X, Y = batch
    W1, W2 = models.linear_params_to_matrices(params)
    return 2.0 * (theory.linear_net_effective_risk(W1, W2, X, Y, 1.0) - theory.linear_net_risk(W1, W2, X, Y))


def run(cfg: Config, data, group: list[dict]) -> list[list[dict]]:
    width = group[0]["width"]
    model = models.LinearNet(d1=width, d_out=1)

    def eval_fn(params, batch):
        W1, W2 = models.linear_params_to_matrices(params)
        X, Y = batch
        return {
            "gn_trace": _regulariser(params, batch),
            "R_sigma_full": theory.linear_net_full_noise_risk(W1, W2, X, Y, cfg.sigma),
        }

    results = common.train_cells(
        common.Objective(model, "squared_loss"), common.init_fn(model, data[0]), data, group, inner=optax.sgd(cfg.lr),
        num_steps=cfg.steps, eval_every=cfg.eval_every, eval_fn=eval_fn, eval_data=data,
    )  # fmt: skip
    for rows in results:
        for r in rows:
            r["R_eff"] = r["train_loss"] + 0.5 * cfg.sigma**2 * r["gn_trace"]
    return results


def final(cfg: Config, rows, width, method, key) -> tuple[float, float]:
    """Mean and standard error over seeds of ``key`` at the last evaluation."""
    return common.mean_se([r[key] for r in common.select(rows, width=width, method=method, step=cfg.steps)])


def summarize(cfg: Config, rows: list[dict]) -> runner.Verdict:
    figures, table = {}, []
    for w in cfg.widths:
        for m in cfg.methods:
            R, _ = final(cfg, rows, w, m, "train_loss")
            eff, eff_se = final(cfg, rows, w, m, "R_eff")
            full, _ = final(cfg, rows, w, m, "R_sigma_full")
            figures[f"R_eff_w{w}_{m}"] = eff
            figures[f"R_w{w}_{m}"] = R
            table.append(
                {
                    "width": w,
                    "method": common.label(m),
                    "R": R,
                    "R_eff": eff,
                    "se": eff_se,
                    "R_sigma_full - R_eff": full - eff,
                }
            )
    widest = max(cfg.widths)
    supported, reason = None, "needs both noise methods"
    if {"noise", "layer"} <= set(cfg.methods):
        gain = common.paired_gain(
            *(
                common.per_seed(rows, "R_eff", cfg.seeds, width=widest, method=m, step=cfg.steps)
                for m in ("noise", "layer")
            )
        )
        figures[f"R_eff_gap_full_minus_layer_w{widest}"] = gain.mean
        figures[f"R_eff_gap_se_w{widest}"] = gain.se
        supported, reason = gain.supported, gain.describe(f"width {widest}: final R_eff, full noise minus layer-wise")
    return runner.Verdict(supported, figures, table, reason)


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = runner.plt
    fig, axes = plt.subplots(2, len(cfg.widths), figsize=(5 * len(cfg.widths), 7), squeeze=False, sharex=True)
    for col, w in enumerate(cfg.widths):
        for row, (key, name) in enumerate((("train_loss", "R"), ("R_eff", f"R_sigma^(eff), sigma={cfg.sigma:g}"))):
            ax = axes[row, col]
            common.plot_curves(
                ax, rows, key, {common.label(m): (dict(width=w, method=m), common.COLORS[m]) for m in cfg.methods}
            )
            ax.set(yscale="log", ylabel=name, title=f"width {w}")
            if row == 1:
                ax.set_xlabel("GD step")
        axes[0, col].legend()
    return {"regularized_loss.png": fig}


EXPERIMENT = runner.Experiment.from_module(__name__, batch_over=("sigma", "seed"))

if __name__ == "__main__":
    runner.main(EXPERIMENT)
