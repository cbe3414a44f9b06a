"""lsgeo.ntk traces against the dense Jacobian (jax.jacobian): the total and each layer's share
sum_i tr(J_{i,g} J_{i,g}^T) = ||J_g||_F^2 from the Jacobian's own columns, not from the total (issue 22)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.flatten_util import ravel_pytree

from lsgeo import ntk


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, param_dtype=jnp.float64)(nn.tanh(nn.Dense(5, param_dtype=jnp.float64)(x)))


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 5, param_dtype=jnp.float64, rngs=rngs)
        self.l2 = nnx.Linear(5, 3, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _plain_predict(params, x):
    return jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"]) @ params["l2"]["w"] + params["l2"]["b"]


def _model(kind):
    if kind == "plain":
        rng = np.random.default_rng(0)
        return _plain_predict, {"l1": {"w": rng.standard_normal((4, 5)) / 2, "b": 0.1 * rng.standard_normal(5)},
                                "l2": {"w": rng.standard_normal((5, 3)) / 2, "b": 0.1 * rng.standard_normal(3)}}
    if kind == "linen":
        model = LinenMLP()
        return (lambda p, x: model.apply({"params": p}, x)), jax.jit(model.init)(
            jax.random.key(0), jnp.zeros((1, 4), jnp.float64))["params"]
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def _columns(params, key_of_path):
    """{name: boolean mask in ravel_pytree order} grouping leaves by ``key_of_path(key path)``."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [key_of_path(path) for path, _ in paths_leaves]
    treedef = jax.tree_util.tree_structure(params)
    return {
        name: np.asarray(ravel_pytree(jax.tree_util.tree_unflatten(
            treedef, [np.full(np.shape(leaf), n == name) for n, (_, leaf) in zip(names, paths_leaves)]))[0]) > 0.5
        for name in dict.fromkeys(names)
    }


@pytest.mark.parametrize("kind", ["plain", "linen", "nnx"])
def test_ntk_trace_by_layer_matches_dense_jacobian_columns(x64, kind):
    """(Planted: the groups' names attached in reverse order: passes the old 'sums to the total' check.)"""
    predict, params = _model(kind)
    x = np.random.default_rng(1).standard_normal((7, 4))
    w, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jit(jax.jacobian(lambda v, x: predict(unravel(v), x).reshape(-1)))(w, x))  # [n k, m]
    np.testing.assert_allclose(ntk.ntk_trace(predict, params, x), np.sum(jac**2), rtol=1e-10)
    by_layer = ntk.ntk_trace(predict, params, x, by_layer=True)
    masks = _columns(params, lambda path: str(getattr(path[0], "key", path[0])))
    assert sorted(by_layer) == sorted(masks)
    for name, mask in masks.items():
        np.testing.assert_allclose(by_layer[name], np.sum(jac[:, mask] ** 2), rtol=1e-10, err_msg=name)
    if kind == "plain":
        by_leaf = ntk.ntk_trace(predict, params, x, by_layer=True, groups="leaf", method="generic")
        masks = _columns(params, lambda path: "/".join(str(k.key) for k in path))
        assert sorted(by_leaf) == sorted(masks)
        for name, mask in masks.items():
            np.testing.assert_allclose(by_leaf[name], np.sum(jac[:, mask] ** 2), rtol=1e-10, err_msg=name)
        by_leaf_microbatched = ntk.ntk_trace(predict, params, x, by_layer=True, groups="leaf", microbatch_size=3)
        for name, mask in masks.items():
            np.testing.assert_allclose(by_leaf_microbatched[name], np.sum(jac[:, mask] ** 2), rtol=1e-10)
