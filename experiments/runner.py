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

    def validate(cfg):                            # optional: checks beyond the field conventions (below),
        if cfg.steps < 100:                       # a ValueError naming the flag
            raise ValueError(f"--steps must be >= 100 for the loss to settle; got {cfg.steps}")

    def cells(cfg):                               # the grid, as dicts of JSON scalars
        return [dict(sigma=s, seed=k) for s in cfg.sigmas for k in cfg.seeds]

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
it (adding seeds computes only the new cells), and a folder that another experiment wrote is refused.
``main`` enables JAX's persistent compilation cache, so a second run skips compilation.

A bad option or config value fails before a run folder is created, with one line naming the flag
(``check_config``, ``ConfigError``). The checks are driven by the ``Config`` fields, so a new experiment
gets them by naming its fields as the others do: the annotation's type (``int``, ``float``, ``str``,
``X | None``, ``tuple[X, ...]``, and ``Literal[...]`` for a choice, e.g. ``tuple[Literal[METHODS], ...]``:
also shown by ``--help``); tuples non-empty, grid axes (``seeds``, ``sigmas``, ``methods``, ...) without
repeats; numbers finite; an int >= 1 unless ``_RANGES`` says otherwise by name (``seeds``, ``lr`` / ``*_lr``,
``sigma(s)``, ``momentum``, ``*_fraction``, ``*tol``, ...); ``eval_every`` divides ``steps``; batch sizes
(``batch_size``, ``small_batch``, ``large_batch``) at most the training points; and for a ``dataset``
field, the data set itself (name, files, with ``--download`` fetched first, and ``n_train`` / ``n_val`` /
``n_test`` against its size). Then the module's ``validate(cfg)`` and ``cells(cfg)`` run; a ValueError
there is a config error too. Ctrl-C during a run prints one line with the cells kept and the
``--resume`` command that finishes the run.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import datetime
import fnmatch
import io
import json
import math
import os
import shlex
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, NamedTuple, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tyro
from tqdm.auto import tqdm

from lsgeo import launch
from lsgeo.data import default_cache_dir, write_atomic

__all__ = [
    "Experiment",
    "Verdict",
    "DataOptions",
    "ConfigError",
    "Interrupted",
    "main",
    "run_experiment",
    "check_config",
    "flag",
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
    validate: Callable[[C], None] | None = None  # the experiment's own checks (raise ValueError naming the flag)

    @classmethod
    def from_module(cls, module_name: str, *, batch_over: tuple[str, ...] = ()) -> Experiment:
        """The experiment defined by the module ``module_name`` (pass ``__name__``): its ``CLAIM``,
        ``Config``, ``cells``, ``run``, ``summarize`` and, where defined, ``plot``, ``prepare``,
        ``validate`` and ``PRESETS``."""
        module = sys.modules[module_name]
        optional = {
            k: getattr(module, attr)
            for k, attr in (("plot", "plot"), ("prepare", "prepare"), ("presets", "PRESETS"), ("validate", "validate"))
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


class ConfigError(ValueError):
    """An invalid option or config value, found before a run folder is created. The message names
    the command-line flag (``--eval-every``); ``main`` prints it as one line and exits with status 1."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the finished cells are kept in ``run_dir``; the message says how to resume."""

    def __init__(self, message: str, run_dir: Path, kept: int, total: int):
        super().__init__(message)
        self.run_dir, self.kept, self.total = run_dir, kept, total


def flag(field: str) -> str:
    """The command-line flag of a config field: ``eval_every`` -> ``--eval-every``."""
    return "--" + field.replace("_", "-")


# The conventions of config fields, by name: ``check_config`` applies them to every experiment, before
# anything is written. A range applies to the value of a number field and to every element of a tuple
# field; the first pattern (fnmatch) that matches the field's name wins. An int field that matches none
# must be >= 1 (sizes, steps, widths, counts); a float field must be finite whatever its name.
_RANGES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("seeds", "*_seed"), "seed"),
    (("augment_padding", "noise_off_epoch"), ">= 0"),
    (("lr", "lrs", "*_lr"), "> 0"),
    (("sigma", "sigmas", "*noise", "weight_decay", "*tol", "away_from_one", "min_line_barrier"), ">= 0"),
    (("momentum",), "in [0, 1)"),
    (("*_fraction", "swa_start"), "in [0, 1]"),
    (("init_scale", "rho", "rho_*", "*radius", "*gammas", "alphas", "signal", "level", "*_loss", "threshold"), "> 0"),
    (("peak_window", "moved", "edge_*"), "> 0"),
)
_IN_RANGE: dict[str, Callable[[float], bool]] = {
    ">= 1": lambda v: v >= 1,
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "seed": lambda v: 0 <= v < 2**31,
}
_DISTINCT = ("seeds", "sigmas", "methods", "gammas", "gd_gammas", "alphas", "archs", "comparisons")  # grid axes
_DIVIDES = (("eval_every", "steps"),)  # (a, b): a <= b and a divides b (evaluations every a steps, one at the end)
_AT_MOST = (("check_every", "max_steps"), ("noise_off_epoch", "epochs"))  # (a, b): a <= b
_BATCHES = ("batch_size", "small_batch", "large_batch")  # at most the training points


def _type_problem(tp, value) -> str | None:
    """Why ``value`` is not a ``tp`` (None when it is); the types of config fields only."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(a, value) for a in args if a is not type(None)]
        return None if None in problems else problems[0]
    if origin is Literal:
        return None if value in args else f"must be one of {', '.join(map(str, args))}; got {value!r}"
    if origin is tuple:
        if not isinstance(value, tuple):
            return f"must be a tuple; got {value!r}"
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        return next((p for p in (_type_problem(item, v) for v in value) if p), None) if item else None
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    ok = {
        bool: isinstance(value, bool),
        int: number and not isinstance(value, (float, np.floating)),
        float: number,
        str: isinstance(value, str),
    }.get(tp, True)
    return None if ok else f"must be {'a' if tp is not int else 'an'} {tp.__name__}; got {value!r}"


def _scalar_type(tp):
    """``int`` for ``int``, ``int | None``, ``tuple[int, ...]`` (the type of each number of the field)."""
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    return _scalar_type(args[0]) if len(args) == 1 else tp


def _range(name: str, tp) -> str | None:
    for patterns, rule in _RANGES:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return rule
    return ">= 1" if _scalar_type(tp) is int else None


def _check_fields(config) -> None:
    """Types, emptiness, repeats, finiteness and the ranges of ``_RANGES``, field by field."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, name = getattr(config, f.name), flag(f.name)
        problem = _type_problem(hints.get(f.name, Any), value)
        if problem:
            raise ConfigError(f"{name} {problem}")
        values = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple):
            if not value:
                raise ConfigError(f"{name} must not be empty")
            repeated = [v for i, v in enumerate(value) if v in value[:i]]
            if f.name in _DISTINCT and repeated:
                given = " ".join(map(str, value))
                raise ConfigError(f"{name} repeats {repeated[0]!r}: give each value once; got {given}")
        numbers = [v for v in values if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)]
        if any(not math.isfinite(v) for v in numbers):
            raise ConfigError(f"{name} must be finite; got {' '.join(map(str, values))}")
        rule = _range(f.name, hints.get(f.name, Any))
        bad = [v for v in numbers if rule is not None and not _IN_RANGE[rule](v)]
        if bad:
            what = "in [0, 2^31)" if rule == "seed" else rule
            each = "each value of " if isinstance(value, tuple) else ""
            raise ConfigError(f"{each}{name} must be {what}; got {bad[0]!r}")


def _check_relations(config) -> None:
    """The field pairs of ``_DIVIDES`` and ``_AT_MOST``, and, for a config without a ``dataset`` (its
    data generated from ``n_train``), the batch sizes against ``n_train``."""
    get = lambda n: getattr(config, n, None)
    for a, b in _DIVIDES + _AT_MOST:
        if isinstance(get(a), int) and isinstance(get(b), int):
            if get(a) > get(b):
                raise ConfigError(f"{flag(a)} {get(a)} must be at most {flag(b)} {get(b)}")
            if (a, b) in _DIVIDES and get(b) % get(a):
                lower, upper = get(b) - get(b) % get(a), get(b) - get(b) % get(a) + get(a)
                raise ConfigError(
                    f"{flag(a)} {get(a)} must divide {flag(b)} {get(b)} (the last evaluation is at the end); "
                    f"e.g. {flag(b)} {lower} or {upper}"
                )
    if not hasattr(config, "dataset") and isinstance(get("n_train"), int):
        _check_batches(config, get("n_train"), f"{flag('n_train')} {get('n_train')}")


def _check_batches(config, n: int, what: str) -> None:
    for b in _BATCHES:
        size = getattr(config, b, None)
        if isinstance(size, int) and size > n:
            raise ConfigError(f"{flag(b)} {size} exceeds {what}")


def _check_cells(config, cells: list[Cell]) -> None:
    if not cells:
        raise ConfigError("the config gives no cells to run (an empty grid)")
    keys = [cell_key(c) for c in cells]
    repeated = [k for i, k in enumerate(keys) if k in keys[:i]]
    if repeated:
        fields = [
            flag(f.name)
            for f in dataclasses.fields(config)
            if isinstance(v := getattr(config, f.name), tuple) and len(set(v)) < len(v)
        ]
        raise ConfigError(
            f"the grid repeats the cell {repeated[0]}" + (f": {', '.join(fields)} repeat a value" if fields else "")
        )


def _check_data(config, data: DataOptions) -> None:
    """For a config with a ``dataset`` field (a classification set of ``lsgeo.data``): the name, the
    files (fetched first with ``--download``), and ``n_train`` / ``n_val`` / ``n_test`` and the batch sizes
    against the set's size. Loads the set once (unstandardised)."""
    if not hasattr(config, "dataset"):
        return
    from lsgeo.data import load_dataset

    name = config.dataset
    try:
        ds = load_dataset(name, data_dir=data.data_dir, download=data.download, standardize=False)
    except (OSError, ValueError, TypeError) as e:  # FileNotFoundError: names the file, the folders, the URL
        raise ConfigError(f"{flag('dataset')} {name}: {e}") from e
    if ds.num_classes is None:
        raise ConfigError(f"{flag('dataset')} {name} is a regression set; this experiment needs a classification set")
    n_val = getattr(config, "n_val", 0) or 0
    n_train, n_test = getattr(config, "n_train", None), getattr(config, "n_test", None)
    available = len(ds.x_train)
    if n_train is not None and n_train + n_val > available:
        given = f"{flag('n_train')} {n_train}" + (f" + {flag('n_val')} {n_val}" if n_val else "")
        raise ConfigError(f"{given} exceeds the {available} training points of {name}")
    if n_train is None and n_val >= available:
        raise ConfigError(f"{flag('n_val')} {n_val} leaves none of the {available} training points of {name}")
    if n_test is not None and n_test > len(ds.x_test):
        raise ConfigError(f"{flag('n_test')} {n_test} exceeds the {len(ds.x_test)} test points of {name}")
    n = n_train if n_train is not None else available - n_val
    held_out = f"{available} minus {flag('n_val')} {n_val}" if n_val else f"all {available}"
    _check_batches(config, n, f"the {n} training points of {name} ({flag('n_train')} {n_train or held_out})")


def check_config(exp: Experiment, config, data: DataOptions = DataOptions()) -> list[Cell]:
    """Every check of ``config`` that can run before the run: the field conventions (``_RANGES``:
    types, choices (``Literal``), non-empty tuples, distinct grid values, finite numbers, ranges), the
    relations between fields (``--eval-every`` divides ``--steps``, batch sizes at most the data), the
    experiment's own ``validate(cfg)``, its ``cells(cfg)`` (a ValueError there is a config error too),
    and the data set it needs (name, files, sizes). Raises ``ConfigError`` naming the flag; returns the
    cells."""
    if not dataclasses.is_dataclass(config) or not isinstance(config, exp.config):
        raise ConfigError(f"the config of {exp.name} must be a {exp.config.__name__}; got {config!r}")
    _check_fields(config)
    _check_relations(config)
    try:
        if exp.validate is not None:
            exp.validate(config)
        cells = exp.cells(config)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    _check_cells(config, cells)
    _check_data(config, data)
    return cells


def _config_from_dict(cls: type, saved: dict):
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    return cls(**{f.name: tuples(saved[f.name]) for f in dataclasses.fields(cls) if f.name in saved})


def _saved_config(exp: Experiment, run_dir: Path):
    """The config saved in ``run_dir`` (a run folder of ``exp``), or a ConfigError naming ``--resume``:
    no such folder, no config.json, or the run of another experiment (or of another version of the
    config: fields added or removed), so that a resume never overwrites another experiment's files."""
    run_dir, where = Path(run_dir), f"--resume {run_dir}"
    if not run_dir.is_dir():
        raise ConfigError(f"{where}: no such folder")
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: not a run folder (no config.json)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read its config.json ({e})") from e
    try:
        other = json.loads((run_dir / "summary.json").read_text()).get("experiment")
    except (OSError, ValueError, AttributeError):
        other = None
    names = [f.name for f in dataclasses.fields(exp.config)]
    if not isinstance(saved, dict):
        raise ConfigError(f"{where}: its config.json is not a config (a JSON object of fields)")
    extra, missing = [k for k in saved if k not in names], [k for k in names if k not in saved]
    if other is None and (extra or missing) and run_dir.parent.name != exp.name:
        other = run_dir.parent.name  # results/NAME/<timestamp>: a hint where summary.json is not written yet
    parts = ((f"it has fields {exp.name} lacks:", extra), (f"it lacks fields of {exp.name}:", missing))
    detail = "; ".join(f"{what} {', '.join(flag(k) for k in keys)}" for what, keys in parts if keys)
    if other not in (None, exp.name):
        raise ConfigError(
            f"{where} is not a run of {exp.name} but of {other}"
            + (f" ({detail})" if detail else "")
            + f"; nothing was written (to resume it: python -m experiments.{other} --resume {run_dir})"
        )
    if detail:
        raise ConfigError(
            f"{where} was written by another version of {exp.name}'s config ({detail}); nothing was written: "
            "start a new run"
        )
    return _config_from_dict(exp.config, saved)


def _resumed_config(exp: Experiment, run_dir: Path, given):
    """The saved config of ``run_dir``; ``given`` may differ from it in ``seeds`` only."""
    saved = _saved_config(exp, run_dir)
    if given is None:
        return saved
    changed = [f.name for f in dataclasses.fields(exp.config) if getattr(given, f.name) != getattr(saved, f.name)]
    if set(changed) - {"seeds"}:
        diff = ", ".join(f"{flag(n)} {getattr(given, n)!r} (saved: {getattr(saved, n)!r})" for n in changed)
        raise ConfigError(f"--resume {run_dir} keeps the config saved there; only --seeds may change, got {diff}")
    return given


def _done_cells(exp: Experiment, run_dir: Path, cells: list[Cell]) -> dict[str, dict]:
    """The finished cells stored in ``run_dir``; a ConfigError when they are not cells of this grid's kind."""
    done = {p.stem: json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")}
    kinds = {tuple(c) for c in cells}
    foreign = [k for k, record in done.items() if tuple(record.get("cell", {})) not in kinds]
    if foreign:
        raise ConfigError(
            f"--resume {run_dir}: its cells/ holds cells of another experiment ({foreign[0]}), not of {exp.name}"
        )
    return done


def _resume_command(exp: Experiment, run_dir: Path, data: DataOptions) -> str:
    words = ["python", "-m", f"experiments.{exp.name}", "--resume", str(run_dir)]
    words += ["--data-dir", str(data.data_dir)] if data.data_dir is not None else []
    words += ["--download"] if data.download else []
    return " ".join(shlex.quote(w) for w in words)


def _writes() -> bool:
    """Whether this process writes results and prints: always with one process; under ``jax.distributed``
    (``python -m lsgeo.launch``, a cluster) only process 0, while every process computes every cell."""
    import jax

    return jax.process_index() == 0


def _agreed(text: str, size: int = 4096) -> str:
    """``text`` as process 0 has it, on every process (one broadcast of ``size`` bytes; unchanged with one
    process). ``text`` holds no NUL byte (a path)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return text
    raw = text.encode()
    if len(raw) > size:
        raise ValueError(f"a run folder path longer than {size} bytes cannot be shared between processes: {text!r}")
    buf = np.zeros(size, np.uint8)
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(shared).split(b"\0", 1)[0].decode()


def _new_run_dir(out: Path, name: str) -> Path:
    """A fresh ``out/name/<timestamp>`` folder, created by the writing process; every process gets its path."""
    if not _writes():
        return Path(_agreed(""))
    return Path(_agreed(str(_make_run_dir(out, name))))


def _make_run_dir(out: Path, name: str) -> Path:
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
    The whole config and the data it needs are checked first (``check_config``): an invalid one raises
    ``ConfigError`` before any folder is created or written to. Ctrl-C (KeyboardInterrupt) during the
    run raises ``Interrupted``, whose message says which cells were kept and the ``--resume`` command."""
    start = time.perf_counter()
    writes = _writes()  # under several processes, only process 0 writes and prints
    verbose, progress = verbose and writes, progress and writes
    write = write_atomic if writes else lambda path, content: None
    if resume is not None:
        config = _resumed_config(exp, Path(resume), config)
    elif config is None:
        config = exp.config()
    cells = check_config(exp, config, data)
    done = _done_cells(exp, Path(resume), cells) if resume is not None else {}
    run_dir = Path(resume) if resume is not None else _new_run_dir(Path(out), exp.name)
    tokens = (_DATA.set(data), _PROGRESS.set(progress))
    try:
        write(run_dir / "config.json", _dump(dataclasses.asdict(config)))
        pending = [c for c in cells if cell_key(c) not in done]
        reused_s = sum(done[cell_key(c)]["elapsed_s"] for c in cells if cell_key(c) in done)
        if verbose:
            print(f"{exp.name}: {len(cells)} cells, {len(cells) - len(pending)} already done -> {run_dir}")
        if pending:
            prepared = exp.prepare(config)
            with tqdm(
                total=len(cells),
                initial=len(cells) - len(pending),
                desc=exp.name,
                unit="cell",
                disable=not progress,
                file=sys.stderr,
            ) as bar:
                for group in _groups(exp, pending):
                    bar.set_postfix_str(cell_key({k: v for k, v in group[0].items() if k not in exp.batch_over}))
                    t0 = time.perf_counter()
                    results = exp.run(config, prepared, group)
                    elapsed = (time.perf_counter() - t0) / len(group)
                    if len(results) != len(group):
                        raise RuntimeError(f"{exp.name}.run returned {len(results)} results for {len(group)} cells")
                    for cell, rows in zip(group, results):
                        record = {"cell": cell, "rows": rows, "elapsed_s": elapsed}
                        write(run_dir / "cells" / f"{cell_key(cell)}.json", _dump(record))
                        done[cell_key(cell)] = _plain(record)
                    bar.update(len(group))

        rows = [{**c, **r} for c in cells for r in done[cell_key(c)]["rows"]]
        write(run_dir / "metrics.csv", _csv(rows))
        verdict = exp.summarize(config, rows)
        for name, fig in (exp.plot(config, rows) if exp.plot is not None and writes else {}).items():
            fig.tight_layout()
            save_figure(fig, run_dir / name)
    except KeyboardInterrupt:
        kept = sum(cell_key(c) in done for c in cells)
        message = (
            f"interrupted: {kept} of {len(cells)} cells kept in {run_dir}"
            + ("" if kept < len(cells) else " (the summary is not written yet)")
            + f"; resume with: {_resume_command(exp, run_dir, data)}"
        )
        raise Interrupted(message, run_dir, kept, len(cells)) from None
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
    write(run_dir / "summary.json", _dump(summary))
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
    so callers inside a larger program (tests) may leave it off.

    An invalid option or config value (``ConfigError``, found before a run folder is created) exits
    with one line naming the flag (``SystemExit`` with that message: status 1); Ctrl-C exits with
    status 130 after one line saying which cells were kept and the ``--resume`` command."""
    try:
        return _main(exp, argv, compilation_cache)
    except ConfigError as e:
        raise SystemExit(f"python -m experiments.{exp.name}: error: {e}") from None
    except Interrupted as e:
        print(e, file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        print("interrupted before the run started: nothing was written", file=sys.stderr)
        raise SystemExit(130) from None


def _main(exp: Experiment, argv: Sequence[str] | None, compilation_cache: bool) -> tuple[Path, dict]:
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
    launch.initialize()  # under python -m lsgeo.launch or LSGEO_DISTRIBUTED=1: several processes, one run
    return run_experiment(
        exp, args.config, out=args.out, resume=args.resume, data=DataOptions(args.data_dir, args.download)
    )
