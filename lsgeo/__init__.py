"""lsgeo: loss-surface geometry in JAX.

Pure functions for the risk R(w) = L(Phi(w)), its noise-injected versions and the effective
regularised risk of Orvieto et al. (AISTATS 2023) (``lsgeo.risk``, ``lsgeo.theory``), curvature
(``lsgeo.curvature``: Hessian, Gauss-Newton and Fisher operators, their spectra, traces, blocks and inverse
products), NTK traces (``lsgeo.ntk``), sharpness and landscapes
(``lsgeo.sharpness``, ``lsgeo.landscape``), optax transformations for noise injection
(``lsgeo.optim``), a lax.scan training engine (``lsgeo.train``), training-data attribution
(``lsgeo.influence``), flax models and data sets.

The way in is a data-set objective, built once: ``lsgeo.Objective(f, data, microbatch_size=..., devices=...)``
or ``lsgeo.Risk(predict, loss, data, ...)``; operators are built from it (``lsgeo.Hessian(objective, params)``,
``lsgeo.GaussNewton(risk, params)``) and every estimator takes an operator (``lsgeo.top_eigenvalues(op, key)``,
``lsgeo.trace(op, key)``). ``lsgeo.hessian`` is the dense ``[m, m]`` matrix of a small model, ``lsgeo.Hessian``
the operator. The most used functions are re-exported here (``__all__``); ``lsgeo.risk`` stays the module (R
itself is ``lsgeo.risk.risk``).
"""

from lsgeo import (
    curvature,
    data,
    groups,
    influence,
    landscape,
    dataplan,
    losses,
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
    CurvatureOperator,
    EmpiricalFisher,
    GaussNewton,
    Hessian,
    MonteCarloFisher,
    blocks,
    diagonal,
    eigenpairs,
    gnvp,
    hessian,
    hessian_diagonal,
    hessian_trace,
    hvp,
    lanczos,
    saddle_index,
    solve,
    spectral_density,
    top_eigenvalues,
    trace,
)
from lsgeo.landscape import bezier, interpolate, random_direction, slice_1d, slice_2d
from lsgeo.losses import accuracy, logistic_loss, softmax_cross_entropy, squared_loss
from lsgeo.objective import Objective, Risk
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

__all__ = [
    # the data-set objective (the way in)
    "Objective",
    "Risk",
    # curvature operators and the estimators that take them
    "CurvatureOperator",
    "Hessian",
    "GaussNewton",
    "EmpiricalFisher",
    "MonteCarloFisher",
    "blocks",
    "top_eigenvalues",
    "eigenpairs",
    "trace",
    "diagonal",
    "spectral_density",
    "saddle_index",
    "solve",
    "lanczos",
    # function forms of DESIGN section 3
    "hvp",
    "gnvp",
    "hessian",
    "hessian_trace",
    "hessian_diagonal",
    "effective_risk",
    "perturbed_risk",
    "gauss_newton_trace",
    "gauss_newton_trace_by_layer",
    "gauss_newton_diagonal",
    "empirical_ntk",
    "ntk_diagonal_blocks",
    "ntk_trace",
    "epsilon_sharpness",
    "average_sharpness",
    "alpha_scale",
    "random_direction",
    "slice_1d",
    "slice_2d",
    "interpolate",
    "bezier",
    "noise_injection",
    "clean_params",
    "squared_loss",
    "logistic_loss",
    "softmax_cross_entropy",
    "accuracy",
    # modules
    "curvature",
    "dataplan",
    "data",
    "groups",
    "landscape",
    "losses",
    "models",
    "ntk",
    "optim",
    "per_example",
    "perturbation",
    "risk",
    "sharpness",
    "streams",
    "theory",
    "train",
    "validation",
]
