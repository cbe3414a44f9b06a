"""Whether a verdict discriminates: each claim part beside its negative control, and the power of the rule.

A test that passes whatever the method did supports nothing. So every claim part is run beside a
*negative control* (``Part``): a condition in which the part's test must fail if it tests the claim
(plain GD for a noise claim, a narrow net for a claim about wide ones, shuffled labels, a smooth
activation where kinks matter). ``judge`` combines the parts as ``verdicts.combine`` does (every part
supported at the level; a contradiction must survive Holm's correction) and then requires every
control to fail: a part whose control passes too does not discriminate, and the verdict is null with
that reason. A contradicted part contradicts the claim whatever its control did.

The *minimum detectable effect* of the paired rule (``minimum_detectable_effect``): the true mean
difference that the rule "mean > t_{1-a/2} s.e. + resolution term" (``verdicts.paired_gain``) calls
supported with probability ``power`` (80%), at the run's own spread: MDE = margin + t_{power, n-1} s.e.
(the normal-theory approximation with the sample s.e. in place of sigma / sqrt(n); Cohen 1988, ch. 2).
``Power`` stores it next to the effect the source reports; when the MDE exceeds it, the run cannot
detect the claim at its size and a "supported" verdict is null with that reason (a contradiction
beyond noise, an effect of the opposite sign, still counts: power bounds the chance of detecting the
claimed effect, not the evidence of its reverse).

Example::

    >>> from experiments import verdicts
    >>> claim = verdicts.paired_gain([1.0, 1.1, 0.9, 1.05], [0.0, 0.1, 0.0, 0.05])
    >>> control = verdicts.paired_gain([0.1, 0.0, 0.05, 0.0], [0.0, 0.1, 0.0, 0.05])
    >>> judge({"gain": Part(claim, control, "plain GD in place of GD+noise")}).supported
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from experiments import verdicts
from experiments.verdicts import LEVEL, Gain

POWER = 0.8  # the chance with which the rule must detect an effect of the size of the MDE

Outcome = Gain | bool | None


def passed(outcome: Outcome, level: float = LEVEL) -> bool | None:
    """A test's outcome as True (passed), False (contradicted) or None (within noise, or untested)."""
    return outcome.at(level).supported if isinstance(outcome, Gain) else outcome


class Part(NamedTuple):
    """One claim part: its test on the claimed condition (``claim``) and the same test on a negative control
    (``control``) in which it must fail, described in words (``description``: what the control is)."""

    claim: Outcome
    control: Outcome
    description: str

    def record(self, level: float = LEVEL) -> dict:
        """The part as ``summary.json`` stores it (``controls``): the claim's and the control's outcomes, whether
        the control failed as it must (contradicted or within noise; None only when no control was run), and
        their statistics."""
        out = {"control": self.description, "claim_passed": passed(self.claim, level),
               "control_passed": passed(self.control, level)}  # fmt: skip
        out["discriminates"] = None if self.control is None else out["control_passed"] is not True
        for name, value in (("claim", self.claim), ("control", self.control)):
            if isinstance(value, Gain):
                out[f"{name}_mean"], out[f"{name}_se"], out[f"{name}_margin"] = value.mean, value.se, value.margin
        return out


class Judgement(NamedTuple):
    """What ``judge`` returns: the verdict, the controls' record for ``summary.json`` and a reason clause."""

    supported: bool | None
    controls: dict[str, dict]
    reason: str


def judge(parts: Mapping[str, Part], level: float = LEVEL) -> Judgement:
    """The verdict of a claim of several ``parts``, each with its negative control.

    ``verdicts.combine`` of the claims (supported needs every part at ``level``; a contradiction must survive
    Holm's correction), then: contradicted stays contradicted; supported needs every control to have failed
    (not passed at ``level``): a part whose control passes too is null, "does not discriminate"."""
    claims = {name: part.claim for name, part in parts.items()}
    combined = verdicts.combine(claims, level)
    controls = {name: part.record(level) for name, part in parts.items()}
    loose = [name for name, record in controls.items() if record["control_passed"] is True]
    clauses = [verdicts.combine_reason(claims, level)]
    if loose:
        listed = "; ".join(f"{name} (control: {parts[name].description})" for name in loose)
        clauses.append(f"does not discriminate: the control passes too for {listed}")
    else:
        clauses.append(f"every control fails as it must ({len(parts)} of {len(parts)})")
    supported = False if combined is False else (None if loose else combined)
    return Judgement(supported, controls, "; ".join(clauses))


def minimum_detectable_effect(gain: Gain, power: float = POWER) -> float:
    """The true mean difference the paired rule of ``gain`` detects with probability ``power``: its margin
    (t_{1-level/2} s.e. + the resolution term) plus t_{power, n-1} s.e., in the gain's units; inf with fewer
    than ``verdicts.MIN_SEEDS`` seeds or a non-finite gain."""
    if gain.n < verdicts.MIN_SEEDS or not np.isfinite(gain.margin) or not np.isfinite(gain.se):
        return float("inf")
    from scipy import stats  # a dependency of jax itself

    return float(gain.margin + stats.t.ppf(power, gain.n - 1) * gain.se)


class Power(NamedTuple):
    """The minimum detectable effect of a part's rule at the run's size, next to the effect the source reports
    (both in ``unit``, with the same sign convention: positive is the claimed direction).

    ``kind``: ``"statistical"`` (a paired test over seeds: ``mde`` at 80% power, ``Power.of``), ``"tolerance"``
    (a deterministic check, no sampling noise: the rule detects any deviation beyond ``mde``, its tolerance or
    threshold) or ``"shown"`` (``mde`` is an effect the run's own control shows the rule rejects: an upper bound
    on the minimum detectable effect)."""

    mde: float
    source_effect: float | None  # None: the source gives no effect in these units (``source`` says why)
    unit: str
    source: str  # where the source reports it, e.g. "Orvieto et al. 2023, Table 2: 0.3-1 points"
    kind: str = "statistical"

    @classmethod
    def of(cls, gain: Gain, source_effect: float | None, unit: str, source: str, power: float = POWER) -> Power:
        effect = None if source_effect is None else float(source_effect)
        return cls(minimum_detectable_effect(gain, power), effect, unit, source)

    @property
    def detectable(self) -> bool | None:
        """Whether the run can detect the source's effect: MDE <= the source's effect (None: no such effect)."""
        return None if self.source_effect is None else bool(self.mde <= self.source_effect)

    def record(self) -> dict:
        """The entry of ``summary.json``'s ``power``."""
        return {"mde": self.mde, "source_effect": self.source_effect, "unit": self.unit, "source": self.source,
                "detectable": self.detectable, "power": POWER, "kind": self.kind}  # fmt: skip

    def describe(self) -> str:
        mde = {"statistical": f"minimum detectable effect {self.mde:.3g}{self.unit} ({100 * POWER:.0f}% power)",
               "tolerance": f"tolerance {self.mde:.3g}{self.unit} (a deterministic check: any deviation beyond it "
                            "is detected)",
               "shown": f"detects {self.mde:.3g}{self.unit} (shown by its control: an upper bound on the minimum "
                        "detectable effect)"}[self.kind]  # fmt: skip
        if self.source_effect is None:
            return f"{mde}; no source effect in these units ({self.source})"
        word = "can detect" if self.detectable else "cannot detect"
        return f"{mde} vs the source's {self.source_effect:.3g}{self.unit} ({self.source}): {word} it"


def with_power(supported: bool | None, powers: Mapping[str, Power]) -> tuple[bool | None, str]:
    """``supported`` made null when a part's rule cannot detect the source's effect (MDE above it), with the
    reason clause; a contradiction stands (the opposite sign beyond noise is not a matter of power)."""
    blind = [name for name, p in powers.items() if p.detectable is False]
    clause = "; ".join(f"{name}: {p.describe()}" for name, p in powers.items())
    if blind and supported is True:
        return None, f"too small to detect the source's effect ({', '.join(blind)}): {clause}"
    return supported, clause


CONTROL_SEED_OFFSET = 1000  # control runs from other initialisations: seed k's control is seed k + offset


def control_seeds(seeds) -> tuple[int, ...]:
    """The initialisation seeds of an A/A control (plain GD in place of the method, from independent starts):
    seed k's control run uses seed k + ``CONTROL_SEED_OFFSET``, so it pairs with seed k's runs but shares no
    initialisation with them. The paired test "method beats GD" applied to (GD from the control seeds, GD) must
    fail: a rule that passes it reads seed-to-seed variation as a gain."""
    return tuple(int(k) + CONTROL_SEED_OFFSET for k in seeds)
