"""The shared experiment runner: results folder, summary keys, resume, atomic files, CLI (presets, options that
fail early, data options, file modes). The verdict rule: test_experiments_stats.py; run folders:
test_experiment_rundir.py; training cells: test_experiment_training.py."""

import csv
import dataclasses
import json
import os
import stat
from typing import Literal

import pytest

from experiments import cli, config_checks, context, experiment, nets, plots, runner

SUMMARY_KEYS = {
    "experiment", "config", "claim", "supported", "reason", "controls", "power", "figures", "runtime_s", "devices",
    "code_version",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """A toy grid."""

    sigmas: tuple[float, ...] = (0.0, 0.5)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 3


def _toy(calls: list, fail_on=None, seen_options=None) -> experiment.Experiment:
    def cells(cfg):
        if cfg.steps <= 0:
            raise ValueError(f"steps must be positive, got {cfg.steps}")
        return [dict(method="gd", sigma=s, seed=k) for s in cfg.sigmas for k in cfg.seeds]

    def prepare(cfg):
        if seen_options is not None:
            seen_options.append(context.data_options())
        return 10.0

    def run(cfg, data, cells):
        calls.append([dict(c) for c in cells])
        for c in cells:
            if fail_on is not None and (c["sigma"], c["seed"]) == fail_on:
                raise KeyboardInterrupt("simulated interruption")
        return [[dict(step=t, loss=c["sigma"] * t + c["seed"] + data) for t in range(cfg.steps)] for c in cells]

    def summarize(cfg, rows):
        final = [r["loss"] for r in rows if r["step"] == cfg.steps - 1]
        return experiment.Verdict(
            supported=len(final) > 1 or None,
            figures={"mean_final": sum(final) / len(final), "undefined": float("nan")},
            table=[{"n": len(final)}],
            reason="toy reason",
        )

    def plot(cfg, rows):
        fig, ax = plots.plt.subplots()
        ax.plot([r["loss"] for r in rows])
        return {"loss.png": fig}

    return experiment.Experiment(
        name="toy",
        claim="A toy claim.",
        config=ToyConfig,
        presets={"paper": ToyConfig(steps=7)},
        cells=cells,
        run=run,
        summarize=summarize,
        plot=plot,
        prepare=prepare,
        batch_over=("seed",),
    )


def test_run_writes_results_readable_by_others(tmp_path):
    calls = []
    run_dir, summary = runner.run_experiment(_toy(calls), ToyConfig(), out=tmp_path, progress=False)
    assert run_dir.parent == tmp_path / "toy"
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("config.json", "metrics.csv", "summary.json", "loss.png"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o666 & ~umask  # as open(path, "w"), not 0600
    assert not list(run_dir.rglob("*.tmp"))
    saved = json.loads((run_dir / "summary.json").read_text())
    assert set(saved) == SUMMARY_KEYS and saved == json.loads(json.dumps(summary))
    assert saved["figures"]["undefined"] is None  # strict JSON: NaN is written as null
    assert saved["supported"] is True and saved["reason"] == "toy reason" and saved["config"]["sigmas"] == [0.0, 0.5]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert len(rows) == 4 * 3 and set(rows[0]) == {"method", "sigma", "seed", "step", "loss"}
    # batch_over=("seed",): one call per sigma, with both seeds
    assert [[c["seed"] for c in group] for group in calls] == [[0, 1], [0, 1]]


def test_resume_after_interruption_skips_finished_cells(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(_toy(calls, fail_on=(0.5, 1)), ToyConfig(), out=tmp_path, progress=False)
    (run_dir,) = (tmp_path / "toy").iterdir()
    assert len(list((run_dir / "cells").glob("*.json"))) == 2 and not (run_dir / "summary.json").exists()

    calls.clear()
    _, resumed = runner.run_experiment(_toy(calls), resume=run_dir, progress=False)
    assert calls == [[dict(method="gd", sigma=0.5, seed=0), dict(method="gd", sigma=0.5, seed=1)]]
    _, fresh = runner.run_experiment(_toy([]), ToyConfig(), out=tmp_path / "fresh", progress=False)
    assert resumed["figures"] == fresh["figures"]


def test_resume_with_more_seeds_computes_only_new_cells(tmp_path):
    run_dir, _ = runner.run_experiment(_toy([]), ToyConfig(seeds=(0,)), out=tmp_path, progress=False)
    calls = []
    runner.run_experiment(_toy(calls), ToyConfig(seeds=(0, 1)), resume=run_dir, progress=False)
    assert [c["seed"] for group in calls for c in group] == [1, 1]
    with pytest.raises(experiment.ConfigError, match="only --seeds may change, got --steps 5"):
        runner.run_experiment(_toy([]), ToyConfig(steps=5), resume=run_dir, progress=False)


def test_cli_presets_overrides_and_data_options(tmp_path, capsys):
    seen = []
    argv = [
        "--preset",
        "paper",
        "--seeds",
        "3",
        "--out",
        str(tmp_path),
        "--data-dir",
        str(tmp_path / "d"),
        "--download",
    ]
    run_dir, summary = cli.main(_toy([], seen_options=seen), argv, compilation_cache=False)
    assert summary["config"]["steps"] == 7 and summary["config"]["seeds"] == (3,)
    assert seen == [context.DataOptions(tmp_path / "d", True)] and context.data_options() == context.DataOptions()
    assert "A toy claim." in capsys.readouterr().out
    _, again = cli.main(_toy([]), ["--resume", str(run_dir), "--seeds", "3", "4"], compilation_cache=False)
    assert again["config"]["steps"] == 7 and again["config"]["seeds"] == (3, 4)
    with pytest.raises(SystemExit, match="--resume .* only --seeds may change, got --steps 2"):
        cli.main(_toy([]), ["--resume", str(run_dir), "--steps", "2"], compilation_cache=False)


def test_cli_help_lists_presets_and_bad_options_fail_before_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(_toy([]), ["--help"], compilation_cache=False)
    out = capsys.readouterr().out
    assert "paper: steps=7" in out and "--data-dir" in out and "--download" in out and "default" in out
    for argv in (["--preset", "nope"], ["--steps", "many"], ["--no-such-flag", "1"]):
        with pytest.raises(SystemExit):
            cli.main(_toy([]), [*argv, "--out", str(tmp_path)], compilation_cache=False)
    with pytest.raises(SystemExit, match="--steps must be >= 1; got 0"):  # the runner's own check, before the folder
        cli.main(_toy([]), ["--steps", "0", "--out", str(tmp_path)], compilation_cache=False)
    assert not (tmp_path / "toy").exists()


def test_load_dataset_passes_the_data_options(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(nets.data_lib, "load_dataset", lambda name, **kw: seen.update(name=name, **kw))
    with context.running(context.DataOptions(tmp_path, True)):
        nets.load_dataset("cifar10", n_train=5)
    assert seen == dict(name="cifar10", data_dir=tmp_path, download=True, n_train=5)


# --- config checks before the run folder (issue 20), Ctrl-C, --resume of a foreign folder --------------


@dataclasses.dataclass(frozen=True)
class RichConfig:
    """One field of each convention of ``config_checks._RANGES`` and the relations."""

    methods: tuple[Literal["gd", "noise"], ...] = ("gd",)
    sigmas: tuple[float, ...] = (0.0, 0.1)
    seeds: tuple[int, ...] = (0, 1)
    widths: tuple[int, ...] = (4, 4)
    n_train: int | None = 8
    steps: int = 10
    eval_every: int = 5
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 4
    label_noise: float = 0.0
    escape_fraction: float = 0.5
    activation: Literal["relu", "tanh"] = "relu"


def _rich(validate=None) -> experiment.Experiment:
    return experiment.Experiment(
        name="rich",
        claim="A claim.",
        config=RichConfig,
        cells=lambda cfg: [dict(method=m, sigma=s, seed=k) for m in cfg.methods for s in cfg.sigmas for k in cfg.seeds],
        run=lambda cfg, data, cells: [[dict(step=0, loss=0.0)] for _ in cells],
        summarize=lambda cfg, rows: experiment.Verdict(None, {}, []),
        validate=validate,
    )


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(steps=True), "--steps must be an int; got True"),
        (dict(steps=2.5), "--steps must be an int"),
        (dict(lr="0.1"), "--lr must be a float"),
        (dict(widths=[4, 4]), "--widths must be a tuple"),
        (dict(methods=("gd", "sgd")), "--methods must be one of gd, noise; got 'sgd'"),
        (dict(activation="elu"), "--activation must be one of relu, tanh"),
        (dict(methods=()), "--methods must not be empty"),
        (dict(seeds=(0, 1, 0)), "--seeds repeats 0"),
        (dict(seeds=(2**31,)), "--seeds must be in [0, 2^31)"),
        (dict(sigmas=(0.1, float("nan"))), "--sigmas must be finite"),
        (dict(sigmas=(-0.1,)), "--sigmas must be >= 0"),
        (dict(widths=(4, 0)), "--widths must be >= 1; got 0"),
        (dict(n_train=0), "--n-train must be >= 1"),
        (dict(steps=0), "--steps must be >= 1"),
        (dict(eval_every=-5), "--eval-every must be >= 1"),
        (dict(steps=12), "--eval-every 5 must divide --steps 12"),
        (dict(eval_every=20), "--eval-every 20 must be at most --steps 10"),
        (dict(lr=0.0), "--lr must be > 0"),
        (dict(lr=float("inf")), "--lr must be finite"),
        (dict(momentum=1.0), "--momentum must be in [0, 1)"),
        (dict(label_noise=-1.0), "--label-noise must be >= 0"),
        (dict(escape_fraction=1.5), "--escape-fraction must be in [0, 1]"),
        (dict(batch_size=9), "--batch-size 9 exceeds --n-train 8"),
    ],
)
def test_check_config_names_the_flag(override, message, tmp_path):
    exp = _rich()
    with pytest.raises(experiment.ConfigError) as info:
        runner.run_experiment(exp, RichConfig(**override), out=tmp_path, progress=False, verbose=False)
    assert message in str(info.value)
    assert not list(tmp_path.iterdir())


def test_check_config_accepts_the_defaults_and_none_and_runs_the_hook(tmp_path):
    assert len(config_checks.check_config(_rich(), RichConfig(n_train=None))) == 4

    def validate(cfg):
        if cfg.escape_fraction == 0:
            raise ValueError("--escape-fraction must be in (0, 1)")

    with pytest.raises(experiment.ConfigError, match=r"--escape-fraction must be in \(0, 1\)"):
        runner.run_experiment(_rich(validate), RichConfig(escape_fraction=0.0), out=tmp_path, progress=False)
    with pytest.raises(SystemExit, match=r"^python -m experiments.rich: error: --escape-fraction must be in \(0, 1\)$"):
        cli.main(_rich(validate), ["--escape-fraction", "0", "--out", str(tmp_path)], compilation_cache=False)
    assert not list(tmp_path.iterdir())
    # a grid whose cells repeat (a tuple read by cells() without the runner knowing it is a grid axis)
    exp = dataclasses.replace(_rich(), cells=lambda cfg: [dict(width=w) for w in cfg.widths])
    with pytest.raises(experiment.ConfigError, match="repeats the cell width=4: --widths repeat a value"):
        config_checks.check_config(exp, RichConfig())


def test_ctrl_c_prints_one_line_with_the_kept_cells_and_the_resume_command(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--data-dir", str(tmp_path / "d")]
    with pytest.raises(SystemExit) as info:
        cli.main(_toy([], fail_on=(0.5, 1)), argv, compilation_cache=False)
    assert info.value.code == 130
    (run_dir,) = (tmp_path / "toy").iterdir()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("interrupted") == 1
    command = f"python -m experiments.toy --resume {run_dir} --data-dir {tmp_path / 'd'}"
    assert err.splitlines()[-1] == f"interrupted: 2 of 4 cells kept in {run_dir}; resume with: {command}"
    calls = []
    _, summary = cli.main(_toy(calls), command.split()[3:], compilation_cache=False)
    assert [c["sigma"] for group in calls for c in group] == [0.5, 0.5] and summary["supported"] is True


def test_resume_refuses_a_folder_of_another_experiment_or_config(tmp_path):
    run_dir, _ = runner.run_experiment(_toy([]), ToyConfig(), out=tmp_path, progress=False, verbose=False)
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"--resume .* is not a run of rich but of toy \(it lacks fields of rich: "):
        cli.main(_rich(), ["--resume", str(run_dir)], compilation_cache=False)
    # the same Config, another grid: an interrupted run (no summary.json) is recognised by its cells
    (run_dir / "summary.json").unlink()
    del files[run_dir / "summary.json"]
    other = dataclasses.replace(_toy([]), name="toy2", cells=lambda cfg: [dict(part="x", seed=k) for k in cfg.seeds])
    with pytest.raises(SystemExit, match="--resume .*: its cells/ holds cells of another experiment"):
        cli.main(other, ["--resume", str(run_dir)], compilation_cache=False)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files
    with pytest.raises(SystemExit, match="--resume .* no such folder"):
        cli.main(_toy([]), ["--resume", str(tmp_path / "nope")], compilation_cache=False)
    # the same experiment, another version of its config (a field since removed): refused, not defaulted
    (run_dir / "config.json").write_text(json.dumps({**json.loads(files[run_dir / "config.json"]), "width": 3}))
    with pytest.raises(SystemExit, match="another version of toy's config \\(it has fields toy lacks: --width\\)"):
        cli.main(_toy([]), ["--resume", str(run_dir)], compilation_cache=False)
