"""Escaping a strict saddle: GD, SGD, momentum, Adam and GD with noise injection (full and layer-wise).

Claim (seed 001, Section 2): most critical points of a non-convex loss are saddles, and first-order
methods leave a strict saddle: plain GD only at the rate set by the most negative Hessian
eigenvalue (each factor of W_2 W_1 grows like (1 + lr |lambda_min|)^t from its initial size delta),
while injected noise, momentum and adaptive steps (Adam) leave it sooner. Minibatch SGD is reported
but not judged: at this saddle its gradient noise vanishes with the gradient (X^T (Y - X W^T) W_2
is O(delta) on every batch), so it is expected to behave like GD.

Setup: a two-layer linear network Phi = W_2 W_1 x (``lsgeo.models.LinearNet``, no biases, hidden
width h) on multivariate regression data Y = X M* + noise (``lsgeo.data.low_rank_regression``),
squared loss R = 1/(2n) ||Y - X W_1^T W_2^T||^2. At w = 0 the gradient vanishes and the Hessian is
[[0, B], [B^T, 0]] with B built from Sigma = X^T Y / n: its eigenvalues are +-s_i(Sigma), each h
times, and zeros, so w = 0 is a strict saddle with index h rank(Sigma) / m (1/3 here). Every run
starts at w_0 = delta * eps, eps ~ N(0, I) (``init_scale`` = delta), the same w_0 for every method at
a given seed, and runs ``steps`` steps (``lsgeo.train.sweep``, vmapped over seeds).

A run has *escaped* at the first evaluated step t with R(w_t) <= R(0) - escape_fraction (R(0) - R*),
R* the least-squares minimum (reachable since h >= min(d_in, d_out)). After the first saddle a run
may pass further saddles (one per singular value of Sigma, "saddle-to-saddle" dynamics); the final
saddle index and most negative eigenvalue are reported, not judged. Every ``eval_every`` steps
the exact dense Hessian at the clean iterate (``lsgeo.curvature.hessian``) gives the most negative
eigenvalue and the saddle index (the fraction of eigenvalues below -tol, as
``lsgeo.curvature.saddle_index(method="exact")`` counts it). Noise injection
(``lsgeo.optim.noise_injection``) is evaluated at the clean iterate w_t.

Matched step sizes (the comparison is of the methods, not of larger steps): heavy-ball momentum runs at step
lr (1 - beta), so its effective step lr / (1 - beta) is GD's lr (``momentum_lr``); noise injection's sigma is the
starting distance per coordinate, ``init_scale`` (a sigma far above it moves the start instead); Adam moves about
adam_lr per coordinate whatever the gradient's size, so its part is judged against *normalised GD* of the same step
length (adam_lr sqrt(m), direction g / |g|) as its baseline, in place of GD: what remains is Adam's adaptivity, not
its normalisation (normalised GD alone escapes ~400 steps before GD).

Verdict (``discrimination.judge``): every judged method escapes in every run (control: GD started exactly at the
saddle, ``gd_at_saddle``, whose gradient is zero, must not); GD escapes at the rate set by lambda_min
(``escape_rate``: the growth rate of R(0) - R(w_t) in the linear phase within ``rate_rtol`` of
2 log(1 + lr |lambda_min|) in every run; control: the same test against the rate of 1.25 |lambda_min| must fail);
and for each of noise (full, layer-wise), momentum and Adam the escape step of its baseline minus its own (GD; for
Adam, normalised GD), paired over seeds (the same w_0 per seed, ``verdicts.paired_gain``, 95% Student-t, one
evaluation interval as the resolution), exceeds its margin, beside its negative control, which must fail the same
test: the baseline from other starting points in the method's place (``gd_control``, ``normalized_gd_control``;
``discrimination.control_seeds``). False when a method does not escape, GD's rate is off, or a method escapes
later than its baseline beyond the margin after Holm's correction (``verdicts.combine``); null otherwise, or when a
control passes too ("does not discriminate"). Power: the minimum detectable effect of each comparison in steps (the
source gives no escape times to compare with).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli, discrimination, experiment, nets, plots, records, verdicts
from lsgeo import curvature, models, optim, train
from lsgeo.data import low_rank_regression
from lsgeo.losses import squared_loss

METHODS = ("gd", "sgd", "momentum", "adam", "noise_full", "noise_layerwise", "normalized_gd", "gd_control",
           "normalized_gd_control", "gd_at_saddle")
FASTER = ("noise_full", "noise_layerwise", "momentum", "adam")  # the methods the claim says leave the saddle sooner
BASELINES = {  # part -> the run it must beat: GD, or for Adam normalised GD of Adam's step length (module doc)
    "noise_full": "gd", "noise_layerwise": "gd", "momentum": "gd", "adam": "normalized_gd"}
CONTROLS = {  # part -> the run that replaces the method in its negative control, and what it is
    "noise_full": ("gd_control", "plain GD from other starting points in place of the method"),
    "noise_layerwise": ("gd_control", "plain GD from other starting points in place of the method"),
    "momentum": ("gd_control", "plain GD from other starting points in place of the method"),
    "adam": ("normalized_gd_control", "normalised GD (Adam's step length, direction g/|g|) from other starting "
                                      "points in place of Adam"),
}
CONTROL_RUNS = ("gd_control", "normalized_gd_control")
AT_SADDLE = "gd_at_saddle"  # GD started exactly at w = 0: zero gradient, it cannot move (the escape test's control)
RATE_CONTROL_FACTOR = 1.25  # the rate test's control: the same test against the rate of 1.25 |lambda_min|
SOURCE = "seed 001, Section 2 (qualitative: no escape times given)"

CLAIM = (
    "Started next to a strict saddle, every method leaves it, GD only at the rate 2 log(1 + lr |lambda_min|) set by "
    "the most negative Hessian eigenvalue, while at matched step sizes noise injection (full and layer-wise, sigma "
    "on the scale of the starting distance), heavy-ball momentum (at GD's effective step lr) and Adam (beyond what "
    "its normalised step length alone gives) leave it in fewer steps (seed 001, Section 2)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Six optimizers started next to the saddle w = 0 of a linear net; defaults run in about two minutes on a CPU."""

    methods: tuple[Literal[METHODS], ...] = METHODS
    seeds: tuple[int, ...] = tuple(range(8))
    n_train: int = 64
    d_in: int = 6
    d_out: int = 3
    hidden: int = 6  # h; m = h (d_in + d_out) = 54 parameters
    rank: int = 3  # rank of M*
    init_scale: float = 1e-4  # delta, distance of w_0 from the saddle (per coordinate)
    steps: int = 600  # momentum at matched effective step escapes by ~560 (GD by ~440)
    eval_every: int = 10
    lr: float = 0.01  # GD, SGD and the SGD inside noise injection
    momentum: float = 0.9
    momentum_lr: float | None = None  # heavy ball's step (None: lr (1 - momentum): its effective step lr/(1-b) = lr)
    adam_lr: float = 0.01  # also the per-coordinate step of the normalised-GD control (length adam_lr sqrt(m))
    batch_size: int = 8  # SGD
    sigma: float | None = None  # noise-injection std (None: init_scale, the scale of the starting distance)
    escape_fraction: float = 0.5  # escaped once half of the gap R(0) - R* is closed
    rate_rtol: float = 0.1  # GD's measured escape rate must be within this of 2 log(1 + lr |lambda_min|)
    eigen_tol: float = 1e-5  # eigenvalues below -tol count as negative


PRESETS = {"paper": Config(seeds=tuple(range(32)), n_train=256, d_in=32, d_out=16, hidden=32, rank=8, steps=3000)}


def validate(cfg: Config) -> None:
    """Checks beyond the runner's field conventions (``config_checks.check_config``), before a run folder exists."""
    if not 0 < cfg.escape_fraction < 1:
        raise ValueError(
            f"--escape-fraction must be in (0, 1), the fraction of the gap R(0) - R* closed at escape; "
            f"got {cfg.escape_fraction}"
        )
    if cfg.rank > min(cfg.d_in, cfg.d_out):
        raise ValueError(f"--rank {cfg.rank} exceeds min(--d-in, --d-out) = {min(cfg.d_in, cfg.d_out)}")
    if cfg.hidden < min(cfg.d_in, cfg.d_out):
        raise ValueError(
            f"--hidden {cfg.hidden} must be >= min(--d-in, --d-out) = {min(cfg.d_in, cfg.d_out)}, "
            "so that the least-squares minimum R* is reachable"
        )


def prepare(cfg: Config):
    for m in cfg.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    ds = low_rank_regression(n_train=cfg.n_train, n_test=1, d_in=cfg.d_in, d_out=cfg.d_out, rank=cfg.rank, seed=0)
    return jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)


def landmarks(batch):
    """(R(0), R*): the loss at the saddle and the least-squares minimum."""
    x, y = batch
    w_ls = jnp.linalg.lstsq(x, y)[0]
    return float(squared_loss(jnp.zeros_like(y), y)), float(squared_loss(x @ w_ls, y))


def optimizer_fn(cfg: Config, method: str):
    """``(sigma, seed) -> optax transformation`` for ``lsgeo.train.sweep``."""

    def make(sigma, seed):
        if method in ("gd", "sgd", "gd_control", AT_SADDLE):
            return optax.sgd(cfg.lr)
        if method == "momentum":
            return optax.sgd(momentum_lr(cfg), momentum=cfg.momentum)
        if method == "adam":
            return optax.adam(cfg.adam_lr)
        if method in ("normalized_gd", "normalized_gd_control"):
            return normalized_gd(cfg.adam_lr * np.sqrt(num_params(cfg)))
        mode = "full" if method == "noise_full" else "layerwise"
        return optim.noise_injection(optax.sgd(cfg.lr), sigma, mode=mode, seed=seed)

    return make


def momentum_lr(cfg: Config) -> float:
    """Heavy ball's step: ``momentum_lr``, or lr (1 - momentum) so that its effective step lr / (1 - momentum) (the
    step of a constant gradient at steady state) is GD's lr: the comparison is of the method, not of a larger step."""
    return cfg.lr * (1.0 - cfg.momentum) if cfg.momentum_lr is None else cfg.momentum_lr


def noise_sigma(cfg: Config) -> float:
    """The noise-injection std: ``sigma``, or ``init_scale``, the per-coordinate scale of w_0 - 0 (a noise far above
    the starting distance moves the start, rather than helping a run leave the saddle it started next to)."""
    return cfg.init_scale if cfg.sigma is None else cfg.sigma


def num_params(cfg: Config) -> int:
    """m = h (d_in + d_out): the parameters of the bias-free two-layer linear net."""
    return cfg.hidden * (cfg.d_in + cfg.d_out)


def normalized_gd(step_length: float) -> optax.GradientTransformation:
    """w <- w - step_length g / |g|: Adam's step length (about adam_lr per coordinate, adam_lr sqrt(m) in all, while
    the gradient keeps its sign) without its per-coordinate adaptivity: the control of the Adam part."""
    return optax.stateless(
        lambda g, _: optax.tree.scale(-step_length / jnp.maximum(optax.tree.norm(g), 1e-30), g)
    )


def curvature_metrics(objective, tol: float):
    """``eval_fn`` of the sweep: the most negative Hessian eigenvalue and the saddle index.

    Both come from one dense Hessian (``lsgeo.curvature.hessian``, m = 54 by default): the index is the count of
    ``lsgeo.curvature.saddle_index(method="exact", tol=tol)``, computed from the same eigenvalues
    (a second dense Hessian, or a Lanczos run for lambda_min, would triple the compile time)."""

    def eval_fn(params, batch):
        eigs = jnp.linalg.eigvalsh(curvature.hessian(objective, params, batch))
        return dict(lambda_min=eigs[0], saddle_index=jnp.mean(eigs < -tol))

    return eval_fn


def cells(cfg: Config):
    return [dict(method=m, seed=run_seed(m, s)) for m in cfg.methods for s in cfg.seeds]


def run_seed(method: str, seed: int) -> int:
    """The starting point of ``method``'s run paired with ``seed``: the A/A control starts elsewhere."""
    return discrimination.control_seeds([seed])[0] if method in CONTROL_RUNS else seed


def run(cfg: Config, batch, group):
    method = group[0]["method"]
    model = models.LinearNet(d1=cfg.hidden, d_out=cfg.d_out)
    objective = nets.Objective(model, "squared_loss")

    scale = 0.0 if method == AT_SADDLE else cfg.init_scale

    def init(key):  # w_0 = delta * eps, the same for every method at a given seed (gd_control: other seeds)
        w = nets.init_fn(model, batch[0])(key)
        return optax.tree.scale(scale, optax.tree.random_like(key, w, jax.random.normal))

    result = train.sweep(
        objective,
        optimizer_fn(cfg, method),
        init,
        batch,
        {"sigma": [noise_sigma(cfg)]},
        [c["seed"] for c in group],
        num_steps=cfg.steps,
        eval_every=cfg.eval_every,
        batch_size=cfg.batch_size if method == "sgd" else None,
        eval_fn=curvature_metrics(objective, cfg.eigen_tol),
        eval_data=batch,
    )
    h = {k: np.asarray(v[0]) for k, v in result.history.items()}
    return [
        [
            dict(
                step=int(h["step"][i, t]),
                train_loss=float(h["train_loss"][i, t]),
                lambda_min=float(h["lambda_min"][i, t]),
                saddle_index=float(h["saddle_index"][i, t]),
            )
            for t in range(h["step"].shape[1])
        ]
        for i in range(len(group))
    ]


def escape_step(rows, threshold: float) -> float:
    """First evaluated step with train loss <= threshold (inf if none)."""
    below = [r["step"] for r in rows if r["train_loss"] <= threshold]
    return float(min(below)) if below else float("inf")


RATE_WINDOW = (1e-4, 1e-1)  # the linear escape phase: fraction of the gap R(0) - R* closed


def escape_rate(rows, r0: float, r_star: float) -> float:
    """The growth rate per step of R(0) - R(w_t) in the linear phase (closed fraction in ``RATE_WINDOW``): the
    slope of its logarithm against t (NaN with fewer than 3 points). Near the saddle W_2 W_1 grows like
    (1 + lr |lambda_min|)^(2t) along the top mode, and R(0) - R(w) is linear in W_2 W_1, so GD's rate is
    2 log(1 + lr |lambda_min|)."""
    t = np.array([r["step"] for r in rows], dtype=float)
    closed = (r0 - np.array([r["train_loss"] for r in rows])) / (r0 - r_star)
    window = (closed > RATE_WINDOW[0]) & (closed < RATE_WINDOW[1])
    if window.sum() < 3:
        return float("nan")
    return float(np.polyfit(t[window], np.log(closed[window]), 1)[0])


def _method_table(cfg: Config, rows, threshold: float):
    table = []
    for m in cfg.methods:
        runs = [records.select(rows, method=m, seed=run_seed(m, s)) for s in cfg.seeds]
        steps = np.array([escape_step(r, threshold) for r in runs])
        finals = [r[-1] for r in runs]
        table.append(
            dict(
                method=m,
                escaped=float(np.mean(np.isfinite(steps))),
                median_escape_step=float(np.median(steps)),
                min_escape_step=float(steps.min()),
                max_escape_step=float(steps.max()),
                start_lambda_min=float(np.mean([r[0]["lambda_min"] for r in runs])),
                start_saddle_index=float(np.mean([r[0]["saddle_index"] for r in runs])),
                final_loss=float(np.median([f["train_loss"] for f in finals])),
                final_lambda_min=float(min(f["lambda_min"] for f in finals)),
                final_saddle_index=float(max(f["saddle_index"] for f in finals)),
            )
        )
    return table


def summarize(cfg: Config, rows):
    r0, r_star = landmarks(prepare(cfg))
    threshold = r0 - cfg.escape_fraction * (r0 - r_star)
    table = _method_table(cfg, rows, threshold)
    by = {t["method"]: t for t in table}
    figures = {"loss_at_saddle": r0, "loss_min": r_star, "escape_threshold": threshold}
    for t in table:
        for k in ("escaped", "median_escape_step", "final_saddle_index", "final_lambda_min"):
            figures[f"{t['method']}_{k}"] = t[k]
    figures["saddle_lambda_min"] = float(np.mean([t["start_lambda_min"] for t in table]))
    figures["saddle_index_at_start"] = float(np.mean([t["start_saddle_index"] for t in table]))
    rate_ok, rate_control = None, None
    rate_reason = "GD's escape rate not measured (no gd run, or no negative eigenvalue)"
    if "gd" in by and figures["saddle_lambda_min"] < 0:
        # GD's linearised escape: R(0) - R(w_t) grows like (1 + lr |lambda_min|)^(2t)
        predicted = 2.0 * np.log1p(cfg.lr * abs(figures["saddle_lambda_min"]))
        rates = np.array([escape_rate(records.select(rows, method="gd", seed=k), r0, r_star) for k in cfg.seeds])
        figures["gd_escape_steps_per_e_fold"] = 1.0 / np.log1p(cfg.lr * abs(figures["saddle_lambda_min"]))
        figures["gd_escape_rate_predicted"] = float(predicted)
        figures["gd_escape_rate_min"], figures["gd_escape_rate_max"] = float(np.min(rates)), float(np.max(rates))
        err = np.abs(rates / predicted - 1.0)
        # a run whose linear phase has too few evaluations (NaN rate) cannot test the rate: null, not false
        rate_ok = bool(np.all(err <= cfg.rate_rtol)) if np.all(np.isfinite(err)) else None
        shifted = 2.0 * np.log1p(cfg.lr * RATE_CONTROL_FACTOR * abs(figures["saddle_lambda_min"]))
        rate_control = bool(np.all(np.abs(rates / shifted - 1.0) <= cfg.rate_rtol)) if rate_ok is not None else None
        figures["gd_escape_rate_control_predicted"] = float(shifted)
        rate_reason = (
            f"GD's escape rate (slope of log(R(0) - R) while 1e-4 to 1e-1 of the gap is closed) "
            f"{np.min(rates):.3g}-{np.max(rates):.3g} per step over {len(rates)} seeds vs 2 log(1 + lr |lambda_min|) = "
            f"{predicted:.3g} (needs within {100 * cfg.rate_rtol:g}% in every run); control: against the rate of "
            f"{RATE_CONTROL_FACTOR:g} |lambda_min|, {shifted:.3g}, the same test "
            f"{'passes too' if rate_control else 'fails, as it must'}"
        )
    faster = [m for m in FASTER if m in by]
    if "gd" not in by or not faster:
        return experiment.Verdict(
            None, figures, table, "needs gd and one of noise_full, noise_layerwise, momentum, adam"
        )
    steps = {
        m: np.array([escape_step(records.select(rows, method=m, seed=run_seed(m, s)), threshold) for s in cfg.seeds])
        for m in by
    }
    gains = {m: verdicts.paired_gain(steps[BASELINES[m]], steps[m], resolution=cfg.eval_every)
             for m in faster if BASELINES[m] in steps}  # fmt: skip
    # a run too short for GD (the slowest, by the claim) to escape cannot test the claim: null, not false
    judged = [t for t in table if t["method"] in ("gd", *faster)]  # the controls are not judged
    all_escape = all(t["escaped"] == 1.0 for t in judged) or (None if by["gd"]["escaped"] < 1.0 else False)
    too_short = f"GD did not escape within --steps {cfg.steps} in every run: too short to test the claim"
    at_saddle = by[AT_SADDLE]["escaped"] == 1.0 if AT_SADDLE in by else None
    parts = {
        "all_escape": discrimination.Part(all_escape, at_saddle, "GD started exactly at the saddle (zero gradient: "
                                          "it cannot leave)" if at_saddle is not None else "not run: cannot tell"),
        "gd_rate": discrimination.Part(rate_ok, rate_control, f"the same test against the rate of "
                                       f"{RATE_CONTROL_FACTOR:g} |lambda_min|"),
    }  # fmt: skip
    powers = {}
    for m, g in gains.items():
        control, description = CONTROLS[m]
        control_gain = (verdicts.paired_gain(steps[BASELINES[m]], steps[control], resolution=cfg.eval_every)
                        if control in steps else None)  # fmt: skip
        parts[m] = discrimination.Part(g, control_gain, description if control in steps else
                                       f"not run (needs {control} in --methods): cannot tell")  # fmt: skip
        figures[f"{m}_escape_gain"], figures[f"{m}_escape_gain_se"] = g.mean, g.se
        if control_gain is not None:
            figures[f"{m}_control_escape_gain"] = control_gain.mean
        powers[m] = discrimination.Power.of(g, None, " steps", SOURCE)
        figures[f"{m}_mde_steps"] = powers[m].mde
    judgement = discrimination.judge(parts)
    unrun = [m for m in gains if parts[m].control is None]
    supported = judgement.supported
    settings = (f"matched step sizes: momentum lr {momentum_lr(cfg):.3g} (effective step lr/(1-b) = "
                f"{momentum_lr(cfg) / (1 - cfg.momentum):.3g} vs GD's {cfg.lr:g}), noise sigma {noise_sigma(cfg):.3g} "
                f"(starting distance per coordinate {cfg.init_scale:g}), Adam lr {cfg.adam_lr:g} against normalised "
                f"GD of the same step length {cfg.adam_lr * np.sqrt(num_params(cfg)):.3g}")  # fmt: skip
    reasons = [settings, f"{sum(t['escaped'] == 1.0 for t in table)}/{len(table)} runs escaped in every seed "
               f"({AT_SADDLE}, the escape test's control, must not)",
               rate_reason]  # fmt: skip
    reasons += [too_short] if all_escape is None else []
    for m, g in gains.items():
        reasons.append(g.describe(f"escape step, {BASELINES[m]} minus {m}", unit=" steps"))
        if parts[m].control is not None:
            reasons.append(parts[m].control.describe(
                f"control ({CONTROLS[m][0]}): {BASELINES[m]} minus {CONTROLS[m][0]}", unit=" steps"))
    if unrun and supported is True:
        supported = None
        reasons.append(f"no control run for {', '.join(unrun)}: cannot tell whether the test discriminates")
    _, power_clause = discrimination.with_power(supported, powers)
    reasons += [judgement.reason, power_clause]
    return experiment.Verdict(supported, figures, table, "; ".join(reasons), judgement.controls,
                              {k: p.record() for k, p in powers.items()})  # fmt: skip


def plot(cfg: Config, rows: list[dict]) -> dict:
    r0, r_star = landmarks(prepare(cfg))
    fig, axes = plots.plt.subplots(1, 4, figsize=(22, 4.8))
    floor = 1e-3  # of the gap: below it every run has long escaped; a lower axis squeezes the escape region
    for i, m in enumerate(cfg.methods):
        runs = [records.select(rows, method=m, seed=run_seed(m, s)) for s in cfg.seeds]
        steps = [r["step"] for r in runs[0]]
        ls = "--" if m in ("sgd", "noise_layerwise") else "-"
        for ax, key in zip(axes, ("train_loss", "lambda_min", "saddle_index")):
            values = np.array([[r[key] for r in run] for run in runs])
            if key == "train_loss":
                values = np.clip((values - r_star) / (r0 - r_star), floor, None)
            ax.plot(steps, np.median(values, axis=0), color=f"C{i}", ls=ls, label=m)
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=f"C{i}", alpha=0.15, lw=0)
    axes[0].axhline(1 - cfg.escape_fraction, color="k", ls=":", lw=1, label="escaped")
    axes[0].set(yscale="log", ylim=(floor, 1.5), xlabel="step", ylabel="(R(w_t) - R*) / (R(0) - R*)",
                title=f"loss gap left (median, band: min-max over {len(cfg.seeds)} seeds)")  # fmt: skip
    axes[1].set(xlabel="step", ylabel="lambda_min(H)", title="most negative Hessian eigenvalue")
    axes[2].set(xlabel="step", ylabel="fraction of negative eigenvalues", title="saddle index")
    axes[0].legend(fontsize=7)
    threshold = r0 - cfg.escape_fraction * (r0 - r_star)
    steps = {m: np.array([escape_step(records.select(rows, method=m, seed=run_seed(m, s)), threshold)
                          for s in cfg.seeds]) for m in cfg.methods}  # fmt: skip
    # (run, its baseline): each judged method, then each control run in place of the methods it controls
    pairs = [(m, BASELINES[m]) for m in FASTER] + list({CONTROLS[m][0]: BASELINES[m] for m in FASTER}.items())
    shown = {f"{b} minus {m}": verdicts.paired_gain(steps[b], steps[m], resolution=cfg.eval_every)
             for m, b in pairs if m in steps and b in steps}  # fmt: skip
    if shown:
        mde = {f"{b} minus {m}": discrimination.minimum_detectable_effect(shown[f"{b} minus {m}"])
               for m, b in pairs if m in FASTER and f"{b} minus {m}" in shown}  # fmt: skip
        controls = [f"{b} minus {m}" for m, b in pairs if m in CONTROL_RUNS]
        plots.gain_panel(axes[3], shown, controls=controls, unit="steps", mde=mde)
        axes[3].set_title("judged: escape step of the baseline minus the method's\n(supported when the bar is above "
                          "0; controls in grey must not be)", fontsize=9)  # fmt: skip
        if any(np.isfinite(v) for v in mde.values()):  # the MDE diamond is its only labelled artist
            axes[3].legend(fontsize=7)
    return {"saddle_escape.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
