"""lsgeo.perturbation: the full and layer-wise Gaussian perturbations, against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsgeo.perturbation import perturbation

PARAMS = {f"layer{i}": {"a": np.zeros((40, 30), np.float32), "b": np.zeros(60, np.float32)} for i in range(3)}
KEY = jax.random.key(7)


def test_full_noise_is_sigma_times_random_like():
    xi = perturbation(KEY, PARAMS, 0.3)
    eps = optax.tree.random_like(KEY, PARAMS, jax.random.normal)
    for a, e in zip(jax.tree.leaves(xi), jax.tree.leaves(eps)):
        np.testing.assert_allclose(a, 0.3 * e, rtol=1e-6)
    flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(xi)])
    np.testing.assert_allclose(flat.std(), 0.3, rtol=0.03)  # 3780 draws: s.e. of the std ~1.2%


@pytest.mark.parametrize("group, scale", [(1, True), (-1, True), (0, False)])
def test_layerwise_noise_is_the_full_draw_on_one_group_rescaled(group, scale):
    full = perturbation(KEY, PARAMS, 0.3)
    xi = perturbation(KEY, PARAMS, 0.3, mode="layerwise", group=group, scale_by_num_groups=scale)
    chosen = f"layer{group % 3}"
    factor = np.sqrt(3.0) if scale else 1.0
    for name in PARAMS:
        for leaf in ("a", "b"):
            expected = factor * np.asarray(full[name][leaf]) if name == chosen else 0.0
            np.testing.assert_allclose(xi[name][leaf], expected, rtol=1e-6)


def test_traced_group_under_jit():
    xi = jax.jit(lambda j: perturbation(KEY, PARAMS, 0.3, mode="layerwise", group=j))(jnp.int32(2))
    assert float(jnp.abs(xi["layer0"]["a"]).max()) == 0.0 and float(jnp.abs(xi["layer2"]["a"]).max()) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="layerwise", group=3), r"group must be in \[-3, 3\)"),
        (dict(mode="layerwise", group=-4), r"group must be in \[-3, 3\)"),
        (dict(mode="layerwise"), "group must be given"),
        (dict(mode="both"), "mode must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        perturbation(KEY, PARAMS, 0.3, **kwargs)


def test_every_draw_path_gives_the_same_numbers():
    """Static group (only that group drawn), traced group on CPU (lax.switch) and the accelerator path
    (all drawn, masked) agree bit for bit (all compiled, so the arithmetic is the same)."""
    from lsgeo import perturbation as module

    ids = jax.tree.leaves({k: {"a": i, "b": i} for i, k in enumerate(PARAMS)})
    traced = jax.jit(lambda g: perturbation(KEY, PARAMS, 0.3, mode="layerwise", group=g))
    masked = jax.jit(lambda g: module._masked(KEY, PARAMS, ids, g, 0.3 * jnp.sqrt(3.0)))
    for j in range(3):
        static = jax.jit(lambda: perturbation(KEY, PARAMS, 0.3, mode="layerwise", group=j))()
        for a, b, c in zip(*(jax.tree.leaves(t) for t in (static, traced(jnp.int32(j)), masked(jnp.int32(j))))):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
