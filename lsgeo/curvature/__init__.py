"""Curvature of a model on a batch or a data set: curvature operators (the Hessian, the Gauss-Newton
matrix, the empirical and Monte Carlo Fisher, their diagonal blocks) and the estimators that take any of
them: extreme eigenpairs (Lanczos), traces and diagonals (Hutchinson, Hutch++, XTrace, XDiag), spectral
densities (SLQ), the saddle index, dense matrices, inverse products (CG, low rank).

Notation: ``w`` is the flattened parameter vector (``m`` scalars), ``H = D^2_w f(w)`` the Hessian of
the objective, and for R(w) = L(Phi(w)) the Gauss-Newton matrix is ``G = J^T D2L J`` with
``J = DPhi(w)`` the ``[n k, m]`` Jacobian of the predictions and ``D2L = blockdiag(H_i) / n``
(``lsgeo.losses``). ``H = G + sum_i dL/dphi_i D^2 phi_i``; G is PSD when L is convex, H is
indefinite away from minima (a saddle), and its spectrum is the object of Ghorbani et al. (2019).

The operator layer (curvlinops' design): build an operator once, from the model and the data,

    op = curvature.Hessian(f, params, batch, microbatch_size=512)          # or GaussNewton(predict, loss, ...),
    curvature.top_eigenvalues(op, key, k=5)                                  # EmpiricalFisher, MonteCarloFisher
    curvature.hessian_trace(op, key, method="xtrace", return_stderr=True)
    {g: curvature.spectral_density(b, key) for g, b in curvature.blocks(op).items()}   # per-block spectra
    curvature.solve(curvature.GaussNewton(...), g, damping=1e-3)              # (G + lambda I)^-1 g

The data plan (``lsgeo.dataplan``) is validated, cut and placed once, when the operator is built; an
operator is a pytree (parameters and data as leaves, functions and plan static), so it passes through
``jit``. The function forms ``top_eigenvalues(f, params, batch, key, ...)`` etc. build a ``Hessian`` and
return what they always returned.

``hessian(f, params, batch)`` is the dense ``[m, m]`` Hessian of a small model (a function);
``Hessian(objective, params)`` / ``Hessian(f, params, batch)`` is the operator (a pytree, never formed).

Modules (all names are re-exported here, ``from lsgeo import curvature; curvature.NAME``):

  operators         ``CurvatureOperator`` (products, flat forms, ``to_dense``), ``blocks``, ``Hessian``,
                    ``GaussNewton``, ``EmpiricalFisher``, ``MonteCarloFisher``, ``register_label_sampler``
  operator          ``resolve``: the two call forms of an estimator (operator, or f, params, batch)
  kfac, ekfac       ``KFAC``, ``EKFAC`` (Kronecker-factored; ``inverse``, ``logdet``, ``eigenvalues`` exact and cheap);
                    kronecker_layers (layers found in the jaxpr), kronecker_fit (factors over the data plan),
                    kronecker_algebra (the eigenbasis), kronecker_sharding (factors of sharded parameters laid out
                    with them), kronecker_operator (the shared base, ``KroneckerInverse``); all under ``operators/``
  products          ``hvp``, ``gnvp``, ``hessian_operator``, ``gauss_newton_operator`` (one-call forms)
  dense             ``hessian`` (small models)
  trace             ``hessian_trace`` (Hutchinson, Hutch++, XTrace), ``hessian_diagonal`` (Hutchinson, XDiag)
  krylov            ``lanczos``, ``tridiagonal_eigh``, ``ritz_pairs`` (early-stopping Lanczos), ``ritz_vectors``,
                    ``rounding_rtol``; krylov_space: ``vector_shardings``, ``KrylovSpace`` (flat or pytree
                    vectors; sharded or host-memory bases); locking: ``checked_ritz_run`` (repeated eigenvalues)
  eigen             ``top_eigenvalues``, ``eigenpairs``, ``min_eigenvalue``
  density           ``slq_nodes``, ``block_slq_nodes`` (all blocks, one program), ``spectral_density``,
                    ``saddle_index``
  solve             ``solve`` (CG), ``low_rank_inverse``
  chunking          vectors per pass (the one memory budget), the balanced ``lax.map``
  track             ``top_eigenvalue_tracker``, ``trace_tracker``: measurements along a training run
                    (``lsgeo.train.train(..., measure=...)``), imported as ``curvature.track``

Iterative methods act on flat vectors ``[m]`` (``jax.flatten_util.ravel_pytree`` order) in the operator's
work dtype (at least float32); Lanczos (``top_eigenvalues``, ``eigenpairs``, ``slq_nodes``) acts on pytrees
shaped like the parameters instead when they are sharded (``NamedSharding``), its basis keeping their
sharding, or optionally in host memory (``basis_memory="host"``). Costs are counted in products: a Hessian product by forward-over-reverse
costs about 2-3 gradient evaluations (Pearlmutter 1994), a Gauss-Newton or Fisher product about 2.

Data sets larger than a batch: ``microbatch_size`` (and ``devices``) on an operator (or a function form)
cuts the batch into microbatches; each product is the exact data-set product, the example-weighted mean
of per-microbatch products computed by a ``lax.scan``: memory is that of one microbatch whatever n is,
and with several devices the microbatches are sharded over them (each device holds its share of the
data; one all-reduce per product). This is exact only for objectives that are means over independent
examples: BatchNorm must be in evaluation mode (bind the running statistics,
``lsgeo.models.make_predict(model, model_state)``); a batch-coupled objective is detected and refused.
Vectors go through one product together only as far as a memory budget allows
(``chunking.auto_vectors_per_pass``: one at a time on a ResNet).

Compilation: estimators are ``jax.jit``-compiled with the operator as an argument (its functions are
static, hashed by identity), one product body per program (a ``lax.scan``/``while_loop`` body, nothing
unrolled): reuse the same ``f`` object between calls to reuse the compilation. They are pure and may be
called under an outer ``jit``/``vmap``. To keep compiled programs across Python processes, enable JAX's
persistent compilation cache before the first computation::

    jax.config.update("jax_compilation_cache_dir", "/path/to/cache")      # e.g. ~/.cache/lsgeo/jax
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

References
----------
- B. Pearlmutter. Fast exact multiplication by the Hessian. Neural Computation, 1994.
- N. Schraudolph. Fast curvature matrix-vector products for second-order gradient descent. 2002.
- J. Martens. New insights and perspectives on the natural gradient method. JMLR 2020.
- M. Hutchinson. A stochastic estimator of the trace of the influence matrix. 1990.
- R. Meyer, C. Musco, C. Musco, D. Woodruff. Hutch++: optimal stochastic trace estimation. SOSA 2021.
- E. Epperly, J. Tropp, R. Webber. XTrace: making the most of every sample in stochastic trace
  estimation. SIMAX 2024.
- C. Lanczos, 1950; G. Golub, C. Van Loan, Matrix Computations, Section 10.1 (4th ed.).
- S. Ubaru, J. Chen, Y. Saad. Fast estimation of tr(f(A)) via stochastic Lanczos quadrature. SIMAX 2017.
- B. Ghorbani, S. Krishnan, Y. Xiao. An investigation into neural net optimization via Hessian
  eigenvalue density. ICML 2019.
- Y. Zhang et al. Why Transformers Need Adam: A Hessian Perspective. NeurIPS 2024 (per-block spectra).
- P. W. Koh, P. Liang. Understanding black-box predictions via influence functions. ICML 2017.
- Z. Yao, A. Gholami, K. Keutzer, M. Mahoney. PyHessian: neural networks through the lens of the
  Hessian. IEEE BigData 2020 (data-set-level Hessian tools; the comparison of benchmarks/bench_scale.py).
- F. Dangel, R. Eschenhagen, et al. curvlinops: linear operators for curvature matrices (the design).
- Y. Dauphin et al. Identifying and attacking the saddle point problem in high-dimensional
  non-convex optimization. NeurIPS 2014 (the saddle index).
"""

from lsgeo.curvature import track
from lsgeo.curvature.dense import hessian
from lsgeo.curvature.density import (
    DEFAULT_SADDLE_RTOL,
    SADDLE_METHODS,
    block_slq_nodes,
    default_saddle_rtol,
    saddle_index,
    slq_nodes,
    spectral_density,
)
from lsgeo.curvature.operators.ekfac import EKFAC
from lsgeo.curvature.eigen import WHICH, eigenpairs, min_eigenvalue, top_eigenvalues
from lsgeo.curvature.operators.kfac import KFAC
from lsgeo.curvature.operators.kronecker_operator import KroneckerInverse, KroneckerOperator
from lsgeo.curvature.krylov import BASIS_MEMORY, lanczos, ritz_pairs, ritz_vectors, tridiagonal_eigh, vector_shardings
from lsgeo.curvature.operators import (
    CurvatureOperator,
    EmpiricalFisher,
    GaussNewton,
    Hessian,
    MonteCarloFisher,
    blocks,
    register_label_sampler,
)
from lsgeo.curvature.products import gauss_newton_operator, gnvp, hessian_operator, hvp
from lsgeo.curvature.solve import SolveDidNotConverge, SolveInfo, low_rank_inverse, solve
from lsgeo.curvature.trace_estimators import DIAGONAL_METHODS, TRACE_METHODS, hessian_diagonal, hessian_trace
from lsgeo.objective import user_errors as _user_errors

# Estimators on any operator are named for what they estimate: ``trace(op, key)``, ``diagonal(op, key)`` (the same
# functions as ``hessian_trace`` / ``hessian_diagonal``, whose names stay for the Hessian function form). A data
# source whose batches change between passes is reported as the ValueError it is (``dataplan.SourceChanged``).
top_eigenvalues, eigenpairs, min_eigenvalue = map(_user_errors, (top_eigenvalues, eigenpairs, min_eigenvalue))
spectral_density, saddle_index, slq_nodes = map(_user_errors, (spectral_density, saddle_index, slq_nodes))
hessian_trace, hessian_diagonal, solve = map(_user_errors, (hessian_trace, hessian_diagonal, solve))
trace = hessian_trace
diagonal = hessian_diagonal

__all__ = [
    "CurvatureOperator",
    "Hessian",
    "GaussNewton",
    "EmpiricalFisher",
    "MonteCarloFisher",
    "register_label_sampler",
    "KFAC",
    "EKFAC",
    "KroneckerInverse",
    "KroneckerOperator",
    "blocks",
    "solve",
    "SolveInfo",
    "SolveDidNotConverge",
    "low_rank_inverse",
    "hvp",
    "gnvp",
    "hessian_operator",
    "gauss_newton_operator",
    "hessian",
    "trace",
    "diagonal",
    "hessian_trace",
    "hessian_diagonal",
    "lanczos",
    "ritz_pairs",
    "ritz_vectors",
    "vector_shardings",
    "tridiagonal_eigh",
    "top_eigenvalues",
    "eigenpairs",
    "min_eigenvalue",
    "spectral_density",
    "slq_nodes",
    "block_slq_nodes",
    "saddle_index",
    "default_saddle_rtol",
    "TRACE_METHODS",
    "DIAGONAL_METHODS",
    "WHICH",
    "SADDLE_METHODS",
    "DEFAULT_SADDLE_RTOL",
    "BASIS_MEMORY",
]
