"""KFAC against hand-built Kronecker references (float64), its exact cases, its exact algebra, its layer rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
import pytest

import kronecker_reference as ref
from conftest import last_json, run_python
from lsgeo import curvature, losses

pytestmark = pytest.mark.usefixtures("x64")

FISHER_TYPES = ["type-2", "mc", "empirical", "forward-only"]


# every combination runs under -m slow; the default run covers each fisher type, approximation, bias treatment
# and model at least once
_FAST = {("type-2", "expand", True, True), ("type-2", "reduce", False, False), ("mc", "reduce", True, True),
         ("empirical", "expand", False, True), ("forward-only", "reduce", True, False)}
GRID = [pytest.param(ft, ap, sep, seq, marks=() if (ft, ap, sep, seq) in _FAST else pytest.mark.slow,
                     id=f"{ft}-{ap}-{'separate' if sep else 'joint'}-{'sequence' if seq else 'mlp'}")
        for ft in FISHER_TYPES for ap in ("expand", "reduce") for sep in (True, False) for seq in (False, True)]


@pytest.mark.parametrize("fisher_type, approx, separate, seq", GRID)
def test_kfac_equals_the_hand_built_kronecker_reference(fisher_type, approx, separate, seq):
    p, x, y = ref.params_and_data(jax.random.PRNGKey(0), seq=seq)
    predict, tapped = (ref.seq_predict, ref.seq_tapped) if seq else (ref.mlp_predict, ref.mlp_tapped)
    key, loss = jax.random.PRNGKey(3), losses.softmax_cross_entropy
    num_samples = 2 if fisher_type == "mc" else 1
    inputs, grads = ref.layer_data(tapped, loss, p, x, y, fisher_type, key, num_samples)
    fs = ref.factors(inputs, grads, approx, separate, p)
    expected = ref.dense(lambda v: ref.kfac_apply(fs, separate, v), p)
    kwargs = dict(fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=separate,
                  key=key if fisher_type == "mc" else None, num_samples=num_samples)
    whole = curvature.KFAC(predict, loss, p, (x, y), **kwargs)
    cut = curvature.KFAC(predict, loss, p, (x, y), microbatch_size=3, **kwargs)  # 7 = 3 + 3 + 1
    np.testing.assert_allclose(whole.to_dense(), expected, atol=1e-12)
    np.testing.assert_allclose(cut.to_dense(), expected, atol=1e-12)


def test_one_example_kfac_is_the_exact_gauss_newton_layer_block():
    p, x, y = ref.params_and_data(jax.random.PRNGKey(1), seq=False, n=1)
    gn = curvature.GaussNewton(ref.mlp_predict, losses.softmax_cross_entropy, p, (x, y)).to_dense()
    op = curvature.KFAC(ref.mlp_predict, losses.softmax_cross_entropy, p, (x, y), separate_weight_and_bias=False)
    k = op.to_dense()
    sizes = {name: a.size for name, a in p.items()}  # ravel order: b1, b2, w1, w2
    start = dict(zip(sorted(p), np.cumsum([0] + [sizes[n] for n in sorted(p)])))
    for w, b in ref.LAYERS.values():
        idx = np.r_[start[b]:start[b] + sizes[b], start[w]:start[w] + sizes[w]]
        np.testing.assert_allclose(k[np.ix_(idx, idx)], gn[np.ix_(idx, idx)], atol=1e-12)


def test_one_linear_layer_with_the_squared_loss_is_exact():
    key = jax.random.split(jax.random.PRNGKey(2), 3)
    p = {"w": jax.random.normal(key[0], (3, 2)), "b": jax.random.normal(key[1], (2,))}
    x = jax.random.normal(key[2], (9, 3))
    predict = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    batch = (x, jnp.zeros((9, 2)))
    gn = curvature.GaussNewton(predict, losses.squared_loss, p, batch).to_dense()
    op = curvature.KFAC(predict, losses.squared_loss, p, batch, separate_weight_and_bias=False, microbatch_size=4)
    np.testing.assert_allclose(op.to_dense(), gn, atol=1e-12)


@pytest.fixture(scope="module")
def mlp_problem():
    with jax.enable_x64(True):
        p, x, y = ref.params_and_data(jax.random.PRNGKey(4), seq=False)
        yield p, x, y


@pytest.mark.parametrize("separate", [True, False], ids=["separate-bias", "joint-bias"])
def test_exact_algebra_matches_the_dense_matrix(mlp_problem, separate):
    p, x, y = mlp_problem
    op = curvature.KFAC(ref.mlp_predict, losses.softmax_cross_entropy, p, (x, y), separate_weight_and_bias=separate)
    k, d = op.to_dense(), 0.3
    v = jax.random.normal(jax.random.PRNGKey(5), (op.size,))
    inv = op.inverse(d)
    np.testing.assert_allclose(inv @ (op @ v) + d * (inv @ v), v, atol=1e-10)
    np.testing.assert_allclose(inv.to_dense(), np.linalg.inv(k + d * np.eye(op.size)), atol=1e-10)
    tree = op.unravel(v)  # pytree application, and as a callable
    np.testing.assert_allclose(op.ravel(inv(tree)), inv @ v, atol=1e-12)
    np.testing.assert_allclose(op.logdet(d), np.linalg.slogdet(k + d * np.eye(op.size))[1], atol=1e-10)
    np.testing.assert_allclose(op.trace(), np.trace(k), atol=1e-10)
    np.testing.assert_allclose(op.ravel(op.diagonal()), np.diag(k), atol=1e-12)
    np.testing.assert_allclose(op.eigenvalues(), np.linalg.eigvalsh(k)[::-1], atol=1e-10)
    np.testing.assert_allclose(curvature.top_eigenvalues(op, jax.random.PRNGKey(0), k=2), op.eigenvalues()[:2],
                               rtol=1e-8)
    np.testing.assert_allclose(curvature.solve(op, v, damping=d, tol=1e-12), inv @ v, atol=1e-8)


def test_inverses_at_several_dampings_share_one_eigendecomposition(mlp_problem):
    p, x, y = mlp_problem
    op = curvature.KFAC(ref.mlp_predict, losses.softmax_cross_entropy, p, (x, y))
    v = jax.random.normal(jax.random.PRNGKey(5), (op.size,))
    traced = jax.jit(lambda u: op.inverse(0.3).matvec(u))(v)  # built inside a trace: nothing may be kept
    assert "_decomposition" not in op.__dict__
    first = op.decomposition()
    assert op.decomposition() is first  # kept once computed outside tracing
    k = op.to_dense()
    np.testing.assert_allclose(traced, np.linalg.solve(k + 0.3 * np.eye(op.size), v), atol=1e-10)
    for d in (0.1, 1.0):
        np.testing.assert_allclose(op.inverse(d).to_dense(), np.linalg.inv(k + d * np.eye(op.size)), atol=1e-10)
        np.testing.assert_allclose(op.inverse(d, heuristic_damping=True) @ v,
                                   jax.tree_util.tree_map(lambda a: a, op).inverse(d, heuristic_damping=True) @ v,
                                   atol=1e-12)  # a copy (no decomposition kept) computes its own


def test_damping_must_be_a_real_finite_scalar(mlp_problem):
    """Found by scripts/hostile_objective.py: "0.1" and True were accepted, None and a vector were TypeErrors."""
    p, x, y = mlp_problem
    op = curvature.KFAC(ref.mlp_predict, losses.softmax_cross_entropy, p, (x, y))
    for bad in ("0.1", True, None, jnp.array([0.1, 0.2]), -1.0, float("nan"), float("inf"), lambda: 0.1):
        with pytest.raises(ValueError, match="damping"):
            op.inverse(bad)
    np.testing.assert_allclose(op.inverse(np.float32(0.5)).to_dense(), op.inverse(0.5).to_dense(), rtol=1e-6)


def test_heuristic_damping_is_the_damped_factors_inverse(mlp_problem):
    p, x, y = mlp_problem
    op = curvature.KFAC(ref.mlp_predict, losses.softmax_cross_entropy, p, (x, y), separate_weight_and_bias=False)
    d = 0.2
    blocks = []
    for a, g in zip(op.factors["A"], op.factors["G"]):
        pi = np.sqrt(np.trace(g) / g.shape[0] / (np.trace(a) / a.shape[0]))
        blocks.append(np.kron(np.linalg.inv(a + np.sqrt(d) / pi * np.eye(a.shape[0])),
                              np.linalg.inv(g + np.sqrt(d) * pi * np.eye(g.shape[0]))))
    inv = op.inverse(d, heuristic_damping=True)
    # layer 1 acts on [w1; b1] (rows of the canonical matrix): compare through the layer's own coordinates
    v = {k: jax.random.normal(jax.random.PRNGKey(i), a.shape) for i, (k, a) in enumerate(p.items())}
    out = inv(v)
    for (w, b), block in zip(ref.LAYERS.values(), blocks):
        m = np.concatenate([v[w], v[b][None]], axis=0).reshape(-1)
        expected = (block @ m).reshape(-1, p[w].shape[1])
        np.testing.assert_allclose(out[w], expected[:-1], atol=1e-10)
        np.testing.assert_allclose(out[b], expected[-1], atol=1e-10)


def test_blocks_are_the_diagonal_blocks_and_keep_the_exact_algebra(mlp_problem):
    p, x, y = mlp_problem
    op = curvature.KFAC(ref.mlp_predict, losses.softmax_cross_entropy, p, (x, y))
    k = op.to_dense()
    start = 0
    for name, block in curvature.blocks(op, "leaf").items():
        m = block.size
        sub = k[start:start + m, start:start + m]
        np.testing.assert_allclose(block.to_dense(), sub, atol=1e-12)
        np.testing.assert_allclose(block.logdet(0.1), np.linalg.slogdet(sub + 0.1 * np.eye(m))[1], atol=1e-10)
        np.testing.assert_allclose(block.eigenvalues(), np.linalg.eigvalsh(sub)[::-1], atol=1e-10)
        np.testing.assert_allclose(block.inverse(0.1).to_dense(), np.linalg.inv(sub + 0.1 * np.eye(m)), atol=1e-10)
        start += m


class _FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(4)(x))
        return nn.Dense(3)(h)


def test_flax_linen_mlp_matches_the_plain_dict_model(mlp_problem):
    p, x, y = mlp_problem
    model = _FlaxMLP()
    fp = {"Dense_0": {"kernel": p["w1"], "bias": p["b1"]}, "Dense_1": {"kernel": p["w2"], "bias": p["b2"]}}
    predict = lambda params, x: model.apply({"params": params}, x)  # noqa: E731
    for separate in (True, False):
        flax_op = curvature.KFAC(predict, losses.softmax_cross_entropy, fp, (x, y), separate_weight_and_bias=separate)
        dict_op = curvature.KFAC(ref.mlp_predict, losses.softmax_cross_entropy, p, (x, y),
                                 separate_weight_and_bias=separate)
        v = {k: jax.random.normal(jax.random.PRNGKey(i), a.shape) for i, (k, a) in enumerate(p.items())}
        fv = {"Dense_0": {"kernel": v["w1"], "bias": v["b1"]}, "Dense_1": {"kernel": v["w2"], "bias": v["b2"]}}
        out, fout = dict_op @ v, flax_op @ fv
        np.testing.assert_allclose(fout["Dense_0"]["kernel"], out["w1"], atol=1e-12)
        np.testing.assert_allclose(fout["Dense_1"]["bias"], out["b2"], atol=1e-12)


class _EmbedNormModel(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(5, 3)(tokens).reshape(tokens.shape[0], -1)
        return nn.Dense(2)(nn.LayerNorm()(h))


@pytest.mark.parametrize("fisher_type, exact", [("type-2", curvature.GaussNewton),
                                                ("empirical", curvature.EmpiricalFisher)])
def test_layernorm_scale_and_embedding_get_their_exact_diagonal(fisher_type, exact):
    model = _EmbedNormModel()
    tokens = jax.random.randint(jax.random.PRNGKey(0), (6, 2), 0, 5)
    labels = jax.random.randint(jax.random.PRNGKey(1), (6,), 0, 2)
    params = model.init(jax.random.PRNGKey(2), tokens)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(3), a.shape), params)
    predict = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    op = curvature.KFAC(predict, losses.softmax_cross_entropy, params, (tokens, labels), fisher_type=fisher_type,
                        microbatch_size=4)
    assert set(op.diagonal_parameters) == {"['Embed_0']['embedding']", "['LayerNorm_0']['bias']",
                                           "['LayerNorm_0']['scale']"}
    exact_diag = np.diag(exact(predict, losses.softmax_cross_entropy, params, (tokens, labels)).to_dense())
    flat_exact = op.unravel(exact_diag)
    diag = op.diagonal()
    for leaf in (diag["Embed_0"]["embedding"], diag["LayerNorm_0"]["scale"], diag["LayerNorm_0"]["bias"]):
        assert leaf.size > 0
    np.testing.assert_allclose(diag["Embed_0"]["embedding"], flat_exact["Embed_0"]["embedding"], atol=1e-12)
    np.testing.assert_allclose(diag["LayerNorm_0"]["scale"], flat_exact["LayerNorm_0"]["scale"], atol=1e-12)
    v = op.unravel(jnp.ones(op.size))  # a diagonal leaf's product is its diagonal
    np.testing.assert_allclose((op @ v)["LayerNorm_0"]["scale"], diag["LayerNorm_0"]["scale"], atol=1e-12)


def test_unsupported_uses_of_a_kernel_are_clear_errors():
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 3))
    tied = lambda p, x: (x @ p["w"]) @ p["w"]  # noqa: E731
    with pytest.raises(ValueError, match=r"\['w'\].*tied weights"):
        curvature.KFAC(tied, losses.squared_loss, {"w": jnp.ones((3, 3))}, (x, y))
    transposed = lambda p, x: x @ p["w"].T  # noqa: E731
    with pytest.raises(ValueError, match=r"\['w'\].*transpose"):
        curvature.KFAC(transposed, losses.squared_loss, {"w": jnp.ones((3, 3))}, (x, y))
    reshaped = lambda p, x: x @ p["w"].reshape(3, 3)  # noqa: E731
    with pytest.raises(ValueError, match=r"\['w'\].*reshape"):
        curvature.KFAC(reshaped, losses.squared_loss, {"w": jnp.ones(9)}, (x, y))
    normed = lambda p, x: x @ (p["g"] * p["v"] / jnp.linalg.norm(p["v"], axis=0))  # noqa: E731  (weight norm)
    with pytest.raises(ValueError, match=r"\['g'\].*transformed kernel"):
        curvature.KFAC(normed, losses.squared_loss, {"g": jnp.ones(3), "v": jnp.ones((3, 3))}, (x, y))
    batched = lambda p, x: jnp.einsum("nc,ncf->nf", x, jnp.broadcast_to(p["w"], (x.shape[0], 3, 3)))  # noqa: E731
    with pytest.raises(ValueError, match=r"\['w'\]"):
        curvature.KFAC(batched, losses.squared_loss, {"w": jnp.ones((3, 3))}, (x, y))


def test_a_bias_whose_layer_output_is_used_elsewhere_is_not_joined_to_the_layer():
    # z = x W feeds both the bias add and a skip connection: the bias's gradient is not sum_t D_t, so the bias
    # gets its exact diagonal instead of a ones column in A
    p, x, y = ref.params_and_data(jax.random.PRNGKey(0), seq=False, hidden=3, k=3)

    def skip(p, x):
        z = x @ p["w1"]
        return jnp.tanh(z + p["b1"]) + z

    op = curvature.KFAC(skip, losses.softmax_cross_entropy, {"w1": p["w1"], "b1": p["b1"]}, (x, y),
                        separate_weight_and_bias=False)
    assert op.diagonal_parameters == ("['b1']",)
    gn = curvature.GaussNewton(skip, losses.softmax_cross_entropy, {"w1": p["w1"], "b1": p["b1"]}, (x, y))
    np.testing.assert_allclose(op.diagonal()["b1"], np.diag(gn.to_dense())[:3], atol=1e-12)


def test_argument_errors():
    p, x, y = ref.params_and_data(jax.random.PRNGKey(0), seq=False)
    args = (ref.mlp_predict, losses.softmax_cross_entropy, p, (x, y))
    with pytest.raises(ValueError, match="fisher_type"):
        curvature.KFAC(*args, fisher_type="type-1")
    with pytest.raises(ValueError, match="kfac_approx"):
        curvature.KFAC(*args, kfac_approx="mean")
    with pytest.raises(ValueError, match="num_samples"):
        curvature.KFAC(*args, num_samples=2)
    with pytest.raises(ValueError, match="key"):
        curvature.KFAC(*args, fisher_type="mc")
    op = curvature.KFAC(*args)
    with pytest.raises(ValueError, match="damping"):
        op.inverse(-1.0)
    with pytest.raises(ValueError, match="fitted"):
        op.replace(params=p)
    scaled = lambda p, x: ref.mlp_predict(p, x) * p["s"]  # noqa: E731
    with pytest.raises(ValueError, match=r"forward-only.*\['s'\]"):
        curvature.KFAC(scaled, losses.softmax_cross_entropy, dict(p, s=jnp.ones(())), (x, y),
                       fisher_type="forward-only")


# -- EKFAC ------------------------------------------------------------------------------------------------------

_EKFAC_GRID = [pytest.param("type-2", "expand", True, True, id="type-2-expand-separate-sequence"),
               pytest.param("empirical", "reduce", False, False, id="empirical-reduce-joint-mlp"),
               pytest.param("mc", "expand", False, True, id="mc-expand-joint-sequence", marks=pytest.mark.slow),
               pytest.param("type-2", "reduce", False, True, id="type-2-reduce-joint-sequence", marks=pytest.mark.slow)]


@pytest.mark.parametrize("fisher_type, approx, separate, seq", _EKFAC_GRID)
def test_ekfac_equals_the_hand_built_reference(fisher_type, approx, separate, seq):
    p, x, y = ref.params_and_data(jax.random.PRNGKey(6), seq=seq)
    predict, tapped = (ref.seq_predict, ref.seq_tapped) if seq else (ref.mlp_predict, ref.mlp_tapped)
    key, loss = jax.random.PRNGKey(3), losses.softmax_cross_entropy
    inputs, grads = ref.layer_data(tapped, loss, p, x, y, fisher_type, key, 1)
    fs = ref.factors(inputs, grads, approx, separate, p)
    expected = ref.dense(lambda v: ref.ekfac_apply(fs, inputs, grads, separate, v), p)
    op = curvature.EKFAC(predict, loss, p, (x, y), fisher_type=fisher_type, kfac_approx=approx,
                         separate_weight_and_bias=separate, key=key if fisher_type == "mc" else None,
                         microbatch_size=3)
    np.testing.assert_allclose(op.to_dense(), expected, atol=1e-12)


@pytest.mark.parametrize("fisher_type, exact", [("type-2", curvature.GaussNewton),
                                                ("empirical", curvature.EmpiricalFisher)])
def test_ekfac_is_the_exact_diagonal_in_the_kronecker_eigenbasis_and_beats_kfac(mlp_problem, fisher_type, exact):
    p, x, y = mlp_problem
    args = (ref.mlp_predict, losses.softmax_cross_entropy, p, (x, y))
    op = curvature.EKFAC(*args, fisher_type=fisher_type, separate_weight_and_bias=False)
    f = exact(*args).to_dense()
    sizes = {name: a.size for name, a in p.items()}  # ravel order: b1, b2, w1, w2
    start = dict(zip(sorted(p), np.cumsum([0] + [sizes[n] for n in sorted(p)])))
    for i, (w, b) in enumerate(ref.LAYERS.values()):
        # the layer's coordinates [w; b] row-major, as in the canonical matrix
        idx = np.r_[start[w]:start[w] + sizes[w], start[b]:start[b] + sizes[b]]
        q = np.kron(op.factors["qa"][i], op.factors["qg"][i])
        np.testing.assert_allclose(op.factors["lam"][i].reshape(-1), np.diag(q.T @ f[np.ix_(idx, idx)] @ q),
                                   atol=1e-12)
    kfac = curvature.KFAC(*args, fisher_type=fisher_type, separate_weight_and_bias=False).to_dense()
    assert np.linalg.norm(op.to_dense() - f) <= np.linalg.norm(kfac - f) + 1e-12
    k, d = op.to_dense(), 0.2
    v = jax.random.normal(jax.random.PRNGKey(5), (op.size,))
    inv = op.inverse(d)
    np.testing.assert_allclose(inv @ (op @ v) + d * (inv @ v), v, atol=1e-10)
    np.testing.assert_allclose(op.logdet(d), np.linalg.slogdet(k + d * np.eye(op.size))[1], atol=1e-10)
    np.testing.assert_allclose(op.trace(), np.trace(k), atol=1e-10)
    np.testing.assert_allclose(op.ravel(op.diagonal()), np.diag(k), atol=1e-12)
    np.testing.assert_allclose(op.eigenvalues(), np.linalg.eigvalsh(k)[::-1], atol=1e-10)
    with pytest.raises(ValueError, match="heuristic"):
        op.inverse(d, heuristic_damping=True)


# -- convolutions -----------------------------------------------------------------------------------------------

class _FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(2, (3, 3))(x))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


def _cnn_problem(n=5, size=4, channels=2):
    keys = jax.random.split(jax.random.PRNGKey(7), 6)
    p = {"w1": jax.random.normal(keys[0], (9 * channels, 2)) / 3, "b1": jax.random.normal(keys[1], (2,)),
         "w2": jax.random.normal(keys[2], (size * size * 2, 3)) / 4, "b2": jax.random.normal(keys[3], (3,))}
    x = jax.random.normal(keys[4], (n, size, size, channels))
    y = jax.random.randint(keys[5], (n,), 0, 3)
    flax_params = {"Conv_0": {"kernel": p["w1"].reshape(3, 3, channels, 2), "bias": p["b1"]},
                   "Dense_0": {"kernel": p["w2"], "bias": p["b2"]}}
    # lsgeo's ravel order (Conv_0 bias, kernel, Dense_0 bias, kernel) -> the reference's (b1, b2, w1, w2)
    sizes = {k: a.size for k, a in p.items()}
    start = dict(zip(sorted(p), np.cumsum([0] + [sizes[k] for k in sorted(p)])))
    order = np.concatenate([np.arange(start[k], start[k] + sizes[k]) for k in ("b1", "w1", "b2", "w2")])
    return p, flax_params, x, y, order


@pytest.mark.parametrize("approx, separate, cls", [("expand", True, "KFAC"), ("reduce", False, "KFAC"),
                                                   ("expand", False, "EKFAC")])
def test_convolution_equals_the_hand_built_patch_reference(approx, separate, cls):
    p, flax_params, x, y, order = _cnn_problem()
    model = _FlaxCNN()
    predict = lambda params, x: model.apply({"params": params}, x)  # noqa: E731
    inputs, grads = ref.layer_data(ref.cnn_tapped, losses.softmax_cross_entropy, p, x, y, "type-2")
    fs = ref.factors(inputs, grads, approx, separate, p)
    if cls == "KFAC":
        expected = ref.dense(lambda v: ref.kfac_apply(fs, separate, v), p)
    else:
        expected = ref.dense(lambda v: ref.ekfac_apply(fs, inputs, grads, separate, v), p)
    op = getattr(curvature, cls)(predict, losses.softmax_cross_entropy, flax_params, (x, y), kfac_approx=approx,
                                 separate_weight_and_bias=separate, microbatch_size=2)
    assert len(op.structure.layers) == 2 and not op.diagonal_parameters
    np.testing.assert_allclose(op.to_dense(), expected[np.ix_(order, order)], atol=1e-12)


# -- data plans: a data source, four devices -----------------------------------------------------------------------

def test_a_data_source_gives_the_in_memory_factors(global_x64):
    p, x, y = ref.params_and_data(jax.random.PRNGKey(8), seq=True)
    source = lambda: iter([(x[i:i + 3], y[i:i + 3]) for i in range(0, 7, 3)])  # noqa: E731  (3 + 3 + 1)
    for cls in (curvature.KFAC, curvature.EKFAC):
        streamed = cls(ref.seq_predict, losses.softmax_cross_entropy, p, source, kfac_approx="reduce")
        in_memory = cls(ref.seq_predict, losses.softmax_cross_entropy, p, (x, y), kfac_approx="reduce")
        np.testing.assert_allclose(streamed.to_dense(), in_memory.to_dense(), atol=1e-12)
    with pytest.raises(ValueError, match="data source"):
        curvature.KFAC(ref.seq_predict, losses.softmax_cross_entropy, p, source, fisher_type="mc",
                       key=jax.random.PRNGKey(0))


@pytest.mark.slow
def test_four_devices_give_the_one_device_factors():
    result = last_json(run_python("_kfac_devices.py", devices=4))
    assert result["devices"] == 4
    for name, error in result["errors"].items():
        assert error < 1e-5, (name, error)


@pytest.mark.slow
def test_sharded_parameters_give_sharded_factors_and_the_unsharded_operator():
    """Tensor parallelism over 8 forced host devices (tests/_kfac_sharded.py, float64): an MLP 4-16-2 with its
    first kernel sharded over its outputs (P(None, "model")) and its second over its inputs (P("model", None)).
    KFAC and EKFAC (and KFAC fitted over microbatches sharded over the same devices) equal the one-device
    operators (factors, eigenvalues, dense matrices, products, inverse products, diagonals) to 1e-12; the factor
    on a sharded axis is split along it (each device holds 2 of the 16 rows), the eigenvalues like the kernel,
    the replicated axes replicated; every product comes back sharded like the parameters."""
    result = last_json(run_python("_kfac_sharded.py", devices=8))
    assert result["devices"] == 8
    params = ["P()", "P(None, 'model')", "P()", "P('model', None)"]  # b, w of each layer
    assert result["param_specs"] == params
    rows, replicated = "P('model',)", "P()"  # [16, 16] factors split by rows: P('model', None)
    for name, errors in result["errors"].items():
        for what, error in errors.items():
            assert error < 1e-12, (name, what, error)
    for name, layouts in result["layouts"].items():
        products = ("op @ v", "inverse(0.1) @ v", "diagonal") + (("heuristic inverse @ v",) if name != "ekfac" else ())
        for what in products:
            assert [s.replace("P('model',)", "P('model', None)") for s in layouts[what]] == params, (name, what)
        units = layouts["inverse units"]
        assert units["qa"] == [replicated, rows] and units["qg"] == [rows, replicated], name
        assert units["lam"] == ["P(None, 'model')", rows] and units["lam_bias"] == [rows, replicated], name
        if name == "ekfac":
            assert layouts["factors"] == {"qa": units["qa"], "qg": units["qg"], "lam": units["lam"],
                                          "lam_bias": units["lam_bias"], "diag": []}
            assert layouts["factor_shards"]["lam"] == [[4, 2], [2, 2]]
        else:
            assert layouts["factors"] == {"A": [replicated, rows], "G": [rows, replicated], "diag": []}, name
            assert layouts["factor_shards"] == {"A": [[4, 4], [2, 16]], "G": [[2, 16], [2, 2]], "diag": []}, name
            # (lambda_A, Q_A), (lambda_G, Q_G) per layer
            assert layouts["decomposition"] == [replicated, replicated, rows, rows, rows, rows, replicated, replicated]
            assert layouts["heuristic inverse units"] == {"pa": [replicated, rows], "pg": [rows, replicated],
                                                          "pb": [rows, replicated], "diag": []}, name


def test_a_merged_kernel_axis_keeps_the_sharding_of_its_first_dim_only():
    """The layout rule of kronecker_sharding on a convolution kernel [kh, kw, c_in, c_out] = [3, 3, 8, 16], whose
    matrix is [(c_in, kh, kw), c_out] (dims (2, 0, 1) then (3,)), on a mesh of 8 x 2 devices: c_in sharded gives
    the input axis its mesh axis (72 rows, 9 a device); a sharded kh (not first in its group), a length that is not
    a multiple of the mesh axes' size (a joint bias row: 73) or two sharded dims in one group give None (replicated)."""
    from jax.sharding import AbstractMesh

    from lsgeo.curvature.operators.kronecker_sharding import _group_axes

    mesh = AbstractMesh((8, 2), ("model", "data"))
    conv_in, conv_out = (2, 0, 1), (3,)
    assert _group_axes((None, None, "model", None), conv_in, 72, mesh) == "model"
    assert _group_axes((None, None, ("model", "data"), None), conv_in, 144, mesh) == ("model", "data")
    assert _group_axes((None, None, None, "model"), conv_out, 16, mesh) == "model"
    assert _group_axes((None, None, None, "model"), conv_in, 72, mesh) is None
    assert _group_axes(("model", None, None, None), conv_in, 72, mesh) is None  # kh is not the group's first dim
    assert _group_axes((None, "data", "model", None), conv_in, 72, mesh) is None  # two sharded dims in one group
    assert _group_axes((None, None, "model", None), conv_in, 73, mesh) is None  # a joint bias row
    assert _group_axes((None, None, "data"), conv_out, 16, mesh) is None  # a spec shorter than the kernel: unsharded


def test_kfac_inverse_preconditions_cg_on_the_exact_gauss_newton():
    """solve(GaussNewton, b, preconditioner=KFAC.inverse(d)): the same x as plain CG, in fewer products (softmax
    regression with badly scaled inputs, where KFAC's A (x) G captures the input scales that slow plain CG)."""
    k = jax.random.split(jax.random.key(0), 4)
    n, d, c = 200, 12, 4
    x = jax.random.normal(k[0], (n, d)) * jnp.linspace(0.2, 3.0, d)
    y = jax.random.randint(k[1], (n,), 0, c)
    params = {"w": 0.3 * jax.random.normal(k[2], (d, c)), "b": jnp.zeros(c)}

    def predict(p, x):
        return x @ p["w"] + p["b"]

    loss = losses.softmax_cross_entropy
    gn = curvature.GaussNewton(predict, loss, params, (x, y))
    kfac = curvature.KFAC(predict, loss, params, (x, y))
    b = jax.tree_util.tree_map(lambda a: jax.random.normal(k[3], a.shape), params)
    damping = 1e-3
    x_cg, info_cg = curvature.solve(gn, b, damping=damping, tol=1e-10, return_info=True)
    x_pcg, info_pcg = curvature.solve(gn, b, damping=damping, tol=1e-10, preconditioner=kfac.inverse(damping),
                                      return_info=True)
    dense = np.asarray(gn.to_dense()) + damping * np.eye(gn.size)
    want = np.linalg.solve(dense, np.asarray(ravel_pytree(b)[0]))
    for got in (x_cg, x_pcg):
        np.testing.assert_allclose(ravel_pytree(got)[0], want, rtol=1e-7, atol=1e-9)
    assert bool(info_cg.converged) and bool(info_pcg.converged)
    assert int(info_pcg.num_products) < 0.6 * int(info_cg.num_products), (info_pcg.num_products, info_cg.num_products)
    # flat vectors take the flat path of the same inverse
    x_flat = curvature.solve(gn, ravel_pytree(b)[0], damping=damping, tol=1e-10, preconditioner=kfac.inverse(damping))
    np.testing.assert_allclose(x_flat, want, rtol=1e-7, atol=1e-9)
