"""Closed forms of the noise-injection paper (Orvieto, Raj, Kersting, Bach, AISTATS 2023).

Notation and shapes (the paper's):

- ``X`` is ``[n, d0]`` (rows x_i), ``Y`` is ``[n, d_M]``, ``y`` is ``[n]`` for the diagonal net;
- ``W_i`` is ``[d_i, d_{i-1}]``, so that Phi(w) = W_M ... W_1 X^T is ``[d_M, n]``;
- ``w1``, ``w2`` are ``[d]`` and Phi(w) = X (w1 o w1 - w2 o w2) for the diagonal net;
- L(phi) = 1/(2n) ||Y^T - phi||_F^2 (the squared loss of ``lsgeo.losses.squared_loss``).

Everything here is a consequence of two Gaussian identities, for E with i.i.d. N(0, 1) entries:

    E[A E B] = 0,        E ||A E B||_F^2 = ||A||_F^2 ||B||_F^2,

and of the general expansion (Section 2.1, Eq. 5)

    R_sigma(w) = R(w) + sigma^2/2 DL D^2Phi[I] + sigma^2/2 D^2L[DPhi DPhi^T] + O(sigma^3),

whose last term is the effective regulariser of Eq. (6) (for the squared loss D^2L = I/n, so it is
sigma^2/(2n) ||DPhi(w)||_F^2, the trace of the empirical NTK over n). For the diagonal net and for
linear nets D^2Phi[I] = 0 (no diagonal second derivatives), and for one-hidden-layer ReLU nets
D^2Phi[I] = 0 almost everywhere, so R_sigma^(eff) is the second-order value in all of them.

Layer-wise noise (Sections 3.2 and 4): one of the M layers j, uniform, receives sigma sqrt(M) E_j;
R~_sigma = 1/M sum_j E L(Phi(.., W_j + sigma sqrt(M) E_j, ..)). Its second-order term equals that of
full noise (same covariance sigma^2 I), but no product E_i E_j of two noises ever appears, so the
sigma^4 d_1 d_2 term that makes full noise explode with width is absent.

All functions are pure ``jax.numpy``, jit/vmap compatible; shape errors and bad ``sigma`` (negative,
non-finite; checked when concrete) raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from lsgeo.validation import check_sigma, is_concrete

__all__ = [
    "lasso_weights",
    "lasso_objective",
    "diagonal_net_to_lasso",
    "lasso_to_diagonal_net",
    "diagonal_net_effective_risk",
    "diagonal_net_full_noise_risk",
    "linear_net_risk",
    "linear_net_effective_risk",
    "linear_net_full_noise_risk",
    "deep_linear_risk",
    "deep_linear_layerwise_risk",
    "relu_net_risk",
    "relu_net_layerwise_risk",
    "relu_net_layerwise_risk_exact",
    "relu_net_layerwise_remainder",
    "nuclear_norm",
    "nuclear_norm_objective",
    "balanced_factorization",
]




def _ndim(x, ndim: int, name: str) -> None:
    if np.ndim(x) != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {np.shape(x)}")


def _check_X(X) -> tuple[int, int]:
    _ndim(X, 2, "X")
    return np.shape(X)


def _check_chain(Ws: Sequence, X, Y, names: Sequence[str]) -> None:
    """W_1 [d1, d0], ..., W_M [d_M, d_{M-1}], X [n, d0], Y [n, d_M]."""
    n, d0 = _check_X(X)
    prev = d0
    for W, name in zip(Ws, names):
        _ndim(W, 2, name)
        if np.shape(W)[1] != prev:
            raise ValueError(
                f"{name} must have {prev} columns (the width of the layer below), got shape {np.shape(W)}"
            )
        prev = np.shape(W)[0]
    _ndim(Y, 2, "Y")
    if np.shape(Y) != (n, prev):
        raise ValueError(f"Y must have shape ({n}, {prev}) = (n, d_M), got {np.shape(Y)}")


def _check_diagonal(w1, w2, X, y) -> None:
    n, d = _check_X(X)
    for w, name in ((w1, "w1"), (w2, "w2")):
        if np.shape(w) != (d,):
            raise ValueError(f"{name} must have shape ({d},) = (d,) with X of shape {np.shape(X)}, got {np.shape(w)}")
    if np.shape(y) != (n,):
        raise ValueError(f"y must have shape ({n},) = (n,), got {np.shape(y)}")


def _sq(a) -> jax.Array:
    return jnp.sum(jnp.square(a))




def lasso_weights(X, sigma) -> jax.Array:
    """Per-coordinate l1 weights of the Lasso induced by noise on a diagonal net, ``[d]``.

        lambda = 2 sigma^2 diag(X^T X / n),   i.e. lambda_k = 2 sigma^2 ||X_{:, k}||^2 / n.

    Section 2.3, Eq. (8). Cost O(n d).
    """
    check_sigma(sigma)
    n, _ = _check_X(X)
    return 2.0 * sigma**2 * jnp.sum(jnp.square(X), axis=0) / n


def diagonal_net_to_lasso(w1, w2) -> jax.Array:
    """The Lasso variable of a diagonal net, beta = w1 o w1 - w2 o w2 (Section 2.3)."""
    if np.shape(w1) != np.shape(w2) or np.ndim(w1) != 1:
        raise ValueError(f"w1 and w2 must be 1-D of equal shape, got w1 {np.shape(w1)} and w2 {np.shape(w2)}")
    return w1 * w1 - w2 * w2


def lasso_to_diagonal_net(beta) -> tuple[jax.Array, jax.Array]:
    """The minimum-norm diagonal net with w1^2 - w2^2 = beta: w1 = sqrt(beta_+), w2 = sqrt(beta_-).

    Among all (w1, w2) with w1^2 - w2^2 = beta, this one minimises w1^2 + w2^2 (= |beta|), hence the
    penalty of Eq. (7); it turns the effective risk into the Lasso objective (Eq. 8).
    """
    _ndim(beta, 1, "beta")
    return jnp.sqrt(jnp.maximum(beta, 0.0)), jnp.sqrt(jnp.maximum(-beta, 0.0))


def lasso_objective(beta, X, y, sigma) -> jax.Array:
    """The weighted Lasso of Section 2.3, Eq. (8):

        1/(2n) ||y - X beta||^2 + 2 sigma^2 diag(X^T X / n)^T |beta|.

    ``min_{w1^2 - w2^2 = beta} diagonal_net_effective_risk(w1, w2, ...)`` equals this (attained at
    ``lasso_to_diagonal_net(beta)``), because w1^2 + w2^2 >= |w1^2 - w2^2| with equality iff
    min(w1^2, w2^2) = 0.
    """
    check_sigma(sigma)
    n, d = _check_X(X)
    if np.shape(beta) != (d,):
        raise ValueError(f"beta must have shape ({d},), got {np.shape(beta)}")
    if np.shape(y) != (n,):
        raise ValueError(f"y must have shape ({n},), got {np.shape(y)}")
    return 0.5 * _sq(y - X @ beta) / n + jnp.dot(lasso_weights(X, sigma), jnp.abs(beta))


def diagonal_net_effective_risk(w1, w2, X, y, sigma) -> jax.Array:
    """R_sigma^(eff) of the diagonal net Phi(w) = X (w1 o w1 - w2 o w2), squared loss.

        R^(eff) = 1/(2n) ||y - X(w1^2 - w2^2)||^2 + 2 sigma^2 diag(X^T X/n)^T (w1^2 + w2^2).

    Section 2.3, Eq. (7). Derivation: dPhi/dw1 = 2 X diag(w1), dPhi/dw2 = -2 X diag(w2), so
    ||DPhi||_F^2 = 4 sum_k ||X_{:,k}||^2 (w1_k^2 + w2_k^2); times sigma^2/(2n) (D^2L = I/n) gives the
    penalty. D^2Phi[I] = X(2*1 - 2*1) = 0, so Theorem 1 applies. Cost O(n d).
    """
    check_sigma(sigma)
    _check_diagonal(w1, w2, X, y)
    n = np.shape(X)[0]
    fit = 0.5 * _sq(y - X @ (w1 * w1 - w2 * w2)) / n
    return fit + jnp.dot(lasso_weights(X, sigma), w1 * w1 + w2 * w2)


def diagonal_net_full_noise_risk(w1, w2, X, y, sigma) -> jax.Array:
    """Exact R_sigma of the diagonal net under full noise (not in the paper; derived here):

        R_sigma = R_sigma^(eff) + 2 sigma^4 ||X||_F^2 / n.

    Derivation: Phi(w + sigma eps) = Phi(w) + 2 sigma X(w1 o e1 - w2 o e2) + sigma^2 X(e1^2 - e2^2).
    The last term has mean zero and is uncorrelated with the first-order term (odd moments vanish);
    its coordinates e1_k^2 - e2_k^2 are independent with variance 4, so it adds
    sigma^4 * 4 ||X||_F^2 / (2n). Useful for exact second-order-accuracy checks (Theorem 1).
    """
    base = diagonal_net_effective_risk(w1, w2, X, y, sigma)  # validates the arguments
    return base + 2.0 * sigma**4 * _sq(X) / np.shape(X)[0]




def linear_net_risk(W1, W2, X, Y) -> jax.Array:
    """R(W1, W2) = 1/(2n) ||Y^T - W2 W1 X^T||_F^2 (Section 2.4)."""
    return deep_linear_risk([W1, W2], X, Y)


def linear_net_effective_risk(W1, W2, X, Y, sigma) -> jax.Array:
    """R_sigma^(eff) of the two-layer linear net Phi = W2 W1 X^T, squared loss.

        R^(eff) = 1/(2n) ||Y^T - W2 W1 X^T||_F^2 + sigma^2/(2n) [d2 ||W1 X^T||_F^2 + ||W2||_F^2 ||X||_F^2].

    Section 2.4, Eq. (9). Derivation: DPhi[dW1, dW2] = W2 dW1 X^T + dW2 W1 X^T; summing the squared
    Frobenius norms over unit directions, sum_{ab} ||W2 e_a e_b^T X^T||^2 = ||W2||_F^2 ||X||_F^2 and
    sum_{ab} ||e_a e_b^T W1 X^T||^2 = d2 ||W1 X^T||_F^2; D^2L = I/n. This is also the *exact*
    layer-wise risk R~_sigma (noise sigma sqrt(2) E_j on one of the two layers; Section 3.2), because
    Phi is linear in each layer separately. Cost O(n d0 d1 + n d1 d2).
    """
    check_sigma(sigma)
    _check_chain([W1, W2], X, Y, ["W1", "W2"])
    n = np.shape(X)[0]
    d2 = np.shape(W2)[0]
    H = W1 @ X.T
    fit = 0.5 * _sq(Y.T - W2 @ H) / n
    return fit + 0.5 * sigma**2 / n * (d2 * _sq(H) + _sq(W2) * _sq(X))


def linear_net_full_noise_risk(W1, W2, X, Y, sigma) -> jax.Array:
    """Exact R_sigma = E L(Phi(w + sigma eps)) of the two-layer linear net under full noise.

        R_sigma = R + sigma^2/(2n) [||W2||_F^2 ||X||_F^2 + d2 ||X W1^T||_F^2] + sigma^4/(2n) d1 d2 ||X||_F^2.

    Section 3.1. Derivation: (W2 + sigma E2)(W1 + sigma E1) X^T
    = Phi + sigma (W2 E1 + E2 W1) X^T + sigma^2 E2 E1 X^T. All cross terms have mean zero (each
    contains an odd power of E1 or E2); E||E2 E1 X^T||_F^2 = d2 E||E1 X^T||_F^2 = d1 d2 ||X||_F^2.
    The sigma^4 term is the variance explosion: it grows linearly with the width d1.
    """
    base = linear_net_effective_risk(W1, W2, X, Y, sigma)
    n = np.shape(X)[0]
    d2, d1 = np.shape(W2)
    return base + 0.5 * sigma**4 / n * d1 * d2 * _sq(X)


def deep_linear_risk(Ws: Sequence, X, Y) -> jax.Array:
    """R(W_1..W_M) = 1/(2n) ||Y^T - W_M ... W_1 X^T||_F^2 (Section 4)."""
    names = [f"Ws[{j}]" for j in range(len(Ws))]
    _check_chain(Ws, X, Y, names)
    H = X.T
    for W in Ws:
        H = W @ H
    return 0.5 * _sq(Y.T - H) / np.shape(X)[0]


def deep_linear_layerwise_risk(Ws: Sequence, X, Y, sigma) -> jax.Array:
    """Exact layer-wise risk R~_sigma of the deep linear net Phi = W_M ... W_1 X^T.

        R~_sigma = L(Phi) + sigma^2/(2n) sum_{j=1}^M ||W_M ... W_{j+1}||_F^2 ||W_{j-1} ... W_1 X^T||_F^2,

    with empty products the identity (||I_{d_M}||_F^2 = d_M for j = M; X^T for j = 1).
    Section 4. Derivation: perturbing layer j by sigma sqrt(M) E_j adds sigma sqrt(M) A_j E_j B_j with
    A_j = W_M..W_{j+1}, B_j = W_{j-1}..W_1 X^T; its mean is zero and E||A E B||_F^2 = ||A||^2 ||B||^2,
    so each layer contributes M sigma^2/(2n) ||A_j||^2 ||B_j||^2, averaged over j with weight 1/M.
    It equals R_sigma^(eff) (Eq. 11) exactly. Cost O(M) matrix products.
    """
    check_sigma(sigma)
    Ws = list(Ws)
    if len(Ws) == 0:
        raise ValueError("Ws must contain at least one weight matrix")
    names = [f"Ws[{j}]" for j in range(len(Ws))]
    _check_chain(Ws, X, Y, names)
    n = np.shape(X)[0]
    # B_j = W_{j-1} ... W_1 X^T (forward), A_j = W_M ... W_{j+1} (backward).
    below = [X.T]
    for W in Ws[:-1]:
        below.append(W @ below[-1])
    Phi = Ws[-1] @ below[-1]
    above_sq = [None] * len(Ws)
    A = None
    for j in range(len(Ws) - 1, -1, -1):
        above_sq[j] = jnp.asarray(np.shape(Ws[-1])[0], dtype=Phi.dtype) if A is None else _sq(A)
        A = Ws[j] if A is None else A @ Ws[j]
    penalty = sum(a * _sq(b) for a, b in zip(above_sq, below))
    return 0.5 * _sq(Y.T - Phi) / n + 0.5 * sigma**2 / n * penalty




def relu_net_risk(W1, W2, X, Y) -> jax.Array:
    """R(W1, W2) = 1/(2n) ||Y^T - W2 (W1 X^T)_+||_F^2 (Section 3.3)."""
    _check_chain([W1, W2], X, Y, ["W1", "W2"])
    return 0.5 * _sq(Y.T - W2 @ jax.nn.relu(W1 @ X.T)) / np.shape(X)[0]


def relu_net_layerwise_risk(W1, W2, X, Y, sigma) -> jax.Array:
    """Second-order layer-wise risk of Phi = W2 (W1 X^T)_+ (equal to R_sigma^(eff), Eq. 6):

        R~_sigma ~= R + sigma^2/(2n) [ d2 ||(W1 X^T)_+||_F^2
                                       + sum_{i,j} ||(W2)_{:,j}||^2 1[(W1 X^T)_{ji} > 0] ||x_i||^2 ].

    Section 3.3 (the seed transcription drops the factor d2 and the ||x_i||^2; both are derived here).
    Derivation, with noise sigma sqrt(2) E_j on one of the two layers (probability 1/2 each):
    - W2: Phi changes by sigma sqrt(2) E2 H, H = (W1 X^T)_+ (exact, Phi is linear in W2);
      E||E2 H||_F^2 = d2 ||H||_F^2, so this layer adds 1/2 * 2 sigma^2 d2 ||H||^2 / (2n).
    - W1: to first order column i changes by sigma sqrt(2) W2 diag(m_i) E1 x_i, m_i = 1[W1 x_i > 0];
      E1 x_i ~ N(0, ||x_i||^2 I), so E||.||^2 = 2 sigma^2 ||x_i||^2 sum_j ||(W2)_{:,j}||^2 m_{ji}.
    The ReLU has no curvature away from 0, so D^2Phi[I] = 0 a.e. and there is no DL D^2Phi term.
    The rest (pre-activations crossing 0) is exponentially small in min |W1 x_i| / (sigma ||x_i||);
    see ``relu_net_layerwise_risk_exact``. Cost O(n d1 (d0 + d2)).
    """
    check_sigma(sigma)
    _check_chain([W1, W2], X, Y, ["W1", "W2"])
    n = np.shape(X)[0]
    d2 = np.shape(W2)[0]
    A = W1 @ X.T
    H = jax.nn.relu(A)
    fit = 0.5 * _sq(Y.T - W2 @ H) / n
    active = (A > 0).astype(A.dtype)
    col_sq = jnp.sum(jnp.square(W2), axis=0)  # ||(W2)_{:,j}||^2, [d1]
    x_sq = jnp.sum(jnp.square(X), axis=1)  # ||x_i||^2, [n]
    penalty = d2 * _sq(H) + col_sq @ active @ x_sq
    return fit + 0.5 * sigma**2 / n * penalty


def _relu_gaussian_moments(a, s):
    """For r = (a + s g)_+, g ~ N(0,1): returns (E r - a_+, Var r - 1[a>0] s^2) without cancellation.

    With u = |a|/s, psi(u) = E(g - u)_+ = phi(u) - u Phi(-u), kappa(u) = E(g - u)_+^2
    = (1 + u^2) Phi(-u) - u phi(u):
        E r - a_+ = s psi(u),    Var r - 1[a>0] s^2 = s^2 [kappa(u) - psi(u)^2 - 2 1[a>0] Phi(-u)].
    """
    positive = s > 0
    u = jnp.where(positive, jnp.abs(a) / jnp.where(positive, s, 1.0), 1e6)
    u = jnp.minimum(u, 1e6)
    pdf = jnp.exp(-0.5 * u * u) / jnp.sqrt(2.0 * jnp.pi)
    tail = ndtr(-u)
    psi = pdf - u * tail
    kappa = (1.0 + u * u) * tail - u * pdf
    m = (a > 0).astype(a.dtype)
    return s * psi, s * s * (kappa - psi * psi - 2.0 * m * tail)


def relu_net_layerwise_remainder(W1, W2, X, Y, sigma) -> jax.Array:
    """R~_sigma - relu_net_layerwise_risk: the exact beyond-second-order part of the ReLU layer-wise risk.

    Only the W1 perturbation contributes (Phi is linear in W2). For example i the pre-activations
    a_i + sigma sqrt(2) E1 x_i are independent N(a_{ji}, s_i^2), s_i = sqrt(2) sigma ||x_i||, so with
    r_i = their ReLU, delta_i = E r_i - (a_i)_+ and v_{ji} = Var r_{ji} - 1[a_{ji} > 0] s_i^2
    (``_relu_gaussian_moments``) and residual e_i = y_i - W2 (a_i)_+:

        remainder = 1/(4n) sum_i [ -2 e_i^T W2 delta_i + ||W2 delta_i||^2 + sum_j ||(W2)_{:,j}||^2 v_{ji} ].

    Every term is O(exp(-min_j a_{ji}^2 / (2 s_i^2))), computed directly (no subtraction of O(1) numbers).
    """
    check_sigma(sigma)
    _check_chain([W1, W2], X, Y, ["W1", "W2"])
    n = np.shape(X)[0]
    A = W1 @ X.T  # [d1, n]
    s = jnp.sqrt(2.0) * sigma * jnp.sqrt(jnp.sum(jnp.square(X), axis=1))  # [n]
    delta, v = _relu_gaussian_moments(A, s[None, :])
    E = Y.T - W2 @ jax.nn.relu(A)  # [d2, n]
    W2delta = W2 @ delta
    col_sq = jnp.sum(jnp.square(W2), axis=0)
    total = -2.0 * jnp.sum(E * W2delta) + _sq(W2delta) + jnp.sum(col_sq @ v)
    return total / (4.0 * n)


def relu_net_layerwise_risk_exact(W1, W2, X, Y, sigma) -> jax.Array:
    """Exact layer-wise risk R~_sigma = 1/2 E R(W1 + sigma sqrt2 E1, W2) + 1/2 E R(W1, W2 + sigma sqrt2 E2)
    of Phi = W2 (W1 X^T)_+ (not in the paper; derived here from Gaussian ReLU moments).

    Equals ``relu_net_layerwise_risk + relu_net_layerwise_remainder``. Because L is a mean over
    examples, only the per-example law of E1 x_i ~ N(0, ||x_i||^2 I) matters: the d1 pre-activations
    of one example are independent Gaussians and E (a + s g)_+, E (a + s g)_+^2 are closed form.
    """
    return relu_net_layerwise_risk(W1, W2, X, Y, sigma) + relu_net_layerwise_remainder(W1, W2, X, Y, sigma)




def nuclear_norm(A) -> jax.Array:
    """||A||_* = sum of singular values."""
    _ndim(A, 2, "A")
    return jnp.sum(jnp.linalg.svd(A, compute_uv=False))


def nuclear_norm_objective(M, X, Y, sigma) -> jax.Array:
    """The convex problem equivalent to the linear-net effective risk, Section 2.4, Eq. (10):

        1/(2n) ||Y^T - M X^T||_F^2 + sigma^2/n sqrt(d2) ||X||_F ||M X^T||_*.

    Derivation: for W2 W1 = M, with Z = W1 X^T and a = d2, b = ||X||_F^2,
    a ||Z||^2 + b ||W2||^2 >= 2 sqrt(ab) ||W2||_F ||Z||_F >= 2 sqrt(ab) ||W2 Z||_* = 2 sqrt(ab) ||M X^T||_*
    (AM-GM, then ||AB||_* <= ||A||_F ||B||_F), with equality for the balanced factorisation
    (``balanced_factorization``). Hence min_{W2 W1 = M} linear_net_effective_risk = this objective.
    """
    check_sigma(sigma)
    n, d0 = _check_X(X)
    _ndim(M, 2, "M")
    if np.shape(M)[1] != d0:
        raise ValueError(f"M must have {d0} columns (d0 of X), got shape {np.shape(M)}")
    _ndim(Y, 2, "Y")
    if np.shape(Y) != (n, np.shape(M)[0]):
        raise ValueError(f"Y must have shape ({n}, {np.shape(M)[0]}) = (n, d2), got {np.shape(Y)}")
    d2 = np.shape(M)[0]
    P = M @ X.T
    fit = 0.5 * _sq(Y.T - P) / n
    return fit + sigma**2 / n * np.sqrt(d2) * jnp.sqrt(_sq(X)) * nuclear_norm(P)


@functools.partial(jax.jit, static_argnums=2)
def _balanced_factorization(M, X, d1):
    d2, d0 = M.shape
    n = X.shape[0]
    P = M @ X.T
    U, S, Vt = jnp.linalg.svd(P, full_matrices=False)
    k = min(d1, S.shape[0])
    c = (d2 / _sq(X)) ** 0.25
    root = jnp.sqrt(S[:k])
    W2 = jnp.zeros((d2, d1), P.dtype).at[:, :k].set(c * U[:, :k] * root)
    Z = jnp.zeros((d1, n), P.dtype).at[:k].set(root[:, None] * Vt[:k] / c)
    XT_pinv = jnp.linalg.pinv(X.T)  # [n, d0]
    null = jnp.eye(d0, dtype=P.dtype) - X.T @ XT_pinv
    W1 = Z @ XT_pinv + jnp.linalg.pinv(W2) @ M @ null
    return W1, W2, S


def balanced_factorization(M, X, d1: int) -> tuple[jax.Array, jax.Array]:
    """A factorisation W2 W1 = M (W1 ``[d1, d0]``, W2 ``[d2, d1]``) attaining the minimum of the
    Eq. (9) penalty d2 ||W1 X^T||_F^2 + ||W2||_F^2 ||X||_F^2, i.e. 2 sqrt(d2) ||X||_F ||M X^T||_*.

    With M X^T = U S V^T (thin SVD) and c = (d2 / ||X||_F^2)^(1/4):
        W2 = c U S^(1/2),   W1 X^T = c^(-1) S^(1/2) V^T   (both padded with zeros to width d1),
        W1 = c^(-1) S^(1/2) V^T (X^T)^+ + W2^+ M (I - X^T (X^T)^+).
    The first term of W1 fits the data part of M; the second carries M's component outside the row
    space of X (it does not change W1 X^T). Requirements (checked when the inputs are concrete):
    d1 >= rank(M X^T), and the columns of M (I - P_X) in the range of M X^T (true e.g. when X has full
    column rank, or when M X^T has rank d2).
    """
    _, d0 = _check_X(X)
    _ndim(M, 2, "M")
    if np.shape(M)[1] != d0:
        raise ValueError(f"M must have {d0} columns (d0 of X), got shape {np.shape(M)}")
    if isinstance(d1, bool) or not isinstance(d1, (int, np.integer)) or d1 <= 0:
        raise ValueError(f"d1 must be a positive integer, got {d1!r}")
    W1, W2, S = _balanced_factorization(M, X, int(d1))
    if is_concrete(S):
        S_np = np.asarray(S)
        if S_np.shape[0] > d1 and S_np[d1] > 1e-10 * max(S_np[0], 1e-300):
            raise ValueError(f"d1 must be >= rank(M X^T) = {int(np.sum(S_np > 1e-10 * S_np[0]))}, got {d1}")
        err = float(np.max(np.abs(np.asarray(W2) @ np.asarray(W1) - np.asarray(M)), initial=0.0))
        if err > 1e-6 * (1.0 + float(np.max(np.abs(np.asarray(M)), initial=0.0))):
            raise ValueError(
                "M has a component outside the row space of X that the range of M X^T does not contain; "
                "no factorisation W2 W1 = M attains the nuclear-norm bound"
            )
    return W1, W2
