"""Curvature of an objective f(params, batch): Hessian- and Gauss-Newton-vector products, dense
Hessians, stochastic traces and diagonals, Lanczos, extreme eigenpairs, spectral densities and the
saddle index, on one batch or, by microbatches, on a whole data set.

Notation: ``w`` is the flattened parameter vector (``m`` scalars), ``H = D^2_w f(w)`` the Hessian of
the objective, and for R(w) = L(Phi(w)) the Gauss-Newton matrix is ``G = J^T D2L J`` with
``J = DPhi(w)`` the ``[n k, m]`` Jacobian of the predictions and ``D2L = blockdiag(H_i) / n``
(``lsgeo.losses``). ``H = G + sum_i dL/dphi_i D^2 phi_i``; G is PSD when L is convex, H is
indefinite away from minima (a saddle), and its spectrum is the object of Ghorbani et al. (2019).

Modules (all names are re-exported here, ``from lsgeo import curvature; curvature.NAME``):

  products    ``hvp``, ``gnvp`` and the flat operators ``hessian_operator``, ``gauss_newton_operator``
  dense       ``hessian`` (small models)
  trace       ``hessian_trace`` (Hutchinson, Hutch++), ``hessian_diagonal`` (Hutchinson)
  krylov      ``lanczos``, ``tridiagonal_eigh``, ``ritz_pairs`` (early-stopping Lanczos)
  eigen       ``top_eigenvalues``, ``eigenpairs``, ``min_eigenvalue``
  density     ``slq_nodes``, ``spectral_density``, ``saddle_index``
  chunking    how many probes share one product (a memory estimate), the padded ``lax.map``

Every function takes ``params`` as any pytree (flax linen ``variables['params']``, an ``nnx.split``
state, a tuple of arrays) and the data ``batch`` as an explicit argument. Iterative methods act on flat
vectors ``[m]`` (``jax.flatten_util.ravel_pytree``) through a matrix-free operator, so any operator can be
passed to ``lanczos``. Costs are counted in Hessian-vector products (HVPs): one HVP by
forward-over-reverse costs about 2-3 gradient evaluations (Pearlmutter 1994).

Data sets larger than a batch: every function that evaluates ``f`` takes ``microbatch_size`` (and
``devices``). The batch (a pytree with a common leading axis n) is then cut into microbatches and each
product is the exact data-set product, the example-weighted mean of per-microbatch products computed
by a ``lax.scan`` (``lsgeo.microbatch``): memory is that of one microbatch whatever n is, and with
several devices the microbatches are sharded over them (one all-reduce per product). This is exact only
for objectives that are means over independent examples: BatchNorm must be in evaluation mode (bind the
running statistics, ``lsgeo.models.make_predict(model, model_state)``). Probes are vmapped through one
product only as far as a memory budget allows (``chunking.auto_chunk``: one at a time on a ResNet).

Compilation: the functions that run many products are ``jax.jit``-compiled with ``f`` static (hashed by
identity), with one product body per program (a ``lax.scan``/``while_loop`` body, nothing unrolled):
reuse the same ``f`` object between calls to reuse the compilation. They are pure and may be called
under an outer ``jit``/``vmap``. To keep compiled programs across Python processes (a second run of a
script or experiment then skips compilation, tens of seconds for a ResNet), enable JAX's persistent
compilation cache before the first computation::

    jax.config.update("jax_compilation_cache_dir", "/path/to/cache")      # e.g. ~/.cache/lsgeo/jax
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

References
----------
- B. Pearlmutter. Fast exact multiplication by the Hessian. Neural Computation, 1994.
- N. Schraudolph. Fast curvature matrix-vector products for second-order gradient descent. 2002.
- M. Hutchinson. A stochastic estimator of the trace of the influence matrix. 1990.
- R. Meyer, C. Musco, C. Musco, D. Woodruff. Hutch++: optimal stochastic trace estimation. SOSA 2021.
- C. Lanczos, 1950; G. Golub, C. Van Loan, Matrix Computations, Section 10.1 (4th ed.).
- S. Ubaru, J. Chen, Y. Saad. Fast estimation of tr(f(A)) via stochastic Lanczos quadrature. SIMAX 2017.
- B. Ghorbani, S. Krishnan, Y. Xiao. An investigation into neural net optimization via Hessian
  eigenvalue density. ICML 2019.
- Z. Yao, A. Gholami, K. Keutzer, M. Mahoney. PyHessian: neural networks through the lens of the
  Hessian. IEEE BigData 2020 (data-set-level Hessian tools; the comparison of benchmarks/bench_scale.py).
- Y. Dauphin et al. Identifying and attacking the saddle point problem in high-dimensional
  non-convex optimization. NeurIPS 2014 (the saddle index).
"""

from lsgeo.curvature.dense import hessian
from lsgeo.curvature.density import DEFAULT_SADDLE_RTOL, SADDLE_METHODS, saddle_index, slq_nodes, spectral_density
from lsgeo.curvature.eigen import WHICH, eigenpairs, min_eigenvalue, top_eigenvalues
from lsgeo.curvature.krylov import lanczos, ritz_pairs, tridiagonal_eigh
from lsgeo.curvature.products import gauss_newton_operator, gnvp, hessian_operator, hvp
from lsgeo.curvature.trace import TRACE_METHODS, hessian_diagonal, hessian_trace

__all__ = [
    "hvp",
    "gnvp",
    "hessian_operator",
    "gauss_newton_operator",
    "hessian",
    "hessian_trace",
    "hessian_diagonal",
    "lanczos",
    "ritz_pairs",
    "tridiagonal_eigh",
    "top_eigenvalues",
    "eigenpairs",
    "min_eigenvalue",
    "spectral_density",
    "slq_nodes",
    "saddle_index",
    "TRACE_METHODS",
    "WHICH",
    "SADDLE_METHODS",
    "DEFAULT_SADDLE_RTOL",
]
