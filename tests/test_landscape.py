"""lsgeo.landscape: filter-normalised directions, slices, paths and Bezier mode connectivity, trajectory PCA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lsgeo
from lsgeo import landscape


def _conv_net_params(dtype=jnp.float32):
    """A flax-layout tree with a conv kernel [h, w, c_in, c_out], BatchNorm leaves and a Dense kernel [d_in, d_out]."""
    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    return {
        "Conv_0": {"kernel": arr(3, 3, 2, 4), "bias": arr(4)},
        "BatchNorm_0": {"scale": arr(4), "bias": arr(4)},
        "Dense_0": {"kernel": arr(6, 5), "bias": arr(5)},
    }


def _filter_norms(x):
    return np.sqrt(np.sum(np.square(np.asarray(x)), axis=tuple(range(x.ndim - 1))))


def test_filter_normalisation_matches_weight_filter_norms():
    params = _conv_net_params()
    d = landscape.random_direction(params, jax.random.PRNGKey(0))
    for layer in ("Conv_0", "Dense_0"):
        w, v = params[layer]["kernel"], d[layer]["kernel"]
        assert _filter_norms(w).shape == (w.shape[-1],)  # one norm per output channel / neuron
        np.testing.assert_allclose(_filter_norms(v), _filter_norms(w), rtol=1e-5)
        assert not np.allclose(v, w) and not np.allclose(v, -w)  # random, not a copy of the weights
    # 1-D leaves (biases, BatchNorm scale/bias) do not move (Li et al.'s ignore='biasbn')
    for leaf in (d["Conv_0"]["bias"], d["BatchNorm_0"]["scale"], d["BatchNorm_0"]["bias"], d["Dense_0"]["bias"]):
        np.testing.assert_array_equal(leaf, 0.0)
    kept = landscape.random_direction(params, jax.random.PRNGKey(0), ignore_1d=False)
    np.testing.assert_array_equal(kept["BatchNorm_0"]["scale"], params["BatchNorm_0"]["scale"])

    layer = landscape.random_direction(params, jax.random.PRNGKey(1), normalization="layer")
    for name in ("Conv_0", "Dense_0"):
        np.testing.assert_allclose(
            np.linalg.norm(layer[name]["kernel"]), np.linalg.norm(params[name]["kernel"]), rtol=1e-5
        )
    raw = landscape.random_direction(params, jax.random.PRNGKey(1), normalization=None)
    assert all(np.all(np.asarray(x) != 0) for x in jax.tree_util.tree_leaves(raw))


def quartic(params, batch):
    """A small nonconvex objective of a flax-like tree: mean over the batch of ((x.w + v)^2 - y)^2."""
    x, y = batch
    z = x @ params["Dense_0"]["kernel"][:, 0] + jnp.sum(params["Dense_0"]["bias"])
    return jnp.mean((z**2 - y) ** 2) + 0.1 * jnp.sum(params["Conv_0"]["kernel"] ** 2)


def _slice_problem():
    params = _conv_net_params(jnp.float32)
    rng = np.random.default_rng(1)
    batch = (jnp.asarray(rng.normal(size=(7, 6)), jnp.float32), jnp.asarray(rng.normal(size=(7,)), jnp.float32))
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    return params, batch, landscape.random_direction(params, k1), landscape.random_direction(params, k2)


def test_slices_equal_python_loops():
    params, batch, d1, d2 = _slice_problem()
    at = lambda a, b: jax.tree_util.tree_map(lambda w, u, v: w + a * u + b * v, params, d1, d2)  # noqa: E731
    alphas = jnp.linspace(-1.0, 1.0, 5)
    betas = jnp.linspace(-0.5, 0.5, 3)
    f = jax.jit(quartic)

    got = landscape.slice_2d(quartic, params, batch, d1, d2, alphas, betas, points_per_pass=4)  # 15 points, chunks of 4
    expected = np.array([[f(at(a, b), batch) for b in betas] for a in alphas])
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    got_1d = landscape.slice_1d(quartic, params, batch, d1, alphas, points_per_pass=2)
    np.testing.assert_allclose(got_1d, [f(at(a, 0.0), batch) for a in alphas], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_1d, got[:, 1], rtol=1e-5, atol=1e-6)  # beta = 0 column


def test_interpolate_and_bezier_pass_through_end_points():
    rng = np.random.default_rng(2)
    params_a, params_b, bend = (
        {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
         "bias": jnp.asarray(rng.normal(size=2), jnp.float32)}
        for _ in range(3)
    )

    def same(x, y):
        jax.tree_util.tree_map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-6), x, y)

    same(landscape.interpolate(params_a, params_b, 0.0), params_a)
    same(landscape.interpolate(params_a, params_b, 1.0), params_b)
    same(landscape.bezier(params_a, bend, params_b, 0.0), params_a)
    same(landscape.bezier(params_a, bend, params_b, 1.0), params_b)
    mid = jax.tree_util.tree_map(lambda a, m, b: (a + 2 * m + b) / 4, params_a, bend, params_b)
    same(landscape.bezier(params_a, bend, params_b, 0.5), mid)
    # a bend at the segment's midpoint gives the straight line, at the same t
    midpoint = landscape.interpolate(params_a, params_b, 0.5)
    same(landscape.bezier(params_a, midpoint, params_b, 0.3), landscape.interpolate(params_a, params_b, 0.3))
    # vmap over t
    many = jax.vmap(lambda t: landscape.bezier(params_a, bend, params_b, t))(jnp.asarray([0.0, 1.0]))
    np.testing.assert_allclose(many["kernel"][1], params_b["kernel"], atol=1e-6)


def ring(params, batch):
    """(|w|^2 - r^2)^2 + c x^2 y^2: isolated minima at (+-r, 0) and (0, +-r); the straight line between
    (-r, 0) and (r, 0) crosses the barrier at the origin (height r^4), the arc only c r^4 / 4."""
    radius, c = batch
    x, y = params["w"][0], params["w"][1]
    return (x**2 + y**2 - radius**2) ** 2 + c * x**2 * y**2


def test_fit_bezier_finds_a_low_path_around_the_barrier():
    batch = (jnp.asarray(1.0), jnp.asarray(0.2))
    a, b = {"w": jnp.asarray([-1.0, 0.0])}, {"w": jnp.asarray([1.0, 0.0])}
    line = landscape.barrier_height(ring, a, b, batch, num_points=41)
    np.testing.assert_allclose(line, 1.0, atol=1e-5)  # f(0) - max(f(a), f(b)) = 1
    # the straight line is a symmetric critical point of the objective: start from a slightly bent curve
    init = {"w": jnp.asarray([0.0, 0.05])}
    bend, losses = landscape.fit_bezier(
        ring, a, b, batch, jax.random.PRNGKey(0), optimizer=optax.adam(0.05), num_steps=300, init_bend=init, num_t=8
    )
    assert losses.shape == (300,)
    assert float(jnp.mean(losses[-20:])) < 0.2 * float(losses[0])
    curved = landscape.barrier_height(ring, a, b, batch, bend=bend, num_points=41)
    assert 0.0 <= float(curved) < 0.25 * float(line), (curved, line)
    path = landscape.path_losses(ring, a, b, batch, jnp.linspace(0, 1, 11), bend=bend)
    np.testing.assert_allclose(np.asarray(path)[[0, -1]], 0.0, atol=1e-6)  # the curve still ends at the two minima


def test_barrier_height_references():
    def f(params, batch):
        return batch * params["w"][0] ** 2

    a, b = {"w": jnp.asarray([1.0])}, {"w": jnp.asarray([3.0])}
    batch = jnp.asarray(1.0)
    # along the line f(t) = (1 + 2t)^2 is convex: no barrier against max, none against the chord
    np.testing.assert_allclose(landscape.barrier_height(f, a, b, batch, num_points=5), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        landscape.barrier_height(f, a, b, batch, num_points=5, reference="linear"), 0.0, atol=1e-6
    )
    # a bend below the line: the curve dips; a bend far above: a barrier of known height
    bend = {"w": jnp.asarray([-6.0])}  # w(t) = (1-t)^2 - 12 t (1-t) + 3 t^2, min at t = 1/2: -2.25
    np.testing.assert_allclose(landscape.barrier_height(f, a, b, batch, bend=bend, num_points=3), 0.0, atol=1e-6)
    high = {"w": jnp.asarray([10.0])}  # w(1/2) = (1 + 20 + 3) / 4 = 6
    np.testing.assert_allclose(landscape.barrier_height(f, a, b, batch, bend=high, num_points=3), 36.0 - 9.0)
    np.testing.assert_allclose(
        landscape.barrier_height(f, a, b, batch, bend=high, num_points=3, reference="linear"), 36.0 - 5.0
    )


def test_trajectory_pca_recovers_the_plane_of_a_planar_trajectory(x64):
    rng = np.random.default_rng(3)
    final = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 3))), "bias": jnp.asarray(rng.normal(size=3))}}
    m = 15
    basis, _ = np.linalg.qr(rng.normal(size=(m, 2)))  # orthonormal u, v
    t = np.linspace(0, 1, 30)
    coef = np.stack([3.0 * (1 - t) * np.cos(4 * t), (1 - t) * np.sin(4 * t)], 1)  # spirals into the final point
    flat_final = np.concatenate([np.asarray(final["Dense_0"]["bias"]), np.asarray(final["Dense_0"]["kernel"]).ravel()])
    flat = flat_final + coef @ basis.T  # [T, m], flattening order: bias, kernel
    snapshots = {"Dense_0": {"bias": jnp.asarray(flat[:, :3]), "kernel": jnp.asarray(flat[:, 3:].reshape(30, 4, 3))}}

    out = landscape.trajectory_pca(snapshots, final)
    dirs = np.concatenate([np.asarray(out.directions["Dense_0"]["bias"]),
                           np.asarray(out.directions["Dense_0"]["kernel"]).reshape(2, -1)], 1)
    np.testing.assert_allclose(dirs @ dirs.T, np.eye(2), atol=1e-10)  # orthonormal
    np.testing.assert_allclose(basis @ (basis.T @ dirs.T), dirs.T, atol=1e-10)  # inside the plane
    np.testing.assert_allclose(np.sum(out.explained_variance_ratio), 1.0, atol=1e-10)
    assert out.explained_variance_ratio[0] >= out.explained_variance_ratio[1] > 0.01
    np.testing.assert_allclose(out.coords @ dirs, flat - flat_final, atol=1e-10)  # coordinates reconstruct
    assert np.all(np.asarray(out.coords[0]) <= 0)  # sign convention
    uncentred = landscape.trajectory_pca(snapshots, final, center=False)
    np.testing.assert_allclose(np.sum(uncentred.explained_variance_ratio), 1.0, atol=1e-10)


def test_bad_input_raises_value_error_naming_the_argument():
    params, batch, d1, d2 = _slice_problem()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="normalization"):
        landscape.random_direction(params, key, normalization="filters")
    bad = dict(d1, Dense_0={"kernel": jnp.zeros((5, 6)), "bias": jnp.zeros(5)})
    with pytest.raises(ValueError, match="direction"):
        landscape.slice_1d(quartic, params, batch, bad, jnp.zeros(3))
    with pytest.raises(ValueError, match="d2"):
        landscape.slice_2d(quartic, params, batch, d1, {"Dense_0": d2["Dense_0"]}, jnp.zeros(2), jnp.zeros(2))
    with pytest.raises(ValueError, match="alphas"):
        landscape.slice_1d(quartic, params, batch, d1, jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="points_per_pass"):
        landscape.slice_1d(quartic, params, batch, d1, jnp.zeros(3), points_per_pass=0)
    with pytest.raises(ValueError, match="params_b"):
        landscape.interpolate(params, {"a": jnp.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="bend"):
        landscape.bezier(params, {"a": jnp.zeros(1)}, params, 0.5)
    with pytest.raises(ValueError, match="reference"):
        landscape.barrier_height(quartic, params, params, batch, reference="chord")
    with pytest.raises(ValueError, match="num_steps"):
        landscape.fit_bezier(quartic, params, params, batch, key, optimizer=optax.sgd(0.1), num_steps=0)
    with pytest.raises(ValueError, match="snapshots"):
        landscape.trajectory_pca(params, params)


def test_microbatched_slices_and_paths_equal_single_batch():
    """7 examples in microbatches of 3 (the last uneven): every evaluation is the data-set mean."""
    params, batch, d1, d2 = _slice_problem()
    alphas = jnp.linspace(-1.0, 1.0, 4)
    one, many = lsgeo.Objective(quartic, batch), lsgeo.Objective(quartic, batch, microbatch_size=3)
    checks = [
        lambda f: landscape.slice_1d(f, params, None, d1, alphas),
        lambda f: landscape.slice_2d(f, params, None, d1, d2, alphas[:2], alphas),
        lambda f: landscape.path_losses(f, params, landscape.interpolate(params, d1, 1.0), None, alphas, bend=d2),
        lambda f: landscape.barrier_height(f, params, d1, None, num_points=5),
    ]
    for fn in checks:
        np.testing.assert_allclose(fn(many), fn(one), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(landscape.slice_1d(quartic, params, batch, d1, alphas, microbatch_size=3),  # positional
                               landscape.slice_1d(one, params, None, d1, alphas), rtol=1e-5, atol=1e-6)
    fit = functools.partial(landscape.fit_bezier, params_a=params, params_b=d1, batch=None, key=jax.random.PRNGKey(0),
                            optimizer=optax.sgd(0.01), num_steps=3, num_t=2)
    (bend_one, losses_one), (bend_many, losses_many) = fit(one), fit(many)
    np.testing.assert_allclose(losses_many, losses_one, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(bend_many), jax.tree_util.tree_leaves(bend_one)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda p, b, d: landscape.slice_1d(None, p, b, d, jnp.zeros(2)), TypeError, "f must be a callable"),
        (lambda p, b, d: landscape.slice_1d(quartic, p, (b[0][:0], b[1][:0]), d, jnp.zeros(2)), ValueError,
         "batch is empty"),
        (lambda p, b, d: landscape.path_losses(quartic, jax.tree_util.tree_map(jnp.int32, p), p, b, jnp.zeros(2)),
         ValueError, "params_a leaf .* dtype int32"),
        (lambda p, b, d: landscape.slice_2d(quartic, p, b, d, d, jnp.zeros(2), jnp.zeros(2), microbatch_size=True),
         ValueError, "microbatch_size must be a positive integer"),
        (lambda p, b, d: landscape.random_direction(jax.tree_util.tree_map(jnp.int32, p), jax.random.PRNGKey(0)),
         ValueError, "parameters must be floating point"),
    ],
)
def test_more_bad_input_names_the_argument(call, error, message):
    params, batch, d1, _ = _slice_problem()
    with pytest.raises(error, match=message):
        call(params, batch, d1)
