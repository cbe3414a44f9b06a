"""The loss-landscape geometry experiments at smoke size: outputs exist and parse, cheap claims hold.

Each experiment runs through the shared runner with a tiny config (seconds); the numeric checks are the
ones that do not need the default sizes: function invariance and Dinh's Hessian identity under
alpha-scaling, full rank of the wide layer's features, GD from zero = pseudo-inverse solution, the
saddle index of the linear-network saddle, finite sharpness along GD.
"""

import csv
import json

import numpy as np
import pytest

from experiments import double_descent, hessian_spectrum, reparametrization, runner, saddle_escape, wide_networks

SUMMARY_KEYS = {
    "experiment", "config", "claim", "supported", "reason", "controls", "power", "figures", "runtime_s", "devices",
    "code_version",
}  # fmt: skip


def _run(module, config, tmp_path):
    run_dir, summary = runner.run_experiment(module.EXPERIMENT, config, out=tmp_path, progress=False, verbose=False)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert set(saved) == SUMMARY_KEYS
    assert saved["experiment"] == module.EXPERIMENT.name and saved["claim"]
    assert saved["supported"] in (True, False, None)
    assert all(v is None or isinstance(v, (int, float)) for v in saved["figures"].values())
    assert json.loads((run_dir / "config.json").read_text()) == saved["config"]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert rows
    assert list(run_dir.glob("*.png"))
    return saved, rows


@pytest.mark.slow  # 8-11 s of the suite; run with -m slow
def test_reparametrization(tmp_path):
    cfg = reparametrization.Config(alphas=(0.1, 1.0, 10.0), seeds=(0,), n_train=32, widths=(4, 4), steps=20,
                                   sharpness_steps=2, sharpness_samples=4, lanczos_iters=10)
    summary, rows = _run(reparametrization, cfg, tmp_path)
    fig = summary["figures"]
    assert fig["max_rel_function_change"] < 1e-5
    assert fig["max_hessian_identity_rel_err"] < 1e-3
    assert fig["max_block_scaling_rel_err"] < 1e-3
    assert fig["adaptive_sharpness_rel_span"] < 1e-2
    assert fig["lambda_max_span"] > 10.0
    assert len(rows) == len(cfg.alphas)


@pytest.mark.slow  # 15 s of the suite; run with -m slow
def test_wide_networks(tmp_path):
    cfg = wide_networks.Config(n_points=8, input_dim=4, wide=(8, 4), narrow=(1,), seeds=(0, 1), steps=100)
    summary, rows = _run(wide_networks, cfg, tmp_path)
    fig = summary["figures"]
    assert fig["wide_min_rank_F"] == 8 and fig["narrow_min_rank_F"] == 1 and fig["symmetric_min_rank_F"] == 1
    assert fig["narrow_num_params"] < cfg.n_points <= fig["wide_num_params"] == fig["symmetric_num_params"]
    assert fig["symmetric_free_params"] < fig["wide_num_params"]
    assert summary["supported"] is None  # two initialisations are too few to judge "nearly every"
    assert len(rows) == 6


def test_wide_networks_rejects_a_narrow_wide_layer():
    with pytest.raises(ValueError, match="N - 1"):
        wide_networks.prepare(wide_networks.Config(n_points=8, wide=(4, 4)))


def test_hessian_spectrum(tmp_path):
    cfg = hessian_spectrum.Config(n_train=32, widths=(4,), lrs=(0.5,), steps=20, eval_every=10, spectrum_lr=0.5,
                                  lanczos_iters=5, top_k=2, slq_iters=10, slq_runs=2, density_points=16, seeds=(0,))
    summary, rows = _run(hessian_spectrum, cfg, tmp_path)
    fig = summary["figures"]
    assert fig["init_lambda_max"] > 0 and 0.0 <= fig["init_saddle_index"] <= 1.0
    eos = [r for r in rows if r["kind"] == "eos" and float(r["lr"]) == 0.5]
    assert [int(r["step"]) for r in eos] == [0, 10, 20]
    control = [r for r in rows if r["kind"] == "eos" and float(r["lr"]) == cfg.control_lr]  # run beside, same steps
    assert [int(r["step"]) for r in control] == [0, 10, 20]
    # lambda_max tracked inside the sweep (warm-started Lanczos), with its products per measurement
    assert all(1 <= float(r["lambda_max_products"]) <= cfg.lanczos_iters for r in eos)
    assert fig["lr_0.5_lanczos_products_first"] >= 1
    assert sum(r["kind"] == "density" for r in rows) == 3 * cfg.density_points


def test_double_descent(tmp_path):
    cfg = double_descent.Config(n=20, gammas=(0.5, 2.0), trials=4, seeds=(0,), gd_gammas=(0.5, 2.0), gd_steps=2000)
    summary, _ = _run(double_descent, cfg, tmp_path)
    fig = summary["figures"]
    assert fig["gd_from_zero_max_rel_dist_to_pinv"] < 1e-6
    assert fig["gd_from_random_init_min_rel_dist_gamma_gt_1"] > 0.1  # the null-space part of a random start stays


def test_min_norm_solve_matches_pinv(x64):
    import jax
    import jax.numpy as jnp

    for p in (5, 20):
        x = jax.random.normal(jax.random.key(p), (10, p), jnp.float64)
        y = jax.random.normal(jax.random.key(1), (10,), jnp.float64)
        assert jnp.allclose(double_descent.min_norm_solve(x, y), jnp.linalg.pinv(x) @ y, rtol=1e-10, atol=1e-12)


def test_saddle_escape(tmp_path):
    cfg = saddle_escape.Config(methods=("gd", "noise_layerwise"), seeds=(0, 1), steps=40, eval_every=20)
    summary, rows = _run(saddle_escape, cfg, tmp_path)
    fig = summary["figures"]
    # w = 0 of the linear net: eigenvalues +-s_i(Sigma), h times each, and zeros: index h rank / (h (d_in + d_out))
    assert fig["saddle_index_at_start"] == pytest.approx(min(cfg.d_in, cfg.d_out) / (cfg.d_in + cfg.d_out))
    assert fig["saddle_lambda_min"] < 0
    assert len(rows) == 2 * 2 * 3


@pytest.mark.parametrize("n, p", [(30, 10), (10, 30)])
def test_exact_variance_is_the_monte_carlo_mean(n, p):
    """E ||X^+ eps||^2 by Monte Carlo (numpy pinv, 4000 Gaussian problems) against ``exact_variance``."""
    rng = np.random.default_rng(0)
    x, eps = rng.standard_normal((4000, n, p)), 0.5 * rng.standard_normal((4000, n))
    v = np.sum(np.einsum("kpn,kn->kp", np.linalg.pinv(x), eps) ** 2, axis=1)
    assert abs(v.mean() - double_descent.exact_variance(n, p, 0.5)) < 4 * v.std() / np.sqrt(v.size)
