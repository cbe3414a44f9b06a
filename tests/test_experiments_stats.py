"""The statistics every verdict uses (``experiments.common``): Student-t critical values, the paired test,
Holm's correction over the parts of a claim."""

import numpy as np
import pytest
from scipy import stats

from experiments import records, training, verdicts
# Two-sided 95% critical values t_{0.975, df} from a printed table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize("df, value", TABLE.items())
def test_t_critical_matches_the_printed_table(df, value):
    assert verdicts.t_critical(df + 1) == pytest.approx(value, abs=1e-3)


@pytest.mark.parametrize("n", [2, 3, 5, 10, 100])
@pytest.mark.parametrize("level", [0.05, 0.01, 0.05 / 3])
def test_t_critical_matches_scipy(n, level):
    assert verdicts.t_critical(n, level) == pytest.approx(stats.t.ppf(1 - level / 2, n - 1), rel=1e-12)


def test_t_critical_of_one_seed_is_infinite():
    assert verdicts.t_critical(1) == np.inf


def test_paired_gain_uses_t_for_the_number_of_seeds():
    # mean 1, se 0.3: t = 3.33 is beyond 2 (the old rule) but not beyond t_{0.975,2} = 4.30 ...
    d = np.array([-1.0, 0.0, 1.0])
    d = 1.0 + d * 0.3 / verdicts.mean_se(d)[1]
    g = verdicts.paired_gain(d, np.zeros(3))
    assert g.se == pytest.approx(0.3)
    assert g.margin == pytest.approx(4.303 * 0.3, abs=1e-3)
    assert g.supported is None
    assert "95% paired t, t=4.3" in g.describe("x")
    # ... and the same mean and se with 10 seeds (t = 2.26) is decided, both ways.
    d10 = np.linspace(-1, 1, 10)
    d10 = 1.0 + d10 * 0.3 / verdicts.mean_se(d10)[1]
    assert verdicts.paired_gain(d10, np.zeros(10)).supported is True
    assert verdicts.paired_gain(np.zeros(10), d10).supported is False


def test_paired_gain_agrees_with_scipys_paired_t_test():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(3, 12))
        a, b = rng.normal(size=n), rng.normal(size=n) + rng.normal() * 0.8
        g = verdicts.paired_gain(a, b)
        test = stats.ttest_rel(a, b)
        assert g.p_value == pytest.approx(test.pvalue, rel=1e-9)
        decided = test.pvalue < 0.05
        assert (g.supported is not None) == decided
        if decided:
            assert g.supported == (np.mean(a - b) > 0)


def test_resolution_margin_survives_one_example():
    """A verdict beyond the margin stays when one per-seed difference moves by ``resolution``."""
    rng = np.random.default_rng(1)
    r = 0.01
    for _ in range(300):
        n = int(rng.integers(3, 8))
        d = rng.normal(0.03, 0.01, size=n)
        g = verdicts.paired_gain(d, np.zeros(n), resolution=r)
        if g.supported is not True:
            continue
        for i in range(n):
            for sign in (-1, 1):
                e = d.copy()
                e[i] += sign * r
                mean, se = verdicts.mean_se(e)
                assert mean - g.t * se > 0


def test_too_few_seeds_or_a_missing_value_is_null():
    assert verdicts.paired_gain([1.0, 2.0], [0.0, 0.0]).supported is None
    assert verdicts.paired_gain([1.0, 2.0, np.inf], [0.0, 0.0, np.inf]).supported is None


def _gain(t_stat, n=5):
    """A gain whose paired t statistic is ``t_stat`` (se 1)."""
    return verdicts.Gain(t_stat, 1.0, n, 0.0, None).at(verdicts.LEVEL)


def test_holm_against_a_hand_computed_example():
    # four parts with p-values 0.004, 0.02, 0.03, 0.2 (4 seeds, df 3): Holm compares them with
    # 0.05/4, 0.05/3, 0.05/2, 0.05/1 in turn: the first is decided, the second (0.02 > 0.0167) stops it.
    ts = {name: stats.t.isf(p / 2, 3) for name, p in dict(a=0.004, b=0.02, c=0.03, d=0.2).items()}
    gains = {name: _gain(-t, n=4) for name, t in ts.items()}
    assert all(g.supported is False for g in list(gains.values())[:3])  # each alone at 5%: contradicted
    corrected = verdicts.holm(gains)
    assert [corrected[k].supported for k in "abcd"] == [False, None, None, None]
    assert corrected["a"].level == pytest.approx(0.05 / 4)
    # Bonferroni-style bound: the first is decided at 0.05/4 since p = 0.004 < 0.0125
    assert gains["a"].p_value == pytest.approx(0.004)


def test_holm_matches_statsmodels_style_adjusted_p_values():
    """Holm's adjusted p-values: max over j <= i of (k - j) p_(j); a part is decided iff its adjusted p < level."""
    rng = np.random.default_rng(2)
    for _ in range(100):
        k = int(rng.integers(2, 6))
        gains = {i: _gain(float(rng.normal(0, 3)), n=6) for i in range(k)}
        p = np.array([gains[i].p_value for i in range(k)])
        order = np.argsort(p)
        adjusted = np.maximum.accumulate((k - np.arange(k)) * p[order])
        expected = {int(i): bool(a < 0.05) for i, a in zip(order, adjusted)}
        corrected = verdicts.holm(gains)
        assert {i: g.supported is not None for i, g in corrected.items()} == expected


def test_combine_corrects_contradictions_for_the_number_of_parts():
    # one part contradicted at p = 0.03 among four: alone it is decided, with Holm over 4 parts it is not.
    weak = _gain(-stats.t.isf(0.03 / 2, 4))
    assert weak.supported is False
    null = _gain(0.1)
    assert verdicts.combine({"a": weak}) is False
    assert verdicts.combine({"a": weak, "b": null, "c": null, "d": null}) is None
    # a strong contradiction (p = 0.001 < 0.05/4) survives the correction
    strong = _gain(-stats.t.isf(0.001 / 2, 4))
    assert verdicts.combine({"a": strong, "b": null, "c": null, "d": null}) is False
    assert "Holm" in verdicts.combine_reason({"a": strong, "b": null})


def test_combine_needs_every_part_supported():
    yes = _gain(stats.t.isf(0.01 / 2, 4))
    assert yes.supported is True
    assert verdicts.combine({"a": yes, "b": yes, "c": True}) is True
    assert verdicts.combine({"a": yes, "b": _gain(0.1)}) is None
    assert verdicts.combine({"a": yes, "b": None}) is None
    assert verdicts.combine({"a": yes, "b": False}) is False  # an exact check that fails contradicts the claim
    assert verdicts.combine({}) is None


def test_noninferiority_bound():
    """"Equal or better" up to a bound: the whole interval above -bound; worse beyond it: false."""
    equal = verdicts.paired_gain([0.9] * 5, [0.9] * 5, resolution=0.002)  # identical per-seed values
    assert equal.noninferior(0.01) is True and equal.noninferior(0.0005) is None
    worse = verdicts.paired_gain([0.85, 0.86, 0.85, 0.86, 0.85], [0.9] * 5)
    assert worse.noninferior(0.01) is False
    assert worse.noninferior(0.1) is True
    assert verdicts.paired_gain([0.9, 0.9], [0.9, 0.9]).noninferior(0.01) is None  # two seeds: untestable


def test_at_loss_interpolates_in_log_loss():
    rows = [dict(step=t, train_loss=loss, gn=g) for t, loss, g in ((0, 1.0, 10.0), (10, 0.1, 20.0), (20, 0.01, 40.0))]
    assert records.at_loss(rows, "gn", 0.1) == pytest.approx(20.0)
    assert records.at_loss(rows, "gn", np.sqrt(0.1 * 0.01)) == pytest.approx(30.0)  # halfway in log(loss)
    assert records.at_loss(rows, "gn", 2.0) == pytest.approx(10.0)
    assert np.isnan(records.at_loss(rows, "gn", 0.001))  # never got there


def test_unfit_names_the_under_trained_runs():
    rows = [dict(method=m, seed=k, step=5, train_loss=v) for m, v in (("gd", 0.01), ("layer", 0.5)) for k in (0, 1)]
    assert training.unfit(rows, {"GD": dict(method="gd")}, (0, 1), 5, 0.3) == ""
    text = training.unfit(rows, {"GD": dict(method="gd"), "layer": dict(method="layer")}, (0, 1), 5, 0.3)
    assert "layer 0.5" in text and "GD" not in text


@pytest.mark.parametrize(
    "treated, control, resolution, expected",
    [
        ([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], 0.0, True),  # +1 every seed: s.e. 0
        ([1.0, 2.0, 3.0], [0.9, 2.1, 2.9], 0.0, None),  # +0.1, -0.1, +0.1: within noise
        ([0.0, 1.0, 2.0], [1.0, 2.0, 3.0], 0.0, False),  # -1 every seed: contradicted
        ([0.60, 0.62, 0.61], [0.59, 0.61, 0.60], 0.0, True),  # +0.01 exactly, s.e. 0
        ([0.60, 0.62, 0.61], [0.59, 0.61, 0.60], 0.01, None),  # ... but one test example of 100 is 0.01
        ([0.5], [0.4], 0.0, None),  # one seed: cannot tell
        ([0.5, 0.6], [0.4, 0.5], 0.0, None),  # two seeds: the s.e. has one degree of freedom
    ],
)
def test_paired_verdict_on_constructed_rows(treated, control, resolution, expected):
    assert verdicts.paired_gain(treated, control, resolution=resolution).supported is expected


def test_paired_se_is_that_of_the_differences_and_no_single_example_decides():
    # the seeds differ a lot, the methods little: unpaired s.e. would hide a consistent gain
    control = np.array([0.50, 0.70, 0.90, 0.60])
    gain = verdicts.paired_gain(control + [0.021, 0.019, 0.020, 0.020], control)
    assert gain.se == pytest.approx(np.std([0.021, 0.019, 0.020, 0.020], ddof=1) / 2) and gain.supported is True
    assert np.hypot(*(np.std(v, ddof=1) / 2 for v in (control, control + 0.02))) > gain.mean  # unpaired: null
    # a verdict beyond the margin survives moving any one per-seed value by one example (1/500)
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = rng.normal(0.01, 0.01, size=int(rng.integers(2, 6)))
        g = verdicts.paired_gain(d, np.zeros_like(d), resolution=1 / 500)
        if g.supported is None:
            continue
        for i in range(d.size):
            for step in (-1 / 500, 1 / 500):
                moved = d.copy()
                moved[i] += step
                assert verdicts.paired_gain(moved, np.zeros_like(d)).supported is g.supported


def test_combine_and_describe():
    assert verdicts.combine({"a": True, "b": True}) is True
    assert verdicts.combine({"a": True, "b": None}) is None
    assert verdicts.combine({"a": None, "b": False}) is False and verdicts.combine({}) is None
    text = verdicts.paired_gain([0.62, 0.63, 0.61], [0.60, 0.60, 0.60]).describe("gain", scale=100, unit=" points")
    assert text.startswith("gain +2 ± 0.58 points (3 seeds)") and "within ±2.48 (noise; 95% paired t, t=4.3)" in text
