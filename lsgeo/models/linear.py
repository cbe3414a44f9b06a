"""The linear networks of Orvieto et al. (AISTATS 2023): diagonal (Section 2.3), two-layer (Sections
2.4, 3.1) and deep (Section 4), and the conversion between flax kernels and the paper's matrices.

Paper notation vs flax: the paper writes W_i in R^{d_i x d_{i-1}} and Phi = W_M ... W_1 X^T, while a
flax ``Dense`` kernel is ``[d_in, d_out] = W_i^T`` and a flax model maps ``x [n, d_0]`` to
``X W_1^T ... W_M^T = Phi^T``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> params = LinearNet(d1=4, d_out=2).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  >>> [W.shape for W in linear_params_to_matrices(params)]
  [(4, 3), (2, 4)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsgeo.models.parts import check_batched, check_widths, kernel_init
from lsgeo.validation import check_choice, check_positive_int

__all__ = ["DiagonalNet", "LinearNet", "DeepLinearNet", "linear_params_to_matrices", "matrices_to_linear_params"]

PyTree = Any


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
            initf = lambda key, shape: jnp.full(shape, self.init_scale, jnp.float32)
        else:
            initf = lambda key, shape: self.init_scale * jax.random.normal(key, shape)
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
        widths = check_widths(self.widths)
        check_positive_int(self.d_out, "d_out")
        kinit = kernel_init(self.init_scheme)
        check_batched(x)
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
        kinit = kernel_init(self.init_scheme)
        check_batched(x)
        h = x.reshape(x.shape[0], -1)
        h = nn.Dense(self.d1, use_bias=self.use_bias, kernel_init=kinit, name="Dense_0")(h)
        return nn.Dense(self.d_out, use_bias=self.use_bias, kernel_init=kinit, name="Dense_1")(h)


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
    ``LinearNet`` (two matrices) or ``DeepLinearNet`` without biases. Checks that consecutive shapes
    chain (W_{i+1} has d_i columns)."""
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
