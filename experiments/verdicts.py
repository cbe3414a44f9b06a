"""Verdict statistics: paired tests over seeds, several parts corrected for their number.

The gain of a method over its reference (``paired_gain``) is the mean of the per-seed differences; its
standard error is that of those differences (the seeds pair the methods). A gain supports a claim when it
exceeds ``t s.e. + one example's worth``, with t the two-sided 95% Student-t critical value for the number
of seeds (``t_critical``: 4.30 with 3 seeds, 2.78 with 5, 2.26 with 10), contradicts it when it is below
the negative of that margin, and is null (within noise) in between, or with fewer than 3 seeds. The
"example's worth" (``resolution``, e.g. 1 / n_test for an accuracy) is the most the statistic
``mean - t s.e.`` can move when one test example changes its answer in one run, so a verdict is never
decided by a single example. A claim of several parts (``combine``) is supported when every part is, and
contradicted only by a part that survives Holm's correction for the number of parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np


LEVEL = 0.05  # two-sided level of every paired test (a 95% interval for the gain)


def t_critical(n: int, level: float = LEVEL) -> float:
    """The two-sided Student-t critical value t_{1 - level/2, n - 1} for ``n`` paired seeds (4.30 for 3 seeds,
    2.78 for 5, -> 1.96 for many): ``mean - t se > 0`` is a paired t test at ``level``."""
    if n < 2:
        return float("inf")
    from scipy import stats  # a dependency of jax itself

    return float(stats.t.ppf(1.0 - level / 2.0, n - 1))


class Gain(NamedTuple):
    """A paired comparison over seeds (``paired_gain``)."""

    mean: float  # mean of the per-seed differences
    se: float  # standard error of the per-seed differences
    n: int  # seeds
    margin: float  # t se + the most one example can move mean - t se (t: ``t_critical(n, level)``)
    supported: bool | None  # mean > margin: True; mean < -margin: False; else None
    level: float = LEVEL  # two-sided level of the test
    resolution: float = 0.0  # the most one example changes a per-seed value

    @property
    def t(self) -> float:
        """The critical value the margin uses."""
        return t_critical(self.n, self.level)

    @property
    def p_value(self) -> float:
        """Two-sided p-value of the paired t test of mean = 0 (1.0 when untestable; 0.0 for an exact nonzero
        difference, se = 0)."""
        if self.n < MIN_SEEDS or not np.isfinite(self.mean):
            return 1.0
        if self.se == 0:
            return 0.0 if self.mean != 0 else 1.0
        from scipy import stats

        return float(2.0 * stats.t.sf(abs(self.mean) / self.se, self.n - 1))

    def at(self, level: float) -> Gain:
        """The same comparison judged at another two-sided ``level`` (e.g. a Holm-corrected one)."""
        if not np.isfinite(self.margin):
            return self._replace(level=level)
        margin = _margin(self.se, self.n, self.resolution, level)
        supported = True if self.mean > margin else (False if self.mean < -margin else None)
        return self._replace(margin=margin, supported=supported, level=level)

    def noninferior(self, bound: float) -> bool | None:
        """A non-inferiority test ("equal or better", up to ``bound``): True when the whole interval
        mean ± margin lies above -bound, False when it lies below -bound (worse by more than the bound beyond
        noise), None otherwise or when untestable. With identical per-seed values the interval is the
        resolution's width around 0, so the answer says how close "equal" is, not that nothing was measured."""
        if not np.isfinite(self.margin):
            return None
        if self.mean - self.margin > -bound:
            return True
        return False if self.mean + self.margin < -bound else None

    def describe(self, what: str, scale: float = 1.0, unit: str = "") -> str:
        """``what`` with its value, s.e. and the verdict, e.g.
        "accuracy gain +1.2 ± 0.4 points (3 seeds): > margin 1.9 (95% paired t, t=4.3)"."""
        test = f"{100 * (1 - self.level):.3g}% paired t, t={self.t:.3g}"
        word = {
            True: f"> margin {scale * self.margin:.3g} ({test})",
            False: f"< -margin {scale * self.margin:.3g} ({test})",
            None: f"within ±{scale * self.margin:.3g} (noise; {test})"
            if np.isfinite(self.margin)
            else f"fewer than {MIN_SEEDS} seeds, or a run that never got there: cannot tell",
        }
        seeds = f"{self.n} seed{'s' if self.n != 1 else ''}"
        return f"{what} {scale * self.mean:+.3g} ± {scale * self.se:.2g}{unit} ({seeds}): {word[self.supported]}"


MIN_SEEDS = 3  # below this the s.e. of the differences (1 degree of freedom for 2 seeds) decides nothing


def _margin(se: float, n: int, resolution: float, level: float) -> float:
    t = t_critical(n, level)
    return float(t * se + resolution * (1.0 / n + t / np.sqrt(n * (n - 1))))


def paired_gain(treated, control, *, resolution: float = 0.0, level: float = LEVEL) -> Gain:
    """Gain of ``treated`` over ``control`` (sequences paired by seed; higher is better); null with fewer
    than ``MIN_SEEDS`` seeds or a non-finite difference.

    A two-sided paired Student-t test at ``level`` (default 5%): supported when the mean difference exceeds
    ``t se``, with t = ``t_critical(n, level)`` for the n seeds (4.30 for 3 seeds, 2.78 for 5, 2.26 for 10),
    contradicted below minus that margin. ``resolution``: the most one example can change a per-seed value
    (1 / n_test for an accuracy, 0 for a continuous quantity). The margin is t se + resolution
    (1/n + t/sqrt(n (n-1))): changing one per-seed difference by ``resolution`` moves the mean by at most
    resolution / n and the s.e. by at most resolution / sqrt(n (n-1)), so a verdict beyond the margin
    survives any single example.
    """
    with np.errstate(invalid="ignore"):  # inf - inf: a run that never reached its event
        d = np.asarray(treated, dtype=float) - np.asarray(control, dtype=float)
    n = d.size
    mean, se = mean_se(d)
    if n < MIN_SEEDS or not np.all(np.isfinite(d)):
        return Gain(mean, se, n, float("nan"), None, level, resolution)
    margin = _margin(se, n, resolution, level)
    supported = True if mean > margin else (False if mean < -margin else None)
    return Gain(mean, se, n, margin, supported, level, resolution)


def holm(gains: Mapping[str, Gain], level: float = LEVEL) -> dict[str, Gain]:
    """Holm's step-down correction of the paired tests ``gains`` for their number: ordered by p-value, the
    i-th (from 0) of k is judged at level / (k - i) until one is not decided; it and all later ones are
    null. The chance that any part is wrongly decided stays below ``level`` (Holm 1979)."""
    order = sorted(gains, key=lambda name: gains[name].p_value)
    out, stopped = {}, False
    for i, name in enumerate(order):
        g = gains[name].at(level / (len(order) - i))
        if stopped or g.supported is None:
            stopped = True
            g = g._replace(supported=None)
        out[name] = g
    return {name: out[name] for name in gains}


def combine(parts: Mapping[str, Gain | bool | None], level: float = LEVEL) -> bool | None:
    """The verdict of a claim made of ``parts``: paired tests (``Gain``) and exact checks (bool, or None when
    untested). True if every part is supported, False if any part is contradicted, None otherwise.

    Several parts, corrected for their number: a part counts as contradicted only when Holm's correction of
    the k paired tests (``holm``) still decides it, so k parts do not add up k chances of a spurious
    contradiction. "Supported" needs every part supported at ``level`` (an intersection-union test: the
    claim is wrongly called supported only if some false part is, with chance at most ``level``, so no
    correction is needed there). ``combine_reason`` says this in words."""
    gains = {k: v for k, v in parts.items() if isinstance(v, Gain)}
    corrected = holm(gains, level) if len(gains) > 1 else gains
    values = [v.at(level).supported if isinstance(v, Gain) else v for v in parts.values()]
    contradicted = [corrected[k].supported is False if k in gains else v is False for k, v in parts.items()]
    if any(contradicted):
        return False
    return True if values and all(v is True for v in values) else None


def combine_reason(parts: Mapping[str, Gain | bool | None], level: float = LEVEL) -> str:
    """One clause stating how ``combine`` judged ``parts`` (the correction), for a verdict's ``reason``."""
    k = sum(isinstance(v, Gain) for v in parts.values())
    if k <= 1:
        return f"{len(parts)} part{'s' if len(parts) != 1 else ''}, each at {100 * (1 - level):.3g}%"
    corrected = holm({n: v for n, v in parts.items() if isinstance(v, Gain)}, level)
    contradicted = [n for n, g in corrected.items() if g.supported is False]
    return (
        f"{k} paired tests: supported needs every part at {100 * (1 - level):.3g}% (intersection-union); "
        f"a contradiction must survive Holm's correction for {k} parts"
        + (f" (contradicted after it: {', '.join(contradicted)})" if contradicted else " (none does)")
    )


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for a single value; NaN for none)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se
