"""Smoke runs of the loss-landscape experiments: outputs exist and parse, one numeric property each."""

import csv
import json
import math

import numpy as np
import pytest

from experiments import batch_size, landscape_2d, mode_connectivity, nets, records, runner, swa

SUMMARY_KEYS = {
    "experiment", "config", "claim", "supported", "reason", "controls", "power", "figures", "runtime_s", "devices",
    "code_version",
}  # fmt: skip


def _run(exp, cfg, tmp_path, figures):
    run_dir, summary = runner.run_experiment(exp, cfg, out=tmp_path, progress=False, verbose=False)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert set(saved) == SUMMARY_KEYS and saved["experiment"] == exp.name and saved["claim"] == exp.claim
    assert saved["supported"] in (True, False, None)
    assert all(v is None or isinstance(v, (int, float)) for v in saved["figures"].values())
    assert json.loads((run_dir / "config.json").read_text()) == saved["config"]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert rows and len(rows) == sum(len(json.loads(p.read_text())["rows"]) for p in (run_dir / "cells").glob("*.json"))
    for name in figures:
        assert (run_dir / name).stat().st_size > 0
    cells = [json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*.json"))]
    return saved, [{**c["cell"], **r} for c in cells for r in c["rows"]]


def test_mode_connectivity(tmp_path):
    cfg = mode_connectivity.Config(n_train=200, widths=(8,), steps=50, curve_steps=20, num_points=5, seeds=(0,))
    summary, rows = _run(mode_connectivity.EXPERIMENT, cfg, tmp_path, ["paths.png"])
    line, curve = (sorted(records.select(rows, path=p), key=lambda r: r["t"]) for p in ("line", "curve"))
    assert [r["t"] for r in line] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for end in (0, -1):  # both paths start and end at the same two minima
        for key in ("train_loss", "test_loss", "test_acc"):
            assert curve[end][key] == pytest.approx(line[end][key], rel=1e-5, abs=1e-6)
    for path in (line, curve):  # landscape.barrier_height on the same grid as the stored path
        peak = max(r["train_loss"] for r in path) - max(path[0]["train_loss"], path[-1]["train_loss"])
        assert path[0]["barrier"] == pytest.approx(peak, abs=1e-5) and path[0]["barrier"] >= 0.0


def test_landscape_2d(tmp_path):
    cfg = landscape_2d.Config(n_train=128, widths=(8,), deep_width=8, deep_depth=2, steps=20, small_batch=32,
                              num_directions=2, num_alphas=5, grid=3, fit_radius=0.5, comparisons=("noise",), seeds=(0,))
    summary, rows = _run(landscape_2d.EXPERIMENT, cfg, tmp_path, ["surfaces.png", "slices.png", "flatness.png"])
    assert landscape_2d.variants(cfg) == ["large_batch", "large_twin", "noise"]  # large_twin: the control
    for v in landscape_2d.variants(cfg):  # the centre of every slice and of the surface is the minimum itself
        center = landscape_2d.minimum(rows, v, 0)["train_loss"]
        at_zero = [r["loss"] for r in records.select(rows, variant=v, kind="slice", alpha=0.0)]
        at_zero += [r["loss"] for r in records.select(rows, variant=v, kind="surface", alpha=0.0, beta=0.0)]
        assert len(at_zero) == cfg.num_directions + 1
        np.testing.assert_allclose(at_zero, center, rtol=1e-5)
    assert "noise_gain" in summary["figures"] and "batch_gain" not in summary["figures"]
    assert set(summary["controls"]) == {"noise"} and set(summary["power"]) == {"noise"}


def test_curvature_at_zero_of_a_parabola():
    alphas = np.linspace(-1, 1, 21)
    assert landscape_2d.curvature_at_zero(alphas, 3.0 * alphas**2 + alphas + 0.5, 0.2) == pytest.approx(6.0)


@pytest.mark.slow  # 25-40 s of the suite; run with -m slow
def test_swa_with_batchnorm(tmp_path):
    cfg = swa.Config(n_train=64, arch="resnet", resnet_width=2, stage_sizes=(1,), batch_size=16, steps=16, eval_every=8,
                     lanczos_iters=4, trace_probes=6, seeds=(0, 1))
    summary, rows = _run(swa.EXPERIMENT, cfg, tmp_path, ["swa.png"])
    for m in swa.METHODS:  # the final measures are taken at the point the last evaluation saw, statistics recomputed
        final = records.select(rows, method=m, kind="final")[0]
        last = max(records.select(rows, method=m, kind="history", seed=0), key=lambda r: r["step"])
        assert final["test_acc"] == pytest.approx(last["test_acc"], abs=1e-6)
    swa_steps = [r["step"] for r in records.select(rows, method="swa", kind="history", seed=0)]
    assert swa_steps == [16]  # averaging starts at step 12 (an epoch end): no SWA row before it
    assert swa.swa_start_step(cfg, 4) == 12 and swa.swa_start_step(swa.Config(), 32) == 2400


def test_batchnorm_objectives_agree_on_the_training_data():
    import jax

    from lsgeo import models

    model = models.ResNet18(num_classes=3, width=2, stage_sizes=(1,))
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
    y = jax.numpy.arange(8) % 3
    params, state = models.init_model(model, jax.random.key(1), x[:1])
    batch_mode = nets.Objective(model, stats="batch")(params, (x, y, state))
    recomputed = nets.Objective(model, stats="recompute")(params, (x, y, state, x))
    running = nets.Objective(model)(params, (x, y, state))
    assert recomputed == pytest.approx(float(batch_mode), rel=1e-5) and abs(running - batch_mode) > 1e-3


@pytest.mark.slow  # 25-40 s of the suite; run with -m slow
def test_batch_size(tmp_path):
    cfg = batch_size.Config(n_train=128, widths=(8,), small_batch=16, target_loss=1.5, check_every=10,
                            max_steps=200, lanczos_iters=5, trace_probes=6, sharpness_steps=2, seeds=(0, 1))
    summary, rows = _run(batch_size.EXPERIMENT, cfg, tmp_path, ["batch_size.png"])
    for b, size in (("small", 16), ("large", 128)):
        final = records.select(rows, batch=b, kind="final")[0]
        assert final["batch_size"] == size and final["epochs"] == pytest.approx(final["step"] * size / 128)
        if final["reached"] == "True" or final["reached"] is True:  # stopped at the first check below the target
            assert final["train_loss"] <= cfg.target_loss + 1e-5
        assert final["epsilon_sharpness"] >= 0.0 and math.isfinite(final["lambda_max"])
    assert summary["supported"] is None or isinstance(summary["supported"], bool)
