"""The remainder of R_sigma's second-order expansion and its fitted order (``experiments.taylor_order``), on
functions whose remainder is known: the fit recovers 3.0 for an O(sigma^3) remainder, 2.0 for O(sigma^2), 4.0
for a smooth function; the Gauss-Newton remainder of a smooth predictor is O(sigma^2) where the Hessian's is
O(sigma^4); the quadratic forms equal the dense matrices'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import taylor_order

SIGMAS = (0.01, 0.02, 0.04, 0.08)
M = 6
identity = lambda p, x: p["w"]  # Phi(w) = w: the loss is the risk


def _orders(predict, loss, w, num_pairs=512):
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(w, jnp.float64)}
        batch = (jnp.zeros((M,)), jnp.zeros((M,)))
        out = taylor_order.remainders(predict, loss, params, batch, SIGMAS, jax.random.key(0), num_pairs)
    return out, {k: taylor_order.fit_order(SIGMAS, mean) for k, (mean, _) in out.items()}


def test_an_order_three_remainder_is_fitted_as_three():
    # R(w) = sum |w|^3 at w = 0: R = 0, Hessian 0, R_sigma = sigma^3 M E|eps|^3 = sigma^3 M 2 sqrt(2/pi)
    out, orders = _orders(identity, lambda o, y: jnp.sum(jnp.abs(o) ** 3), np.zeros(M))
    assert orders["hessian"] == pytest.approx(3.0, abs=1e-6) and orders["gauss_newton"] == pytest.approx(3.0, abs=1e-6)
    mean, se = out["hessian"]
    exact = np.asarray(SIGMAS) ** 3 * M * 2 * np.sqrt(2 / np.pi)
    assert np.all(np.abs(mean - exact) < 4 * se)


def test_an_order_two_remainder_is_fitted_as_two():
    # R(w) = sum relu(w)^2 at w = 0 (a kink of the second derivative): R_sigma - R - 0 = sigma^2 M / 2
    out, orders = _orders(identity, lambda o, y: jnp.sum(jax.nn.relu(o) ** 2), np.zeros(M))
    assert orders["hessian"] == pytest.approx(2.0, abs=1e-6)
    mean, se = out["hessian"]
    assert np.all(np.abs(mean - np.asarray(SIGMAS) ** 2 * M / 2) < 4 * se)


def test_a_smooth_function_has_a_fourth_order_remainder():
    # R(w) = sum cos(w): R_sigma - R - sigma^2/2 tr H = sum cos(w) (exp(-sigma^2/2) - 1 + sigma^2/2) = O(sigma^4)
    w = np.linspace(-0.5, 0.4, M)
    out, orders = _orders(identity, lambda o, y: jnp.sum(jnp.cos(o)), w)
    assert orders["hessian"] == pytest.approx(4.0, abs=0.02)
    s = np.asarray(SIGMAS)
    exact = np.sum(np.cos(w)) * (np.exp(-(s**2) / 2) - 1 + s**2 / 2)
    mean, se = out["hessian"]
    assert np.all(np.abs(mean - exact) < 4 * se + 1e-15)


def test_the_gauss_newton_remainder_of_a_smooth_predictor_is_second_order():
    # Phi(w) = sin(w), L = 1/2 ||Phi - y||^2: tr H - tr G = sum (sin w - y)(-sin w) != 0, so R_sigma - R_eff
    # = sigma^2/2 (tr H - tr G) + O(sigma^4), while the Hessian's remainder is O(sigma^4)
    w = np.linspace(0.2, 1.0, M)
    loss = lambda o, y: 0.5 * jnp.sum((o - 1.5) ** 2)
    out, orders = _orders(lambda p, x: jnp.sin(p["w"]), loss, w)
    assert orders["gauss_newton"] == pytest.approx(2.0, abs=0.05)
    assert orders["hessian"] == pytest.approx(4.0, abs=0.1)
    gap = np.sum((np.sin(w) - 1.5) * -np.sin(w))
    mean, se = out["gauss_newton"]
    assert abs(mean[0] - SIGMAS[0] ** 2 / 2 * gap) < 4 * se[0]


def test_quadratic_forms_equal_the_dense_matrices(x64):
    # a tiny tanh net on 5 points: eps^T H eps (jax.hessian) and eps^T J^T D2L J eps (dense Jacobian)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
    params = {"a": jax.random.normal(k1, (3, 4)), "b": jax.random.normal(k2, (4, 2))}
    x, y = jax.random.normal(k3, (5, 3)), jnp.array([0, 1, 1, 0, 1])
    predict = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
    loss = lambda o, y: jnp.mean(jax.nn.logsumexp(o, axis=1) - jnp.take_along_axis(o, y[:, None], 1)[:, 0])
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    eps = jax.random.normal(k4, flat.shape)
    risk = lambda w: loss(predict(unravel(w), x), y)
    J = jax.jit(jax.jacobian(lambda w: predict(unravel(w), x).ravel()))(flat)  # jitted: one compile, not 100s of ops
    D2L = jax.jit(jax.hessian(lambda o: loss(o.reshape(5, 2), y)))(predict(params, x).ravel())
    q = jax.jit(lambda p, b, e: taylor_order.quadratic_forms(predict, loss, p, b, e))(params, (x, y), eps)
    assert q["hessian"] == pytest.approx(float(eps @ jax.jit(jax.hessian(risk))(flat) @ eps), rel=1e-10)
    assert q["gauss_newton"] == pytest.approx(float(eps @ J.T @ D2L @ J @ eps), rel=1e-10)


def test_fit_order_of_nothing_measurable_is_nan():
    assert np.isnan(taylor_order.fit_order(SIGMAS, [0.0, 1e-3, 1e-2, 1e-1]))
    assert np.isnan(taylor_order.fit_order((0.1,), (1.0,)))
