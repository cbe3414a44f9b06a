"""experiments.transformer_blocks at smoke size: it runs through the runner, every block density
integrates to 1 on its grid, and the Jensen-Shannon distance behaves as a distance."""

import functools
import json

import numpy as np
import pytest

from experiments import runner, transformer_blocks


def test_js_distance_is_zero_for_equal_densities_and_one_for_disjoint_ones():
    grid = np.linspace(-1.0, 1.0, 201)
    bump = lambda c: np.exp(-0.5 * ((grid - c) / 0.05) ** 2)  # noqa: E731
    assert transformer_blocks.js_distance(bump(0.0), bump(0.0)) < 1e-12
    assert abs(transformer_blocks.js_distance(bump(-0.7), bump(0.7)) - 1.0) < 1e-6
    near, far = (transformer_blocks.js_distance(bump(0.0), bump(c)) for c in (0.05, 0.3))
    assert 0 < near < far < 1
    assert transformer_blocks.js0({"a": bump(0.0), "b": bump(0.0), "c": bump(0.0)}) < 1e-12


def test_js0_equals_a_hand_computation_on_two_constructed_densities():
    # block a: eigenvalues 0 and 1 with weights 1/2, 1/2; block b: 0 and 1000 with weights 0.8, 0.2. On its own
    # support each density is two narrow bumps at the two ends of its grid, so the bins hold the two-point
    # masses (1/2, 1/2) and (0.8, 0.2) at the same ends: JS^0 is the JS distance of those two distributions,
    # whatever the scales (1 vs 1000)
    dens = {name: transformer_blocks.own_support_density(np.array(theta), np.array(tau), 1000, 0.001)
            for name, theta, tau in (("a", [0.0, 1.0], [0.5, 0.5]), ("b", [0.0, 1000.0], [0.8, 0.2]))}  # fmt: skip
    p, q = np.array([0.5, 0.5]), np.array([0.8, 0.2])
    m = (p + q) / 2
    kl = lambda x, y: float(np.sum(x * np.log2(x / y)))  # noqa: E731
    hand = np.sqrt(0.5 * kl(p, m) + 0.5 * kl(q, m))  # = sqrt((0.0680 + 0.0782) / 2) = 0.2704
    assert transformer_blocks.js0(dens) == pytest.approx(hand, abs=1e-9)
    assert hand == pytest.approx(0.27038, abs=1e-4)
    # same shape at another scale: distance 0 (a spike on a shared grid would make it 1)
    same = {name: transformer_blocks.own_support_density(np.array(theta), np.array([0.3, 0.7]), 1000, 0.01)
            for name, theta in (("a", [0.0, 1.0]), ("b", [5.0, 3005.0]))}  # fmt: skip
    # a distance is the square root of a divergence whose rounding is ~eps: 0 up to sqrt(eps) ~ 1.5e-8 (4.3e-9 with
    # scipy 1.13, the floor; 0 with later scipy)
    assert transformer_blocks.js0(same) < 1e-7
    # three blocks: the mean of the three pairwise distances
    dens["c"] = dens["a"]
    assert transformer_blocks.js0(dens) == pytest.approx((hand + hand + 0.0) / 3, abs=1e-9)


def test_transformer_blocks_smoke(tmp_path):
    cfg = transformer_blocks.Config(seeds=(0,), modulus=5, d_model=4, heads=1, mlp_widths=(8, 8), steps=10,
                                    eval_every=5, slq_iters=4, slq_runs=1, grid_points=200)
    run_dir, summary = runner.run_experiment(transformer_blocks.EXPERIMENT, cfg, out=tmp_path, progress=False,
                                             verbose=False)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["supported"] is None  # one seed: no verdict
    cells = [json.loads(path.read_text()) for path in (run_dir / "cells").glob("*.json")]
    rows = [(cell["cell"]["model"], r) for cell in cells for r in cell["rows"]]
    assert {r["stage"] for _, r in rows} == {"init", "trained"}
    assert {(model, r["stage"]) for model, r in rows} == {
        ("transformer", "init"), ("transformer", "trained"), ("mlp", "init"), ("mlp", "trained"), ("mlp_wide", "init")}
    for _, r in rows:
        assert 0.0 <= r["js"] <= 1.0
    blocks = {model: r["blocks"] for model, r in rows}
    # embed, query, key, value, out, mlp_in, mlp_out, head; the MLPs' three kernels (biases left out)
    assert blocks == {"transformer": 8, "mlp": 3, "mlp_wide": 3}
    assert saved["controls"]["js0"]["control"].startswith("a second homogeneous net")
    assert list(run_dir.glob("*.png"))


def test_paper_preset_is_gpt2_nano_and_its_models_run_a_forward_pass():
    """The ``paper`` preset (for a GPU): GPT2-nano's 6 blocks of width 384 with 6 heads, its config passing every
    check the CLI makes. The transformer, initialised at that size (~10.7M parameters, the 38 compared blocks: 6 per
    layer, the embedding, the head), maps a tiny batch to finite logits; the two MLPs' forward passes are traced at
    their size (shapes only: their 11M / 44M random weights would cost seconds to draw and say nothing more)."""
    import jax
    import jax.numpy as jnp

    from experiments import config_checks

    cfg = transformer_blocks.PRESETS["paper"]
    assert (cfg.layers, cfg.d_model, cfg.heads) == (6, 384, 6)
    cells = config_checks.check_config(transformer_blocks.EXPERIMENT, cfg)
    assert len(cells) == len(transformer_blocks.MODELS) * len(cfg.seeds)
    tokens = jnp.asarray(transformer_blocks.prepare(cfg)["tokens"][:2])
    for model in transformer_blocks.MODELS:
        _, predict, _ = transformer_blocks._networks(cfg, model)
        init = functools.partial(transformer_blocks._init, cfg, model)
        if model != "transformer":
            logits = jax.eval_shape(lambda key: predict(init(key), tokens), jax.random.key(0))
            assert logits.shape == (2, cfg.modulus)
            continue
        params = jax.jit(init)(jax.random.key(0))
        logits = jax.jit(predict)(params, tokens)
        assert logits.shape == (2, cfg.modulus) and bool(jnp.all(jnp.isfinite(logits)))
        assert 10.5e6 < sum(x.size for x in jax.tree_util.tree_leaves(params)) < 11e6  # GPT2-nano's ~10.7M
        names = {transformer_blocks.block_name(tuple(k.key for k in path))
                 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}  # fmt: skip
        assert len({n for n in names if not n.startswith(transformer_blocks.SKIPPED)}) == 6 * 6 + 2
