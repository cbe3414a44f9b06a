"""lsgeo: loss-surface geometry in JAX.

Pure functions for the risk R(w) = L(Phi(w)), its noise-injected versions and the effective
regularised risk of Orvieto et al. (AISTATS 2023), curvature (HVPs, Lanczos, spectra), NTK traces,
sharpness and landscapes, plus optax transformations for noise injection.
"""

from lsgeo import losses, perturbation, risk, tree
from lsgeo.losses import accuracy, logistic_loss, output_hessians, softmax_cross_entropy, squared_loss
from lsgeo.risk import perturbed_risk, risk as risk_fn

__version__ = "0.1.0"
