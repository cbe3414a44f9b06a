"""lsgeo.sharpness: epsilon/average/adaptive sharpness, volume flatness and Dinh et al.'s alpha-scaling."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import lsgeo
from lsgeo import sharpness
from lsgeo.losses import squared_loss

# ----------------------------------------------------------------------------------------------
# Fixtures: a two-parameter quadratic and a tiny ReLU MLP (data always passed as `batch`)


def quadratic(params, batch):
    """f(w) = 1/2 (w - c)^T A (w - c); batch = (A, c)."""
    a, c = batch
    r = params["w"] - c
    return 0.5 * r @ a @ r


def _quadratic_batch(dtype=jnp.float64):
    rot = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    a = rot @ np.diag([4.0, 1.0]) @ rot.T
    return jnp.asarray(a, dtype), jnp.asarray([0.2, -0.1], dtype)


def _brute_force_rise(w, batch, rho, norm):
    """max over a fine grid of the rho-ball (l2: polar grid over the disc; linf: the square) of f(w + d) - f(w)."""
    a, c = (np.asarray(b) for b in batch)
    if norm == "l2":
        r, th = np.meshgrid(np.linspace(0, rho, 401), np.linspace(0, 2 * np.pi, 4001), indexing="ij")
        d = np.stack([r * np.cos(th), r * np.sin(th)], -1).reshape(-1, 2)
    else:
        g = np.linspace(-rho, rho, 801)
        d = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    res = np.asarray(w) + d - c
    vals = 0.5 * np.einsum("ni,ij,nj->n", res, a, res)
    r0 = np.asarray(w) - c
    base = 0.5 * r0 @ a @ r0
    return vals.max() - base, base


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(5)(x))
        x = nn.relu(nn.Dense(4)(x))
        return nn.Dense(1)(x)[:, 0]


@functools.lru_cache(maxsize=None)
def _mlp_problem():
    """A 3 -> 5 -> 4 -> 1 ReLU MLP in flax's parameter layout, float64 (call under the x64 fixture).
    Cached so that every test shares the same `f` object and hence the compiled programs."""
    model = MLP()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(12, 3)))
    y = jnp.asarray(rng.normal(size=(12,)))
    sizes = [3, 5, 4, 1]
    params = {
        f"Dense_{k}": {
            "kernel": jnp.asarray(rng.normal(size=(sizes[k], sizes[k + 1])) / np.sqrt(sizes[k])),
            "bias": jnp.asarray(0.1 * rng.normal(size=(sizes[k + 1],))),
        }
        for k in range(3)
    }
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])["params"]
    )

    @jax.jit
    def predict(p, inputs):
        return model.apply({"params": p}, inputs)

    def f(p, batch):
        inputs, targets = batch
        return squared_loss(predict(p, inputs), targets)

    return predict, f, params, (x, y)


# ----------------------------------------------------------------------------------------------
# alpha_scale (Dinh et al. 2017)


def _group_mask(params, names):
    """Flat boolean mask of the entries of `params` whose leaf path is in `names` ({(group, leaf), ...})."""
    marks = {g: {k: jnp.full(v.shape, (g, k) in names, bool) for k, v in layer.items()} for g, layer in params.items()}
    return np.asarray(ravel_pytree(marks)[0])


def test_alpha_scale_keeps_function_and_scales_hessian_blocks(x64):
    predict, f, params, batch = _mlp_problem()
    alpha = 3.0
    scaled = sharpness.alpha_scale(params, 0, 1, alpha)

    # the network function is unchanged, while the parameters moved far
    np.testing.assert_allclose(predict(scaled, batch[0]), predict(params, batch[0]), rtol=1e-13, atol=1e-13)
    assert not np.allclose(scaled["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
    # exactly which leaves were scaled
    np.testing.assert_allclose(scaled["Dense_0"]["kernel"], alpha * params["Dense_0"]["kernel"])
    np.testing.assert_allclose(scaled["Dense_0"]["bias"], alpha * params["Dense_0"]["bias"])
    np.testing.assert_allclose(scaled["Dense_1"]["kernel"], params["Dense_1"]["kernel"] / alpha)
    np.testing.assert_array_equal(scaled["Dense_1"]["bias"], params["Dense_1"]["bias"])
    np.testing.assert_array_equal(scaled["Dense_2"]["kernel"], params["Dense_2"]["kernel"])

    flat, unravel = ravel_pytree(params)
    flat_scaled, _ = ravel_pytree(scaled)
    hess = jax.jit(jax.hessian(lambda v, b: f(unravel(v), b)))
    h0 = np.asarray(hess(flat, batch))
    h1 = np.asarray(hess(flat_scaled, batch))

    layer_i = _group_mask(params, {("Dense_0", "kernel"), ("Dense_0", "bias")})
    layer_j = _group_mask(params, {("Dense_1", "kernel")})
    block = lambda h, m: h[np.ix_(m, m)]  # noqa: E731
    assert np.abs(block(h0, layer_i)).max() > 1e-3 and np.abs(block(h0, layer_j)).max() > 1e-3
    np.testing.assert_allclose(block(h1, layer_i), block(h0, layer_i) / alpha**2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(block(h1, layer_j), block(h0, layer_j) * alpha**2, rtol=1e-9, atol=1e-12)
    # the whole Hessian transforms as D^-1 H D^-1 (Dinh et al., Section 4)
    d = np.where(layer_i, alpha, np.where(layer_j, 1.0 / alpha, 1.0))
    np.testing.assert_allclose(h1, h0 / np.outer(d, d), rtol=1e-9, atol=1e-12)


def test_alpha_scale_by_name_and_bad_arguments():
    params = {
        "Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "Dense_1": {"kernel": jnp.ones((3, 1)), "bias": jnp.ones(1)},
    }
    by_name = sharpness.alpha_scale(params, "Dense_0", "Dense_1", 2.0)
    by_index = sharpness.alpha_scale(params, 0, -1, 2.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, by_name, by_index)
    with pytest.raises(ValueError, match="alpha"):
        sharpness.alpha_scale(params, 0, 1, -1.0)
    with pytest.raises(ValueError, match="alpha"):
        sharpness.alpha_scale(params, 0, 1, 0.0)
    with pytest.raises(ValueError, match="i and j"):
        sharpness.alpha_scale(params, 1, "Dense_1", 2.0)
    with pytest.raises(ValueError, match="j must"):
        sharpness.alpha_scale(params, 0, 5, 2.0)
    with pytest.raises(ValueError, match="i must"):
        sharpness.alpha_scale(params, "Conv_0", 1, 2.0)


# ----------------------------------------------------------------------------------------------
# epsilon-sharpness vs brute force, vs average sharpness


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_epsilon_sharpness_matches_brute_force_on_quadratic(x64, norm):
    batch = _quadratic_batch()
    w = {"w": jnp.asarray([0.5, 0.3])}
    rho = 0.4
    brute, base = _brute_force_rise(w["w"], batch, rho, norm)
    # gradient start (no key) away from the minimum, random start at the minimum
    got = sharpness.epsilon_sharpness(quadratic, w, batch, rho, steps=20, norm=norm)
    np.testing.assert_allclose(got, brute / (1 + base), rtol=1e-3)
    got_abs = sharpness.epsilon_sharpness(quadratic, w, batch, rho, steps=20, norm=norm, relative=False)
    np.testing.assert_allclose(got_abs, brute, rtol=1e-3)

    w_min = {"w": batch[1]}
    brute_min, _ = _brute_force_rise(w_min["w"], batch, rho, norm)
    got_min = sharpness.epsilon_sharpness(quadratic, w_min, batch, rho, key=jax.random.PRNGKey(1), steps=20, norm=norm)
    np.testing.assert_allclose(got_min, brute_min, rtol=1e-3)


def test_epsilon_sharpness_dominates_average_sharpness(x64):
    """The sup over the ball is >= the mean over a Gaussian that (98.9%) lies inside it, and >= f at every
    point of the ball; the average itself is the closed form sigma^2 tr(A) / 2 of a quadratic."""
    batch = _quadratic_batch()
    w = {"w": batch[1]}  # the minimum, f(w) = 0
    rho = 0.3
    sigma = rho / 3.0  # P(||sigma eps|| > rho) = exp(-4.5) ~ 1.1% in 2-D
    sup = sharpness.epsilon_sharpness(quadratic, w, batch, rho, key=jax.random.PRNGKey(0), steps=20, relative=False)
    avg = sharpness.average_sharpness(
        quadratic, w, batch, sigma, jax.random.PRNGKey(2), num_samples=512, draws_per_pass=128
    )
    np.testing.assert_allclose(sup, 0.5 * rho**2 * 4.0, rtol=1e-4)  # rho^2 lambda_max / 2
    np.testing.assert_allclose(avg, 0.5 * sigma**2 * 5.0, rtol=0.15)  # sigma^2 tr(A) / 2
    assert sup >= avg
    # every Gaussian perturbation, projected into the ball, stays below the sup
    eps = sigma * jax.random.normal(jax.random.PRNGKey(3), (512, 2))
    eps = eps * jnp.minimum(1.0, rho / jnp.linalg.norm(eps, axis=1, keepdims=True))
    vals = jax.vmap(lambda e: quadratic({"w": w["w"] + e}, batch))(eps)
    assert float(jnp.max(vals)) <= float(sup) + 1e-12


def test_sharpness_is_jit_and_vmap_compatible(x64):
    batch = _quadratic_batch()
    w = {"w": batch[1] + 0.1}
    rhos = jnp.asarray([0.0, 0.1, 0.2, 0.4])
    fn = jax.jit(jax.vmap(lambda r, b: sharpness.epsilon_sharpness(quadratic, w, b, r, steps=5), in_axes=(0, None)))
    values = np.asarray(fn(rhos, batch))
    assert values[0] == 0.0 and np.all(np.diff(values) > 0)


def test_adaptive_sharpness_invariant_under_alpha_scale_while_epsilon_sharpness_changes(x64):
    _, f, params, batch = _mlp_problem()
    scaled = sharpness.alpha_scale(params, 0, 1, 5.0)
    key = jax.random.PRNGKey(4)
    rho = 0.05

    adaptive = lambda p: sharpness.adaptive_sharpness(f, p, batch, rho, key=key, steps=5)  # noqa: E731
    eps_sharp = lambda p: sharpness.epsilon_sharpness(f, p, batch, rho, key=key, steps=5)  # noqa: E731
    a0, a1 = adaptive(params), adaptive(scaled)
    e0, e1 = eps_sharp(params), eps_sharp(scaled)
    assert a0 > 1e-4
    np.testing.assert_allclose(a1, a0, rtol=1e-9)
    assert abs(float(e1) / float(e0) - 1.0) > 0.5, (e0, e1)


# ----------------------------------------------------------------------------------------------
# volume flatness


def isotropic(params, batch):
    (lam,) = batch
    return 0.5 * lam * jnp.sum(params["w"] ** 2) + 0.0 * jnp.sum(params["b"])


def test_volume_flatness_radius_of_isotropic_quadratic(x64):
    lam, epsilon = 2.0, 0.09
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    out = sharpness.volume_flatness(
        isotropic, params, (jnp.asarray(lam),), epsilon, jax.random.PRNGKey(0),
        num_directions=6, max_radius=1.0, iters=30,
    )
    # along a unit direction d with a share s = ||d_w||^2 on w: r = sqrt(2 eps / (lam s)) (capped at 1)
    assert out.radii.shape == (6,)
    assert np.all(out.radii >= np.sqrt(2 * epsilon / lam) - 1e-8) and np.all(out.radii <= 1.0)
    np.testing.assert_allclose(out.mean_radius, np.mean(out.radii))
    m = 4
    log_vm = 0.5 * m * np.log(np.pi) - np.log(2.0)  # Gamma(3) = 2
    np.testing.assert_allclose(out.log_volume, log_vm + np.log(np.mean(np.asarray(out.radii) ** m)), rtol=1e-8)

    only_w = {"w": jnp.zeros(4), "b": jnp.zeros((0,))}
    out = sharpness.volume_flatness(
        isotropic, only_w, (jnp.asarray(lam),), epsilon, jax.random.PRNGKey(1), num_directions=5, iters=30
    )
    np.testing.assert_allclose(out.radii, np.sqrt(2 * epsilon / lam), rtol=1e-7)
    capped = sharpness.volume_flatness(
        isotropic, only_w, (jnp.asarray(lam),), 10.0, jax.random.PRNGKey(1), num_directions=5, max_radius=0.5, iters=30
    )
    np.testing.assert_allclose(capped.radii, 0.5)


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_value_error_naming_the_argument():
    batch = _quadratic_batch(jnp.float32)
    w = {"w": jnp.zeros(2)}
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="rho"):
        sharpness.epsilon_sharpness(quadratic, w, batch, -0.1)
    with pytest.raises(ValueError, match="norm"):
        sharpness.epsilon_sharpness(quadratic, w, batch, 0.1, norm="l1")
    with pytest.raises(ValueError, match="steps"):
        sharpness.epsilon_sharpness(quadratic, w, batch, 0.1, steps=-1)
    with pytest.raises(ValueError, match="rho"):
        sharpness.adaptive_sharpness(quadratic, w, batch, -1.0)
    with pytest.raises(ValueError, match="eta"):
        sharpness.adaptive_sharpness(quadratic, w, batch, 0.1, eta=-0.01)
    with pytest.raises(ValueError, match="sigma"):
        sharpness.average_sharpness(quadratic, w, batch, -0.1, key)
    with pytest.raises(ValueError, match="num_samples"):
        sharpness.average_sharpness(quadratic, w, batch, 0.1, key, num_samples=0)
    with pytest.raises(ValueError, match="epsilon"):
        sharpness.volume_flatness(quadratic, w, batch, -1.0, key)
    with pytest.raises(ValueError, match="max_radius"):
        sharpness.volume_flatness(quadratic, w, batch, 0.1, key, max_radius=0.0)


def test_microbatched_measures_equal_single_batch(x64):
    """With microbatch_size the objective is the data-set mean by microbatches (12 examples in microbatches
    of 5: the last uneven), its gradient from the per-microbatch gradients: the same numbers."""
    _, f, params, batch = _mlp_problem()
    key = jax.random.PRNGKey(3)
    for fn, args, kwargs in [
        (sharpness.epsilon_sharpness, (0.05,), {"key": key, "steps": 3}),  # values and gradients
        (sharpness.average_sharpness, (0.1, key), {"num_samples": 4}),  # values under lax.map
    ]:
        one = fn(f, params, batch, *args, **kwargs)
        np.testing.assert_allclose(fn(f, params, batch, *args, **kwargs, microbatch_size=5), one, rtol=1e-10)
    many = lsgeo.Objective(f, batch, microbatch_size=5)  # the measures outside DESIGN section 3 take the objective
    np.testing.assert_allclose(sharpness.adaptive_sharpness(many, params, None, 0.05, key=key, steps=3),
                               sharpness.adaptive_sharpness(f, params, batch, 0.05, key=key, steps=3), rtol=1e-10)


BAD_INPUTS = [
    (lambda w, b, k: sharpness.epsilon_sharpness("f", w, b, 0.1), TypeError, "f must be a callable"),
    (lambda w, b, k: sharpness.average_sharpness(quadratic, {"w": jnp.zeros(2, jnp.int32)}, b, 0.1, k), ValueError,
     "parameters must be floating point"),
    (lambda w, b, k: sharpness.adaptive_sharpness(quadratic, w, (jnp.zeros((0, 2)), b[1]), 0.1), ValueError,
     "batch is empty"),
    (lambda w, b, k: sharpness.volume_flatness(quadratic, w, b, 0.1, k, directions_per_pass=0), ValueError, "directions_per_pass"),
    (lambda w, b, k: sharpness.epsilon_sharpness(quadratic, w, b, 0.1, microbatch_size=0), ValueError,
     "microbatch_size must be a positive integer"),
    (lambda w, b, k: sharpness.epsilon_sharpness(quadratic, w, (b[0], b[1][:1]), 0.1, microbatch_size=1), ValueError,
     "batch leaves must share a leading example axis"),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_more_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call({"w": jnp.zeros(2)}, _quadratic_batch(jnp.float32), jax.random.PRNGKey(0))
