"""Noise injection on a diagonal network solves a weighted Lasso (Section 2.3).

Claim (Orvieto et al., AISTATS 2023, Eqs. 7-8): for the diagonal network Phi(w) = X (w1^2 - w2^2)
with the squared loss, R_sigma^(eff) = R + 2 sigma^2 diag(X^T X/n)^T (w1^2 + w2^2), whose minimiser
gives beta = w1^2 - w2^2 solving the Lasso

    min_beta 1/(2n) ||y - X beta||^2 + sum_k lambda_k |beta_k|,  lambda = 2 sigma^2 diag(X^T X / n),

so gradient descent with noise injection (gradient at w + sigma eps) finds that Lasso solution.
For this model R_sigma = R_sigma^(eff) + 2 sigma^4 ||X||_F^2 / n exactly (a constant), so the
noisy iterates target the Lasso solution itself; what remains is the SGD fluctuation of the
noisy gradient, which a decaying step size removes as steps grow.

Setup: ``lsgeo.data.sparse_linear`` (n = 40 < d = 100, 5 non-zero N(0, 1) coefficients, label noise
0.1), ``lsgeo.models.DiagonalNet`` started at w1 = w2 = 0.1. Four solutions per sigma:
  ``lasso``: scikit-learn's ``Lasso`` with per-feature penalties lambda_k, by column rescaling
             (X_k -> X_k / lambda_k, alpha = 1, beta_k = beta~_k / lambda_k), tol 1e-12;
  ``eff``:   full-batch GD on R_sigma^(eff) (``lsgeo.theory.diagonal_net_effective_risk``);
  ``noise``: full-batch GD with full noise injection (``lsgeo.optim.noise_injection``), cosine-decayed
             step size; one run per seed;
  ``gd``:    the negative control: the same GD without noise (one run; it is deterministic).
Recorded: the relative L2 distance ||beta - beta_lasso|| / ||beta_lasso|| over training, the final
coefficients, and support recovery: the s largest |beta_k| are exactly the Lasso's s non-zero
coefficients (GD on a diagonal net drives the others towards 0 without reaching it, so the support
is read by rank, not by a threshold). Noisy GD's iterates fluctuate by about 0.01 at the end, below
which it cannot resolve a coefficient: its support recovery is judged on the Lasso coefficients above
``support_fraction`` of the largest (the exact-support recovery is recorded too).

Verdict, every sigma, all parts (``discrimination.judge``), each beside its negative control, plain GD
(which minimises R, not the Lasso objective: an interpolating solution when n < d):
  ``eff``:  GD on R_sigma^(eff) ends within 5% of the Lasso solution with its exact support
            (deterministic); control: plain GD must not;
  ``near``: noisy GD ends within ``near`` (relative distance, default 0.1) of the Lasso solution, paired over
            10 seeds (``verdicts.paired_gain`` of near - distance, 95% Student-t, Holm over the parts); control:
            plain GD must not be within ``near``.
A run whose GD on R_eff still moves at the end is null (too few steps). The earlier parts "the distance
decreases during training" and "the large coefficients are recovered" are recorded, not judged: plain GD
passes both (any decaying step size approaches something; the large coefficients are the truth's).
Power: the minimum detectable effect of the ``near`` rule at the run's spread against ``near`` itself (the
theorem's distance is 0, so the effect the rule must see is ``near``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.linear_model import Lasso

from experiments import cli, discrimination, experiment, plots, records, training, verdicts
from lsgeo import data as data_lib
from lsgeo import losses, models, theory, train

METHODS = ("lasso", "eff", "noise", "gd")
LABELS = {"lasso": "scikit-learn weighted Lasso", "eff": "GD on R_sigma^(eff)", "noise": "GD + noise injection",
          "gd": "plain GD (control)"}  # fmt: skip
COLORS = {"lasso": "black", "eff": "tab:green", "noise": "tab:blue", "gd": "tab:gray"}

CLAIM = (
    "Noise injection on a diagonal network minimises a Lasso with weights 2 sigma^2 diag(X^T X/n): "
    "training on R_sigma^(eff) reaches scikit-learn's weighted Lasso solution and noisy GD ends near it, where "
    "plain GD does not (Section 2.3)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Section 2.3: diagonal net + noise injection against scikit-learn's weighted Lasso."""

    n_train: int = 40  # training points (n < d: overparametrised)
    d: int = 100  # features
    num_nonzero: int = 5  # non-zero coefficients of beta*
    label_noise: float = 0.1  # std of the label noise
    init_scale: float = 0.1  # w1 = w2 = init_scale at the start
    sigmas: tuple[float, ...] = (0.1, 0.2, 0.3)  # noise levels (Lasso weights 2 sigma^2 diag(X^T X/n))
    lr: float = 0.1  # GD step size (peak of the cosine schedule for noise injection)
    steps: int = 4000  # GD steps
    eval_every: int = 100  # steps between evaluations
    support_fraction: float = 0.1  # noisy GD's support: Lasso coefficients above this fraction of the largest
    near: float = 0.1  # noisy GD must end within this relative distance of the Lasso solution (plain GD must not)
    seeds: tuple[int, ...] = tuple(range(10))  # noise seeds of the noise-injection runs (10: t = 2.26)


PRESETS = {"paper": Config(n_train=100, d=500, num_nonzero=10, steps=20_000, eval_every=500)}


def sklearn_lasso(X, y, sigma) -> np.ndarray:
    """argmin 1/(2n)||y - X b||^2 + sum_k lambda_k |b_k|, lambda = 2 sigma^2 diag(X^T X/n), by rescaling."""
    lam = np.asarray(theory.lasso_weights(jnp.asarray(X), sigma), np.float64)
    Xs = np.asarray(X, np.float64) / lam
    fit = Lasso(alpha=1.0, fit_intercept=False, tol=1e-12, max_iter=1_000_000).fit(Xs, np.asarray(y, np.float64))
    return fit.coef_ / lam


def validate(cfg: Config) -> None:
    """Checks beyond the runner's field conventions (``config_checks.check_config``), before a run folder exists."""
    if cfg.num_nonzero > cfg.d:
        raise ValueError(f"--num-nonzero {cfg.num_nonzero} exceeds --d {cfg.d}")


def prepare(cfg: Config):
    ds = data_lib.sparse_linear(
        n_train=cfg.n_train, n_test=1, d=cfg.d, num_nonzero=cfg.num_nonzero, noise=cfg.label_noise, seed=0
    )
    refs = {s: sklearn_lasso(ds.x_train, ds.y_train, s) for s in cfg.sigmas}
    return jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), refs, ds.extras["beta_star"]


def cells(cfg: Config) -> list[dict]:
    return [
        dict(method=m, sigma=float(s), seed=int(k))
        for m in METHODS
        for s in cfg.sigmas
        for k in (cfg.seeds if m == "noise" else cfg.seeds[:1])
    ]


def _beta(params):
    return theory.diagonal_net_to_lasso(params["w1"], params["w2"])


def _eval(params, ref):
    return {"rel_dist": jnp.linalg.norm(_beta(params) - ref) / jnp.linalg.norm(ref)}


def _coef_rows(step: int, beta) -> list[dict]:
    return [{"step": step, "index": k, "beta": float(b)} for k, b in enumerate(np.asarray(beta))]


def run(cfg: Config, prep, group: list[dict]) -> list[list[dict]]:
    X, y, refs, _ = prep
    ((method, sigma),) = {(c["method"], c["sigma"]) for c in group}
    if method == "lasso":
        return [_coef_rows(cfg.steps, refs[sigma])]
    model = models.DiagonalNet(d=cfg.d, init_scale=cfg.init_scale)
    predict = models.make_predict(model)
    w0 = model.init(jax.random.key(0), X[:1])["params"]
    ref = jnp.asarray(refs[sigma], jnp.float32)
    kwargs = dict(num_steps=cfg.steps, eval_every=cfg.eval_every, eval_fn=_eval, eval_data=ref)
    if method == "eff":

        def objective(params, batch):
            return theory.diagonal_net_effective_risk(params["w1"], params["w2"], batch[0], batch[1], sigma)

        result = train.train(objective, optax.sgd(cfg.lr), w0, (X, y), **kwargs)
        return [records.history_rows(result.history) + _coef_rows(cfg.steps, _beta(result.params))]

    def objective(params, batch):
        return losses.squared_loss(predict(params, batch[0]), batch[1])

    schedule = optax.cosine_decay_schedule(cfg.lr, cfg.steps)
    if method == "gd":  # the control: the same step-size schedule, no noise
        result = train.train(objective, optax.sgd(schedule), w0, (X, y), **kwargs)
        return [records.history_rows(result.history) + _coef_rows(cfg.steps, _beta(result.params))]
    seeds = [c["seed"] for c in group]
    result = train.sweep(
        objective, training.optimizer_fn("noise", optax.sgd(schedule)), w0, (X, y), {"sigma": [sigma]}, seeds, **kwargs
    )
    return [
        records.history_rows(result.history, (0, j))
        + _coef_rows(cfg.steps, _beta({k: v[0, j] for k, v in result.params.items()}))
        for j in range(len(seeds))
    ]


CONVERGED = 1e-3  # GD on R_eff has converged when its relative distance moves less over the last evaluation


def _still_moving(rows, sigma, steps, eval_every) -> float:
    """|change| of GD on R_eff's relative distance to the Lasso solution over the last ``eval_every`` steps
    (inf with a single evaluation)."""
    end, before = (_curve(rows, "eff", sigma, t) for t in (steps, steps - eval_every))
    return float(abs(end.mean() - before.mean())) if before.size else float("inf")


def _final_betas(cfg, rows, method, sigma) -> np.ndarray:
    """[num_runs, d] final coefficients."""
    coef = [r for r in records.select(rows, method=method, sigma=sigma) if "index" in r]
    runs = sorted({r["seed"] for r in coef})
    return np.array([[r["beta"] for r in coef if r["seed"] == k] for k in runs])


def _support(beta, ref, fraction: float = 0.0) -> np.ndarray:
    """|beta_k| > fraction max |ref| (fraction 0: the non-zero coefficients)."""
    return np.abs(beta) > fraction * np.max(np.abs(ref))


def support_recovered(beta, ref, fraction: float = 0.0) -> bool:
    """Whether the s largest |beta_k| are exactly the s coefficients of the Lasso solution ``ref`` with
    |ref_k| > fraction max |ref| (fraction 0: its exact support, s = its number of non-zeros)."""
    support = _support(ref, ref, fraction)
    top = np.argsort(-np.abs(np.asarray(beta)))[: int(support.sum())]
    return bool(set(top.tolist()) == set(np.flatnonzero(support).tolist()))


def _curve(rows, method, sigma, step) -> np.ndarray:
    """The relative distance to the Lasso solution at ``step``, one value per run."""
    return np.array(
        [r["rel_dist"] for r in records.select(rows, method=method, sigma=sigma, step=step) if "rel_dist" in r]
    )


def _solution(cfg, rows, method, sigma, ref) -> dict:
    """Final relative distance to the Lasso solution ``ref`` (one per run) and support recovery of ``method``."""
    betas = _final_betas(cfg, rows, method, sigma)
    return {
        "dist": np.linalg.norm(betas - ref, axis=1) / np.linalg.norm(ref),
        "same_support": float(np.mean([support_recovered(b, ref) for b in betas])),
        "large_support": float(np.mean([support_recovered(b, ref, cfg.support_fraction) for b in betas])),
    }


SOURCE = "Orvieto et al. 2023, Eqs. 7-8: noisy GD targets the weighted Lasso solution (distance 0)"


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    figures, table, parts, powers, notes, moving = {}, [], {}, {}, [], {}
    quarter = cfg.steps // 4 // cfg.eval_every * cfg.eval_every
    for s in cfg.sigmas:
        ref = _final_betas(cfg, rows, "lasso", s)[0]
        figures[f"lasso_nnz_sigma={s:g}"] = int(_support(ref, ref).sum())
        sol = {m: _solution(cfg, rows, m, s, ref) for m in ("eff", "noise", "gd")}
        for m, v in sol.items():
            figures[f"{m}_rel_dist_sigma={s:g}"] = float(v["dist"].mean())
            figures[f"{m}_same_support_sigma={s:g}"] = v["same_support"]
            figures[f"{m}_large_support_sigma={s:g}"] = v["large_support"]
            table.append({"sigma": s, "method": LABELS[m], "rel_dist": float(v["dist"].mean()),
                          "rel_dist_se": verdicts.mean_se(v["dist"])[1], "same_support": v["same_support"],
                          "large_support": v["large_support"], "lasso_nnz": int(_support(ref, ref).sum())})  # fmt: skip
        early = _curve(rows, "noise", s, quarter)
        figures[f"noise_rel_dist_at_{quarter}_sigma={s:g}"] = float(early.mean())
        exact = {m: bool(sol[m]["dist"].mean() < 0.05 and sol[m]["same_support"] == 1.0) for m in ("eff", "gd")}
        parts[f"eff_sigma={s:g}"] = discrimination.Part(
            exact["eff"], exact["gd"], "plain GD within 5% with the support"
        )
        near = verdicts.paired_gain(cfg.near - sol["noise"]["dist"], np.zeros_like(sol["noise"]["dist"]))
        gd_near = bool(sol["gd"]["dist"].mean() < cfg.near)
        parts[f"near_sigma={s:g}"] = discrimination.Part(near, gd_near, f"plain GD within {cfg.near:g}")
        powers[f"near_sigma={s:g}"] = discrimination.Power.of(near, cfg.near, "", SOURCE)
        moving[s] = _still_moving(rows, s, cfg.steps, cfg.eval_every)
        notes.append(
            f"sigma {s:g}: GD on R_eff {100 * sol['eff']['dist'].mean():.2g}% from the Lasso (needs 5%), support "
            f"{'recovered' if exact['eff'] else 'NOT recovered'}; plain GD {100 * sol['gd']['dist'].mean():.3g}% "
            f"(must not be within 5% with the support: {'fails' if not exact['gd'] else 'PASSES'}); "
            + near.describe(f"noisy GD's margin to --near {cfg.near:g}")
            + f"; plain GD's distance {sol['gd']['dist'].mean():.3g} (must exceed {cfg.near:g})"
        )
    judgement = discrimination.judge(parts)
    supported, power_clause = discrimination.with_power(judgement.supported, powers)
    reasons = [*notes, judgement.reason, power_clause]
    unconverged = {s: v for s, v in moving.items() if v > CONVERGED}
    if unconverged:  # too few steps to reach any minimiser: the run cannot tell, whatever its numbers
        supported = None
        listed = ", ".join(f"sigma {s:g}: {v:.2g}" for s, v in unconverged.items())
        reasons.insert(0, f"not converged, cannot test the claim: GD on R_eff still moves at the end "
                          f"(change of its relative distance over the last {cfg.eval_every} steps {listed}, "
                          f"needs < {CONVERGED:g}); run more --steps")  # fmt: skip
    return experiment.Verdict(
        supported, figures, table, "; ".join(reasons), judgement.controls, {k: p.record() for k, p in powers.items()}
    )


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"wspace": 0.3})
    refs = {s: _final_betas(cfg, rows, "lasso", s)[0] for s in cfg.sigmas}
    active = np.flatnonzero(np.any([_support(r, r, 0.01) for r in refs.values()], axis=0))
    styles = {"lasso": "-", "eff": "--", "noise": ":"}
    colors = plt.get_cmap("tab20" if len(active) > 10 else "tab10")(np.arange(len(active)))  # one colour per k
    for k, color in zip(active, colors):
        for m, style in styles.items():
            betas = [_final_betas(cfg, rows, m, s)[:, k].mean() for s in cfg.sigmas]
            ax.plot(cfg.sigmas, betas, style, marker="o" if m == "lasso" else None, ms=3, color=color)
    handles = [plt.Line2D([], [], color="k", ls=style, label=LABELS[m]) for m, style in styles.items()]
    handles += [plt.Line2D([], [], color=c, lw=3, label=f"k={k}") for k, c in zip(active, colors)]
    ax.set(xlabel="sigma", ylabel="coefficient beta_k", xticks=cfg.sigmas,
           title="Lasso coefficients above 1% of the largest\n(noisy GD: seed mean)")  # fmt: skip
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    steps = np.array(sorted({r["step"] for r in rows if "rel_dist" in r}))
    for i, s in enumerate(cfg.sigmas):
        for m, style in (("eff", "--"), ("gd", "-."), ("noise", "-")):
            runs = np.array([_curve(rows, m, s, t) for t in steps])  # [steps, runs]
            ax_d.plot(steps, runs.mean(1), style, color=f"C{i}", label=f"{LABELS[m]}, sigma={s:g}")
            if runs.shape[1] > 1:
                ax_d.fill_between(steps, runs.min(1), runs.max(1), color=f"C{i}", alpha=0.2, lw=0)
    ax_d.axhline(cfg.near, color="k", lw=0.8, ls=":", label=f"--near {cfg.near:g} (judged at the end)")
    ax_d.set(yscale="log", xlabel="GD step", ylabel="||beta - beta_lasso|| / ||beta_lasso||",
             title="distance to the Lasso solution\n(noisy GD: mean, band min-max over seeds)")  # fmt: skip
    ax_d.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    return {"lasso.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
