"""Flax (linen) models of Orvieto et al. (AISTATS 2023) and the helpers that turn them into predictors.

One concept per module:

- :mod:`~lsgeo.models.parts`      activations, kernel initialisers (``mean_field_init``), input checks;
- :mod:`~lsgeo.models.mlp`        ``MLP``: fully connected, ``standard`` / ``he`` / ``mean_field`` init,
                                   optional residual connections (Sections 3-5);
- :mod:`~lsgeo.models.linear`     ``DiagonalNet`` (Section 2.3), ``LinearNet`` / ``DeepLinearNet``
                                   (Sections 2.4, 3.1, 4) and the paper's matrices W_i;
- :mod:`~lsgeo.models.cnn`        ``ToyCNN`` and ``WideConvNet`` (Section 5, Figure 5);
- :mod:`~lsgeo.models.resnet`     ``ResNet18`` with BatchNorm, the CIFAR variant (Figure 6; He et al. 2016);
- :mod:`~lsgeo.models.contract`   the model contract: ``init_model``, ``make_predict``, ``make_train_apply``;
- :mod:`~lsgeo.models.batchnorm`  ``recompute_batch_stats``: exact BatchNorm statistics for new weights
                                   (SWA averages, points on paths between minima).

Every model is called as ``model(x, train=False)`` (``train`` only matters for BatchNorm). The
initialisation is chosen by the field ``init_scheme`` (a field cannot be called ``init``: that name
is ``flax.linen.Module.init``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jnp.ones((5, 3))
  >>> model = MLP(widths=(8, 8), num_outputs=10)
  >>> params, state = init_model(model, jax.random.key(0), x[:1])
  >>> predict = make_predict(model, state)          # eval mode: running averages, deterministic
  >>> predict(params, x).shape                      # [n, 10]
  (5, 10)
"""

from lsgeo.models.batchnorm import num_batchnorm_layers, recompute_batch_stats
from lsgeo.models.cnn import ToyCNN, WideConvNet
from lsgeo.models.contract import count_params, init_model, make_predict, make_train_apply
from lsgeo.models.linear import (
    DeepLinearNet,
    DiagonalNet,
    LinearNet,
    linear_params_to_matrices,
    matrices_to_linear_params,
)
from lsgeo.models.mlp import MLP
from lsgeo.models.parts import ACTIVATIONS, mean_field_init
from lsgeo.models.resnet import BasicBlock, ResNet18, resnet_depth

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
    "resnet_depth",
    "mean_field_init",
    "init_model",
    "make_predict",
    "make_train_apply",
    "count_params",
    "linear_params_to_matrices",
    "matrices_to_linear_params",
    "recompute_batch_stats",
    "num_batchnorm_layers",
]
