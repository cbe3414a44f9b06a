"""lsgeo.curvature operators (Hessian, GaussNewton, EmpiricalFisher, MonteCarloFisher, blocks) against
dense float64 references built independently: jax.hessian, J^T D2L J from dense Jacobians, explicit
per-example gradients; every estimator on a Gauss-Newton and an empirical-Fisher operator against the
dense matrix; XTrace / XDiag against their leave-one-out definitions; solve against a dense solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    rounding_floor,
    cnn_apply,
    cnn_init,
    dense_hessian,
    dense_jacobian,
    flat,
    last_json,
    mlp_apply,
    mlp_init,
    random_tree,
    rounding_floor,
    run_python,
)
from jax.flatten_util import ravel_pytree

from lsgeo import curvature, losses

N = 13  # examples: microbatches of 5 leave an uneven last one of 3


def _problem(model, loss_name):
    """(predict, loss, params, (x, y)) in float64 numpy."""
    rng = np.random.default_rng(3)
    if model == "mlp":
        params, x, predict = mlp_init(0, (4, 6, 3)), rng.standard_normal((N, 4)), mlp_apply
    else:
        params, x, predict = cnn_init(0, channels=2), rng.standard_normal((N, 6, 6, 1)), cnn_apply
    if loss_name == "squared":
        return predict, losses.squared_loss, params, (x, rng.standard_normal((N, 3)))
    return predict, losses.softmax_cross_entropy, params, (x, rng.integers(0, 3, size=N))


def _objective(predict, loss):
    return lambda p, b: loss(predict(p, b[0]), b[1])


def dense_gauss_newton(predict, loss, params, batch):
    """J^T blockdiag(H_i) J / n from the dense [n k, m] Jacobian and the output Hessians of jax.hessian."""
    x, y = batch
    jac = np.asarray(dense_jacobian(predict, params, x))
    outputs = predict(params, x)
    h = np.asarray(jax.vmap(jax.hessian(lambda o, t: loss(o[None], t[None])))(outputs, y))  # [n, k, k]
    n, k = outputs.shape
    blocks = np.zeros((n * k, n * k))
    for i in range(n):
        blocks[i * k : (i + 1) * k, i * k : (i + 1) * k] = h[i]
    return jac.T @ blocks @ jac / n


def per_example_gradients(predict, loss, params, batch):
    """[n, m]: the gradient of each example's loss l(phi_i, y_i), one jax.grad per example."""
    x, y = batch
    w, unravel = ravel_pytree(params)
    rows = [jax.grad(lambda w: loss(predict(unravel(w), x[i : i + 1]), y[i : i + 1]))(w) for i in range(x.shape[0])]
    return np.stack([np.asarray(r) for r in rows])


def _operator(kind, predict, loss, params, batch, **plan):
    if kind == "hessian":
        return curvature.Hessian(_objective(predict, loss), params, batch, **plan)
    if kind == "gauss_newton":
        return curvature.GaussNewton(predict, loss, params, batch, **plan)
    return curvature.EmpiricalFisher(predict, loss, params, batch, **plan)


def _dense_reference(kind, predict, loss, params, batch):
    if kind == "hessian":
        return np.asarray(dense_hessian(_objective(predict, loss), params, batch))
    if kind == "gauss_newton":
        return dense_gauss_newton(predict, loss, params, batch)
    g = per_example_gradients(predict, loss, params, batch)
    return g.T @ g / g.shape[0]


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton", "empirical_fisher"])
@pytest.mark.parametrize("model,loss_name,microbatch_size", [
    ("mlp", "squared", None), ("mlp", "squared", 5), ("cnn", "cross_entropy", None), ("cnn", "cross_entropy", 5),
    ("mlp", "cross_entropy", 5),
])
def test_operator_equals_its_dense_reference(x64, kind, model, loss_name, microbatch_size):
    predict, loss, params, batch = _problem(model, loss_name)
    op = _operator(kind, predict, loss, params, batch, microbatch_size=microbatch_size)
    dense = _dense_reference(kind, predict, loss, params, batch)
    np.testing.assert_allclose(op.to_dense(vectors_per_pass=40), dense, rtol=1e-9, atol=1e-12)
    v = random_tree(5, params)
    np.testing.assert_allclose(flat(op @ v), dense @ flat(v), rtol=1e-9, atol=1e-12)  # the pytree form


def test_operator_classes_have_distinct_tree_structures(x64):
    """jit keys compiled programs by the arguments' tree structure: two operator classes on one problem must never
    compare equal, or a hash-bucket collision runs one class's program for the other (lsgeo.pytree_classes: the
    empirical Fisher returned the Gauss-Newton matrix under jax.tree_util.register_dataclass)."""
    predict, loss, params, batch = _problem("mlp", "squared")
    ops = [_operator(kind, predict, loss, params, batch) for kind in ("hessian", "gauss_newton", "empirical_fisher")]
    ops += [curvature.MonteCarloFisher(predict, loss, params, batch, key=jax.random.PRNGKey(0)),
            curvature.GaussNewton(predict, loss, params, batch, microbatch_size=5)]
    structures = [jax.tree_util.tree_structure(op) for op in ops]
    for i, a in enumerate(structures):
        assert [a == b for b in structures] == [j == i for j in range(len(structures))]
    risk, objective = ops[1].objective, ops[0].objective  # Risk and Objective on the same data
    assert jax.tree_util.tree_structure(risk) != jax.tree_util.tree_structure(objective)
    leaves, structure = jax.tree_util.tree_flatten(ops[2])
    again = jax.tree_util.tree_unflatten(structure, leaves)
    assert type(again) is curvature.EmpiricalFisher and jax.tree_util.tree_structure(again) == structures[2]


def test_products_in_every_form_agree(x64):
    predict, loss, params, batch = _problem("mlp", "cross_entropy")
    op = curvature.GaussNewton(predict, loss, params, batch, microbatch_size=4)
    m = op.size
    assert op.shape == (m, m) and m == flat(params).size and op.dtype == jnp.float64
    us = np.random.default_rng(0).standard_normal((5, m))
    many = op @ us  # [p, m]: one linearisation, 5 tangents
    one_by_one = np.stack([np.asarray(op @ u) for u in us])
    np.testing.assert_allclose(many, one_by_one, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(flat(op @ op.unravel(us[0])), one_by_one[0], rtol=1e-12, atol=1e-14)
    # an operator is a pytree: it passes through jit, and replace() moves it to other parameters
    np.testing.assert_allclose(jax.jit(lambda o, u: o.matvec(u))(op, us[0]), one_by_one[0], rtol=1e-12)
    other = jax.tree_util.tree_map(lambda a: 1.1 * a, params)
    np.testing.assert_allclose(op.replace(params=other).to_dense(), dense_gauss_newton(predict, loss, other, batch),
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="v must be a pytree shaped like"):
        op @ np.ones(m + 1)


def test_empirical_fisher_normalisation_matches_curvlinops_for_cross_entropy(x64):
    """E = 1/n sum_i g_i g_i^T with g_i the gradient of example i's cross-entropy: curvlinops' EF for
    CrossEntropyLoss(reduction='mean'). By hand on a linear softmax model: g_i = x_i (p_i - e_{y_i})^T."""
    rng = np.random.default_rng(0)
    x, y, w = rng.standard_normal((7, 3)), rng.integers(0, 4, size=7), rng.standard_normal((3, 4))
    p = np.exp(x @ w) / np.exp(x @ w).sum(1, keepdims=True)
    g = np.stack([np.outer(x[i], p[i] - np.eye(4)[y[i]]).ravel() for i in range(7)])
    op = curvature.EmpiricalFisher(lambda w, x: x @ w, losses.softmax_cross_entropy, w, (x, y))
    np.testing.assert_allclose(op.to_dense(), g.T @ g / 7, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("model,loss_name", [("mlp", "squared"), ("mlp", "cross_entropy"), ("cnn", "cross_entropy")])
def test_monte_carlo_fisher_is_the_gauss_newton_matrix_within_sampling_error(x64, model, loss_name):
    predict, loss, params, batch = _problem(model, loss_name)
    gn = dense_gauss_newton(predict, loss, params, batch)
    op = curvature.MonteCarloFisher(predict, loss, params, batch, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 64)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: op.replace(key=k).to_dense()))(keys))  # 64 independent F_j
    mean = draws.mean(0)
    se = draws.std(0, ddof=1) / np.sqrt(len(keys))
    z = (mean - gn)[se > 1e-12] / se[se > 1e-12]
    assert np.max(np.abs(z)) < 6.5 and 0.5 < np.mean(z**2) < 2.0, (np.max(np.abs(z)), np.mean(z**2))
    assert np.all(np.linalg.eigvalsh(draws[0]) > -1e-10)  # each draw is PSD (a mean of outer products)
    # fixed draws: the same matrix whatever the microbatch cut (draws keyed by the example index)
    cut = curvature.MonteCarloFisher(predict, loss, params, batch, jax.random.key(0), microbatch_size=5)
    np.testing.assert_allclose(cut.to_dense(), op.to_dense(), rtol=1e-10, atol=1e-13)
    several = curvature.MonteCarloFisher(predict, loss, params, batch, jax.random.key(0), num_samples=8)
    assert np.linalg.norm(several.to_dense() - gn) < np.linalg.norm(op.to_dense() - gn)  # 8 draws: closer
    with pytest.raises(ValueError, match="has no label sampler"):
        curvature.MonteCarloFisher(predict, lambda o, t: jnp.mean((o - t) ** 4), params, batch, jax.random.key(0))


def _psd_problem():
    predict, loss, params, batch = _problem("mlp", "cross_entropy")
    return {
        "gauss_newton": (curvature.GaussNewton(predict, loss, params, batch),
                         dense_gauss_newton(predict, loss, params, batch)),
        "empirical_fisher": (curvature.EmpiricalFisher(predict, loss, params, batch),
                             _dense_reference("empirical_fisher", predict, loss, params, batch)),
    }


@pytest.mark.parametrize("kind", ["gauss_newton", "empirical_fisher"])
def test_every_estimator_takes_an_operator(x64, kind):
    op, dense = _psd_problem()[kind]
    m, eigs = dense.shape[0], np.linalg.eigvalsh(dense)
    key = jax.random.key(7)
    top, residuals = curvature.top_eigenvalues(op, key, k=3, num_iters=m, return_residuals=True)
    np.testing.assert_allclose(top, eigs[::-1][:3], rtol=1e-8)
    assert np.all(residuals < 1e-8 * eigs[-1])
    values, vectors = curvature.eigenpairs(op, key=key, k=2, which="largest", num_iters=40, tol=1e-10)
    np.testing.assert_allclose(values, eigs[::-1][:2], rtol=1e-8)
    u = np.stack([flat(jax.tree_util.tree_map(lambda a: a[j], vectors)) for j in range(2)])
    np.testing.assert_allclose(np.abs(u @ np.linalg.eigh(dense)[1][:, ::-1][:, :2]), np.eye(2), atol=1e-6)
    lam, _ = curvature.min_eigenvalue(op, key, num_iters=m)
    np.testing.assert_allclose(lam, eigs[0], atol=1e-9 * eigs[-1])
    for method in ("hutchinson", "hutch++", "xtrace"):
        est, se = curvature.hessian_trace(op, key, num_probes=30, method=method, return_stderr=True)
        floor = rounding_floor(np.abs(dense).sum())  # XTrace is exact on a low-rank operator: s.e. ~ rounding
        assert se >= 0 and abs(est - np.trace(dense)) <= 4 * se + floor, (method, est, np.trace(dense), se)
    for method in ("hutchinson", "xdiag"):
        diag, se = curvature.hessian_diagonal(op, key, num_probes=40, method=method, return_stderr=True)
        z = (flat(diag) - np.diag(dense)) / (flat(se) + rounding_floor(np.abs(dense).sum(axis=1)))
        assert np.mean(np.abs(z) < 4) > 0.95, (method, np.sort(np.abs(z))[-5:])
    grid, density = curvature.spectral_density(op, key, num_iters=30, num_runs=3)
    np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, atol=1e-3)
    assert float(curvature.saddle_index(op)) == 0.0  # PSD: no negative eigenvalue above rounding


def _loo_projector(y, i):
    """P_(i): the orthogonal projector on the range of Y without its column i (an explicit QR)."""
    q, _ = np.linalg.qr(np.delete(y, i, axis=1))
    return q @ q.T


def test_xtrace_and_xdiag_equal_their_leave_one_out_definitions(x64):
    """XTrace = mean_i [tr(P_(i) A) + w_i^T (I - P_(i)) A (I - P_(i)) w_i]; XDiag = mean_i [diag(P_(i) A) +
    w_i * ((I - P_(i)) A w_i)] (Epperly, Tropp, Webber 2024), with the same test vectors w_i."""
    rng = np.random.default_rng(0)
    m, s = 12, 4
    b = rng.standard_normal((m, m))
    a = b @ np.diag(0.5 ** np.arange(m)) @ b.T
    op = curvature.Hessian(lambda w, x: 0.5 * w @ x @ w, jnp.zeros(m), jnp.asarray(a))
    key = jax.random.key(3)
    omega = np.asarray(jax.random.rademacher(key, (s, m), dtype=jnp.float64)).T  # the estimators' test vectors
    y = a @ omega
    trace_terms, diag_terms = [], []
    for i in range(s):
        p = _loo_projector(y, i)
        resid = (np.eye(m) - p) @ omega[:, i]
        trace_terms.append(np.trace(p @ a) + resid @ a @ resid)
        diag_terms.append(np.diag(p @ a) + omega[:, i] * ((np.eye(m) - p) @ a @ omega[:, i]))
    est, se = curvature.hessian_trace(op, key, num_probes=2 * s, method="xtrace", return_stderr=True)
    np.testing.assert_allclose(est, np.mean(trace_terms), rtol=1e-10)
    np.testing.assert_allclose(se, np.std(trace_terms, ddof=1) / np.sqrt(s), rtol=1e-8)
    diag = curvature.hessian_diagonal(op, key, num_probes=2 * s, method="xdiag")
    np.testing.assert_allclose(diag, np.mean(diag_terms, axis=0), rtol=1e-9, atol=1e-12)


def test_blocks_are_the_diagonal_blocks_of_the_dense_matrix(x64):
    predict, loss, params, batch = _problem("cnn", "cross_entropy")
    for op, dense in [
        (curvature.Hessian(_objective(predict, loss), params, batch, microbatch_size=5),
         _dense_reference("hessian", predict, loss, params, batch)),
        (curvature.GaussNewton(predict, loss, params, batch), dense_gauss_newton(predict, loss, params, batch)),
    ]:
        parts = curvature.blocks(op)
        assert list(parts) == ["conv", "dense"]
        start = 0
        for name, block in parts.items():
            size = flat(params[name]).size
            assert block.size == size
            reference = dense[start : start + size, start : start + size]
            np.testing.assert_allclose(block.to_dense(), reference, rtol=1e-9, atol=1e-12)
            top = curvature.top_eigenvalues(block, jax.random.key(0), k=1, num_iters=size)
            np.testing.assert_allclose(top[0], np.linalg.eigvalsh(reference)[-1], rtol=1e-9)
            v = jax.tree_util.tree_map(lambda a: np.ones_like(a), block.variable_params)
            assert jax.tree_util.tree_structure(block @ v) == jax.tree_util.tree_structure(block.variable_params)
            start += size
    leaf_blocks = curvature.blocks(op, "leaf")
    assert list(leaf_blocks) == ["conv/b", "conv/w", "dense/b", "dense/w"]
    with pytest.raises(ValueError, match="already a block"):
        curvature.blocks(parts["conv"])


def test_block_slq_nodes_equal_lanczos_on_each_dense_block(x64):
    """All blocks in one program (masked products, vmapped over the blocks) = SLQ of each dense block from
    the same probes restricted to the block."""
    predict, loss, params, batch = _problem("cnn", "cross_entropy")
    op = curvature.Hessian(_objective(predict, loss), params, batch)
    dense = _dense_reference("hessian", predict, loss, params, batch)
    key, runs, steps = jax.random.key(4), 2, 9
    got = curvature.block_slq_nodes(op, key, num_iters=steps, num_runs=runs)
    probes = np.asarray(jax.random.rademacher(key, (runs, op.size), dtype=jnp.float64))
    start = 0
    for name in ("conv", "dense"):
        size = flat(params[name]).size
        block = dense[start : start + size, start : start + size]
        for r in range(runs):
            alphas, betas = curvature.lanczos(lambda u: block @ u, probes[r, start : start + size], steps)
            theta, u = curvature.tridiagonal_eigh(alphas, betas)
            np.testing.assert_allclose(got[name][0][r], theta, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(got[name][1][r], np.square(u[0]) / runs, rtol=1e-6, atol=1e-10)
        start += size
    assert list(curvature.block_slq_nodes(op, key, num_iters=3, num_runs=1, skip=("conv",))) == ["dense"]
    with pytest.raises(ValueError, match="num_iters must be <= the smallest compared block"):
        curvature.block_slq_nodes(op, key, num_iters=21)


def test_solve_equals_a_dense_solve_and_reports_failure(x64):
    op, dense = _psd_problem()["gauss_newton"]
    b = random_tree(1, op.params)
    x, info = curvature.solve(op, b, damping=0.1, tol=1e-10, return_info=True)
    expected = np.linalg.solve(dense + 0.1 * np.eye(dense.shape[0]), flat(b))
    np.testing.assert_allclose(flat(x), expected, rtol=1e-7)
    residual = np.linalg.norm(flat(b) - (dense + 0.1 * np.eye(dense.shape[0])) @ flat(x))
    assert bool(info.converged) and residual <= 1e-10 * np.linalg.norm(flat(b)) * 10
    assert 0 < int(info.num_iters) <= dense.shape[0] + 5
    np.testing.assert_allclose(curvature.solve(op, flat(b), damping=0.1, tol=1e-10), expected, rtol=1e-7)
    with pytest.raises(curvature.SolveDidNotConverge, match="maxiter=2") as failure:
        curvature.solve(op, b, damping=0.1, tol=1e-10, maxiter=2)
    assert int(failure.value.info.num_iters) == 2
    assert np.all(np.isnan(flat(jax.jit(lambda o, b: curvature.solve(o, b, damping=0.1, maxiter=2))(op, b))))
    # an indefinite Hessian without enough damping: reported, not a wrong x
    saddle = curvature.Hessian(lambda w, c: 0.5 * jnp.sum(c * w**2), jnp.zeros(3), jnp.array([-1.0, 2.0, 3.0]))
    with pytest.raises(curvature.SolveDidNotConverge, match="not positive definite"):
        curvature.solve(saddle, jnp.ones(3), damping=0.5)
    np.testing.assert_allclose(curvature.solve(saddle, jnp.ones(3), damping=2.0), [1.0, 0.25, 0.2], rtol=1e-10)


def test_low_rank_inverse_is_exact_for_the_top_eigenpairs(x64):
    op, dense = _psd_problem()["gauss_newton"]
    k = 4
    values, vectors = curvature.eigenpairs(op, jax.random.key(0), k=k, num_iters=dense.shape[0])
    w, u = np.linalg.eigh(dense)
    low_rank = u[:, -k:] @ np.diag(w[-k:]) @ u[:, -k:].T
    b = random_tree(2, op.params)
    x = curvature.low_rank_inverse(values, vectors, damping=0.3)(b)
    np.testing.assert_allclose(flat(x), np.linalg.solve(low_rank + 0.3 * np.eye(len(w)), flat(b)), rtol=1e-7)


def test_a_batch_coupled_objective_is_refused_with_microbatches():
    """BatchNorm in training mode: the objective on a microbatch depends on the microbatch (batch
    statistics), so a microbatched 'data-set value' would depend on the cut. Refused with the remedy."""

    def batch_normalised(w, x):
        h = x @ w
        return jnp.mean(((h - h.mean(0)) / (h.std(0) + 1e-3)) ** 3 + h)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((12, 3)) ** 2, jnp.float32)
    w = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="not a mean over independent examples.*make_predict"):
        curvature.Hessian(batch_normalised, w, x, microbatch_size=4)
    curvature.Hessian(batch_normalised, w, x)  # whole batch: nothing to refuse
    curvature.Hessian(lambda w, x: jnp.mean((x @ w) ** 2), w, x, microbatch_size=4)  # a mean over examples


def test_four_devices_hold_a_quarter_of_the_data_each():
    result = last_json(run_python("_operator_devices.py", devices=4))
    assert result["devices"] == 4
    total = result["data_bytes"]
    for device_bytes in result["bytes_per_device"]:
        assert 0.2 * total <= device_bytes <= 0.3 * total, result
    for name, error in result["errors"].items():
        assert error < 1e-5, (name, error)
