"""The shared experiment runner: results folder, summary keys, resume, atomic files, CLI."""

import csv
import dataclasses
import json

import pytest

from experiments import _runner

SUMMARY_KEYS = {"experiment", "config", "claim", "supported", "figures", "runtime_s", "devices"}


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """A toy grid."""

    sigmas: tuple[float, ...] = (0.0, 0.5)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 3


def _toy(calls: list, fail_on=None) -> _runner.Experiment:
    def run(cfg, data, cells):
        calls.append([dict(c) for c in cells])
        for c in cells:
            if fail_on is not None and (c["sigma"], c["seed"]) == fail_on:
                raise KeyboardInterrupt("simulated interruption")
        return [[dict(step=t, loss=c["sigma"] * t + c["seed"] + data) for t in range(cfg.steps)] for c in cells]

    def summarize(cfg, rows):
        final = [r["loss"] for r in rows if r["step"] == cfg.steps - 1]
        return _runner.Verdict(supported=len(final) > 1 or None, figures={"mean_final": sum(final) / len(final)},
                               table=[{"n": len(final)}])

    def plot(cfg, rows, out_dir):
        fig, ax = _runner.plt.subplots()
        ax.plot([r["loss"] for r in rows])
        _runner.save_figure(fig, out_dir / "loss.png")

    return _runner.Experiment(
        name="toy", claim="A toy claim.", config=ToyConfig, presets={"paper": ToyConfig(steps=7)},
        cells=lambda cfg: [dict(method="gd", sigma=s, seed=k) for s in cfg.sigmas for k in cfg.seeds],
        run=run, summarize=summarize, plot=plot, prepare=lambda cfg: 10.0, batch_over=("seed",),
    )


def test_run_writes_results(tmp_path):
    calls = []
    run_dir, summary = _runner.run_experiment(_toy(calls), ToyConfig(), out=tmp_path, progress=False)
    assert run_dir.parent == tmp_path / "toy"
    for name in ("config.json", "metrics.csv", "summary.json", "loss.png"):
        assert (run_dir / name).is_file()
    assert not list(run_dir.rglob("*.tmp"))
    saved = json.loads((run_dir / "summary.json").read_text())
    assert set(saved) == SUMMARY_KEYS and saved == json.loads(json.dumps(summary))
    assert saved["supported"] is True and saved["config"]["sigmas"] == [0.0, 0.5]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert len(rows) == 4 * 3 and set(rows[0]) == {"method", "sigma", "seed", "step", "loss"}
    # batch_over=("seed",): one call per sigma, with both seeds
    assert [[c["seed"] for c in group] for group in calls] == [[0, 1], [0, 1]]


def test_resume_after_interruption_skips_finished_cells(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        _runner.run_experiment(_toy(calls, fail_on=(0.5, 1)), ToyConfig(), out=tmp_path, progress=False)
    (run_dir,) = (tmp_path / "toy").iterdir()
    assert len(list((run_dir / "cells").glob("*.json"))) == 2 and not (run_dir / "summary.json").exists()

    calls.clear()
    _, resumed = _runner.run_experiment(_toy(calls), resume=run_dir, progress=False)
    assert calls == [[dict(method="gd", sigma=0.5, seed=0), dict(method="gd", sigma=0.5, seed=1)]]
    _, fresh = _runner.run_experiment(_toy([]), ToyConfig(), out=tmp_path / "fresh", progress=False)
    assert resumed["figures"] == fresh["figures"]


def test_resume_with_more_seeds_computes_only_new_cells(tmp_path):
    run_dir, _ = _runner.run_experiment(_toy([]), ToyConfig(seeds=(0,)), out=tmp_path, progress=False)
    calls = []
    _runner.run_experiment(_toy(calls), ToyConfig(seeds=(0, 1)), resume=run_dir, progress=False)
    assert [c["seed"] for group in calls for c in group] == [1, 1]
    with pytest.raises(ValueError, match="only seeds"):
        _runner.run_experiment(_toy([]), ToyConfig(steps=5), resume=run_dir, progress=False)


def test_cli_preset_and_overrides(tmp_path, capsys):
    run_dir, summary = _runner.main(_toy([]), ["--preset", "paper", "--seeds", "3", "--out", str(tmp_path)])
    assert summary["config"]["steps"] == 7 and summary["config"]["seeds"] == (3,)
    assert "A toy claim." in capsys.readouterr().out
    _, again = _runner.main(_toy([]), ["--resume", str(run_dir), "--seeds", "3", "4"])
    assert again["config"]["steps"] == 7 and again["config"]["seeds"] == (3, 4)
    with pytest.raises(ValueError, match="only seeds"):
        _runner.main(_toy([]), ["--resume", str(run_dir), "--steps", "2"])
    with pytest.raises(SystemExit):
        _runner.main(_toy([]), ["--preset", "nope"])
