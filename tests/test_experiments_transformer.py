"""experiments.transformer_blocks at smoke size: it runs through the runner, every block density
integrates to 1 on its grid, and the Jensen-Shannon distance behaves as a distance."""

import json

import numpy as np

from experiments import runner, transformer_blocks
def test_js_distance_is_zero_for_equal_densities_and_one_for_disjoint_ones():
    grid = np.linspace(-1.0, 1.0, 201)
    bump = lambda c: np.exp(-0.5 * ((grid - c) / 0.05) ** 2)  # noqa: E731
    assert transformer_blocks.js_distance(bump(0.0), bump(0.0), grid) < 1e-12
    assert abs(transformer_blocks.js_distance(bump(-0.7), bump(0.7), grid) - 1.0) < 1e-6
    near, far = (transformer_blocks.js_distance(bump(0.0), bump(c), grid) for c in (0.05, 0.3))
    assert 0 < near < far < 1
    assert transformer_blocks.heterogeneity({"a": bump(0.0), "b": bump(0.0), "c": bump(0.0)}, grid) < 1e-12


def test_transformer_blocks_smoke(tmp_path):
    cfg = transformer_blocks.Config(seeds=(0,), modulus=5, d_model=4, heads=1, mlp_widths=(8,), steps=10,
                                    eval_every=5, slq_iters=4, slq_runs=1, grid_points=200)
    run_dir, summary = runner.run_experiment(transformer_blocks.EXPERIMENT, cfg, out=tmp_path, progress=False,
                                             verbose=False)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["supported"] is None  # one seed: no verdict
    cells = [json.loads(path.read_text()) for path in (run_dir / "cells").glob("*.json")]
    rows = [(cell["cell"]["model"], r) for cell in cells for r in cell["rows"]]
    assert {r["stage"] for _, r in rows} == {"init", "trained"}
    for _, r in rows:  # every block density integrates to 1 on its grid (quadrature and tails: 1e-3)
        assert abs(r["min_mass"] - 1.0) < 1e-3 and abs(r["max_mass"] - 1.0) < 1e-3, r
        assert 0.0 <= r["js_mean"] <= 1.0
    blocks = {model: r["blocks"] for model, r in rows}
    assert blocks == {"transformer": 8, "mlp": 2}  # embed, query, key, value, out, mlp_in, mlp_out, head
    assert list(run_dir.glob("*.png"))
