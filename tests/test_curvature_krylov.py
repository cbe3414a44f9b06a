"""Lanczos (full reorthogonalisation, breakdown, early stopping) against dense eigh."""

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import curvature


def test_lanczos_basis_orthonormal_and_exact_at_full_dimension(x64):
    m = 30
    a = np.random.default_rng(0).standard_normal((m, m))
    a = a + a.T

    @jax.jit
    def run(a, v):
        alphas, betas, basis = curvature.lanczos(lambda u: a @ u, v, m, return_vectors=True)
        return alphas, betas, basis, curvature.tridiagonal_eigh(alphas, betas)[0]

    alphas, betas, basis, theta = run(a, np.ones(m))
    assert alphas.shape == (m,) and betas.shape == (m - 1,) and basis.shape == (m, m)
    np.testing.assert_allclose(basis @ basis.T, np.eye(m), atol=1e-12)
    np.testing.assert_allclose(theta, np.linalg.eigvalsh(a), atol=1e-10)


def test_lanczos_breakdown_is_graceful(x64):
    # three distinct eigenvalues: the Krylov space of any start is 3-dimensional, beta_3 = 0
    m = 12
    d = np.array([1.0, 2.0, 5.0] * 4)

    @jax.jit
    def run(d, v):
        alphas, betas, basis = curvature.lanczos(lambda u: d * u, v, 6, return_vectors=True)
        return alphas, betas, basis, curvature.tridiagonal_eigh(alphas, betas)

    alphas, betas, basis, (theta, u) = run(d, np.ones(m))
    assert np.all(np.isfinite(alphas)) and np.all(np.isfinite(betas))
    assert abs(betas[2]) < 1e-12
    np.testing.assert_allclose(basis @ basis.T, np.eye(6), atol=1e-12)
    # every Ritz value is an eigenvalue of A; the Gauss weights seen from v0 ignore the restart block
    assert np.min(np.abs(theta[:, None] - np.array([1.0, 2.0, 5.0])[None]), axis=1).max() < 1e-10
    np.testing.assert_allclose(np.sum(u[0] ** 2 * theta), np.mean(d), rtol=1e-12)
    # the zero operator: an all-zero tridiagonal, no NaN
    alphas, betas, _, _ = run(np.zeros(m), np.ones(m))
    np.testing.assert_array_equal(alphas, 0.0)
    np.testing.assert_array_equal(betas, 0.0)


def test_ritz_pairs_stop_early_within_tolerance(x64):
    """A spectrum with well separated outliers: the top-2 Ritz pairs reach a relative residual of 1e-8 long
    before 150 steps, the values are within that tolerance and the vectors are eigenvectors."""
    m = 200
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((m, m)))
    eigs = np.concatenate([[50.0, 20.0], np.linspace(-1.0, 1.0, m - 2)])
    a = (q * eigs) @ q.T
    v0 = np.random.default_rng(1).standard_normal(m)

    @jax.jit
    def run(a, v0):
        return curvature.ritz_pairs(lambda u: a @ u, v0, 150, k=2, tol=1e-8)

    values, coefficients, basis, steps = run(a, v0)
    assert 2 <= int(steps) < 60, int(steps)
    np.testing.assert_allclose(values, [50.0, 20.0], rtol=1e-8)
    vectors = coefficients.T @ basis
    np.testing.assert_allclose(vectors @ a.T, values[:, None] * vectors, atol=1e-6 * 50)
    # without a tolerance every step runs, and the smallest end works the same way
    low, _, _, all_steps = jax.jit(lambda a, v: curvature.ritz_pairs(lambda u: a @ u, v, 40, k=1, which="smallest"))(
        a, v0
    )
    assert int(all_steps) == 40 and abs(low[0] + 1.0) < 1e-2
    assert jnp.ndim(values) == 1


def test_lanczos_keeps_a_small_genuine_coupling_at_large_m():
    """A = diag(1, 2, 0, ..., 0) in float32 with m = 10^6 and v0 = e_1 + 1e-4 e_2: the true beta_1 is 1e-4,
    below the old breakdown threshold sqrt(m) eps ||A|| = 2.4e-4 (which declared an invariant subspace
    and restarted, giving Ritz values {1, ~0}); the threshold relative to the step's own product keeps it."""
    m = 10**6
    diag = jnp.zeros(m, jnp.float32).at[0].set(1.0).at[1].set(2.0)
    v0 = jnp.zeros(m, jnp.float32).at[0].set(1.0).at[1].set(1e-4)
    alphas, betas = curvature.lanczos(lambda u: diag * u, v0, 2)
    np.testing.assert_allclose(betas[0], 1e-4, rtol=1e-2)
    np.testing.assert_allclose(curvature.tridiagonal_eigh(alphas, betas)[0], [1.0, 2.0], rtol=1e-4)


def test_passes_are_balanced():
    """257 rows in passes of at most 256 run as 2 passes of 129 (258 evaluations), not 2 of 256 (512)."""
    from lsgeo.curvature import chunking

    shapes = []

    def fn(block):
        shapes.append(block.shape)
        return block * 2.0

    out = chunking.chunked_map(fn, jnp.arange(257.0), 256, batched=True)
    np.testing.assert_allclose(out, 2.0 * np.arange(257.0))
    assert shapes == [(129,)]  # traced once, for a body of 129 rows run twice by lax.map
