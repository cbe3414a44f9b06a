"""A geometry report of a trained network: risk, effective risk, curvature and NTK, with timings.

Trains a small ReLU MLP on scikit-learn's 8x8 digits with full-batch GD (``lsgeo.train.train``)
and measures, at the final weights on the training data, each with its compute time (first call,
compilation included, and a second, compiled call):

- R(w) (``lsgeo.risk.risk``);
- R_sigma^(eff) = R + sigma^2/2 tr(D2L DPhi DPhi^T) for a few sigma (``lsgeo.risk.effective_risk``,
  exact Gauss-Newton trace) and the Monte Carlo R_sigma = E L(Phi(w + sigma eps))
  (``lsgeo.risk.perturbed_risk``, ``mc_samples`` draws) it approximates;
- the Hessian trace (Hutch++, ``lsgeo.curvature.hessian_trace``), the top-5 Hessian eigenvalues
  (Lanczos, ``top_eigenvalues``), the most negative one (``min_eigenvalue``), the spectral density
  (stochastic Lanczos quadrature, ``spectral_density``), the saddle index (``saddle_index``: the
  fraction of eigenvalues below -``saddle_rtol`` max|lambda|, relative to the spectrum's scale since
  a trained network's Hessian has a bulk of near-zero eigenvalues of either sign; exact below
  ``max_dense`` parameters, else SLQ) and the NTK trace (``lsgeo.ntk.ntk_trace``).

Claim tested (Orvieto et al., AISTATS 2023, Sections 2.1-2.2 and Theorem 1): for a ReLU network
D2Phi[I] = 0 almost everywhere, so R_sigma = R_sigma^(eff) + O(sigma^3): the second-order term
sigma^2/2 tr(D2L DPhi DPhi^T) accounts for the effect of small noise on the risk.
The statement is asymptotic: ReLU kinks and the third-order terms of the loss add to R_sigma at
finite sigma. Verdict, on ratio(sigma) = (R_sigma - R) / (R_sigma^(eff) - R) with the Monte Carlo
R_sigma, for each of 3 trained networks (seeds; null with fewer): supported if, for every network, the
ratio at the smallest sigma is within 25% of 1 and |ratio - 1| does not grow as sigma decreases
(beyond 2 Monte Carlo standard errors); false if one network fails. The other quantities (and the
figure) are those of the first network.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli, experiment, nets, plots, verdicts
from lsgeo import curvature, losses, models, ntk, risk, train

QUANTITIES = (
    "R",
    "R_eff",
    "R_sigma_mc",
    "hessian_trace",
    "top_eigenvalues",
    "min_eigenvalue",
    "spectral_density",
    "saddle_index",
    "ntk_trace",
)

CLAIM = (
    "For a ReLU network, R_sigma^(eff) = R + sigma^2/2 tr(D2L DPhi DPhi^T) accounts for the effect of small "
    "Gaussian weight noise on the risk, R_sigma = R_sigma^(eff) + O(sigma^3) (Sections 2.1-2.2)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Geometry report of a small MLP trained on digits."""

    widths: tuple[int, ...] = (32, 32)  # hidden widths of the ReLU MLP
    lr: float = 0.1  # full-batch GD step size
    steps: int = 500  # GD steps
    sigmas: tuple[float, ...] = (0.01, 0.03, 0.05, 0.1)  # noise levels for R_sigma^(eff) and R_sigma
    mc_samples: int = 256  # Monte Carlo draws for R_sigma
    trace_probes: int = 60  # Hutch++ matrix-vector products
    saddle_rtol: float = 1e-3  # eigenvalues below -saddle_rtol * max|lambda| count as negative
    max_dense: int = 4000  # the saddle index is exact (dense Hessian) up to this many parameters, else SLQ
    slq_runs: int = 4  # stochastic Lanczos quadrature probes (density; saddle index above max_dense)
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation and probe seeds: one trained network each


def cells(cfg: Config) -> list[dict]:
    return [dict(quantity=q, seed=s) for s in cfg.seeds for q in QUANTITIES]


def prepare(cfg: Config):
    data = nets.splits("digits", n_train=None, flatten=True)
    model = models.MLP(widths=cfg.widths, num_outputs=data.num_classes)
    trained = {}
    for seed in cfg.seeds:
        result = train.train(
            nets.Objective(model),
            optax.sgd(cfg.lr),
            nets.init_fn(model, data.train[0]),
            data.train,
            num_steps=cfg.steps,
            eval_fn=nets.Evaluate(model),
            eval_data={"test": data.test},
            key=seed,
        )
        trained[seed] = (result.params, {k: float(v[-1]) for k, v in result.history.items()})
    return model, data, trained


def _timed(fn):
    """(value, first-call seconds, second-call seconds) of a jitted ``fn()``."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        value = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return value, times[0], times[1]


def _row(name, value, t, t_warm, **extra):
    return {"name": name, "value": float(value), "time_s": t, "time_warm_s": t_warm, **extra}


def _saddle_name(cfg: Config, m: int) -> str:
    how = "exact" if m <= cfg.max_dense else f"SLQ, {cfg.slq_runs} probes"
    return f"saddle index ({how}; eigenvalues < -{cfg.saddle_rtol:g} max|lambda|)"


def run(cfg: Config, prep, group: list[dict]) -> list[list[dict]]:
    model, data, trained = prep
    ((quantity, seed),) = {(c["quantity"], c["seed"]) for c in group}
    params, final = trained[seed]
    predict, loss, batch, key = (
        models.make_predict(model),
        losses.softmax_cross_entropy,
        data.train,
        jax.random.key(seed),
    )
    f = nets.Objective(model)
    if quantity == "R":
        value, t, tw = _timed(lambda: jax.jit(risk.risk, static_argnums=(0, 1))(predict, loss, params, batch))
        return [[_row("R", value, t, tw, test_acc=final["test_acc"])]]
    if quantity in ("R_eff", "R_sigma_mc"):
        if quantity == "R_eff":
            fn = jax.jit(lambda p, b, s: risk.effective_risk(predict, loss, p, b, s))
        else:
            draws = jax.jit(
                jax.vmap(
                    lambda p, b, s, k: risk.perturbed_risk(predict, loss, p, b, s, k), in_axes=(None, None, None, 0)
                )
            )
            fn = lambda p, b, s: draws(p, b, s, jax.random.split(key, cfg.mc_samples))
        out = []
        for s in cfg.sigmas:
            values, t, tw = _timed(lambda: fn(params, batch, jnp.float32(s)))
            mean, se = verdicts.mean_se(np.atleast_1d(np.asarray(values)))
            out.append(_row(f"{quantity} sigma={s:g}", mean, t, tw, sigma=s, **({"mc_se": se} if values.ndim else {})))
        return [out]
    if quantity == "hessian_trace":
        value, t, tw = _timed(
            lambda: curvature.hessian_trace(f, params, batch, key, num_probes=cfg.trace_probes, method="hutch++")
        )
        return [[_row("Hessian trace (Hutch++)", value, t, tw)]]
    if quantity == "top_eigenvalues":
        values, t, tw = _timed(lambda: curvature.top_eigenvalues(f, params, batch, key, k=5))
        return [[_row(f"Hessian eigenvalue {i + 1}", v, t, tw) for i, v in enumerate(np.asarray(values))]]
    if quantity == "min_eigenvalue":
        value, t, tw = _timed(lambda: curvature.min_eigenvalue(f, params, batch, key)[0])
        return [[_row("smallest Hessian eigenvalue (Lanczos)", value, t, tw)]]
    if quantity == "spectral_density":
        (grid, density), t, tw = _timed(
            lambda: curvature.spectral_density(f, params, batch, key, num_runs=cfg.slq_runs, num_points=400)
        )
        return [
            [
                _row("spectral density", d, t, tw, eigenvalue=float(g))
                for g, d in zip(np.asarray(grid), np.asarray(density))
            ]
        ]
    if quantity == "saddle_index":
        value, t, tw = _timed(
            lambda: curvature.saddle_index(
                f, params, batch, key, rtol=cfg.saddle_rtol, max_dense=cfg.max_dense, num_runs=cfg.slq_runs
            )
        )
        return [[_row(_saddle_name(cfg, optax.tree.size(params)), value, t, tw, rtol=cfg.saddle_rtol)]]
    value, t, tw = _timed(lambda: jax.jit(ntk.ntk_trace, static_argnums=0)(predict, params, batch[0]))
    return [[_row("NTK trace", value, t, tw)]]


def ratios(cfg: Config, rows: list[dict], seed: int | None = None) -> list[tuple[float, float, float, float]]:
    """Per sigma (ascending): (sigma, R_sigma - R, its 2 s.e., R_eff - R) of ``seed`` (default: the first)."""
    seed = cfg.seeds[0] if seed is None else seed
    by_name = {r["name"]: r for r in rows if r["seed"] == seed}
    R = by_name["R"]["value"]
    out = []
    for s in sorted(cfg.sigmas):
        mc, eff = by_name[f"R_sigma_mc sigma={s:g}"], by_name[f"R_eff sigma={s:g}"]
        out.append((s, mc["value"] - R, 2 * mc["mc_se"], eff["value"] - R))
    return out


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    first = [r for r in rows if r["seed"] == cfg.seeds[0] and r["name"] != "spectral density"]
    by_name = {r["name"]: r for r in first}
    figures = {"R": by_name["R"]["value"], "test_acc": by_name["R"]["test_acc"]}
    passes, first_ratios = [], []
    for seed in cfg.seeds:
        errors = []
        for s, mc, mc_tol, eff in ratios(cfg, rows, seed):
            if seed == cfg.seeds[0]:
                figures[f"ratio_sigma={s:g}"] = mc / eff
                figures[f"R_eff_minus_R_sigma={s:g}"] = eff
                figures[f"R_sigma_mc_minus_R_sigma={s:g}"] = mc
            errors.append((abs(mc / eff - 1.0), mc_tol / abs(eff)))
        monotone = all(small <= large + tol for (small, tol), (large, _) in zip(errors, errors[1:]))
        passes.append(bool(errors[0][0] < 0.25 and monotone))
        first_ratios.append(1.0 + errors[0][0])
        figures[f"ratio_smallest_sigma_seed={seed}"] = ratios(cfg, rows, seed)[0][1] / ratios(cfg, rows, seed)[0][3]
    ok = all(passes)
    for r in first:
        if not r["name"].startswith("R"):
            figures[r["name"].split(" (")[0].replace(" ", "_")] = r["value"]
    table = [
        {"quantity": r["name"], "value": r["value"], "time_s": r["time_s"], "time_warm_s": r["time_warm_s"]}
        for r in first
    ]
    smallest = min(cfg.sigmas)
    at_smallest = ", ".join(f"{figures[f'ratio_smallest_sigma_seed={k}']:.3g}" for k in cfg.seeds)
    reason = (
        f"(R_sigma - R)/(R_eff - R) at sigma {smallest:g} = {at_smallest} for {len(cfg.seeds)} trained networks "
        f"(needs 1 ± 0.25 in each) and |ratio - 1| not growing as sigma decreases beyond 2 Monte Carlo s.e. "
        f"({cfg.mc_samples} draws): {sum(passes)}/{len(passes)} networks pass (all must)"
    )
    supported = bool(ok)
    if len(cfg.seeds) < verdicts.MIN_SEEDS and supported:
        supported, reason = None, f"{len(cfg.seeds)} network(s): too few to speak of trained networks; {reason}"
    return experiment.Verdict(supported, figures, table, reason)


def plot(cfg: Config, rows: list[dict]) -> dict:
    fig, (ax, ax_z, ax_r) = plots.plt.subplots(1, 3, figsize=(18, 4.5))
    first = [r for r in rows if r["seed"] == cfg.seeds[0]]
    density = [r for r in first if r["name"] == "spectral density"]
    by_name = {r["name"]: r for r in first}
    top = by_name["Hessian eigenvalue 1"]["value"]
    lam_min = by_name["smallest Hessian eigenvalue (Lanczos)"]["value"]
    threshold = -cfg.saddle_rtol * top
    grid = np.array([r["eigenvalue"] for r in density])
    values = np.array([max(r["value"], 1e-8) for r in density])
    index = next(r for r in first if r["name"].startswith("saddle index"))
    for a in (ax, ax_z):
        a.plot(grid, values, color="C0", label="SLQ density (broadened)")
        a.axvline(lam_min, color="C2", ls="--", lw=1.5, label=f"lambda_min (Lanczos) = {lam_min:.3g}")
        a.axvline(threshold, color="C3", ls=":", lw=2,
                  label=f"saddle threshold -{cfg.saddle_rtol:g} lambda_max = {threshold:.2g}")  # fmt: skip
        a.set(yscale="log", ylim=(1e-6, None), xlabel="Hessian eigenvalue", ylabel="density (SLQ, broadened)")
    ax.set_title(f"Hessian spectrum of the trained MLP (seed {cfg.seeds[0]}); lambda_max {top:.3g}")
    ax.legend(fontsize=8, loc="upper right")
    width = 3 * max(abs(lam_min), abs(threshold))  # the negative edge, where the index is counted
    ax_z.set_xlim(-width, width / 2)
    ax_z.set_title(f"zoom on the negative edge: saddle index {index['value']:.3g} "
                   f"({index['name'].split('(')[1].split(';')[0]})", fontsize=10)  # fmt: skip
    ax_z.legend(fontsize=8, loc="lower left")
    sig, mc, mc_tol, eff = (np.array(v) for v in zip(*ratios(cfg, rows)))
    ax_r.errorbar(sig, mc, yerr=mc_tol, marker="o", capsize=3, label="R_sigma - R (Monte Carlo, ± 2 s.e.)")
    ax_r.plot(sig, eff, "k--", marker="s", label="R_eff - R = sigma^2/2 tr(D2L DPhi DPhi^T)")
    plots.sigma_axis(ax_r, cfg.sigmas)
    ax_r.set(
        yscale="log",
        ylabel="increase of the risk over R",
        title="noise on the weights: second-order prediction vs Monte Carlo",
    )
    ax_r.legend(fontsize=8)
    return {"geometry_report.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__)

if __name__ == "__main__":
    cli.main(EXPERIMENT)
