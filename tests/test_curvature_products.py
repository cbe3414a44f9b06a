"""lsgeo.curvature products (hvp, gnvp, the flat operators, the dense Hessian) against dense autodiff,
on one batch and by microbatches (the exact data-set product, with an uneven last microbatch)."""

import jax
import numpy as np
import pytest
import scipy.linalg
from conftest import (
    cnn_apply, cnn_init, dense_hessian, dense_jacobian, F_CNN, F_MLP, flat, image_batch, mlp_apply, mlp_init,
    random_tree, regression_batch,
)

from lsgeo import Objective, curvature, losses


def _first_output(params, x):
    return mlp_apply(params, x)[:, 0]


def _problem(model):
    """(f, predict, loss, params, batch) of the tanh MLP (squared loss) or the CNN (cross-entropy)."""
    if model == "mlp":
        return F_MLP, mlp_apply, losses.squared_loss, mlp_init(0, (5, 8, 8, 3)), regression_batch(1, 21, 5, 3)
    return F_CNN, cnn_apply, losses.softmax_cross_entropy, cnn_init(0), image_batch(1, 21)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_hvp_matches_dense_hessian(x64, model):
    f, _, _, params, batch = _problem(model)
    v = random_tree(2, params)
    expected = dense_hessian(f, params, batch) @ flat(v)
    np.testing.assert_allclose(flat(curvature.hvp(f, params, batch, v)), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["squared", "cross_entropy", "logistic"])
def test_gnvp_matches_dense_jacobians(x64, loss):
    n = 12
    k_out = 1 if loss == "logistic" else 3
    params = mlp_init(0, (4, 7, k_out))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 4))
    if loss == "squared":
        loss_fn, y, predict = losses.squared_loss, rng.standard_normal((n, k_out)), mlp_apply
    elif loss == "cross_entropy":
        loss_fn, y, predict = losses.softmax_cross_entropy, rng.integers(0, k_out, size=n), mlp_apply
    else:  # scalar outputs [n], labels in {-1, +1}
        loss_fn, y, predict = losses.logistic_loss, rng.choice([-1.0, 1.0], size=n), _first_output
    v = random_tree(3, params)

    @jax.jit
    def products(params, batch, v, u):
        gmv = curvature.gauss_newton_operator(predict, loss_fn, params, batch)
        x, y = batch
        blocks = losses.output_hessians(loss_fn, predict(params, x), y)
        return curvature.gnvp(predict, loss_fn, params, batch, v), gmv(u), blocks

    gv, gu, blocks = products(params, (x, y), v, flat(v))
    jac = np.asarray(dense_jacobian(predict, params, x))  # [n k, m]
    d2l = scipy.linalg.block_diag(*np.asarray(blocks)) / n  # D2L = blockdiag(H_i) / n
    np.testing.assert_allclose(flat(gv), jac.T @ d2l @ jac @ flat(v), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(gu, flat(gv), rtol=1e-12, atol=1e-14)  # the operator form agrees


def test_hessian_dense_matches_jax_hessian(x64):
    params = mlp_init(0, (3, 5, 2))
    batch = regression_batch(1, 10, 3, 2)
    h = curvature.hessian(F_MLP, params, batch, vectors_per_pass=10)  # m = 32: 4 chunks of 10, the last padded
    np.testing.assert_allclose(h, dense_hessian(F_MLP, params, batch), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_microbatched_products_equal_single_batch(x64, model):
    """n = 21 in microbatches of 4: five full ones and an uneven last one of 1 example."""
    f, predict, loss, params, batch = _problem(model)
    v = random_tree(4, params)
    for one, many in [
        (curvature.hvp(f, params, batch, v), curvature.hvp(f, params, batch, v, microbatch_size=4)),
        (
            curvature.gnvp(predict, loss, params, batch, v),
            curvature.gnvp(predict, loss, params, batch, v, microbatch_size=4),
        ),
    ]:
        np.testing.assert_allclose(flat(many), flat(one), rtol=1e-10, atol=1e-14)
    op = jax.jit(lambda u: curvature.hessian_operator(Objective(f, batch, microbatch_size=5), params)(u))
    np.testing.assert_allclose(op(flat(v)), flat(curvature.hvp(f, params, batch, v)), rtol=1e-10, atol=1e-14)
    if model == "mlp":
        np.testing.assert_allclose(
            curvature.hessian(f, params, batch, microbatch_size=8), dense_hessian(f, params, batch), rtol=1e-10,
            atol=1e-13,
        )
