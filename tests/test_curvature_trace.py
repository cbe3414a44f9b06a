"""Hessian trace (Hutchinson, Hutch++) and diagonal (Hutchinson) estimates against the dense Hessian,
on one batch and by microbatches."""

import jax
import numpy as np
import pytest
from conftest import (
    dense_hessian, F_MLP, flat, microbatch_problem, mlp_init, regression_batch, rounding_floor,
)

from lsgeo import curvature


def test_hessian_trace_within_three_standard_errors(x64):
    params = mlp_init(0, (5, 8, 8, 3))
    batch = regression_batch(1, 20, 5, 3)
    h = np.asarray(dense_hessian(F_MLP, params, batch))
    exact = np.trace(h)
    est, se = curvature.hessian_trace(
        F_MLP, params, batch, jax.random.key(4), num_probes=2000, vectors_per_pass=100, return_stderr=True
    )
    assert se > 0
    assert abs(est - exact) < 3 * se + rounding_floor(np.abs(h).sum()), (est, exact, se)
    assert se < 0.05 * abs(exact)


def _quadratic(w, a):
    return 0.5 * w @ (a @ w)


def test_hutchpp_beats_hutchinson_on_decaying_spectrum(x64):
    m, num_probes, num_seeds = 120, 30, 24
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((m, m)))
    a = (q * (1.0 / np.arange(1, m + 1) ** 2)) @ q.T  # eigenvalues 1 / i^2
    w = np.zeros(m)
    exact = np.trace(a)

    @jax.jit
    def estimates(w, a, keys):  # one estimate per seed, the seeds vmapped
        def one(k):
            return [
                curvature.hessian_trace(_quadratic, w, a, k, num_probes=num_probes, method=method, vectors_per_pass=4)
                for method in ("hutchinson", "hutch++")
            ]

        return jax.vmap(one)(keys)

    est_h, est_pp = estimates(w, a, jax.random.split(jax.random.key(1), num_seeds))
    err_h, err_pp = np.mean(np.abs(est_h - exact)), np.mean(np.abs(est_pp - exact))
    assert err_pp < 0.5 * err_h, (err_pp, err_h)


@pytest.mark.parametrize("vectors_per_pass", [1, 4, 7])
def test_hutchpp_is_exact_when_the_sketch_spans_the_space(x64, vectors_per_pass):
    """N / 3 >= m: Q spans R^m, tr(Q^T H Q) = tr(H) and the residual part vanishes, whatever the blocks."""
    params = mlp_init(0, (2, 3, 1))  # m = 13
    batch = regression_batch(1, 9, 2, 1)
    exact = np.trace(dense_hessian(F_MLP, params, batch))
    trace = curvature.hessian_trace(F_MLP, params, batch, jax.random.key(0), num_probes=40, method="hutch++",
                                    vectors_per_pass=vectors_per_pass)
    np.testing.assert_allclose(trace, exact, rtol=1e-9)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_microbatched_trace_and_diagonal_equal_single_batch(x64, model):
    """The same probes on the data-set Hessian by microbatches (n = 21, microbatches of 4: uneven last one)."""
    f, params, batch = microbatch_problem(model)
    key = jax.random.key(5)
    for method in ("hutchinson", "hutch++"):
        one = curvature.hessian_trace(f, params, batch, key, num_probes=9, method=method)
        many = curvature.hessian_trace(f, params, batch, key, num_probes=9, method=method, microbatch_size=4,
                                       vectors_per_pass=2)
        np.testing.assert_allclose(many, one, rtol=1e-10)
    one = curvature.hessian_diagonal(f, params, batch, key, num_probes=5)
    many = curvature.hessian_diagonal(f, params, batch, key, num_probes=5, microbatch_size=4, vectors_per_pass=2)
    np.testing.assert_allclose(flat(many), flat(one), rtol=1e-10, atol=1e-14)


def test_hessian_diagonal_within_three_standard_errors(x64):
    params = mlp_init(0, (4, 6, 2))  # m = 44
    batch = regression_batch(1, 16, 4, 2)
    exact = np.diag(dense_hessian(F_MLP, params, batch))
    est, se = curvature.hessian_diagonal(F_MLP, params, batch, jax.random.key(2), num_probes=3000, vectors_per_pass=500,
                                         return_stderr=True)
    est, se = flat(est), flat(se)
    assert est.shape == exact.shape and np.all(se >= 0)
    # coordinates whose row of H has a single entry are exact (zero variance); the rest within 3 s.e.
    np.testing.assert_array_less(np.abs(est - exact), 3 * se + 1e-12)
    assert np.mean(np.abs(est - exact) < se) > 0.5  # and not loose: most within one s.e.
    assert np.max(se) < 0.05 * np.max(np.abs(exact))
