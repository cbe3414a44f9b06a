"""Extreme eigenpairs (Lanczos), the SLQ spectral density and the saddle index against dense eigh, on
one batch, by microbatches, in half precision and on every kind of model (plain, flax linen, flax NNX)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    dense_hessian, F_CE_MLP, F_MLP, flat, microbatch_problem, mlp_apply, mlp_init, random_tree, regression_batch,
    sq_objective,
)
from flax import nnx

from lsgeo import curvature, validation


@pytest.fixture(scope="module")
def mlp5k():
    """A ~5k-parameter tanh MLP (16 -> 64 -> 48 -> 10) with cross-entropy on random data."""
    params = mlp_init(0, (16, 64, 48, 10))
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((256, 16)), rng.integers(0, 10, size=256)
    return params, (x, y)


def test_top_eigenvalues_5k_mlp_40_iterations(x64, mlp5k):
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    params, batch = mlp5k
    m = optax.tree.size(params)
    assert 4000 <= m <= 6000
    top = curvature.top_eigenvalues(F_CE_MLP, params, batch, jax.random.key(3), k=5, num_iters=40)
    # reference: ARPACK (implicitly restarted Lanczos) to 1e-14 on the same HVP operator
    matvec = jax.jit(lambda u, b: curvature.hessian_operator(F_CE_MLP, params, b)(u))
    op = scipy_linalg.LinearOperator(
        (m, m), matvec=lambda u: np.asarray(matvec(jnp.asarray(u), batch)), dtype=np.float64
    )
    ref = np.sort(scipy_linalg.eigsh(op, k=5, which="LA", tol=1e-14)[0])[::-1]
    np.testing.assert_allclose(top, ref, rtol=1e-6)
    assert np.all(np.diff(top) <= 0)
    # early stopping: the top-1 to a relative residual of 1e-6 in fewer steps, the value within it
    top1 = curvature.top_eigenvalues(F_CE_MLP, params, batch, jax.random.key(3), k=1, num_iters=40, tol=1e-6)
    np.testing.assert_allclose(top1, ref[:1], rtol=1e-6)


@pytest.mark.slow
def test_top_eigenvalues_5k_mlp_matches_dense_eigh(x64, mlp5k):
    params, batch = mlp5k
    top = curvature.top_eigenvalues(F_CE_MLP, params, batch, jax.random.key(3), k=5, num_iters=40)
    eigs = np.linalg.eigvalsh(np.asarray(curvature.hessian(F_CE_MLP, params, batch)))
    np.testing.assert_allclose(top, eigs[::-1][:5], rtol=1e-6)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_microbatched_top_eigenvalues_equal_single_batch(x64, model):
    f, params, batch = microbatch_problem(model)
    key = jax.random.key(6)
    one = curvature.top_eigenvalues(f, params, batch, key, k=3, num_iters=12)
    many = curvature.top_eigenvalues(f, params, batch, key, k=3, num_iters=12, microbatch_size=4)
    np.testing.assert_allclose(many, one, rtol=1e-10)


@pytest.fixture(scope="module")
def saddle_mlp():
    """A tanh MLP (6 -> 12 -> 12 -> 2, m = 266) at a random point with random targets: indefinite H."""
    with jax.enable_x64(True):
        params = mlp_init(5, (6, 12, 12, 2))
        batch = regression_batch(6, 64, 6, 2)
        eigs = np.linalg.eigvalsh(np.asarray(dense_hessian(F_MLP, params, batch)))
    return params, batch, eigs


def test_spectral_density_integrates_to_one_and_mass_below_zero(x64, saddle_mlp):
    params, batch, eigs = saddle_mlp
    exact_index = np.mean(eigs < 0)
    assert 0.1 < exact_index < 0.9  # a genuine saddle
    width = 0.002 * (eigs[-1] - eigs[0])
    grid, density = curvature.spectral_density(
        F_MLP, params, batch, jax.random.key(7), num_iters=80, num_runs=16, width=width
    )
    assert grid.shape == density.shape == (1000,)
    assert np.all(density >= 0)
    np.testing.assert_allclose(jnp.trapezoid(density, grid), 1.0, rtol=1e-6)  # tails beyond 5 widths
    mass_below = jnp.trapezoid(jnp.where(grid <= 0, density, 0.0), grid)
    assert abs(mass_below - exact_index) < 0.05, (mass_below, exact_index)
    # saddle_index(method="slq"): the same nodes broadened by the same width give the mass below 0; counted
    # (the default), the threshold lies inside this spectrum's dense bulk at 0, where a run's count is off by
    # up to the weight of its node nearest the threshold (the documented Gauss-quadrature bias)
    slq = curvature.saddle_index(F_MLP, params, batch, jax.random.key(7), method="slq", num_iters=80, num_runs=16,
                                 tol=0.0, width=width)
    assert abs(slq - exact_index) < 0.05, (slq, exact_index)
    counted = curvature.saddle_index(F_MLP, params, batch, jax.random.key(7), method="slq", num_iters=80,
                                     num_runs=16, tol=0.0)
    assert abs(counted - exact_index) < 0.1, (counted, exact_index)
    # a user grid
    user_grid = jnp.linspace(eigs[0] - 1.0, eigs[-1] + 1.0, 1500)  # spacing below one width
    g2, d2 = curvature.spectral_density(
        F_MLP, params, batch, jax.random.key(7), num_iters=80, num_runs=16, grid=user_grid, width=width
    )
    np.testing.assert_array_equal(g2, user_grid)
    np.testing.assert_allclose(jnp.trapezoid(d2, g2), 1.0, rtol=1e-8)
    # a grid zoomed onto the right part: the same values where the grids meet (no mass squeezed onto its
    # edge), and only the mass of that part
    g3, d3 = curvature.spectral_density(
        F_MLP, params, batch, jax.random.key(7), num_iters=80, num_runs=16, grid=user_grid[750:], width=width
    )
    np.testing.assert_allclose(d3, d2[750:], rtol=1e-12, atol=1e-300)
    assert jnp.trapezoid(d3, g3) < 0.9  # part of the spectrum lies left of the zoomed grid


def test_saddle_index_tolerances(x64, saddle_mlp):
    """Exact path: the dense count below -max(tol, rtol max|lambda|); the default rtol is m eps of the work
    dtype (rounding noise only), i.e. the textbook count of negative eigenvalues on this float64 spectrum."""
    params, batch, eigs = saddle_mlp
    scale = np.max(np.abs(eigs))
    default = curvature.default_saddle_rtol(True, eigs.size, np.float64)
    assert default == eigs.size * np.finfo(np.float64).eps
    for kwargs, threshold in [
        ({}, default * scale),
        ({"rtol": 1e-3}, 1e-3 * scale),
        ({"tol": 0.0}, 0.0),
        ({"tol": 0.05}, 0.05),
        ({"rtol": 0.02}, 0.02 * scale),
        ({"tol": 0.05, "rtol": 0.001}, max(0.05, 0.001 * scale)),
    ]:
        got = curvature.saddle_index(F_MLP, params, batch, **kwargs)
        np.testing.assert_allclose(got, np.mean(eigs < -threshold), atol=1e-7, err_msg=str(kwargs))
    assert np.mean(eigs < -0.02 * scale) < np.mean(eigs < 0)  # the tolerances matter on this spectrum
    np.testing.assert_allclose(curvature.saddle_index(F_MLP, params, batch), np.mean(eigs < 0), atol=1e-7)
    # the SLQ path with the same rtol (nodes counted directly, width=0) against the exact count
    slq = curvature.saddle_index(F_MLP, params, batch, jax.random.key(1), method="slq", rtol=0.02, width=0.0,
                                 num_runs=16)
    assert abs(slq - np.mean(eigs < -0.02 * scale)) < 0.1


def test_min_eigenvalue_and_eigenpairs_under_jit_and_vmap(x64, saddle_mlp):
    params, batch, eigs = saddle_mlp

    @jax.jit
    def run(params, batch, keys):  # data as arguments; one Lanczos run per key, vmapped
        def one(key):
            lam, u = curvature.min_eigenvalue(F_MLP, params, batch, key, num_iters=80)
            values, vectors = curvature.eigenpairs(F_MLP, params, batch, key, k=3, num_iters=80)
            return lam, u, values, vectors, curvature.hvp(F_MLP, params, batch, u)

        return jax.vmap(one)(keys)

    lams, us, values, vectors, hus = run(params, batch, jax.random.split(jax.random.key(8), 2))
    for i in range(2):
        u, hu = (jax.tree_util.tree_map(lambda a: a[i], t) for t in (us, hus))
        np.testing.assert_allclose(lams[i], eigs[0], rtol=1e-8)
        validation.check_same_structure(params, u, "u")
        np.testing.assert_allclose(np.linalg.norm(flat(u)), 1.0, rtol=1e-10)
        np.testing.assert_allclose(flat(hu), lams[i] * flat(u), atol=1e-6)  # an eigenvector
        np.testing.assert_allclose(values[i], eigs[::-1][:3], rtol=1e-8)
        vmat = np.stack([flat(jax.tree_util.tree_map(lambda a: a[i, j], vectors)) for j in range(3)])
        np.testing.assert_allclose(vmat @ vmat.T, np.eye(3), atol=1e-8)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_params(dtype):
    """bfloat16/float16 parameters: products in that dtype, Lanczos and the eigenproblems in float32 (no
    LAPACK 'Unsupported dtype'); the values track the float32 ones to the precision of the products."""
    params32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), mlp_init(5, (6, 12, 2)))
    x, y = (jnp.asarray(a, jnp.float32) for a in regression_batch(6, 64, 6, 2))
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params32)
    batch = (x.astype(dtype), y.astype(dtype))
    key = jax.random.key(0)
    ref = curvature.top_eigenvalues(F_MLP, params32, (x, y), key, k=2, num_iters=30)
    top = curvature.top_eigenvalues(F_MLP, params, batch, key, k=2, num_iters=30)
    values, vectors = curvature.eigenpairs(F_MLP, params, batch, key, k=1, num_iters=30)
    assert top.dtype == jnp.float32 and jax.tree_util.tree_leaves(vectors)[0].dtype == dtype
    np.testing.assert_allclose(top, ref, rtol=0.05)
    np.testing.assert_allclose(values, ref[:1], rtol=0.05)
    index = curvature.saddle_index(F_MLP, params, batch)  # the dense eigvalsh in float32
    assert 0.0 <= float(index) <= 1.0
    assert np.isfinite(float(curvature.hessian_trace(F_MLP, params, batch, key, num_probes=4)))


class LinenMLP(nn.Module):
    hidden: int
    outputs: int

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(self.hidden, param_dtype=jnp.float64)(x))
        return nn.Dense(self.outputs, param_dtype=jnp.float64)(x)


class NNXMLP(nnx.Module):
    def __init__(self, d_in, hidden, outputs, *, rngs):
        self.hidden = nnx.Linear(d_in, hidden, param_dtype=jnp.float64, rngs=rngs)
        self.out = nnx.Linear(hidden, outputs, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


D_IN, HIDDEN, K_OUT, N = 4, 6, 3, 24  # the model-kind MLPs: 4 -> 6 -> 3, m = 51


def make_model(kind):
    """(predict, params) for a 4 -> 6 -> 3 tanh MLP written as a plain function, linen or NNX."""
    if kind == "plain":
        return mlp_apply, mlp_init(0, (D_IN, HIDDEN, K_OUT))
    if kind == "linen":
        model = LinenMLP(HIDDEN, K_OUT)
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, D_IN), jnp.float64))["params"]
        return (lambda p, x: model.apply({"params": p}, x)), params
    model = NNXMLP(D_IN, HIDDEN, K_OUT, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


# Every other test here uses plain-function models, so "plain" repeats their coverage in one place; it
# is marked slow to keep the default run short (each kind compiles every primitive).
@pytest.mark.parametrize("kind", [pytest.param("plain", marks=pytest.mark.slow), "linen", "nnx"])
def test_primitives_work_with_every_model_kind(x64, kind):
    from conftest import dense_jacobian

    from lsgeo import losses

    predict, params = make_model(kind)
    f = sq_objective(predict)
    batch = regression_batch(1, N, D_IN, K_OUT)
    m = optax.tree.size(params)
    assert m == D_IN * HIDDEN + HIDDEN + HIDDEN * K_OUT + K_OUT
    v, key = random_tree(2, params), jax.random.key(3)
    h, jac = np.asarray(dense_hessian(f, params, batch)), np.asarray(dense_jacobian(predict, params, batch[0]))
    eigs = np.linalg.eigvalsh(h)

    hv = curvature.hvp(f, params, batch, v)
    validation.check_same_structure(params, hv, "hvp")
    np.testing.assert_allclose(flat(hv), h @ flat(v), rtol=1e-10, atol=1e-12)
    gv = curvature.gnvp(predict, losses.squared_loss, params, batch, v)
    np.testing.assert_allclose(flat(gv), jac.T @ (jac @ flat(v)) / N, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(curvature.hessian(f, params, batch), h, rtol=1e-10, atol=1e-12)
    # Hutch++ with N / 3 >= m sketches the whole space: the trace is exact
    trace = curvature.hessian_trace(f, params, batch, key, num_probes=3 * m, method="hutch++")
    np.testing.assert_allclose(trace, np.trace(h), rtol=1e-9)
    np.testing.assert_allclose(curvature.top_eigenvalues(f, params, batch, key, k=3), eigs[::-1][:3], rtol=1e-8)
    values, _ = curvature.eigenpairs(f, params, batch, key, k=2)
    np.testing.assert_allclose(values, eigs[::-1][:2], rtol=1e-8)
    np.testing.assert_allclose(curvature.min_eigenvalue(f, params, batch, key)[0], eigs[0], rtol=1e-8)
    grid, density = curvature.spectral_density(f, params, batch, key, num_iters=m, num_runs=4)
    np.testing.assert_allclose(jnp.trapezoid(density, grid), 1.0, rtol=1e-6)  # tails beyond the 5-width margins
    assert grid[0] < eigs[0] and grid[-1] > eigs[-1]  # with K = m the nodes are eigenvalues
    exact_index = curvature.saddle_index(f, params, batch, tol=0.0)
    np.testing.assert_allclose(exact_index, np.mean(eigs < 0), atol=1e-7)
    slq_index = curvature.saddle_index(f, params, batch, key, method="slq", num_iters=m, num_runs=4, tol=0.0)
    assert abs(slq_index - exact_index) < 0.2
    diag = curvature.hessian_diagonal(f, params, batch, key, num_probes=8)
    validation.check_same_structure(params, diag, "hessian_diagonal")
