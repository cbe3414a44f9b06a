"""experiments.readme_table: the README's experiment table comes from the runs' summary.json files."""

import json

import pytest

from experiments import readme_table


def _summary(results, name, stamp, config, figures, supported=True, runtime=12.0):
    folder = results / name / stamp
    folder.mkdir(parents=True)
    summary = dict(experiment=name, config=config, claim="c.", supported=supported, reason="r", figures=figures,
                   runtime_s=runtime, devices=["cpu:cpu"])
    (folder / "summary.json").write_text(json.dumps(summary))


def test_table_uses_the_newest_default_run(tmp_path):
    default = readme_table.default_config("sigma_sweep")
    figures = {"acc_gd_sigma=0": 0.437, "acc_layer_sigma=0.05": 0.489, "layer_best_sigma": 0.05, "layer_gain": 0.052,
               "layer_gain_se": 0.012}
    _summary(tmp_path, "sigma_sweep", "20240101-000000", default, dict(figures, layer_gain=0.5), supported=None)
    _summary(tmp_path, "sigma_sweep", "20240102-000000", default, figures, runtime=87.4)
    _summary(tmp_path, "sigma_sweep", "20240103-000000", dict(default, steps=5), dict(figures, layer_gain=0.9))
    text = readme_table.table(tmp_path)
    (row,) = [line for line in text.splitlines() if line.startswith("| `sigma_sweep`")]
    assert "GD 43.7%; layer-wise 48.9% at sigma 0.05 (validation), +5.2 ± 1.2 points | supported | 87 s |" in row
    assert "| `resnet` |" in text and "no default run found" in text and "cpu:cpu" in text


def test_replace_table_between_the_markers():
    readme = f"intro\n{readme_table.BEGIN}\nold table\n{readme_table.END}\nrest\n"
    assert readme_table.replace_table(readme, "new") == f"intro\n{readme_table.BEGIN}\nnew\n{readme_table.END}\nrest\n"
    with pytest.raises(ValueError, match="marker"):
        readme_table.replace_table("no markers", "new")


def test_every_experiment_has_a_row():
    import pkgutil

    import experiments

    modules = {m.name for m in pkgutil.iter_modules(experiments.__path__)} - {"runner", "common", "readme_table"}
    assert modules == set(readme_table.ROWS)
