"""The closed forms of lsgeo.theory under jax.jit, shared by the theory tests."""

import types

import jax

from lsgeo import theory

JITTED = [
    "lasso_weights",
    "lasso_objective",
    "diagonal_net_effective_risk",
    "diagonal_net_full_noise_risk",
    "linear_net_risk",
    "linear_net_effective_risk",
    "linear_net_full_noise_risk",
    "deep_linear_risk",
    "deep_linear_layerwise_risk",
    "relu_net_risk",
    "relu_net_layerwise_risk",
    "relu_net_layerwise_risk_exact",
    "relu_net_layerwise_remainder",
    "nuclear_norm_objective",
]

# The closed forms are compiled once per shape (eager execution compiles every primitive separately and
# costs several times more); argument checking on concrete values is tested eagerly at the end.
jitted = types.SimpleNamespace(**{name: jax.jit(getattr(theory, name)) for name in JITTED})
