"""The training cells' shared rules (``experiments.training``, ``experiments.records``): sigma chosen on
validation, never on test nor on a diverged run's survivors; history rows of a sweep."""

import numpy as np
import pytest

from experiments import records, training, verdicts


def test_sigma_is_chosen_on_validation_never_on_test():
    rows, seeds = [], (0, 1, 2)
    for s, (val, test) in {0.01: (0.70, 0.90), 0.1: (0.80, 0.60)}.items():  # test prefers 0.01, validation 0.1
        rows += [dict(method="layer", sigma=s, seed=k, step=10, val_acc=val, test_acc=test + 0.01 * k) for k in seeds]
    rows += [
        dict(method="gd", sigma=0.0, seed=k, step=10, val_acc=0.7, test_acc=0.5 + 0.01 * k, n_test=100) for k in seeds
    ]
    best, gain = training.compare_to_gd(rows, "layer", (0.01, 0.1), seeds, 10)
    assert best == 0.1 and gain.mean == pytest.approx(0.1) and gain.supported is True
    # two seeds: the s.e. has one degree of freedom
    assert verdicts.paired_gain([0.9, 0.8], [0.1, 0.2]).supported is None


@pytest.mark.parametrize("first_diverged", [False, True])
def test_a_sigma_with_a_diverged_seed_is_never_chosen(first_diverged):
    """A sigma whose seeds partly diverged (NaN) is not judged on its survivors, even when listed first."""
    nan = float("nan")
    vals = {0.05: [0.70, 0.72, 0.71], 0.2: [nan, nan, nan] if first_diverged else [0.95, nan, nan]}
    sigmas = (0.2, 0.05)
    rows = [dict(method="layer", sigma=s, seed=k, step=10, val_acc=v) for s in sigmas for k, v in enumerate(vals[s])]
    assert training.best_sigma(rows, "layer", sigmas, 10) == 0.05


def test_history_rows_drop_swa_before_averaging():
    history = {
        "step": np.array([[[0, 5, 10]]]),
        "train_loss": np.array([[[3.0, 2.0, 1.0]]]),
        "swa_train_loss": np.array([[[np.nan, np.nan, 1.5]]]),
    }
    assert records.history_rows(history, (0, 0)) == [
        {"step": 0, "train_loss": 3.0},
        {"step": 5, "train_loss": 2.0},
        {"step": 10, "train_loss": 1.0},
    ]
    assert records.history_rows(history, (0, 0), "swa_", kind="swa") == [{"kind": "swa", "step": 10, "train_loss": 1.5}]
