"""Bad input to lsgeo.curvature: a ValueError/TypeError that names the argument (one table)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgeo import curvature, losses

PARAMS = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
BATCH = jnp.ones((4, 1))
EMPTY = jnp.ones((0, 1))
KEY = jax.random.key(0)


def f(p, b):
    return jnp.mean(b) * (jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 3))


def vector_f(p, b):
    return b[:, 0] * jnp.sum(p["a"])


def predict(p, x):
    return x * p["a"][0]


INT_PARAMS = {"a": jnp.ones((3,), jnp.int32)}
XY = (jnp.ones((2, 1)), jnp.ones((2, 1)))

CASES = [
    # products
    (lambda: curvature.hvp(f, PARAMS, BATCH, {"a": jnp.ones((3,))}), ValueError, "v must have the same pytree"),
    (lambda: curvature.hvp(f, PARAMS, BATCH, {"a": jnp.ones(3), "b": jnp.ones(4)}), ValueError, r"v leaf .*'b'.* shape"),
    (lambda: curvature.gnvp(predict, losses.squared_loss, PARAMS, XY, [1.0]), ValueError, "v must have the same"),
    (lambda: curvature.hvp("f", PARAMS, BATCH, PARAMS), TypeError, "f must be a callable"),
    (lambda: curvature.gnvp(predict, None, PARAMS, XY, PARAMS), TypeError, "loss must be a callable"),
    (lambda: curvature.gnvp(3, losses.squared_loss, PARAMS, XY, PARAMS), TypeError, "predict must be a callable"),
    (lambda: curvature.hvp(f, INT_PARAMS, BATCH, INT_PARAMS), ValueError, "params leaf .* dtype int32"),
    (lambda: curvature.hvp(vector_f, PARAMS, BATCH, PARAMS), ValueError, "f must return a scalar"),
    (lambda: curvature.hvp(f, PARAMS, EMPTY, PARAMS), ValueError, "batch is empty"),
    (lambda: curvature.hessian(f, PARAMS, BATCH, vectors_per_pass=0), ValueError, "vectors_per_pass must be a positive integer"),
    # trace and diagonal
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, method="hutch+"), ValueError, "method must be one of"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, num_probes=-4), ValueError, "num_probes must be a posi"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, num_probes=2, method="hutch++"), ValueError, ">= 3"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, vectors_per_pass=0), ValueError, "vectors_per_pass must be a posi"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, vectors_per_pass=-2), ValueError, "vectors_per_pass must be a posi"),
    (lambda: curvature.hessian_trace(f, INT_PARAMS, BATCH, KEY), ValueError, "parameters must be floating point"),
    (lambda: curvature.hessian_trace(f, PARAMS, EMPTY, KEY), ValueError, "batch is empty"),
    (lambda: curvature.hessian_diagonal(f, PARAMS, BATCH, KEY, num_probes=0), ValueError, "num_probes must be a"),
    (lambda: curvature.hessian_diagonal(f, PARAMS, EMPTY, KEY), ValueError, "batch is empty"),
    # Lanczos and eigenpairs
    (lambda: curvature.lanczos(lambda u: u, jnp.ones(4), 5), ValueError, "num_iters must be <= the dimension"),
    (lambda: curvature.lanczos(lambda u: u, jnp.ones((2, 2)), 2), ValueError, "v0 must be a flat vector"),
    (lambda: curvature.lanczos(lambda u: u, jnp.zeros(4), 2), ValueError, "v0 must be a nonzero start vector"),
    (lambda: curvature.lanczos(lambda u: u, jnp.array([1.0, np.nan]), 2), ValueError, "v0 must be finite"),
    (lambda: curvature.top_eigenvalues(f, PARAMS, BATCH, KEY, k=8), ValueError, "k must be <= the number of para"),
    (lambda: curvature.eigenpairs(f, PARAMS, BATCH, KEY, k=0), ValueError, "k must be a positive integer"),
    (lambda: curvature.top_eigenvalues(f, PARAMS, BATCH, KEY, k=3, num_iters=2), ValueError, "num_iters must be >= k"),
    (lambda: curvature.top_eigenvalues(f, PARAMS, BATCH, KEY, tol=0.0), ValueError, "tol must be None or a relative"),
    (lambda: curvature.top_eigenvalues(f, PARAMS, BATCH, KEY, tol=-1e-3), ValueError, "tol must be a finite number"),
    (lambda: curvature.top_eigenvalues(f, PARAMS, EMPTY, KEY), ValueError, "batch is empty"),
    (lambda: curvature.top_eigenvalues(f, INT_PARAMS, BATCH, KEY), ValueError, "parameters must be floating point"),
    (lambda: curvature.eigenpairs(f, PARAMS, BATCH, KEY, which="middle"), ValueError, "which must be one of"),
    (lambda: curvature.min_eigenvalue([], PARAMS, BATCH, KEY), TypeError, "f must be a callable"),
    # density and saddle index
    (lambda: curvature.saddle_index(f, PARAMS, BATCH, method="dense"), ValueError, "method must be one of"),
    (lambda: curvature.saddle_index(f, PARAMS, BATCH, method="slq"), ValueError, "key must be a PRNG key"),
    (lambda: curvature.saddle_index(f, PARAMS, BATCH, tol=-0.1), ValueError, "tol must be a finite number >= 0"),
    (lambda: curvature.saddle_index(f, PARAMS, BATCH, rtol=-1e-3), ValueError, "rtol must be a finite number >= 0"),
    (lambda: curvature.saddle_index(f, PARAMS, BATCH, KEY, method="slq", width=-1.0), ValueError, "width must be"),
    (lambda: curvature.saddle_index(f, PARAMS, EMPTY), ValueError, "batch is empty"),
    (lambda: curvature.spectral_density(f, PARAMS, BATCH, KEY, num_runs=0), ValueError, "num_runs must be a posi"),
    (lambda: curvature.spectral_density(f, PARAMS, BATCH, KEY, grid=jnp.zeros((2, 2))), ValueError, "grid must be"),
    (lambda: curvature.spectral_density(f, PARAMS, BATCH, KEY, width=0.0), ValueError, "width must be None or a"),
    (lambda: curvature.spectral_density(f, PARAMS, BATCH, KEY, width=-0.5), ValueError, "width must be a finite"),
    (lambda: curvature.spectral_density(f, PARAMS, EMPTY, KEY), ValueError, "batch is empty"),
    (lambda: curvature.slq_nodes(f, PARAMS, BATCH, KEY, vectors_per_pass=0), ValueError, "vectors_per_pass must be a positive"),
    # keys: an int seed or None is not a key
    (lambda: curvature.top_eigenvalues(f, PARAMS, BATCH, 0), ValueError, "key must be a JAX PRNG key.*jax.random.key"),
    (lambda: curvature.top_eigenvalues(f, PARAMS, BATCH, None), ValueError, "key must be a JAX PRNG key"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, "a"), ValueError, "key must be a JAX PRNG key"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, jax.random.split(KEY, 2)), ValueError, "a single PRNG key"),
    # Krylov internals
    (lambda: curvature.ritz_pairs(lambda u: u, jnp.ones(5), 2, k=3), ValueError, "k must be <= num_iters=2"),
    (lambda: curvature.tridiagonal_eigh(jnp.ones(3), jnp.ones(3)), ValueError, "betas must have length K - 1"),
    (lambda: curvature.tridiagonal_eigh(jnp.ones(3), jnp.ones(1)), ValueError, "betas must have length K - 1"),
    # operators
    (lambda: curvature.top_eigenvalues(curvature.Hessian(f, PARAMS, BATCH), KEY, BATCH), TypeError, "takes an operator"),
    (lambda: curvature.hessian_trace(curvature.Hessian(f, PARAMS, BATCH), KEY, microbatch_size=2), ValueError,
     "belong to the operator"),
    (lambda: curvature.blocks(f), TypeError, "op must be a curvature operator"),
    (lambda: curvature.solve(curvature.Hessian(f, PARAMS, BATCH), PARAMS, damping=-1.0), ValueError, "damping must be"),
    (lambda: curvature.solve(curvature.Hessian(f, PARAMS, BATCH), {"a": jnp.ones(3)}, damping=1.0), ValueError,
     "b must have the same pytree"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, method="xtrace", num_probes=20), ValueError,
     "num_probes // 2 must be < m"),
    (lambda: curvature.MonteCarloFisher(predict, losses.squared_loss, PARAMS, XY, 0), ValueError, "key must be a JAX"),
    (lambda: curvature.GaussNewton(lambda p, x: x @ jnp.ones((1, 3)) * p["a"], losses.softmax_cross_entropy, PARAMS,
                                   (jnp.ones((2, 1)), jnp.array([0, 3]))), ValueError, r"labels must be in \[0, 3\)"),
]


@pytest.mark.parametrize("call, error, message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_ritz_pairs_never_invents_values():
    """diag(-2, 1, 3, 5, 7) with k=3 but 2 Lanczos steps: refused (it returned duplicated Ritz values)."""
    matvec = lambda u: jnp.array([-2.0, 1.0, 3.0, 5.0, 7.0]) * u  # noqa: E731
    with pytest.raises(ValueError, match="k must be <= num_iters"):
        curvature.ritz_pairs(matvec, jnp.ones(5), 2, k=3)
    values = curvature.ritz_pairs(matvec, jnp.ones(5), 5, k=3)[0]
    np.testing.assert_allclose(values, [7.0, 5.0, 3.0], rtol=1e-5)


def test_saddle_index_of_nan_parameters_or_data_is_nan():
    for params, batch in [({"a": jnp.ones(3), "b": jnp.full((2, 2), jnp.nan)}, BATCH), (PARAMS, BATCH.at[0].set(jnp.nan))]:
        assert np.isnan(curvature.saddle_index(f, params, batch))
        assert np.isnan(curvature.saddle_index(f, params, batch, KEY, method="slq", num_iters=4, num_runs=2))


def test_hvp_accepts_a_tangent_of_another_float_dtype():
    v32 = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    v16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), v32)  # exactly representable values
    got, expected = curvature.hvp(f, PARAMS, BATCH, v16), curvature.hvp(f, PARAMS, BATCH, v32)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_compiled_risk_entry_points_check_labels_before_tracing():
    """effective_risk / gauss_newton_trace (compiled) and the predictor operators see the concrete labels
    first: -1 silently meant class k - 1, and k gave NaN."""
    from lsgeo import risk

    w, x = jnp.ones((3, 4)), jnp.ones((5, 3))
    linear = lambda p, x: x @ p  # noqa: E731
    for labels, bad in ((jnp.array([0, 1, 2, 3, -1]), r"\[-1\]"), (jnp.array([0, 1, 2, 3, 4]), r"\[4\]")):
        for call in (
            lambda: risk.effective_risk(linear, losses.softmax_cross_entropy, w, (x, labels), 0.1),
            lambda: risk.gauss_newton_trace(linear, losses.softmax_cross_entropy, w, (x, labels), microbatch_size=2),
            lambda: curvature.EmpiricalFisher(linear, losses.softmax_cross_entropy, w, (x, labels)),
        ):
            with pytest.raises(ValueError, match=r"labels must be in \[0, 4\).*" + bad):
                call()
