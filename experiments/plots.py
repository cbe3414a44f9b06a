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
