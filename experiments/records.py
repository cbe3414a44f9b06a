"""Reading the rows of a run: a training history as rows, the rows of some cells, one value per seed,
a value at a given training loss, a mean curve."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def history_rows(history: dict, index: tuple = (), prefix: str = "", **fields) -> list[dict]:
    """Rows ``{**fields, step, train_loss, ...}`` of one run of a ``lsgeo.train`` history (``index`` picks the
    member of a sweep's ``[S, R]`` axes), without the SWA keys. With ``prefix="swa_"``, only the SWA
    average's keys (``swa_k`` named ``k``), at the evaluations where they are finite (NaN before averaging starts)."""
    if prefix:
        history = {"step": history["step"], **{k[len(prefix) :]: v for k, v in history.items() if k.startswith(prefix)}}
    h = {k: np.asarray(v)[index] for k, v in history.items() if prefix or not k.startswith("swa_")}
    rows = [
        {**fields, "step": int(t), **{k: float(v[e]) for k, v in h.items() if k != "step"}}
        for e, t in enumerate(h["step"])
    ]
    if prefix:
        rows = [r for r in rows if all(np.isfinite(r[k]) for k in h if k != "step")]
    return rows


def resolution(rows: list[dict]) -> float:
    """1 / n_test: what one test example changes in a run's accuracy (``train_cells`` records n_test)."""
    return 1.0 / max(r.get("n_test", 0) for r in rows)


def select(rows: list[dict], **fields) -> list[dict]:
    """The rows whose fields equal ``fields`` (e.g. ``select(rows, method="gd", sigma=0.0)``)."""
    return [r for r in rows if all(r.get(k) == v for k, v in fields.items())]


def stack(trees: Sequence) -> Any:
    """The pytrees ``trees`` stacked along a new leading axis (numpy)."""
    return jax.tree_util.tree_map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *trees)


def per_seed(rows: list[dict], key: str, seeds: Sequence[int], **fields) -> np.ndarray:
    """``[len(seeds)]``: ``key`` of the one row per seed that matches ``fields`` (e.g. the final step)."""
    out = []
    for s in seeds:
        (row,) = select(rows, seed=s, **fields) or [None]
        if row is None:
            raise KeyError(f"no row with seed={s} and {fields}")
        out.append(row[key])
    return np.asarray(out, dtype=float)


def at_loss(rows: list[dict], key: str, target: float, loss_key: str = "train_loss", **fields) -> float:
    """``key`` of one run (the rows matching ``fields``, by step) where its ``loss_key`` first falls to ``target``:
    linear in log(loss) between the two evaluations around that point; NaN if the run never gets there.

    Comparing runs at the same training loss (rather than the same step) keeps a method that merely trains
    slower from looking flatter or sharper."""
    run = sorted((r for r in select(rows, **fields) if key in r), key=lambda r: r["step"])
    for prev, row in zip([None, *run], run):
        if row[loss_key] <= target:
            if prev is None or prev[loss_key] <= row[loss_key]:
                return float(row[key])
            lo, hi = np.log(row[loss_key]), np.log(prev[loss_key])
            frac = (hi - np.log(target)) / (hi - lo)
            return float(prev[key] + frac * (row[key] - prev[key]))
    return float("nan")


def curve(rows: list[dict], key: str, **fields) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, mean over the matching rows at each step)`` of ``key`` (e.g. over the seeds of a method)."""
    sel = [r for r in select(rows, **fields) if key in r]
    steps = np.array(sorted({r["step"] for r in sel}))
    return steps, np.array([np.mean([r[key] for r in sel if r["step"] == t]) for t in steps])


def window(rows: list[dict], steps: int, last: float, **fields) -> list[dict]:
    """The evaluations of one run (the rows matching ``fields``) in its judged window, by step: the last ``last``
    fraction of its ``steps`` steps (step >= steps (1 - last))."""
    start = steps * (1.0 - last)
    return sorted((r for r in select(rows, **fields) if r["step"] >= start), key=lambda r: r["step"])


def judged(rows: list[dict], key: str, seeds: Sequence[int], steps: int, last: float | None = None, how=np.mean,
           **fields) -> np.ndarray:  # fmt: skip
    """``[len(seeds)]``: per seed, the value of ``key`` a verdict judges. With ``last`` (a fraction of the steps),
    ``how`` (the mean) over the run's evaluations in its last ``last`` of the steps (``window``): a run can spike at
    one evaluation (a full-batch train loss 0.005 -> 1.4 at the very last step), and a verdict must not hinge on
    when a spike lands. With ``last=None``, the value at step ``steps`` (``per_seed``)."""
    if last is None:
        return per_seed(rows, key, seeds, step=steps, **fields)
    out = []
    for s in seeds:
        run = window(rows, steps, last, seed=s, **fields)
        if not run:
            raise KeyError(f"no row with seed={s} and {fields} in the last {last:g} of {steps} steps")
        out.append(how([r[key] for r in run]))
    return np.asarray(out, dtype=float)


def spikes(rows: list[dict], runs: Sequence[dict], steps: int, last: float, factor: float,
           loss_key: str = "train_loss") -> list[dict]:  # fmt: skip
    """The loss spikes in the judged windows of ``runs`` (each a dict of fields naming one run): an evaluation in
    the last ``last`` of the steps whose ``loss_key`` is above ``factor`` times the run's lowest before it, as
    ``{**run, step, train_loss, lowest_before}``. For a verdict to report, not to decide on (``judged``)."""
    out = []
    for fields in runs:
        low = np.inf
        for r in sorted(select(rows, **fields), key=lambda r: r["step"]):
            if r["step"] >= steps * (1.0 - last) and r[loss_key] > factor * low:
                out.append(dict(fields, step=r["step"], train_loss=r[loss_key], lowest_before=float(low)))
            low = min(low, r[loss_key])
    return out


def spike_clause(found: list[dict], factor: float, name=None) -> str:
    """``spikes``' findings in words for a verdict's reason; ``name(spike) -> str`` names the run (default: its
    fields as ``key value``)."""
    if not found:
        return f"no loss spike in the judged window (> {factor:g}x the run's lowest before it)"
    skip = ("step", "train_loss", "lowest_before")
    name = name or (lambda s: " ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in s.items() if k not in skip))  # fmt: skip
    listed = ", ".join(f"{name(s)} step {s['step']}: {s['lowest_before']:.3g} -> {s['train_loss']:.3g}" for s in found)
    return (f"{len(found)} loss spike(s) in the judged window (train loss > {factor:g}x the run's lowest before it; "
            f"reported, not decisive: {listed})")  # fmt: skip
