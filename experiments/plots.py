"""Figures of the experiments: matplotlib on the Agg backend (``plt``), atomic PNG files, and the plot
helpers the experiments share (paired scatter over seeds, a sigma axis, mean curves, median curves with the
range over seeds, per-seed points with a mean and its interval)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import records  # noqa: E402
from lsgeo.data import write_atomic  # noqa: E402


def save_figure(fig, path: Path) -> None:
    """Saves a matplotlib figure as PNG atomically and closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_atomic(Path(path), buf.getvalue())


def paired_scatter(ax, groups: Mapping[str, tuple[list[dict], Any]], x: str, y: str) -> None:
    """On ``ax``: one point per row of each ``label -> (rows, color)`` group, the points of the same seed joined
    by a grey line (the seeds pair the groups)."""
    by_seed = {label: {r["seed"]: r for r in group} for label, (group, _) in groups.items()}
    for seed in set.intersection(*(set(v) for v in by_seed.values())):
        ax.plot([v[seed][x] for v in by_seed.values()], [v[seed][y] for v in by_seed.values()], color="gray", lw=0.8)
    for label, (group, color) in groups.items():
        ax.scatter([r[x] for r in group], [r[y] for r in group], color=color, label=label, zorder=3)


def sigma_axis(ax, sigmas: Sequence[float]) -> None:
    """A log-scale sigma axis with a labelled tick at every sigma of the grid (and no others)."""
    ax.set_xscale("log")
    ax.set_xticks(list(sigmas), [f"{s:g}" for s in sigmas])
    ax.minorticks_off()
    ax.set_xlabel("sigma")


def plot_curves(ax, rows: list[dict], key: str, series: Mapping[str, tuple[dict, Any]], **style) -> None:
    """On ``ax``: for each ``label -> (fields, color)`` of ``series`` the mean over seeds of ``key`` vs step."""
    for name, (fields, color) in series.items():
        steps, values = records.curve(rows, key, **fields)
        ax.plot(steps, values, color=color, label=name, **style)


def plot_band_curves(ax, rows: list[dict], key: str, series: Mapping[str, tuple[dict, Any]], *, scale: float = 1.0,
                     **style) -> None:
    """On ``ax``: for each ``label -> (fields, color)`` of ``series`` the mean over seeds of ``scale * key`` vs step,
    with a band from the lowest to the highest seed at each step (the seed spread)."""
    for name, (fields, color) in series.items():
        sel = [r for r in records.select(rows, **fields) if key in r]
        steps = np.array(sorted({r["step"] for r in sel}))
        values = [np.array([r[key] for r in sel if r["step"] == t], dtype=float) * scale for t in steps]
        ax.plot(steps, [v.mean() for v in values], color=color, label=f"{name} (mean, band: seed min-max)", **style)
        ax.fill_between(steps, [v.min() for v in values], [v.max() for v in values], color=color, alpha=0.15, lw=0)


def gain_panel(ax, gains: Mapping[str, Any], *, controls: Sequence[str] = (), scale: float = 1.0, unit: str = "",
               mde: Mapping[str, float] | None = None) -> None:
    """On ``ax``: each paired gain (``verdicts.Gain``) of ``gains`` as its mean with the bar mean ± margin (the
    verdict's interval: supported when the bar lies above 0); the names in ``controls`` (negative controls, which
    must not lie above 0) in grey; ``mde`` (name -> value) drawn as a diamond where given."""
    names, labelled = list(gains), False
    for i, name in enumerate(names):
        g = gains[name]
        color = "tab:gray" if name in controls else "tab:red"
        margin = g.margin if np.isfinite(g.margin) else 0.0
        ax.errorbar([i], [scale * g.mean], yerr=[[scale * margin], [scale * margin]], fmt="o", capsize=5, ms=6,
                    color=color, elinewidth=2)
        if mde is not None and name in mde and np.isfinite(mde[name]):
            ax.plot([i + 0.15], [scale * mde[name]], "D", color="tab:purple", ms=5,
                    label=None if labelled else "minimum detectable effect (80% power)")
            labelled = True
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), [n + (" (control)" if n in controls else "") for n in names], rotation=30,
                  ha="right", fontsize=7)
    ax.set_ylabel(f"paired gain{f' ({unit.strip()})' if unit else ''}: mean ± margin (95% t)")


def seed_band(ax, x, values, *, color, label: str, style: str = "-") -> None:
    """On ``ax``: the median over seeds of ``values [seeds, len(x)]`` against ``x`` (markers), and the range
    over seeds as a band."""
    values = np.asarray(values, dtype=float)
    ax.plot(x, np.median(values, axis=0), style, color=color, marker="o", ms=3, label=label)
    ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.12)


def seed_interval(ax, position: float, values, mean: float, half_width: float, *, color="tab:blue") -> None:
    """On ``ax`` at ``position``: one grey point per seed and the mean with its interval (``mean +- half_width``)."""
    values = np.asarray(values, dtype=float)
    ax.scatter(np.full(values.size, position), values, color="gray", s=12)
    ax.errorbar(position, mean, yerr=half_width, fmt="o", capsize=4, color=color)
