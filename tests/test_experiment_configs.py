"""Invalid options of the real experiment CLIs fail before a run folder exists, with one line naming the
flag (``config_checks.check_config``: the field conventions, the module's ``validate`` hook, the data it needs),
and ``--resume`` refuses a folder that another experiment wrote. No training runs here: every case
stops in the checks (each well under a second after the imports)."""

import dataclasses
import importlib
import json

import pytest

from experiments import (
    cli,
    cnn,
    config_checks,
    deep_mlp,
    experiment,
    hessian_spectrum,
    kfac_fidelity,
    lasso,
    nuclear_norm,
    regularized_loss,
    reparametrization,
    saddle_escape,
    sigma_sweep,
    swa,
    wide_networks,
)

EMPTY = "EMPTY_DATA_DIR"  # replaced by an empty folder under tmp_path

BAD = [
    # issue 20, item 7: impossible or invalid values
    (saddle_escape, ["--escape-fraction", "2"], "--escape-fraction"),
    (saddle_escape, ["--escape-fraction", "0"], "--escape-fraction"),
    (saddle_escape, ["--lr", "-0.01"], "--lr"),
    (saddle_escape, ["--batch-size", "100"], "--batch-size"),  # > --n-train 64
    (saddle_escape, ["--hidden", "2"], "--hidden"),
    (hessian_spectrum, ["--n-train", "5000"], "--n-train"),  # digits' training split holds 1300
    (reparametrization, ["--n-train", "5000"], "--n-train"),
    # widths and steps
    (regularized_loss, ["--widths", "0", "50"], "--widths"),
    (regularized_loss, ["--widths", "-5"], "--widths"),
    (lasso, ["--steps", "0"], "--steps"),
    (lasso, ["--steps", "-100"], "--steps"),
    (lasso, ["--steps", "105", "--eval-every", "10"], "--eval-every"),
    (lasso, ["--eval-every", "5000"], "--eval-every"),
    (lasso, ["--num-nonzero", "200"], "--num-nonzero"),
    (nuclear_norm, ["--rank", "50"], "--rank"),
    # numbers
    (deep_mlp, ["--sigma", "nan"], "--sigma"),
    (deep_mlp, ["--sigma", "inf"], "--sigma"),
    (deep_mlp, ["--widths", "32", "64", "128"], "--widths"),  # one lr per width
    (sigma_sweep, ["--sigmas", "0.1", "nan"], "--sigmas"),
    (sigma_sweep, ["--sigmas", "-0.1"], "--sigmas"),
    (sigma_sweep, ["--judge-last", "0"], "--judge-last"),  # the judged window: a fraction in (0, 1]
    (cnn, ["--judge-last", "1.5"], "--judge-last"),
    # grids: empty, repeated, unknown
    (sigma_sweep, ["--methods"], "--methods"),
    (sigma_sweep, ["--methods", "gd", "foo"], "--methods"),
    (sigma_sweep, ["--seeds"], "--seeds"),
    (sigma_sweep, ["--seeds", "0", "0"], "--seeds"),
    (sigma_sweep, ["--seeds", "-1"], "--seeds"),
    (sigma_sweep, ["--sigmas"], "--sigmas"),
    (sigma_sweep, ["--sigmas", "0.1", "0.1"], "--sigmas"),
    (cnn, ["--archs", "big"], "--archs"),
    (swa, ["--arch", "vgg"], "--arch"),
    (reparametrization, ["--alphas", "0.1", "10"], "--alphas"),
    (wide_networks, ["--wide", "8", "16"], "--wide"),
    # the data a run needs
    (cnn, ["--dataset", "nope"], "--dataset"),
    (swa, ["--dataset", "sparse_linear"], "--dataset"),  # a regression set
    (swa, ["--dataset", "fashion_mnist", "--data-dir", EMPTY], "--dataset"),  # files missing
    (swa, ["--batch-size", "5000"], "--batch-size"),  # digits: 1024 training points
    (swa, ["--n-train", "100000"], "--n-train"),
    (cnn, ["--batch-size", "1001"], "--batch-size"),  # digits: 1300 - 300 validation points
    # checkpoints: steps >= 0, each once, in order
    (kfac_fidelity, ["--checkpoints", "-1", "10"], "--checkpoints"),
    (kfac_fidelity, ["--checkpoints", "10", "10"], "--checkpoints"),
    (kfac_fidelity, ["--checkpoints", "100", "0"], "--checkpoints"),
    (kfac_fidelity, ["--damping", "0"], "--damping"),
]


def _fails(module, argv, tmp_path, capsys) -> str:
    """Runs the CLI, expects it to exit non-zero before writing anything; returns what it said."""
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    argv = [str(empty) if a == EMPTY else a for a in argv]
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as info:
        cli.main(module.EXPERIMENT, [*argv, "--out", str(out)], compilation_cache=False)
    assert info.value.code not in (0, None)
    assert not out.exists(), "a results folder was created"
    return (info.value.code if isinstance(info.value.code, str) else "") + capsys.readouterr().err


@pytest.mark.parametrize(
    "module, argv, option", BAD, ids=[f"{m.__name__.split('.')[-1]}:{' '.join(a)}" for m, a, _ in BAD]
)
def test_an_invalid_option_fails_before_a_folder_and_names_it(module, argv, option, tmp_path, capsys):
    said = _fails(module, argv, tmp_path, capsys)
    assert option in said
    assert "Traceback" not in said


def test_a_missing_data_file_names_the_file_the_folder_and_download(tmp_path, capsys):
    said = _fails(swa, ["--dataset", "fashion_mnist", "--data-dir", EMPTY], tmp_path, capsys)
    assert "train-images-idx3-ubyte.gz" in said and str(tmp_path / "empty") in said and "--download" in said


def test_eval_every_error_suggests_steps_that_work(tmp_path, capsys):
    said = _fails(lasso, ["--steps", "105", "--eval-every", "10"], tmp_path, capsys)
    assert "--eval-every 10 must divide --steps 105" in said and "--steps 100 or 110" in said


def _fake_run(folder, module, *, summary=True):
    """A run folder as ``module`` writes it (config.json, a cell, summary.json), without running it."""
    folder.mkdir(parents=True)
    config = dataclasses.asdict(module.Config())
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "cells").mkdir()
    cell = module.cells(module.Config())[0]
    record = {"cell": cell, "rows": [], "elapsed_s": 1.0}
    (folder / "cells" / f"{experiment.cell_key(cell)}.json").write_text(json.dumps(record))
    if summary:
        (folder / "summary.json").write_text(json.dumps({"experiment": module.__name__.split(".")[-1]}))
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("summary", [True, False], ids=["finished", "interrupted"])
def test_resume_refuses_a_folder_of_another_experiment(tmp_path, capsys, summary):
    """issue 20, item 3: lasso --resume <a saddle_escape run> exited 0 and overwrote that run's files."""
    folder = tmp_path / "results" / "saddle_escape" / "20260101-000000"
    before = _fake_run(folder, saddle_escape, summary=summary)
    with pytest.raises(SystemExit) as info:
        cli.main(lasso.EXPERIMENT, ["--resume", str(folder)], compilation_cache=False)
    said = str(info.value.code)
    assert "--resume" in said and "not a run of lasso" in said and "saddle_escape" in said
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("make", ["missing", "no_config", "bad_json"])
def test_resume_of_a_folder_that_is_not_a_run_names_resume(tmp_path, make):
    folder = tmp_path / "run"
    if make != "missing":
        folder.mkdir()
    if make == "bad_json":
        (folder / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as info:
        cli.main(lasso.EXPERIMENT, ["--resume", str(folder)], compilation_cache=False)
    assert str(info.value.code).startswith("python -m experiments.lasso: error: --resume ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if make == "missing" else ["run"])


ALL = (
    "batch_size", "cnn", "deep_mlp", "double_descent", "geometry_report", "hessian_spectrum", "landscape_2d", "lasso",
    "mode_connectivity", "nuclear_norm", "regularized_loss", "reparametrization", "resnet", "saddle_escape",
    "sigma_sweep", "swa", "wide_networks",
)  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_every_default_and_preset_passes_the_checks(name):
    """The conventions must not reject what the modules ship (the data are not loaded here)."""
    exp = importlib.import_module(f"experiments.{name}").EXPERIMENT
    for cfg in (exp.config(), *exp.presets.values()):
        config_checks._check_fields(cfg)
        config_checks._check_relations(cfg)
        exp.validate is None or exp.validate(cfg)
        config_checks._check_cells(cfg, exp.cells(cfg))


def _saddle_rows(cfg, escape_at: dict):
    """Constructed rows: each method at the saddle's loss R(0) until ``escape_at[method]`` (None: never), then
    at R*; lambda_min < 0 throughout."""
    r0, r_star = saddle_escape.landmarks(saddle_escape.prepare(cfg))
    steps = range(0, cfg.steps + 1, cfg.eval_every)
    return [
        dict(method=m, seed=k, step=t, train_loss=r_star if at is not None and t >= at else r0, lambda_min=-1.0,
             saddle_index=0.3)
        for m, at in escape_at.items()
        for k in cfg.seeds
        for t in steps
    ]  # fmt: skip


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # np.std of never-escaped (inf) steps
def test_saddle_escape_too_short_to_test_is_null_with_a_reason():
    """issue 20, item 7: a run that cannot test its claim (GD has not left the saddle within --steps) says null
    with a reason, where it said "supported": false."""
    cfg = saddle_escape.Config(methods=("gd", "adam"), seeds=(0, 1, 2), steps=100, eval_every=10)
    verdict = saddle_escape.summarize(cfg, _saddle_rows(cfg, {"gd": None, "adam": 30}))
    assert verdict.supported is None and "too short to test the claim" in verdict.reason
    # GD escapes, Adam does not: that contradicts the claim
    assert saddle_escape.summarize(cfg, _saddle_rows(cfg, {"gd": 30, "adam": None})).supported is False
