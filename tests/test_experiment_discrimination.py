"""Verdicts that discriminate (``experiments.discrimination``): a claim part is supported only when its
negative control fails; the minimum detectable effect of the paired rule and the null it gives when the
source's effect is below it. Constructed rows: claim holds + control fails -> supported; control passes
too -> null ("does not discriminate"); claim fails -> contradicted."""

import numpy as np
import pytest
from scipy import stats

from experiments import discrimination, verdicts
from experiments.discrimination import Part

RNG = np.random.default_rng(0)
SEEDS = 5


def _gain(effect, spread=0.05):
    """A paired gain over SEEDS seeds whose per-seed differences are ``effect`` + noise of ``spread``."""
    control = RNG.normal(0.0, 1.0, SEEDS)
    return verdicts.paired_gain(control + effect + RNG.normal(0.0, spread, SEEDS), control)


@pytest.mark.parametrize(
    "claim, control, expected",
    [
        (1.0, 0.0, True),  # the claim holds, its control fails (no effect): supported
        (1.0, -1.0, True),  # the control goes the other way: fails as it must
        (1.0, 1.0, None),  # the control passes too: the test does not discriminate
        (1.0, 0.5, None),
        (-1.0, 0.0, False),  # the claim fails beyond noise: contradicted
        (-1.0, 1.0, False),  # ... whatever its control does
        (0.0, 0.0, None),  # within noise
    ],
)
def test_judge_on_constructed_rows(claim, control, expected):
    judgement = discrimination.judge({"gain": Part(_gain(claim), _gain(control), "plain GD")})
    assert judgement.supported is expected
    record = judgement.controls["gain"]
    assert record["control"] == "plain GD"
    assert record["control_passed"] is {1: True, -1: False, 0: None}[np.sign(control)]
    if expected is None and claim > 0:
        assert "does not discriminate" in judgement.reason and "plain GD" in judgement.reason
    assert record["discriminates"] is (record["control_passed"] is not True)  # within noise is a failed control
    assert discrimination.judge({"g": Part(_gain(claim), None, "none run")}).controls["g"]["discriminates"] is None


def test_every_part_needs_its_control_to_fail():
    good = Part(_gain(1.0), _gain(0.0), "GD")
    loose = Part(True, True, "a smooth activation")  # exact checks: the control passes too
    assert discrimination.judge({"a": good, "b": Part(True, False, "x")}).supported is True
    judgement = discrimination.judge({"a": good, "b": loose})
    assert judgement.supported is None and "b (control: a smooth activation)" in judgement.reason
    assert judgement.controls["b"] == {"control": "a smooth activation", "claim_passed": True, "control_passed": True,
                                       "discriminates": False}  # fmt: skip
    assert discrimination.judge({"a": good, "b": Part(False, False, "x")}).supported is False


@pytest.mark.parametrize("n", [3, 5, 10, 30])
def test_the_minimum_detectable_effect_has_the_stated_power(n):
    # se fixed at sigma / sqrt(n): the rule "mean > t se" is a one-sided t test whose power at a true effect
    # delta is P(noncentral t(n - 1, delta / se) > t_crit): the MDE must give about 80% (normal approximation)
    se = 0.1
    gain = verdicts.Gain(0.0, se, n, verdicts.t_critical(n) * se, None)
    mde = discrimination.minimum_detectable_effect(gain)
    power = stats.nct.sf(verdicts.t_critical(n), n - 1, mde / se)
    assert 0.75 < power < 0.86
    # and by simulation: paired differences with the true effect mde, the rule applied to each
    d = RNG.normal(mde, se * np.sqrt(n), (20_000, n))
    mean, sd = d.mean(1), d.std(1, ddof=1) / np.sqrt(n)
    assert abs(np.mean(mean > verdicts.t_critical(n) * sd) - power) < 0.015


def test_the_minimum_detectable_effect_of_an_untestable_gain_is_infinite():
    assert discrimination.minimum_detectable_effect(verdicts.paired_gain([1, 2], [0, 0])) == np.inf
    assert discrimination.minimum_detectable_effect(verdicts.paired_gain([1, np.nan, 2], [0, 0, 0])) == np.inf


def test_a_run_that_cannot_detect_the_source_effect_is_null():
    gain = verdicts.paired_gain([3.0, 5.0, 1.0, 6.0], [0.0, 0.0, 0.0, 0.0])  # supported, but noisy
    assert gain.supported is True
    blind = discrimination.Power.of(gain, 1.0, " points", "the paper's Table 2")
    assert not blind.detectable and blind.mde > gain.margin > 1.0
    supported, reason = discrimination.with_power(True, {"accuracy gain": blind})
    assert supported is None and "too small to detect the source's effect (accuracy gain)" in reason
    assert "the paper's Table 2" in reason and blind.record()["detectable"] is False
    assert discrimination.with_power(False, {"gain": blind})[0] is False  # a reversal beyond noise stands
    sharp = discrimination.Power.of(verdicts.paired_gain([1.0, 1.01, 0.99], [0, 0, 0]), 0.5, "", "s")
    assert sharp.detectable and discrimination.with_power(True, {"gain": sharp})[0] is True


def test_a_source_without_an_effect_in_these_units_blocks_nothing():
    power = discrimination.Power.of(verdicts.paired_gain([1.0, 1.1, 0.9], [0, 0, 0]), None, "", "other units")
    assert power.detectable is None and power.record()["source_effect"] is None
    assert discrimination.with_power(True, {"gain": power}) == (True, "gain: " + power.describe())
    assert "no source effect in these units (other units)" in power.describe()
