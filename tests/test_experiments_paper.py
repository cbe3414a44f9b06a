"""End-to-end smoke runs of the noise-injection paper's experiments (tiny configs, seconds each).

Each run must write config.json, metrics.csv, summary.json (the common keys, a verdict with its reason)
and its figures; the sigma sweep is also interrupted inside a cell and resumed without recomputing
finished cells, and rerun from the command line as 2 jax.distributed processes (python -m lsgeo.launch) to check
that its metrics reproduce exactly and that one results folder is written. The MLP experiments have a
``paper-mnist1d`` GPU preset next to ``paper``.
"""

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import (
    cnn,
    deep_mlp,
    geometry_report,
    lasso,
    nuclear_norm,
    regularized_loss,
    resnet,
    runner,
    sigma_sweep,
)

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "experiment", "config", "claim", "supported", "reason", "controls", "power", "figures", "runtime_s", "devices",
    "code_version",
}  # fmt: skip

SMOKE = {
    "regularized_loss": (regularized_loss, dict(widths=(8,), n_train=16, steps=20, eval_every=10, methods=("noise", "layer"), seeds=(0,))),
    "lasso": (lasso, dict(n_train=6, d=12, num_nonzero=2, sigmas=(0.3,), steps=20, eval_every=10, seeds=(0,))),
    "nuclear_norm": (nuclear_norm, dict(n_train=12, d_in=6, d_out=6, rank=1, width=5, steps=20, eval_every=10,
                                        prox_iters=2, methods=("layer",), seeds=(0,))),
    "deep_mlp": (deep_mlp, dict(n_train=32, n_test=32, depth=2, widths=(8,), lrs=(0.1,), steps=4, eval_every=2,
                                seeds=(0, 1))),
    "cnn": (cnn, dict(n_train=32, n_val=16, n_test=32, archs=("toy",), batch_size=16, steps=2, eval_every=2,
                      trace_examples=8, trace_probes=1, methods=("gd", "layer"), seeds=(0,))),
    "resnet": (resnet, dict(n_train=16, n_val=8, n_test=16, width=2, stage_sizes=(1,), augment_padding=2, batch_size=8,
                            epochs=2, noise_off_epoch=1, evals=1, trace_examples=4, trace_probes=1,
                            methods=("gd", "noise"), sigmas=(0.2,), seeds=(0,))),
    "geometry_report": (geometry_report, dict(widths=(4,), steps=2, sigmas=(0.02, 0.05), mc_samples=4, trace_probes=3,
                                              seeds=(0,))),
}
SIGMA_SWEEP = dict(n_train=32, n_val=16, n_test=32, width=8, steps=4, eval_every=2, sigmas=(0.05,), methods=("gd", "layer"),
                   seeds=(0, 1))


def _check_outputs(run_dir, summary, name):
    for f in ("config.json", "metrics.csv", "summary.json"):
        assert (run_dir / f).is_file(), f
    assert not list(run_dir.rglob("*.tmp"))
    saved = json.loads((run_dir / "summary.json").read_text())
    assert set(saved) == SUMMARY_KEYS and saved["experiment"] == name
    assert saved["supported"] in (True, False, None) and saved["claim"].endswith(".")
    assert saved["figures"] and all(v is None or isinstance(v, (int, float)) for v in saved["figures"].values())
    assert json.loads((run_dir / "config.json").read_text()) == saved["config"]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert rows and ("step" in rows[0] or "name" in rows[0])
    return rows


def _check_edge_histogram(rows):
    """The figure's exact eigenvalue counts (jnp.linalg.eigvalsh of the dense Hessian) agree with the library's
    saddle index of the same network: the eigenvalues below the threshold lie in the bins that start below it."""
    seed = rows[0]["seed"]
    index = next(r for r in rows if r["name"].startswith("saddle index") and r["seed"] == seed)
    top = max(abs(float(r["value"])) for r in rows if r["name"].startswith("Hessian eigenvalue") and r["seed"] == seed)
    bins = [r for r in rows if r["name"] == geometry_report.EDGE_HISTOGRAM]
    assert bins and all(r["seed"] == seed for r in bins)
    lo = np.array([float(r["eigenvalue"]) for r in bins])
    counts = np.array([float(r["value"]) for r in bins])
    width = float(bins[0]["bin_width"])
    below = float(index["value"]) * int(bins[0]["num_params"])
    threshold = -1e-3 * top  # rtol max|lambda|, max|lambda| from Lanczos (the top eigenvalue of a trained net)
    assert counts[lo + width <= threshold * 1.01].sum() - 0.5 <= below <= counts[lo < threshold * 0.99].sum() + 0.5


# the CNN and deep-MLP smokes (55 s of the suite, mostly compiling) run with -m slow; the resnet and
# regularized_loss smokes cover the same training pipelines in the README command
SLOW_SMOKE = ("cnn", "deep_mlp")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_SMOKE else n for n in sorted(SMOKE)])
def test_experiment_smoke(name, tmp_path):
    module, overrides = SMOKE[name]
    exp = module.EXPERIMENT
    assert exp.name == name and module.__name__ == f"experiments.{name}"
    run_dir, summary = runner.run_experiment(exp, exp.config(**overrides), out=tmp_path, progress=False, verbose=False)
    rows = _check_outputs(run_dir, summary, name)
    if name == "geometry_report":  # the saddle index says which tolerance it used, relative to the spectrum
        assert any(r["name"].startswith("saddle index (exact; eigenvalues < -0.001 max|lambda|)") for r in rows)
        _check_edge_histogram(rows)
    if exp.plot is not None:
        assert list(run_dir.glob("*.png"))
    assert ("paper" in exp.presets or name == "geometry_report") and all(
        isinstance(p, exp.config) for p in exp.presets.values())
    assert summary["reason"]


def test_sigma_sweep_resume_and_reproducibility(tmp_path):
    calls = []

    def interrupted(cfg, data, group):
        calls.append([(c["method"], c["seed"]) for c in group])
        if group[0]["method"] == "layer":
            raise KeyboardInterrupt("simulated interruption")
        return sigma_sweep.run(cfg, data, group)

    cfg = sigma_sweep.Config(**SIGMA_SWEEP)
    exp = dataclasses.replace(sigma_sweep.EXPERIMENT, run=interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(exp, cfg, out=tmp_path / "a", progress=False, verbose=False)
    (run_dir,) = (tmp_path / "a" / "sigma_sweep").iterdir()
    assert sorted(p.stem for p in (run_dir / "cells").glob("*.json")) == [
        "method=gd,sigma=0.0,seed=0", "method=gd,sigma=0.0,seed=1"]

    calls.clear()
    resumed = dataclasses.replace(sigma_sweep.EXPERIMENT, run=lambda c, d, g: calls.append(g) or sigma_sweep.run(c, d, g))
    _, summary = runner.run_experiment(resumed, resume=run_dir, progress=False, verbose=False)
    assert [[c["method"] for c in g] for g in calls] == [["layer", "layer"], ["gd_control", "gd_control"]]
    rows = _check_outputs(run_dir, summary, "sigma_sweep")
    assert len(rows) == 6 * 3 and (run_dir / "accuracy_vs_sigma.png").is_file()  # gd, layer and the GD control

    # a fresh run from the command line, as 2 jax.distributed processes (python -m lsgeo.launch): one results
    # folder, written by process 0, with exactly the numbers of the interrupted and resumed single-process run
    command = [sys.executable, "-m", "lsgeo.launch", "--num-processes", "2", "--timeout", "240", "--", sys.executable,
               "-m", "experiments.sigma_sweep", "--out", str(tmp_path / "c"), *_flags(SIGMA_SWEEP)]
    env = dict(os.environ, LSGEO_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    (two_dir,) = (tmp_path / "c" / "sigma_sweep").iterdir()
    assert out.stdout.count("supported:") == 1  # only process 0 prints
    # the same numbers up to float32 rounding: two processes sum their gradients in another order (seen: the 7th
    # digit of one training loss); labels, cells and verdict exactly
    _assert_same_table((two_dir / "metrics.csv").read_text(), (run_dir / "metrics.csv").read_text())
    assert sorted(p.name for p in two_dir.iterdir()) == sorted(p.name for p in run_dir.iterdir())
    two = json.loads((two_dir / "summary.json").read_text())
    assert two["supported"] == summary["supported"] and two["figures"].keys() == summary["figures"].keys()
    for name, value in summary["figures"].items():
        assert _close(two["figures"][name], value), (name, two["figures"][name], value)
    assert len(two["devices"]) == 2


def _close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return bool(np.isclose(a, b, rtol=1e-5, atol=1e-7, equal_nan=True))
    return a == b


def _assert_same_table(a: str, b: str) -> None:
    rows_a, rows_b = list(csv.reader(io.StringIO(a))), list(csv.reader(io.StringIO(b)))
    assert len(rows_a) == len(rows_b) and rows_a[0] == rows_b[0]
    for ra, rb in zip(rows_a[1:], rows_b[1:]):
        for x, y in zip(ra, rb, strict=True):
            try:
                assert _close(float(x), float(y)), (ra, rb)
            except ValueError:
                assert x == y, (ra, rb)


def _flags(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, tuple) else (v,))]
    return out


def test_mlp_experiments_have_a_paper_mnist1d_preset():
    for module in (sigma_sweep, deep_mlp):
        preset = module.EXPERIMENT.presets["paper-mnist1d"]
        assert preset.dataset == "mnist1d" and max(getattr(preset, "widths", (getattr(preset, "width", 0),))) == 5000


def test_resnet_title_names_the_configured_depth():
    assert resnet.title(resnet.Config()).startswith("ResNet-10 (1-1-1-1 blocks")
    assert resnet.title(resnet.EXPERIMENT.presets["paper"]).startswith("ResNet-18 (2-2-2-2 blocks, width 64)")
