"""experiments.kfac_fidelity at smoke size: outputs exist and parse, EKFAC's Frobenius error is not above KFAC's on
every (seed, checkpoint) pair, its trace equals the exact Gauss-Newton trace, and the reversed test (the control)
fails."""

import json

import pytest

from experiments import kfac_fidelity, runner

SUMMARY_KEYS = {"experiment", "config", "claim", "supported", "reason", "figures", "runtime_s", "devices"}


@pytest.mark.slow  # compiles the exact, KFAC and EKFAC operators: 30-60 s on the shared 2-core CPU
def test_kfac_fidelity_experiment_smoke(tmp_path):
    cfg = kfac_fidelity.Config(n_train=32, hidden=4, checkpoints=(0, 10), top_k=3, seeds=(0, 1, 2))
    run_dir, _ = runner.run_experiment(kfac_fidelity.EXPERIMENT, cfg, out=tmp_path, progress=False, verbose=False)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(saved) and saved["experiment"] == "kfac_fidelity"
    assert saved["supported"] is True, saved["reason"]
    assert saved["controls"]["ekfac_frobenius_never_above_kfac"]["control_passed"] is False
    figures = saved["figures"]
    assert figures["pairs"] == 6 and figures["pairs_ekfac_not_above"] == 6
    assert 0 < figures["ekfac_over_kfac_min"] <= figures["ekfac_over_kfac_max"] <= 1 + 1e-9
    for step in cfg.checkpoints:  # EKFAC's diagonal is diag(U^T G U) block by block: its trace is G's
        assert figures[f"trace_ratio_ekfac_step={step}"] == pytest.approx(1.0, abs=1e-10)
        assert 0 < figures[f"frobenius_ekfac_step={step}"] <= figures[f"frobenius_kfac_step={step}"]
        assert 0 <= figures[f"angle_deg_kfac_step={step}"] <= 90
    assert (run_dir / "kfac_fidelity.png").exists() and (run_dir / "metrics.csv").exists()


def test_kfac_fidelity_config_checks():
    with pytest.raises(ValueError, match="--checkpoints"):
        kfac_fidelity.validate(kfac_fidelity.Config(checkpoints=(100, 0)))
    with pytest.raises(ValueError, match="--damping"):
        kfac_fidelity.validate(kfac_fidelity.Config(damping=0.0))
    with pytest.raises(ValueError, match="--top-k"):
        kfac_fidelity.validate(kfac_fidelity.Config(hidden=2, top_k=50))
