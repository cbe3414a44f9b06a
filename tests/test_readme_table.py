"""experiments.readme_table: the README's experiment table comes from the runs' summary.json files."""

import json

import pytest

from experiments import discrimination, readme_table
def _summary(results, name, stamp, config, figures, supported=True, runtime=12.0, **recorded):
    folder = results / name / stamp
    folder.mkdir(parents=True)
    summary = dict(experiment=name, config=config, claim="c.", supported=supported, reason="r", figures=figures,
                   runtime_s=runtime, devices=["cpu:cpu"], **recorded)
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
    assert "GD 43.7%; layer-wise 48.9% at sigma 0.05 (validation), +5.2 ± 1.2 points | not recorded" in row
    assert row.endswith("| supported | 87 s |")
    assert "| `resnet` |" in text and "no default run found" in text and "cpu:cpu" in text


def test_a_run_from_before_an_added_field_counts_with_the_fields_old_value(tmp_path):
    default = readme_table.default_config("transformer_blocks")
    assert readme_table.ADDED_FIELDS["transformer_blocks"] == {"layers": default["layers"]}
    older = {k: v for k, v in default.items() if k != "layers"}  # stored before the layers field existed
    _summary(tmp_path, "transformer_blocks", "20240101-000000", older, {}, runtime=1.0)
    assert readme_table.latest_default_run(tmp_path, "transformer_blocks")["runtime_s"] == 1.0
    _summary(tmp_path, "transformer_blocks", "20240102-000000", dict(older, layers=6), {}, runtime=2.0)  # not default
    assert readme_table.latest_default_run(tmp_path, "transformer_blocks")["runtime_s"] == 1.0
    no_seeds = {k: v for k, v in default.items() if k != "seeds"}  # a missing field not in ADDED_FIELDS: not default
    _summary(tmp_path, "transformer_blocks", "20240103-000000", no_seeds, {}, runtime=3.0)
    assert readme_table.latest_default_run(tmp_path, "transformer_blocks")["runtime_s"] == 1.0


def test_replace_table_between_the_markers():
    readme = f"intro\n{readme_table.BEGIN}\nold table\n{readme_table.END}\nrest\n"
    assert readme_table.replace_table(readme, "new") == f"intro\n{readme_table.BEGIN}\nnew\n{readme_table.END}\nrest\n"
    with pytest.raises(ValueError, match="marker"):
        readme_table.replace_table("no markers", "new")


def test_every_experiment_has_a_row():
    import pkgutil

    import experiments

    modules = {m.name for m in pkgutil.iter_modules(experiments.__path__)} - experiments.SHARED - {"readme_table"}
    assert modules == set(readme_table.ROWS)


def _render_rows(markdown: str) -> list[list[str]]:
    """The cells of every row of the Markdown table in ``markdown``, as a GFM renderer reads them."""
    markdown_it = pytest.importorskip("markdown_it")
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(markdown)
    rows, row = [], None
    for tok in tokens:
        if tok.type == "tr_open":
            row = []
        elif tok.type == "inline" and row is not None:
            row.append(tok.content)
        elif tok.type == "tr_close":
            rows.append(row)
            row = None
    return rows


def test_rendered_table_has_seven_cells_in_every_row_and_keeps_pipes(tmp_path):
    """A ``|`` in a cell (geometry_report's ``max|lambda|``) is escaped: rendered, every row has the header's seven
    columns and the verdict stays in its column."""
    default = readme_table.default_config("geometry_report")
    figures = {f"order_{a}_{k}{end}": 3.0 for a in default["activations"] for k in ("hessian", "gauss_newton")
               for end in ("", "_lo", "_hi")}  # fmt: skip
    figures.update(saddle_index=0.01, smallest_Hessian_eigenvalue=-0.016, Hessian_eigenvalue_1=8.0)
    _summary(tmp_path, "geometry_report", "20240101-000000", default, figures, supported=True)
    text = readme_table.table(tmp_path, machine_note="test machine, load 1.0")
    rows = _render_rows(text)
    assert len(rows) == 1 + len(readme_table.ROWS)
    assert all(len(r) == 7 for r in rows), [len(r) for r in rows]
    (row,) = [r for r in rows if r[0] == "`geometry_report`"]
    assert "max|lambda|" in row[3] and row[5] == "supported"
    assert "test machine, load 1.0" in text


def test_cell_escapes_pipes_and_line_breaks():
    assert readme_table.cell("a|b\nc") == "a\\|b c"


def _part(control, passed, discriminates, **stats):
    return dict(control=control, claim_passed=True, control_passed=passed, discriminates=discriminates, **stats)


def _mde(mde, source_effect, unit=" points"):
    detectable = None if source_effect is None else mde <= source_effect
    return dict(mde=mde, source_effect=source_effect, unit=unit, source="s", detectable=detectable, power=0.8)


def test_every_row_states_its_controls_and_power_from_the_summary(tmp_path):
    """The control and power cell is written from ``summary.json``'s ``controls`` and ``power``, the same words for
    every experiment: failing controls counted and named, a passing one named as not discriminating, parts without a
    control listed, each MDE beside the source's effect (or its absence) with whether the run can detect it."""
    default = readme_table.default_config("cnn")
    figures = {f"test_acc_{a}_gd_sigma=0": 0.9 for a in default["archs"]}
    figures.update({"toy_layer_gain": 0.01, "toy_layer_gain_se": 0.002, "toy_layer_best_sigma": 0.02})
    controls = {"toy": _part("plain SGD from other inits", None, True, control_mean=0.001),  # within noise: fails
                "wide": _part("plain SGD from other inits", True, False),  # passes too
                "exact": _part("none: an exact check", None, None)}  # fmt: skip
    power = {"toy_layer_gain": _mde(3.96, 1.0), "wide_layer_gain": _mde(0.5, 1.0), "other": _mde(2.0, None, "")}
    _summary(tmp_path, "cnn", "20240101-000000", default, figures, supported=None, controls=controls, power=power)
    (row,) = [r for r in _render_rows(readme_table.table(tmp_path)) if r[0] == "`cnn`"]
    cell = row[4]
    assert cell.startswith("controls: 1 of 2 fail as they must (plain SGD from other inits)")
    assert "wide (plain SGD from other inits): passes too, does not discriminate" in cell
    assert "no control for exact (none: an exact check)" in cell
    assert "toy_layer_gain: MDE 3.96 points vs the source's 1 points: cannot detect it" in cell
    assert "wide_layer_gain: MDE 0.5 points vs the source's 1 points: can detect it" in cell
    assert "other: MDE 2 (the source gives no number in these units)" in cell and row[5] == "null"
    bare = readme_table.control_power({"controls": {}, "power": {}})
    assert bare == "no control recorded; no minimum detectable effect recorded"
    assert readme_table.control_power({"power": {"a": dict(_mde(1.0, None), mde=None)}}).endswith(
        "a: MDE infinite (too few seeds) (the source gives no number in these units)")


def test_deterministic_rules_state_their_tolerance_and_a_control_shown_effect():
    """``discrimination.Power.kind``: a tolerance (deterministic check) and an effect the control shows the rule rejects
    (an upper bound on the MDE) are printed as such, not as an 80%-power MDE."""
    tolerance = discrimination.Power(1e-4, None, " (relative)", "s", "tolerance")
    shown = discrimination.Power(0.21, None, " (relative variance)", "s", "shown")
    assert tolerance.describe().startswith("tolerance 0.0001 (relative) (a deterministic check")
    assert tolerance.detectable is None  # an exact claim: any deviation beyond the tolerance is the failure
    barrier = discrimination.Power(0.1, 1.0, " (train loss)", "s", "tolerance")  # a threshold below the source's
    assert barrier.detectable is True and "vs the source's 1 (train loss)" in barrier.describe()
    assert "upper bound on the minimum detectable effect" in shown.describe()
    cell = readme_table.control_power({"controls": {}, "power": {"f": tolerance.record(), "v": shown.record()}})
    assert "power (80% where statistical): f: tolerance 0.0001 (relative) (deterministic)" in cell
    assert "v: MDE <= 0.21 (relative variance) (its control's effect, rejected)" in cell


def test_kfac_fidelity_row_per_model_and_from_before_the_models_field():
    common = dict(ekfac_over_kfac_min=0.95, ekfac_over_kfac_max=0.99, pairs=4, pairs_ekfac_not_above=4,
                  pairs_kfac_not_above=0)  # fmt: skip
    per_model = {f"{q}_{m}_{model}_step={t}": v for model in ("mlp", "cnn") for m, v in (("kfac", 0.7), ("ekfac", 0.6))
                 for q in ("frobenius", "trace_ratio", "inverse_error") for t in (0, 10)}  # fmt: skip
    text = readme_table._kfac_fidelity({**common, **per_model}, dict(checkpoints=[0, 10], models=["mlp", "cnn"]))
    assert "mlp: KFAC 0.7, 0.7, EKFAC 0.6, 0.6" in text and "cnn: KFAC 0.7, 0.7" in text and "4 of 4" in text
    older = {k.replace("_mlp", ""): v for k, v in per_model.items() if "_mlp_" in k}  # keys without a model
    assert "mlp: KFAC 0.7, 0.7" in readme_table._kfac_fidelity({**common, **older}, dict(checkpoints=[0, 10]))


def test_a_run_that_never_escapes_is_written_as_never():
    """saddle_escape's control (GD at the saddle) never escapes: its infinite step is stored as null in summary.json."""
    figures = {"gd_median_escape_step": 410.0, "gd_at_saddle_median_escape_step": None}
    assert readme_table._saddle_escape(figures, {"methods": ["gd", "gd_at_saddle"]}) == (
        "median escape step: gd 410, gd_at_saddle never")
