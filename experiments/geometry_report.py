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

Claim tested, stated exactly (Orvieto et al., AISTATS 2023, Sections 2.1-2.2; ``experiments.taylor_order``):
for Gaussian weight noise, R_sigma = R + sigma^2/2 tr(Hessian of R) + O(sigma^4) when R is smooth (the odd
orders vanish by symmetry), and the Hessian of R is the Gauss-Newton matrix J^T D2L J plus
sum_k dL/dPhi_k D2Phi_k. The paper's R_sigma^(eff) keeps the Gauss-Newton trace: for ReLU nets tr(D2Phi_k) = 0
wherever it exists, so R_sigma - R_sigma^(eff) = O(sigma^3) is claimed, but kinks crossed by the noise,
averaged over the data, can add an O(sigma^2) term. Measured on trained networks (``seeds``) of each
``activations`` entry: the remainders r(sigma) = R_sigma - R - sigma^2/2 tr(C), C the Hessian and the
Gauss-Newton matrix, by Monte Carlo with antithetic pairs and the quadratic form as control variate (float64,
``mc_samples`` pairs, common draws across sigma), and their order p, the least-squares slope of log|r|
against log sigma over ``sigmas``, one per network.

Verdict (``discrimination.judge``), for the smooth activation (the first that is not ReLU): the Hessian
remainder's order is above 2.5 (the second-order term is exactly sigma^2/2 tr(Hessian)), a one-sample t
test over the networks (``verdicts.paired_gain`` of p - 2.5, 95% Student-t); negative control: the same test
on the Gauss-Newton remainder must fail (for a smooth net R_eff misses sigma^2/2 sum_k dL/dPhi_k tr(D2Phi_k),
an O(sigma^2) term: if its order also came out above 2.5 the test would not tell the right second-order
term from a wrong one). For ReLU the order of R_sigma - R_sigma^(eff) is reported with its interval, not
judged. Power: the minimum detectable effect of the order test against the source's order 3 (0.5 above 2.5).
The other quantities (and the spectrum panels) are those of the first ReLU network.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli, discrimination, experiment, nets, plots, taylor_order, verdicts
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
    "For a smooth network, the second-order term of small Gaussian weight noise on the risk is exactly "
    "sigma^2/2 tr(Hessian of R): R_sigma - R - sigma^2/2 tr(Hessian) has order above 2.5 in sigma, while the "
    "Gauss-Newton trace of R_sigma^(eff) leaves an O(sigma^2) remainder; for ReLU networks (tr D2Phi = 0 a.e., "
    "Sections 2.1-2.2) the order of R_sigma - R_sigma^(eff) is reported as measured."
)

ORDER_SPLIT = 2.5  # between a second-order remainder (2) and the higher orders the expansion predicts (3 or 4)
SOURCE = "Orvieto et al. 2023, Sections 2.1-2.2: remainder O(sigma^3), judged against order 2.5"


@dataclasses.dataclass(frozen=True)
class Config:
    """Geometry report of a small MLP trained on digits."""

    widths: tuple[int, ...] = (32, 32)  # hidden widths of the ReLU MLP
    lr: float = 0.1  # full-batch GD step size
    steps: int = 500  # GD steps
    activations: tuple[Literal["tanh", "softplus", "gelu", "relu"], ...] = ("tanh", "relu")  # a smooth one first
    sigmas: tuple[float, ...] = (0.005, 0.01, 0.02, 0.04)  # noise levels: the order fit, R_sigma^(eff), R_sigma
    mc_samples: int = 256  # Monte Carlo draws for R_sigma (antithetic pairs for the remainders)
    trace_probes: int = 60  # Hutch++ matrix-vector products
    saddle_rtol: float = 1e-3  # eigenvalues below -saddle_rtol * max|lambda| count as negative
    max_dense: int = 4000  # the saddle index is exact (dense Hessian) up to this many parameters, else SLQ
    slq_runs: int = 4  # stochastic Lanczos quadrature probes (density; saddle index above max_dense)
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation and probe seeds: one trained network each


def validate(cfg: Config) -> None:
    """Checks beyond the runner's field conventions, before a run folder exists."""
    if "relu" not in cfg.activations or all(a == "relu" for a in cfg.activations):
        raise ValueError(f"--activations must hold relu and a smooth one; got {' '.join(cfg.activations)}")
    if len(cfg.sigmas) < 2:
        raise ValueError(f"--sigmas needs at least 2 values to fit an order; got {' '.join(map(str, cfg.sigmas))}")


def _smooth(cfg: Config) -> str:
    return next(a for a in cfg.activations if a != "relu")


def cells(cfg: Config) -> list[dict]:
    report = [dict(quantity=q, activation="relu", seed=s) for s in cfg.seeds for q in QUANTITIES]
    return report + [dict(quantity="remainder", activation=a, seed=s) for a in cfg.activations for s in cfg.seeds]


def prepare(cfg: Config):
    data = nets.splits("digits", n_train=None, flatten=True)
    trained = {}
    for activation, seed in ((a, s) for a in cfg.activations for s in cfg.seeds):
        model = models.MLP(widths=cfg.widths, num_outputs=data.num_classes, activation=activation)
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
        trained[activation, seed] = (model, result.params, {k: float(v[-1]) for k, v in result.history.items()})
    return data, trained


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


EDGE_HISTOGRAM = "eigenvalue count near the negative edge (dense)"  # figure rows, not a reported quantity
FIGURE_ROWS = ("spectral density", EDGE_HISTOGRAM)


def edge_histogram(eigenvalues, rtol: float, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the exact eigenvalues on the window [-3 w, 1.5 w], w = max(|lambda_min|, rtol
    max|lambda|): the negative edge where the saddle index counts, which an SLQ density broadened by the whole
    spectrum's width cannot resolve (it is flat there)."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    width = 3.0 * max(abs(eigenvalues.min()), rtol * np.abs(eigenvalues).max())
    return np.histogram(eigenvalues, np.linspace(-width, width / 2, bins + 1))


def _saddle_name(cfg: Config, m: int) -> str:
    how = "exact" if m <= cfg.max_dense else f"SLQ, {cfg.slq_runs} probes"
    return f"saddle index ({how}; eigenvalues < -{cfg.saddle_rtol:g} max|lambda|)"


def run(cfg: Config, prep, group: list[dict]) -> list[list[dict]]:
    data, trained = prep
    ((quantity, activation, seed),) = {(c["quantity"], c["activation"], c["seed"]) for c in group}
    model, params, final = trained[activation, seed]
    predict, loss, batch, key = (
        models.make_predict(model),
        losses.softmax_cross_entropy,
        data.train,
        jax.random.key(seed),
    )
    f = nets.Objective(model)
    if quantity == "remainder":
        with jax.enable_x64(True):  # r(sigma) is a small difference of risks
            as64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)
            out = taylor_order.remainders(predict, loss, as64(params), (as64(batch[0]), batch[1]), cfg.sigmas,
                                          jax.random.fold_in(key, 1), cfg.mc_samples)  # fmt: skip
        return [[
            {"name": f"remainder {kind} sigma={s:g}", "kind": kind, "sigma": s, "value": float(m), "mc_se": float(e)}
            for kind, (mean, se) in out.items() for s, m, e in zip(cfg.sigmas, mean, se)
        ]]  # fmt: skip
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
        out = [_row(_saddle_name(cfg, optax.tree.size(params)), value, t, tw, rtol=cfg.saddle_rtol)]
        if seed == cfg.seeds[0] and optax.tree.size(params) <= cfg.max_dense:  # the figure's zoom: exact eigenvalues
            eigenvalues = jax.jit(lambda p: jnp.linalg.eigvalsh(curvature.hessian(f, p, batch)))(params)
            counts, edges = edge_histogram(eigenvalues, cfg.saddle_rtol)
            out += [_row(EDGE_HISTOGRAM, c, 0.0, 0.0, eigenvalue=float(lo), bin_width=float(hi - lo),
                         num_params=optax.tree.size(params))
                    for c, lo, hi in zip(counts, edges[:-1], edges[1:])]  # fmt: skip
        return [out]
    value, t, tw = _timed(lambda: jax.jit(ntk.ntk_trace, static_argnums=0)(predict, params, batch[0]))
    return [[_row("NTK trace", value, t, tw)]]


def remainder_curves(cfg: Config, rows: list[dict], activation: str, kind: str) -> np.ndarray:
    """``[seeds, sigmas]`` Monte Carlo estimates of r(sigma) for ``kind`` ("hessian", "gauss_newton")."""
    sel = [r for r in rows if r["quantity"] == "remainder" and r["activation"] == activation and r["kind"] == kind]
    return np.array([[next(r["value"] for r in sel if r["seed"] == k and r["sigma"] == s) for s in cfg.sigmas]
                     for k in cfg.seeds])  # fmt: skip


def orders(cfg: Config, rows: list[dict], activation: str, kind: str) -> np.ndarray:
    """The fitted order of r(sigma), one per network (seed)."""
    return np.array([taylor_order.fit_order(cfg.sigmas, r) for r in remainder_curves(cfg, rows, activation, kind)])


def _interval(values) -> tuple[float, float, float]:
    """Mean and the 95% Student-t interval over the networks (NaN bounds with fewer than 2)."""
    mean, se = verdicts.mean_se(values)
    t = verdicts.t_critical(len(values))
    return mean, mean - t * se, mean + t * se


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    report = [r for r in rows if r["quantity"] != "remainder"]
    first = [r for r in report if r["seed"] == cfg.seeds[0] and r["name"] not in FIGURE_ROWS]
    by_name = {r["name"]: r for r in first}
    figures = {"R": by_name["R"]["value"], "test_acc": by_name["R"]["test_acc"]}
    table, intervals = [], {}
    for a in cfg.activations:
        for kind in taylor_order.KINDS:
            p = orders(cfg, rows, a, kind)
            mean, lo, hi = intervals[a, kind] = _interval(p)
            figures.update({f"order_{a}_{kind}": mean, f"order_{a}_{kind}_lo": lo, f"order_{a}_{kind}_hi": hi})
            for k, v in zip(cfg.seeds, p):
                figures[f"order_{a}_{kind}_seed={k}"] = v
            curve = remainder_curves(cfg, rows, a, kind)[0]
            table.append({"quantity": f"order of R_sigma - R - sigma^2/2 tr({'H' if kind == 'hessian' else 'GN'}), {a}",
                          "value": mean, "interval": f"[{lo:.3g}, {hi:.3g}]",
                          "r_smallest_sigma": float(curve[0])})  # fmt: skip
    for r in first:
        if not r["name"].startswith("R"):
            figures[r["name"].split(" (")[0].replace(" ", "_")] = r["value"]
    table += [{"quantity": r["name"], "value": r["value"], "time_s": r["time_s"], "time_warm_s": r["time_warm_s"]}
              for r in first]  # fmt: skip
    smooth = _smooth(cfg)
    split = np.full(len(cfg.seeds), ORDER_SPLIT)
    claim = verdicts.paired_gain(orders(cfg, rows, smooth, "hessian"), split)
    control = verdicts.paired_gain(orders(cfg, rows, smooth, "gauss_newton"), split)
    part = discrimination.Part(claim, control, f"the Gauss-Newton trace in place of the Hessian's ({smooth})")
    judgement = discrimination.judge({"second_order_term": part})
    power = discrimination.Power.of(claim, 3.0 - ORDER_SPLIT, " (order)", SOURCE)
    supported, power_clause = discrimination.with_power(judgement.supported, {"second_order_term": power})
    fmt = lambda a, k: "{:.3g} [{:.3g}, {:.3g}]".format(*intervals[a, k])
    reason = "; ".join([
        f"{smooth}: order of R_sigma - R - sigma^2/2 tr(Hessian) {fmt(smooth, 'hessian')} (95% t interval over "
        f"{len(cfg.seeds)} networks; needs > {ORDER_SPLIT}: " + claim.describe("order - 2.5") + ")",
        f"control: order with the Gauss-Newton trace (R_sigma - R_eff) {fmt(smooth, 'gauss_newton')} (must not be "
        f"> {ORDER_SPLIT}: " + control.describe("order - 2.5") + ")",
        f"relu (reported, not judged): order of R_sigma - R_eff {fmt('relu', 'gauss_newton')}, with the Hessian "
        f"trace {fmt('relu', 'hessian')}",
        judgement.reason, power_clause,
    ])  # fmt: skip
    powers = {"second_order_term": power.record()}
    return experiment.Verdict(supported, figures, table, reason, judgement.controls, powers)


def plot(cfg: Config, rows: list[dict]) -> dict:
    fig, axes = plots.plt.subplots(1, 4, figsize=(24, 5))
    ax, ax_z, ax_r, ax_o = axes
    first = [r for r in rows if r["seed"] == cfg.seeds[0] and r["quantity"] != "remainder"]
    density = [r for r in first if r["name"] == "spectral density"]
    by_name = {r["name"]: r for r in first}
    top = by_name["Hessian eigenvalue 1"]["value"]
    lam_min = by_name["smallest Hessian eigenvalue (Lanczos)"]["value"]
    threshold = -cfg.saddle_rtol * top
    grid = np.array([r["eigenvalue"] for r in density])
    values = np.array([max(r["value"], 1e-8) for r in density])
    index = next(r for r in first if r["name"].startswith("saddle index"))
    histogram = [r for r in first if r["name"] == EDGE_HISTOGRAM]
    how = index["name"].split("(")[1].split(";")[0]
    edge_lines = {"lambda_min": f"lambda_min (Lanczos) = {lam_min:.3g}",
                  "threshold": f"saddle threshold -{cfg.saddle_rtol:g} lambda_max = {threshold:.2g}"}  # fmt: skip
    # the zoom on the negative edge: the exact eigenvalues (dense Hessian) where they were computed, the broadened
    # SLQ density (flat on this window) otherwise
    for a in (ax,) if histogram else (ax, ax_z):
        a.plot(grid, values, color="C0", label="SLQ density (broadened)")
        a.set(yscale="log", ylim=(1e-6, None), xlabel="Hessian eigenvalue", ylabel="density (SLQ, broadened)")
    for a in (ax, ax_z):
        a.axvline(lam_min, color="C2", ls="--", lw=1.5, label=edge_lines["lambda_min"])
        a.axvline(threshold, color="C3", ls=":", lw=2, label=edge_lines["threshold"])
    ax.set_title(f"Hessian spectrum, trained ReLU MLP (seed {cfg.seeds[0]})\nlambda_max {top:.3g}")
    ax.legend(fontsize=8, loc="upper right")
    if histogram:
        lo = np.array([r["eigenvalue"] for r in histogram])
        counts = np.array([r["value"] for r in histogram])
        bin_width = histogram[0]["bin_width"]
        ax_z.bar(lo, np.maximum(counts, 0.5), width=bin_width, align="edge", color="C0", alpha=0.7,
                 label="exact eigenvalues (dense Hessian); empty bins drawn at 0.5")  # fmt: skip
        ax_z.set(yscale="log", ylim=(0.4, None), xlim=(lo[0], lo[-1] + bin_width), xlabel="Hessian eigenvalue",
                 ylabel="eigenvalues per bin")  # fmt: skip
        below = int(round(index["value"] * histogram[0]["num_params"]))
        ax_z.set_title(f"the negative edge: saddle index {index['value']:.3g} ({how}; about {below} eigenvalues "
                       f"below the threshold)", fontsize=10)  # fmt: skip
        ax_z.legend(fontsize=8, loc="upper left")
    else:
        width = 3 * max(abs(lam_min), abs(threshold))  # the negative edge, where the index is counted
        ax_z.set_xlim(-width, width / 2)
        ax_z.set_title(f"zoom on the negative edge: saddle index {index['value']:.3g}\n({how})", fontsize=10)
        ax_z.legend(fontsize=8, loc="lower left")
    sig = np.asarray(cfg.sigmas)
    styles = {"hessian": "-", "gauss_newton": "--"}
    for i, a in enumerate(cfg.activations):
        for kind, style in styles.items():
            r = np.abs(remainder_curves(cfg, rows, a, kind))
            name = "tr(Hessian)" if kind == "hessian" else "tr(Gauss-Newton) (R_eff)"
            ax_r.plot(sig, np.median(r, 0), style, marker="o", color=f"C{i}", label=f"{a}, {name}")
            ax_r.fill_between(sig, r.min(0), r.max(0), color=f"C{i}", alpha=0.15, lw=0)
    anchor = np.abs(remainder_curves(cfg, rows, cfg.activations[0], "gauss_newton")).mean(0)[0]
    for p, ls in ((2, ":"), (3, "-."), (4, (0, (1, 3)))):
        ax_r.plot(sig, anchor * (sig / sig[0]) ** p, color="gray", ls=ls, lw=1, label=f"slope {p}")
    plots.sigma_axis(ax_r, cfg.sigmas)
    ax_r.set(yscale="log", ylabel="|R_sigma - R - sigma^2/2 tr(C)|",
             title="remainder of the second-order term\n(median and min-max over networks)")  # fmt: skip
    ax_r.legend(fontsize=7)
    labels, y = [], 0
    for i, a in enumerate(cfg.activations):
        for kind, marker in (("hessian", "o"), ("gauss_newton", "s")):
            p = orders(cfg, rows, a, kind)
            mean, lo, hi = _interval(p)
            ax_o.errorbar([mean], [y], xerr=[[mean - lo], [hi - mean]], marker=marker, color=f"C{i}", capsize=4)
            ax_o.scatter(p, np.full(p.shape, y + 0.15), color=f"C{i}", s=10, alpha=0.6)
            labels.append(f"{a}, {'Hessian' if kind == 'hessian' else 'Gauss-Newton'}")
            y += 1
    ax_o.axvline(ORDER_SPLIT, color="k", ls=":", label=f"judged against {ORDER_SPLIT}")
    ax_o.set_yticks(range(len(labels)), labels)
    ax_o.set(xlabel="fitted order p of the remainder", title="order: mean and 95% t interval over networks\n"
             f"(dots: networks; judged: {_smooth(cfg)}, Hessian > {ORDER_SPLIT}; control: Gauss-Newton)")  # fmt: skip
    ax_o.legend(fontsize=8)
    return {"geometry_report.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__)

if __name__ == "__main__":
    cli.main(EXPERIMENT)
