"""Tests of lsgeo.curvature against dense autodiff (jax.hessian, jax.jacobian) and dense eigh.

Comparisons at 1e-10 run in float64 through the ``x64`` fixture. Objectives are module-level
functions, so the jitted primitives (``f`` is a static argument) compile once per shape.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from flax import nnx
from jax.flatten_util import ravel_pytree

from lsgeo import curvature, losses, validation

# ----------------------------------------------------------------------------------------------
# tiny models: a plain function, a flax linen module and an flax NNX module (all tanh MLPs),
# plus a small CNN written with lax.conv_general_dilated.


def mlp_init(seed, sizes):
    """Parameters of a tanh MLP as a list of {"w", "b"} dicts (numpy float64: no eager JAX ops)."""
    rng = np.random.default_rng(seed)
    return [
        {"w": rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), "b": 0.1 * rng.standard_normal(d_out)}
        for d_in, d_out in zip(sizes[:-1], sizes[1:])
    ]


def mlp_apply(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = jnp.tanh(x)
    return x


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


def cnn_init(seed):
    rng = np.random.default_rng(seed)
    return {
        "conv": {"w": rng.standard_normal((3, 3, 1, 3)) / 3.0, "b": np.full((3,), 0.1)},
        "dense": {"w": rng.standard_normal((48, 3)) / 7.0, "b": 0.1 * rng.standard_normal(3)},
    }


def cnn_apply(params, x):  # x: [n, 6, 6, 1] -> conv 3x3 stride 1 valid -> [n, 4, 4, 3] -> dense -> [n, 3]
    h = jax.lax.conv_general_dilated(
        x, params["conv"]["w"], window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.tanh(h + params["conv"]["b"]).reshape(x.shape[0], -1)
    return h @ params["dense"]["w"] + params["dense"]["b"]


def _sq_objective(predict):
    def f(params, batch):
        x, y = batch
        return losses.squared_loss(predict(params, x), y)

    return f


def _ce_objective(predict):
    def f(params, batch):
        x, y = batch
        return losses.softmax_cross_entropy(predict(params, x), y)

    return f


def _first_output(params, x):
    return mlp_apply(params, x)[:, 0]


F_MLP = _sq_objective(mlp_apply)
HVP = jax.jit(curvature.hvp, static_argnums=0)
GNVP = jax.jit(curvature.gnvp, static_argnums=(0, 1))
F_CNN = _ce_objective(cnn_apply)
D_IN, HIDDEN, K_OUT, N = 4, 6, 3, 24  # the model-kind MLPs: 4 -> 6 -> 3, m = 51


def regression_batch(seed, n, d_in, k_out):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d_in)), rng.standard_normal((n, k_out))


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


@functools.partial(jax.jit, static_argnums=0)
def dense_hessian(f, params, batch):
    """The reference: jax.hessian of f on the flattened parameters."""
    w, unravel = ravel_pytree(params)
    return jax.hessian(lambda w: f(unravel(w), batch))(w)


@functools.partial(jax.jit, static_argnums=0)
def dense_jacobian(predict, params, x):
    """The reference Jacobian of the outputs as [n k, m]."""
    w, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda w: losses.as_matrix(predict(unravel(w), x)))(w)
    return jac.reshape(-1, w.shape[0])


def random_tree(seed, params):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: rng.standard_normal(np.shape(a)), params)


def flat(t):
    """Flattened leaves, in the order of jax.flatten_util.ravel_pytree (jax.tree_util flattening order)."""
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(t)])


# ----------------------------------------------------------------------------------------------
# products


def test_hvp_matches_dense_hessian_mlp(x64):
    params = mlp_init(0, (5, 8, 8, 3))
    batch = regression_batch(1, 20, 5, 3)
    v = random_tree(2, params)
    hv = HVP(F_MLP, params, batch, v)
    expected = dense_hessian(F_MLP, params, batch) @ flat(v)
    np.testing.assert_allclose(flat(hv), expected, rtol=1e-10, atol=1e-12)


def test_hvp_matches_dense_hessian_cnn(x64):
    params = cnn_init(0)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((10, 6, 6, 1)), rng.integers(0, 3, size=10)
    v = random_tree(3, params)
    hv = HVP(F_CNN, params, (x, y), v)
    expected = dense_hessian(F_CNN, params, (x, y)) @ flat(v)
    np.testing.assert_allclose(flat(hv), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["squared", "cross_entropy", "logistic"])
def test_gnvp_matches_dense_jacobians(x64, loss):
    n = 12
    k_out = 1 if loss == "logistic" else 3
    params = mlp_init(0, (4, 7, k_out))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 4))
    if loss == "squared":
        loss_fn, y, predict = losses.squared_loss, rng.standard_normal((n, k_out)), mlp_apply
    elif loss == "cross_entropy":
        loss_fn, y, predict = losses.softmax_cross_entropy, rng.integers(0, k_out, size=n), mlp_apply
    else:  # scalar outputs [n], labels in {-1, +1}
        loss_fn, y, predict = losses.logistic_loss, rng.choice([-1.0, 1.0], size=n), _first_output
    v = random_tree(3, params)

    @jax.jit
    def products(params, batch, v, u):
        gmv = curvature.gauss_newton_operator(predict, loss_fn, params, batch)
        x, y = batch
        blocks = losses.output_hessians(loss_fn, predict(params, x), y)
        return curvature.gnvp(predict, loss_fn, params, batch, v), gmv(u), blocks

    gv, gu, blocks = products(params, (x, y), v, flat(v))
    jac = np.asarray(dense_jacobian(predict, params, x))  # [n k, m]
    d2l = scipy.linalg.block_diag(*np.asarray(blocks)) / n  # D2L = blockdiag(H_i) / n
    np.testing.assert_allclose(flat(gv), jac.T @ d2l @ jac @ flat(v), rtol=1e-10, atol=1e-13)
    # the operator form agrees with the pytree form
    np.testing.assert_allclose(gu, flat(gv), rtol=1e-12, atol=1e-14)


def test_hessian_dense_matches_jax_hessian(x64):
    params = mlp_init(0, (3, 5, 2))
    batch = regression_batch(1, 10, 3, 2)
    h = curvature.hessian(F_MLP, params, batch, chunk_size=10)  # m = 32: 4 chunks of 10, the last padded
    np.testing.assert_allclose(h, dense_hessian(F_MLP, params, batch), rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# trace


def test_hessian_trace_within_three_standard_errors(x64):
    params = mlp_init(0, (5, 8, 8, 3))
    batch = regression_batch(1, 20, 5, 3)
    exact = np.trace(dense_hessian(F_MLP, params, batch))
    est, se = curvature.hessian_trace(
        F_MLP, params, batch, jax.random.key(4), num_probes=2000, chunk_size=100, return_stderr=True
    )
    assert se > 0
    assert abs(est - exact) < 3 * se, (est, exact, se)
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
                curvature.hessian_trace(_quadratic, w, a, k, num_probes=num_probes, method=method)
                for method in ("hutchinson", "hutch++")
            ]

        return jax.vmap(one)(keys)

    est_h, est_pp = estimates(w, a, jax.random.split(jax.random.key(1), num_seeds))
    err_h, err_pp = np.mean(np.abs(est_h - exact)), np.mean(np.abs(est_pp - exact))
    assert err_pp < 0.5 * err_h, (err_pp, err_h)


# ----------------------------------------------------------------------------------------------
# Lanczos, eigenvalues, densities, saddle index


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


@pytest.fixture(scope="module")
def mlp5k():
    """A ~5k-parameter tanh MLP (16 -> 64 -> 48 -> 10) with cross-entropy on random data."""
    with jax.enable_x64(True):
        params = mlp_init(0, (16, 64, 48, 10))
        rng = np.random.default_rng(1)
        x, y = rng.standard_normal((256, 16)), rng.integers(0, 10, size=256)
    return params, (x, y)


F_CE_MLP = _ce_objective(mlp_apply)


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


@pytest.mark.slow
def test_top_eigenvalues_5k_mlp_matches_dense_eigh(x64, mlp5k):
    params, batch = mlp5k
    top = curvature.top_eigenvalues(F_CE_MLP, params, batch, jax.random.key(3), k=5, num_iters=40)
    eigs = np.linalg.eigvalsh(np.asarray(curvature.hessian(F_CE_MLP, params, batch)))
    np.testing.assert_allclose(top, eigs[::-1][:5], rtol=1e-6)


@pytest.fixture(scope="module")
def saddle_mlp():
    """A tanh MLP (6 -> 12 -> 12 -> 2, m = 266) at a random point with random targets: indefinite H."""
    with jax.enable_x64(True):
        params = mlp_init(5, (6, 12, 12, 2))
        batch = regression_batch(6, 64, 6, 2)
        eigs = np.linalg.eigvalsh(np.asarray(curvature.hessian(F_MLP, params, batch)))  # checked above
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
    np.testing.assert_allclose(jnp.trapezoid(density, grid), 1.0, rtol=1e-8)
    below = grid <= 0
    mass_below = jnp.trapezoid(jnp.where(below, density, 0.0), grid)
    assert abs(mass_below - exact_index) < 0.05, (mass_below, exact_index)
    # saddle_index(method="slq"): the same nodes, broadened by its default (robust) width
    slq = curvature.saddle_index(F_MLP, params, batch, jax.random.key(7), method="slq", num_iters=80, num_runs=16)
    assert abs(slq - exact_index) < 0.05, (slq, exact_index)
    # exact path (m <= max_dense) is the dense count
    np.testing.assert_allclose(curvature.saddle_index(F_MLP, params, batch), exact_index, atol=1e-7)
    # a user grid
    user_grid = jnp.linspace(eigs[0] - 1.0, eigs[-1] + 1.0, 500)
    g2, d2 = curvature.spectral_density(
        F_MLP, params, batch, jax.random.key(7), num_iters=80, num_runs=16, grid=user_grid, width=width
    )
    np.testing.assert_array_equal(g2, user_grid)
    np.testing.assert_allclose(jnp.trapezoid(d2, g2), 1.0, rtol=1e-8)


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


# ----------------------------------------------------------------------------------------------
# every primitive on the three kinds of model


# Every other test in this file uses plain-function models, so "plain" here repeats their coverage in
# one place; it is marked slow to keep the default run short (each kind compiles every primitive).
@pytest.mark.parametrize("kind", [pytest.param("plain", marks=pytest.mark.slow), "linen", "nnx"])
def test_primitives_work_with_every_model_kind(x64, kind):
    predict, params = make_model(kind)
    f = _sq_objective(predict)
    batch = regression_batch(1, N, D_IN, K_OUT)
    m = optax.tree.size(params)
    assert m == D_IN * HIDDEN + HIDDEN + HIDDEN * K_OUT + K_OUT
    v, key = random_tree(2, params), jax.random.key(3)
    h, jac = np.asarray(dense_hessian(f, params, batch)), np.asarray(dense_jacobian(predict, params, batch[0]))
    eigs = np.linalg.eigvalsh(h)

    hv = HVP(f, params, batch, v)
    validation.check_same_structure(params, hv, "hvp")
    np.testing.assert_allclose(flat(hv), h @ flat(v), rtol=1e-10, atol=1e-12)
    gv = GNVP(predict, losses.squared_loss, params, batch, v)
    np.testing.assert_allclose(flat(gv), jac.T @ (jac @ flat(v)) / N, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(curvature.hessian(f, params, batch), h, rtol=1e-10, atol=1e-12)
    # Hutch++ with N / 3 >= m sketches the whole space: the trace is exact
    trace = curvature.hessian_trace(f, params, batch, key, num_probes=3 * m, method="hutch++")
    np.testing.assert_allclose(trace, np.trace(h), rtol=1e-9)
    np.testing.assert_allclose(curvature.top_eigenvalues(f, params, batch, key, k=3), eigs[::-1][:3], rtol=1e-8)
    values, vectors = curvature.eigenpairs(f, params, batch, key, k=2)
    np.testing.assert_allclose(values, eigs[::-1][:2], rtol=1e-8)
    np.testing.assert_allclose(curvature.min_eigenvalue(f, params, batch, key)[0], eigs[0], rtol=1e-8)
    grid, density = curvature.spectral_density(f, params, batch, key, num_iters=m, num_runs=4)
    np.testing.assert_allclose(jnp.trapezoid(density, grid), 1.0, rtol=1e-8)
    assert grid[0] < eigs[0] and grid[-1] > eigs[-1]  # with K = m the nodes are eigenvalues
    exact_index = curvature.saddle_index(f, params, batch)
    np.testing.assert_allclose(exact_index, np.mean(eigs < 0), atol=1e-7)
    slq_index = curvature.saddle_index(f, params, batch, key, method="slq", num_iters=m, num_runs=4)
    assert abs(slq_index - exact_index) < 0.2


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_value_error_naming_the_argument():
    params = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
    batch = jnp.ones(())

    def f(p, b):
        return b * (jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 3))

    key = jax.random.key(0)
    with pytest.raises(ValueError, match="v must have the same pytree structure"):
        curvature.hvp(f, params, batch, {"a": jnp.ones((3,))})
    with pytest.raises(ValueError, match=r"v leaf .*'b'.* has shape"):
        curvature.hvp(f, params, batch, {"a": jnp.ones((3,)), "b": jnp.ones((4,))})
    with pytest.raises(ValueError, match="v must have the same pytree structure"):
        curvature.gnvp(lambda p, x: x * p["a"][0], losses.squared_loss, params, (jnp.ones(2), jnp.ones(2)), [1.0])
    with pytest.raises(ValueError, match="method must be one of"):
        curvature.hessian_trace(f, params, batch, key, method="hutch+")
    with pytest.raises(ValueError, match="num_probes must be a positive integer"):
        curvature.hessian_trace(f, params, batch, key, num_probes=-4)
    with pytest.raises(ValueError, match="num_probes must be >= 3"):
        curvature.hessian_trace(f, params, batch, key, num_probes=2, method="hutch++")
    with pytest.raises(ValueError, match="k must be <= the number of parameters m=7"):
        curvature.top_eigenvalues(f, params, batch, key, k=8)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        curvature.eigenpairs(f, params, batch, key, k=0)
    with pytest.raises(ValueError, match="num_iters must be >= k"):
        curvature.top_eigenvalues(f, params, batch, key, k=3, num_iters=2)
    with pytest.raises(ValueError, match="which must be one of"):
        curvature.eigenpairs(f, params, batch, key, which="middle")
    with pytest.raises(ValueError, match="num_iters must be <= the dimension"):
        curvature.lanczos(lambda u: u, jnp.ones(4), 5)
    with pytest.raises(ValueError, match="v0 must be a flat vector"):
        curvature.lanczos(lambda u: u, jnp.ones((2, 2)), 2)
    with pytest.raises(ValueError, match="method must be one of"):
        curvature.saddle_index(f, params, batch, method="dense")
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        curvature.saddle_index(f, params, batch, method="slq")
    with pytest.raises(ValueError, match="num_runs must be a positive integer"):
        curvature.spectral_density(f, params, batch, key, num_runs=0)
    with pytest.raises(ValueError, match="grid must be a 1-D array"):
        curvature.spectral_density(f, params, batch, key, grid=jnp.zeros((2, 2)))
