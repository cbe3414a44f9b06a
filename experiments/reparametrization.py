"""Dinh et al. (2017): sharp minima can be made flat (and flat ones sharp) without changing the function.

Claim: the alpha-scale transform T_alpha(theta_1, theta_2) = (alpha theta_1, theta_2 / alpha) of a
ReLU network leaves its predictions unchanged, while its Hessian becomes D^-1 H D^-1 (D = alpha on
layer 1, 1/alpha on layer 2's kernel): the diagonal blocks scale as alpha^-2 and alpha^2, so
lambda_max, the Hessian trace, epsilon-sharpness and average sharpness move by orders of magnitude;
a scale-invariant (adaptive) sharpness does not move.

Setup: a bias-carrying ReLU MLP (``lsgeo.models.MLP``) trained with full-batch Adam on a subset of
scikit-learn digits (softmax cross-entropy), one network per seed (``lsgeo.train.sweep``). For every
alpha in ``alphas`` (1e-3 .. 1e3) the transformed parameters ``lsgeo.sharpness.alpha_scale(w, 0, 1,
alpha)`` (layer Dense_0 kernel and bias times alpha, Dense_1 kernel over alpha) are compared to w:

- max |f - f_alpha| over the training inputs and outputs, relative to max |f| (float32 rounding);
- the train loss;
- the exact dense Hessian (``lsgeo.curvature.hessian``, m ~ 1k parameters): its trace, its
  largest eigenvalue, the Frobenius norms of the Dense_0 and Dense_1-kernel diagonal blocks, and the
  relative error ||H(T w) - D^-1 H(w) D^-1||_F / ||D^-1 H(w) D^-1||_F of Dinh et al.'s identity;
- lambda_max by Lanczos (``lsgeo.curvature.top_eigenvalues``), checked against the dense value;
- epsilon-sharpness (Keskar et al., radius rho), average sharpness (Gaussian, sigma) and adaptive
  sharpness (Kwon et al., radius rho_adaptive, eta = 0) from ``lsgeo.sharpness``.

Verdict (``discrimination.judge``), exact checks on every trained network, each beside its negative control, which
must fail: ``same_function`` (control: layer 0 scaled by alpha alone, no 1/alpha on layer 1: the function must
change), ``hessian_identity`` (control: the same identity at the one-sided scaling, where it must not hold),
``sharpness_moves`` (control: the same
span test on the adaptive sharpness) and ``adaptive_invariant`` (control: the same invariance test on
epsilon-sharpness).

The invariance is exact in real arithmetic because f(T_alpha w) = f(w) for every w, hence
R(D w) = R(w) and D^2 R(D w) = D^-1 D^2 R(w) D^-1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from experiments import cli, discrimination, experiment, nets, plots, records
from lsgeo import curvature, models, sharpness, train
from lsgeo.data import load_dataset

DIGITS_TRAIN = 1300  # scikit-learn digits: 1797 images, 497 held out for the test split

CLAIM = (
    "Dinh et al.'s alpha-scale transform leaves a ReLU network's function unchanged while scaling its Hessian "
    "blocks by alpha^-2 and alpha^2, so lambda_max, epsilon-sharpness and average sharpness move by orders of "
    "magnitude and only a scale-invariant (adaptive) sharpness stays put (Dinh et al. 2017, Section 4, Theorems "
    "3-5; Kwon et al. 2021 for the adaptive measure)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """A small ReLU MLP on digits, transformed by T_alpha; the defaults run in about a minute on a CPU."""

    alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
    seeds: tuple[int, ...] = (0, 1)
    n_train: int = 200  # digits training points
    widths: tuple[int, ...] = (12, 12)  # m = 1066 parameters: the dense Hessian is cheap
    steps: int = 500  # full-batch Adam steps
    lr: float = 1e-2
    rho: float = 0.05  # epsilon-sharpness radius (l2 ball)
    sigma: float = 0.01  # average-sharpness noise std
    rho_adaptive: float = 0.05  # adaptive-sharpness radius (ball in |w|-relative coordinates)
    sharpness_steps: int = 10  # projected gradient-ascent steps of the sharpness maxima
    sharpness_samples: int = 32  # Monte Carlo samples of the average sharpness
    lanczos_iters: int = 40
    function_rtol: float = 1e-4  # max |f - f_alpha| / max |f| below this counts as unchanged
    hessian_rtol: float = 1e-3  # Dinh's Hessian identity and block scalings hold to this
    moved: float = 100.0  # a measure "moves by orders of magnitude" when max/min over alpha exceeds this
    invariant_rtol: float = 1e-2  # the adaptive measure counts as unchanged within this


PRESETS = {
    "paper": Config(
        seeds=tuple(range(5)), n_train=1300, widths=(32, 32), steps=3000, sharpness_steps=20, sharpness_samples=128
    )
}


def validate(cfg: Config) -> None:
    """Checks beyond the runner's field conventions (``config_checks.check_config``), before a run folder exists."""
    if cfg.n_train > DIGITS_TRAIN:
        raise ValueError(f"--n-train must be <= {DIGITS_TRAIN} (the digits training split), got {cfg.n_train}")
    if 1.0 not in cfg.alphas:
        raise ValueError(f"--alphas must contain 1.0 (the reference point); got {' '.join(map(str, cfg.alphas))}")


def prepare(cfg: Config):
    if 1.0 not in cfg.alphas:
        raise ValueError(f"alphas must contain 1.0 (the reference point), got {cfg.alphas}")
    ds = load_dataset("digits", n_train=cfg.n_train, seed=0)
    return jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)


def make_model(cfg: Config) -> models.MLP:
    return models.MLP(widths=cfg.widths, num_outputs=10, activation="relu")


def train_networks(cfg: Config, batch, seeds):
    """One trained network per seed (full-batch Adam), vmapped; returns params with a leading seed axis."""
    model = make_model(cfg)
    objective = nets.Objective(model)
    result = train.sweep(
        objective,
        lambda seed: optax.adam(cfg.lr),
        nets.init_fn(model, batch[0]),
        batch,
        {},
        list(seeds),
        num_steps=cfg.steps,
    )
    return jax.tree_util.tree_map(lambda a: a[0], result.params)


def scaling_diagonal(params, alpha):
    """The diagonal of D (flattened): alpha on layer 0, 1/alpha on layer 1's kernel, 1 elsewhere."""
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    return ravel_pytree(sharpness.alpha_scale(ones, 0, 1, alpha))[0]


@functools.partial(jax.jit, static_argnames=("objective", "predict", "cfg"))
def measures(objective, predict, cfg: Config, params, batch, alpha, hessian_ref, key):
    """Every measure of the module docstring at T_alpha(params) (``hessian_ref`` = H at alpha = 1)."""
    x, _ = batch
    scaled = sharpness.alpha_scale(params, 0, 1, alpha)
    f, f_alpha = predict(params, x), predict(scaled, x)
    h = curvature.hessian(objective, scaled, batch)
    d_inv = 1.0 / scaling_diagonal(params, alpha)
    predicted = d_inv[:, None] * hessian_ref * d_inv[None, :]
    pattern = scaling_diagonal(params, 2.0)
    block_0, block_1 = pattern == 2.0, pattern == 0.5
    k1, k2 = jax.random.split(key)

    def block_norm(mask):
        return jnp.sqrt(jnp.sum(jnp.where(mask[:, None] & mask[None, :], h * h, 0.0)))

    flat, unravel = ravel_pytree(params)  # the control: layer 0 times alpha alone (not a reparametrisation)
    one_sided = unravel(flat * jnp.where(scaling_diagonal(params, 2.0) == 2.0, alpha, 1.0))
    f_one_sided = predict(one_sided, x)
    h_one_sided = curvature.hessian(objective, one_sided, batch)  # the identity's control: it must not hold here
    return dict(
        one_sided_rel_diff=jnp.max(jnp.abs(f - f_one_sided)) / jnp.max(jnp.abs(f)),
        one_sided_identity_rel_err=jnp.linalg.norm(h_one_sided - predicted) / jnp.linalg.norm(predicted),
        max_abs_diff=jnp.max(jnp.abs(f - f_alpha)),
        rel_max_diff=jnp.max(jnp.abs(f - f_alpha)) / jnp.max(jnp.abs(f)),
        train_loss=objective(scaled, batch),
        lambda_max=curvature.top_eigenvalues(objective, scaled, batch, k1, k=1, num_iters=cfg.lanczos_iters)[0],
        lambda_max_dense=jnp.linalg.eigvalsh(h)[-1],
        hessian_trace=jnp.trace(h),
        block_0_norm=block_norm(block_0),
        block_1_kernel_norm=block_norm(block_1),
        hessian_identity_rel_err=jnp.linalg.norm(h - predicted) / jnp.linalg.norm(predicted),
        epsilon_sharpness=sharpness.epsilon_sharpness(objective, scaled, batch, cfg.rho, steps=cfg.sharpness_steps),
        average_sharpness=sharpness.average_sharpness(
            objective, scaled, batch, cfg.sigma, k2, num_samples=cfg.sharpness_samples
        ),
        adaptive_sharpness=sharpness.adaptive_sharpness(
            objective, scaled, batch, cfg.rho_adaptive, steps=cfg.sharpness_steps
        ),
    )


def cells(cfg: Config):
    return [dict(seed=s) for s in cfg.seeds]


def run(cfg: Config, batch, group):
    model = make_model(cfg)
    objective = nets.Objective(model)
    predict = models.make_predict(model)
    trained = train_networks(cfg, batch, [c["seed"] for c in group])
    out = []
    for i, c in enumerate(group):
        params = jax.tree_util.tree_map(lambda a: a[i], trained)
        hessian_ref = curvature.hessian(objective, params, batch)
        key = jax.random.key(c["seed"])
        rows = []
        for alpha in cfg.alphas:
            m = measures(objective, predict, cfg, params, batch, jnp.float32(alpha), hessian_ref, key)
            rows.append(dict(alpha=alpha, **{k: float(v) for k, v in m.items()}))
        out.append(rows)
    return out


def _span(values) -> float:
    values = np.abs(np.asarray(values, dtype=float))
    return float(values.max() / values.min())


def _block_scaling_err(rows) -> float:
    """max over alpha of |(||H_00(alpha)|| / ||H_00(1)||) alpha^2 - 1| and the same with alpha^-2 for H_11."""
    ref = records.select(rows, alpha=1.0)[0]
    errs = []
    for r in rows:
        a = r["alpha"]
        errs.append(abs(r["block_0_norm"] / ref["block_0_norm"] * a**2 - 1.0))
        errs.append(abs(r["block_1_kernel_norm"] / ref["block_1_kernel_norm"] / a**2 - 1.0))
    return max(errs)


def summarize(cfg: Config, rows):
    per_seed = [records.select(rows, seed=s) for s in cfg.seeds]
    spans = {
        k: min(_span([r[k] for r in rs]) for rs in per_seed)
        for k in ("lambda_max", "hessian_trace", "epsilon_sharpness", "average_sharpness")
    }
    adaptive_dev = max(_span([r["adaptive_sharpness"] for r in rs]) - 1.0 for rs in per_seed)
    figures = {
        "max_rel_function_change": max(r["rel_max_diff"] for r in rows),
        "max_abs_function_change": max(r["max_abs_diff"] for r in rows),
        "max_train_loss_change": max(
            abs(r["train_loss"] - records.select(rows, seed=r["seed"], alpha=1.0)[0]["train_loss"]) for r in rows
        ),
        "max_hessian_identity_rel_err": max(r["hessian_identity_rel_err"] for r in rows),
        "max_block_scaling_rel_err": max(_block_scaling_err(rs) for rs in per_seed),
        "max_lanczos_vs_dense_rel_err": max(abs(r["lambda_max"] / r["lambda_max_dense"] - 1.0) for r in rows),
        **{f"{k}_span": v for k, v in spans.items()},
        "adaptive_sharpness_rel_span": adaptive_dev,
    }
    eps_dev = min(_span([r["epsilon_sharpness"] for r in rs]) - 1.0 for rs in per_seed)
    figures["epsilon_sharpness_rel_span"] = eps_dev
    moved = min(spans["lambda_max"], spans["epsilon_sharpness"], spans["average_sharpness"])
    one_sided = [r["one_sided_rel_diff"] for r in rows if r["alpha"] != 1.0 and "one_sided_rel_diff" in r]
    if one_sided:
        figures["one_sided_min_rel_function_change"] = min(one_sided)
    one_sided_identity = [r["one_sided_identity_rel_err"] for r in rows
                          if r["alpha"] != 1.0 and "one_sided_identity_rel_err" in r]  # fmt: skip
    if one_sided_identity:
        figures["one_sided_min_hessian_identity_rel_err"] = min(one_sided_identity)
    adaptive_span = min(_span([r["adaptive_sharpness"] for r in rs]) for rs in per_seed)
    hessian_ok = max(figures["max_hessian_identity_rel_err"], figures["max_block_scaling_rel_err"]) <= cfg.hessian_rtol
    parts = {
        "same_function": discrimination.Part(
            figures["max_rel_function_change"] <= cfg.function_rtol,
            all(v <= cfg.function_rtol for v in one_sided) if one_sided else None,
            "layer 0 scaled by alpha alone (no 1/alpha on layer 1): not a reparametrisation"),
        "hessian_identity": discrimination.Part(
            hessian_ok, all(v <= cfg.hessian_rtol for v in one_sided_identity) if one_sided_identity else None,
            "the same identity at layer 0 scaled by alpha alone (not a reparametrisation)"),
        "sharpness_moves": discrimination.Part(
            moved >= cfg.moved, adaptive_span >= cfg.moved, "the same span test on the adaptive (scale-invariant) "
            "sharpness"),
        "adaptive_invariant": discrimination.Part(
            adaptive_dev <= cfg.invariant_rtol, eps_dev <= cfg.invariant_rtol, "the same invariance test on "
            "epsilon-sharpness (not scale-invariant)"),
    }  # fmt: skip
    judgement = discrimination.judge(parts)
    supported = judgement.supported
    reason = (
        f"function changes by {figures['max_rel_function_change']:.2g} (relative; needs <= {cfg.function_rtol:g}); "
        f"Hessian identity and block scalings hold to "
        f"{max(figures['max_hessian_identity_rel_err'], figures['max_block_scaling_rel_err']):.2g} "
        f"(needs {cfg.hessian_rtol:g}); lambda_max, epsilon- and average sharpness span "
        f"{moved:.3g}x or more (needs {cfg.moved:g}x); adaptive sharpness moves {adaptive_dev:.2g} (needs <= "
        f"{cfg.invariant_rtol:g}); controls: one-sided scaling changes the function by "
        f"{min(one_sided) if one_sided else float('nan'):.2g} or more and misses the Hessian identity by "
        f"{min(one_sided_identity) if one_sided_identity else float('nan'):.2g} or more, adaptive sharpness spans {adaptive_span:.3g}x, "
        f"epsilon-sharpness moves {eps_dev:.3g}"
    )
    if not one_sided and supported is True:
        supported, reason = None, f"no one-sided control in the rows: cannot tell whether the test discriminates; {reason}"
    reason += "; " + judgement.reason + "; power: exact checks (no sampling noise); Dinh et al. (2017, Section 4) " \
        "show the sharpness moving without bound in alpha: here by 1e4x or more over alpha in [1e-3, 1e3]"
    columns = (
        "alpha",
        "rel_max_diff",
        "train_loss",
        "lambda_max",
        "hessian_trace",
        "block_0_norm",
        "block_1_kernel_norm",
        "epsilon_sharpness",
        "average_sharpness",
        "adaptive_sharpness",
    )
    table = [{k: r[k] for k in columns} for r in records.select(rows, seed=cfg.seeds[0])]
    reason += (
        f"; every bound must hold for each of the {len(cfg.seeds)} trained networks: T_alpha is an exact identity, so "
        "a deterministic check on one network already decides it for that network (no averaging, no test)"
    )
    dinh = "Dinh et al. 2017, Section 4: T_alpha leaves f unchanged (exactly) and moves the sharpness without bound"
    power = {
        "same_function": discrimination.Power(cfg.function_rtol, None, " (relative output change)", dinh, "tolerance"),
        "hessian_identity": discrimination.Power(cfg.hessian_rtol, None, " (relative error)", dinh, "tolerance"),
        "sharpness_moves": discrimination.Power(cfg.moved, None, "x (span over alpha)", dinh, "tolerance"),
        "adaptive_invariant": discrimination.Power(cfg.invariant_rtol, None, " (relative span)", "Kwon et al. 2021: "
                                                   "adaptive sharpness is invariant to T_alpha (exactly)", "tolerance"),
    }  # fmt: skip
    return experiment.Verdict(supported, figures, table, reason, judgement.controls,
                              {n: p.record() for n, p in power.items()})  # fmt: skip


def plot(cfg: Config, rows: list[dict]) -> dict:
    rows = records.select(rows, seed=cfg.seeds[0])
    alphas = np.array([r["alpha"] for r in rows])
    ref = records.select(rows, alpha=1.0)[0]
    fig, axes = plots.plt.subplots(1, 4, figsize=(21, 4.5))
    # 1. the same function: the largest change of the outputs, relative to their size
    moved = [r for r in rows if r["alpha"] != 1.0]  # alpha = 1 is the identity: a change of exactly 0
    axes[0].plot([r["alpha"] for r in moved], [r["rel_max_diff"] for r in moved], "o", color="k",
                 label="T_alpha: max |f_alpha - f| / max |f| (alpha != 1)")  # fmt: skip
    if moved and "one_sided_rel_diff" in moved[0]:
        axes[0].plot([r["alpha"] for r in moved], [r["one_sided_rel_diff"] for r in moved], "s", color="tab:gray",
                     label="control: layer 0 x alpha alone")  # fmt: skip
    axes[0].axhline(cfg.function_rtol, color="gray", ls=":", label=f"bound {cfg.function_rtol:g} (float32 rounding)")
    # the Hessian identity D^2 R(T_alpha w) = D^-1 D^2 R(w) D^-1, judged beside the same identity at the one-sided scaling
    axes[0].plot([r["alpha"] for r in moved], [r["hessian_identity_rel_err"] for r in moved], "^", color="tab:blue",
                 label="Hessian identity: relative error at T_alpha")  # fmt: skip
    if moved and "one_sided_identity_rel_err" in moved[0]:
        axes[0].plot([r["alpha"] for r in moved], [r["one_sided_identity_rel_err"] for r in moved], "v",
                     color="tab:cyan", label="control: the identity at layer 0 x alpha alone")  # fmt: skip
    axes[0].axhline(cfg.hessian_rtol, color="tab:blue", ls=":", lw=1, label=f"identity bound {cfg.hessian_rtol:g}")
    axes[0].set(xscale="log", yscale="log", ylim=(1e-10, 1e4), xlabel="alpha",
                ylabel="relative change of the outputs / relative error",
                title="T_alpha keeps the function and the Hessian identity")  # fmt: skip
    # 2. curvature measures, each relative to its value at alpha = 1
    for key in ("lambda_max", "hessian_trace"):
        axes[1].plot(alphas, [abs(r[key] / ref[key]) for r in rows], "o-", label=f"{key} / its value at alpha=1")
    axes[1].set(xscale="log", yscale="log", xlabel="alpha", ylabel="relative to alpha = 1",
                title="Hessian measures change arbitrarily")  # fmt: skip
    # 3. sharpness measures, relative to alpha = 1: the plain ones move, the adaptive one does not
    for key in ("epsilon_sharpness", "average_sharpness", "adaptive_sharpness"):
        axes[2].plot(alphas, [abs(r[key] / ref[key]) for r in rows], "o-", label=f"{key} / its value at alpha=1")
    axes[2].set(xscale="log", yscale="log", xlabel="alpha", ylabel="relative to alpha = 1",
                title="sharpness: plain moves, adaptive (|w|-scaled) stays at 1")  # fmt: skip
    # 4. the Hessian blocks scale exactly as Dinh et al. say
    axes[3].plot(alphas, [r["block_0_norm"] / ref["block_0_norm"] for r in rows], "o", label="||H_00|| / ||H_00(1)||")
    axes[3].plot(alphas, [r["block_1_kernel_norm"] / ref["block_1_kernel_norm"] for r in rows], "s",
                 label="||H_11|| / ||H_11(1)||")  # fmt: skip
    axes[3].plot(alphas, alphas**-2.0, "k--", lw=1, label="alpha^-2")
    axes[3].plot(alphas, alphas**2.0, "k:", lw=1, label="alpha^2")
    axes[3].set(xscale="log", yscale="log", xlabel="alpha", ylabel="block norm relative to alpha = 1",
                title="Hessian diagonal blocks (Dinh et al.)")  # fmt: skip
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: the points fill it
    for ax in axes[1:]:
        ax.legend(fontsize=8)
    fig.suptitle(f"Dinh et al.'s T_alpha on a trained MLP (seed {cfg.seeds[0]})")
    fig.tight_layout()
    return {"reparametrization.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
