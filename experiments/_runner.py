"""The shared experiment runner: config -> cells -> rows -> summary, with resume.

An experiment is a grid of *cells* (one training run each, e.g. one (method, sigma, seed)).
The runner computes the cells that are not done yet, stores each finished cell at once
(``cells/<key>.json``), and from all rows writes ``metrics.csv``, ``summary.json`` and the
figures. Every file is written to a temporary name and ``os.replace``d, so an interrupted run
never leaves a half-written file, and ``--resume DIR`` recomputes only the missing cells.

A complete experiment module::

    import dataclasses
    from experiments import _runner

    @dataclasses.dataclass(frozen=True)
    class Config:
        '''What is run; the defaults finish on a 2-core CPU in minutes.'''
        sigmas: tuple[float, ...] = (0.0, 0.1)
        seeds: tuple[int, ...] = (0, 1)          # every config has `seeds`
        steps: int = 200

    def cells(cfg):                               # the grid, as dicts of JSON scalars
        return [dict(sigma=s, seed=seed) for s in cfg.sigmas for seed in cfg.seeds]

    def run(cfg, data, cells):                    # one list of metric rows per cell;
        return [[dict(step=cfg.steps, loss=...)] for c in cells]   # `data` = prepare(cfg)

    def summarize(cfg, rows):                     # rows: all cells' rows, cell fields included
        gap = ...
        return _runner.Verdict(supported=gap > 0, figures={"gap": gap}, table=[...])

    def plot(cfg, rows, out_dir):
        fig, ax = _runner.plt.subplots(); ...; _runner.save_figure(fig, out_dir / "loss.png")

    EXPERIMENT = _runner.Experiment(
        name="toy", claim="Noise lowers the loss.", config=Config, presets={"paper": Config(steps=10_000)},
        cells=cells, run=run, summarize=summarize, plot=plot, batch_over=("sigma", "seed"))

    if __name__ == "__main__":
        _runner.main(EXPERIMENT)

``batch_over`` names the cell fields that ``run`` may receive several values of in one call
(cells that agree on every other field are handed over together, so ``run`` can ``vmap`` over
them and compile once). From Python: ``run_experiment(EXPERIMENT, Config(steps=5), out=tmp)``.

CLI (tyro): ``python -m experiments.NAME [--preset paper] [--seeds 0 1 2] [--out DIR]
[--resume DIR] [--FIELD VALUE ...]``. With ``--resume DIR`` the config is the one saved in
``DIR/config.json``; only ``--seeds`` may change it (adding seeds computes only the new cells).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import (
    Annotated,
    Any,
    Callable,
    Generic,
    Mapping,
    NamedTuple,
    Sequence,
    TypeVar,
)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is fixed)
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

__all__ = ["Experiment", "Verdict", "main", "fast_cpu_compile", "run_experiment", "save_figure", "plt", "mean_se", "select"]

C = TypeVar("C")
Cell = dict[str, Any]
Row = dict[str, Any]


class Verdict(NamedTuple):
    """What ``summarize`` returns: the judgement of the claim from the run's own numbers."""

    supported: bool | None  # None: the run is too small to tell
    figures: dict[str, float]  # flat: the numbers the claim is judged by
    table: list[Row]  # printed at the end of the run


@dataclasses.dataclass(frozen=True)
class Experiment(Generic[C]):
    """One experiment module's parts (see the module docstring for an example)."""

    name: str
    claim: str
    config: type
    cells: Callable[[C], list[Cell]]
    run: Callable[[C, Any, list[Cell]], list[list[Row]]]
    summarize: Callable[[C, list[Row]], Verdict]
    plot: Callable[[C, list[Row], Path], None] | None = None
    presets: Mapping[str, C] = dataclasses.field(default_factory=dict)
    prepare: Callable[[C], Any] = lambda cfg: None
    batch_over: tuple[str, ...] = ()




def _write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_figure(fig, path: Path) -> None:
    """Saves a matplotlib figure as PNG atomically and closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    _write_atomic(Path(path), buf.getvalue())


def _plain(value):
    """JSON-able Python scalars from numpy / JAX scalars."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and np.ndim(value) == 0:
        return value.item()
    return value


def _dump(obj) -> str:
    return json.dumps(_plain(obj), indent=2) + "\n"


def _csv(rows: list[Row]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def cell_key(cell: Cell) -> str:
    """File-name-safe, readable key of a cell: ``method=gd,sigma=0.1,seed=0``."""
    return ",".join(f"{k}={v}" for k, v in cell.items()).replace("/", "_").replace(" ", "")




def _config_from_dict(cls: type, saved: dict):
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    return cls(**{f.name: tuples(saved[f.name]) for f in dataclasses.fields(cls) if f.name in saved})


def _saved_config(exp: Experiment, run_dir: Path):
    return _config_from_dict(exp.config, json.loads((Path(run_dir) / "config.json").read_text()))


def _resumed_config(exp: Experiment, run_dir: Path, given):
    """The saved config of ``run_dir``; ``given`` may differ from it in ``seeds`` only."""
    saved = _saved_config(exp, run_dir)
    if given is None:
        return saved
    changed = [f.name for f in dataclasses.fields(exp.config) if getattr(given, f.name) != getattr(saved, f.name)]
    if set(changed) - {"seeds"}:
        raise ValueError(f"--resume keeps the saved config of {run_dir}; only seeds may change, got {changed}")
    return given


def _new_run_dir(out: Path, name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        run_dir = out / name / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run folder under {out / name}")




def _devices() -> list[str]:
    import jax

    return [f"{d.platform}:{d.device_kind}" for d in jax.devices()]


def fast_cpu_compile() -> bool:
    """Compiles at XLA backend optimisation level 0 when jax will run on the CPU only (no accelerator
    plugin installed, or ``JAX_PLATFORMS=cpu``), for CLI runs whose cost is compilation (a ResNet under
    ``lax.scan``: about half the compile time; elementwise code runs slower). XLA reads ``XLA_FLAGS``
    when jax initialises its backend, so call it first in ``__main__``, before any computation; it
    does nothing when ``XLA_FLAGS`` already sets the level. Returns whether it set the level."""
    import importlib.metadata
    import importlib.util

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in flags:
        return False
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms.strip().lower() != "cpu":
        plugins = importlib.util.find_spec("jax_plugins") is not None or importlib.util.find_spec("libtpu") is not None
        if plugins or importlib.metadata.entry_points(group="jax_plugins"):
            return False
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true".strip()
    return True


def _groups(exp: Experiment, cells: list[Cell]) -> list[list[Cell]]:
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        fixed = tuple((k, v) for k, v in cell.items() if k not in exp.batch_over)
        groups.setdefault(fixed, []).append(cell)
    return list(groups.values())


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _format_table(rows: list[Row]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def run_experiment(exp: Experiment, config=None, *, out: Path | str = "results", resume: Path | str | None = None,
                   progress: bool = True, verbose: bool = True) -> tuple[Path, dict]:
    """Runs ``exp`` with ``config`` (default: the config's defaults) or resumes the run in ``resume``
    (default config: the saved one; a given config may differ from it in ``seeds`` only).
    Returns ``(run_dir, summary)``."""
    start = time.perf_counter()
    if resume is not None:
        run_dir = Path(resume)
        config = _resumed_config(exp, run_dir, config)
    else:
        run_dir = _new_run_dir(Path(out), exp.name)
        config = exp.config() if config is None else config
    _write_atomic(run_dir / "config.json", _dump(dataclasses.asdict(config)))

    cells = exp.cells(config)
    done = {p.stem: json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")}
    pending = [c for c in cells if cell_key(c) not in done]
    reused_s = sum(done[cell_key(c)]["elapsed_s"] for c in cells if cell_key(c) in done)
    if verbose:
        print(f"{exp.name}: {len(cells)} cells, {len(cells) - len(pending)} already done -> {run_dir}")

    if pending:
        data = exp.prepare(config)
        bar = tqdm(total=len(cells), initial=len(cells) - len(pending), desc=exp.name, unit="cell",
                   disable=not progress, file=sys.stderr)
        for group in _groups(exp, pending):
            bar.set_postfix_str(cell_key({k: v for k, v in group[0].items() if k not in exp.batch_over}))
            t0 = time.perf_counter()
            results = exp.run(config, data, group)
            elapsed = (time.perf_counter() - t0) / len(group)
            if len(results) != len(group):
                raise RuntimeError(f"{exp.name}.run returned {len(results)} results for {len(group)} cells")
            for cell, rows in zip(group, results):
                record = {"cell": cell, "rows": rows, "elapsed_s": elapsed}
                _write_atomic(run_dir / "cells" / f"{cell_key(cell)}.json", _dump(record))
                done[cell_key(cell)] = _plain(record)
            bar.update(len(group))
        bar.close()

    rows = [{**c, **r} for c in cells for r in done[cell_key(c)]["rows"]]
    _write_atomic(run_dir / "metrics.csv", _csv(rows))
    verdict = exp.summarize(config, rows)
    if exp.plot is not None:
        exp.plot(config, rows, run_dir)
    summary = {
        "experiment": exp.name,
        "config": dataclasses.asdict(config),
        "claim": exp.claim,
        "supported": verdict.supported,
        "figures": dict(verdict.figures),
        "runtime_s": reused_s + time.perf_counter() - start,
        "devices": _devices(),
    }
    _write_atomic(run_dir / "summary.json", _dump(summary))
    if verbose:
        print(_format_table(verdict.table))
        print(f"\nclaim: {exp.claim}\nsupported: {verdict.supported}")
        print("figures: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary["figures"].items()))
        print(f"runtime: {summary['runtime_s']:.1f} s   results: {run_dir}")
    return run_dir, summary


@dataclasses.dataclass(frozen=True)
class _Cli(Generic[C]):
    config: Annotated[C, tyro.conf.OmitArgPrefixes]
    preset: str = "default"  # a named config: "default" or one of the experiment's presets
    out: Path = Path("results")  # results go to OUT/NAME/<timestamp>/
    resume: Path | None = None  # a previous run folder: compute only its missing cells


def _flag(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main(exp: Experiment, argv: Sequence[str] | None = None) -> tuple[Path, dict]:
    """The CLI of an experiment module: ``--preset``, ``--out``, ``--resume`` and every config field.

    The field defaults are those of the preset, or with ``--resume DIR`` those saved in DIR."""
    argv = list(sys.argv[1:] if argv is None else argv)
    presets = {"default": exp.config(), **exp.presets}
    name = _flag(argv, "--preset") or "default"
    if name not in presets:
        raise SystemExit(f"unknown --preset {name!r}; choose from {sorted(presets)}")
    resume = _flag(argv, "--resume")
    default = _saved_config(exp, Path(resume)) if resume and resume != "None" else presets[name]
    args = tyro.cli(
        _Cli[exp.config],
        default=_Cli(config=default, preset=name),
        args=argv,
        prog=f"python -m experiments.{exp.name}",
        description=(sys.modules[exp.config.__module__].__doc__ or "").strip(),
    )
    return run_experiment(exp, args.config, out=args.out, resume=args.resume)




def select(rows: list[Row], **fields) -> list[Row]:
    """The rows whose fields equal ``fields`` (e.g. ``select(rows, method="gd", sigma=0.0)``)."""
    return [r for r in rows if all(r.get(k) == v for k, v in fields.items())]


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for a single value)."""
    v = np.asarray(values, dtype=float)
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se
