"""Per-example Jacobian Gram blocks: structured fast path == generic path == dense Jacobians."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from conftest import NNXMLP
from jax.flatten_util import ravel_pytree

from lsgeo import groups as groups_lib
from lsgeo import per_example as pe

N = 6


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _mlp_params(key, sizes, bias=True):
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, k1, k2 = jax.random.split(key, 3)
        layer = {"w": jax.random.normal(k1, (a, b)) / np.sqrt(a)}
        if bias:
            layer["b"] = 0.1 * jax.random.normal(k2, (b,))
        params[f"layer{i}"] = layer
    return params


def mlp_predict(params, x):
    names = sorted(params)
    for i, name in enumerate(names):
        x = x @ params[name]["w"]
        if "b" in params[name]:
            x = x + params[name]["b"]
        if i < len(names) - 1:
            x = jnp.tanh(x)
    return x


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(5)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(3)(x)


class LinenConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(2, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))


def seq_predict(params, x):
    """A dense layer shared over T = 3 positions per example (T > 1 ghost norms), mean-pooled."""
    h = jnp.tanh(jnp.einsum("ntd,de->nte", x, params["w1"]) + params["b1"])
    return jnp.mean(h, axis=1) @ params["w2"]


def scalar_predict(params, x):
    return jnp.tanh(x @ params["w"]) @ params["v"]


def _models():
    key = jax.random.PRNGKey(0)
    k = jax.random.split(key, 8)
    x = jax.random.normal(k[0], (N, 4))
    out = {}
    out["mlp_bias"] = (mlp_predict, _mlp_params(k[1], [4, 5, 3]), x)
    out["mlp_nobias"] = (mlp_predict, _mlp_params(k[2], [4, 5, 5, 3], bias=False), x)
    linen = LinenMLP()
    out["linen"] = (lambda p, x: linen.apply({"params": p}, x), linen.init(k[3], x)["params"], x)
    conv = LinenConvNet()
    ximg = jax.random.normal(k[4], (N, 4, 4, 2))
    out["conv"] = (lambda p, x: conv.apply({"params": p}, x), conv.init(k[5], ximg)["params"], ximg)
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    out["nnx"] = (lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    xs = jax.random.normal(k[6], (N, 3, 4))
    seq = {"w1": jax.random.normal(k[7], (4, 5)) / 2, "b1": 0.1 * jnp.ones(5), "w2": jnp.ones((5, 2)) / 3}
    out["seq"] = (seq_predict, seq, xs)  # T = 3 rows per example, d_in = 4: explicit per-example gradient
    xw = jax.random.normal(k[6], (N, 3, 8))
    seq_wide = {"w1": jax.random.normal(k[7], (8, 5)) / 3, "b1": 0.1 * jnp.ones(5), "w2": jnp.ones((5, 2)) / 3}
    out["seq_wide"] = (seq_predict, seq_wide, xw)  # d_in = 8: sum_{t,t'} <a_t, a_t'> <D_t, D_t'> is cheaper
    out["scalar"] = (scalar_predict, {"w": jax.random.normal(k[1], (4, 5)), "v": jax.random.normal(k[2], (5,))}, x)
    return out


MODELS = _models()


def dense_jacobian(predict, params, x):
    """[n, k, m] per-example Jacobians from jax.jacobian of the full-batch predictor (ravel order)."""
    flat, unravel = ravel_pytree(params)
    jac = jax.jit(jax.jacobian(lambda f, x: predict(unravel(f), x)))(flat, x)
    return jac.reshape(x.shape[0], -1, flat.shape[0])


def group_columns(params, groups=None):
    """{group name: boolean mask over the raveled parameter vector}."""
    ids, names = groups_lib.group_ids(params, groups)
    col = np.concatenate([np.full(np.size(l), i) for l, i in zip(jax.tree_util.tree_leaves(params),
                                                                   jax.tree_util.tree_leaves(ids))])
    return {name: col == g for g, name in enumerate(names)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fast_equals_generic_equals_dense(name, x64):
    predict, params, x = MODELS[name]
    params, x = _f64(params), _f64(x)
    jac = dense_jacobian(predict, params, x)
    expected = jnp.einsum("ikm,ilm->ikl", jac, jac)
    chunk = 4 if name in ("mlp_bias", "seq") else None  # 4 does not divide 6: the remainder path
    fast = pe.gram_blocks(predict, params, x, examples_per_chunk=chunk)
    generic = pe.gram_blocks(predict, params, x, method="generic")
    np.testing.assert_allclose(fast, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(generic, expected, rtol=1e-10, atol=1e-10)


def test_fast_path_plan_routes_leaves():
    plan = pe.fast_path_plan(*MODELS["conv"])
    assert plan["Conv_0/kernel"] == "generic"
    assert plan["Conv_0/bias"] == "elementwise"
    assert plan["Dense_0/kernel"] == plan["Dense_1/kernel"] == "dense"
    assert plan["Dense_1/bias"] == "elementwise"
    plan = pe.fast_path_plan(*MODELS["linen"])
    assert plan["LayerNorm_0/scale"] == "elementwise"
    assert set(pe.fast_path_plan(*MODELS["nnx"]).values()) == {"dense", "elementwise"}
    assert pe.fast_path_plan(*MODELS["seq"])["w1"] == "dense"


def test_shared_weight_falls_back(x64):
    """A kernel used twice (weight sharing) must take the generic path and stay exact."""

    def tied(p, x):
        return jnp.tanh(x @ p["w"]) @ p["w"].T

    params = {"w": jax.random.normal(jax.random.PRNGKey(3), (4, 4))}
    x = jax.random.normal(jax.random.PRNGKey(4), (N, 4))
    assert pe.fast_path_plan(tied, params, x)["w"] == "generic"
    jac = dense_jacobian(tied, params, x)
    np.testing.assert_allclose(pe.gram_blocks(tied, params, x), jnp.einsum("ikm,ilm->ikl", jac, jac), rtol=1e-10)


def test_by_group_sums_and_matches_dense_blocks(x64):
    predict, params, x = MODELS["conv"]
    params, x = _f64(params), _f64(x)
    jac = dense_jacobian(predict, params, x)
    by_group = pe.gram_blocks(predict, params, x, by_group=True)
    assert list(by_group) == list(params)
    total = jnp.einsum("ikm,ilm->ikl", jac, jac)
    np.testing.assert_allclose(sum(by_group.values()), total, rtol=1e-10)
    for groups, got in ((None, by_group), ("leaf", pe.gram_blocks(predict, params, x, by_group=True, groups="leaf"))):
        for g, cols in group_columns(params, groups).items():
            expected = jnp.einsum("ikm,ilm->ikl", jac[:, :, cols], jac[:, :, cols])
            np.testing.assert_allclose(got[g], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method,name", [("fast", "conv"), ("generic", "conv"), ("fast", "seq_wide")])
def test_sq_grad_norms(method, name, x64):
    predict, params, x = MODELS[name]
    params, x = _f64(params), _f64(x)
    jac = dense_jacobian(predict, params, x)
    u = jax.random.normal(jax.random.PRNGKey(7), (N, jac.shape[1], 2))
    expected = jnp.sum(jnp.square(jnp.einsum("ikm,ikr->irm", jac, u)), axis=-1)
    np.testing.assert_allclose(pe.sq_grad_norms(predict, params, x, u, method=method), expected, rtol=1e-10)
    np.testing.assert_allclose(pe.sq_grad_norms(predict, params, x, u[..., 0], method=method), expected[:, 0], rtol=1e-10)


def test_scalar_outputs_and_jit(x64):
    predict, params, x = MODELS["scalar"]
    params, x = _f64(params), _f64(x)
    jac = dense_jacobian(predict, params, x)
    u = jnp.arange(1.0, N + 1.0)
    expected = jnp.sum(jnp.square(jac[:, 0, :] * u[:, None]), axis=-1)
    got = jax.jit(lambda p, x, u: pe.sq_grad_norms(predict, p, x, u))(params, x, u)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert pe.gram_blocks(predict, params, x).shape == (N, 1, 1)


def test_bad_input():
    predict, params, x = MODELS["mlp_bias"]
    with pytest.raises(ValueError, match="groups"):
        pe.gram_blocks(predict, params, x, by_group=True, groups="layers")
    with pytest.raises(ValueError, match="method"):
        pe.gram_blocks(predict, params, x, method="ghost")
    with pytest.raises(ValueError, match="examples_per_chunk"):
        pe.gram_blocks(predict, params, x, examples_per_chunk=0)
    with pytest.raises(ValueError, match="cotangents"):
        pe.sq_grad_norms(predict, params, x, jnp.ones((N + 1, 3)))


@jax.jit
def _jitted_dense(w, b, x):
    return x @ w + b


def test_jitted_helper_called_twice(x64):
    """One jitted helper for two layers: the inner jaxpr (and its equations) is shared by both calls."""

    def predict(p, x):
        return _jitted_dense(p["w2"], p["b2"], jnp.tanh(_jitted_dense(p["w1"], p["b1"], x)))

    k = jax.random.split(jax.random.PRNGKey(5), 3)
    params = {"w1": jax.random.normal(k[0], (4, 4)), "b1": jnp.ones(4), "w2": jax.random.normal(k[1], (4, 4)),
              "b2": jnp.zeros(4)}
    x = jax.random.normal(k[2], (N, 4))
    assert set(pe.fast_path_plan(predict, params, x).values()) == {"dense", "elementwise"}
    jac = dense_jacobian(predict, params, x)
    np.testing.assert_allclose(pe.gram_blocks(predict, params, x), jnp.einsum("ikm,ilm->ikl", jac, jac), rtol=1e-10)

