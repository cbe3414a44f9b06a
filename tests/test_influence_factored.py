"""lsgeo.influence's factored route (float64): dense kernels scored from their layer inputs and output gradients.

References computed here, independently: per-example gradients by one ``jax.grad`` per example (vmapped), and
for ``query_rank`` the truncated SVD (``np.linalg.svd``) of each preconditioned query on each kernel, written as the
kernel's own ``[in, out]`` matrix, the rest of the query kept whole."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lsgeo import influence, losses
from lsgeo.influence import factored


def _gradients(predict, loss, params, batch):
    """The per-example loss gradients, a list of pytrees (jax.grad of each one-example loss, vmapped)."""
    x, y = batch
    one = jax.grad(lambda p, xi, yi: loss(predict(p, xi[None]), yi[None]))
    stacked = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))(params, x, y)
    return [jax.tree_util.tree_map(lambda a: a[i], stacked) for i in range(x.shape[0])]


def _flat(trees):
    return np.stack([np.asarray(ravel_pytree(t)[0]) for t in trees])


def _mlp(sizes=(20, 16, 12, 3), n=11, nq=4):
    k = jax.random.split(jax.random.key(0), 2 * len(sizes) + 2)
    params = {f"Dense_{i}": {"kernel": jax.random.normal(k[2 * i], (a, b)) / np.sqrt(a),
                             "bias": 0.1 * jax.random.normal(k[2 * i + 1], (b,))}
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}

    def predict(p, x):
        for i in range(len(sizes) - 1):
            x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
            x = jnp.tanh(x) if i < len(sizes) - 2 else x
        return x

    x = jax.random.normal(k[-2], (n, sizes[0]))
    y = jax.random.randint(k[-1], (n,), 0, sizes[-1])
    return predict, losses.softmax_cross_entropy, params, (x, y), (x[:nq] + 0.3, (y[:nq] + 1) % sizes[-1])


def _odd_layouts():
    """Kernels stored transposed ([out, in], used as x @ W.T) and flat (reshaped before the product), and a dense
    layer shared over a sequence of 2 positions (T = 2), with a mean over the positions before the head."""
    k = jax.random.split(jax.random.key(1), 5)
    params = {"t": jax.random.normal(k[0], (16, 20)) / 4, "flat": jax.random.normal(k[1], (16 * 16,)) / 4,
              "head": jax.random.normal(k[2], (16, 3)) / 4}

    def predict(p, x):  # x: [n, 2, 20]
        h = jnp.tanh(x @ p["t"].T)
        h = jnp.tanh(h @ p["flat"].reshape(16, 16))
        return h.mean(axis=1) @ p["head"]

    x = jax.random.normal(k[3], (9, 2, 20))
    y = jax.random.randint(k[4], (9,), 0, 3)
    return predict, losses.softmax_cross_entropy, params, (x, y), (x[:3] * 1.5, y[:3])


@pytest.mark.parametrize("model", [_mlp, _odd_layouts])
def test_identity_route_equals_explicit_gradient_dot_products(x64, model):
    predict, loss, params, train, query = model()
    plan = factored.plan_for(predict, params, train[0])
    assert "dense" in plan.status  # the factored route is taken
    want = _flat(_gradients(predict, loss, params, train)) @ _flat(_gradients(predict, loss, params, query)).T
    fast = influence.pairwise_scores(predict, loss, params, train, query, inverse="identity", examples_per_chunk=4)
    generic = influence.pairwise_scores(predict, loss, params, train, query, inverse="identity", method="generic")
    np.testing.assert_allclose(fast, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(generic, want, rtol=1e-12, atol=1e-14)
    groups = influence.pairwise_scores(predict, loss, params, train, query, inverse="identity", by_group=True)
    np.testing.assert_allclose(sum(groups.values()), want, rtol=1e-12, atol=1e-14)
    g = _flat(_gradients(predict, loss, params, train))
    np.testing.assert_allclose(influence.self_scores(predict, loss, params, train, inverse="identity"),
                               np.sum(g * g, axis=1), rtol=1e-12)
    per_group = influence.self_scores(predict, loss, params, train, inverse="identity", by_group=True)
    grads = _gradients(predict, loss, params, train)
    for name in params:  # the top-level modules are the groups
        g_name = _flat([t[name] for t in grads])
        np.testing.assert_allclose(per_group[name], np.sum(g_name * g_name, axis=1), rtol=1e-12)


def _truncated_reference(predict, loss, params, train, query, inverse, rank, kernels):
    """sum over leaves of <P_q, g_i>, P_q on each kernel of ``kernels`` (name -> (to [in, out], back)) replaced by
    its rank-``rank`` SVD truncation."""
    out = []
    for q in (inverse(g) for g in _gradients(predict, loss, params, query)):
        leaves = dict(q)
        for name, (to_matrix, back) in kernels.items():
            u, s, vt = np.linalg.svd(to_matrix(np.asarray(q[name])), full_matrices=False)
            leaves[name] = jnp.asarray(back((u[:, :rank] * s[:rank]) @ vt[:rank]))
        out.append(leaves)
    return _flat(_gradients(predict, loss, params, train)) @ _flat(out).T


def test_query_rank_equals_the_truncated_svd_of_each_kernel(x64):
    predict, loss, params, train, query = _odd_layouts()
    # a preconditioner with a different scale per leaf and per entry, so that P_q has full rank on every kernel
    # (the head's query stays g_q, of rank 1 as T = 1 there: its truncation is exact at every rank)
    scale = jax.tree_util.tree_map(lambda a: 1.0 + jnp.abs(jnp.sin(jnp.arange(a.size).reshape(a.shape))), params)
    scale["head"] = jnp.ones_like(params["head"])
    inverse = lambda b: jax.tree_util.tree_map(jnp.multiply, scale, b)  # noqa: E731
    dense = {"t": (lambda m: m.T, lambda m: m.T), "flat": (lambda m: m.reshape(16, 16), lambda m: m.reshape(-1))}
    exact = influence.pairwise_scores(predict, loss, params, train, query, inverse=inverse)  # whole queries
    np.testing.assert_allclose(exact, _truncated_reference(predict, loss, params, train, query, inverse, 16, dense),
                               rtol=1e-12, atol=1e-14)
    for rank in (1, 3):
        got = influence.pairwise_scores(predict, loss, params, train, query, inverse=inverse, query_rank=rank)
        want = _truncated_reference(predict, loss, params, train, query, inverse, rank, dense)
        full = _truncated_reference(predict, loss, params, train, query, inverse, 16, dense)
        assert np.abs(want - full).max() > 1e-3 * np.abs(full).max()  # the truncation matters at this rank
        # rank + 10 test vectors against min(c, f) = 16: the exact SVD for 6..16, randomized below
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8 * np.abs(want).max())


def test_randomized_svd_is_exact_on_a_low_rank_query(x64):
    """On an MLP, g_q has rank 1 on every kernel: query_rank 1 by the randomized SVD (1 + 10 < 12 = min(c, f) of
    the hidden kernel) recovers the exact scores."""
    predict, loss, params, train, query = _mlp(sizes=(20, 16, 12, 3))
    want = influence.pairwise_scores(predict, loss, params, train, query, inverse="identity", method="generic")
    got = influence.pairwise_scores(predict, loss, params, train, query, inverse=lambda b: b, query_rank=1)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


@pytest.mark.slow
def test_ekfac_with_query_rank_approaches_the_exact_scores(x64):
    predict, loss, params, train, query = _mlp(sizes=(20, 16, 12, 3))
    exact = influence.pairwise_scores(predict, loss, params, train, query, inverse="ekfac", damping=0.1)
    errors = [np.abs(influence.pairwise_scores(predict, loss, params, train, query, inverse="ekfac", damping=0.1,
                                               query_rank=r) - exact).max() for r in (1, 4, 12)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-10 * np.abs(exact).max()  # rank 12 = min(c, f) of every factored kernel


def test_models_without_dense_kernels_fall_back_to_the_dense_route(x64):
    k = jax.random.split(jax.random.key(2), 3)
    params = {"w": jax.random.normal(k[0], (3, 2)), "s": jnp.ones(2)}
    predict = lambda p, x: (x @ p["w"]) * p["w"].sum() * p["s"]  # noqa: E731 - w used twice: not a dense kernel
    x, y = jax.random.normal(k[1], (6, 3)), jax.random.randint(k[2], (6,), 0, 2)
    assert "dense" not in factored.plan_for(predict, params, x).status
    want = _flat(_gradients(predict, losses.softmax_cross_entropy, params, (x, y)))
    got = influence.pairwise_scores(predict, losses.softmax_cross_entropy, params, (x, y), (x, y), inverse="identity")
    np.testing.assert_allclose(got, want @ want.T, rtol=1e-12, atol=1e-14)


def test_source_and_disk_equal_in_memory(x64, tmp_path):
    predict, loss, params, train, query = _mlp()
    want = influence.pairwise_scores(predict, loss, params, train, query, inverse="identity", method="generic")

    def source():
        for s in range(0, 11, 4):
            yield train[0][s:s + 4], train[1][s:s + 4]

    got = influence.pairwise_scores(predict, loss, params, source, query, inverse="identity", out=tmp_path / "s.npy")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad, name", [({"query_rank": 0}, "query_rank"), ({"query_rank": 2.5}, "query_rank"),
                                       ({"query_rank": "3"}, "query_rank"), ({"method": "ghost"}, "method")])
def test_bad_options_name_the_argument(x64, bad, name):
    predict, loss, params, train, query = _mlp()
    with pytest.raises(ValueError, match=name):
        influence.pairwise_scores(predict, loss, params, train, query, inverse="identity", **bad)
