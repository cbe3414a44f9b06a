"""lsgeo.influence scores (float64): identity = explicit per-example gradient dot products; CG and low-rank = the
dense formula G_train (A + d I)^-1 G_q^T from ``to_dense()``; the default damping; self scores; per-group scores
sum to the total; a data source, chunks and a resumed memmap give the in-memory scores; leave-one-out retraining
of L2-regularised logistic regression is predicted by influence with the exact Hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lsgeo import curvature, influence, losses


def _mlp():
    k = jax.random.split(jax.random.key(0), 6)
    params = {
        "Dense_0": {"kernel": jax.random.normal(k[0], (3, 4)) / 2, "bias": 0.1 * jax.random.normal(k[1], (4,))},
        "Dense_1": {"kernel": jax.random.normal(k[2], (4, 3)) / 2, "bias": 0.1 * jax.random.normal(k[3], (3,))},
    }

    def predict(p, x):
        h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    x = jax.random.normal(k[4], (12, 3))
    y = jax.random.randint(k[5], (12,), 0, 3)
    xq, yq = x[:3] + 0.3, (y[:3] + 1) % 3
    return predict, losses.softmax_cross_entropy, params, (x, y), (xq, yq)


def _gradients(predict, loss, params, batch):
    """[n, m] per-example loss gradients, one jax.grad per example (a Python loop: the independent reference)."""
    x, y = batch
    rows = [ravel_pytree(jax.grad(lambda p: loss(predict(p, x[i:i + 1]), y[i:i + 1]))(params))[0]
            for i in range(x.shape[0])]
    return np.stack([np.asarray(r) for r in rows])


def test_identity_equals_explicit_gradient_dot_products(x64):
    predict, loss, params, train, query = _mlp()
    g, gq = _gradients(predict, loss, params, train), _gradients(predict, loss, params, query)
    scores = influence.pairwise_scores(predict, loss, params, train, query, inverse="identity")
    np.testing.assert_allclose(scores, g @ gq.T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(influence.self_scores(predict, loss, params, train, inverse="identity"),
                               np.sum(g * g, axis=1), rtol=1e-12)
    by_group = influence.pairwise_scores(predict, loss, params, train, query, inverse="identity", by_group=True)
    assert list(by_group) == ["Dense_0", "Dense_1"]
    m0 = 3 * 4 + 4  # Dense_0 (bias, kernel) come first in ravel_pytree's order
    np.testing.assert_allclose(by_group["Dense_0"], g[:, :m0] @ gq[:, :m0].T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(by_group["Dense_0"] + by_group["Dense_1"], scores, rtol=1e-12, atol=1e-14)


def _dense_scores(a, damping, g, gq):
    return g @ np.linalg.solve(a + damping * np.eye(a.shape[0]), gq.T)


def test_cg_and_low_rank_equal_the_dense_formula(x64):
    predict, loss, params, train, query = _mlp()
    g, gq = _gradients(predict, loss, params, train), _gradients(predict, loss, params, query)
    a = np.asarray(curvature.GaussNewton(predict, loss, params, train).to_dense())
    m, d = a.shape[0], 0.05
    want = _dense_scores(a, d, g, gq)
    cg = influence.pairwise_scores(predict, loss, params, train, query, inverse="cg", damping=d, tol=1e-12)
    np.testing.assert_allclose(cg, want, rtol=1e-8, atol=1e-10)
    full = influence.pairwise_scores(predict, loss, params, train, query, inverse="lowrank", damping=d, rank=m,
                                     num_iters=m)
    np.testing.assert_allclose(full, want, rtol=1e-7, atol=1e-9)
    # rank k < m: the low-rank-plus-damping formula of the top k eigenpairs of the dense matrix
    k = 5
    values, vectors = np.linalg.eigh(a)
    u, lam = vectors[:, -k:], values[-k:]
    low = influence.pairwise_scores(predict, loss, params, train, query, inverse="lowrank", damping=d, rank=k,
                                    num_iters=m)
    np.testing.assert_allclose(low, _dense_scores(u @ np.diag(lam) @ u.T, d, g, gq), rtol=1e-7, atol=1e-9)
    # a Hessian operator passed as the inverse (CG on it), and self scores = the diagonal of the formula
    f = lambda p, b: loss(predict(p, b[0]), b[1])  # noqa: E731
    h_op = curvature.Hessian(f, params, train)
    h = np.asarray(h_op.to_dense())
    shift = max(0.0, -np.linalg.eigvalsh(h)[0]) + 0.1
    hs = influence.pairwise_scores(predict, loss, params, train, query, inverse=h_op, damping=shift, tol=1e-12)
    np.testing.assert_allclose(hs, _dense_scores(h, shift, g, gq), rtol=1e-7, atol=1e-9)
    selfs = influence.self_scores(predict, loss, params, train, inverse="cg", damping=d, tol=1e-12)
    np.testing.assert_allclose(selfs, np.diag(_dense_scores(a, d, g, g)), rtol=1e-8)


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_kronecker_inverses_equal_the_dense_kronecker_formula(x64, name):
    """inverse="kfac"/"ekfac": G_train (K + d I)^-1 G_q^T with K the dense KFAC / EKFAC matrix (type-2, built here
    from the operator's own to_dense()), and the default damping 0.1 tr(K) / m from the exact trace."""
    predict, loss, params, train, query = _mlp()
    g, gq = _gradients(predict, loss, params, train), _gradients(predict, loss, params, query)
    k = np.asarray(getattr(curvature, name.upper())(predict, loss, params, train).to_dense())
    d = 0.05
    scores = influence.pairwise_scores(predict, loss, params, train, query, inverse=name, damping=d)
    np.testing.assert_allclose(scores, _dense_scores(k, d, g, gq), rtol=1e-9, atol=1e-12)
    default = influence.pairwise_scores(predict, loss, params, train, query, inverse=name)
    np.testing.assert_allclose(default, _dense_scores(k, 0.1 * np.trace(k) / k.shape[0], g, gq), rtol=1e-9,
                               atol=1e-12)
    # a control: the Kronecker scores are not the exact Gauss-Newton scores (the approximation is visible)
    a = np.asarray(curvature.GaussNewton(predict, loss, params, train).to_dense())
    assert np.max(np.abs(scores - _dense_scores(a, d, g, gq))) > 1e-3 * np.max(np.abs(scores))


def test_default_damping_is_a_tenth_of_the_mean_eigenvalue(x64):
    predict, loss, params, train, query = _mlp()
    op = curvature.GaussNewton(predict, loss, params, train)
    a = np.asarray(op.to_dense())
    m = a.shape[0]
    want = 0.1 * np.trace(a) / m
    # Hutch++ is exact once its sketch spans the space (num_probes // 3 >= m)
    assert influence.default_damping(op, jax.random.key(1), num_probes=3 * m + 3) == pytest.approx(want, rel=1e-8)
    g, gq = _gradients(predict, loss, params, train), _gradients(predict, loss, params, query)
    scores = influence.pairwise_scores(predict, loss, params, train, query, inverse="cg", num_probes=3 * m + 3,
                                       tol=1e-12)
    np.testing.assert_allclose(scores, _dense_scores(a, want, g, gq), rtol=1e-7)
    rough = influence.default_damping(op, jax.random.key(1))  # the default 30 probes: an estimate
    assert rough == pytest.approx(want, rel=0.5)


def test_source_and_chunks_equal_in_memory(x64):
    predict, loss, params, train, query = _mlp()
    x, y = train

    def source():
        return iter([(x[i:i + 5], y[i:i + 5]) for i in range(0, 12, 5)])  # 5, 5, 2

    want = influence.pairwise_scores(predict, loss, params, train, query, inverse="identity")
    streamed = influence.pairwise_scores(predict, loss, params, source, query, inverse="identity", examples_per_chunk=2)
    np.testing.assert_allclose(streamed, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(influence.self_scores(predict, loss, params, source, examples_per_chunk=3,
                                                     inverse="identity"),
                               influence.self_scores(predict, loss, params, train, inverse="identity"), rtol=1e-12)
    kw = dict(inverse="cg", damping=0.1, tol=1e-12)
    want = influence.pairwise_scores(predict, loss, params, train, query, **kw)
    chunked = influence.pairwise_scores(predict, loss, params, train, query, examples_per_chunk=5, block_size=7,
                                        queries_per_solve=2, **kw)
    np.testing.assert_allclose(chunked, want, rtol=1e-10, atol=1e-12)
    selfs = influence.self_scores(predict, loss, params, train, examples_per_chunk=5, block_size=7, **kw)
    np.testing.assert_allclose(selfs, influence.self_scores(predict, loss, params, train, **kw), rtol=1e-10)


@pytest.mark.slow
def test_streamed_curvature_equals_in_memory(global_x64):
    """CG on the Gauss-Newton operator of a data source (every product streams the batches from the host)."""
    predict, loss, params, train, query = _mlp()
    x, y = train

    def source():
        return iter([(x[i:i + 5], y[i:i + 5]) for i in range(0, 12, 5)])

    kw = dict(inverse="cg", damping=0.1, tol=1e-12)
    want = influence.pairwise_scores(predict, loss, params, train, query, **kw)
    np.testing.assert_allclose(influence.pairwise_scores(predict, loss, params, source, query, **kw), want,
                               rtol=1e-10, atol=1e-12)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("streamed", [False, True])
def test_disk_scores_resume_after_an_interruption(x64, tmp_path, streamed):
    predict, loss, params, train, query = _mlp()
    x, y = train
    data = (lambda: iter([(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)])) if streamed else train
    kw = dict(inverse="identity", block_size=None if streamed else 4)
    want = influence.pairwise_scores(predict, loss, params, train, query, inverse="identity")
    path = tmp_path / "scores.npy"

    def stop_after_first(block, num_blocks):
        assert num_blocks == 3
        if block == 0:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        influence.pairwise_scores(predict, loss, params, data, query, out=path, callback=stop_after_first, **kw)
    assert np.load(str(path) + ".done.npy").tolist() == [True, False, False]
    computed = []
    resumed = influence.pairwise_scores(predict, loss, params, data, query, out=path, progress=True,
                                        callback=lambda b, total: computed.append(b), **kw)
    assert computed == [1, 2]  # the first block was not recomputed
    np.testing.assert_allclose(resumed, want, rtol=1e-12)
    np.testing.assert_allclose(np.load(path), want, rtol=1e-12)
    with pytest.raises(ValueError, match="holds scores of shape"):
        influence.pairwise_scores(predict, loss, params, data, (x[:2], y[:2]), out=path, **kw)


def test_leave_one_out_of_l2_logistic_regression(x64):
    """Koh & Liang (2017), Fig. 2: removing example j changes a query's loss by I[j, q] / n to first order
    (I with the exact Hessian of the regularised objective, whose minimiser is found by Newton's method)."""
    n, d, lam = 80, 4, 0.05
    kx, kw = jax.random.split(jax.random.key(3))
    x = jnp.concatenate([jax.random.normal(kx, (n + 3, d)), jnp.ones((n + 3, 1))], axis=1)
    y = jnp.sign(x @ jax.random.normal(kw, (d + 1,)) + 0.8 * jax.random.normal(kw, (n + 3,)))
    (x, y), (xq, yq) = (x[:n], y[:n]), (x[n:], y[n:])
    predict = lambda w, x: x @ w  # noqa: E731

    def objective(w, weights):
        return jnp.mean(weights * jax.nn.softplus(-y * (x @ w))) + 0.5 * lam * jnp.sum(w**2)

    def newton(weights, w):
        def step(w, _):
            return w - jnp.linalg.solve(jax.hessian(objective)(w, weights), jax.grad(objective)(w, weights)), None

        return jax.lax.scan(step, w, None, length=30)[0]

    w_full = newton(jnp.ones(n), jnp.zeros(d + 1))
    w_loo = jax.vmap(newton, in_axes=(0, None))(1.0 - jnp.eye(n), w_full)  # row j: example j removed
    query_loss = lambda w: jax.nn.softplus(-yq * (xq @ w))  # noqa: E731
    actual = np.asarray(jax.vmap(query_loss)(w_loo) - query_loss(w_full))  # [n, Q]

    f = lambda w, b: losses.logistic_loss(b[0] @ w, b[1]) + 0.5 * lam * jnp.sum(w**2)  # noqa: E731
    hessian = curvature.Hessian(f, w_full, (x, y))
    scores = influence.pairwise_scores(predict, losses.logistic_loss, w_full, (x, y), (xq, yq), inverse=hessian,
                                       damping=0.0, tol=1e-12)
    predicted = scores / n
    for q in range(3):
        assert np.corrcoef(predicted[:, q], actual[:, q])[0, 1] > 0.99
    np.testing.assert_allclose(predicted, actual, atol=0.1 * np.abs(actual).max())


def test_inverse_choices_and_errors(x64):
    predict, loss, params, train, query = _mlp()
    g, gq = _gradients(predict, loss, params, train), _gradients(predict, loss, params, query)
    half = influence.pairwise_scores(predict, loss, params, train, query,
                                     inverse=lambda b: jax.tree_util.tree_map(lambda a: 0.5 * a, b))
    np.testing.assert_allclose(half, 0.5 * g @ gq.T, rtol=1e-12, atol=1e-14)

    class Scaled:  # any object with inverse(damping) returning a linear map
        def inverse(self, damping):
            return lambda b: jax.tree_util.tree_map(lambda a: a / (1.0 + damping), b)

    np.testing.assert_allclose(influence.pairwise_scores(predict, loss, params, train, query, inverse=Scaled(),
                                                         damping=1.0), 0.5 * g @ gq.T, rtol=1e-12, atol=1e-14)
    class AsPartial:  # inverse(damping) returns a pytree of arrays with a call (travels as a jit argument)
        def inverse(self, damping):
            scale = jnp.asarray(1.0 / (1.0 + damping))
            return jax.tree_util.Partial(lambda s, b: jax.tree_util.tree_map(lambda a: s * a, b), scale)

    np.testing.assert_allclose(influence.pairwise_scores(predict, loss, params, train, query, inverse=AsPartial(),
                                                         damping=3.0), 0.25 * g @ gq.T, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="give damping"):
        influence.pairwise_scores(predict, loss, params, train, query, inverse=Scaled())
    with pytest.raises(ValueError, match="inverse must be one of"):
        influence.pairwise_scores(predict, loss, params, train, query, inverse="newton")
    with pytest.raises(ValueError, match="damping must be None"):
        influence.pairwise_scores(predict, loss, params, train, query, inverse="identity", damping=0.1)
    with pytest.raises(ValueError, match="did not converge"):
        influence.pairwise_scores(predict, loss, params, train, query, inverse="cg", damping=1e-3, maxiter=1)
    with pytest.raises(ValueError, match="train_data must be a pair"):
        influence.pairwise_scores(predict, loss, params, train[0], query, inverse="identity")


_FOUR_DEVICES = """
import json, jax, numpy as np
jax.config.update("jax_enable_x64", True)
import sys; sys.path.insert(0, TESTS)
from test_influence import _mlp
from lsgeo import influence
assert len(jax.devices()) == 4
predict, loss, params, train, query = _mlp()
kw = dict(inverse="cg", damping=0.1, tol=1e-12)
one = influence.pairwise_scores(predict, loss, params, train, query, **kw)
four = influence.pairwise_scores(predict, loss, params, train, query, microbatch_size=2, **kw)
print(json.dumps({"max_rel": float(np.max(np.abs(four - one)) / np.max(np.abs(one)))}))
"""


@pytest.mark.slow
def test_scores_on_four_forced_host_devices():
    """The Gauss-Newton operator's microbatches sharded over 4 devices: the same scores as on one batch."""
    from conftest import TESTS, last_json, run_python

    code = _FOUR_DEVICES.replace("TESTS", repr(TESTS))
    assert last_json(run_python("-c", code, devices=4))["max_rel"] < 1e-10
