"""The shared experiment runner: config -> cells -> rows -> summary, with resume.

An experiment is a grid of *cells* (one training run each, e.g. one (method, sigma, seed)).
The runner computes the cells that are not done yet, stores each finished cell at once
(``cells/<key>.json``), and from all rows writes ``metrics.csv``, ``summary.json`` and the
figures. Every file is written atomically (``lsgeo.data.write_atomic``), so an interrupted run
never leaves a half-written file, and ``--resume DIR`` recomputes only the missing cells.
``summary.json`` is strict JSON (a NaN or infinite figure is written as null).

A complete experiment module (``experiments/toy.py``)::

    '''Noise lowers the loss (module docstring: printed by --help).'''
    import dataclasses
    from experiments import common, runner

    CLAIM = "Noise lowers the loss."              # the claim the run judges, one sentence

    @dataclasses.dataclass(frozen=True)
    class Config:
        '''What is run; the defaults finish on a 2-core CPU in minutes.'''
        sigmas: tuple[float, ...] = (0.0, 0.1)
        seeds: tuple[int, ...] = (0, 1, 2)       # every config has `seeds` (>= 3 for a verdict)
        steps: int = 200

    PRESETS = {"paper": Config(steps=10_000)}     # optional: named configs for --preset

    def cells(cfg):                               # the grid, as dicts of JSON scalars; raise
        return [dict(sigma=s, seed=k) for s in cfg.sigmas for k in cfg.seeds]   # ValueError on a bad config

    def prepare(cfg):                             # optional: data shared by all cells
        return common.load_dataset("digits")

    def run(cfg, data, cells):                    # one list of metric rows per cell
        return [[dict(step=cfg.steps, loss=...)] for c in cells]

    def summarize(cfg, rows):                     # rows: all cells' rows, cell fields included
        gain = common.paired_gain(...)            # paired over seeds: null within noise
        return runner.Verdict(gain.supported, {"gain": gain.mean}, table=[...], reason=gain.describe("loss gain"))

    def plot(cfg, rows):                          # optional: {file name: matplotlib figure}
        fig, ax = runner.plt.subplots(); ...
        return {"loss.png": fig}

    EXPERIMENT = runner.Experiment.from_module(__name__, batch_over=("sigma", "seed"))

    if __name__ == "__main__":
        runner.main(EXPERIMENT)

``batch_over`` names the cell fields that ``run`` may receive several values of in one call
(cells that agree on every other field are handed over together, so ``run`` can ``vmap`` over
them and compile once). From Python: ``run_experiment(EXPERIMENT, Config(steps=5), out=tmp)``.

CLI (tyro): ``python -m experiments.NAME [--preset NAME] [--seeds 0 1 2] [--out DIR] [--resume DIR]
[--data-dir DIR] [--download] [--FIELD VALUE ...]``; ``--help`` lists the fields and the presets.
With ``--resume DIR`` the config is the one saved in ``DIR/config.json``; only ``--seeds`` may change
it (adding seeds computes only the new cells). A bad option or config value fails before a run folder
is created. ``main`` enables JAX's persistent compilation cache, so a second run skips compilation.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import datetime
import io
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, NamedTuple, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tyro
from tqdm.auto import tqdm

from lsgeo.data import default_cache_dir, write_atomic

__all__ = [
    "Experiment",
    "Verdict",
    "DataOptions",
    "main",
    "run_experiment",
    "data_options",
    "progress_bar",
    "enable_compilation_cache",
    "fast_cpu_compile",
    "save_figure",
    "cell_key",
    "plt",
]

C = TypeVar("C")
Cell = dict[str, Any]
Row = dict[str, Any]


class Verdict(NamedTuple):
    """What ``summarize`` returns: the judgement of the claim from the run's own numbers."""

    supported: bool | None  # None: within noise, or the run cannot test the claim (``reason`` says which)
    figures: dict[str, float]  # flat: the numbers the claim is judged by
    table: list[Row]  # printed at the end of the run
    reason: str = ""  # why ``supported`` is what it is, in a sentence or two (printed and saved)


class DataOptions(NamedTuple):
    """Where the data of a run come from (``--data-dir``, ``--download``); see ``common.load_dataset``."""

    data_dir: Path | None = None
    download: bool = False


_DATA = contextvars.ContextVar("experiments_data_options", default=DataOptions())
_PROGRESS = contextvars.ContextVar("experiments_progress", default=False)


def data_options() -> DataOptions:
    """The data options of the run in progress (defaults outside a run)."""
    return _DATA.get()


@contextlib.contextmanager
def progress_bar(total: int, desc: str):
    """A tqdm bar over ``total`` training steps, yielding the ``callback(step, metrics)`` that
    ``lsgeo.train.train`` / ``sweep`` call after each chunk (None when the run shows no progress)."""
    if not _PROGRESS.get():
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, position=1, file=sys.stderr)

    def callback(step, metrics):
        bar.update(int(step) - bar.n)

    try:
        yield callback
    finally:
        bar.close()


def _module_name(module) -> str:
    spec = getattr(module, "__spec__", None)
    return spec.name.rsplit(".", 1)[-1] if spec is not None else Path(module.__file__).stem


@dataclasses.dataclass(frozen=True)
class Experiment(Generic[C]):
    """One experiment module's parts (see the module docstring for an example)."""

    name: str
    claim: str
    config: type
    cells: Callable[[C], list[Cell]]
    run: Callable[[C, Any, list[Cell]], list[list[Row]]]
    summarize: Callable[[C, list[Row]], Verdict]
    plot: Callable[[C, list[Row]], Mapping[str, Any]] | None = None
    presets: Mapping[str, C] = dataclasses.field(default_factory=dict)
    prepare: Callable[[C], Any] = lambda cfg: None
    batch_over: tuple[str, ...] = ()

    @classmethod
    def from_module(cls, module_name: str, *, batch_over: tuple[str, ...] = ()) -> Experiment:
        """The experiment defined by the module ``module_name`` (pass ``__name__``): its ``CLAIM``,
        ``Config``, ``cells``, ``run``, ``summarize`` and, where defined, ``plot``, ``prepare`` and ``PRESETS``."""
        module = sys.modules[module_name]
        optional = {
            k: getattr(module, attr)
            for k, attr in (("plot", "plot"), ("prepare", "prepare"), ("presets", "PRESETS"))
            if hasattr(module, attr)
        }
        return cls(
            name=_module_name(module),
            claim=module.CLAIM,
            config=module.Config,
            cells=module.cells,
            run=module.run,
            summarize=module.summarize,
            batch_over=batch_over,
            **optional,
        )


def save_figure(fig, path: Path) -> None:
    """Saves a matplotlib figure as PNG atomically and closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_atomic(Path(path), buf.getvalue())


def _plain(value):
    """JSON-able Python scalars from numpy / JAX scalars."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and np.ndim(value) == 0:
        return value.item()
    return value


def _finite_or_none(value):
    """``value`` as a plain scalar, with NaN and infinities as None (strict JSON: null)."""
    value = _plain(value)
    return None if isinstance(value, float) and not np.isfinite(value) else value


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
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true".strip()
    )
    return True


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in ``path`` (default ``<lsgeo cache dir>/jax``,
    ``$LSGEO_CACHE_DIR`` or ``~/.cache/lsgeo``), so that a second run of an experiment loads its
    compiled programs instead of compiling them again. Programs that compile in under 0.2 s are not
    stored (loading them would cost about as much). Returns the folder."""
    import jax

    folder = Path(path) if path is not None else default_cache_dir() / "jax"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


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


def run_experiment(
    exp: Experiment,
    config=None,
    *,
    out: Path | str = "results",
    resume: Path | str | None = None,
    progress: bool = True,
    verbose: bool = True,
    data: DataOptions = DataOptions(),
) -> tuple[Path, dict]:
    """Runs ``exp`` with ``config`` (default: the config's defaults) or resumes the run in ``resume``
    (default config: the saved one; a given config may differ from it in ``seeds`` only).
    ``data``: where data sets are read from (and whether to download them). Returns ``(run_dir, summary)``.
    A config that ``exp.cells`` rejects raises before any folder is created."""
    start = time.perf_counter()
    if resume is not None:
        config = _resumed_config(exp, Path(resume), config)
    elif config is None:
        config = exp.config()
    cells = exp.cells(config)
    run_dir = Path(resume) if resume is not None else _new_run_dir(Path(out), exp.name)
    write_atomic(run_dir / "config.json", _dump(dataclasses.asdict(config)))

    done = {p.stem: json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")}
    pending = [c for c in cells if cell_key(c) not in done]
    reused_s = sum(done[cell_key(c)]["elapsed_s"] for c in cells if cell_key(c) in done)
    if verbose:
        print(f"{exp.name}: {len(cells)} cells, {len(cells) - len(pending)} already done -> {run_dir}")

    tokens = (_DATA.set(data), _PROGRESS.set(progress))
    try:
        if pending:
            prepared = exp.prepare(config)
            bar = tqdm(
                total=len(cells),
                initial=len(cells) - len(pending),
                desc=exp.name,
                unit="cell",
                disable=not progress,
                file=sys.stderr,
            )
            for group in _groups(exp, pending):
                bar.set_postfix_str(cell_key({k: v for k, v in group[0].items() if k not in exp.batch_over}))
                t0 = time.perf_counter()
                results = exp.run(config, prepared, group)
                elapsed = (time.perf_counter() - t0) / len(group)
                if len(results) != len(group):
                    raise RuntimeError(f"{exp.name}.run returned {len(results)} results for {len(group)} cells")
                for cell, rows in zip(group, results):
                    record = {"cell": cell, "rows": rows, "elapsed_s": elapsed}
                    write_atomic(run_dir / "cells" / f"{cell_key(cell)}.json", _dump(record))
                    done[cell_key(cell)] = _plain(record)
                bar.update(len(group))
            bar.close()

        rows = [{**c, **r} for c in cells for r in done[cell_key(c)]["rows"]]
        write_atomic(run_dir / "metrics.csv", _csv(rows))
        verdict = exp.summarize(config, rows)
        for name, fig in (exp.plot(config, rows) if exp.plot is not None else {}).items():
            fig.tight_layout()
            save_figure(fig, run_dir / name)
    finally:
        _DATA.reset(tokens[0])
        _PROGRESS.reset(tokens[1])
    summary = {
        "experiment": exp.name,
        "config": dataclasses.asdict(config),
        "claim": exp.claim,
        "supported": verdict.supported,
        "reason": verdict.reason,
        "figures": {k: _finite_or_none(v) for k, v in verdict.figures.items()},
        "runtime_s": reused_s + time.perf_counter() - start,
        "devices": _devices(),
    }
    write_atomic(run_dir / "summary.json", _dump(summary))
    if verbose:
        print(_format_table(verdict.table))
        print(
            f"\nclaim: {exp.claim}\nsupported: {verdict.supported}"
            + (f"  ({verdict.reason})" if verdict.reason else "")
        )
        print("figures: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary["figures"].items()))
        print(f"runtime: {summary['runtime_s']:.1f} s   results: {run_dir}")
    return run_dir, summary


def _flag(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _preset_lines(exp: Experiment, presets: Mapping[str, Any]) -> list[str]:
    """One line per preset: the fields in which it differs from the defaults."""
    default = exp.config()
    lines = []
    for name, cfg in presets.items():
        diff = [
            f"{f.name}={getattr(cfg, f.name)!r}"
            for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(default, f.name)
        ]
        lines.append(f"  {name}: {', '.join(diff) or '(the defaults)'}")
    return lines


def _cli_type(exp: Experiment, presets: Mapping[str, Any], default, preset: str):
    """The tyro dataclass of the CLI: the config's fields and the runner's options."""
    arg = tyro.conf.arg
    fields = [
        ("config", Annotated[exp.config, tyro.conf.OmitArgPrefixes], dataclasses.field(default=default)),
        (
            "preset",
            Annotated[Literal[tuple(presets)], arg(help="a named config (fields given after it override it)")],
            dataclasses.field(default=preset),
        ),
        (
            "out",
            Annotated[Path, arg(help="results go to OUT/NAME/<timestamp>/")],
            dataclasses.field(default=Path("results")),
        ),
        (
            "resume",
            Annotated[Path | None, arg(help="a previous run folder: compute only its missing cells")],
            dataclasses.field(default=None),
        ),
        (
            "data_dir",
            Annotated[
                Path | None,
                arg(help="folder of the Fashion-MNIST / CIFAR-10 files (default $LSGEO_DATA_DIR, else ./data)"),
            ],
            dataclasses.field(default=None),
        ),
        (
            "download",
            Annotated[
                bool,
                arg(
                    help="fetch missing Fashion-MNIST / CIFAR-10 files from their official "
                    "URLs (SHA-256 verified) into the data folder"
                ),
            ],
            dataclasses.field(default=False),
        ),
    ]
    return dataclasses.make_dataclass(f"{exp.name}_cli", fields, frozen=True)


def main(exp: Experiment, argv: Sequence[str] | None = None, *, compilation_cache: bool = True) -> tuple[Path, dict]:
    """The CLI of an experiment module: ``--preset``, ``--out``, ``--resume``, ``--data-dir``,
    ``--download`` and every config field.

    The field defaults are those of the preset, or with ``--resume DIR`` those saved in DIR. With
    ``compilation_cache`` (the default) the persistent compilation cache is enabled
    (``enable_compilation_cache``) before anything is compiled; it is process-wide JAX configuration,
    so callers inside a larger program (tests) may leave it off."""
    argv = list(sys.argv[1:] if argv is None else argv)
    presets = {"default": exp.config(), **exp.presets}
    name = _flag(argv, "--preset") or "default"
    if name not in presets:
        raise SystemExit(f"unknown --preset {name!r}; choose from {sorted(presets)}")
    resume = _flag(argv, "--resume")
    default = _saved_config(exp, Path(resume)) if resume and resume != "None" else presets[name]
    doc = (sys.modules[exp.config.__module__].__doc__ or "").strip()
    args = tyro.cli(
        _cli_type(exp, presets, default, name),
        args=argv,
        prog=f"python -m experiments.{exp.name}",
        description=doc + "\n\npresets (--preset NAME):\n" + "\n".join(_preset_lines(exp, presets)),
    )
    if compilation_cache:
        enable_compilation_cache()
    return run_experiment(
        exp, args.config, out=args.out, resume=args.resume, data=DataOptions(args.data_dir, args.download)
    )
