"""Sharded parameters (issue 18): Lanczos on pytrees shaped like the parameters, keeping their sharding
(8 forced host devices, a subprocess), a host-memory basis, and SLQ without a stored basis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import last_json, run_python

from lsgeo import curvature


def test_eight_way_sharded_mlp_gives_the_unsharded_spectrum_and_keeps_the_basis_sharded():
    """An MLP whose kernels are sharded 8 ways over their output width (P(None, "model")), float64: top-k
    eigenvalues equal the unsharded operator's and a dense eigh's, with a device or a host-memory basis; an
    SLQ density equals the unsharded one (same probes); every leaf of the Lanczos basis and of the Ritz
    vectors is laid out like its parameter behind a replicated leading axis (P(None, None, "model"): one
    columns of the kernel per device), and the basis is orthonormal."""
    result = last_json(run_python("_sharded_parameters.py", devices=8))
    assert result["devices"] == 8
    # leaves in tree order: b, w of each layer; the kernel [4, 16] sharded, the kernel [16, 2] and biases replicated
    assert result["vector_layout"] == ["P()", "P(None, 'model')", "P()", "P()"]
    for what in ("basis_specs", "ritz_vector_specs"):
        assert result[what] == ["P()", "P(None, None, 'model')", "P()", "P()"], what
    assert result["basis_shapes"] == [[12, 16], [12, 4, 16], [12, 2], [12, 16, 2]]
    # each device holds 2 of the 16 columns of every basis vector's kernel, all of the replicated leaves
    assert result["basis_shard_shapes"] == [[12, 16], [12, 4, 2], [12, 2], [12, 16, 2]]
    assert result["basis_orthonormality"] < 1e-12
    for name in ("top_vs_single", "top_vs_dense", "host_vs_device", "host_vs_dense", "density_vs_single"):
        assert result[name] < 1e-8, (name, result[name])
    assert result["eigvec_residual"] < 1e-8


def _spd(m, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, m)))
    eigs = np.concatenate([[9.0, 6.0], np.linspace(-1.0, 2.0, m - 2)])
    return (q * eigs) @ q.T


def test_pytree_lanczos_equals_flat_lanczos(x64):
    """The same operator on a flat vector and on a pytree of its pieces (a dict of a matrix and a vector):
    equal tridiagonals and bases (in ravel_pytree order), with a device or a host basis; Ritz vectors
    combined from a host basis block by block equal those of the flat basis."""
    m = 24
    a = _spd(m)
    v0 = np.random.default_rng(1).standard_normal(m)
    unravel = jax.flatten_util.ravel_pytree({"b": np.zeros(4), "w": np.zeros((4, 5))})[1]

    def tree_matvec(v):
        return unravel(a @ jax.flatten_util.ravel_pytree(v)[0])

    @jax.jit
    def run(v0):
        flat = curvature.lanczos(lambda u: a @ u, v0, 12, return_vectors=True)
        tree = curvature.lanczos(tree_matvec, unravel(v0), 12, return_vectors=True)
        host = curvature.lanczos(tree_matvec, unravel(v0), 12, return_vectors=True, basis_memory="host")
        return flat, tree, host

    flat, tree, host = run(v0)
    for other in (tree, host):
        np.testing.assert_allclose(other[0], flat[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(other[1], flat[1], rtol=1e-12, atol=1e-12)
        stacked = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(other[2])
        np.testing.assert_allclose(stacked, flat[2], atol=1e-12)
    assert tree[2]["w"].shape == (12, 4, 5)
    coefficients = np.random.default_rng(3).standard_normal((12, 3))  # 12 rows: a block of 8 and one of 4
    vectors = curvature.ritz_vectors(host[2], coefficients, basis_memory="host")
    flat_vectors = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(vectors)
    np.testing.assert_allclose(flat_vectors, coefficients.T @ flat[2], atol=1e-12)


def test_slq_without_reorthogonalisation_matches_moments_and_the_stored_basis_density(x64):
    """The plain three-term recurrence (no basis, O(m) memory) past the point where orthogonality is lost
    (60 steps, m = 80, two outliers): its Gauss quadrature still gives z^T A^p z / z^T z for p <= 4 (to
    ~1e-10; Meurant & Strakos 2006), and its broadened density equals the reorthogonalised one."""
    m = 80
    a = _spd(m)
    z = np.sign(np.random.default_rng(2).standard_normal(m))

    @jax.jit
    def quadrature(z):
        out = []
        for flag in (False, True):
            theta, u = curvature.tridiagonal_eigh(*curvature.lanczos(lambda u: a @ u, z, 60, reorthogonalize=flag))
            out.append((theta, u[0] ** 2))
        return out

    (theta, w), (theta_ref, w_ref) = quadrature(z)
    for p in range(5):
        exact = z @ np.linalg.matrix_power(a, p) @ z / (z @ z)
        np.testing.assert_allclose(np.sum(w * theta**p), exact, rtol=1e-9)
    grid = np.linspace(-2.0, 10.0, 200)
    density = lambda t, w: np.sum(w[:, None] * np.exp(-0.5 * ((grid - t[:, None]) / 0.3) ** 2), axis=0)
    np.testing.assert_allclose(density(theta, w), density(theta_ref, w_ref), atol=1e-6)
    with pytest.raises(ValueError, match="return_vectors"):
        curvature.lanczos(lambda u: a @ u, z, 4, reorthogonalize=False, return_vectors=True)
    with pytest.raises(ValueError, match="basis_memory"):
        curvature.lanczos(lambda u: a @ u, z, 4, basis_memory="disk")


def test_estimators_take_the_new_options(x64):
    """slq_nodes / spectral_density with reorthogonalize=False and slq_nodes with the host basis, on a small
    Hessian: the same quadrature moments and density as the defaults."""
    b = jnp.linspace(-1.0, 3.0, 12)
    f = lambda w, b: 0.5 * jnp.sum(b * w**2)  # H = diag(b)
    op = curvature.Hessian(f, jnp.ones(12), b)
    key = jax.random.key(0)
    nodes, weights = curvature.slq_nodes(op, key, num_iters=12, num_runs=2)
    for options in ({"reorthogonalize": False}, {"basis_memory": "host"}):
        n, w = curvature.slq_nodes(op, key, num_iters=12, num_runs=2, **options)
        for p in range(4):
            np.testing.assert_allclose(np.sum(w * n**p), np.sum(weights * nodes**p), rtol=1e-8, atol=1e-12)
    grid = jnp.linspace(-2.0, 4.0, 50)  # the same programs as slq_nodes above (compiled once), broadened
    rho = curvature.spectral_density(op, key, num_iters=12, num_runs=2, grid=grid, width=0.2)[1]
    rho_plain = curvature.spectral_density(op, key, num_iters=12, num_runs=2, grid=grid, width=0.2,
                                           reorthogonalize=False)[1]
    np.testing.assert_allclose(rho_plain, rho, atol=1e-8)
    with pytest.raises(ValueError, match="reorthogonalize"):
        curvature.slq_nodes(op, key, reorthogonalize="no")
    with pytest.raises(ValueError, match="basis_memory"):
        curvature.top_eigenvalues(op, key, basis_memory="disk")
