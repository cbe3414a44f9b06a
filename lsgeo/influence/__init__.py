"""Training-data attribution: influence scores with any damped inverse curvature, and their quality by retraining.

  scores    ``pairwise_scores`` ``[n_train, n_query]``, ``self_scores`` ``[n_train]``: ``I[i, q] = g_q^T (A + d I)^-1
            g_i`` (Kronfluence's sign and loss convention; A the mean over training examples)
  inverse   the inverses by name (``"ekfac"``, ``"kfac"``, ``"cg"``, ``"lowrank"``, ``"identity"``) or given, and the
            default damping ``0.1 tr(A) / m``
  gradients per-example loss gradients in chunks, the blocks a data set (or a data source) is read in
  factored  dense kernels scored from their layer inputs and output gradients (identity exactly, any inverse with
            ``query_rank``): the training gradients of dense layers never formed
  storage   scores in a resumable ``.npy`` memmap
  lds       the linear datamodeling score (Park et al. 2023): retraining on random subsets, one vmapped sweep

References: P. W. Koh, P. Liang, Understanding black-box predictions via influence functions, ICML 2017;
R. Grosse et al., Studying large language model generalization with influence functions, 2023 (Kronfluence);
A. Schioppa et al., Scaling up influence functions, AAAI 2022; S. M. Park et al., TRAK: attributing model
behavior at scale, ICML 2023; G. Pruthi et al., Estimating training data influence by tracing gradient
descent (TracIn), NeurIPS 2020.
"""

from lsgeo.influence.inverse import INVERSES, Preconditioner, default_damping, resolve_inverse
from lsgeo.influence.lds import (
    LDSResult,
    SubsetRetrains,
    lds,
    lds_from_predictions,
    masked_objective,
    predicted_changes,
    query_losses,
    retrain_on_subsets,
    subset_mask,
)
from lsgeo.influence.scores import DEFAULT_INVERSE, pairwise_scores, self_scores

__all__ = ["pairwise_scores", "self_scores", "INVERSES", "DEFAULT_INVERSE", "Preconditioner", "resolve_inverse",
           "default_damping",
           "lds", "LDSResult", "retrain_on_subsets", "SubsetRetrains", "query_losses", "predicted_changes",
           "lds_from_predictions", "masked_objective", "subset_mask"]
