"""Each experiment's verdict rule (``summarize``) on constructed rows: a run that meets the claim is supported, and
each way of missing it (a quantity just beyond its bound, on the other side of each inequality) is not.

No training here: the rows are what ``run`` would return, built by hand, so every test is instant and would fail
if an inequality in a ``summarize`` were flipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import (
    double_descent,
    geometry_report,
    lasso,
    nuclear_norm,
    resnet,
    wide_networks,
)

# ---------------------------------------------------------------- nuclear_norm


def _nuclear_rows(cfg, layer_scale=1.0, layer_rank=2, layer_objective=7.01, gd_rank=16, gd_objective=7.3):
    sv = [14.0, 9.0, 0.0, 0.0, 0.0, 0.0]
    rows = [dict(method="prox", step=cfg.prox_iters, rank=2, objective=7.0, **{f"sv_{i}": v for i, v in enumerate(sv)})]
    for m, scale, rank, objective in (("gd", 1.03, gd_rank, gd_objective),
                                      ("layer", layer_scale, layer_rank, layer_objective)):  # fmt: skip
        for k in cfg.seeds:
            values = [v * scale for v in sv[:2]] + [0.05 if rank > 2 else 0.0] * 4
            rows.append(dict(method=m, seed=k, step=cfg.steps, rank=rank, objective=objective,
                             **{f"sv_{i}": v for i, v in enumerate(values)}))  # fmt: skip
    return rows


def test_nuclear_norm_verdict():
    cfg = nuclear_norm.Config()
    verdict = nuclear_norm.summarize(cfg, _nuclear_rows(cfg))
    assert verdict.supported is True and all(c["discriminates"] for c in verdict.controls.values())
    # plain GD reaches the rank or the optimum too: the test does not discriminate
    assert nuclear_norm.summarize(cfg, _nuclear_rows(cfg, gd_rank=2)).supported is None
    assert nuclear_norm.summarize(cfg, _nuclear_rows(cfg, gd_objective=7.02)).supported is None
    # the claim fails
    assert nuclear_norm.summarize(cfg, _nuclear_rows(cfg, layer_rank=3)).supported is False  # not low rank
    assert nuclear_norm.summarize(cfg, _nuclear_rows(cfg, layer_objective=7.2)).supported is False  # not optimal
    # singular values 10% off are recorded, not judged (plain GD's 3% would pass that check too)
    assert nuclear_norm.summarize(cfg, _nuclear_rows(cfg, 1.10)).figures["layer_sv_max_rel_err"] > 0.09


# ---------------------------------------------------------------- lasso


def _lasso_rows(cfg, *, eff_scale=1.0, end_dist=0.02, off_support=0.0, eff_moves=0.0, gd_scale=0.5):
    """Rows of a lasso run: the Lasso solution, GD on R_eff (scaled), noisy GD (at ``end_dist`` from it, with a
    spurious coefficient ``off_support``) and the plain-GD control (the solution scaled by ``gd_scale``)."""
    rng = np.random.default_rng(0)
    ref = np.zeros(cfg.d)
    ref[:3] = [1.0, -0.8, 0.5]
    quarter = cfg.steps // 4 // cfg.eval_every * cfg.eval_every
    coef = lambda beta, **f: [dict(f, step=cfg.steps, index=k, beta=float(b)) for k, b in enumerate(beta)]
    rows = []
    for s in cfg.sigmas:
        rows += coef(ref, method="lasso", sigma=s, seed=cfg.seeds[0])
        rows += [
            dict(method="eff", sigma=s, seed=cfg.seeds[0], step=t, rel_dist=0.01 + eff_moves * (t == cfg.steps))
            for t in sorted({quarter, cfg.steps - cfg.eval_every, cfg.steps})
        ]
        rows += coef(ref * eff_scale, method="eff", sigma=s, seed=cfg.seeds[0])
        rows += coef(ref * gd_scale, method="gd", sigma=s, seed=cfg.seeds[0])
        for k in cfg.seeds:
            direction = rng.normal(0, 1, cfg.d)
            scale = end_dist * np.linalg.norm(ref) * (1 + rng.normal(0, 0.05))
            beta = ref + scale * direction / np.linalg.norm(direction)
            beta[-1] += off_support
            rows.append(dict(method="noise", sigma=s, seed=k, step=quarter, rel_dist=0.5 + rng.normal(0, 0.02)))
            rows += coef(beta, method="noise", sigma=s, seed=k)
    return rows


def test_lasso_verdict():
    cfg = lasso.Config(d=8, sigmas=(0.1, 0.2), steps=400, eval_every=100, seeds=tuple(range(5)))
    verdict = lasso.summarize(cfg, _lasso_rows(cfg))  # claims hold, plain GD (half the solution) fails both
    assert verdict.supported is True
    assert all(c["discriminates"] for c in verdict.controls.values()) and set(verdict.controls) == {
        "eff_sigma=0.1", "near_sigma=0.1", "eff_sigma=0.2", "near_sigma=0.2"}  # fmt: skip
    assert all(p["detectable"] and p["mde"] < cfg.near for p in verdict.power.values())
    # the control passes too (plain GD lands on the Lasso solution): the test does not discriminate
    loose = lasso.summarize(cfg, _lasso_rows(cfg, gd_scale=1.0))
    assert loose.supported is None and "does not discriminate" in loose.reason
    assert lasso.summarize(cfg, _lasso_rows(cfg, gd_scale=0.95)).supported is None  # within --near only
    # a claim fails: contradicted
    assert lasso.summarize(cfg, _lasso_rows(cfg, eff_scale=1.1)).supported is False  # R_eff 10% from the Lasso
    assert lasso.summarize(cfg, _lasso_rows(cfg, eff_scale=0.9)).supported is False
    assert lasso.summarize(cfg, _lasso_rows(cfg, end_dist=0.3)).supported is False  # noisy GD ends far away
    assert lasso.summarize(cfg, _lasso_rows(cfg, end_dist=0.1)).supported is None  # at --near: within noise
    assert lasso.summarize(cfg, _lasso_rows(cfg, off_support=0.6)).supported is False  # a spurious coefficient
    # GD on R_eff still moving at the end (too few --steps): the run cannot tell, whatever its numbers
    unconverged = lasso.summarize(cfg, _lasso_rows(cfg, eff_scale=1.1, eff_moves=0.05))
    assert unconverged.supported is None and "not converged" in unconverged.reason


def test_lasso_support_recovery_reads_the_support_by_rank():
    ref = np.array([1.0, -0.5, 0.0, 0.0, 0.01])
    assert lasso.support_recovered(np.array([0.9, -0.6, 1e-3, -1e-3, 0.02]), ref)
    assert not lasso.support_recovered(np.array([0.9, -0.6, 0.03, 0.0, 0.02]), ref)  # k=2 outranks k=4
    assert lasso.support_recovered(np.array([0.9, -0.6, 0.03, 0.0, 0.02]), ref, fraction=0.1)  # large support only


# ---------------------------------------------------------------- double_descent


def _dd_rows(cfg, *, variance_factor=1.0, spread=0.05, gd_dist=1e-9, gd_random=0.3):
    """Per gamma and problem: variances around ``variance_factor`` times the exact expectation (relative spread
    ``spread``), and the GD distances."""
    rng = np.random.default_rng(0)
    rows = []
    for g in cfg.gammas:
        p = int(round(g * cfg.n))
        exact = double_descent.exact_variance(cfg.n, p, cfg.noise)
        for k in cfg.seeds:
            for _ in range(cfg.trials):
                var = 1e3 if not np.isfinite(exact) else exact * variance_factor * (1 + spread * rng.standard_normal())
                rows.append(dict(part="risk", gamma=g, seed=k, p=p, test_error=1.0 + var, variance=var, bias=0.1))
    for g in cfg.gd_gammas:
        for k in cfg.seeds:
            rows.append(
                dict(part="gd", gamma=g, seed=k, gd_from_zero_rel_dist=gd_dist, gd_from_random_rel_dist=gd_random)
            )
    return rows


def test_double_descent_verdict():
    cfg = double_descent.Config(gammas=(0.5, 0.9, 1.0, 1.1, 2.0), seeds=(0, 1), trials=25, gd_gammas=(0.5, 2.0))
    verdict = double_descent.summarize(cfg, _dd_rows(cfg))
    assert verdict.supported is True and all(c["discriminates"] for c in verdict.controls.values())
    assert double_descent.exact_variance(100, 50, 0.5) == pytest.approx(0.25 * 50 / 49)
    assert double_descent.exact_variance(100, 200, 0.5) == pytest.approx(0.25 * 100 / 99)
    # the claim fails: 10% more variance than the exact expectation, far beyond the noise of 50 problems
    assert double_descent.summarize(cfg, _dd_rows(cfg, variance_factor=1.1)).supported is False
    assert double_descent.summarize(cfg, _dd_rows(cfg, gd_dist=1e-3)).supported is False  # GD is not the pinv
    # controls that pass too: so noisy that 1.1 sigma is not rejected either; GD from random ends at X^+ y
    assert double_descent.summarize(cfg, _dd_rows(cfg, spread=2.0)).supported is None
    assert double_descent.summarize(cfg, _dd_rows(cfg, gd_random=1e-9)).supported is None


# ---------------------------------------------------------------- wide_networks


def _wn_rows(cfg, *, wide_hits=1.0, symmetric_hits=0.0, wide_rank=None, narrow_hits=1.0):
    rows = []
    n = len(cfg.seeds)
    ranks = {"wide": wide_rank or cfg.n_points, "symmetric": 1, "narrow": 8}
    for arch, hits in (("wide", wide_hits), ("symmetric", symmetric_hits), ("narrow", narrow_hits)):
        for i, k in enumerate(cfg.seeds):
            good = i < round(hits * n)
            rows.append(dict(arch=arch, seed=k, num_params=100, free_params=60 if arch == "symmetric" else 100,
                             train_loss=1e-7 if good else 0.3, global_min=float(good), grad_norm=1e-5,
                             rank_F=ranks[arch], sigma_min_F=0.1))  # fmt: skip
    return rows


def test_wide_networks_verdict():
    cfg = wide_networks.Config(seeds=tuple(range(10)))
    assert wide_networks.summarize(cfg, _wn_rows(cfg)).supported is True
    assert wide_networks.summarize(cfg, _wn_rows(cfg, wide_hits=0.9, symmetric_hits=0.8)).supported is True  # bounds
    assert wide_networks.summarize(cfg, _wn_rows(cfg, wide_hits=0.8)).supported is False  # wide misses too often
    loose = wide_networks.summarize(cfg, _wn_rows(cfg, symmetric_hits=0.9))  # the control fits too
    assert loose.supported is None and "does not discriminate" in loose.reason
    assert wide_networks.summarize(cfg, _wn_rows(cfg, wide_rank=cfg.n_points - 2)).supported is False  # F_1 rank-deficient
    narrow_fails = wide_networks.summarize(cfg, _wn_rows(cfg, narrow_hits=0.0))  # reported, never judged
    assert narrow_fails.supported is True and "not judged" in narrow_fails.reason
    few = wide_networks.Config(seeds=(0, 1, 2))
    assert wide_networks.summarize(few, _wn_rows(few)).supported is None


def test_the_symmetric_control_is_the_wide_net_on_its_symmetric_set():
    """The embedded one-unit net computes the same function as the wide net, its first-layer features have rank 1,
    and the wide net's gradient at it is symmetric (every first-layer unit's gradient equal)."""
    cfg = wide_networks.Config(n_points=8, input_dim=3, wide=(8, 4))
    x, y = wide_networks.prepare(cfg)
    small = wide_networks.make_model(cfg, "symmetric")
    params = small.init(jax.random.PRNGKey(0), x)["params"]
    wide_params = wide_networks.embed_symmetric(params, 8)
    wide = wide_networks.models.MLP(widths=cfg.wide, num_outputs=1, activation=cfg.activation)
    np.testing.assert_allclose(wide.apply({"params": wide_params}, x), small.apply({"params": params}, x), rtol=1e-5)
    rank, _, _ = wide_networks.feature_spectrum(wide_params, x, cfg.activation)
    assert int(rank) == 1
    grad = jax.grad(lambda p: jnp.mean((wide.apply({"params": p}, x) - y) ** 2))(wide_params)
    kernel = np.asarray(grad["Dense_0"]["kernel"])
    np.testing.assert_allclose(kernel, np.tile(kernel[:, :1], (1, 8)), rtol=1e-5, atol=1e-7)
    assert np.abs(kernel).max() > 1e-4  # not trivially zero


# ---------------------------------------------------------------- geometry_report (orders of the remainder)


def _geometry_rows(cfg, *, smooth_hessian=4.0, smooth_gn=2.0, relu=2.3):
    """Remainders c sigma^p with the given orders p (plus a little per-network spread), and the R row."""
    rng = np.random.default_rng(0)
    orders = {("tanh", "hessian"): smooth_hessian, ("tanh", "gauss_newton"): smooth_gn,
              ("relu", "hessian"): relu, ("relu", "gauss_newton"): relu}  # fmt: skip
    rows = [dict(quantity="R", activation="relu", seed=k, name="R", value=0.1, time_s=0.0, time_warm_s=0.0,
                 test_acc=0.9) for k in cfg.seeds]  # fmt: skip
    for (a, kind), p in orders.items():
        for k in cfg.seeds:
            p_k = p + rng.normal(0, 0.05)
            rows += [dict(quantity="remainder", activation=a, seed=k, kind=kind, sigma=s, value=3.0 * s**p_k,
                          name=f"remainder {kind} sigma={s:g}", mc_se=0.0) for s in cfg.sigmas]  # fmt: skip
    return rows


def test_geometry_report_verdict_judges_the_order_beside_its_control():
    cfg = geometry_report.Config()
    verdict = geometry_report.summarize(cfg, _geometry_rows(cfg))
    assert verdict.supported is True and verdict.controls["second_order_term"]["discriminates"] is True
    assert verdict.figures["order_tanh_hessian"] == pytest.approx(4.0, abs=0.1)
    assert verdict.figures["order_relu_gauss_newton_lo"] < 2.3 < verdict.figures["order_relu_gauss_newton_hi"]
    assert verdict.power["second_order_term"]["detectable"] is True
    # the control passes too (R_eff's remainder also above 2.5): the test does not discriminate
    loose = geometry_report.summarize(cfg, _geometry_rows(cfg, smooth_gn=3.5))
    assert loose.supported is None and "does not discriminate" in loose.reason
    # the Hessian remainder is second order: contradicted
    assert geometry_report.summarize(cfg, _geometry_rows(cfg, smooth_hessian=2.0)).supported is False
    assert geometry_report.summarize(cfg, _geometry_rows(cfg, smooth_hessian=2.5)).supported is None
    # ReLU's order is reported, never judged
    assert geometry_report.summarize(cfg, _geometry_rows(cfg, relu=1.0)).supported is True


# ---------------------------------------------------------------- resnet (power against the paper's 0.3 points)


def _resnet_rows(cfg, gain, spread, n_test=100_000):
    rng = np.random.default_rng(0)
    rows = []
    for k in cfg.seeds:
        base = 0.9 + rng.normal(0, 0.01)
        accs = {("gd", 0.0): base, ("layer", 0.05): base + gain + rng.normal(0, spread), ("layer", 0.2): base - 0.05,
                ("noise", 0.05): base, ("noise", 0.2): base - 0.1}  # fmt: skip
        rows += [dict(method=m, sigma=s, seed=k, step=100, test_acc=a, val_acc=a, train_loss=0.01, hessian_trace=1.0,
                      n_test=n_test) for (m, s), a in accs.items()]  # fmt: skip
        rows.append(dict(rows[-5], method="gd_control", seed=k + 1000))  # the control: SGD' = SGD, fails as it must
    return rows


def test_resnet_is_null_when_its_size_cannot_detect_the_papers_effect():
    cfg = resnet.Config(seeds=tuple(range(5)))
    sharp = resnet.summarize(cfg, _resnet_rows(cfg, gain=0.005, spread=0.0002))  # +0.5 points, MDE ~0.05 points
    assert sharp.supported is True and sharp.power["layer_improves"]["detectable"] is True
    assert sharp.figures["mde_layer_gain_points"] < 0.3
    noisy = resnet.summarize(cfg, _resnet_rows(cfg, gain=0.05, spread=0.01))  # +5 points beyond its margin ...
    assert noisy.figures["layer_gain"] > noisy.figures["layer_gain_margin"]
    assert noisy.supported is None and "too small to detect the source's effect" in noisy.reason  # ... MDE > 0.3
    assert noisy.power["layer_improves"]["mde"] > 0.3
    worse = resnet.summarize(cfg, _resnet_rows(cfg, gain=-0.05, spread=0.005))  # a reversal beyond noise stands
    assert worse.supported is False
