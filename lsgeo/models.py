"""Flax (linen) models of Orvieto et al. (AISTATS 2023) and the helpers that turn them into predictors.

Models (every ``__call__(x, train=False)``; ``train`` only matters for BatchNorm). The
initialisation is chosen by the field ``init_scheme`` (a field cannot be called ``init``: that
name is ``flax.linen.Module.init``).

- ``MLP``: fully connected, ``standard`` (LeCun), ``he`` or ``mean_field`` initialisation
  (Section 3: entries of W_i with std 1/sqrt(d_i d_{i-1})), optional residual connections.
- ``DiagonalNet``: Phi(w) = X (w1 * w1 - w2 * w2), outputs ``[n]`` (Section 2.3).
- ``LinearNet`` / ``DeepLinearNet``: Phi = W_M ... W_1 x (Sections 2.4, 3.1, 4).
- ``ToyCNN``: two 5-channel conv layers and an MLP head (Section 5, Figure 5).
- ``WideConvNet``: four 128-channel conv layers and one linear layer (Section 5, Figure 5).
- ``ResNet18``: the CIFAR variant with BatchNorm (Section 5, Figure 6; He et al. 2016).

Helpers implement the model contract of DESIGN.md section 2, ``predict(params, x) -> [n, k]``
(or ``[n]``), with BatchNorm statistics bound by ``functools.partial``:

>>> model = MLP(widths=(64, 64), num_outputs=10)
>>> params, state = init_model(model, jax.random.key(0), x[:1])
>>> predict = make_predict(model, state)          # eval mode: running averages, deterministic
>>> logits = predict(params, x)                   # [n, 10]

For BatchNorm models the training loop uses ``make_train_apply(model)``, which returns the
updated running statistics; noise injection never touches them (they are not in ``params``).

Paper notation vs flax: the paper writes W_i in R^{d_i x d_{i-1}} and Phi = W_M ... W_1 X^T,
while a flax ``Dense`` kernel is ``[d_in, d_out] = W_i^T`` and a flax model maps ``x [n, d_0]`` to
``X W_1^T ... W_M^T = Phi^T``. ``linear_params_to_matrices`` and ``matrices_to_linear_params``
convert between the two.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lsgeo.validation import check_choice, check_positive_int

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "DiagonalNet",
    "LinearNet",
    "DeepLinearNet",
    "ToyCNN",
    "WideConvNet",
    "BasicBlock",
    "ResNet18",
    "mean_field_init",
    "init_model",
    "make_predict",
    "make_train_apply",
    "count_params",
    "linear_params_to_matrices",
    "matrices_to_linear_params",
]

PyTree = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "softplus": nn.softplus,
    "gelu": nn.gelu,
    "sigmoid": nn.sigmoid,
    "linear": lambda x: x,
}

_INITS = ("standard", "he", "mean_field")


def _check_widths(widths, name: str = "widths") -> tuple[int, ...]:
    try:
        widths = tuple(widths)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers, got {widths!r}") from None
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w <= 0:
            raise ValueError(f"{name} must be a sequence of positive integers, got {widths!r}")
    return widths


def _check_batched(x) -> None:
    if x.ndim < 2:
        raise ValueError(f"x must be a batch [n, d, ...] (use x[None] for one example), got shape {x.shape}")


def _activation(activation) -> Callable[[jax.Array], jax.Array]:
    if callable(activation):
        return activation
    check_choice(activation, "activation", ACTIVATIONS)
    return ACTIVATIONS[activation]


def mean_field_init(key, shape, dtype=jnp.float32):
    """Kernel initialiser of Section 3: i.i.d. N(0, 1 / (d_in d_out)) entries.

    For a ``Dense`` kernel ``[d_in, d_out]`` (= W_i^T with W_i in R^{d_i x d_{i-1}}) the std is
    1/sqrt(d_i d_{i-1}), so ||W_i||_F^2 = O(1) as the width grows (the mean-field scaling).
    For a conv kernel ``[..., c_in, c_out]`` the receptive field counts in the fan-in.
    """
    fan_in = int(np.prod(shape[:-1]))
    fan_out = int(shape[-1])
    return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in * fan_out)


def _kernel_init(init: str):
    check_choice(init, "init_scheme", _INITS)
    if init == "mean_field":
        return mean_field_init
    if init == "he":
        return nn.initializers.he_normal()
    return nn.initializers.lecun_normal()


class MLP(nn.Module):
    """Fully connected network x -> W_{L+1} act(... act(W_1 x + b_1) ...) + b_{L+1}.

    Attributes:
      widths: hidden widths (d_1, ..., d_L); empty gives a linear model.
      num_outputs: k, the output width; outputs are ``[n, k]`` (``[n]`` if ``squeeze_output``
        and k == 1).
      activation: a name in ``ACTIVATIONS`` ("relu", "tanh", "softplus", "gelu", "sigmoid",
        "linear") or any callable.
      use_bias: biases in every layer (initialised at zero).
      init_scheme: "standard" (LeCun normal, variance 1/d_in, flax's default), "he" (variance 2/d_in,
        for ReLU) or "mean_field" (Section 3 of the paper: std 1/sqrt(d_in d_out), all layers).
      skip_connections: residual hidden layers h_{l+1} = h_l + act(W_{l+1} h_l + b_{l+1}) for
        l >= 1 (the first layer maps the input to the width); needs equal hidden widths, so the
        same network with and without skips has the same parameters (``Dense_0`` ... ``Dense_L``).
      squeeze_output: return ``[n]`` instead of ``[n, 1]`` when num_outputs == 1.

    Parameter tree: ``{'Dense_0': {'kernel': [d_0, d_1], 'bias': [d_1]}, ...}``, one top-level
    module per layer, so the default "layers" of ``lsgeo.groups`` are the paper's layers.
    Input ``x`` is ``[n, d_0]`` (further dimensions are flattened).
    """

    widths: Sequence[int]
    num_outputs: int
    activation: str | Callable = "relu"
    use_bias: bool = True
    init_scheme: str = "standard"
    skip_connections: bool = False
    squeeze_output: bool = False

    def setup(self):
        widths = _check_widths(self.widths)
        check_positive_int(self.num_outputs, "num_outputs")
        check_choice(self.init_scheme, "init_scheme", _INITS)
        if self.skip_connections and len(set(widths)) > 1:
            raise ValueError(
                f"skip_connections=True needs equal hidden widths, got widths={widths!r}"
            )
        self._act = _activation(self.activation)
        kinit = _kernel_init(self.init_scheme)
        self.layers = [
            nn.Dense(w, use_bias=self.use_bias, kernel_init=kinit, name=f"Dense_{i}")
            for i, w in enumerate(widths + (self.num_outputs,))
        ]

    def __call__(self, x, train: bool = False):
        _check_batched(x)
        h = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers[:-1]):
            z = self._act(layer(h))
            h = h + z if (self.skip_connections and i > 0) else z
        out = self.layers[-1](h)
        if self.squeeze_output and self.num_outputs == 1:
            out = out[:, 0]
        return out


class DiagonalNet(nn.Module):
    """Diagonal linear network of Section 2.3: Phi(w) = X (w1 * w1 - w2 * w2), outputs ``[n]``.

    Parameters ``{'w1': [d], 'w2': [d]}``. Initialisation ``init_scheme="constant"``: w1 = w2 =
    ``init_scale`` (the zero function at the usual "alpha" scale); ``init_scheme="normal"``: i.i.d.
    N(0, init_scale^2) entries.
    """

    d: int
    init_scale: float = 0.1
    init_scheme: str = "constant"

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_positive_int(self.d, "d")
        check_choice(self.init_scheme, "init_scheme", ("constant", "normal"))
        if x.shape[-1] != self.d:
            raise ValueError(f"x must have {self.d} features (last axis), got shape {x.shape}")
        if self.init_scheme == "constant":
            initf = lambda key, shape: jnp.full(shape, self.init_scale, jnp.float32)  # noqa: E731
        else:
            initf = lambda key, shape: self.init_scale * jax.random.normal(key, shape)  # noqa: E731
        w1 = self.param("w1", initf, (self.d,))
        w2 = self.param("w2", initf, (self.d,))
        return x @ (w1 * w1 - w2 * w2)


class DeepLinearNet(nn.Module):
    """Deep linear network x -> W_M ... W_1 x (Section 4), outputs ``[n, d_out]``.

    Attributes:
      widths: hidden widths (d_1, ..., d_{M-1}); d_0 is taken from the input.
      d_out: d_M.
      use_bias: biases (off by default, as in the paper).
      init_scheme: "standard" (LeCun) or "mean_field" (std 1/sqrt(d_i d_{i-1}), Section 3).

    Parameters ``{'Dense_{i-1}': {'kernel': W_i^T}}``; see ``linear_params_to_matrices``.
    """

    widths: Sequence[int]
    d_out: int
    use_bias: bool = False
    init_scheme: str = "standard"

    @nn.compact
    def __call__(self, x, train: bool = False):
        widths = _check_widths(self.widths)
        check_positive_int(self.d_out, "d_out")
        kinit = _kernel_init(self.init_scheme)
        _check_batched(x)
        h = x.reshape(x.shape[0], -1)
        for i, w in enumerate(widths + (self.d_out,)):
            h = nn.Dense(w, use_bias=self.use_bias, kernel_init=kinit, name=f"Dense_{i}")(h)
        return h


class LinearNet(nn.Module):
    """Two-layer linear network of Sections 2.4 and 3.1: Phi = W_2 W_1 X^T, i.e. ``x W_1^T W_2^T``.

    W_1 in R^{d1 x d0} is ``params['Dense_0']['kernel'].T``, W_2 in R^{d_out x d1} is
    ``params['Dense_1']['kernel'].T``. Outputs ``[n, d_out]``.
    """

    d1: int
    d_out: int
    use_bias: bool = False
    init_scheme: str = "standard"

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_positive_int(self.d1, "d1")
        check_positive_int(self.d_out, "d_out")
        kinit = _kernel_init(self.init_scheme)
        _check_batched(x)
        h = x.reshape(x.shape[0], -1)
        h = nn.Dense(self.d1, use_bias=self.use_bias, kernel_init=kinit, name="Dense_0")(h)
        return nn.Dense(self.d_out, use_bias=self.use_bias, kernel_init=kinit, name="Dense_1")(h)


class ToyCNN(nn.Module):
    """Toy CNN of Section 5 (Figure 5): two conv layers with 5 channels and an MLP head.

    conv 3x3 (``channels``) -> ReLU -> max-pool 2x2 -> conv 3x3 (``channels``) -> ReLU ->
    max-pool 2x2 -> flatten -> [Dense(h) -> ReLU for h in ``head_widths``] -> Dense(num_classes).
    Input ``[n, H, W, C]`` (NHWC); for 32x32x3 the head sees 8 * 8 * 5 = 320 features.
    No normalisation layers. Outputs ``[n, num_classes]``.
    """

    num_classes: int = 10
    channels: int = 5
    head_widths: Sequence[int] = (64,)
    init_scheme: str = "standard"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC images [n, H, W, C], got shape {x.shape}")
        kinit = _kernel_init(self.init_scheme)
        for i in range(2):
            x = nn.Conv(self.channels, (3, 3), padding="SAME", kernel_init=kinit, name=f"Conv_{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        for i, w in enumerate(_check_widths(self.head_widths, "head_widths")):
            x = nn.relu(nn.Dense(w, kernel_init=kinit, name=f"Dense_{i}")(x))
        return nn.Dense(self.num_classes, kernel_init=kinit, name=f"Dense_{len(self.head_widths)}")(x)


class WideConvNet(nn.Module):
    """Wider fully convolutional network of Section 5 (Figure 5): 4 conv layers and one linear layer.

    Four 3x3 conv layers with ``width`` channels (128 in the paper), ReLU, strides ``strides``
    (default (1, 2, 2, 2): 32x32 -> 4x4), then global average pooling over the spatial axes and a
    single ``Dense(num_classes)``. Global average pooling keeps it fully convolutional (the head
    does not depend on the image size). No normalisation layers. Input NHWC, outputs
    ``[n, num_classes]``.
    """

    num_classes: int = 10
    width: int = 128
    strides: Sequence[int] = (1, 2, 2, 2)
    init_scheme: str = "standard"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC images [n, H, W, C], got shape {x.shape}")
        check_positive_int(self.width, "width")
        kinit = _kernel_init(self.init_scheme)
        for i, s in enumerate(self.strides):
            x = nn.Conv(self.width, (3, 3), strides=(s, s), padding="SAME", kernel_init=kinit,
                        name=f"Conv_{i}")(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=kinit, name="Dense_0")(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU (He et al. 2016).

    The shortcut is a 1x1 strided conv + BN when the stride or the channel count changes.
    BatchNorm uses batch statistics when ``train`` (momentum 0.9, eps 1e-5, as PyTorch).
    """

    channels: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.he_normal())
        s = (self.strides, self.strides)
        y = conv(self.channels, (3, 3), strides=s, padding=1, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(self.channels, (3, 3), padding=1, name="conv2")(y)
        y = norm(name="bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.channels:
            x = conv(self.channels, (1, 1), strides=s, name="shortcut_conv")(x)
            x = norm(name="shortcut_bn")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (the CIFAR variant), with BatchNorm (Section 5, Figure 6).

    3x3 stem conv (``width`` channels, stride 1, no max-pool) + BN + ReLU, four stages of two
    ``BasicBlock``s with widths (w, 2w, 4w, 8w) and strides (1, 2, 2, 2), global average pooling,
    ``Dense(num_classes)``. With width 64 and 10 classes: 11,173,962 parameters (BatchNorm scales and
    offsets included, running statistics not). A small ``width`` (e.g. 4) gives a CPU smoke-test model.

    Top-level modules: ``stem_conv``, ``stem_bn``, ``stage{1..4}_block{1,2}``, ``head``.
    Variables: ``params`` and ``batch_stats``. Input NHWC, outputs ``[n, num_classes]``.
    """

    num_classes: int = 10
    width: int = 64
    stage_sizes: Sequence[int] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC images [n, H, W, C], got shape {x.shape}")
        check_positive_int(self.width, "width")
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False,
                    kernel_init=nn.initializers.he_normal(), name="stem_conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="stem_bn")(x)
        x = nn.relu(x)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for b in range(num_blocks):
                strides = 2 if (stage > 0 and b == 0) else 1
                x = BasicBlock(self.width * 2**stage, strides, name=f"stage{stage + 1}_block{b + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def init_model(model: nn.Module, key: jax.Array, x_example) -> tuple[PyTree, dict]:
    """Initialise ``model`` on an example batch ``x_example`` (one example suffices).

    Returns ``(params, model_state)``: ``params = variables['params']`` (what noise, gradients and
    curvature act on) and ``model_state`` the other collections (``{'batch_stats': ...}`` for
    BatchNorm models, ``{}`` otherwise). The initialiser runs as one compiled program
    (``jax.jit(model.init)``); traceable, so it can be ``vmap``-ed over keys.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params, state = init_model(MLP(widths=(4,), num_outputs=2), jax.random.key(0), jnp.ones((1, 3)))
      >>> jax.tree.map(jnp.shape, params)["Dense_0"]["kernel"], state
      ((3, 4), {})
    """
    variables = dict(_jit_init(model, key, jnp.asarray(x_example)))
    if "params" not in variables:
        raise ValueError(f"model {type(model).__name__} has no parameters")
    params = variables.pop("params")
    return params, variables


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(model, key, x_example):
    return model.init(key, x_example, train=False)


def _apply_eval(model, model_state, params, x):
    try:
        return model.apply({"params": params, **model_state}, x, train=False)
    except flax.errors.ScopeCollectionNotFound as e:
        raise ValueError(
            f"{type(model).__name__} needs model_state (e.g. BatchNorm 'batch_stats'): pass the one "
            f"returned by init_model, make_predict(model, model_state). Flax: {e}"
        ) from e


def _apply_train_batch_stats(model, model_state, params, x):
    out, _ = model.apply({"params": params, **model_state}, x, train=True, mutable=list(model_state))
    return out


def make_predict(model: nn.Module, model_state: dict | None = None, *, train: bool = False) -> Callable:
    """The predictor ``predict(params, x) -> [n, k]`` (or ``[n]``) of the model contract.

    ``train=False`` (default): BatchNorm uses the running averages in ``model_state`` (bound with
    ``functools.partial``), so ``predict`` is deterministic and per-example.
    ``train=True``: BatchNorm normalises with the statistics of the batch ``x`` (the function the
    training loop differentiates); the updated running averages are discarded, use
    ``make_train_apply`` to keep them. For models without state both modes coincide.
    """
    state = {} if model_state is None else dict(model_state)
    fn = _apply_train_batch_stats if (train and state) else _apply_eval
    return functools.partial(fn, model, state)


def _train_apply(model, params, model_state, x):
    if not model_state:
        return model.apply({"params": params}, x, train=True), model_state
    out, new_state = model.apply({"params": params, **model_state}, x, train=True, mutable=list(model_state))
    return out, dict(new_state)


def make_train_apply(model: nn.Module) -> Callable:
    """``f(params, model_state, x) -> (outputs, new_model_state)`` in training mode.

    BatchNorm normalises with batch statistics and the running averages are updated
    (new = momentum * old + (1 - momentum) * batch). The training loop threads ``model_state``;
    perturbations (noise injection) apply to ``params`` only.
    """
    return functools.partial(_train_apply, model)


def count_params(model: nn.Module, x_shape: Sequence[int], dtype=jnp.float32) -> int:
    """Number of scalar parameters (``variables['params']`` only) of ``model`` on inputs of shape
    ``x_shape``, computed with ``jax.eval_shape`` (no FLOPs, no memory: fine for ResNet-18)."""
    x = jax.ShapeDtypeStruct(tuple(x_shape), dtype)
    shapes = jax.eval_shape(lambda k, xx: model.init(k, xx, train=False), jax.random.key(0), x)
    return int(sum(np.prod(l.shape) for l in jax.tree_util.tree_leaves(shapes["params"])))


def _dense_index(name: str) -> int:
    m = re.fullmatch(r"Dense_(\d+)", name)
    return -1 if m is None else int(m.group(1))


def linear_params_to_matrices(params: PyTree) -> list[jax.Array]:
    """Paper matrices ``[W_1, ..., W_M]`` (W_i in R^{d_i x d_{i-1}}) from ``LinearNet`` /
    ``DeepLinearNet`` / bias-free ``MLP`` params, so that ``predict(params, X) = X W_1^T ... W_M^T``
    and the paper's Phi = W_M ... W_1 X^T is its transpose. W_i = ``kernel.T`` of ``Dense_{i-1}``
    (numeric order: Dense_10 after Dense_9).
    """
    if not isinstance(params, dict) or not params or any(_dense_index(k) < 0 for k in params):
        keys = list(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params must be a dict of 'Dense_i' layers (a linear network), got {keys}")
    names = sorted(params, key=_dense_index)
    for name in names:
        if "bias" in params[name]:
            raise ValueError(f"params[{name!r}] has a bias; the paper's W_i are bias-free (use_bias=False)")
    return [jnp.asarray(params[name]["kernel"]).T for name in names]


def matrices_to_linear_params(matrices: Sequence[jax.Array]) -> dict:
    """Inverse of ``linear_params_to_matrices``: ``{'Dense_{i-1}': {'kernel': W_i^T}}``, the params of
    ``LinearNet`` (two matrices) or ``DeepLinearNet`` without biases. Checks that consecutive shapes chain (W_{i+1} has d_i columns)."""
    matrices = [jnp.asarray(W) for W in matrices]
    if not matrices:
        raise ValueError("matrices must be a non-empty sequence of 2-D arrays")
    for i, W in enumerate(matrices):
        if W.ndim != 2:
            raise ValueError(f"matrices[{i}] must be 2-D [d_{i + 1}, d_{i}], got shape {W.shape}")
        if i > 0 and W.shape[1] != matrices[i - 1].shape[0]:
            raise ValueError(
                f"matrices[{i}] has {W.shape[1]} columns but matrices[{i - 1}] has {matrices[i - 1].shape[0]} rows"
            )
    return {f"Dense_{i}": {"kernel": W.T} for i, W in enumerate(matrices)}
