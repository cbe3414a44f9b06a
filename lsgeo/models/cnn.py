"""The convolutional networks without normalisation of Orvieto et al. (AISTATS 2023), Section 5, Figure 5.

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jnp.ones((2, 8, 8, 1))
  >>> model = ToyCNN(num_classes=3)
  >>> model.apply(model.init(jax.random.key(0), x), x).shape
  (2, 3)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from lsgeo.models.parts import check_images, check_widths, kernel_init
from lsgeo.validation import check_positive_int

__all__ = ["ToyCNN", "WideConvNet"]


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
        check_images(x)
        kinit = kernel_init(self.init_scheme)
        for i in range(2):
            x = nn.Conv(self.channels, (3, 3), padding="SAME", kernel_init=kinit, name=f"Conv_{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        for i, w in enumerate(check_widths(self.head_widths, "head_widths")):
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
        check_images(x)
        check_positive_int(self.width, "width")
        kinit = kernel_init(self.init_scheme)
        for i, s in enumerate(self.strides):
            x = nn.Conv(self.width, (3, 3), strides=(s, s), padding="SAME", kernel_init=kinit, name=f"Conv_{i}")(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=kinit, name="Dense_0")(x)
