"""Empirical NTK, its per-example diagonal blocks and its trace (total and by layer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from conftest import NNXMLP
from jax.flatten_util import ravel_pytree

from lsgeo import ntk

N = 5


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def plain_predict(params, x):
    return jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"]) @ params["l2"]["w"]


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(5)(x)))


def _model(kind):
    if kind == "plain":
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
        params = {"l1": {"w": jax.random.normal(k1, (4, 5)) / 2, "b": 0.1 * jax.random.normal(k2, (5,))},
                  "l2": {"w": jax.random.normal(k3, (5, 3)) / 2}}
        return plain_predict, params
    if kind == "linen":
        model = LinenMLP()
        return (lambda p, x: model.apply({"params": p}, x)), model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def _x(n, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, 4))


def dense_jacobian(predict, params, x):
    flat, unravel = ravel_pytree(params)
    jac = jax.jit(jax.jacobian(lambda f, x: predict(unravel(f), x)))(flat, x)
    return jac.reshape(x.shape[0], -1, flat.shape[0])


@pytest.mark.parametrize("kind", ["plain", "linen", "nnx"])
def test_trace_identities(kind, x64):
    predict, params = _model(kind)
    params, x = _f64(params), _f64(_x(N))
    jac = dense_jacobian(predict, params, x)
    sq_norms = jnp.sum(jnp.square(jac))  # sum over examples and outputs of ||d phi_ic / dw||^2
    kernel = ntk.empirical_ntk(predict, params, x)
    total = ntk.ntk_trace(predict, params, x)
    np.testing.assert_allclose(total, jnp.trace(kernel), rtol=1e-10)
    np.testing.assert_allclose(total, sq_norms, rtol=1e-10)
    by_layer = ntk.ntk_trace(predict, params, x, by_layer=True)
    assert len(by_layer) == 2
    np.testing.assert_allclose(sum(by_layer.values()), total, rtol=1e-10)
    if kind == "plain":
        np.testing.assert_allclose(ntk.ntk_trace(predict, params, x, method="generic"), sq_norms, rtol=1e-10)
        by_leaf = ntk.ntk_trace(predict, params, x, by_layer=True, groups="leaf")
        assert len(by_leaf) == 3
        np.testing.assert_allclose(sum(by_leaf.values()), total, rtol=1e-10)
        blocks = ntk.ntk_diagonal_blocks(predict, params, x, examples_per_chunk=2)
        np.testing.assert_allclose(blocks, jnp.einsum("ikm,ilm->ikl", jac, jac), rtol=1e-10, atol=1e-12)


def test_empirical_ntk_full_against_dense(x64):
    predict, params = _model("plain")
    params = _f64(params)
    x1, x2 = _f64(_x(N, 1)), _f64(_x(3, 2))
    j1, j2 = dense_jacobian(predict, params, x1), dense_jacobian(predict, params, x2)
    full = ntk.empirical_ntk(predict, params, x1, x2, trace_outputs=False, examples_per_chunk=2)
    np.testing.assert_allclose(full, jnp.einsum("ikm,jlm->ijkl", j1, j2), rtol=1e-10, atol=1e-12)
    traced = ntk.empirical_ntk(predict, params, x1, x2)
    np.testing.assert_allclose(traced, jnp.einsum("ikm,jkm->ij", j1, j2), rtol=1e-10, atol=1e-12)
    blocks = ntk.ntk_diagonal_blocks(predict, params, x1)
    kernel = ntk.empirical_ntk(predict, params, x1, trace_outputs=False)
    np.testing.assert_allclose(blocks, kernel[jnp.arange(N), jnp.arange(N)], rtol=1e-10, atol=1e-12)


def test_by_layer_group_callable_and_bad_groups():
    predict, params = _model("linen")
    x = _x(N)
    one = ntk.ntk_trace(predict, params, x, by_layer=True, groups=lambda path: "all")
    np.testing.assert_allclose(one["all"], ntk.ntk_trace(predict, params, x), rtol=1e-5)
    with pytest.raises(ValueError, match="groups"):
        ntk.ntk_trace(predict, params, x, by_layer=True, groups="module")
    with pytest.raises(ValueError, match="examples_per_chunk"):
        ntk.empirical_ntk(predict, params, x, examples_per_chunk=0)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_microbatched_ntk_trace_equals_single_batch(model, x64):
    """The trace is a sum over examples: by microbatches of 4 (21 examples, the last microbatch uneven)
    the total and the per-group values equal the single-batch ones."""
    from conftest import cnn_apply, cnn_init, image_batch, mlp_apply, mlp_init, regression_batch

    if model == "mlp":
        predict, params, x = mlp_apply, mlp_init(0, (5, 8, 8, 3)), regression_batch(1, 21, 5, 3)[0]
    else:
        predict, params, x = cnn_apply, cnn_init(0), image_batch(1, 21)[0]
    one = ntk.ntk_trace(predict, params, x, by_layer=True, groups="leaf")
    many = ntk.ntk_trace(predict, params, x, by_layer=True, groups="leaf", microbatch_size=4)
    assert one.keys() == many.keys()
    for name in one:
        np.testing.assert_allclose(many[name], one[name], rtol=1e-10)
    np.testing.assert_allclose(ntk.ntk_trace(predict, params, x, microbatch_size=4), ntk.ntk_trace(predict, params, x),
                               rtol=1e-10)


BAD_NTK_INPUTS = [
    (lambda p, x: ntk.ntk_trace("f", p, x), TypeError, "predict must be a callable"),
    (lambda p, x: ntk.ntk_trace(plain_predict, jax.tree_util.tree_map(jnp.int32, p), x), ValueError,
     "parameters must be floating point"),
    (lambda p, x: ntk.ntk_trace(plain_predict, p, x[:0]), ValueError, "x is empty"),
    (lambda p, x: ntk.ntk_trace(plain_predict, p, x, examples_per_chunk=0), ValueError, "examples_per_chunk must be a positive"),
    (lambda p, x: ntk.ntk_trace(plain_predict, p, x, microbatch_size=-3), ValueError, "microbatch_size must be a"),
    (lambda p, x: ntk.ntk_trace(plain_predict, p, x, method="backpack"), ValueError, "method must be one of"),
    (lambda p, x: ntk.ntk_diagonal_blocks(plain_predict, p, x[:0]), ValueError, "x is empty"),
    (lambda p, x: ntk.empirical_ntk(plain_predict, p, x, x[:0]), ValueError, "x2 is empty"),
    (lambda p, x: ntk.empirical_ntk(plain_predict, p, {"a": x, "b": x[:2]}), ValueError, "x1 leaves must share"),
]


@pytest.mark.parametrize("call, error, message", BAD_NTK_INPUTS, ids=[str(i) for i in range(len(BAD_NTK_INPUTS))])
def test_bad_input_names_the_argument(call, error, message):
    _, params = _model("plain")
    with pytest.raises(error, match=message):
        call(params, _x(N))
