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
    (lambda: curvature.hessian(f, PARAMS, BATCH, chunk_size=0), ValueError, "chunk_size must be a positive integer"),
    # trace and diagonal
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, method="hutch+"), ValueError, "method must be one of"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, num_probes=-4), ValueError, "num_probes must be a posi"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, num_probes=2, method="hutch++"), ValueError, ">= 3"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, chunk_size=0), ValueError, "chunk_size must be a posi"),
    (lambda: curvature.hessian_trace(f, PARAMS, BATCH, KEY, chunk_size=-2), ValueError, "chunk_size must be a posi"),
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
    (lambda: curvature.slq_nodes(f, PARAMS, BATCH, KEY, chunk_size=0), ValueError, "chunk_size must be a positive"),
]


@pytest.mark.parametrize("call, error, message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
