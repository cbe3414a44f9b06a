"""Measurements along a training run (lsgeo.curvature.track, train(measure=...)): a tracked top eigenvalue
equals curvature.top_eigenvalues on the same iterate (GD and noise injection, at the clean point), a warm
start needs fewer products than a cold one, a resumed run continues bit for bit, a tracked sweep equals
the separate runs and a tracked run compiles its chunk and its measurement once; with measure_data, the
measurement runs on that batch (an argument of the compiled measurement, not a constant); on microbatches or a data source a tracker gives
the whole-batch value (float64); a batch-coupled objective with microbatches, an unknown method and k > m are
refused naming the argument (issue 27)."""

import jax
import numpy as np
import optax
import pytest
from conftest import mlp_apply, mlp_init, regression_batch, sq_objective

from lsgeo import curvature, optim, train
from lsgeo.curvature import track as measure

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


def _problem():
    import jax.numpy as jnp

    params = jax.tree_util.tree_map(jnp.asarray, mlp_init(0, (4, 6, 2)))
    return params, tuple(map(jnp.asarray, regression_batch(1, 20, 4, 2)))


@pytest.mark.parametrize("noise", [False, True])
def test_train_tracks_the_top_eigenvalue_at_the_clean_iterate(x64, noise):
    """Tracked every 2 evaluations inside the compiled loop: equal to top_eigenvalues at the clean iterate of
    those steps (float64, rtol 1e-6), for GD and for noise injection; tracking does not change training."""
    params, batch = _problem()
    m = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))
    opt = optim.noise_injection(optax.sgd(0.05), 0.01, mode="layerwise", seed=3) if noise else optax.sgd(0.05)
    tracker = measure.top_eigenvalue_tracker(F, k=1, num_iters=m, tol=1e-12)
    tracked = train.train(F, opt, params, batch, num_steps=8, eval_every=2, measure=tracker, measure_every=4)
    assert list(np.isfinite(tracked.history["lambda_max"])) == [True, False, True, False, True]
    for steps in (0, 4, 8):
        plain = train.train(F, opt, params, batch, num_steps=max(steps, 2), eval_every=max(steps, 2)) if steps else None
        point = params if steps == 0 else plain.params
        expected = curvature.top_eigenvalues(F, point, batch, jax.random.key(0), k=1, num_iters=m)[0]
        np.testing.assert_allclose(tracked.history["lambda_max"][steps // 2], expected, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(tracked.params), jax.tree_util.tree_leaves(plain.params)):
        np.testing.assert_array_equal(a, b)


def test_a_resumed_tracked_run_continues_bit_for_bit(x64):
    params, batch = _problem()
    tracker = measure.top_eigenvalue_tracker(F, k=1, num_iters=20, tol=1e-6)
    whole = train.train(F, optax.sgd(0.05), params, batch, num_steps=8, eval_every=2, measure=tracker)
    half = train.train(F, optax.sgd(0.05), params, batch, num_steps=4, eval_every=2, measure=tracker)
    rest = train.train(F, optax.sgd(0.05), half.state, batch, num_steps=4, eval_every=2, measure=tracker)
    np.testing.assert_array_equal(rest.history["lambda_max"][1:], whole.history["lambda_max"][3:])
    np.testing.assert_array_equal(rest.state.measure.vectors, whole.state.measure.vectors)
    assert np.isnan(rest.history["lambda_max"][0])  # the resumed row reports no measurement


def test_a_tracked_sweep_equals_the_separate_runs_and_compiles_once(x64):
    params, batch = _problem()
    tracker = measure.top_eigenvalue_tracker(F, k=1, num_iters=20, tol=1e-8)
    lrs, seeds = [0.02, 0.05, 0.1], [0, 1]
    swept = train.sweep(F, lambda lr, seed: optax.sgd(lr), params, batch, {"lr": lrs}, seeds, num_steps=4,
                        eval_every=2, measure=tracker)
    for i, lr in enumerate(lrs):
        for j, seed in enumerate(seeds):
            alone = train.train(F, optax.sgd(lr), params, batch, num_steps=4, eval_every=2, key=seed,
                                measure=tracker)
            np.testing.assert_allclose(swept.history["lambda_max"][i, j], alone.history["lambda_max"], rtol=1e-8)
    sparse = train.sweep(F, lambda lr, seed: optax.sgd(lr), params, batch, {"lr": lrs}, seeds, num_steps=4,
                         eval_every=2, measure=tracker, measure_every=4)  # not due at step 2: NaN, not computed
    assert np.isnan(sparse.history["lambda_max"][:, :, 1]).all()
    np.testing.assert_allclose(sparse.history["lambda_max"][:, :, ::2], swept.history["lambda_max"][:, :, ::2],
                               rtol=1e-6)
    objective = sq_objective(mlp_apply)  # a new function: a new compilation
    before = train.loop._chunk_jit._cache_size(), train.loop._measure_jit._cache_size()
    train.train(objective, optax.sgd(0.05), params, batch, num_steps=8, eval_every=2,
                measure=measure.top_eigenvalue_tracker(objective, num_iters=10))
    # five measurements: one compiled chunk and one compiled measurement (not one in the start program and another
    # in the chunk)
    assert (train.loop._chunk_jit._cache_size(), train.loop._measure_jit._cache_size()) == (before[0] + 1, before[1] + 1)


def test_measure_data_is_the_batch_the_tracker_measures_on(x64):
    """With measure_data, lambda_max tracked in the compiled loop (train and sweep) equals top_eigenvalues on that
    batch at the same clean iterate (float64, rtol 1e-6) and differs from the training-data value; training is
    unchanged; a new batch of the same shapes reuses the compiled programs (an argument, not a constant)."""
    import jax.numpy as jnp

    params, batch = _problem()
    other = tuple(map(jnp.asarray, regression_batch(7, 12, 4, 2)))  # another batch, another size
    m = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))
    tracker = measure.top_eigenvalue_tracker(F, k=1, num_iters=m, tol=1e-12)
    opt = optax.sgd(0.05)
    on_other = train.train(F, opt, params, batch, num_steps=4, eval_every=2, measure=tracker, measure_data=other)
    on_train = train.train(F, opt, params, batch, num_steps=4, eval_every=2, measure=tracker)
    swept = train.sweep(F, lambda lr, seed: optax.sgd(lr), params, batch, {"lr": [0.05]}, [0], num_steps=4,
                        eval_every=2, measure=tracker, measure_data=other)
    for row, steps in enumerate((0, 2, 4)):
        point = params if steps == 0 else train.train(F, opt, params, batch, num_steps=steps, eval_every=steps).params
        expected = curvature.top_eigenvalues(F, point, other, jax.random.key(0), k=1, num_iters=m)[0]
        on_batch = curvature.top_eigenvalues(F, point, batch, jax.random.key(0), k=1, num_iters=m)[0]
        np.testing.assert_allclose(on_other.history["lambda_max"][row], expected, rtol=1e-6)
        np.testing.assert_allclose(swept.history["lambda_max"][0, 0, row], expected, rtol=1e-6)
        np.testing.assert_allclose(on_train.history["lambda_max"][row], on_batch, rtol=1e-6)
        assert abs(expected - on_batch) > 1e-3 * abs(on_batch)  # the two batches have different curvature
    np.testing.assert_array_equal(on_other.history["train_loss"], on_train.history["train_loss"])
    before = train.loop._chunk_jit._cache_size(), train.loop._measure_jit._cache_size()
    shifted = jax.tree_util.tree_map(lambda a: a + 1.0, other)
    again = train.train(F, opt, params, batch, num_steps=4, eval_every=2, measure=tracker, measure_data=shifted)
    # new values, same shapes: no recompilation
    assert (train.loop._chunk_jit._cache_size(), train.loop._measure_jit._cache_size()) == before
    assert not np.allclose(again.history["lambda_max"], on_other.history["lambda_max"])


def test_bad_measurements_name_the_argument():
    params, batch = _problem()
    with pytest.raises(ValueError, match="measure_every must be a multiple of eval_every=2"):
        train.train(F, optax.sgd(0.1), params, batch, num_steps=4, eval_every=2,
                    measure=measure.trace_tracker(F), measure_every=3)
    with pytest.raises(TypeError, match="measure must be an \\(init, update\\) pair"):
        train.train(F, optax.sgd(0.1), params, batch, num_steps=4, eval_every=2, measure=lambda p: p)
    with pytest.raises(ValueError, match="measure_every needs a measure"):
        train.train(F, optax.sgd(0.1), params, batch, num_steps=4, eval_every=2, measure_every=2)
    with pytest.raises(ValueError, match="measure_data needs a measure"):
        train.train(F, optax.sgd(0.1), params, batch, num_steps=4, measure_data=batch)
    with pytest.raises(ValueError, match="measure_data needs a measure"):
        train.sweep(F, lambda seed: optax.sgd(0.1), params, batch, {}, [0], num_steps=4, measure_data=batch)
    with pytest.raises(ValueError, match="measure_data must be a pytree of arrays"):
        train.train(F, optax.sgd(0.1), params, batch, num_steps=4, measure=measure.trace_tracker(F), measure_data=())
    with pytest.raises(ValueError, match="measure_data is empty"):
        train.train(F, optax.sgd(0.1), params, batch, num_steps=4, measure=measure.trace_tracker(F),
                    measure_data=(batch[0][:0], batch[1][:0]))


def test_the_trackers_are_reexported_by_lsgeo_train():
    assert train.top_eigenvalue_tracker is measure.top_eigenvalue_tracker
    assert train.trace_tracker is measure.trace_tracker and train.measure is measure


@pytest.mark.parametrize("make", ["eigen", "trace"])
def test_a_tracker_on_microbatches_or_a_source_equals_the_whole_batch(global_x64, make):
    """The tracker's operator on 20 examples cut into microbatches of 6 (three full and a remainder of 2), or
    streamed from a source in batches of 6, gives the whole-batch metrics to rounding (same start vector / probes)."""
    params, batch = mlp_init(0, (4, 5, 2)), regression_batch(1, 20, 4, 2)
    source = lambda: ((batch[0][i:i + 6], batch[1][i:i + 6]) for i in range(0, 20, 6))
    if make == "eigen":
        build = lambda **kw: measure.top_eigenvalue_tracker(F, k=2, num_iters=12, tol=1e-10, **kw)
        names = ["lambda_max_1", "lambda_max_2"]
    else:
        build = lambda **kw: measure.trace_tracker(F, num_probes=8, method="hutch++", key=2, **kw)
        names = ["trace", "trace_stderr"]
    plain, cut = build(), build(microbatch_size=6)
    cut.check(params, batch)
    whole, _ = jax.jit(plain.update)(params, batch, plain.init(params))
    on_microbatches, _ = jax.jit(cut.update)(params, batch, cut.init(params))
    on_source, _ = jax.jit(lambda p, s: plain.update(p, source, s))(params, plain.init(params))
    for name in names:
        np.testing.assert_allclose(on_microbatches[name], whole[name], rtol=1e-9)
        np.testing.assert_allclose(on_source[name], whole[name], rtol=1e-9)


def test_train_measures_on_a_source_and_on_microbatches_as_on_the_batch(global_x64):
    """measure_data a data source (read by the tracker's operator) or a tracker with microbatch_size: the tracked
    lambda_max equals the one tracked on the in-memory batch, in train and in sweep."""
    params, batch = _problem()
    other = tuple(map(np.asarray, regression_batch(7, 12, 4, 2)))
    source = lambda: ((other[0][i:i + 5], other[1][i:i + 5]) for i in range(0, 12, 5))
    opt = optax.sgd(0.05)
    tracker = measure.top_eigenvalue_tracker(F, k=1, num_iters=12, tol=1e-10)
    on_batch = train.train(F, opt, params, batch, num_steps=2, measure=tracker, measure_data=other)
    on_source = train.train(F, opt, params, batch, num_steps=2, measure=tracker, measure_data=source)
    cut = measure.top_eigenvalue_tracker(F, k=1, num_iters=12, tol=1e-10, microbatch_size=5)
    on_microbatches = train.train(F, opt, params, batch, num_steps=2, measure=cut, measure_data=other)
    swept = train.sweep(F, lambda seed: opt, params, batch, {}, [0], num_steps=2, measure=tracker,
                        measure_data=source)
    expected = on_batch.history["lambda_max"]
    np.testing.assert_allclose(on_source.history["lambda_max"], expected, rtol=1e-9)
    np.testing.assert_allclose(on_microbatches.history["lambda_max"], expected, rtol=1e-9)
    np.testing.assert_allclose(swept.history["lambda_max"][0, 0], expected, rtol=1e-9)


def test_a_batch_coupled_objective_with_microbatches_is_refused_before_training():
    """The objective centres the predictions on the batch mean (not a mean over independent examples): with
    microbatches the tracker's value would depend on the cut, so train refuses it naming the remedy."""
    params, batch = _problem()

    def coupled(p, b):
        out = mlp_apply(p, b[0])
        return jax.numpy.mean((out - jax.numpy.mean(out, axis=0) - b[1]) ** 2)

    tracker = measure.top_eigenvalue_tracker(coupled, num_iters=5, microbatch_size=5)
    with pytest.raises(ValueError, match="cannot run on measure_data.*not a mean over independent examples"):
        train.train(F, optax.sgd(0.1), params, batch, num_steps=2, measure=tracker, measure_data=batch)
    with pytest.raises(ValueError, match="cannot run on data .*not a mean over independent examples"):
        train.sweep(F, lambda seed: optax.sgd(0.1), params, batch, {}, [0], num_steps=2, measure=tracker)


def test_trace_tracker_refuses_an_unknown_method_at_construction():
    with pytest.raises(ValueError, match=r"method must be one of \['hutchinson', 'hutch\+\+', 'xtrace'\], got 'xtrce'"):
        measure.trace_tracker(F, method="xtrce")
    with pytest.raises(ValueError, match="num_probes must be >= 3 for method='hutch\\+\\+'"):
        measure.trace_tracker(F, method="hutch++", num_probes=2)


@pytest.mark.parametrize("bad, match", [
    (dict(tol=0.0), "tol must be None or a relative tolerance"), (dict(tol=-1e-3), "tol must be"),
    (dict(name=""), "name must be a non-empty string"), (dict(key="a"), "key must be"),
    (dict(key=-1), "key must be an int seed"), (dict(microbatch_size=0), "microbatch_size must be"),
    (dict(operator=lambda p, b: None, microbatch_size=4), "with operator=, build the operator"),
])
def test_tracker_arguments_outside_their_meaning_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        measure.top_eigenvalue_tracker(F, **bad)


def test_k_larger_than_the_operator_names_k_and_m():
    """k = 3 eigenvalues of a 2-parameter model with num_iters=5: the message names k and m (not the internal
    num_iters=2 of a run capped at m), when updated directly and in train (before training)."""
    import jax.numpy as jnp

    f = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
    w, batch = jnp.ones(2), (jnp.ones((4, 2)), jnp.zeros(4))
    tracker = measure.top_eigenvalue_tracker(f, k=3, num_iters=5)
    with pytest.raises(ValueError, match="k=3 eigenvalues asked of an operator of size m=2"):
        tracker.update(w, batch, tracker.init(w))
    with pytest.raises(ValueError, match="k=3 eigenvalues asked of an operator of size m=2"):
        train.train(f, optax.sgd(0.1), w, batch, num_steps=2, measure=tracker)
    with pytest.raises(ValueError, match="k must be <= num_iters .*got k=6, num_iters=5"):
        measure.top_eigenvalue_tracker(f, k=6, num_iters=5)
