"""lsgeo.models: shapes, parameter counts, BatchNorm modes, initialisation scales, closed forms.

Heavy models are only traced (``jax.eval_shape``); the BatchNorm test uses a tiny ResNet.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgeo.models import (
    MLP,
    DeepLinearNet,
    DiagonalNet,
    LinearNet,
    ResNet18,
    ToyCNN,
    WideConvNet,
    count_params,
    init_model,
    linear_params_to_matrices,
    make_predict,
    make_train_apply,
    matrices_to_linear_params,
    mean_field_init,
    num_batchnorm_layers,
    recompute_batch_stats,
)

KEY = jax.random.key(0)
# float32 matmuls on GPU default to TF32 (~1e-3 relative error): closed forms compare at full precision
HIGHEST = functools.partial(jax.default_matmul_precision, "highest")


def _output_shape(model, x_shape):
    """Output shape of ``model`` on inputs ``x_shape``, traced only."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    out, _ = jax.eval_shape(lambda k, xx: model.init_with_output(k, xx), KEY, x)
    return out.shape


@pytest.mark.parametrize(
    "model, x_shape, expected",
    [
        (MLP((16, 16), 10), (5, 7), (5, 10)),
        (MLP((16, 16), 1), (5, 7), (5, 1)),
        (MLP((16, 16), 1, squeeze_output=True), (5, 7), (5,)),
        (MLP((16, 16, 16), 3, skip_connections=True), (5, 4, 2), (5, 3)),
        (MLP((), 3), (5, 7), (5, 3)),
        (DiagonalNet(7), (5, 7), (5,)),
        (LinearNet(16, 3), (5, 7), (5, 3)),
        (DeepLinearNet((8, 8, 8), 2), (5, 7), (5, 2)),
        (ToyCNN(), (2, 32, 32, 3), (2, 10)),
        (ToyCNN(num_classes=4), (2, 28, 28, 1), (2, 4)),
        (WideConvNet(), (2, 32, 32, 3), (2, 10)),
        (ResNet18(), (2, 32, 32, 3), (2, 10)),
        (ResNet18(num_classes=100, width=4), (2, 32, 32, 3), (2, 100)),
    ],
)
def test_output_shapes(model, x_shape, expected):
    assert _output_shape(model, x_shape) == expected


def test_parameter_counts():
    # ResNet-18 (CIFAR variant, 10 classes): 11,173,962 parameters, as the PyTorch reference.
    assert count_params(ResNet18(), (1, 32, 32, 3)) == 11_173_962
    # 4 conv layers of 128 channels + one linear layer.
    assert count_params(WideConvNet(), (1, 32, 32, 3)) == (3 * 9 * 128 + 128) + 3 * (128 * 9 * 128 + 128) + 1290
    # 2 conv layers of 5 channels, 32 -> 8 after two 2x2 pools, head 320 -> 64 -> 10.
    assert count_params(ToyCNN(), (1, 32, 32, 3)) == (27 * 5 + 5) + (45 * 5 + 5) + (320 * 64 + 64) + (64 * 10 + 10)
    assert count_params(MLP((32, 16), 10), (1, 64)) == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    assert count_params(LinearNet(6, 2), (1, 5)) == 5 * 6 + 6 * 2
    assert count_params(DiagonalNet(9), (1, 9)) == 18


def test_param_tree_one_top_level_module_per_layer():
    params, _ = init_model(MLP((4, 4), 2), KEY, jnp.ones((1, 3)))
    assert list(params) == ["Dense_0", "Dense_1", "Dense_2"]
    resnet = jax.eval_shape(lambda k: ResNet18(width=2).init(k, jnp.ones((1, 8, 8, 3))), KEY)
    assert set(resnet["params"]) == {"stem_conv", "stem_bn", "head"} | {
        f"stage{s}_block{b}" for s in range(1, 5) for b in (1, 2)}
    assert set(resnet) == {"params", "batch_stats"}


def test_batchnorm_train_and_eval_modes():
    model = ResNet18(num_classes=3, width=2, stage_sizes=(1, 1))  # stem BN, blocks, shortcut BN
    x = np.random.default_rng(1).normal(1.0, 2.0, (6, 8, 8, 3)).astype(np.float32)
    params, state = init_model(model, KEY, x[:1])
    assert set(state) == {"batch_stats"}

    @jax.jit
    def train_mode(p, s, xx):  # make_predict(train=True) is make_train_apply without the new statistics
        return make_train_apply(model)(p, s, xx), make_predict(model, s, train=True)(p, xx)

    (out, new_state), out_predict = train_mode(params, state, x)
    assert out.shape == (6, 3)
    np.testing.assert_allclose(out_predict, out, rtol=1e-5, atol=1e-5)
    # train mode: running averages move towards the batch statistics (momentum 0.9)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    old, new = state["batch_stats"]["stem_bn"], new_state["batch_stats"]["stem_bn"]
    assert not np.allclose(new["mean"], old["mean"]) and not np.allclose(new["var"], old["var"])

    @jax.jit
    def eval_mode(p, s, xx):  # the bound predictor, and flax's apply with a mutable collection
        return make_predict(model, s)(p, xx), model.apply({"params": p, **s}, xx, train=False, mutable=["batch_stats"])

    y1, (y_apply, eval_state) = eval_mode(params, new_state, x)
    y2, _ = eval_mode(params, new_state, x[::-1])
    np.testing.assert_allclose(y2, y1[::-1], rtol=1e-5, atol=1e-5)  # per-example, batch-independent
    np.testing.assert_array_equal(eval_mode(params, new_state, x)[0], y1)  # deterministic
    np.testing.assert_allclose(y_apply, y1, rtol=1e-6, atol=1e-6)
    assert not np.allclose(y1, out, atol=1e-3)  # running averages differ from batch statistics
    jax.tree.map(np.testing.assert_array_equal, dict(eval_state), new_state)  # eval mode: no update


def test_predict_without_batch_stats_is_a_clear_error():
    model = ResNet18(width=2, stage_sizes=(1,))
    params = jax.eval_shape(lambda k: model.init(k, jnp.ones((1, 8, 8, 3))), KEY)["params"]
    with pytest.raises(ValueError, match="model_state"):
        jax.eval_shape(make_predict(model), params, jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))


def test_models_without_state_train_apply_is_predict():
    model = MLP((8,), 2)
    params, state = init_model(model, KEY, jnp.ones((1, 3)))
    assert state == {}
    x = jnp.arange(12.0).reshape(4, 3)
    out, new_state = make_train_apply(model)(params, state, x)
    np.testing.assert_allclose(out, make_predict(model)(params, x))
    assert new_state == {}


def test_mean_field_init_scale():
    d0, d1, d2, k = 64, 512, 256, 32
    params, _ = init_model(MLP((d1, d2), k, init_scheme="mean_field"), KEY, jnp.ones((1, d0)))
    for name, (din, dout) in zip(["Dense_0", "Dense_1", "Dense_2"], [(d0, d1), (d1, d2), (d2, k)]):
        w = np.asarray(params[name]["kernel"])
        assert w.shape == (din, dout)
        np.testing.assert_allclose(w.std(), 1.0 / np.sqrt(din * dout), rtol=0.06)
        np.testing.assert_allclose(np.sum(w**2), 1.0, rtol=0.12)  # ||W_i||_F^2 = O(1) in the width
        np.testing.assert_array_equal(params[name]["bias"], 0.0)
    # the standard (LeCun) init has variance 1/d_in instead
    std, _ = init_model(MLP((d1,), k), KEY, jnp.ones((1, d0)))
    np.testing.assert_allclose(np.asarray(std["Dense_0"]["kernel"]).std(), 1.0 / np.sqrt(d0), rtol=0.06)
    # conv kernels [kh, kw, c_in, c_out]: the receptive field counts in the fan-in
    w = mean_field_init(KEY, (3, 3, 16, 32))
    np.testing.assert_allclose(np.std(w), 1.0 / np.sqrt(3 * 3 * 16 * 32), rtol=0.06)


def _normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_diagonal_net_closed_form():
    d, n = 6, 5
    model = DiagonalNet(d, init_scheme="normal", init_scale=1.0)
    params, _ = init_model(model, KEY, jnp.ones((1, d)))
    w1, w2 = np.asarray(params["w1"]), np.asarray(params["w2"])
    assert w1.shape == w2.shape == (d,) and not np.allclose(w1, w2)
    X = _normal((n, d))
    predict = jax.jit(make_predict(model))
    with HIGHEST():
        np.testing.assert_allclose(predict(params, X), X @ (w1 * w1 - w2 * w2), rtol=1e-5, atol=1e-5)
    const, _ = init_model(DiagonalNet(d, init_scale=0.3), KEY, jnp.ones((1, d)))
    np.testing.assert_allclose(const["w1"], 0.3)
    np.testing.assert_allclose(predict(const, X), 0.0, atol=1e-6)  # w1 = w2: the zero function (FMA rounding)


def test_linear_net_closed_form_and_paper_matrices():
    d0, d1, d2, n = 4, 7, 3, 5
    model = LinearNet(d1, d2)
    params, _ = init_model(model, KEY, jnp.ones((1, d0)))
    W1, W2 = (np.asarray(W) for W in linear_params_to_matrices(params))
    assert W1.shape == (d1, d0) and W2.shape == (d2, d1)  # the paper's W_i in R^{d_i x d_{i-1}}
    X = _normal((n, d0))
    with HIGHEST():
        out = np.asarray(jax.jit(make_predict(model))(params, X))
    np.testing.assert_allclose(out, X @ W1.T @ W2.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.T, W2 @ W1 @ X.T, rtol=1e-5, atol=1e-5)  # Phi = W_2 W_1 X^T
    back = matrices_to_linear_params([W1, W2])
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_deep_linear_net_matrices_numeric_order():
    widths = (3,) * 11  # Dense_0 ... Dense_11: Dense_10 must come after Dense_9
    model = DeepLinearNet(widths, 2)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.ones((1, 4))), KEY)["params"]
    Ws = [_normal((3, 4), 1)] + [_normal((3, 3), 2 + i) for i in range(10)] + [_normal((2, 3), 20)]
    params = matrices_to_linear_params(Ws)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, shapes)
    X = _normal((5, 4))
    expected = functools.reduce(lambda h, W: h @ W.T, Ws, X)
    with HIGHEST():
        np.testing.assert_allclose(jax.jit(make_predict(model))(params, X), expected, rtol=1e-4, atol=1e-5)
    for W, back in zip(Ws, linear_params_to_matrices(params)):
        np.testing.assert_array_equal(back, W)


def test_linear_matrices_errors():
    params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "Dense_1": {"kernel": jnp.ones((3, 2))}}
    with pytest.raises(ValueError, match="bias"):
        linear_params_to_matrices(params)
    with pytest.raises(ValueError, match=r"matrices\[1\]"):
        matrices_to_linear_params([jnp.ones((3, 4)), jnp.ones((2, 5))])
    with pytest.raises(ValueError, match="Dense_i"):
        linear_params_to_matrices({"conv": {"kernel": jnp.ones((2, 2))}})


def test_skip_connections_same_parameters_different_function():
    plain, skip = MLP((8, 8, 8), 2, activation="tanh"), MLP((8, 8, 8), 2, activation="tanh", skip_connections=True)
    params, _ = init_model(plain, KEY, jnp.ones((1, 3)))
    skip_shapes = jax.eval_shape(lambda k: skip.init(k, jnp.ones((1, 3))), KEY)["params"]
    assert jax.tree.map(jnp.shape, skip_shapes) == jax.tree.map(jnp.shape, params)
    p = jax.tree.map(np.asarray, params)
    x = _normal((4, 3))
    h = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    for name in ("Dense_1", "Dense_2"):
        h = h + np.tanh(h @ p[name]["kernel"] + p[name]["bias"])
    expected = h @ p["Dense_3"]["kernel"] + p["Dense_3"]["bias"]
    both = jax.jit(lambda q, xx: (make_predict(skip)(q, xx), make_predict(plain)(q, xx)))
    with HIGHEST():
        out_skip, out_plain = both(params, x)
    np.testing.assert_allclose(out_skip, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out_plain, expected)


@pytest.mark.parametrize(
    "model, x_shape, match",
    [
        (MLP((8, 4), 2, skip_connections=True), (1, 3), "equal hidden widths"),
        (MLP((8,), 2, activation="swish-ish"), (1, 3), "activation"),
        (MLP((8,), 2, init_scheme="xavier"), (1, 3), "init_scheme"),
        (MLP((8, 0), 2), (1, 3), "widths"),
        (DiagonalNet(4), (1, 3), "4 features"),
        (ToyCNN(), (1, 3), "NHWC"),
        (MLP((8,), 2), (3,), "batch"),
    ],
)
def test_invalid_arguments(model, x_shape, match):
    with pytest.raises(ValueError, match=match):
        _output_shape(model, x_shape)


def _bn_problem(n=10):
    model = ResNet18(num_classes=3, width=2, stage_sizes=(1, 1))  # stem BN, two blocks, one shortcut BN
    x = _normal((n, 8, 8, 3)) * 2.0 + 1.0
    params, state = init_model(model, KEY, x[:1])
    return model, x, params, state


def test_recompute_batch_stats_is_a_full_data_train_mode_forward_pass(x64):
    model, x, params, state = _bn_problem()
    to64 = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, jnp.float64))
    params, x = to64(params), jnp.asarray(x, jnp.float64)
    zeros = jax.tree.map(jnp.zeros_like, to64(state))  # old statistics 0: train mode stores 0.1 * batch statistics
    assert num_batchnorm_layers(state) == 6
    new = jax.jit(lambda p, s, xx: recompute_batch_stats(model, p, s, xx, batch_size=4))(params, zeros, x)  # 4+4+2
    _, moved = make_train_apply(model)(params, zeros, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b / 0.1, rtol=1e-10, atol=1e-12), new, dict(moved))
    np.testing.assert_allclose(make_predict(model, new)(params, x), make_predict(model, zeros, train=True)(params, x),
                               rtol=1e-10, atol=1e-10)
    one_pass = recompute_batch_stats(model, params, zeros, x, max_passes=1)  # exact for the stem BN only
    assert not np.allclose(one_pass["batch_stats"]["stage2_block1"]["bn2"]["var"],
                           new["batch_stats"]["stage2_block1"]["bn2"]["var"])
    np.testing.assert_allclose(one_pass["batch_stats"]["stem_bn"]["mean"], new["batch_stats"]["stem_bn"]["mean"])


def test_recompute_batch_stats_vmaps_and_ignores_other_models():
    model, x, params, state = _bn_problem(n=6)
    pair = jax.tree.map(lambda a: jnp.stack([a, 1.5 * a]), params)
    both = jax.jit(jax.vmap(lambda p: recompute_batch_stats(model, p, state, x, batch_size=4)))(pair)
    second = recompute_batch_stats(model, jax.tree.map(lambda a: a[1], pair), state, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, rtol=2e-5, atol=1e-6), both, second)
    mlp_params, mlp_state = init_model(MLP((4,), 2), KEY, jnp.ones((1, 3)))
    assert recompute_batch_stats(MLP((4,), 2), mlp_params, mlp_state, jnp.ones((5, 3))) == {}
    with pytest.raises(ValueError, match="batch_size"):
        recompute_batch_stats(model, params, state, x, batch_size=0)


def test_docstring_examples():
    import doctest

    from lsgeo import models

    for module in (models, models.batchnorm, models.contract, models.linear, models.resnet, models.cnn):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, module.__name__
