"""lsgeo.sharpness against closed forms on a quadratic f(w) = 1/2 (w - c)^T A (w - c) (issue 22).

At the minimum w = c every maximum over a ball is an eigenvalue problem:
  epsilon-sharpness (l2, absolute)        max_{||d|| <= rho} d^T A d / 2          = rho^2 lambda_max(A) / 2
  adaptive sharpness (l2, Kwon et al.)    max_{||u|| <= rho} u^T T A T u / 2       = rho^2 lambda_max(T A T) / 2
  adaptive sharpness (linf, 2-D)          max over the box's corners s rho       = rho^2 (M11 + M22 + 2 |M12|) / 2
with T = diag(|w| + eta), M = T A T; and the average sharpness is sigma^2 tr(A) / 2 with variance
sigma^4 ||A||_F^2 / 2 per draw (Gaussian quadratic form)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsgeo import sharpness


def quadratic(params, batch):
    a, c = batch
    r = params["w"] - c
    return 0.5 * r @ a @ r


def _batch():
    rot = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    return rot @ np.diag([4.0, 1.0]) @ rot.T, np.array([0.2, -0.1])


@pytest.mark.parametrize("eta", [0.0, 0.05, 0.3])
def test_adaptive_sharpness_with_eta_matches_closed_form(x64, eta):
    """(Planted: T = |w + eta| instead of |w| + eta; it passed the old tests, which use eta = 0 only.)"""
    a, c = _batch()
    w = {"w": c}  # the minimum: f(w) = 0, zero gradient (random start)
    rho = 0.5
    t = np.abs(c) + eta
    mmat = t[:, None] * a * t[None, :]
    l2 = sharpness.adaptive_sharpness(quadratic, w, (a, c), rho, key=jax.random.key(0), steps=30, eta=eta)
    np.testing.assert_allclose(l2, rho**2 * np.linalg.eigvalsh(mmat)[-1] / 2, rtol=1e-8)
    linf = sharpness.adaptive_sharpness(quadratic, w, (a, c), rho, key=jax.random.key(0), steps=30, eta=eta,
                                        norm="linf")
    np.testing.assert_allclose(linf, rho**2 * (mmat[0, 0] + mmat[1, 1] + 2 * abs(mmat[0, 1])) / 2, rtol=1e-8)
    relative = sharpness.adaptive_sharpness(quadratic, {"w": c + np.array([0.0, 1e-3])}, (a, c), rho,
                                            key=jax.random.key(0), steps=30, eta=eta, relative=True)
    base = 0.5 * a[1, 1] * 1e-6
    assert abs(float(relative) * (1 + base) - float(l2)) < 0.02 * float(l2)  # / (1 + f(w)), near the same value


def test_sharpness_under_jit_and_vmap_matches_closed_forms(x64):
    """Vmapped over rho / sigma inside jit: epsilon-sharpness = rho^2 lambda_max / 2 (absolute) and
    / (1 + f(w)) = itself at the minimum; the average sharpness within 4 s.e. of sigma^2 tr(A) / 2
    (the s.e. from the exact variance, summed over the vmapped sigmas' independent estimates).
    (Planted: the relative denominator 1 + f(w + delta) instead of 1 + f(w); uniform instead of Gaussian
    noise in the average sharpness. The old test checked only that the values increase with rho.)"""
    a, c = _batch()
    w = {"w": c}
    lam = np.linalg.eigvalsh(a)[-1]
    rhos = np.array([0.05, 0.1, 0.2, 0.4])

    @jax.jit
    def eps(rhos, batch):
        return jax.vmap(lambda r, k: (
            sharpness.epsilon_sharpness(quadratic, w, batch, r, key=k, steps=30, relative=False),
            sharpness.epsilon_sharpness(quadratic, w, batch, r, key=k, steps=30),
        ))(rhos, jax.random.split(jax.random.key(1), len(rhos)))

    absolute, relative = eps(rhos, (a, c))
    np.testing.assert_allclose(absolute, rhos**2 * lam / 2, rtol=1e-8)
    np.testing.assert_allclose(relative, rhos**2 * lam / 2, rtol=1e-8)  # f(w) = 0
    # off the minimum: relative = absolute / (1 + f(w))
    w_off = {"w": c + np.array([0.3, 0.2])}
    f_off = float(quadratic(w_off, (a, c)))
    pair = jax.jit(jax.vmap(lambda r: (
        sharpness.epsilon_sharpness(quadratic, w_off, (a, c), r, steps=30, relative=False),
        sharpness.epsilon_sharpness(quadratic, w_off, (a, c), r, steps=30),
    )))(rhos)
    np.testing.assert_allclose(pair[1], pair[0] / (1 + f_off), rtol=1e-10)

    sigmas, num_samples = np.array([0.05, 0.1, 0.2]), 4000
    avg = jax.jit(jax.vmap(lambda s, k: sharpness.average_sharpness(quadratic, w, (a, c), s, k,
                                                                    num_samples=num_samples, draws_per_pass=500)))(
        sigmas, jax.random.split(jax.random.key(2), len(sigmas)))
    expected = sigmas**2 * np.trace(a) / 2
    se = np.sqrt(sigmas**4 * np.sum(a**2) / 2 / num_samples)
    np.testing.assert_array_less(np.abs(np.asarray(avg) - expected), 4 * se)
    assert np.all(4 * se < 0.1 * expected)


def test_volume_flatness_radius_within_the_documented_bisection_precision(x64):
    """f = lam/2 ||w||^2 at w = 0: every unit direction leaves {f <= eps} at r = sqrt(2 eps / lam) = 0.35. With
    num_grid cells of width max_radius / num_grid and ``iters`` bisections the radius is the lower end of a
    bracket of width (max_radius / num_grid) / 2^iters that contains 0.35. (Mutant: one bisection fewer.)"""
    lam, r_true = 2.0, 0.35
    params = {"w": np.zeros(4)}
    for num_grid, iters in [(2, 3), (4, 5), (1, 8)]:
        out = sharpness.volume_flatness(lambda p, b: 0.5 * b * jnp.sum(p["w"] ** 2), params, lam, lam * r_true**2 / 2,
                                        jax.random.key(0), num_directions=3, num_grid=num_grid, iters=iters)
        width = 1.0 / num_grid / 2**iters
        assert np.all(out.radii <= r_true + 1e-12) and np.all(out.radii > r_true - width), (out.radii, width)


class Block(nn.Module):
    """A Dense layer one module down, so that the leaf paths are ("Block_0", "Dense_0", "kernel" | "bias")."""

    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, param_dtype=jnp.float64)(x)


class _NestedReLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(Block(5)(x))
        x = nn.relu(Block(4)(x))
        return Block(1)(x)


def _relu_nnx():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 5, param_dtype=jnp.float64, rngs=rngs)
            self.l2 = nnx.Linear(5, 4, param_dtype=jnp.float64, rngs=rngs)
            self.l3 = nnx.Linear(4, 1, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    state = jax.tree_util.tree_map(lambda a: a + 0.3, state)  # nonzero biases
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def test_alpha_scale_keeps_a_nested_linen_relu_network_function(x64):
    """Leaf paths three keys deep: layer j's bias (last key "bias") stays, its kernel is divided by alpha.
    (Mutant: the bias test reading path[1] instead of path[-1].)"""
    model = _NestedReLU()
    x = np.random.default_rng(0).standard_normal((6, 3))
    params = jax.tree_util.tree_map(lambda a: a + 0.3, jax.jit(model.init)(jax.random.key(0), x)["params"])
    scaled = sharpness.alpha_scale(params, 0, 1, 3.0)
    np.testing.assert_allclose(model.apply({"params": scaled}, x), model.apply({"params": params}, x), rtol=1e-12)
    np.testing.assert_array_equal(scaled["Block_1"]["Dense_0"]["bias"], params["Block_1"]["Dense_0"]["bias"])
    np.testing.assert_allclose(scaled["Block_1"]["Dense_0"]["kernel"], params["Block_1"]["Dense_0"]["kernel"] / 3.0)


def test_alpha_scale_keeps_an_nnx_relu_network_function(x64):
    predict, state = _relu_nnx()
    x = np.random.default_rng(0).standard_normal((6, 3))
    scaled = sharpness.alpha_scale(state, 0, 1, 3.0)
    np.testing.assert_allclose(predict(scaled, x), predict(state, x), rtol=1e-12)
