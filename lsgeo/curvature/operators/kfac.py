"""KFAC: the Kronecker-factored approximation of the Gauss-Newton matrix / Fisher, as a curvature operator."""

from __future__ import annotations

import jax.numpy as jnp

from lsgeo.curvature.operators import kronecker_algebra as ka
from lsgeo.curvature.operators import kronecker_fit
from lsgeo.curvature.operators.base import operator_dataclass
from lsgeo.curvature.operators.kronecker_operator import KroneckerOperator, factor_eighs
from lsgeo.validation import is_concrete

__all__ = ["KFAC"]


@operator_dataclass
class KFAC(KroneckerOperator):
    r"""Kronecker-factored approximate curvature (Martens & Grosse 2015; Eschenhagen et al. 2023 for weight
    sharing): per layer ``F_layer ~ A (x) G``, block diagonal over layers.

    Layers are found in the computation (``lsgeo.curvature.operators.kronecker_layers``): each ``dot_general`` or
    ``conv_general_dilated`` whose kernel is a parameter leaf used once, for any pytree of parameters
    (flax linen / nnx, plain dicts). For example ``i`` with layer input ``a_i [T, c]`` at ``T`` shared
    positions (``T = 1`` for an MLP, the sequence for a transformer projection, the output positions of a
    convolution, whose input is cut into patches) and output gradients ``D_ir [T, f]``:

      expand (default):  ``A = 1/N sum_i 1/T sum_t a_it a_it^T``, ``G = 1/N sum_i sum_r s_r sum_t D_irt D_irt^T``
      reduce:            ``A = 1/N sum_i abar_i abar_i^T`` (``abar_i = mean_t a_it``),
                         ``G = 1/N sum_i sum_r s_r gbar_ir gbar_ir^T`` (``gbar_ir = sum_t D_irt``)

    where the rows ``r`` (signs ``s_r``) are those of ``fisher_type``: ``"type-2"`` the columns of ``B_i``
    with ``H_i = B_i B_i^T`` the output Hessian of example i's loss (KFAC of ``GaussNewton``); ``"mc"``
    ``num_samples`` gradients for labels drawn from the model (``/ sqrt(S)``; KFAC of ``MonteCarloFisher``,
    the same draws for the same ``key``); ``"empirical"`` the gradient for the true label (KFAC of
    ``EmpiricalFisher``); ``"forward-only"`` ``G = I`` (FOOF, Benzing 2022). With one example, ``T = 1``
    and type-2, ``A (x) G`` is exactly the layer's Gauss-Newton block.

    Conventions (curvlinops 3.0.1 ``KFACLinearOperator``: the same matrices to 1e-15 on an MLP and a CNN for
    type-2, empirical and forward-only, expand and reduce, both bias treatments, cross-entropy;
    scripts/peer_kfac_curvlinops.py; ``"mc"`` draws other labels):
      * normalisation: lsgeo's loss is a mean over examples, and ``A``, ``G`` are the means over the ``N``
        examples above, as curvlinops' for ``reduction="mean"`` with one loss term per example (lsgeo
        has no sequence-averaged losses: a per-token loss is a per-example loss over ``[T, k]`` outputs).
        The loss normalisations differ as for the exact Fisher (``EmpiricalFisher``): for the squared loss
        lsgeo's ``||phi - y||^2 / 2`` per example gives ``G``, torch's ``MSELoss`` ``2 G / C`` (type-2).
      * Kronecker order: lsgeo's block is ``A (x) G`` acting on ``ravel`` (row-major) of the kernel in its
        canonical layout ``[c, f]`` (inputs x outputs: flax's ``Dense`` kernel ``[d_in, d_out]`` as it
        is; a flax ``Conv`` kernel ``[kh, kw, c_in, c_out]`` as ``[(c_in, kh, kw), c_out]``). curvlinops
        writes ``A (x) G`` for column-stacked torch weights ``[d_out, d_in]`` (the same matrix: torch's
        ``W`` is the transpose of flax's kernel).
      * bias: with ``separate_weight_and_bias=False`` the bias is a ones column appended to ``a`` (the last
        row of ``A``), the layer's block acting on ``[kernel; bias]``; with ``True`` (the default, as
        curvlinops) the bias block is ``G`` (``1 (x) G``) and ``A`` has no ones column.
      * parameters in no dense or convolution layer (a LayerNorm scale, an embedding table, a bias not
        added to a layer's output; ``op.diagonal_parameters``): their block is the *exact diagonal* of
        the curvature of ``fisher_type`` (``1/N sum_i sum_r s_r (J_i^T b_ir)^2``). curvlinops raises on
        them instead. With ``fisher_type="forward-only"`` they are an error.
      * a kernel reached through a reshape or transpose, used twice (tied weights), with batch
        dimensions, or a grouped convolution: ValueError naming it.

    Beyond the products (``op @ v``, ``matvec``, ``to_dense``, ``blocks``, every estimator, ``solve``),
    the Kronecker structure gives exactly: ``inverse(damping)`` (an operator; exact damping by default,
    curvlinops' heuristic damping with ``heuristic_damping=True``), ``logdet(damping)``, ``trace()``,
    ``diagonal()``, ``eigenvalues()`` (all ``m``).

    Args:
      predict, loss, params, batch: as ``GaussNewton`` (``batch`` may be a data source, except for ``"mc"``).
      fisher_type: ``"type-2"``, ``"mc"``, ``"empirical"`` or ``"forward-only"``.
      kfac_approx: ``"expand"`` or ``"reduce"`` (the same for layers without weight sharing).
      num_samples: labels drawn per example (``"mc"`` only).
      key: PRNG key of the label draws (``"mc"`` only; ignored otherwise).
      separate_weight_and_bias: see above.
      microbatch_size, devices: the data plan of the fit (as every operator's products).

    Cost: the fit is one pass over the data: per example a forward and ``r`` backward passes (``r`` = the
    number of outputs for type-2, ``num_samples`` for mc, 1 for empirical, 0 for forward-only) plus
    ``O(T (c^2 + r f^2))`` per layer. A product costs ``O(c^2 f + c f^2)`` per layer and no data pass;
    ``inverse``, ``logdet``, ``eigenvalues`` one ``eigh`` of every factor.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lsgeo import curvature, losses
      >>> predict = lambda p, x: x @ p["w"]  # one linear layer and the squared loss: KFAC = Gauss-Newton
      >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
      >>> op = curvature.KFAC(predict, losses.squared_loss, {"w": jnp.zeros((2, 1))}, (x, jnp.zeros((2, 1))))
      >>> op.to_dense().tolist()
      [[1.0, 1.0], [1.0, 2.0]]
      >>> round(float(op.logdet(1.0)), 6) == round(float(jnp.linalg.slogdet(op.to_dense() + jnp.eye(2))[1]), 6)
      True
    """

    def _fit(self):
        return kronecker_fit.accumulate(self, kronecker_fit.factor_statistics, self.params)

    def _apply(self, leaves):
        sep = self.separate_weight_and_bias
        pb = [g if (layer.bias is not None and sep) else None for layer, g in zip(self.structure.layers,
                                                                                   self.factors["G"])]
        units = ka.kronecker_units(self.factors["A"], self.factors["G"], pb, self.factors["diag"])
        return ka.apply_units(self.structure, sep, units, leaves)

    def decomposition(self):
        """The eigendecompositions ``[((L_A, Q_A), (L_G, Q_G)), ...]`` of every layer's factors: computed once
        (outside tracing) and kept on the instance, shared by ``inverse(d)`` at every damping, ``logdet``,
        ``eigenvalues``."""
        cached = self.__dict__.get("_decomposition")
        if cached is not None:
            return cached
        eighs = factor_eighs(self.layout, self.factors["A"], self.factors["G"])
        if is_concrete(eighs):  # never a tracer: it would outlive its trace
            object.__setattr__(self, "_decomposition", eighs)  # a frozen dataclass; not a field, not a leaf
        return eighs

    def eigen_units(self, decomposition=None):
        eighs = self.decomposition() if decomposition is None else decomposition
        sep = self.separate_weight_and_bias
        return {"qa": tuple(ea[1] for ea, _ in eighs), "qg": tuple(eg[1] for _, eg in eighs),
                "lam": tuple(jnp.outer(ea[0], eg[0]) for ea, eg in eighs),
                "lam_bias": tuple(eg[0] if (layer.bias is not None and sep) else None
                                  for layer, (_, eg) in zip(self.structure.layers, eighs)),
                "diag": tuple(self.factors["diag"])}

    def _inverse_units(self, damping, heuristic, min_damping, decomposition=None):
        if not heuristic:
            return super()._inverse_units(damping, heuristic, min_damping, decomposition)
        eighs = self.decomposition() if decomposition is None else decomposition
        sep, pa, pg, pb = self.separate_weight_and_bias, [], [], []
        root = jnp.sqrt(damping)

        def matrix(q, values):  # q diag(values) q^T
            return (q * values) @ q.T

        for layer, ((la, qa), (lg, qg)) in zip(self.structure.layers, eighs):
            pi = jnp.sqrt(jnp.mean(lg) / jnp.mean(la))
            d_a, d_g = jnp.maximum(root / pi, min_damping), jnp.maximum(root * pi, min_damping)
            pa.append(matrix(qa, 1.0 / (la + d_a)))
            pg.append(matrix(qg, 1.0 / (lg + d_g)))
            pb.append(matrix(qg, 1.0 / (lg + jnp.maximum(damping, min_damping))) if (layer.bias is not None and sep)
                      else None)
        return ka.kronecker_units(pa, pg, pb, (1.0 / (d + damping) for d in self.factors["diag"]))
