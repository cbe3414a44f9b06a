"""lsgeo.curvature against references computed without lsgeo: dense ``jax.hessian`` (conftest.dense_hessian)
and ``numpy.linalg.eigh``, ARPACK on the dense matrix, and the exact variances of the stochastic estimators,
so that a wrong formula fails here (issue 22: every test was shown to fail on a planted bug of its kind).

Statistical bounds are at most 4 standard errors, each computed in the test from the dense Hessian (not
the estimator's own stderr)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    cnn_init, dense_hessian, F_CE_MLP, F_CNN, F_MLP, flat, image_batch, mlp_init, regression_batch, rounding_floor,
    sq_objective,
)
from flax import nnx
from scipy.stats import norm

from lsgeo import curvature


@pytest.fixture(scope="module")
def saddle():
    """A tanh MLP 5 -> 8 -> 8 -> 3 (m = 147) at a random point with random targets: about half of the
    Hessian's eigenvalues are negative. Returns params, batch and the dense Hessian (float64)."""
    with jax.enable_x64(True):
        params = mlp_init(5, (5, 8, 8, 3))
        batch = regression_batch(6, 21, 5, 3)
        h = np.asarray(dense_hessian(F_MLP, params, batch))
    return params, batch, h


def _residuals(h, values, vectors):
    """||H y_j - theta_j y_j|| / |theta_j| for the rows y_j of ``vectors``, from the dense matrix."""
    vectors = np.asarray(vectors)
    return np.linalg.norm(vectors @ h - np.asarray(values)[:, None] * vectors, axis=1) / np.abs(values)


# --------------------------------------------------------------------------------------------------
# Lanczos with early stopping, which="smallest" and which="largest"


def test_min_eigenvalue_and_smallest_eigenpairs_with_tolerance_match_dense(x64, saddle):
    """Early stopping at the smallest end (tol=1e-6): the values are the dense eigvalsh ones and the
    returned vectors have a relative residual ||H u - lam u|| <= tol |lam| measured with the dense H.
    (Planted: the padding sentinel of which="smallest" placed below the spectrum, as for "largest".)"""
    params, batch, h = saddle
    eigs = np.linalg.eigvalsh(h)
    tol = 1e-6
    lam, u = curvature.min_eigenvalue(F_MLP, params, batch, jax.random.key(0), num_iters=120, tol=tol)
    np.testing.assert_allclose(lam, eigs[0], rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(flat(u)), 1.0, rtol=1e-10)
    assert _residuals(h, [lam], flat(u)[None])[0] <= 1.01 * tol
    values, vectors = curvature.eigenpairs(F_MLP, params, batch, jax.random.key(1), k=3, which="smallest",
                                           num_iters=120, tol=tol)
    np.testing.assert_allclose(values, eigs[:3], rtol=1e-5)
    rows = np.stack([flat(leaf) for leaf in zip(*(np.asarray(a) for a in jax.tree_util.tree_leaves(vectors)))])
    assert np.all(_residuals(h, values, rows) <= 1.01 * tol)
    # and the largest end with the same tolerance
    top = curvature.top_eigenvalues(F_MLP, params, batch, jax.random.key(2), k=2, num_iters=120, tol=tol)
    np.testing.assert_allclose(top, eigs[::-1][:2], rtol=1e-5)


@pytest.mark.parametrize("which", ["smallest", "largest"])
def test_ritz_pairs_stop_at_the_first_step_whose_true_residuals_meet_tol(x64, saddle, which):
    """ritz_pairs on the dense Hessian: at the returned step every wanted Ritz pair has a residual
    ||A y - theta y|| <= tol |theta| computed from A and y = V^T u (not from the tridiagonal), and one
    step earlier (the same start, no tolerance) some pair did not: the rule stops neither early nor late.
    (Planted: the residual |beta_K u_Kj| read from row K - 1 of U instead of row K.)"""
    _, _, h = saddle
    eigs = np.linalg.eigvalsh(h)
    k, tol, cap = 3, 1e-6, 120
    v0 = np.random.default_rng(0).standard_normal(h.shape[0])

    @jax.jit
    def run(a, v0):
        return curvature.ritz_pairs(lambda u: a @ u, v0, cap, k=k, which=which, tol=tol)

    values, coefficients, basis, steps = run(h, v0)
    steps = int(steps)
    assert k < steps < cap, steps  # it did stop early
    expected = eigs[:k] if which == "smallest" else eigs[::-1][:k]
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    coefficients, basis = np.asarray(coefficients), np.asarray(basis)
    np.testing.assert_array_equal(coefficients[steps:], 0.0)
    vectors = coefficients.T @ basis
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(k), atol=1e-10)
    assert np.all(_residuals(h, values, vectors) <= 1.01 * tol), _residuals(h, values, vectors)
    before, c_before, b_before, n_before = jax.jit(
        lambda a, v: curvature.ritz_pairs(lambda u: a @ u, v, steps - 1, k=k, which=which)
    )(h, v0)
    assert int(n_before) == steps - 1
    res_before = _residuals(h, before, np.asarray(c_before).T @ np.asarray(b_before))
    assert np.max(res_before) > tol, res_before


def test_top_eigenvalues_match_arpack_on_the_dense_hessian(x64):
    """A 1.6k-parameter MLP with cross-entropy: the top-5 Lanczos values against ARPACK (scipy eigsh,
    tol 1e-14) run on the dense jax.hessian matrix (not on lsgeo's operator), and the early-stopped top-1."""
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    params = mlp_init(0, (16, 32, 24, 10))
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((128, 16)), rng.integers(0, 10, size=128)
    h = np.asarray(dense_hessian(F_CE_MLP, params, batch))
    assert h.shape == (1586, 1586)
    ref = np.sort(scipy_linalg.eigsh(h, k=5, which="LA", tol=1e-14)[0])[::-1]
    top = curvature.top_eigenvalues(F_CE_MLP, params, batch, jax.random.key(3), k=5, num_iters=40)
    np.testing.assert_allclose(top, ref, rtol=1e-7)
    top1 = curvature.top_eigenvalues(F_CE_MLP, params, batch, jax.random.key(3), k=1, num_iters=40, tol=1e-6)
    np.testing.assert_allclose(top1, ref[:1], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# the SLQ saddle index with a nonzero threshold and a nonzero width


def test_slq_saddle_index_with_threshold_and_width_against_exact_index(x64, saddle):
    """With K = m Lanczos steps every SLQ run is exact Gauss quadrature of v^T g(H) v, g(t) =
    Phi((-t_0 - t) / width), so the estimate is unbiased for tr(g(H)) / m with the Rademacher variance
    2 (||g(H)||_F^2 - sum_i g(H)_ii^2) / m^2 per run: both from the dense eigh. The estimate lies within
    4 s.e. of that and of the exact count #{lambda < -t_0} / m (up to the computed smoothing bias), and
    equals the broadened mass of its own nodes. (Planted: the threshold's sign flipped, (t_0 - theta)
    instead of (-t_0 - theta): 0.69 instead of 0.27.)"""
    params, batch, h = saddle
    m = h.shape[0]
    eigs, q = np.linalg.eigh(h)
    tol, rtol, width, runs = 0.1, 0.02, 0.03, 32
    threshold = max(tol, rtol * np.max(np.abs(eigs)))
    exact_index = np.mean(eigs < -threshold)
    assert 0.1 < exact_index < np.mean(eigs < 0) - 0.05  # the threshold matters
    g = norm.cdf((-threshold - eigs) / width)
    expected = np.mean(g)  # E over probes of the SLQ estimate
    gmat = (q * g) @ q.T
    se = np.sqrt(2 * (np.sum(gmat**2) - np.sum(np.diag(gmat) ** 2)) / m**2 / runs)
    assert abs(expected - exact_index) < 0.03  # the smoothing bias of this width is small here
    key = jax.random.key(11)
    slq = float(curvature.saddle_index(F_MLP, params, batch, key, method="slq", tol=tol, rtol=rtol, width=width,
                                       num_iters=m, num_runs=runs))
    floor = rounding_floor(1.0)  # a fraction of eigenvalues: the arithmetic's precision on a scale of 1
    assert abs(slq - expected) <= 4 * se + floor, (slq, expected, se)
    assert abs(slq - exact_index) <= 4 * se + floor + abs(expected - exact_index), (slq, exact_index, se)
    # the same number from its own nodes and weights, broadened here with scipy's normal CDF
    nodes, weights = curvature.slq_nodes(F_MLP, params, batch, key, num_iters=m, num_runs=runs)
    nodes, weights = np.asarray(nodes), np.asarray(weights)
    t = max(tol, rtol * np.max(np.abs(nodes)))
    np.testing.assert_allclose(slq, np.sum(weights * norm.cdf((-t - nodes) / width)), rtol=1e-9)
    # width = 0: the weight of the nodes below -t (K = m: the nodes are the eigenvalues)
    counted = float(curvature.saddle_index(F_MLP, params, batch, key, method="slq", tol=tol, rtol=rtol, width=0.0,
                                           num_iters=m, num_runs=runs))
    np.testing.assert_allclose(counted, np.sum(weights * (nodes < -t)), rtol=1e-9)


# --------------------------------------------------------------------------------------------------
# trace and diagonal: within 4 exact standard errors of the dense values


def _hutchinson_se(h, num_probes):
    """Exact standard error of the Rademacher Hutchinson trace estimate with ``num_probes`` probes."""
    return np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / num_probes)


def _diagonal_se(h, num_probes):
    """Exact per-coordinate standard error of the Rademacher Hutchinson diagonal estimate."""
    return np.sqrt((np.sum(h**2, axis=1) - np.diag(h) ** 2) / num_probes)


def test_hutchinson_trace_within_four_exact_standard_errors_detects_a_five_percent_bias(x64, saddle):
    """The s.e. is the exact Rademacher one from the dense H; 4 s.e. is below 5% of |tr H|, so an estimator
    biased by 5% fails. (Planted: each probe's z^T H z scaled by 1.05.)"""
    params, batch, h = saddle
    num_probes = 8000
    exact, se = np.trace(h), _hutchinson_se(h, num_probes)
    assert 4 * se < 0.05 * abs(exact) - 2 * se  # the power to see a 5% bias at this sample size
    est, est_se = curvature.hessian_trace(F_MLP, params, batch, jax.random.key(4), num_probes=num_probes,
                                          return_stderr=True)
    assert abs(est - exact) <= 4 * se + rounding_floor(np.abs(h).sum()), (est, exact, se)
    np.testing.assert_allclose(est_se, se, rtol=0.15)  # its own stderr estimates the exact one


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(6, param_dtype=jnp.float64)(x))
        return nn.Dense(3, param_dtype=jnp.float64)(x)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 6, param_dtype=jnp.float64, rngs=rngs)
        self.out = nnx.Linear(6, 3, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _problem(kind):
    """(f, params, batch) for a 4 -> 6 -> 3 tanh MLP as a plain function, flax linen or NNX (squared loss),
    or the small CNN (cross-entropy)."""
    if kind == "cnn":
        return F_CNN, cnn_init(0), image_batch(1, 21)
    batch = regression_batch(1, 24, 4, 3)
    if kind == "plain":
        return F_MLP, mlp_init(0, (4, 6, 3)), batch
    if kind == "linen":
        model = LinenMLP()
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.float64))["params"]
        return sq_objective(lambda p, x: model.apply({"params": p}, x)), params, batch
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    return sq_objective(lambda s, x: nnx.merge(graphdef, s)(x)), state, batch


@pytest.mark.parametrize("kind", ["plain", "linen", "nnx", "cnn"])
def test_hessian_diagonal_on_every_model_kind_within_four_exact_standard_errors(x64, kind):
    """Every coordinate within 4 exact s.e. of diag(jax.hessian) (coordinates of zero variance to 1e-10),
    and the standardised errors have mean square ~1 (not merely small). (Planted: Gaussian instead of
    Rademacher probes, still unbiased but with the variance sum_b H_ab^2 + H_aa^2.)"""
    f, params, batch = _problem(kind)
    h = np.asarray(dense_hessian(f, params, batch))
    num_probes = 600
    diag = curvature.hessian_diagonal(f, params, batch, jax.random.key(2), num_probes=num_probes)
    assert jax.tree_util.tree_structure(diag) == jax.tree_util.tree_structure(params)
    est, exact, se = flat(diag), np.diag(h), _diagonal_se(h, num_probes)
    np.testing.assert_array_less(np.abs(est - exact), 4 * se + np.maximum(1e-10, rounding_floor(np.abs(h).sum(axis=1))))
    z = (est - exact)[se > 0] / se[se > 0]
    assert 0.6 < np.mean(z**2) < 1.5, np.mean(z**2)


def test_cnn_trace_and_top_eigenvalues_match_dense_hessian(x64):
    """The CNN's Hessian trace (Hutch++ with a sketch spanning R^m: exact; Hutchinson within 4 exact s.e.)
    and its top eigenvalues against jax.hessian + eigvalsh, not against lsgeo's own single-batch values.
    (Planted: the canonicalised kernel-gradient convolution with its kernel's spatial axes swapped, which
    the single-batch and microbatched values share.)"""
    f, params, batch = _problem("cnn")
    h = np.asarray(dense_hessian(f, params, batch))
    m = h.shape[0]
    eigs = np.linalg.eigvalsh(h)
    key = jax.random.key(5)
    np.testing.assert_allclose(curvature.hessian_trace(f, params, batch, key, num_probes=3 * m, method="hutch++"),
                               np.trace(h), rtol=1e-9)
    est = curvature.hessian_trace(f, params, batch, key, num_probes=400)
    assert abs(est - np.trace(h)) <= 4 * _hutchinson_se(h, 400), (est, np.trace(h))
    top = curvature.top_eigenvalues(f, params, batch, key, k=3, num_iters=80)
    np.testing.assert_allclose(top, eigs[::-1][:3], rtol=1e-8)
    low, _ = curvature.min_eigenvalue(f, params, batch, key, num_iters=80)
    np.testing.assert_allclose(low, eigs[0], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_hessian_trace_value(dtype):
    """bfloat16/float16 parameters: the Hutch++ trace with a sketch spanning R^m is the float64 dense trace
    to the precision of the half-precision products (not merely finite); Hutchinson within 4 exact s.e.
    plus that precision."""
    params64 = mlp_init(5, (6, 12, 2))
    x, y = regression_batch(6, 64, 6, 2)
    with jax.enable_x64(True):
        h = np.asarray(dense_hessian(F_MLP, params64, (x, y)))
    exact, m = np.trace(h), h.shape[0]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params64)
    batch = (jnp.asarray(x, dtype), jnp.asarray(y, dtype))
    key = jax.random.key(0)
    precision = 0.02 * np.sum(np.abs(np.linalg.eigvalsh(h)))  # half-precision products: ~1% of each term
    pp = curvature.hessian_trace(F_MLP, params, batch, key, num_probes=3 * m, method="hutch++")
    assert abs(float(pp) - exact) <= precision, (float(pp), exact, precision)
    est = curvature.hessian_trace(F_MLP, params, batch, key, num_probes=256)
    assert abs(float(est) - exact) <= 4 * _hutchinson_se(h, 256) + precision, (float(est), exact)


def _quadratic(w, a):
    return 0.5 * w @ (a @ w)


def test_default_number_of_lanczos_steps_is_the_documented_one(x64):
    """``num_iters`` defaults to min(m, max(2k + 20, 40)) (top_eigenvalues, eigenpairs) and min(m, 40)
    (min_eigenvalue): on a dense, evenly spread spectrum (m = 200) Lanczos has not converged after 40 or 50
    steps, so the values tell the step count apart: the default's values are those of the explicit count.
    (Mutants: any change of 2, 20 or 40 in the default.)"""
    m = 200
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((m, m)))
    a = (q * np.linspace(-1.0, 1.0, m)) @ q.T
    w, key = np.zeros(m), jax.random.key(0)
    for k, steps in [(1, 40), (15, 50)]:
        default = np.asarray(curvature.top_eigenvalues(_quadratic, w, a, key, k=k))
        np.testing.assert_allclose(default, curvature.top_eigenvalues(_quadratic, w, a, key, k=k, num_iters=steps),
                                   rtol=1e-12)
    # one step more changes the values: the spectrum is not resolved yet, so the count is visible
    assert abs(default[0] - curvature.top_eigenvalues(_quadratic, w, a, key, k=15, num_iters=51)[0]) > 1e-9
    lam, _ = curvature.min_eigenvalue(_quadratic, w, a, key)
    np.testing.assert_allclose(lam, curvature.min_eigenvalue(_quadratic, w, a, key, num_iters=40)[0], rtol=1e-12)
    assert abs(lam - curvature.min_eigenvalue(_quadratic, w, a, key, num_iters=41)[0]) > 1e-9


def _diagonal_quadratic(w, b):
    return 0.5 * jnp.sum(b * w**2)


def test_slq_is_exact_on_a_diagonal_hessian(x64):
    """H = diag(b) with d = 4 distinct values: a Rademacher probe z has z_i^2 = 1, so z^T p(H) z / m = mean_i p(b_i)
    for every polynomial, and Lanczos from z breaks down after d steps: every run's Gauss quadrature is the
    spectral measure itself, weight (multiplicity / m) on each distinct b, none on the restart blocks. Hence
    the SLQ saddle index with a threshold and a width is deterministic: sum_i Phi((-t - b_i) / width) / m.
    (Mutant: the quadrature weights from row 1 of U instead of row 0; it passed the statistical tests.)"""
    values, counts = np.array([-2.0, -0.5, 0.25, 3.0]), np.array([3, 5, 2, 6])
    b = np.repeat(values, counts)
    m = b.size
    nodes, weights = curvature.slq_nodes(_diagonal_quadratic, np.ones(m), b, jax.random.key(0), num_iters=8,
                                         num_runs=3)
    nodes, weights = np.asarray(nodes), np.asarray(weights)
    for r in range(3):
        for value, count in zip(values, counts):
            near = np.abs(nodes[r] - value) < 1e-8
            np.testing.assert_allclose(np.sum(weights[r][near]), count / m / 3, rtol=1e-10, err_msg=str(value))
        np.testing.assert_allclose(np.sum(weights[r]), 1.0 / 3, rtol=1e-12)
    tol, width = 0.3, 0.4
    index = curvature.saddle_index(_diagonal_quadratic, np.ones(m), b, jax.random.key(0), method="slq", tol=tol,
                                   width=width, num_iters=8, num_runs=3)
    np.testing.assert_allclose(index, np.mean(norm.cdf((-tol - b) / width)), rtol=1e-10)
    counted = curvature.saddle_index(_diagonal_quadratic, np.ones(m), b, jax.random.key(0), method="slq", tol=tol,
                                     width=0.0, num_iters=8, num_runs=3)
    np.testing.assert_allclose(counted, np.mean(b < -tol), rtol=1e-10)


def test_block_slq_is_exact_on_a_block_diagonal_hessian(x64):
    """The same exactness per parameter group: each block's quadrature is the measure of its own diagonal
    entries (multiplicity / block size). (Mutant: the block weights from row 1 of U instead of row 0.)"""
    blocks = {"a": (np.array([-2.0, 1.0]), np.array([3, 4])), "b": (np.array([-1.0, 0.5, 3.0]), np.array([2, 2, 3]))}
    b = {name: np.repeat(v, c) for name, (v, c) in blocks.items()}
    params = {name: np.ones(x.size) for name, x in b.items()}

    def f(p, b):
        return sum(0.5 * jnp.sum(b[name] * p[name] ** 2) for name in p)

    out = curvature.block_slq_nodes(curvature.Hessian(f, params, b), jax.random.key(1), num_iters=5, num_runs=2)
    assert sorted(out) == ["a", "b"]
    for name, (values, counts) in blocks.items():
        nodes, weights = (np.asarray(a) for a in out[name])
        for r in range(2):
            for value, count in zip(values, counts):
                near = np.abs(nodes[r] - value) < 1e-8
                np.testing.assert_allclose(np.sum(weights[r][near]), count / counts.sum() / 2, rtol=1e-10)


def test_solve_from_a_starting_guess_matches_dense_solve(x64):
    """CG on (A + damping I) x = b from x0 = 0 and from a nonzero x0 (a warm start), against numpy's dense
    solve; A is the Hessian of a quadratic with a random SPD matrix. (Mutant: the initial residual
    b + A x0 instead of b - A x0.)"""
    m = 30
    rng = np.random.default_rng(3)
    g = rng.standard_normal((m, m))
    a = g @ g.T / m
    op = curvature.Hessian(_quadratic, np.zeros(m), a)
    b, x0, damping = rng.standard_normal(m), rng.standard_normal(m), 0.1
    expected = np.linalg.solve(a + damping * np.eye(m), b)
    for start in (None, x0):
        x = curvature.solve(op, b, damping=damping, tol=1e-10, maxiter=300, x0=start)
        np.testing.assert_allclose(x, expected, rtol=1e-7, atol=1e-9, err_msg=f"x0={start}")
    np.testing.assert_allclose(curvature.solve(op, b, damping=damping, tol=1e-10, x0=expected), expected, rtol=1e-10)
