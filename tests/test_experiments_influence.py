"""experiments.influence at smoke size: outputs exist and parse, leave-one-out correlation is high and the
random-score controls are near zero."""

import json

import pytest

from experiments import influence, runner

SUMMARY_KEYS = {"experiment", "config", "claim", "supported", "reason", "figures", "runtime_s", "devices", "controls",
                "power", "code_version"}


@pytest.mark.slow  # about a minute on an idle 2-core CPU
def test_influence_experiment_smoke(tmp_path):
    cfg = influence.Config(n_train=48, n_query=6, hidden=8, steps=60, num_subsets=6, rank=6, n_loo=30,
                           n_loo_query=4, methods=("identity", "cg", "random"), seeds=(0, 1, 2))
    run_dir, _ = runner.run_experiment(influence.EXPERIMENT, cfg, out=tmp_path, progress=False, verbose=False)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert set(saved) == SUMMARY_KEYS and saved["experiment"] == "influence"
    assert saved["supported"] in (True, False, None)
    figures = saved["figures"]
    assert figures["loo_corr_exact_hessian"] > 0.9 and abs(figures["loo_corr_random"]) < 0.5
    assert {"lds_identity", "lds_cg", "lds_random"} <= set(figures)
    assert (run_dir / "influence.png").exists() and (run_dir / "metrics.csv").exists()
    assert (run_dir / "influence_examples.png").exists()


def test_influence_config_checks():
    with pytest.raises(ValueError, match="--methods"):
        influence.validate(influence.Config(methods=("identity", "random")))
    with pytest.raises(ValueError, match="--loo-threshold"):
        influence.validate(influence.Config(loo_threshold=1.5))
    with pytest.raises(ValueError, match="--cg-tol"):
        influence.validate(influence.Config(cg_tol=0.0))
