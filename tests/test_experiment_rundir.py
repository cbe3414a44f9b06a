"""Run folders (``experiments.rundir``): the code version recorded and checked on resume, a damaged cell
file named, ``--out`` that cannot hold run folders refused before anything is written."""

import json

import pytest

from experiments import cli, experiment, rundir, runner
from tests.test_runner import ToyConfig, _toy


def test_the_code_version_is_recorded_in_the_folder_and_the_summary(tmp_path):
    run_dir, summary = runner.run_experiment(_toy([]), ToyConfig(), out=tmp_path, progress=False, verbose=False)
    version = json.loads((run_dir / "version.json").read_text())
    import lsgeo

    assert version == summary["code_version"] == rundir.code_version() and version["lsgeo"] == lsgeo.__version__
    assert version["commit"] is None or len(version["commit"]) == 40  # a git checkout: the commit's hash


@pytest.mark.parametrize("saved", [None, {"lsgeo": "0.0.1", "commit": None}, "commit"])
def test_a_resume_across_code_versions_is_refused_unless_asked(tmp_path, saved):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(_toy([], fail_on=(0.5, 1)), ToyConfig(), out=tmp_path, progress=False, verbose=False)
    (run_dir,) = (tmp_path / "toy").iterdir()
    path = run_dir / "version.json"
    if saved is None:  # written before versions were recorded
        path.unlink()
    else:
        other = {**rundir.code_version(), "commit": "0" * 40} if saved == "commit" else saved
        path.write_text(json.dumps(other))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(experiment.ConfigError, match="--allow-version-change"):
        runner.run_experiment(_toy(calls), resume=run_dir, progress=False, verbose=False)
    with pytest.raises(SystemExit, match="written by .*start a new run, or pass --allow-version-change"):
        cli.main(_toy(calls), ["--resume", str(run_dir)], compilation_cache=False)
    assert calls == [] and {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    _, summary = cli.main(_toy(calls), ["--resume", str(run_dir), "--allow-version-change"], compilation_cache=False)
    assert len(calls) == 1 and summary["supported"] is True
    assert json.loads(path.read_text()) == rundir.code_version()  # the folder now says who finished it


def test_a_resume_by_the_same_version_needs_no_flag(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(_toy([], fail_on=(0.5, 1)), ToyConfig(), out=tmp_path, progress=False, verbose=False)
    (run_dir,) = (tmp_path / "toy").iterdir()
    calls = []
    runner.run_experiment(_toy(calls), resume=run_dir, progress=False, verbose=False)
    assert [c["sigma"] for group in calls for c in group] == [0.5, 0.5]


@pytest.mark.parametrize("content", ["{not json", '{"cell": {"method": "gd"}}', "[1, 2]", ""])
def test_a_damaged_cell_file_is_named(tmp_path, content):
    run_dir, _ = runner.run_experiment(_toy([]), ToyConfig(), out=tmp_path, progress=False, verbose=False)
    damaged = sorted((run_dir / "cells").glob("*.json"))[1]
    damaged.write_text(content)
    with pytest.raises(experiment.ConfigError, match=f"the cell file {damaged} is damaged .*delete it"):
        runner.run_experiment(_toy([]), resume=run_dir, progress=False, verbose=False)
    with pytest.raises(SystemExit, match=f"error: --resume {run_dir}: the cell file {damaged} is damaged"):
        cli.main(_toy([]), ["--resume", str(run_dir)], compilation_cache=False)
    damaged.unlink()  # the remedy the message names: that cell is recomputed
    calls = []
    runner.run_experiment(_toy(calls), resume=run_dir, progress=False, verbose=False)
    assert sum(len(group) for group in calls) == 1


def test_out_that_is_a_file_is_one_line_naming_out(tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    for out, what in ((a_file, "is a file"), (a_file / "sub", f"lies under the file {a_file}")):
        with pytest.raises(SystemExit) as info:
            cli.main(_toy([]), ["--out", str(out)], compilation_cache=False)
        assert str(info.value) == (
            f"python -m experiments.toy: error: --out {out} {what}, not a folder: results go to OUT/NAME/<timestamp>/"
        )
        with pytest.raises(experiment.ConfigError, match="--out"):
            runner.run_experiment(_toy([]), ToyConfig(), out=out, progress=False, verbose=False)
    assert a_file.read_text() == "not a folder"
