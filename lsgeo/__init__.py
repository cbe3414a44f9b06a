"""lsgeo: loss-surface geometry in JAX.

Pure functions for the risk R(w) = L(Phi(w)), its noise-injected versions and the effective
regularised risk of Orvieto et al. (AISTATS 2023) (``lsgeo.risk``, ``lsgeo.theory``), curvature
(``lsgeo.curvature``: Hessian, Gauss-Newton and Fisher operators, their spectra, traces, blocks and inverse
products), NTK traces (``lsgeo.ntk``), sharpness and landscapes
(``lsgeo.sharpness``, ``lsgeo.landscape``), optax transformations for noise injection
(``lsgeo.optim``), a lax.scan training engine (``lsgeo.train``), training-data attribution
(``lsgeo.influence``), flax models and data sets.

The most used functions are re-exported here; ``lsgeo.risk`` stays the module (R itself is
``lsgeo.risk.risk``).
"""

from lsgeo import (
    curvature,
    data,
    groups,
    influence,
    landscape,
    losses,
    microbatch,
    models,
    ntk,
    optim,
    per_example,
    perturbation,
    risk,
    sharpness,
    streams,
    theory,
    train,
    validation,
)
from lsgeo.curvature import (
    gnvp,
    hessian,
    hessian_diagonal,
    hessian_trace,
    hvp,
    lanczos,
    saddle_index,
    spectral_density,
    top_eigenvalues,
)
from lsgeo.landscape import bezier, interpolate, random_direction, slice_1d, slice_2d
from lsgeo.losses import accuracy, logistic_loss, softmax_cross_entropy, squared_loss
from lsgeo.ntk import empirical_ntk, ntk_diagonal_blocks, ntk_trace
from lsgeo.optim import clean_params, noise_injection
from lsgeo.risk import (
    effective_risk,
    gauss_newton_diagonal,
    gauss_newton_trace,
    gauss_newton_trace_by_layer,
    perturbed_risk,
)
from lsgeo.sharpness import alpha_scale, average_sharpness, epsilon_sharpness

__version__ = "0.1.0"
