"""Second-order accuracy of R_sigma^(eff) (Orvieto et al. 2023, Theorem 1 and Section 4).

As sigma shrinks over {1e-1, 3e-2, 1e-2}: |R_sigma - R| ~ sigma^2 and |R_sigma - R_sigma^(eff)| = O(sigma^3).
R_sigma is an exact expectation from ``lsgeo.theory`` (no Monte Carlo error), R^(eff) is lsgeo's generic
``effective_risk``; the log-log slopes are fitted over the three sigmas. Each test also runs a negative
control (a wrong effective risk, or the seed's transcription) to show the slope criterion discriminates.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from _jitted_theory import jitted  # noqa: E402  (tests/ is on sys.path under pytest)

from lsgeo import risk as risk_lib
from lsgeo.losses import squared_loss

SIGMAS = np.array([1e-1, 3e-2, 1e-2])


def slope(values):
    """Fitted exponent p of |values| ~ C sigma^p over SIGMAS."""
    values = np.abs(np.asarray(values, dtype=np.float64))
    assert np.all(values > 0), values
    return float(np.polyfit(np.log(SIGMAS), np.log(values), 1)[0])


def linear_predict(params, X):
    W1, W2 = params
    return (W2 @ W1 @ X.T).T


def diagonal_predict(params, X):
    w1, w2 = params
    return X @ (w1 * w1 - w2 * w2)


def relu_predict(params, X):
    return (params["W2"] @ jax.nn.relu(params["W1"] @ X.T)).T


@functools.partial(jax.jit, static_argnums=0)
def _effective_risk(predict, params, batch, sigma):
    return risk_lib.effective_risk(predict, squared_loss, params, batch, sigma)


def effective(predict, params, batch, sigmas):
    """lsgeo's generic R_sigma^(eff) (exact Gauss-Newton trace) at each sigma."""
    return np.array([float(_effective_risk(predict, params, batch, s)) for s in sigmas])


def test_linear_network_full_noise(x64):
    """Exact R_sigma (Section 3.1) vs generic R^(eff): R_sigma - R^(eff) = sigma^4 d1 d2 ||X||^2/(2n)."""
    rng = np.random.default_rng(0)
    n, d0, d1, d2 = 10, 4, 16, 2
    X, Y = jnp.asarray(rng.normal(size=(n, d0))), jnp.asarray(rng.normal(size=(n, d2)))
    W1 = jnp.asarray(rng.normal(size=(d1, d0)) / np.sqrt(d0))
    W2 = jnp.asarray(rng.normal(size=(d2, d1)) / np.sqrt(d1))
    R = float(jitted.linear_net_risk(W1, W2, X, Y))
    exact = np.array([float(jitted.linear_net_full_noise_risk(W1, W2, X, Y, s)) for s in SIGMAS])
    eff = effective(linear_predict, (W1, W2), (X, Y), SIGMAS)
    assert 1.9 <= slope(exact - R) <= 2.1
    assert slope(exact - eff) >= 2.9
    np.testing.assert_allclose(exact - eff, SIGMAS**4 * d1 * d2 * float(jnp.sum(X**2)) / (2 * n), rtol=1e-6)
    # negative control: an effective risk with half the regulariser is only first-order accurate in sigma^2
    wrong = R + 0.5 * (eff - R)
    assert slope(exact - wrong) < 2.5


def test_diagonal_network_full_noise(x64):
    """Exact R_sigma = R^(eff) + 2 sigma^4 ||X||^2 / n (Section 2.3; Theorem 1 with D^2Phi[I] = 0)."""
    rng = np.random.default_rng(1)
    n, d = 8, 12
    X, y = jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.normal(size=n))
    w1, w2 = jnp.asarray(rng.normal(size=d)), jnp.asarray(rng.normal(size=d))
    R = float(squared_loss(diagonal_predict((w1, w2), X), y))
    exact = np.array([float(jitted.diagonal_net_full_noise_risk(w1, w2, X, y, s)) for s in SIGMAS])
    eff = effective(diagonal_predict, (w1, w2), (X, y), SIGMAS)
    assert 1.9 <= slope(exact - R) <= 2.1
    assert slope(exact - eff) >= 2.9


def _relu_data(rng, n, d0, d1, d2, margin):
    """Unit-norm rows of W1 and rows of X with |cos(w_j, x_i)| >= margin for all j (rejection sampling):
    every pre-activation satisfies |(W1 X^T)_{ji}| >= margin ||x_i||."""
    W1 = rng.normal(size=(d1, d0))
    W1 /= np.linalg.norm(W1, axis=1, keepdims=True)
    rows = []
    for _ in range(100_000):
        x = rng.normal(size=d0)
        if np.min(np.abs(W1 @ x)) >= margin * np.linalg.norm(x):
            rows.append(x)
        if len(rows) == n:
            break
    assert len(rows) == n, "margin too large for rejection sampling"
    W2 = rng.normal(size=(d2, d1)) / np.sqrt(d1)
    return (jnp.asarray(np.stack(rows)), jnp.asarray(rng.normal(size=(n, d2))), jnp.asarray(W1), jnp.asarray(W2))


def test_relu_network_layerwise(x64):
    """One hidden ReLU layer, layer-wise noise (Section 3.3): exact R~_sigma (Gaussian ReLU moments) vs the
    generic R^(eff). The remainder comes only from pre-activations crossing 0, so it decays faster than
    any power once sigma ||x_i|| is below the margin; it is computed without cancellation."""
    rng = np.random.default_rng(2)
    X, Y, W1, W2 = _relu_data(rng, n=12, d0=3, d1=8, d2=2, margin=0.3)
    params = {"W1": W1, "W2": W2}
    R = float(jitted.relu_net_risk(W1, W2, X, Y))
    eff = effective(relu_predict, params, (X, Y), SIGMAS)
    exact = np.array([float(jitted.relu_net_layerwise_risk_exact(W1, W2, X, Y, s)) for s in SIGMAS])
    remainder = np.array([float(jitted.relu_net_layerwise_remainder(W1, W2, X, Y, s)) for s in SIGMAS])
    # the remainder is exactly exact - eff (to rounding of O(1) numbers)
    np.testing.assert_allclose(exact - eff, remainder, rtol=0, atol=1e-13)
    assert 1.9 <= slope(exact - R) <= 2.1
    assert slope(remainder) >= 2.9
    assert abs(remainder[0]) < 1e-2 * (exact[0] - R)
    # negative control: the seed transcription of the penalty (no d2, no ||x_i||^2) is not second-order accurate
    A = W1 @ X.T
    seed_penalty = float(jnp.sum(jax.nn.relu(A) ** 2) + jnp.sum(jnp.sum(W2**2, axis=0)[:, None] * (A > 0)))
    seed = R + SIGMAS**2 / (2 * X.shape[0]) * seed_penalty
    assert slope(exact - seed) < 2.5
