"""Measurements along a training run (lsgeo.train.measure): a tracked top eigenvalue equals
curvature.top_eigenvalues on the same iterate, a warm start needs fewer products than a cold one, and a
measurement vmaps over runs."""

import jax
import numpy as np
from conftest import mlp_apply, mlp_init, regression_batch, sq_objective

from lsgeo import curvature
from lsgeo.train import measure

F = sq_objective(mlp_apply)


def test_a_tracked_top_eigenvalue_equals_top_eigenvalues(x64):
    params, batch = mlp_init(0, (4, 8, 2)), regression_batch(1, 20, 4, 2)
    tracker = measure.top_eigenvalue_tracker(F, k=2, num_iters=58, tol=1e-10)
    metrics, state = jax.jit(tracker.update)(params, batch, tracker.init(params))
    expected = curvature.top_eigenvalues(F, params, batch, jax.random.key(9), k=2, num_iters=58)
    np.testing.assert_allclose([metrics["lambda_max_1"], metrics["lambda_max_2"]], expected, rtol=1e-6)
    assert bool(state.warm) and state.vectors.shape == (2, 58)
    trace = measure.trace_tracker(F, num_probes=400, key=3)
    metrics, _ = jax.jit(trace.update)(params, batch, trace.init(params))
    dense = np.trace(np.asarray(curvature.hessian(F, params, batch)))
    assert abs(metrics["trace"] - dense) <= 4 * metrics["trace_stderr"]


def test_a_warm_start_needs_fewer_products(x64):
    params, batch = mlp_init(0, (4, 8, 2)), regression_batch(1, 20, 4, 2)
    tracker = measure.top_eigenvalue_tracker(F, k=1, num_iters=40, tol=1e-6)
    update = jax.jit(tracker.update)
    _, state = update(params, batch, tracker.init(params))
    moved = jax.tree_util.tree_map(lambda a: 1.001 * a, params)  # a small step
    warm, _ = update(moved, batch, state)
    cold, _ = update(moved, batch, tracker.init(params))
    np.testing.assert_allclose(warm["lambda_max"], cold["lambda_max"], rtol=1e-6)
    assert int(warm["lambda_max_products"]) < int(cold["lambda_max_products"]), (warm, cold)


def test_a_measurement_vmaps_over_runs(x64):
    batch = regression_batch(1, 20, 4, 2)
    runs = [mlp_init(seed, (4, 8, 2)) for seed in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), *runs)
    tracker = measure.top_eigenvalue_tracker(F, k=1, num_iters=30, tol=1e-8)
    together, _ = jax.jit(jax.vmap(lambda p: tracker.update(p, batch, tracker.init(p))))(stacked)
    for i, params in enumerate(runs):
        alone, _ = tracker.update(params, batch, tracker.init(params))
        np.testing.assert_allclose(together["lambda_max"][i], alone["lambda_max"], rtol=1e-8)
