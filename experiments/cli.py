"""The command line of an experiment module (tyro, generated from its ``Config``).

``python -m experiments.NAME [--preset NAME] [--seeds 0 1 2] [--out DIR] [--resume DIR]
[--allow-version-change] [--data-dir DIR] [--download] [--FIELD VALUE ...]``; ``--help`` lists the fields
and the presets. With ``--resume DIR`` the config is the one saved in ``DIR/config.json``; only
``--seeds`` may change it (adding seeds computes only the new cells), a folder that another experiment
wrote is refused, and so is one written by another version of the code unless ``--allow-version-change``.
``main`` enables JAX's persistent compilation cache, so a second run skips compilation. A bad option or
config value exits with one line naming the flag; Ctrl-C during a run prints one line with the cells kept
and the ``--resume`` command that finishes the run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from experiments.context import DataOptions
from experiments.experiment import ConfigError, Experiment, Interrupted
from experiments.rundir import saved_config
from experiments.runner import run_experiment
from lsgeo import launch
from lsgeo.data import default_cache_dir


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
            "allow_version_change",
            Annotated[
                bool,
                arg(help="with --resume: continue a run written by another code version (its cells are mixed in)"),
            ],
            dataclasses.field(default=False),
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
    default = saved_config(exp, Path(resume)) if resume and resume != "None" else presets[name]
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
        exp,
        args.config,
        out=args.out,
        resume=args.resume,
        data=DataOptions(args.data_dir, args.download),
        allow_version_change=args.allow_version_change,
    )
