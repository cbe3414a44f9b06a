"""experiments.kfac_fidelity at smoke size (MLP, CNN, transformer): outputs exist and parse, EKFAC's Frobenius error is
not above KFAC's on every (model, seed, checkpoint) pair, its trace equals the exact Gauss-Newton trace, the reversed
test (the control) fails, and the randomized estimates (above the dense limit) agree with the dense values."""

import dataclasses
import json

import pytest

from experiments import kfac_fidelity, runner

SUMMARY_KEYS = {"experiment", "config", "claim", "supported", "reason", "figures", "runtime_s", "devices"}


@pytest.mark.slow  # compiles the exact, KFAC and EKFAC operators of three models: minutes on the shared 2-core CPU
def test_kfac_fidelity_experiment_smoke(tmp_path):
    cfg = kfac_fidelity.Config(n_train=32, hidden=4, channels=2, modulus=5, d_model=4, heads=2, checkpoints=(0, 10),
                               top_k=3, seeds=(0, 1))
    run_dir, _ = runner.run_experiment(kfac_fidelity.EXPERIMENT, cfg, out=tmp_path, progress=False, verbose=False)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(saved) and saved["experiment"] == "kfac_fidelity"
    assert saved["supported"] is True, saved["reason"]
    assert saved["controls"]["ekfac_frobenius_never_above_kfac"]["control_passed"] is False
    figures = saved["figures"]
    assert figures["pairs"] == 12 and figures["pairs_ekfac_not_above"] == 12
    assert 0 < figures["ekfac_over_kfac_min"] <= figures["ekfac_over_kfac_max"] <= 1 + 1e-9
    for model in kfac_fidelity.MODELS:
        for step in cfg.checkpoints:  # EKFAC's diagonal is diag(U^T G U) block by block: its trace is G's
            assert figures[f"trace_ratio_ekfac_{model}_step={step}"] == pytest.approx(1.0, abs=1e-10)
            assert 0 < figures[f"frobenius_ekfac_{model}_step={step}"] <= figures[f"frobenius_kfac_{model}_step={step}"]
            assert 0 <= figures[f"angle_deg_kfac_{model}_step={step}"] <= 90
    assert (run_dir / "kfac_fidelity.png").exists() and (run_dir / "metrics.csv").exists()


def test_randomized_estimates_match_the_dense_measures(global_x64):
    """Above ``dense_limit`` the Frobenius error and the trace ratio are estimated from shared Rademacher probes:
    on a tiny MLP they agree with the dense values within the estimates' spread (256 probes)."""
    import jax

    cfg = kfac_fidelity.Config(n_train=16, hidden=3, top_k=2, num_probes=256)
    data = kfac_fidelity.prepare(cfg)
    apply, init = kfac_fidelity._network(cfg, "mlp")
    params = init(jax.random.key(0))
    batch = kfac_fidelity._batch(cfg, data, "mlp", jax.random.key(0))
    dense = kfac_fidelity._compare(cfg, apply, params, batch, 0, 0)
    sketched = kfac_fidelity._compare(dataclasses.replace(cfg, dense_limit=10), apply, params, batch, 0, 0)
    for method in kfac_fidelity.METHODS:
        exact = [r for r in dense if r["method"] == method and r["layer"] == "all"][0]
        estimate = [r for r in sketched if r["method"] == method and r["layer"] == "all"][0]
        assert estimate["estimate"] == 1.0 and exact["estimate"] == 0.0
        assert estimate["frobenius"] == pytest.approx(exact["frobenius"], rel=0.25)
        assert estimate["trace_ratio"] == pytest.approx(exact["trace_ratio"], rel=0.25)
        assert estimate["inverse_error"] == pytest.approx(exact["inverse_error"], rel=0.25)  # damping from tr G


def test_kfac_fidelity_config_checks():
    with pytest.raises(ValueError, match="--checkpoints"):
        kfac_fidelity.validate(kfac_fidelity.Config(checkpoints=(100, 0)))
    with pytest.raises(ValueError, match="--damping"):
        kfac_fidelity.validate(kfac_fidelity.Config(damping=0.0))
    with pytest.raises(ValueError, match="--top-k"):
        kfac_fidelity.validate(kfac_fidelity.Config(hidden=2, top_k=50))
    with pytest.raises(ValueError, match="--models"):
        kfac_fidelity.validate(kfac_fidelity.Config(models=("mlp", "resnet")))
