"""A geometry report of a trained network: risk, effective risk, curvature and NTK, with timings.

Trains a small ReLU MLP on scikit-learn's 8x8 digits with full-batch GD (``lsgeo.train.train``)
and measures, at the final weights on the training data, each with its compute time (first call,
compilation included, and a second, compiled call):

- R(w) (``lsgeo.risk.risk``);
- R_sigma^(eff) = R + sigma^2/2 tr(D2L DPhi DPhi^T) for a few sigma (``lsgeo.risk.effective_risk``,
  exact Gauss-Newton trace) and the Monte Carlo R_sigma = E L(Phi(w + sigma eps))
  (``lsgeo.risk.perturbed_risk``, ``mc_samples`` draws) it approximates;
- the Hessian trace (Hutch++, ``lsgeo.curvature.hessian_trace``), the top-5 Hessian eigenvalues
  (Lanczos, ``top_eigenvalues``), the saddle index (``saddle_index``: exact below 2000 parameters,
  else stochastic Lanczos quadrature) and the NTK trace (``lsgeo.ntk.ntk_trace``).

Claim tested (Orvieto et al., AISTATS 2023, Sections 2.1-2.2 and Theorem 1): for a ReLU network
D2Phi[I] = 0 almost everywhere, so R_sigma = R_sigma^(eff) + O(sigma^3): the second-order term
sigma^2/2 tr(D2L DPhi DPhi^T) accounts for the effect of small noise on the risk.
The statement is asymptotic: ReLU kinks and the third-order terms of the loss add to R_sigma at
finite sigma. Verdict, on ratio(sigma) = (R_sigma - R) / (R_sigma^(eff) - R) with the Monte Carlo
R_sigma: supported if the ratio at the smallest sigma is within 25% of 1 and |ratio - 1| does not
grow as sigma decreases (beyond 2 Monte Carlo standard errors).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _methods, _runner
from lsgeo import curvature, losses, models, ntk, risk, train
from lsgeo import data as data_lib

QUANTITIES = ("R", "R_eff", "R_sigma_mc", "hessian_trace", "top_eigenvalues", "saddle_index", "ntk_trace")


@dataclasses.dataclass(frozen=True)
class Config:
    """Geometry report of a small MLP trained on digits."""

    widths: tuple[int, ...] = (32, 32)  # hidden widths of the ReLU MLP
    lr: float = 0.1  # full-batch GD step size
    steps: int = 500  # GD steps
    sigmas: tuple[float, ...] = (0.01, 0.03, 0.05, 0.1)  # noise levels for R_sigma^(eff) and R_sigma
    mc_samples: int = 256  # Monte Carlo draws for R_sigma
    trace_probes: int = 60  # Hutch++ matrix-vector products
    saddle_tol: float = 1e-5  # eigenvalues below -tol count as negative
    slq_runs: int = 4  # stochastic Lanczos quadrature probes of the saddle index (above 2000 parameters)
    seeds: tuple[int, ...] = (0,)  # initialisation and probe seeds


def prepare(cfg: Config):
    ds = data_lib.load_dataset("digits")
    model = models.MLP(widths=cfg.widths, num_outputs=ds.num_classes)
    task = _methods.classification_task(model, ds)
    trained = {}
    for seed in cfg.seeds:
        result = train.train(task.objective, optax.sgd(cfg.lr), task.init_params, task.data, num_steps=cfg.steps,
                             eval_fn=task.eval_fn, eval_data=task.eval_data, key=seed)
        trained[seed] = (result.params, {k: float(v[-1]) for k, v in result.history.items()})
    return models.make_predict(model), task, trained


def cells(cfg: Config) -> list[dict]:
    return [dict(quantity=q, seed=s) for s in cfg.seeds for q in QUANTITIES]


def _timed(fn):
    """(value, first-call seconds, second-call seconds) of a jitted ``fn()``."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        value = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return value, times[0], times[1]


def run(cfg: Config, prep, group: list[dict]) -> list[list[dict]]:
    predict, task, trained = prep
    ((quantity, seed),) = {(c["quantity"], c["seed"]) for c in group}
    params, final = trained[seed]
    batch = task.data
    loss = losses.softmax_cross_entropy
    key = jax.random.key(seed)
    f = task.objective

    def row(name, value, t, t_warm, **extra):
        return {"name": name, "value": float(value), "time_s": t, "time_warm_s": t_warm, **extra}

    if quantity == "R":
        value, t, tw = _timed(lambda: jax.jit(risk.risk, static_argnums=(0, 1))(predict, loss, params, batch))
        return [[row("R", value, t, tw, test_acc=final["test_acc"])]]
    if quantity == "R_eff":
        fn = jax.jit(risk.effective_risk, static_argnums=(0, 1))
        out = []
        for s in cfg.sigmas:
            value, t, tw = _timed(lambda: fn(predict, loss, params, batch, jnp.float32(s)))
            out.append(row(f"R_eff sigma={s:g}", value, t, tw, sigma=s))
        return [out]
    if quantity == "R_sigma_mc":
        draws = jax.jit(jax.vmap(lambda p, b, s, k: risk.perturbed_risk(predict, loss, p, b, s, k),
                                 in_axes=(None, None, None, 0)))
        keys = jax.random.split(key, cfg.mc_samples)
        out = []
        for s in cfg.sigmas:
            values, t, tw = _timed(lambda: draws(params, batch, jnp.float32(s), keys))
            mean, se = _runner.mean_se(np.asarray(values))
            out.append(row(f"R_sigma (Monte Carlo) sigma={s:g}", mean, t, tw, sigma=s, mc_se=se))
        return [out]
    if quantity == "hessian_trace":
        value, t, tw = _timed(lambda: curvature.hessian_trace(f, params, batch, key, num_probes=cfg.trace_probes,
                                                              method="hutch++"))
        return [[row("Hessian trace (Hutch++)", value, t, tw)]]
    if quantity == "top_eigenvalues":
        values, t, tw = _timed(lambda: curvature.top_eigenvalues(f, params, batch, key, k=5))
        return [[row(f"Hessian eigenvalue {i + 1}", v, t, tw) for i, v in enumerate(np.asarray(values))]]
    if quantity == "saddle_index":
        value, t, tw = _timed(lambda: curvature.saddle_index(f, params, batch, key, tol=cfg.saddle_tol,
                                                                     num_runs=cfg.slq_runs))
        return [[row("saddle index", value, t, tw)]]
    value, t, tw = _timed(lambda: jax.jit(ntk.ntk_trace, static_argnums=0)(predict, params, batch[0]))
    return [[row("NTK trace", value, t, tw)]]


def summarize(cfg: Config, rows: list[dict]) -> _runner.Verdict:
    seed = cfg.seeds[0]
    by_name = {r["name"]: r for r in rows if r["seed"] == seed}
    R = by_name["R"]["value"]
    figures = {"R": R, "test_acc": by_name["R"]["test_acc"]}
    errors = []
    for s in sorted(cfg.sigmas):
        eff, mc = by_name[f"R_eff sigma={s:g}"], by_name[f"R_sigma (Monte Carlo) sigma={s:g}"]
        ratio = (mc["value"] - R) / (eff["value"] - R)
        figures[f"ratio_sigma={s:g}"] = ratio
        figures[f"R_eff_minus_R_sigma={s:g}"] = eff["value"] - R
        figures[f"R_sigma_mc_minus_R_sigma={s:g}"] = mc["value"] - R
        errors.append((abs(ratio - 1.0), 2 * mc["mc_se"] / abs(eff["value"] - R)))
    monotone = all(small <= large + tol for (small, tol), (large, _) in zip(errors, errors[1:]))
    ok = errors[0][0] < 0.25 and monotone
    for r in rows:
        if r["seed"] == seed and not r["name"].startswith("R"):
            figures[r["name"].replace(" ", "_")] = r["value"]
    table = [{"quantity": r["name"], "value": r["value"], "time_s": r["time_s"], "time_warm_s": r["time_warm_s"]}
             for r in rows if r["seed"] == seed]
    return _runner.Verdict(bool(ok), figures, table)


EXPERIMENT = _runner.Experiment(
    name="geometry_report",
    claim="For a ReLU network, R_sigma^(eff) = R + sigma^2/2 tr(D2L DPhi DPhi^T) accounts for the effect of small "
    "Gaussian weight noise on the risk, R_sigma = R_sigma^(eff) + O(sigma^3) (Sections 2.1-2.2).",
    config=Config,
    prepare=prepare,
    cells=cells,
    run=run,
    summarize=summarize,
)

if __name__ == "__main__":
    _runner.main(EXPERIMENT)
