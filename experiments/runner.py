"""The shared experiment runner: config -> cells -> rows -> summary, with resume.

The runner computes the cells that are not done yet, stores each finished cell at once
(``cells/<key>.json``, ``experiments.rundir``), and from all rows writes ``metrics.csv``, ``summary.json``
and the figures. What an experiment module defines: ``experiments.experiment``; its command line:
``experiments.cli``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from experiments import rundir
from experiments.config_checks import check_config
from experiments.context import DataOptions, running
from experiments.experiment import Cell, Experiment, Interrupted, Row, cell_key
from experiments.plots import save_figure
from lsgeo.data import write_atomic


def _devices() -> list[str]:
    import jax

    return [f"{d.platform}:{d.device_kind}" for d in jax.devices()]


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


def _run_cells(exp: Experiment, config, cells: list[Cell], pending: list[Cell], done: dict, path, write, progress):
    """Runs the ``pending`` cells group by group (``_groups``), storing each finished cell at once
    (``write(path(cell), record)``) and in ``done``."""
    prepared = exp.prepare(config)
    with tqdm(total=len(cells), initial=len(cells) - len(pending), desc=exp.name, unit="cell", disable=not progress,
              file=sys.stderr) as bar:  # fmt: skip
        for group in _groups(exp, pending):
            bar.set_postfix_str(cell_key({k: v for k, v in group[0].items() if k not in exp.batch_over}))
            t0 = time.perf_counter()
            results = exp.run(config, prepared, group)
            elapsed = (time.perf_counter() - t0) / len(group)
            if len(results) != len(group):
                raise RuntimeError(f"{exp.name}.run returned {len(results)} results for {len(group)} cells")
            for cell, rows in zip(group, results):
                record = {"cell": cell, "rows": rows, "elapsed_s": elapsed}
                write(path(cell), rundir.dump(record))
                done[cell_key(cell)] = rundir.plain(record)
            bar.update(len(group))


def run_experiment(
    exp: Experiment,
    config=None,
    *,
    out: Path | str = "results",
    resume: Path | str | None = None,
    progress: bool = True,
    verbose: bool = True,
    data: DataOptions = DataOptions(),
    allow_version_change: bool = False,
) -> tuple[Path, dict]:
    """Runs ``exp`` with ``config`` (default: the config's defaults) or resumes the run in ``resume``
    (default config: the saved one; a given config may differ from it in ``seeds`` only).
    ``data``: where data sets are read from (and whether to download them). Returns ``(run_dir, summary)``.
    The whole config and the data it needs are checked first (``check_config``): an invalid one raises
    ``ConfigError`` before any folder is created or written to. Ctrl-C (KeyboardInterrupt) during the
    run raises ``Interrupted``, whose message says which cells were kept and the ``--resume`` command.
    A resume of a folder written by another code version (``rundir.code_version``) is a ``ConfigError``
    unless ``allow_version_change``."""
    start = time.perf_counter()
    writes = rundir.writes()  # under several processes, only process 0 writes and prints
    verbose, progress = verbose and writes, progress and writes
    write = write_atomic if writes else lambda path, content: None
    if resume is not None:
        config = rundir.resumed_config(exp, Path(resume), config)
        rundir.check_version(Path(resume), allow_change=allow_version_change)
    else:
        rundir.check_out(Path(out))
    if config is None:
        config = exp.config()
    cells = check_config(exp, config, data)
    done = rundir.done_cells(exp, Path(resume), cells) if resume is not None else {}
    run_dir = Path(resume) if resume is not None else rundir.new_run_dir(Path(out), exp.name)
    try:
        with running(data, progress):
            write(run_dir / "config.json", rundir.dump(dataclasses.asdict(config)))
            write(run_dir / "version.json", rundir.dump(rundir.code_version()))
            pending = [c for c in cells if cell_key(c) not in done]
            reused_s = sum(done[cell_key(c)]["elapsed_s"] for c in cells if cell_key(c) in done)
            if verbose:
                print(f"{exp.name}: {len(cells)} cells, {len(cells) - len(pending)} already done -> {run_dir}")
            if pending:
                _run_cells(exp, config, cells, pending, done, lambda cell: run_dir / "cells" / f"{cell_key(cell)}.json",
                           write, progress)  # fmt: skip
            rows = [{**c, **r} for c in cells for r in done[cell_key(c)]["rows"]]
            write(run_dir / "metrics.csv", rundir.csv_text(rows))
            verdict = exp.summarize(config, rows)
            for name, fig in (exp.plot(config, rows) if exp.plot is not None and writes else {}).items():
                fig.tight_layout()
                save_figure(fig, run_dir / name)
    except KeyboardInterrupt:
        kept = sum(cell_key(c) in done for c in cells)
        message = (
            f"interrupted: {kept} of {len(cells)} cells kept in {run_dir}"
            + ("" if kept < len(cells) else " (the summary is not written yet)")
            + f"; resume with: {rundir.resume_command(exp, run_dir, data)}"
        )
        raise Interrupted(message, run_dir, kept, len(cells)) from None
    summary = {
        "experiment": exp.name,
        "config": dataclasses.asdict(config),
        "claim": exp.claim,
        "supported": verdict.supported,
        "reason": verdict.reason,
        "controls": rundir.plain(verdict.controls),
        "power": rundir.plain(verdict.power),
        "figures": {k: rundir.finite_or_none(v) for k, v in verdict.figures.items()},
        "runtime_s": reused_s + time.perf_counter() - start,
        "devices": _devices(),
        "code_version": rundir.code_version(),
    }
    write(run_dir / "summary.json", rundir.dump(summary))
    if verbose:
        print(_format_table(verdict.table))
        print(
            f"\nclaim: {exp.claim}\nsupported: {verdict.supported}"
            + (f"  ({verdict.reason})" if verdict.reason else "")
        )
        print("figures: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary["figures"].items()))
        print(f"runtime: {summary['runtime_s']:.1f} s   results: {run_dir}")
    return run_dir, summary
