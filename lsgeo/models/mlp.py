"""The fully connected ReLU network of Orvieto et al. (AISTATS 2023), Sections 3-5.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = MLP(widths=(8, 8), num_outputs=3)
  >>> variables = model.init(jax.random.key(0), jnp.ones((2, 5)))
  >>> sorted(variables["params"]), model.apply(variables, jnp.ones((2, 5))).shape
  (['Dense_0', 'Dense_1', 'Dense_2'], (2, 3))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn

from lsgeo.models.parts import INITS, activation_fn, check_batched, check_widths, kernel_init
from lsgeo.validation import check_choice, check_positive_int

__all__ = ["MLP"]


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
        widths = check_widths(self.widths)
        check_positive_int(self.num_outputs, "num_outputs")
        check_choice(self.init_scheme, "init_scheme", INITS)
        if self.skip_connections and len(set(widths)) > 1:
            raise ValueError(f"skip_connections=True needs equal hidden widths, got widths={widths!r}")
        self._act = activation_fn(self.activation)
        kinit = kernel_init(self.init_scheme)
        self.layers = [
            nn.Dense(w, use_bias=self.use_bias, kernel_init=kinit, name=f"Dense_{i}")
            for i, w in enumerate(widths + (self.num_outputs,))
        ]

    def __call__(self, x, train: bool = False):
        check_batched(x)
        h = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers[:-1]):
            z = self._act(layer(h))
            h = h + z if (self.skip_connections and i > 0) else z
        out = self.layers[-1](h)
        if self.squeeze_output and self.num_outputs == 1:
            out = out[:, 0]
        return out
