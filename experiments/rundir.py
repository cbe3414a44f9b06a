"""Run folders and resume: ``results/NAME/<timestamp>/`` with ``config.json``, ``version.json`` (the code
that ran), ``cells/<key>.json`` (one per finished cell), ``metrics.csv`` and ``summary.json``.

Every file is written atomically (``lsgeo.data.write_atomic``), so an interrupted run never leaves a
half-written file, and ``--resume DIR`` recomputes only the missing cells. A resume keeps the config saved
in DIR (only ``--seeds`` may change), refuses a folder that another experiment (or another version of its
config) wrote, and refuses a folder written by another version of the code (``code_version``: the
package version and the git commit where there is one) unless ``allow_version_change``, since
cells of two versions would be judged as one run. ``summary.json`` is strict JSON (a NaN or infinite
figure is written as null).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import io
import json
import shlex
import subprocess
from pathlib import Path

import numpy as np

from experiments.context import DataOptions
from experiments.experiment import Cell, ConfigError, Experiment, Row, flag


def plain(value):
    """JSON-able Python scalars from numpy / JAX scalars."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if hasattr(value, "item") and np.ndim(value) == 0:
        return value.item()
    return value


def finite_or_none(value):
    """``value`` as a plain scalar, with NaN and infinities as None (strict JSON: null)."""
    value = plain(value)
    return None if isinstance(value, float) and not np.isfinite(value) else value


def dump(obj) -> str:
    return json.dumps(plain(obj), indent=2) + "\n"


def csv_text(rows: list[Row]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _config_from_dict(cls: type, saved: dict):
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    return cls(**{f.name: tuples(saved[f.name]) for f in dataclasses.fields(cls) if f.name in saved})


def saved_config(exp: Experiment, run_dir: Path):
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


def resumed_config(exp: Experiment, run_dir: Path, given):
    """The saved config of ``run_dir``; ``given`` may differ from it in ``seeds`` only."""
    saved = saved_config(exp, run_dir)
    if given is None:
        return saved
    changed = [f.name for f in dataclasses.fields(exp.config) if getattr(given, f.name) != getattr(saved, f.name)]
    if set(changed) - {"seeds"}:
        diff = ", ".join(f"{flag(n)} {getattr(given, n)!r} (saved: {getattr(saved, n)!r})" for n in changed)
        raise ConfigError(f"--resume {run_dir} keeps the config saved there; only --seeds may change, got {diff}")
    return given


def done_cells(exp: Experiment, run_dir: Path, cells: list[Cell]) -> dict[str, dict]:
    """The finished cells stored in ``run_dir``; a ConfigError when they are not cells of this grid's kind,
    or when a cell file cannot be read (it names the file: delete it to recompute that cell)."""
    done = {}
    for path in sorted((run_dir / "cells").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
                raise ValueError("not a cell record (a JSON object with 'cell', 'rows' and 'elapsed_s')")
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"--resume {run_dir}: the cell file {path} is damaged ({e}); delete it to recompute that cell"
            ) from e
        done[path.stem] = record
    kinds = {tuple(c) for c in cells}
    foreign = [k for k, record in done.items() if tuple(record.get("cell", {})) not in kinds]
    if foreign:
        raise ConfigError(
            f"--resume {run_dir}: its cells/ holds cells of another experiment ({foreign[0]}), not of {exp.name}"
        )
    return done


@functools.cache
def code_version() -> dict:
    """The code that runs: ``{"lsgeo": package version, "commit": git commit or None, "modified": whether the
    work tree differs from that commit (None without git)}``. Recorded in every run folder (``version.json``)
    and ``summary.json``; a resume across versions is refused unless asked (``check_version``)."""
    import lsgeo

    root = Path(__file__).resolve().parent.parent
    commit, modified = None, None
    try:
        run = lambda *args: subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "HEAD") or None
        modified = bool(run("status", "--porcelain", "--untracked-files=no", "--", "lsgeo", "experiments"))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"lsgeo": lsgeo.__version__, "commit": commit, "modified": modified}


def check_version(run_dir: Path, *, allow_change: bool = False) -> None:
    """A ConfigError unless ``run_dir`` was written by this code version (``code_version``: package version
    and commit), or ``allow_change``: cells of two versions would otherwise be judged as one run."""
    path, now = run_dir / "version.json", code_version()
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        saved = None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume {run_dir}: cannot read {path} ({e})") from e
    same = isinstance(saved, dict) and all(saved.get(k) == now[k] for k in ("lsgeo", "commit"))
    if not same and not allow_change:
        was = "an unrecorded version" if saved is None else f"lsgeo {saved.get('lsgeo')} at {saved.get('commit')}"
        raise ConfigError(
            f"--resume {run_dir} was written by {was}, this is lsgeo {now['lsgeo']} at {now['commit']}: "
            "its cells and new ones would be judged as one run; start a new run, or pass "
            "--allow-version-change to mix them"
        )


def check_out(out: Path) -> None:
    """A ConfigError naming ``--out`` when run folders cannot be made under ``out``: it, or a folder above it,
    is a file."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == out else f"lies under the file {path}"
                raise ConfigError(f"--out {out} {what}, not a folder: results go to OUT/NAME/<timestamp>/")
            return


def resume_command(exp: Experiment, run_dir: Path, data: DataOptions) -> str:
    words = ["python", "-m", f"experiments.{exp.name}", "--resume", str(run_dir)]
    words += ["--data-dir", str(data.data_dir)] if data.data_dir is not None else []
    words += ["--download"] if data.download else []
    return " ".join(shlex.quote(w) for w in words)


def writes() -> bool:
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


def new_run_dir(out: Path, name: str) -> Path:
    """A fresh ``out/name/<timestamp>`` folder, created by the writing process; every process gets its path."""
    if not writes():
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
        except OSError as e:  # a file in the way, no permission: the user's --out
            raise ConfigError(f"--out {out}: cannot create the run folder {run_dir} ({e})") from e
    raise RuntimeError(f"could not create a fresh run folder under {out / name}")
