"""The noise of lsgeo.optim.noise_injection against its distribution, with bounds of 4 standard errors
computed in the test (issue 22): the sample standard deviation of N Gaussian draws has s.e.
std / sqrt(2 (N - 1)), their mean std / sqrt(N)."""

import jax
import numpy as np
import optax
import pytest
from conftest import group_leaf_params, noise_stream

from lsgeo.optim import noise_injection


def _check_gaussian(draws, std):
    draws = np.asarray(draws, np.float64).ravel()
    n = draws.size
    assert abs(draws.std(ddof=1) - std) <= 4 * std / np.sqrt(2 * (n - 1)), (draws.std(ddof=1), std, n)
    assert abs(draws.mean()) <= 4 * std / np.sqrt(n), (draws.mean(), std, n)


@pytest.mark.parametrize("selection, scale", [("random", True), ("cyclic", True), ("cyclic", False)])
def test_layerwise_noise_std_within_four_standard_errors(selection, scale):
    """sigma sqrt(M) on the chosen group (sigma without the sqrt(M)), zero elsewhere. (Planted: sqrt(M + 0.1)
    for sqrt(M), 1.6% too large: inside the old rtol 0.03, outside 4 s.e. = 1.4% here.)"""
    params, num_groups, steps, sigma = group_leaf_params(), 3, 1000, 0.2
    opt = noise_injection(optax.sgd(0.0), sigma, mode="layerwise", selection=selection, scale_by_num_groups=scale,
                          seed=0)
    xi, groups = noise_stream(opt, params, steps)
    groups = np.asarray(groups)
    per_group = np.stack([np.concatenate([np.asarray(v).reshape(steps, -1) for v in xi[f"layer{j}"].values()], 1)
                          for j in range(num_groups)], axis=1)  # [T, M, 40]
    chosen = per_group[np.arange(steps), groups]
    others = per_group[np.arange(num_groups)[None, :] != groups[:, None]]  # the groups not chosen at each step
    np.testing.assert_array_equal(others, 0.0)
    _check_gaussian(chosen, sigma * np.sqrt(num_groups) if scale else sigma)
    for j in range(num_groups):
        _check_gaussian(per_group[groups == j, j], sigma * np.sqrt(num_groups) if scale else sigma)


def test_full_noise_std_within_four_standard_errors():
    params, steps, sigma = group_leaf_params(), 300, 0.3
    xi, _ = noise_stream(noise_injection(optax.sgd(0.0), sigma, mode="full"), params, steps)
    _check_gaussian(np.concatenate([np.asarray(v).reshape(steps, -1) for v in jax.tree_util.tree_leaves(xi)], 1),
                    sigma)


def test_clean_params_of_transparent_sam_is_the_outer_iterate():
    """Transparent-mode optax.contrib.sam alternates an adversarial step (the loop then holds w + rho g / ||g||)
    and an outer step; clean_params returns the outer iterate w at every step, the held point at syncs.
    The reference is SAM written out by hand. (Mutants: the sync test steps == 0 negated; the cache selection
    broadcast over a wrong shape.)"""
    import jax.numpy as jnp

    from lsgeo.optim import clean_params

    c = np.array([1.0, 3.0, 0.5])
    w0 = {"a": np.array([1.0, -2.0, 0.5]), "b": np.array([[0.3, -0.1], [0.2, 0.4]])}

    def loss(p):
        return 0.5 * jnp.sum(c * p["a"] ** 2) + 0.25 * jnp.sum(p["b"] ** 4)

    lr, rho = 0.1, 0.05
    opt = optax.contrib.sam(optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)), opaque_mode=False)
    grad = jax.jit(jax.grad(loss))
    z, state, w = w0, opt.init(w0), w0
    for t in range(6):
        cleaned = clean_params(z, state)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), cleaned, w)
        if t % 2 == 1:  # the loop holds the adversarial point, not w
            assert not np.allclose(z["a"], w["a"])
        updates, state = opt.update(grad(z), state, z)
        z = optax.apply_updates(z, updates)
        if t % 2 == 1:  # the outer step: w <- w - lr grad(w + rho g / ||g||)
            g = grad(w)
            norm = np.sqrt(sum(np.sum(np.square(a)) for a in jax.tree_util.tree_leaves(g)))
            adv = jax.tree_util.tree_map(lambda p, a, norm=norm: p + rho * a / norm, w, g)
            w = jax.tree_util.tree_map(lambda p, a: p - lr * a, w, grad(adv))
