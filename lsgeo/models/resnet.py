"""ResNet with BatchNorm for 32x32 inputs (He et al. 2016, the CIFAR variant), Section 5, Figure 6.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = ResNet18(num_classes=3, width=2, stage_sizes=(1, 1))
  >>> variables = model.init(jax.random.key(0), jnp.ones((2, 8, 8, 1)))
  >>> sorted(variables), resnet_depth((2, 2, 2, 2)), resnet_depth((1, 1, 1, 1))
  (['batch_stats', 'params'], 18, 10)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from lsgeo.models.parts import check_images
from lsgeo.validation import check_positive_int

__all__ = ["BasicBlock", "ResNet18", "resnet_depth"]


def resnet_depth(stage_sizes: Sequence[int]) -> int:
    """Weighted layers of a ``ResNet18`` with ``stage_sizes`` basic blocks: stem + 2 per block + head
    (18 for (2, 2, 2, 2); the 1x1 shortcut convs do not count, as in He et al.)."""
    return 2 + 2 * sum(stage_sizes)


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
    offsets included, running statistics not). A small ``width`` (e.g. 4) and fewer blocks per stage
    (``stage_sizes``; ``resnet_depth`` gives the depth, 10 for one block per stage) give CPU-sized models.

    Top-level modules: ``stem_conv``, ``stem_bn``, ``stage{1..4}_block{1,2}``, ``head``.
    Variables: ``params`` and ``batch_stats``. Input NHWC, outputs ``[n, num_classes]``.
    """

    num_classes: int = 10
    width: int = 64
    stage_sizes: Sequence[int] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        check_positive_int(self.width, "width")
        x = nn.Conv(
            self.width, (3, 3), padding=1, use_bias=False, kernel_init=nn.initializers.he_normal(), name="stem_conv"
        )(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="stem_bn")(x)
        x = nn.relu(x)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for b in range(num_blocks):
                strides = 2 if (stage > 0 and b == 0) else 1
                x = BasicBlock(self.width * 2**stage, strides, name=f"stage{stage + 1}_block{b + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)
