"""lsgeo.theory: each closed form of Orvieto et al. (2023) against lsgeo's generic computation.

The generic side is ``lsgeo.risk.effective_risk`` (R + sigma^2/2 tr(D2L DPhi DPhi^T), exact GN trace)
and ``lsgeo.risk.perturbed_risk`` (Monte Carlo R_sigma / layer-wise R~_sigma) on the matching model,
written as a plain ``predict(params, X)``. On the diagonal, two-layer linear and ReLU models a dense
jax.jacobian reference is checked as well, so a disagreement can be attributed to the closed form or
to the generic code.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jitted_theory import jitted  # noqa: E402  (tests/ is on sys.path under pytest)

from lsgeo import risk as risk_lib
from lsgeo import theory
from lsgeo.losses import squared_loss

TIGHT = dict(rtol=1e-11, atol=1e-12)


# ----------------------------------------------------------------------------- models in the paper's shapes


def diagonal_predict(params, X):
    """Phi(w) = X (w1 o w1 - w2 o w2), outputs [n]."""
    w1, w2 = params
    return X @ (w1 * w1 - w2 * w2)


def linear_predict(params, X):
    """Phi(w) = (W_M ... W_1 X^T)^T, outputs [n, d_M]; params a tuple (W_1, ..., W_M)."""
    h = X.T
    for W in params:
        h = W @ h
    return h.T


def relu_predict(params, X):
    """Phi(w) = (W2 (W1 X^T)_+)^T, outputs [n, d2]; params {"W1": [d1, d0], "W2": [d2, d1]}."""
    return (params["W2"] @ jax.nn.relu(params["W1"] @ X.T)).T


@functools.partial(jax.jit, static_argnums=0)
def dense_effective_risk(predict, params, batch, sigma):
    """Reference R + sigma^2/(2n) ||DPhi||_F^2 (squared loss: D2L = I/n) from a dense jax.jacobian."""
    X, Y = batch
    J = jax.jacobian(lambda p: predict(p, X))(params)
    gn = sum(jnp.sum(jnp.square(j)) for j in jax.tree_util.tree_leaves(J)) / X.shape[0]
    return squared_loss(predict(params, X), Y) + 0.5 * sigma**2 * gn


@functools.partial(jax.jit, static_argnums=0)
def generic_effective_risk(predict, params, batch, sigma):
    return risk_lib.effective_risk(predict, squared_loss, params, batch, sigma)


def check_effective(closed, predict, params, batch, sigma, *, dense=False):
    """closed == lsgeo's effective_risk (exact GN trace) [== dense jacobian reference], float64, tight."""
    np.testing.assert_allclose(closed, generic_effective_risk(predict, params, batch, sigma), **TIGHT)
    if dense:
        np.testing.assert_allclose(closed, dense_effective_risk(predict, params, batch, sigma), **TIGHT)


def mc_batches(predict, params, batch, sigma, key, *, mode, num_batches, per_batch):
    """``num_batches`` independent Monte Carlo estimates of R_sigma (mode="full") or R~_sigma
    (mode="layerwise"), each from ``per_batch`` draws; one compilation, reused for every key."""
    num_groups = len(jax.tree_util.tree_leaves(params)) if mode == "layerwise" else 1

    @jax.jit
    def one(k, p, b):
        return risk_lib.perturbed_risk(
            predict, squared_loss, p, b, sigma, k,
            num_samples=per_batch, mode=mode, draws_per_pass=per_batch * num_groups,
        )

    return np.array([float(one(k, params, batch)) for k in jax.random.split(key, num_batches)])


def mean_and_se(values):
    return float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values)))


def gaussian(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale)


def linear_data(rng, widths, n):
    """X [n, d0], Y [n, d_M], Ws with W_i [d_i, d_{i-1}] at the 1/sqrt(fan-in) scale."""
    X = gaussian(rng, n, widths[0])
    Y = gaussian(rng, n, widths[-1])
    Ws = tuple(gaussian(rng, widths[i + 1], widths[i], scale=1 / np.sqrt(widths[i])) for i in range(len(widths) - 1))
    return X, Y, Ws


# ----------------------------------------------------------------------------- diagonal net, Lasso (Section 2.3)


def test_lasso_weights(x64):
    rng = np.random.default_rng(0)
    X = gaussian(rng, 7, 4)
    np.testing.assert_allclose(jitted.lasso_weights(X, 0.3), 2 * 0.09 * np.diag(np.asarray(X.T @ X)) / 7, **TIGHT)


def test_diagonal_net_effective_risk_matches_generic(x64):
    rng = np.random.default_rng(1)
    n, d = 8, 12
    X, y = gaussian(rng, n, d), gaussian(rng, n)
    w1, w2 = gaussian(rng, d), gaussian(rng, d)
    for sigma in (0.0, 0.05, 0.7):
        closed = jitted.diagonal_net_effective_risk(w1, w2, X, y, sigma)
        check_effective(closed, diagonal_predict, (w1, w2), (X, y), sigma, dense=True)


def test_diagonal_net_full_noise_risk_monte_carlo(x64):
    """Exact R_sigma = R^(eff) + 2 sigma^4 ||X||_F^2 / n against Monte Carlo R_sigma."""
    rng = np.random.default_rng(2)
    n, d, sigma = 6, 10, 0.5
    X, y = gaussian(rng, n, d), gaussian(rng, n)
    w1, w2 = gaussian(rng, d, scale=0.5), gaussian(rng, d, scale=0.5)
    R = float(squared_loss(diagonal_predict((w1, w2), X), y))
    values = mc_batches(diagonal_predict, (w1, w2), (X, y), sigma, jax.random.key(0), mode="full",
                        num_batches=16, per_batch=256)
    mc, se = mean_and_se(values - R)
    exact = float(jitted.diagonal_net_full_noise_risk(w1, w2, X, y, sigma)) - R
    effective = float(jitted.diagonal_net_effective_risk(w1, w2, X, y, sigma)) - R
    assert abs(mc - exact) < 3 * se, (mc, exact, se)
    assert abs(mc - effective) > 3 * se, (mc, effective, se)  # the sigma^4 term is real


def test_lasso_equivalence(x64):
    """min over w1^2 - w2^2 = beta of Eq. (7) is the Lasso of Eq. (8), attained at sqrt(beta_+-)."""
    rng = np.random.default_rng(3)
    n, d, sigma = 9, 5, 0.4
    X, y, beta = gaussian(rng, n, d), gaussian(rng, n), gaussian(rng, d)
    w1, w2 = theory.lasso_to_diagonal_net(beta)
    np.testing.assert_allclose(theory.diagonal_net_to_lasso(w1, w2), beta, **TIGHT)
    assert float(jnp.min(w1 * w2)) == 0.0
    lasso = jitted.lasso_objective(beta, X, y, sigma)
    np.testing.assert_allclose(jitted.diagonal_net_effective_risk(w1, w2, X, y, sigma), lasso, **TIGHT)
    for t in np.linspace(0.1, 2.0, 5):  # other factorisations of the same beta: (w1, w2) -> sqrt(w^2 + t)
        v1, v2 = jnp.sqrt(w1**2 + t), jnp.sqrt(w2**2 + t)
        np.testing.assert_allclose(theory.diagonal_net_to_lasso(v1, v2), beta, rtol=1e-10, atol=1e-12)
        assert jitted.diagonal_net_effective_risk(v1, v2, X, y, sigma) > lasso


# ----------------------------------------------------------------------------- linear nets (Sections 2.4, 3.1, 3.2, 4)


@pytest.mark.parametrize("widths", [(3, 5, 2), (4, 1, 3)])
def test_linear_net_effective_risk_matches_generic(x64, widths):
    rng = np.random.default_rng(4)
    X, Y, (W1, W2) = linear_data(rng, widths, n=7)
    sigma = 0.3
    closed = jitted.linear_net_effective_risk(W1, W2, X, Y, sigma)
    check_effective(closed, linear_predict, (W1, W2), (X, Y), sigma, dense=True)
    # the two-layer case of Section 4's deep formula
    np.testing.assert_allclose(jitted.deep_linear_layerwise_risk([W1, W2], X, Y, sigma), closed, **TIGHT)
    np.testing.assert_allclose(
        jitted.linear_net_risk(W1, W2, X, Y), jitted.linear_net_effective_risk(W1, W2, X, Y, 0.0), **TIGHT
    )


def test_linear_net_full_noise_risk_monte_carlo(x64):
    """Section 3.1: at width 64, sigma = 0.3 the sigma^4 d1 d2 ||X||^2/(2n) term is many standard errors."""
    rng = np.random.default_rng(5)
    X, Y, (W1, W2) = linear_data(rng, (3, 64, 2), n=10)
    sigma = 0.3
    R = float(jitted.linear_net_risk(W1, W2, X, Y))
    values = mc_batches(linear_predict, (W1, W2), (X, Y), sigma, jax.random.key(1), mode="full",
                        num_batches=16, per_batch=256)
    mc, se = mean_and_se(values - R)
    exact = float(jitted.linear_net_full_noise_risk(W1, W2, X, Y, sigma)) - R
    without_quartic = float(jitted.linear_net_effective_risk(W1, W2, X, Y, sigma)) - R
    quartic = sigma**4 * 64 * 2 * float(jnp.sum(X**2)) / (2 * 10)
    np.testing.assert_allclose(exact - without_quartic, quartic, rtol=1e-12)
    assert quartic > 6 * se
    assert abs(mc - exact) < 3 * se, (mc, exact, se)
    assert abs(mc - without_quartic) > 3 * se, (mc, without_quartic, se)


@pytest.mark.parametrize("widths", [(3, 8, 6, 2), (2, 5, 4, 6, 3)])
def test_deep_linear_layerwise_risk_matches_generic(x64, widths):
    """Section 4: the exact layer-wise risk equals R^(eff) of Eq. (11)."""
    rng = np.random.default_rng(6)
    X, Y, Ws = linear_data(rng, widths, n=8)
    closed = jitted.deep_linear_layerwise_risk(Ws, X, Y, 0.25)
    check_effective(closed, linear_predict, Ws, (X, Y), 0.25)


def test_deep_linear_layerwise_risk_monte_carlo(x64):
    """Section 4: exact layer-wise risk == Monte Carlo layer-wise R~_sigma (noise sigma sqrt(M) on one layer)."""
    rng = np.random.default_rng(6)
    X, Y, Ws = linear_data(rng, (3, 8, 6, 2), n=8)
    sigma = 0.25
    closed = jitted.deep_linear_layerwise_risk(Ws, X, Y, sigma)
    R = float(jitted.deep_linear_risk(Ws, X, Y))
    values = mc_batches(linear_predict, Ws, (X, Y), sigma, jax.random.key(2), mode="layerwise",
                        num_batches=16, per_batch=128)
    mc, se = mean_and_se(values - R)
    assert abs(mc - (float(closed) - R)) < 3 * se, (mc, float(closed) - R, se)
    assert float(closed) - R > 6 * se  # the regulariser itself is resolved by the Monte Carlo


def test_deep_linear_layerwise_risk_last_layer_uses_output_width(x64):
    """The j = M term is d_M ||W_{M-1}..W_1 X^T||^2 (||I_{d_M}||_F^2 = d_M), the j = 1 term ||W_M..W_2||^2 ||X||^2."""
    rng = np.random.default_rng(7)
    X, Y, Ws = linear_data(rng, (2, 3, 4), n=5)
    W1, W2 = Ws
    penalty = 4 * jnp.sum((W1 @ X.T) ** 2) + jnp.sum(W2**2) * jnp.sum(X**2)
    expected = jitted.deep_linear_risk(Ws, X, Y) + 0.5 * 0.1**2 / 5 * penalty
    np.testing.assert_allclose(jitted.deep_linear_layerwise_risk(Ws, X, Y, 0.1), expected, **TIGHT)


# ----------------------------------------------------------------------------- one hidden ReLU layer (Section 3.3)


def relu_data(rng, n, d0, d1, d2, margin=0.0):
    """Unit-norm rows of W1 and rows of X with |cos(w_j, x_i)| >= margin for all j (rejection sampling),
    so that every pre-activation satisfies |(W1 X^T)_{ji}| >= margin ||x_i|| and none is 0."""
    W1 = rng.normal(size=(d1, d0))
    W1 /= np.linalg.norm(W1, axis=1, keepdims=True)
    rows = []
    for _ in range(100_000):
        x = rng.normal(size=d0)
        if np.min(np.abs(W1 @ x)) >= max(margin * np.linalg.norm(x), 1e-8):
            rows.append(x)
        if len(rows) == n:
            break
    assert len(rows) == n, "margin too large for rejection sampling"
    X = np.stack(rows)
    W2 = rng.normal(size=(d2, d1)) / np.sqrt(d1)
    Y = rng.normal(size=(n, d2))
    return jnp.asarray(X), jnp.asarray(Y), jnp.asarray(W1), jnp.asarray(W2)


def test_relu_net_layerwise_risk_matches_generic(x64):
    rng = np.random.default_rng(8)
    X, Y, W1, W2 = relu_data(rng, n=9, d0=3, d1=6, d2=2)
    sigma = 0.2
    params = {"W1": W1, "W2": W2}
    closed = jitted.relu_net_layerwise_risk(W1, W2, X, Y, sigma)
    check_effective(closed, relu_predict, params, (X, Y), sigma, dense=True)
    # The seed transcription (no d2 on the W2 term, no ||x_i||^2 on the W1 term) is not the GN trace.
    A = W1 @ X.T
    seed = jitted.relu_net_risk(W1, W2, X, Y) + sigma**2 / (2 * 9) * (
        jnp.sum(jax.nn.relu(A) ** 2) + jnp.sum(jnp.sum(W2**2, axis=0)[:, None] * (A > 0))
    )
    assert abs(float(seed - closed)) > 1e-3 * float(closed - jitted.relu_net_risk(W1, W2, X, Y))


def test_relu_net_layerwise_risk_exact_monte_carlo(x64):
    """The exact layer-wise risk (Gaussian ReLU moments) against Monte Carlo R~_sigma, with small
    pre-activations so that they cross 0 often and the beyond-second-order remainder is resolved."""
    rng = np.random.default_rng(9)
    X, Y, W1, W2 = relu_data(rng, n=9, d0=3, d1=6, d2=2)
    W1 = 0.2 * W1
    sigma = 0.3
    params = {"W1": W1, "W2": W2}
    R = float(jitted.relu_net_risk(W1, W2, X, Y))
    values = mc_batches(relu_predict, params, (X, Y), sigma, jax.random.key(3), mode="layerwise",
                        num_batches=16, per_batch=128)
    mc, se = mean_and_se(values - R)
    exact = float(jitted.relu_net_layerwise_risk_exact(W1, W2, X, Y, sigma)) - R
    second = float(jitted.relu_net_layerwise_risk(W1, W2, X, Y, sigma)) - R
    remainder = float(jitted.relu_net_layerwise_remainder(W1, W2, X, Y, sigma))
    np.testing.assert_allclose(exact - second, remainder, rtol=1e-9)
    assert abs(mc - exact) < 3 * se, (mc, exact, se)
    assert abs(mc - second) > 3 * se, (mc, second, se)


def test_relu_remainder_vanishes_with_sigma(x64):
    rng = np.random.default_rng(10)
    X, Y, W1, W2 = relu_data(rng, n=9, d0=3, d1=6, d2=2, margin=0.3)
    assert float(jitted.relu_net_layerwise_remainder(W1, W2, X, Y, 0.0)) == 0.0
    np.testing.assert_allclose(
        jitted.relu_net_layerwise_risk_exact(W1, W2, X, Y, 0.0), jitted.relu_net_risk(W1, W2, X, Y), **TIGHT
    )
    assert abs(float(jitted.relu_net_layerwise_remainder(W1, W2, X, Y, 0.01))) < 1e-30


# ----------------------------------------------------------------------------- nuclear norm (Section 2.4)


@pytest.mark.parametrize("shape", [(12, 4, 3, 6), (5, 8, 3, 4), (10, 4, 3, 2)], ids=["n>d0", "d0>n", "lowrank"])
def test_nuclear_norm_is_min_over_factorisations(x64, shape):
    """min_{W2 W1 = M} Eq. (9) = Eq. (10), attained at the balanced factorisation."""
    n, d0, d2, d1 = shape
    rng = np.random.default_rng(11)
    X, Y = gaussian(rng, n, d0), gaussian(rng, n, d2)
    if shape[3] == 2:  # rank-2 M with d1 = 2 < min(d2, d0)
        M = gaussian(rng, d2, 2) @ gaussian(rng, 2, d0)
    else:
        M = gaussian(rng, d2, d0)
    sigma = 0.3
    W1, W2 = theory.balanced_factorization(M, X, d1)
    assert W1.shape == (d1, d0) and W2.shape == (d2, d1)
    np.testing.assert_allclose(W2 @ W1, M, rtol=1e-10, atol=1e-10)
    target = jitted.nuclear_norm_objective(M, X, Y, sigma)
    np.testing.assert_allclose(jitted.linear_net_effective_risk(W1, W2, X, Y, sigma), target, rtol=1e-10)
    # other factorisations of the same M: W1 -> G W1, W2 -> W2 G^-1 (numpy algebra: cheaper than eager jnp)
    W1_np, W2_np = np.asarray(W1), np.asarray(W2)
    for _ in range(10):
        G = np.eye(d1) + 0.5 * rng.normal(size=(d1, d1))
        V1, V2 = G @ W1_np, W2_np @ np.linalg.inv(G)
        np.testing.assert_allclose(V2 @ V1, M, rtol=1e-8, atol=1e-8)
        assert jitted.linear_net_effective_risk(jnp.asarray(V1), jnp.asarray(V2), X, Y, sigma) >= target - 1e-12
    for c in (0.5, 2.0):  # unbalanced rescaling
        assert jitted.linear_net_effective_risk(c * W1, W2 / c, X, Y, sigma) > target


def test_nuclear_norm_min_with_wide_factor(x64):
    """A random W1 of full column rank with W2 = M W1^+ is another factorisation; it never beats Eq. (10)."""
    rng = np.random.default_rng(12)
    n, d0, d1, d2 = 9, 3, 7, 2
    X, Y, M = gaussian(rng, n, d0), gaussian(rng, n, d2), gaussian(rng, d2, d0)
    target = jitted.nuclear_norm_objective(M, X, Y, 0.2)
    for _ in range(10):
        W1 = rng.normal(size=(d1, d0))
        W2 = np.asarray(M) @ np.linalg.pinv(W1)
        np.testing.assert_allclose(W2 @ W1, M, rtol=1e-10, atol=1e-10)
        assert jitted.linear_net_effective_risk(jnp.asarray(W1), jnp.asarray(W2), X, Y, 0.2) > target


def test_balanced_factorization_rejects_small_width(x64):
    rng = np.random.default_rng(13)
    X, M = gaussian(rng, 8, 4), gaussian(rng, 3, 4)
    with pytest.raises(ValueError, match="d1"):
        theory.balanced_factorization(M, X, 2)
    # n = 1 < d2: M X^T has rank 1, M's part outside the row space of X cannot be carried by W2
    with pytest.raises(ValueError, match="row space of X"):
        theory.balanced_factorization(M, X[:1], 3)


# ----------------------------------------------------------------------------- jit and bad input


def test_closed_forms_eager_equals_jit_and_differentiable(x64):
    """Every numeric test above runs the closed forms under jit (traced sigma); here eager == jit, and the
    nuclear-norm objective of Eq. (10) is differentiable (for optimising it directly)."""
    rng = np.random.default_rng(14)
    X, Y, (W1, W2) = linear_data(rng, (3, 4, 2), n=6)
    np.testing.assert_allclose(
        theory.linear_net_full_noise_risk(W1, W2, X, Y, 0.3), jitted.linear_net_full_noise_risk(W1, W2, X, Y, 0.3),
        rtol=1e-12,
    )
    M = W2 @ W1
    grad = jax.jit(jax.grad(theory.nuclear_norm_objective))(M, X, Y, 0.3)
    direction = jnp.asarray(rng.normal(size=M.shape))
    eps = 1e-6
    fd = (jitted.nuclear_norm_objective(M + eps * direction, X, Y, 0.3)
          - jitted.nuclear_norm_objective(M - eps * direction, X, Y, 0.3)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grad, direction), fd, rtol=1e-6)


def _bad_calls():
    rng = np.random.default_rng(15)
    X, Y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    W1, W2 = rng.normal(size=(4, 3)), rng.normal(size=(2, 4))
    w, y = rng.normal(size=3), rng.normal(size=6)
    M = W2 @ W1
    two_layer = [theory.linear_net_effective_risk, theory.linear_net_full_noise_risk,
                 theory.relu_net_layerwise_risk, theory.relu_net_layerwise_risk_exact]
    calls = []
    for f in two_layer:
        name = f.__name__
        calls += [
            (f"{name}-sigma", functools.partial(f, W1, W2, X, Y), "sigma"),
            (f"{name}-W1", lambda f=f: f(W1[:, :2], W2, X, Y, 0.1), "W1"),
            (f"{name}-W2", lambda f=f: f(W1, W2[:, :3], X, Y, 0.1), "W2"),
            (f"{name}-Y", lambda f=f: f(W1, W2, X, Y[:5], 0.1), "Y"),
            (f"{name}-X", lambda f=f: f(W1, W2, X[0], Y, 0.1), "X"),
        ]
    calls += [
        ("deep-sigma", lambda s: theory.deep_linear_layerwise_risk([W1, W2], X, Y, s), "sigma"),
        ("deep-W", lambda: theory.deep_linear_layerwise_risk([W1, W2[:, :3]], X, Y, 0.1), r"Ws\[1\]"),
        ("deep-Y", lambda: theory.deep_linear_layerwise_risk([W1, W2], X, Y[:, :1], 0.1), "Y"),
        ("deep-empty", lambda: theory.deep_linear_layerwise_risk([], X, Y, 0.1), "Ws"),
        ("diag-sigma", lambda s: theory.diagonal_net_effective_risk(w, w, X, y, s), "sigma"),
        ("diag-w1", lambda: theory.diagonal_net_effective_risk(w[:2], w, X, y, 0.1), "w1"),
        ("diag-w2", lambda: theory.diagonal_net_effective_risk(w, w[:2], X, y, 0.1), "w2"),
        ("diag-y", lambda: theory.diagonal_net_effective_risk(w, w, X, y[:4], 0.1), "y"),
        ("diag-full-sigma", lambda s: theory.diagonal_net_full_noise_risk(w, w, X, y, s), "sigma"),
        ("lasso-sigma", lambda s: theory.lasso_weights(X, s), "sigma"),
        ("lasso-X", lambda: theory.lasso_weights(y, 0.1), "X"),
        ("lasso-beta", lambda: theory.lasso_objective(w[:2], X, y, 0.1), "beta"),
        ("nuclear-sigma", lambda s: theory.nuclear_norm_objective(M, X, Y, s), "sigma"),
        ("nuclear-M", lambda: theory.nuclear_norm_objective(M[:, :2], X, Y, 0.1), "M"),
        ("nuclear-Y", lambda: theory.nuclear_norm_objective(M, X, Y[:, :1], 0.1), "Y"),
        ("balanced-d1", lambda: theory.balanced_factorization(M, X, 0), "d1"),
    ]
    return calls


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_value_error_naming_argument(case):
    _, call, name = case
    if name == "sigma":
        for bad in (-0.1, float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError, match=name):
                call(bad)
    else:
        with pytest.raises(ValueError, match=name):
            call()
