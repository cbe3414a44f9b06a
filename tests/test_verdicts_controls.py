"""Verdicts that discriminate (issue 28), on constructed rows: for each experiment, rows where the claim holds and
its negative control fails give supported; rows where the control passes too give null ("does not discriminate");
rows where the claim fails give contradicted. No training: the rows are what ``run`` would return, built by hand."""

import dataclasses

import numpy as np
import pytest

from experiments import (
    cnn,
    deep_mlp,
    discrimination,
    hessian_spectrum,
    mode_connectivity,
    regularized_loss,
    reparametrization,
    resnet,
    saddle_escape,
    sigma_sweep,
    training,
)

# ---------------------------------------------------------------- deep_mlp (judged window, spikes, GD control)


def _dm_rows(cfg, *, layer_trace=0.5, layer_acc=0.05, control_acc=0.0, control_trace=1.0, slow_layer=False,
             spike=None):  # fmt: skip
    """Rows of every arm; ``spike=(method, seed)``: that run's last evaluation has its loss blown up and its
    accuracy at chance."""
    rng = np.random.default_rng(0)
    rows = []
    for w in cfg.widths:
        for m in deep_mlp.ARMS:
            for k in cfg.seeds:
                seed = discrimination.control_seeds([k])[0] if m == deep_mlp.CONTROL else k
                for t in range(0, cfg.steps + 1, cfg.eval_every):
                    speed = 0.5 if (slow_layer and m == "layer") else 1.0
                    loss = 2.0 * np.exp(-speed * 4.0 * t / cfg.steps)
                    factor = {"layer": layer_trace, deep_mlp.CONTROL: control_trace}.get(m, 1.0)
                    trace = 100.0 * loss * factor * (1 + rng.normal(0, 0.01))
                    acc = 0.5 + {"layer": layer_acc, deep_mlp.CONTROL: control_acc}.get(m, 0.0) + rng.normal(0, 0.002)
                    if spike == (m, k) and t == cfg.steps:
                        loss, acc = 50.0 * loss, 0.1
                    rows.append(dict(width=w, method=m, sigma=0.0 if m in ("gd", deep_mlp.CONTROL) else cfg.sigma,
                                     seed=seed, step=t, train_loss=loss, gn_trace=trace, test_acc=acc,
                                     n_test=1000))  # fmt: skip
    return rows


DM_CFG = deep_mlp.Config(widths=(8, 16), lrs=(0.1, 0.1), steps=20, eval_every=5, fit_loss=1.0, seeds=(0, 1, 2, 3, 4))


def test_deep_mlp_supported_when_the_claim_holds_and_its_control_fails():
    verdict = deep_mlp.summarize(DM_CFG, _dm_rows(DM_CFG))
    assert verdict.supported is True, verdict.reason
    assert all(c["control_passed"] is not True for c in verdict.controls.values()) and len(verdict.controls) == 8
    assert set(verdict.power) == {"w8_acc_vs_gd", "w8_acc_vs_noise", "w16_acc_vs_gd", "w16_acc_vs_noise"}
    assert verdict.power["w8_acc_vs_gd"]["mde"] > 0 and verdict.power["w8_acc_vs_gd"]["source_effect"] is None


def test_deep_mlp_null_when_the_control_passes_too():
    loose = deep_mlp.summarize(DM_CFG, _dm_rows(DM_CFG, control_acc=0.05))  # GD from other inits "beats" GD too
    assert loose.supported is None and "does not discriminate" in loose.reason
    assert loose.controls["w8_acc_vs_gd"]["control_passed"] is True


def test_deep_mlp_contradicted_when_the_claim_fails():
    assert deep_mlp.summarize(DM_CFG, _dm_rows(DM_CFG, layer_trace=2.0)).supported is False  # larger trace
    assert deep_mlp.summarize(DM_CFG, _dm_rows(DM_CFG, layer_acc=-0.05)).supported is False  # worse accuracy
    # a layer-wise run that merely trains slower has the larger trace at the last step, the smaller at equal loss
    slow = deep_mlp.summarize(DM_CFG, _dm_rows(DM_CFG, slow_layer=True))
    assert slow.supported is True, slow.reason
    unfit = dataclasses.replace(DM_CFG, fit_loss=0.01)
    assert deep_mlp.summarize(unfit, _dm_rows(unfit)).supported is None  # not fitted: no test


def test_deep_mlp_a_spike_at_the_last_step_is_reported_not_decisive():
    # one layer-wise seed per width spikes at the very last evaluation (loss x50, accuracy at chance): judged on
    # the last step this would flip its accuracy gain; on the window's mean it does not, and the spike is listed
    cfg = dataclasses.replace(DM_CFG, eval_every=2, steps=40)
    rows = _dm_rows(cfg, layer_acc=0.05, spike=("layer", 0))
    verdict = deep_mlp.summarize(cfg, rows)
    assert verdict.figures["loss_spikes"] == 2 and "loss spike" in verdict.reason
    assert verdict.supported is True, verdict.reason
    last_step = [r["test_acc"] for r in rows if r["method"] == "layer" and r["seed"] == 0 and r["step"] == cfg.steps]
    assert min(last_step) == 0.1  # what a last-step verdict would have judged
    with pytest.raises(ValueError, match="--judge-last"):
        deep_mlp.validate(dataclasses.replace(cfg, judge_last=0.0))


# ---------------------------------------------------------------- saddle_escape (matched steps, controls)


def _se_rows(cfg, *, shifts, gd_rate_factor=1.0):
    """Escape curves with GD's rate; ``shifts[m]``: how many steps earlier (negative: later) than GD ``m`` escapes."""
    r0, r_star = saddle_escape.landmarks(saddle_escape.prepare(cfg))
    lam = -2.0
    rate = 2.0 * np.log1p(cfg.lr * abs(lam))
    rng = np.random.default_rng(0)
    rows = []
    for m in cfg.methods:
        for k in cfg.seeds:
            shift = -shifts.get(m, 0.0) + rng.normal(0, 5)
            for t in range(0, cfg.steps + 1, cfg.eval_every):
                rr = rate * (gd_rate_factor if m == "gd" else 1.0)
                closed = 0.0 if m == "gd_at_saddle" else min(1.0, 1e-6 * np.exp(rr * (t - shift)))
                rows.append(dict(method=m, seed=saddle_escape.run_seed(m, k), step=t, lambda_min=lam, saddle_index=1 / 3,
                                 train_loss=r0 - closed * (r0 - r_star)))  # fmt: skip
    return rows


SE_CFG = saddle_escape.Config(methods=("gd", "noise_full", "momentum", "adam", "normalized_gd", "gd_control",
                                       "normalized_gd_control", "gd_at_saddle"), seeds=tuple(range(6)),
                              steps=600)  # fmt: skip
SE_GOOD = {"noise_full": 100.0, "momentum": 300.0, "adam": 300.0, "normalized_gd": 0.0, "gd_control": 0.0,
           "normalized_gd_control": 0.0}


def test_saddle_escape_matches_the_step_sizes():
    assert saddle_escape.momentum_lr(SE_CFG) == pytest.approx(SE_CFG.lr * (1 - SE_CFG.momentum))  # lr/(1-b) = lr
    assert saddle_escape.noise_sigma(SE_CFG) == SE_CFG.init_scale
    import jax.numpy as jnp

    step = saddle_escape.normalized_gd(0.5).update({"w": jnp.array([3.0, 4.0])}, None, None)[0]["w"]
    np.testing.assert_allclose(step, [-0.3, -0.4], rtol=1e-6)  # length 0.5 along -g / |g|


def test_saddle_escape_supported_when_faster_and_every_control_fails():
    verdict = saddle_escape.summarize(SE_CFG, _se_rows(SE_CFG, shifts=SE_GOOD))
    assert verdict.supported is True, verdict.reason
    assert verdict.controls["adam"]["control_passed"] is not True and verdict.controls["momentum"]["claim_passed"]
    assert verdict.controls["all_escape"]["control_passed"] is False  # GD at the saddle never leaves it
    assert verdict.controls["gd_rate"]["control_passed"] is False  # 1.25 |lambda_min| is outside the 10% tolerance
    assert all(c["discriminates"] for c in verdict.controls.values())
    assert verdict.figures["gd_escape_rate_min"] == pytest.approx(2 * np.log1p(SE_CFG.lr * 2.0), rel=1e-3)
    assert verdict.power["adam"]["unit"] == " steps" and np.isfinite(verdict.power["adam"]["mde"])


def test_saddle_escape_judges_adam_against_normalised_gd():
    """Adam's part compares it with normalised GD of its step length (its baseline), not with GD: as fast as
    normalised GD is null however far both are ahead of GD; a control that passes too does not discriminate."""
    level = saddle_escape.summarize(SE_CFG, _se_rows(SE_CFG, shifts={**SE_GOOD, "normalized_gd": 300.0,
                                                                     "normalized_gd_control": 300.0}))
    assert level.supported is None and level.controls["adam"]["claim_passed"] is None  # within noise
    assert "normalized_gd minus adam" in level.reason
    loose = saddle_escape.summarize(SE_CFG, _se_rows(SE_CFG, shifts={**SE_GOOD, "normalized_gd_control": 300.0}))
    assert loose.supported is None and "does not discriminate" in loose.reason and "adam" in loose.reason
    assert loose.controls["adam"]["control_passed"] is True


def test_saddle_escape_contradicted_when_a_method_is_slower_or_gd_off_rate():
    assert saddle_escape.summarize(SE_CFG, _se_rows(SE_CFG, shifts={**SE_GOOD, "momentum": -70.0})).supported is False
    assert saddle_escape.summarize(SE_CFG, _se_rows(SE_CFG, shifts=SE_GOOD, gd_rate_factor=1.3)).supported is False
    assert saddle_escape.summarize(SE_CFG, _se_rows(SE_CFG, shifts={**SE_GOOD, "noise_full": 0.0})).supported is None
    no_control = dataclasses.replace(SE_CFG, methods=("gd", "noise_full", "momentum"))
    verdict = saddle_escape.summarize(no_control, _se_rows(no_control, shifts=SE_GOOD))
    assert verdict.supported is None and "no control run" in verdict.reason


# ---------------------------------------------------------------- hessian_spectrum (control: lr below its edge)


def _hs_rows(cfg, *, ratio=1.0, control_ratio=0.25, late_loss_factor=0.5):
    rows = []
    half = cfg.steps // 2
    for lr in hessian_spectrum.eos_lrs(cfg):
        for k in cfg.seeds:
            for t in range(0, cfg.steps + 1, cfg.eval_every):
                r = ratio if lr in cfg.lrs else control_ratio
                lam = (2.0 / lr) * (1.5 if (t == 0 and lr in cfg.lrs) else r)
                loss = 1.0 if t <= half else 1.0 * late_loss_factor ** ((t - half) / half)
                rows.append(dict(part="eos", lr=lr, seed=k, kind="eos", step=t, train_loss=loss, lambda_max=lam,
                                 two_over_lr=2.0 / lr))  # fmt: skip
    for k in cfg.seeds:
        for i, phase in enumerate(hessian_spectrum.PHASES):
            rows.append(dict(part="spectrum", seed=k, kind="snapshot", phase=phase, step=i * half, train_loss=1.0,
                             saddle_index=0.1, **{f"top_{j}": 5.0 / j for j in range(1, cfg.top_k + 1)}))  # fmt: skip
    return rows


HS_CFG = hessian_spectrum.Config(lrs=(0.2, 0.4), steps=100, eval_every=10, top_k=3)


def test_hessian_spectrum_verdict_beside_its_control():
    verdict = hessian_spectrum.summarize(HS_CFG, _hs_rows(HS_CFG))
    assert verdict.supported is True, verdict.reason
    assert verdict.controls["edge"]["control_passed"] is False
    assert hessian_spectrum.summarize(HS_CFG, _hs_rows(HS_CFG, ratio=1.2)).supported is True
    loose = hessian_spectrum.summarize(HS_CFG, _hs_rows(HS_CFG, control_ratio=1.0))  # the control at its edge too
    assert loose.supported is None and "does not discriminate" in loose.reason
    assert hessian_spectrum.summarize(HS_CFG, _hs_rows(HS_CFG, ratio=1.5)).supported is False  # far above the edge
    assert hessian_spectrum.summarize(HS_CFG, _hs_rows(HS_CFG, ratio=0.5)).supported is False  # far below it
    assert hessian_spectrum.summarize(HS_CFG, _hs_rows(HS_CFG, late_loss_factor=2.0)).supported is False  # loss rises
    one = dataclasses.replace(HS_CFG, lrs=(0.2,), seeds=(0,))
    assert hessian_spectrum.summarize(one, _hs_rows(one)).supported is None
    bare = dataclasses.replace(HS_CFG, control_lr=None)
    assert hessian_spectrum.summarize(bare, _hs_rows(bare)).supported is None  # no control run: cannot tell


# ---------------------------------------------------------------- mode_connectivity (curve vs random bend)


def _mc_rows(seeds, *, line=1.0, curve=0.01, random_bend=0.5):
    rows = []
    for k in seeds:
        for path, barrier in (("line", line), ("curve", curve), ("random_bend", random_bend)):
            for t in np.linspace(0, 1, 5):
                bump = barrier * np.sin(np.pi * t)
                rows.append(dict(seed=k, path=path, t=float(t), barrier=barrier, train_loss=1e-4 + bump,
                                 test_loss=0.1 + bump, test_acc=0.97 - 0.1 * bump))  # fmt: skip
    return rows


def test_mode_connectivity_verdict_beside_its_controls():
    cfg = mode_connectivity.Config(seeds=(0, 1, 2))
    verdict = mode_connectivity.summarize(cfg, _mc_rows(cfg.seeds))
    assert verdict.supported is True, verdict.reason
    assert verdict.controls["curve"]["control_passed"] is False and verdict.controls["line"]["control_passed"] is False
    loose = mode_connectivity.summarize(cfg, _mc_rows(cfg.seeds, random_bend=0.05))  # any bend avoids the barrier
    assert loose.supported is None and "does not discriminate" in loose.reason
    assert mode_connectivity.summarize(cfg, _mc_rows(cfg.seeds, curve=0.5)).supported is False  # curve as high
    assert mode_connectivity.summarize(cfg, _mc_rows(cfg.seeds, line=0.05, curve=0.001)).supported is False  # no barrier
    one = mode_connectivity.Config(seeds=(0,))
    assert mode_connectivity.summarize(one, _mc_rows(one.seeds)).supported is None  # one pair decides nothing


def test_mode_connectivity_random_bend_has_the_trained_size():
    import jax
    import jax.numpy as jnp
    import optax

    a, b, bend = {"w": jnp.zeros(50)}, {"w": jnp.ones(50)}, {"w": jnp.full(50, 0.5).at[0].add(3.0)}
    mid = jax.tree_util.tree_map(lambda x, y: (x + y) / 2, a, b)
    control = mode_connectivity.random_bend(a, b, bend, 0)
    trained, moved = (optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, p, mid)) for p in (bend, control))
    assert float(moved) == pytest.approx(float(trained), rel=1e-5)
    assert abs(float(control["w"][0] - mid["w"][0])) < 3.0  # not the trained direction


# ---------------------------------------------------------------- sigma_sweep and cnn (GD from other inits)


def _accuracy_rows(cfg, *, gain, spread, control_gain=0.0, n_test=100_000, **fields):
    """Final rows of every (method, sigma, seed) and of the control: GD at a per-seed base, the noisy methods
    ``gain`` above it (validation = test), the control ``control_gain`` above it."""
    rng = np.random.default_rng(1)
    rows = []
    for k in cfg.seeds:
        base = 0.9 + rng.normal(0, 0.01)
        runs = [(m, s, k, gain if m != "gd" else 0.0) for m, s in training.method_grid(cfg.methods, cfg.sigmas)]
        runs.append(("gd_control", 0.0, discrimination.control_seeds([k])[0], control_gain))
        for m, s, seed, shift in runs:
            acc = base + shift + (rng.normal(0, spread) if m != "gd" else 0.0)
            rows.append(dict(**fields, method=m, sigma=s, seed=seed, step=cfg.steps, test_acc=acc, val_acc=acc,
                             train_loss=0.01, hessian_trace=1.0, n_test=n_test))  # fmt: skip
    return rows


def test_sigma_sweep_verdict_beside_its_control():
    cfg = sigma_sweep.Config(seeds=tuple(range(5)))
    good = sigma_sweep.summarize(cfg, _accuracy_rows(cfg, gain=0.02, spread=0.0005))
    assert good.supported is True, good.reason
    assert good.controls["layer"]["control_passed"] is not True and good.power["layer"]["source_effect"] is None
    loose = sigma_sweep.summarize(cfg, _accuracy_rows(cfg, gain=0.02, spread=0.0005, control_gain=0.02))
    assert loose.supported is None and "does not discriminate" in loose.reason
    assert sigma_sweep.summarize(cfg, _accuracy_rows(cfg, gain=-0.02, spread=0.0005)).supported is False
    bare = [r for r in _accuracy_rows(cfg, gain=0.02, spread=0.0005) if r["method"] != "gd_control"]
    assert sigma_sweep.summarize(cfg, bare).supported is None  # no control run: cannot tell
    assert {"method": "gd_control", "sigma": 0.0, "seed": 1000} in sigma_sweep.cells(cfg)


def _windowed(cfg, rows, spike=None):
    """``rows`` (final evaluations) spread over every evaluation of the run, the train loss falling to its final
    value; ``spike=(method, seed)``: that run's last evaluation has its loss x50 and its accuracy 15 points lower."""
    out = []
    for r in rows:
        for t in range(0, cfg.steps + 1, cfg.eval_every):
            loss = r["train_loss"] * (1.0 + 0.5 * (cfg.steps - t) / cfg.steps)
            row = dict(r, step=t, train_loss=loss)
            if spike == (r["method"], r["seed"]) and t == cfg.steps:
                row.update(train_loss=50 * loss, test_acc=r["test_acc"] - 0.15, val_acc=r["val_acc"] - 0.15)
            out.append(row)
    return out


@pytest.mark.parametrize("module", [sigma_sweep, cnn])
def test_accuracy_verdicts_judge_the_window_and_report_a_last_step_spike(module):
    """On rows with every evaluation: claim + failing control -> supported; control passing -> null; claim failing
    -> contradicted; one layer-wise seed 15 points down at the very last step (a full-batch spike) is reported
    (figures, reason) and does not flip the verdict, though the gain at the last step alone would (to null). The
    mean over the window's k evaluations dilutes such a spike by 1/k: here k = 16 in both."""
    cfg = module.Config(seeds=tuple(range(5)), eval_every=20 if module is cnn else 50)
    final = _cnn_rows if module is cnn else _accuracy_rows

    def rows(spike=None, **kwargs):
        return _windowed(cfg, final(cfg, **kwargs), spike)

    good = module.summarize(cfg, rows(gain=0.02, spread=0.0005))
    assert good.supported is True and good.figures["loss_spikes"] == 0, good.reason
    assert "mean over the last 50% of the steps" in good.reason
    loose = module.summarize(cfg, rows(gain=0.02, spread=0.0005, control_gain=0.02))
    assert loose.supported is None and "does not discriminate" in loose.reason
    assert module.summarize(cfg, rows(gain=-0.02, spread=0.0005)).supported is False
    verdict = module.summarize(cfg, rows(gain=0.05, spread=0.0005, spike=("layer", 0)))
    assert verdict.supported is True, verdict.reason
    last_gain = "layer_gain_last_step" if module is sigma_sweep else "toy_layer_gain_last_step"
    assert verdict.figures[last_gain] < verdict.figures[last_gain.replace("_last_step", "")] - 0.02
    last_step_clause = verdict.reason[verdict.reason.index("at the last step alone"):]
    assert "within ±" in last_step_clause.split(";")[0]  # at the last step alone: null, not supported
    n_archs = len(cfg.archs) if module is cnn else 1
    assert verdict.figures["loss_spikes"] == n_archs * sum(
        1 for m, s in training.method_grid(cfg.methods, cfg.sigmas) if m == "layer")
    assert "loss spike(s) in the judged window" in verdict.reason and "reported, not decisive" in verdict.reason
    assert "at the last step alone" in verdict.reason


def _cnn_rows(cfg, **kwargs):
    return [r for a in cfg.archs for r in _accuracy_rows(cfg, arch=a, **kwargs)]


def test_cnn_verdict_beside_its_control_and_power():
    cfg = cnn.Config(seeds=tuple(range(5)))
    good = cnn.summarize(cfg, _cnn_rows(cfg, gain=0.02, spread=0.0005))  # MDE ~0.1 points
    assert good.supported is True, good.reason
    assert set(good.controls) == set(cfg.archs)
    loose = cnn.summarize(cfg, _cnn_rows(cfg, gain=0.02, spread=0.0005, control_gain=0.02))
    assert loose.supported is None and "does not discriminate" in loose.reason
    assert cnn.summarize(cfg, _cnn_rows(cfg, gain=-0.02, spread=0.0005)).supported is False
    noisy = cnn.summarize(cfg, _cnn_rows(cfg, gain=0.06, spread=0.015))  # +6 points, but MDE > 1 point
    assert all(noisy.figures[f"{a}_layer_gain"] > noisy.figures[f"{a}_layer_gain_margin"] for a in cfg.archs)
    assert noisy.supported is None and all(not p["detectable"] for p in noisy.power.values())


def test_cnn_cpu_long_preset_can_detect_the_sources_effect_at_the_pilots_spread():
    """``--preset cpu-long`` passes the CLI's checks, and on rows whose paired differences spread as its pilot's did
    (0.92 points) its seeds give a minimum detectable effect at or below the source's 1 point, where the default's 3
    seeds do not."""
    from experiments import config_checks

    cfg = cnn.PRESETS["cpu-long"]
    config_checks.check_config(cnn.EXPERIMENT, cfg)
    config_checks.check_config(cnn.EXPERIMENT, cnn.PRESETS["cpu-long-wide"])
    for seeds, detectable in ((cfg.seeds, True), (cnn.Config().seeds, False)):
        small = dataclasses.replace(cfg, seeds=seeds)
        rows = _cnn_rows(small, gain=0.0, spread=0.0, n_test=497)
        z = np.arange(len(seeds), dtype=float)
        offset = dict(zip(seeds, 0.0092 * (z - z.mean()) / z.std(ddof=1)))  # sample spread exactly 0.92 points
        for r in rows:
            r["test_acc"] += offset[r["seed"]] if r["method"] == "layer" else 0.0
        verdict = cnn.summarize(small, rows)
        assert verdict.figures["toy_layer_gain_se"] * np.sqrt(len(seeds)) == pytest.approx(0.0092)
        assert verdict.power["toy_layer_gain"]["detectable"] is detectable, verdict.power


# ---------------------------------------------------------------- reparametrization (one-sided scaling, measures)


def _rp_rows(cfg, *, function_change=1e-7, one_sided=0.5, adaptive_drift=0.0, sharpness_power=1.0, eps_power=1.0,
             one_sided_identity=0.9):
    rows = []
    for k in cfg.seeds:
        for a in cfg.alphas:
            lam = 10.0 * max(a, 1 / a) ** (2 * sharpness_power)
            rows.append(dict(seed=k, alpha=a, rel_max_diff=function_change, max_abs_diff=function_change, train_loss=0.1,
                             one_sided_rel_diff=0.0 if a == 1.0 else one_sided,
                             one_sided_identity_rel_err=1e-6 if a == 1.0 else one_sided_identity,
                             hessian_identity_rel_err=1e-6, block_0_norm=3.0 / a**2, block_1_kernel_norm=2.0 * a**2,
                             lambda_max=lam, lambda_max_dense=lam, hessian_trace=2 * lam,
                             epsilon_sharpness=10.0 * max(a, 1 / a) ** (2 * eps_power) / 100,
                             average_sharpness=lam / 1000, adaptive_sharpness=0.5 * (1 + adaptive_drift * np.log10(a))))  # fmt: skip
    return rows


def test_reparametrization_verdict_beside_its_controls():
    cfg = reparametrization.Config()
    good = reparametrization.summarize(cfg, _rp_rows(cfg))
    assert good.supported is True, good.reason
    assert good.controls["same_function"]["control_passed"] is False
    assert good.controls["hessian_identity"]["control_passed"] is False  # the identity fails off the symmetry
    identity_too = reparametrization.summarize(cfg, _rp_rows(cfg, one_sided_identity=1e-6))
    assert identity_too.supported is None and identity_too.controls["hessian_identity"]["discriminates"] is False
    loose = reparametrization.summarize(cfg, _rp_rows(cfg, one_sided=1e-6))  # the one-sided scaling keeps f too
    assert loose.supported is None and "does not discriminate" in loose.reason
    bare = [{k: v for k, v in r.items() if k != "one_sided_rel_diff"} for r in _rp_rows(cfg)]
    assert reparametrization.summarize(cfg, bare).supported is None  # no control: cannot tell
    assert reparametrization.summarize(cfg, _rp_rows(cfg, function_change=1e-2)).supported is False  # not the same f
    assert reparametrization.summarize(cfg, _rp_rows(cfg, adaptive_drift=0.05)).supported is False  # not invariant
    assert reparametrization.summarize(cfg, _rp_rows(cfg, sharpness_power=0.1)).supported is False  # barely moves


# ---------------------------------------------------------------- regularized_loss (narrow width, GD controls)


def _rl_rows(cfg, *, wide_gap=5.0, narrow_gap=0.2, gd_gap=0.1):
    """Final R_eff per (width, method, seed): layer-wise 0.1, full noise ``gap`` x 0.1 above it at each width
    (relative gap), GD ``gd_gap`` above it at every width; layer-wise settled (constant over the last fifth)."""
    rng = np.random.default_rng(0)
    rows = []
    for w in cfg.widths:
        for m in cfg.methods:
            for k in cfg.seeds:
                rel = {"layer": 0.0, "noise": wide_gap if w == max(cfg.widths) else narrow_gap, "gd": gd_gap}[m]
                eff = 0.1 * (1 + rel) * (1 + rng.normal(0, 0.01))
                for t in range(0, cfg.steps + 1, cfg.eval_every):
                    rows.append(dict(width=w, method=m, sigma=0.0 if m == "gd" else cfg.sigma, seed=k, step=t,
                                     train_loss=0.05, R_eff=eff, gn_trace=1.0, R_sigma_full=eff + 0.01 * w))  # fmt: skip
    return rows


def test_regularized_loss_verdict_beside_its_controls():
    cfg = regularized_loss.Config(steps=100, eval_every=10)
    good = regularized_loss.summarize(cfg, _rl_rows(cfg))
    assert good.supported is True, good.reason
    assert set(good.controls) == {"relative_gap"}  # the growth with width is reported, not judged
    assert "not judged" in good.reason and "gd_gap_growth" in good.figures
    narrow_too = regularized_loss.summarize(cfg, _rl_rows(cfg, narrow_gap=4.0))  # the narrow net shows it as well
    assert narrow_too.supported is None and "does not discriminate" in narrow_too.reason
    assert regularized_loss.summarize(cfg, _rl_rows(cfg, wide_gap=0.0)).supported is False  # no gap at the wide width


# ---------------------------------------------------------------- influence (LDS gain over identity, leave-one-out)


def _influence_rows(cg_gain=0.15, random_gain=-0.4, loo=0.99, loo_random=0.0):
    from experiments import influence

    rng = np.random.default_rng(1)
    rows = []
    for seed in range(5):
        base = 0.4 + 0.02 * rng.normal()
        for method, lds in (("identity", base), ("cg", base + cg_gain + 0.01 * rng.normal()),
                            ("random", base + random_gain + 0.01 * rng.normal())):
            rows.append({"part": "lds", "seed": seed, "method": method, "lds": lds, "lds_se": 0.02,
                         "full_train_loss": 0.05})
        rows.append({"part": "loo", "seed": seed, "method": "exact_hessian", "loo_corr": loo + 0.002 * rng.normal()})
        rows.append({"part": "loo", "seed": seed, "method": "random", "loo_corr": loo_random + 0.01 * rng.normal()})
    return influence, influence.Config(), rows


def test_influence_verdict_on_constructed_rows():
    influence, cfg, rows = _influence_rows()
    verdict = influence.summarize(cfg, rows)
    assert verdict.supported is True
    assert set(verdict.controls) == {"lds_cg_over_identity", "loo_corr_above_threshold"}
    assert all(c["discriminates"] for c in verdict.controls.values())
    assert set(verdict.power) == set(verdict.controls) and verdict.power["lds_cg_over_identity"]["mde"] > 0
    influence, cfg, rows = _influence_rows(random_gain=0.15)  # random scores gain as much: does not discriminate
    verdict = influence.summarize(cfg, rows)
    assert verdict.supported is None and "does not discriminate" in verdict.reason
    influence, cfg, rows = _influence_rows(cg_gain=-0.15)  # CG below gradient dot products: contradicted
    assert influence.summarize(cfg, rows).supported is False


# ---------------------------------------------------------------- resnet (SGD from other inits, both parts)


def _resnet_rows(cfg, *, gain=0.02, hurt=0.1, control=0.0, spread=0.0005):
    """Final rows of every (method, sigma, seed) and of the control: SGD at a per-seed base, layer-wise ``gain``
    above it at every sigma, full noise ``hurt`` below it above sigma 0.1, SGD' (other inits) ``control`` above."""
    rng = np.random.default_rng(2)
    rows = []
    for k in cfg.seeds:
        base = 0.9 + rng.normal(0, 0.01)
        runs = [(m, s, k, {"gd": 0.0, "layer": gain, "noise": -hurt if s > 0.1 else 0.0}[m])
                for m, s in training.method_grid(cfg.methods, cfg.sigmas)]  # fmt: skip
        runs.append((resnet.CONTROL, 0.0, discrimination.control_seeds([k])[0], control))
        for m, s, seed, shift in runs:
            acc = base + shift + (rng.normal(0, spread) if m != "gd" else 0.0)
            rows.append(dict(method=m, sigma=s, seed=seed, step=100, test_acc=acc, val_acc=acc, train_loss=0.01,
                             hessian_trace=1.0, n_test=100_000))  # fmt: skip
    return rows


def test_resnet_verdict_beside_its_control():
    cfg = resnet.Config(seeds=tuple(range(5)))
    assert {"method": resnet.CONTROL, "sigma": 0.0, "seed": 1000} in resnet.cells(cfg)
    good = resnet.summarize(cfg, _resnet_rows(cfg))  # +2 points, full noise -10 points, SGD' = SGD
    assert good.supported is True, good.reason
    assert set(good.controls) == {"layer_improves", "full_noise_hurts_sigma=0.2"}
    assert all(c["discriminates"] is True for c in good.controls.values())
    loose = resnet.summarize(cfg, _resnet_rows(cfg, control=0.02))  # SGD' "beats" SGD as much as layer-wise does
    assert loose.supported is None and "does not discriminate" in loose.reason
    assert loose.controls["layer_improves"]["control_passed"] is True
    below = resnet.summarize(cfg, _resnet_rows(cfg, control=-0.1))  # SGD' "hurt" as much as full noise does
    assert below.supported is None and below.controls["full_noise_hurts_sigma=0.2"]["control_passed"] is True
    assert resnet.summarize(cfg, _resnet_rows(cfg, gain=-0.02)).supported is False  # the claim fails
    bare = [r for r in _resnet_rows(cfg) if r["method"] != resnet.CONTROL]
    assert resnet.summarize(cfg, bare).supported is None  # no control run: cannot tell
