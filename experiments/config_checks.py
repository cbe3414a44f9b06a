"""The checks of a config before a run: a bad option or config value fails before a run folder is created,
with one line naming the flag (``check_config``, ``experiment.ConfigError``).

The checks are driven by the ``Config`` fields, so a new experiment gets them by naming its fields as the
others do: the annotation's type (``int``, ``float``, ``str``, ``X | None``, ``tuple[X, ...]``, and
``Literal[...]`` for a choice, e.g. ``tuple[Literal[METHODS], ...]``: also shown by ``--help``); tuples
non-empty, grid axes (``seeds``, ``sigmas``, ``methods``, ...) without repeats; numbers finite; an int >= 1
unless ``_RANGES`` says otherwise by name (``seeds``, ``lr`` / ``*_lr``, ``sigma(s)``, ``momentum``,
``*_fraction``, ``*tol``, ...); ``eval_every`` divides ``steps``; batch sizes (``batch_size``, ``small_batch``,
``large_batch``) at most the training points; and for a ``dataset`` field, the data set itself (name, files,
with ``--download`` fetched first, and ``n_train`` / ``n_val`` / ``n_test`` against its size). Then the
module's ``validate(cfg)`` and ``cells(cfg)`` run; a ValueError there is a config error too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from experiments.context import DataOptions
from experiments.experiment import Cell, ConfigError, Experiment, cell_key, flag


# The conventions of config fields, by name: ``check_config`` applies them to every experiment, before
# anything is written. A range applies to the value of a number field and to every element of a tuple
# field; the first pattern (fnmatch) that matches the field's name wins. An int field that matches none
# must be >= 1 (sizes, steps, widths, counts); a float field must be finite whatever its name.
_RANGES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("seeds", "*_seed"), "seed"),
    (("augment_padding", "noise_off_epoch", "checkpoints"), ">= 0"),
    (("lr", "lrs", "*_lr"), "> 0"),
    (("sigma", "sigmas", "*noise", "weight_decay", "*tol", "away_from_one", "min_line_barrier"), ">= 0"),
    (("momentum",), "in [0, 1)"),
    (("*_fraction", "swa_start"), "in [0, 1]"),
    (("init_scale", "rho", "rho_*", "*radius", "*gammas", "alphas", "signal", "level", "*_loss", "threshold", "near"),
     "> 0"),
    (("peak_window", "moved", "edge_*", "spike_factor"), "> 0"),
    (("judge_last",), "in (0, 1]"),
)


_IN_RANGE: dict[str, Callable[[float], bool]] = {
    ">= 1": lambda v: v >= 1,
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "seed": lambda v: 0 <= v < 2**31,
}


_DISTINCT = ("seeds", "sigmas", "methods", "gammas", "gd_gammas", "alphas", "archs", "comparisons", "checkpoints")  # grid axes


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
