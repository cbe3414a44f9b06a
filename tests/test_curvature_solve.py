"""solve: the convergence it reports is the true residual's; bad inputs are named; preconditioned CG reaches the
plain CG solution in fewer products. low_rank_inverse names mismatched arguments. Against dense solves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgeo import curvature


def _quadratic(w, a):
    return 0.5 * jnp.sum(w * (a @ w))


def _operator(eigs, seed=0, dtype=jnp.float64):
    m = len(eigs)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, m)))
    a = (q * np.asarray(eigs)) @ q.T
    return curvature.Hessian(_quadratic, jnp.zeros(m, dtype), jnp.asarray(a, dtype)), a


def test_a_float32_solve_reports_its_true_residual():
    """An ill-conditioned float32 system (eigenvalues 1e2 .. 1e-3 and a null space, damping 1e-3): CG's
    recurrence residual meets tol=1e-6 while the true one is thousands of times larger. The reported residual
    is the true one, and converged is only claimed when the true residual meets tol. (main: converged with a
    true relative residual of 6400 tol.)"""
    m = 100
    op, a = _operator(np.r_[np.logspace(2, -3, m - 10), np.zeros(10)], dtype=jnp.float32)
    b = jnp.asarray(np.random.default_rng(0).standard_normal(m), jnp.float32)
    for damping, tol in [(1e-3, 1e-6), (1e-3, 1e-5), (1.0, 1e-4)]:
        x, info = curvature.solve(op, b, damping=damping, tol=tol, maxiter=3000, return_info=True)
        xd = np.asarray(x, np.float64)
        true = np.linalg.norm(np.asarray(b, np.float64) - (a + damping * np.eye(m)) @ xd)
        # the float32 residual's own rounding: a few eps of the terms it is computed from
        scale = np.linalg.norm(a, 2) * np.linalg.norm(xd) + np.linalg.norm(b)
        floor = 8 * np.sqrt(m) * np.finfo(np.float32).eps * scale
        assert abs(float(info.residual_norm) - true) <= floor, (info.residual_norm, true, floor)
        if bool(info.converged):
            assert true <= tol * np.linalg.norm(b) + floor, (damping, tol, true, info)
        else:
            assert true > tol * np.linalg.norm(b) - floor, (damping, tol, true, info)
        assert int(info.num_products) >= int(info.num_iters) + 1  # + the recomputed residual(s)
    with pytest.raises(curvature.SolveDidNotConverge, match="true relative residual"):
        curvature.solve(op, b, damping=1e-3, tol=1e-6, maxiter=3000)
    x, info = curvature.solve(op, b, damping=1.0, tol=1e-4, maxiter=3000, return_info=True)
    assert bool(info.converged)  # a well-conditioned one converges, true residual and all


@pytest.mark.parametrize("name", ["b", "x0"])
def test_nan_in_b_or_x0_is_named(name):
    op, _ = _operator(np.linspace(1.0, 2.0, 5), dtype=jnp.float32)
    b, x0 = jnp.ones(5), jnp.zeros(5)
    bad = jnp.ones(5).at[2].set(jnp.nan)
    kwargs = {"b": bad, "x0": x0} if name == "b" else {"b": b, "x0": bad}
    with pytest.raises(ValueError, match=f"{name} must be finite"):  # main: "maxiter steps were not enough"
        curvature.solve(op, kwargs.pop("b"), damping=1.0, **kwargs)
    params = {"w": jnp.zeros(3), "v": jnp.zeros(2)}
    tree_op = curvature.Hessian(lambda p, s: s * (jnp.sum(p["w"] ** 2) + jnp.sum(p["v"] ** 2)), params, 1.0)
    with pytest.raises(ValueError, match=r"b must be finite, got NaN or inf in b\['v'\]"):
        curvature.solve(tree_op, {"w": jnp.ones(3), "v": jnp.array([1.0, jnp.inf])}, damping=1.0)


def test_preconditioned_cg_reaches_the_plain_solution_in_fewer_products(x64):
    """A badly scaled SPD matrix (diagonal over 4 decades, weak coupling): the exact Jacobi preconditioner, as a
    callable and as an object with .matvec, gives the dense solution in far fewer products than plain CG; a
    dense inverse of a nearby matrix (a low-rank-plus-damping inverse) too."""
    m = 60
    rng = np.random.default_rng(1)
    d = np.logspace(0, 4, m)
    c = 0.05 * rng.standard_normal((m, m))
    a = np.diag(d) + np.sqrt(d)[:, None] * (c @ c.T) * np.sqrt(d)[None, :]
    op = curvature.Hessian(_quadratic, jnp.zeros(m), jnp.asarray(a))
    b = jnp.asarray(rng.standard_normal(m))
    damping = 1e-2
    exact = np.linalg.solve(a + damping * np.eye(m), np.asarray(b))
    plain, info = curvature.solve(op, b, damping=damping, tol=1e-10, maxiter=2000, return_info=True)
    assert bool(info.converged)
    jacobi = jnp.asarray(1.0 / (np.diag(a) + damping))

    class Jacobi:
        def matvec(self, v):
            return jacobi * v

    for preconditioner in (lambda v: jacobi * v, Jacobi()):
        x, pinfo = curvature.solve(op, b, damping=damping, tol=1e-10, preconditioner=preconditioner,
                                   return_info=True)
        np.testing.assert_allclose(x, exact, rtol=1e-7)
        np.testing.assert_allclose(x, plain, rtol=1e-7)
        assert bool(pinfo.converged) and 2 * int(pinfo.num_products) < int(info.num_products), (pinfo, info)
    # a dense inverse of a nearby matrix (the diagonal-plus-coupling matrix with the coupling halved)
    near = np.linalg.inv(np.diag(d) + 0.5 * np.sqrt(d)[:, None] * (c @ c.T) * np.sqrt(d)[None, :] + damping * np.eye(m))
    x, ninfo = curvature.solve(op, b, damping=damping, tol=1e-10, preconditioner=lambda v: jnp.asarray(near) @ v,
                               return_info=True)
    np.testing.assert_allclose(x, exact, rtol=1e-7)
    assert int(ninfo.num_products) < int(info.num_products)


def test_a_preconditioner_on_pytree_parameters_and_under_jit(x64):
    """The preconditioner sees vectors shaped like b (a pytree), and a low-rank inverse works as one."""
    params = {"w": jnp.zeros(4), "v": jnp.zeros(3)}
    scale = {"w": jnp.array([1.0, 10.0, 100.0, 1000.0]), "v": jnp.array([2.0, 20.0, 200.0])}
    f = lambda p, s: 0.5 * (jnp.sum(s["w"] * p["w"] ** 2) + jnp.sum(s["v"] * p["v"] ** 2))  # noqa: E731
    op = curvature.Hessian(f, params, scale)
    b = {"w": jnp.ones(4), "v": jnp.ones(3)}
    seen = []

    def jacobi(v):
        seen.append(jax.tree_util.tree_structure(v))
        return jax.tree_util.tree_map(lambda a, s: a / (s + 1.0), v, scale)

    x, info = curvature.solve(op, b, damping=1.0, preconditioner=jacobi, return_info=True)
    assert seen[0] == jax.tree_util.tree_structure(b) and int(info.num_iters) == 1
    np.testing.assert_allclose(x["w"], 1.0 / (scale["w"] + 1.0), rtol=1e-10)
    values, vectors = curvature.eigenpairs(op, jax.random.key(0), k=3, num_iters=7)
    x, info = curvature.solve(op, b, damping=1.0, preconditioner=curvature.low_rank_inverse(values, vectors, 1.0),
                              return_info=True)
    np.testing.assert_allclose(x["v"], 1.0 / (scale["v"] + 1.0), rtol=1e-8)
    solved = jax.jit(lambda s: curvature.solve(curvature.Hessian(f, params, s), b, damping=1.0,
                                               preconditioner=jacobi))(scale)
    np.testing.assert_allclose(solved["w"], 1.0 / (scale["w"] + 1.0), rtol=1e-10)
    with pytest.raises(ValueError, match="preconditioner must be None, a callable"):
        curvature.solve(op, b, damping=1.0, preconditioner=3.0)


def test_low_rank_inverse_names_mismatched_arguments():
    """main: broadcasting TypeErrors from inside the function."""
    vectors = jnp.eye(3)[:2]  # k = 2 orthonormal rows in R^3
    with pytest.raises(ValueError, match="vectors must be a pytree whose leaves have a leading axis k=3"):
        curvature.low_rank_inverse(jnp.ones(3), vectors, 1.0)
    with pytest.raises(ValueError, match="values must be a 1-D array"):
        curvature.low_rank_inverse(jnp.ones((2, 1)), vectors, 1.0)
    inverse = curvature.low_rank_inverse(jnp.array([3.0, 1.0]), vectors, 1.0)
    with pytest.raises(ValueError, match="b must be shaped like one of the vectors"):
        inverse(jnp.ones(4))
    with pytest.raises(ValueError, match="b must be shaped like one of the vectors"):
        inverse({"w": jnp.ones(3)})
    np.testing.assert_allclose(inverse(jnp.array([4.0, 2.0, 1.0])), [1.0, 1.0, 1.0])
