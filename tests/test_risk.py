"""R, R_sigma, the Gauss-Newton trace tr(D2L(Phi) DPhi DPhi^T) and R_sigma^(eff) (Orvieto et al. 2023)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.flatten_util import ravel_pytree

from conftest import rounding_floor
from lsgeo import losses, ntk
from lsgeo import risk as risk_lib

N = 8


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def plain_predict(params, x):
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
    return h @ params["l2"]["w"] + params["l2"]["b"]


def _plain(key, k):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "l1": {"w": jax.random.normal(k1, (4, 5)) / 2, "b": 0.1 * jax.random.normal(k2, (5,))},
        "l2": {"w": jax.random.normal(k3, (5, k)) / 2, "b": 0.1 * jax.random.normal(k4, (k,))},
    }


class LinenMLP(nn.Module):
    k: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.k)(nn.tanh(nn.Dense(5)(x)))


class NNXMLP(nnx.Module):
    def __init__(self, k, rngs):
        self.l1 = nnx.Linear(4, 5, rngs=rngs)
        self.l2 = nnx.Linear(5, k, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _data(loss, k):
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, (N, 4))
    if loss is losses.softmax_cross_entropy:
        y = jax.random.randint(ky, (N,), 0, k)
    elif loss is losses.logistic_loss:
        y = jnp.sign(jax.random.normal(ky, (N,)))
    else:
        y = jax.random.normal(ky, (N, k))
    return x, y


LOSSES = {"squared": (losses.squared_loss, 3), "logistic": (losses.logistic_loss, 1),
          "cross_entropy": (losses.softmax_cross_entropy, 3)}


def _model(kind, k):
    if kind == "plain":
        return plain_predict, _plain(jax.random.PRNGKey(0), k)
    x = jnp.zeros((1, 4))
    if kind == "linen":
        model = LinenMLP(k)
        return (lambda p, x: model.apply({"params": p}, x)), model.init(jax.random.PRNGKey(0), x)["params"]
    graphdef, state = nnx.split(NNXMLP(k, nnx.Rngs(0)))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


@functools.partial(jax.jit, static_argnums=(0, 1))
def dense_gn_trace(predict, loss, params, batch):
    """tr(D2L J J^T) from the dense [nk, m] Jacobian and the dense [nk, nk] Hessian of L."""
    x, y = batch
    flat, unravel = ravel_pytree(params)
    out = predict(params, x)
    jac = jax.jacobian(lambda f: predict(unravel(f), x).reshape(-1))(flat)
    hess = jax.hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1))
    return jnp.trace(hess @ jac @ jac.T)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_exact_gn_trace_matches_dense(name, x64):
    loss, k = LOSSES[name]
    predict, params = _model("plain", k)
    params = _f64(params)
    batch = _f64(_data(loss, k)) if loss is not losses.softmax_cross_entropy else (_f64(_data(loss, k)[0]), _data(loss, k)[1])
    if loss is losses.logistic_loss:
        predict = lambda p, x: plain_predict(p, x)[:, 0]  # noqa: E731  scalar outputs [n]
    expected = dense_gn_trace(predict, loss, params, batch)
    for method in ("fast", "generic"):
        got = risk_lib.gauss_newton_trace(predict, loss, params, batch, method=method)
        np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_exact_gn_trace_generic_loss(x64):
    """A loss outside the closed forms (indefinite output Hessian): vmap(hessian) path, and the probe
    estimate with signed factors."""

    def wavy(outputs, y):
        return jnp.mean(jnp.sum(jnp.cos(outputs) * y, axis=-1))

    predict, params = _model("plain", 3)
    params = _f64(params)
    batch = _f64(_data(losses.squared_loss, 3))
    expected = dense_gn_trace(predict, wavy, params, batch)
    np.testing.assert_allclose(risk_lib.gauss_newton_trace(predict, wavy, params, batch), expected, rtol=1e-10)
    num_probes = 4000
    estimate = risk_lib.gauss_newton_trace(predict, wavy, params, batch, key=jax.random.PRNGKey(0),
                                           num_probes=num_probes)
    # its exact standard error: each probe is z^T A z / n, A = B^T J J^T B S with n D2L = B S B^T (signs S),
    # so Var = 2 ||(A + A^T) / 2||_F^2 / n^2 for Gaussian z (dense J and D2L, eigh of n D2L)
    x, y = batch
    flat, unravel = ravel_pytree(params)
    out = predict(params, x)
    jac = np.asarray(jax.jacobian(lambda f: predict(unravel(f), x).reshape(-1))(flat))
    evals, evecs = np.linalg.eigh(N * np.asarray(jax.hessian(lambda o: wavy(o.reshape(out.shape), y))(out.reshape(-1))))
    b = evecs * np.sqrt(np.abs(evals))
    a = b.T @ jac @ jac.T @ b * np.sign(evals)[None, :]
    se = np.sqrt(2 * np.sum(np.square((a + a.T) / 2)) / N**2 / num_probes)
    assert abs(estimate - expected) <= 4 * se + rounding_floor(np.abs(a).sum() / N), (estimate, expected, se)


def test_squared_loss_gn_trace_is_ntk_trace_over_n(x64):
    predict, params = _model("plain", 3)
    params = _f64(params)
    x, y = _f64(_data(losses.squared_loss, 3))
    gn = risk_lib.gauss_newton_trace(predict, losses.squared_loss, params, (x, y))
    np.testing.assert_allclose(gn, ntk.ntk_trace(predict, params, x) / N, rtol=1e-12)


@pytest.mark.parametrize("name", ["cross_entropy", "logistic"])
def test_probe_estimate_is_unbiased(name, x64):
    loss, k = LOSSES[name]
    predict, params = _model("plain", k)
    params = _f64(params)
    x, y = _data(loss, k)
    x = _f64(x)
    if loss is losses.logistic_loss:
        predict = lambda p, x: plain_predict(p, x)[:, 0]  # noqa: E731
    exact = risk_lib.gauss_newton_trace(predict, loss, params, (x, y))
    keys = jax.random.split(jax.random.PRNGKey(42), 4000)
    one = jax.jit(jax.vmap(lambda kk: risk_lib.gauss_newton_trace(predict, loss, params, (x, y), key=kk, num_probes=1)))
    estimates = one(keys)
    mean, se = jnp.mean(estimates), jnp.std(estimates) / np.sqrt(len(keys))
    assert abs(mean - exact) < 3 * se, (mean, exact, se)
    assert float(jnp.std(estimates)) > 0


@pytest.mark.parametrize("kind", ["plain", "linen", "nnx"])
def test_by_layer_sums_to_total_and_effective_risk(kind):
    loss, k = LOSSES["cross_entropy"]
    predict, params = _model(kind, k)
    batch = _data(loss, k)
    total = risk_lib.gauss_newton_trace(predict, loss, params, batch)
    by_layer = risk_lib.gauss_newton_trace_by_layer(predict, loss, params, batch)
    assert len(by_layer) == 2
    np.testing.assert_allclose(sum(by_layer.values()), total, rtol=1e-5)
    sigma = 0.3
    r = risk_lib.risk(predict, loss, params, batch)
    eff = jax.jit(lambda p, b: risk_lib.effective_risk(predict, loss, p, b, sigma))(params, batch)
    np.testing.assert_allclose(eff, r + sigma**2 / 2 * total, rtol=1e-5)
    if kind == "plain":
        by_leaf = risk_lib.gauss_newton_trace_by_layer(predict, loss, params, batch, groups="leaf")
        assert len(by_leaf) == 4
        np.testing.assert_allclose(sum(by_leaf.values()), total, rtol=1e-5)
        eff_probe = risk_lib.effective_risk(predict, loss, params, batch, sigma, key=jax.random.PRNGKey(0),
                                            num_probes=8)
        assert np.isfinite(eff_probe) and eff_probe > r


def test_perturbed_risk_small_sigma_matches_effective_risk(x64):
    """R_sigma = R_eff + O(sigma^2 <DL, D2Phi>) + O(sigma^4): at a near-interpolating squared-loss fit the
    Monte Carlo R_sigma and R_eff agree; sigma = 0 gives R exactly."""
    predict, params = _model("plain", 3)
    params = _f64(params)
    x = _f64(_data(losses.squared_loss, 3)[0])
    y = predict(params, x) + 1e-3  # near interpolation: the <DL, D2Phi> term is negligible
    batch = (x, y)
    r = risk_lib.risk(predict, losses.squared_loss, params, batch)
    sigma, num_samples = 0.02, 4000
    mc = jax.jit(lambda p, b: risk_lib.perturbed_risk(predict, losses.squared_loss, p, b, sigma,
                                                      jax.random.PRNGKey(1), num_samples=num_samples, draws_per_pass=1000))
    eff = risk_lib.effective_risk(predict, losses.squared_loss, params, batch, sigma)
    # the standard error of the Monte Carlo mean from the spread of single-draw estimates (other keys)
    draws = jax.jit(jax.vmap(lambda k: risk_lib.perturbed_risk(predict, losses.squared_loss, params, batch, sigma, k)))(
        jax.random.split(jax.random.PRNGKey(2), num_samples))
    se = float(jnp.std(draws, ddof=1)) / np.sqrt(num_samples)
    assert 4 * se < 0.05 * (eff - r)  # 4 s.e. is under 5% of the noise effect sigma^2/2 tr(D2L J J^T)
    assert abs(float(mc(params, batch)) - float(eff)) <= 4 * se, (float(mc(params, batch)), float(eff), se)
    assert abs(float(jnp.mean(draws)) - float(eff)) <= 4 * se


def test_bad_input_raises():
    loss, k = LOSSES["cross_entropy"]
    predict, params = _model("plain", k)
    batch = _data(loss, k)
    with pytest.raises(ValueError, match="num_probes"):
        risk_lib.gauss_newton_trace(predict, loss, params, batch, key=jax.random.PRNGKey(0), num_probes=-1)
    with pytest.raises(ValueError, match="key"):
        risk_lib.gauss_newton_trace(predict, loss, params, batch, num_probes=4)
    with pytest.raises(ValueError, match="key"):
        risk_lib.effective_risk(predict, loss, params, batch, 0.1, num_probes=4)
    for sigma in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma"):
            risk_lib.effective_risk(predict, loss, params, batch, sigma)
    with pytest.raises(ValueError, match="groups"):
        risk_lib.gauss_newton_trace_by_layer(predict, loss, params, batch, groups="layer")
    with pytest.raises(ValueError, match="method"):
        risk_lib.gauss_newton_trace(predict, loss, params, batch, method="backpack")
    with pytest.raises(ValueError, match="examples_per_chunk"):
        risk_lib.gauss_newton_trace(predict, loss, params, batch, examples_per_chunk=-2)


def test_linear_net_closed_form(x64):
    """Two-layer linear net, squared loss: tr(D2L J J^T) = (d2 ||W1 X^T||_F^2 + ||W2||_F^2 ||X||_F^2) / n
    (the regulariser of Orvieto et al. 2023, Section 2.4, derived independently)."""
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    d0, d1, d2 = 4, 5, 3
    params = {"W1": jax.random.normal(k[0], (d1, d0)), "W2": jax.random.normal(k[1], (d2, d1))}
    x, y = jax.random.normal(k[2], (N, d0)), jax.random.normal(k[3], (N, d2))

    def predict(p, x):
        return x @ p["W1"].T @ p["W2"].T

    expected = (d2 * jnp.sum(jnp.square(x @ params["W1"].T)) + jnp.sum(jnp.square(params["W2"])) * jnp.sum(
        jnp.square(x))) / N
    got = risk_lib.gauss_newton_trace_by_layer(predict, losses.squared_loss, params, (x, y))
    np.testing.assert_allclose(got["W1"], jnp.sum(jnp.square(params["W2"])) * jnp.sum(jnp.square(x)) / N, rtol=1e-10)
    np.testing.assert_allclose(got["W1"] + got["W2"], expected, rtol=1e-10)


def _mb_problem(model):
    """(predict, loss, params, batch): the shared tanh MLP with squared loss, or the small CNN with
    cross-entropy (float64 numpy parameters), n = 21."""
    from conftest import cnn_apply, cnn_init, image_batch, mlp_apply, mlp_init, regression_batch

    if model == "mlp":
        return mlp_apply, losses.squared_loss, mlp_init(0, (5, 8, 8, 3)), regression_batch(1, 21, 5, 3)
    return cnn_apply, losses.softmax_cross_entropy, cnn_init(0), image_batch(1, 21)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_microbatched_values_equal_single_batch(x64, model):
    """n = 21 in microbatches of 4 (the last one uneven): every exact quantity equals its single-batch value."""
    predict, loss, params, batch = _mb_problem(model)
    mb = {"microbatch_size": 4}
    for fn, kwargs in [
        (risk_lib.risk, {}),
        (risk_lib.gauss_newton_trace, {}),
        (risk_lib.effective_risk, {"sigma": 0.3}),
        (risk_lib.perturbed_risk, {"sigma": 0.1, "key": jax.random.PRNGKey(0), "num_samples": 3}),
    ]:
        one = fn(predict, loss, params, batch, **kwargs)
        np.testing.assert_allclose(fn(predict, loss, params, batch, **kwargs, **mb), one, rtol=1e-10, err_msg=str(fn))
    one = risk_lib.gauss_newton_trace_by_layer(predict, loss, params, batch, groups="leaf")
    many = risk_lib.gauss_newton_trace_by_layer(predict, loss, params, batch, groups="leaf", **mb)
    assert one.keys() == many.keys()
    for name in one:
        np.testing.assert_allclose(many[name], one[name], rtol=1e-10)
    one = risk_lib.gauss_newton_diagonal(predict, loss, params, batch)
    many = risk_lib.gauss_newton_diagonal(predict, loss, params, batch, examples_per_chunk=3, **mb)
    for a, b in zip(jax.tree_util.tree_leaves(many), jax.tree_util.tree_leaves(one)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-15)
    # the probe estimate stays unbiased: its mean over many keys is within 3 s.e. of the exact trace
    exact = risk_lib.gauss_newton_trace(predict, loss, params, batch)
    keys = jax.random.split(jax.random.PRNGKey(3), 300)
    est = jax.jit(jax.vmap(lambda kk: risk_lib.gauss_newton_trace(predict, loss, params, batch, key=kk, num_probes=1,
                                                                  **mb)))(keys)
    assert abs(np.mean(est) - exact) < 3 * np.std(est) / np.sqrt(len(keys))


@pytest.mark.parametrize("name", sorted(LOSSES) + ["wavy"])
def test_gauss_newton_diagonal_matches_dense_jacobians(name, x64):
    """diag(J^T D2L J) from the dense [nk, m] Jacobian and the dense Hessian of L in output space."""
    if name == "wavy":  # outside the closed forms, indefinite output Hessians (signed factors)

        def loss(outputs, y):
            return jnp.mean(jnp.sum(jnp.cos(outputs) * y, axis=-1))

        k, batch = 3, _f64(_data(losses.squared_loss, 3))
    else:
        loss, k = LOSSES[name]
        x, y = _data(loss, k)
        batch = (_f64(x), y if loss is losses.softmax_cross_entropy else _f64(y))
    predict, params = _model("plain", k)
    params = _f64(params)
    if loss is losses.logistic_loss:
        predict = lambda p, x: plain_predict(p, x)[:, 0]  # noqa: E731  scalar outputs [n]
    x, y = batch
    flat, unravel = ravel_pytree(params)
    out = predict(params, x)
    jac = jax.jacobian(lambda f: predict(unravel(f), x).reshape(-1))(flat)
    hess = jax.hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1))
    expected = jnp.diag(jac.T @ hess @ jac)
    got = ravel_pytree(risk_lib.gauss_newton_diagonal(predict, loss, params, batch, examples_per_chunk=3))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jnp.sum(got), risk_lib.gauss_newton_trace(predict, loss, params, batch), rtol=1e-10)


def _vector_loss(outputs, y):
    return jnp.sum((outputs - y) ** 2, axis=-1)


LOSS_NOT_SCALAR = r"loss(\(predict\(\.\.\.\)\))? must return a scalar"
BAD_RISK_INPUTS = [
    (lambda p, b: risk_lib.risk(None, losses.squared_loss, p, b), TypeError, "predict must be a callable"),
    (lambda p, b: risk_lib.risk(plain_predict, "mse", p, b), TypeError, "loss must be a callable"),
    (lambda p, b: risk_lib.risk(plain_predict, _vector_loss, p, b), ValueError, LOSS_NOT_SCALAR),
    (lambda p, b: risk_lib.gauss_newton_trace(plain_predict, _vector_loss, p, b), ValueError, LOSS_NOT_SCALAR),
    (lambda p, b: risk_lib.effective_risk(plain_predict, _vector_loss, p, b, 0.1, microbatch_size=3), ValueError,
     LOSS_NOT_SCALAR),
    (lambda p, b: risk_lib.risk(plain_predict, losses.squared_loss, jax.tree_util.tree_map(jnp.int32, p), b),
     ValueError, "parameters must be floating point"),
    (lambda p, b: risk_lib.gauss_newton_diagonal(plain_predict, losses.squared_loss, p, b, examples_per_chunk=0), ValueError,
     "examples_per_chunk must be a positive integer"),
    (lambda p, b: risk_lib.gauss_newton_trace_by_layer(plain_predict, losses.squared_loss, p, b, examples_per_chunk=-1),
     ValueError, "examples_per_chunk must be a positive integer"),
    (lambda p, b: risk_lib.perturbed_risk(plain_predict, losses.squared_loss, p, b, 0.1, jax.random.PRNGKey(0),
                                          draws_per_pass=0), ValueError, "draws_per_pass must be a positive integer"),
    (lambda p, b: risk_lib.gauss_newton_trace(plain_predict, losses.squared_loss, p, b, key=jax.random.PRNGKey(0),
                                              num_probes=2, probes_per_pass=0), ValueError, "probes_per_pass"),
    (lambda p, b: risk_lib.risk(plain_predict, losses.squared_loss, p, b[0]), ValueError, r"batch must be a pair"),
    (lambda p, b: risk_lib.risk(plain_predict, losses.squared_loss, p, (b[0][:0], b[1][:0])), ValueError,
     "batch is empty"),
    (lambda p, b: risk_lib.gauss_newton_diagonal(plain_predict, losses.squared_loss, p, (b[0][:0], b[1][:0])),
     ValueError, "batch is empty"),
    (lambda p, b: risk_lib.effective_risk(plain_predict, losses.squared_loss, p, (b[0][:0], b[1][:0]), 0.1),
     ValueError, "batch is empty"),
    (lambda p, b: risk_lib.risk(plain_predict, losses.squared_loss, p, b, microbatch_size=0), ValueError,
     "microbatch_size must be a positive integer"),
    (lambda p, b: risk_lib.gauss_newton_trace(plain_predict, losses.squared_loss, p, b, microbatch_size=2.5),
     ValueError, "microbatch_size must be a positive integer"),
    (lambda p, b: risk_lib.risk(plain_predict, losses.squared_loss, p, (b[0], b[1][:5]), microbatch_size=2),
     ValueError, "batch leaves must share a leading example axis"),
]


@pytest.mark.parametrize("call, error, message", BAD_RISK_INPUTS, ids=[str(i) for i in range(len(BAD_RISK_INPUTS))])
def test_bad_input_names_the_argument(call, error, message):
    _, params = _model("plain", 3)
    with pytest.raises(error, match=message):
        call(params, _data(losses.squared_loss, 3))
