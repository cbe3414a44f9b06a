"""The remainder of the second-order expansion of R_sigma and its order in sigma (for ``geometry_report``).

For R(w) = L(Phi(w)) and Gaussian weight noise, R_sigma(w) = E R(w + sigma eps). A Taylor expansion gives

    R_sigma = R + sigma^2/2 tr(Hessian of R) + O(sigma^4)        (R four times differentiable),

the odd orders vanishing because eps and -eps are equally likely. The Hessian of R is
J^T D2L J + sum_k dL/dPhi_k D2Phi_k, so the paper's R_sigma^(eff) = R + sigma^2/2 tr(J^T D2L J) (the
Gauss-Newton trace) differs from it by sigma^2/2 sum_k dL/dPhi_k tr(D2Phi_k): an O(sigma^2) remainder for a
smooth activation; for ReLU, tr(D2Phi_k) = 0 wherever it exists (Orvieto et al., AISTATS 2023, Sections
2.1-2.2), but the kinks that the noise crosses, averaged over the data, can add an O(sigma^2) term too.

``remainders`` estimates r(sigma) = R_sigma - R - sigma^2/2 tr(C) for C the Hessian and for the Gauss-Newton
matrix by Monte Carlo with antithetic pairs and the quadratic form as a control variate (E eps^T C eps = tr C):

    r(sigma) = E[ (R(w + sigma eps) + R(w - sigma eps)) / 2 - R(w) - sigma^2/2 eps^T C eps ],

each term of which is O(sigma^p) when r is, so the relative Monte Carlo error is the same at every sigma and
the same draws (common random numbers) serve every sigma. eps^T C eps is a second directional derivative
(forward over forward mode): along eps for the Hessian, of L along J eps at Phi(w) for the Gauss-Newton matrix.
``fit_order`` is the least-squares slope of log |r| against log sigma. Cost: 2 * num_pairs * len(sigmas) risk
evaluations and num_pairs second directional derivatives, vmapped over the pairs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

KINDS = ("hessian", "gauss_newton")


def quadratic_forms(predict: Callable, loss: Callable, params, batch, eps) -> dict:
    """eps^T H eps and eps^T G eps at ``params`` for the flat direction ``eps`` (H: Hessian of R = L(Phi(w)),
    G = J^T D2L J), as second directional derivatives."""
    flat, unravel = ravel_pytree(params)
    risk = lambda w: loss(predict(unravel(w), batch[0]), batch[1])
    along = lambda t: risk(flat + t * eps)
    hessian = jax.jvp(jax.grad(along), (0.0,), (1.0,))[1]
    outputs, tangent = jax.jvp(lambda w: predict(unravel(w), batch[0]), (flat,), (eps,))
    on_outputs = lambda t: loss(outputs + t * tangent, batch[1])
    gauss_newton = jax.jvp(jax.grad(on_outputs), (0.0,), (1.0,))[1]
    return {"hessian": hessian, "gauss_newton": gauss_newton}


def remainders(predict: Callable, loss: Callable, params, batch, sigmas: Sequence[float], key, num_pairs: int) -> dict:
    """``{kind: (mean [len(sigmas)], standard error [len(sigmas)])}`` of r(sigma) = R_sigma - R - sigma^2/2 tr(C),
    C the Hessian ("hessian") or the Gauss-Newton matrix ("gauss_newton"), from ``num_pairs`` antithetic pairs
    (module docstring). Compute in float64 (``jax.enable_x64``): r is a small difference of risks."""
    draws = _draws(predict, loss)(params, batch, jnp.asarray(sigmas), jax.random.split(key, num_pairs))
    return {k: (np.asarray(v.mean(0)), np.asarray(v.std(0, ddof=1) / np.sqrt(num_pairs))) for k, v in draws.items()}


@functools.cache
def _draws(predict: Callable, loss: Callable) -> Callable:
    """The compiled ``(params, batch, sigmas, keys) -> {kind: [num_pairs, len(sigmas)]}`` of ``remainders``: the
    data are arguments, never closure constants; the pairs run one at a time (``lax.map``: bounded memory)."""

    @jax.jit
    def draws(params, batch, sigmas, keys):
        flat, unravel = ravel_pytree(params)
        risk = lambda w: loss(predict(unravel(w), batch[0]), batch[1])
        sig = sigmas.astype(flat.dtype)

        def one(k):
            eps = jax.random.normal(k, flat.shape, flat.dtype)
            quads = quadratic_forms(predict, loss, params, batch, eps)
            sym = jax.vmap(lambda s: (risk(flat + s * eps) + risk(flat - s * eps)) / 2)(sig) - risk(flat)
            return {kind: sym - sig**2 / 2 * q for kind, q in quads.items()}

        return jax.lax.map(one, keys)

    return draws


def fit_order(sigmas: Sequence[float], values: Sequence[float]) -> float:
    """The least-squares slope p of log |values| = p log sigma + c: the order of a remainder O(sigma^p)."""
    values = np.abs(np.asarray(values, float))
    if values.size < 2 or not np.all(values > 0) or not np.all(np.isfinite(values)):
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(sigmas, float)), np.log(values), 1)[0])
