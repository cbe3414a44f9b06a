"""The shared part of the Kronecker-factored operators ``KFAC`` and ``EKFAC``: construction, products
from the fitted factors (no data pass), and what the eigenbasis gives exactly: damped inverses,
log-determinants, traces, diagonals and all eigenvalues.

A Kronecker operator is a ``CurvatureOperator`` (every estimator, ``blocks``, ``to_dense``, ``solve`` take
it) whose factors are fitted once, when it is built, over the data plan of ``microbatch_size`` /
``devices`` / a data source exactly like the exact operators' products (``kronecker_fit.accumulate``).
It is block diagonal: one block per layer (``kronecker_layers``), one per separate bias, and a diagonal
for every parameter in no layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from lsgeo import dataplan, validation
from lsgeo.curvature.operators import kronecker_algebra as ka
from lsgeo.curvature.operators import kronecker_layers as kl
from lsgeo.curvature.operators.kronecker_sharding import kronecker_layout
from lsgeo.curvature.operators.base import Products, operator_dataclass
from lsgeo.curvature.operators.fisher import label_sampler
from lsgeo.curvature.operators.gauss_newton import PredictorOperator
from lsgeo.objective import Risk
from lsgeo.per_example import single_example

__all__ = ["KroneckerOperator", "KroneckerInverse", "FISHER_TYPES", "KFAC_APPROXIMATIONS", "factor_eighs"]

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROXIMATIONS = ("expand", "reduce")


def _find_structure(predict, params, x_struct):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    x_leaves, x_def = jax.tree_util.tree_flatten(x_struct)
    single = single_example(predict)

    def single_leaves(ls, xl):
        return single(jax.tree_util.tree_unflatten(treedef, ls), jax.tree_util.tree_unflatten(x_def, xl))

    structure = kl.find_layers(single_leaves, leaves, x_leaves, names)
    output_shape = tuple(jax.eval_shape(predict, params, x_struct).shape[1:])
    return structure, output_shape, names


def _static(default):
    return dataclasses.field(default=default, metadata={"static": True}, kw_only=True)


@operator_dataclass
class KroneckerOperator(PredictorOperator):
    """Base of ``KFAC`` and ``EKFAC``; see ``KFAC`` for the arguments and conventions. Built as
    ``KFAC(risk, params, *, fisher_type=..., ...)`` from an ``lsgeo.Risk`` or positionally as
    ``KFAC(predict, loss, params, batch, *, ..., microbatch_size=None, devices=None)``; the factors are fitted
    once, then the operator keeps no data. Parameters sharded over a mesh (``NamedSharding``) get factors,
    eigenbases and products laid out along the same axes (``kronecker_sharding``; ``op.layout``)."""

    key: Any = None
    factors: Any = None
    fisher_type: str = _static("type-2")
    kfac_approx: str = _static("expand")
    num_samples: int = _static(1)
    separate_weight_and_bias: bool = _static(True)
    structure: Any = _static(None)
    output_shape: tuple | None = _static(None)
    names: tuple | None = _static(None)
    layout: Any = _static(None)

    @classmethod
    def _from_functions(cls, predict, loss, params, batch, *, microbatch_size: int | None = None,
                        devices: Sequence | None = None, **settings):
        risk = Risk(predict, loss, batch, microbatch_size=microbatch_size, devices=devices, data_name="batch")
        return cls(risk, params, **settings)

    @classmethod
    def _from_objective(cls, risk, params, *, fisher_type: str = "type-2", kfac_approx: str = "expand",
                        num_samples: int = 1, key=None, separate_weight_and_bias: bool = True):
        if not isinstance(risk, Risk):
            raise ValueError(f"{cls.__name__} is built from a Risk (predict and loss), got {type(risk).__name__}")
        validation.check_choice(fisher_type, "fisher_type", FISHER_TYPES)
        validation.check_choice(kfac_approx, "kfac_approx", KFAC_APPROXIMATIONS)
        validation.check_positive_int(num_samples, "num_samples")
        if fisher_type != "mc" and num_samples != 1:
            raise ValueError(f"num_samples is the number of sampled labels of fisher_type='mc'; got num_samples="
                             f"{num_samples} with fisher_type={fisher_type!r}")
        risk.check(params)
        if fisher_type == "mc":
            validation.check_key(key, "key")
            label_sampler(risk.loss)
            key = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
            if isinstance(risk.plan, dataplan.StreamPlan) or isinstance(risk.data, dataplan.Layout):
                raise ValueError("fisher_type='mc' takes an in-memory batch (its draws are keyed by the example's "
                                 "index), not a data source")
            x, _ = risk.data
            n = validation.check_batch(x, "batch x", common_axis=True)
            risk = risk.replace(data=(x, jnp.arange(n, dtype=np.int32)))  # the labels are drawn, not read
        else:
            key = None
        (params,) = risk.place(params)
        x_struct = risk.microbatch_struct()[0]
        structure, output_shape, names = _find_structure(risk.predict, params, x_struct)
        if fisher_type == "forward-only" and structure.unmatched:
            raise ValueError(
                f"fisher_type='forward-only' has no gradient covariance, so the parameters in no dense or "
                f"convolution layer ({', '.join(names[j] for j in structure.unmatched)}) get no curvature; use "
                f"another fisher_type")
        layout = kronecker_layout(structure, params, bool(separate_weight_and_bias))
        op = cls._make(objective=risk, params=params, key=key, fisher_type=fisher_type, kfac_approx=kfac_approx,
                       num_samples=int(num_samples), separate_weight_and_bias=bool(separate_weight_and_bias),
                       structure=structure, output_shape=output_shape, names=tuple(names), layout=layout)
        return dataclasses.replace(op, factors=op._fit(), objective=risk.without_data())

    def _fit(self):
        raise NotImplementedError

    def without_data(self):
        """This operator with no data (what the fit passes to ``objective.map``)."""
        return self._without_data()

    def replace(self, **changes):
        """A copy with ``block`` replaced (how ``blocks`` restricts it). The factors are fitted when the
        operator is built: other parameters or data need a new operator."""
        if set(changes) - {"block"}:
            raise ValueError(f"{type(self).__name__} is fitted when it is built: build a new one for other "
                             f"{', '.join(sorted(set(changes) - {'block'}))}")
        return dataclasses.replace(self, **changes)

    def __repr__(self):
        block = "" if self.block is None else f", block of {len(self.block)} leaves"
        return (f"{type(self).__name__}(m={self.size}, {len(self.structure.layers)} Kronecker layers, "
                f"{len(self.structure.unmatched)} diagonal leaves, fisher_type={self.fisher_type!r}, "
                f"kfac_approx={self.kfac_approx!r}{block})")

    @property
    def diagonal_parameters(self) -> tuple:
        """The paths of the parameters in no dense or convolution layer: their block is the exact diagonal
        of the curvature of ``fisher_type`` (a LayerNorm scale, an embedding table, a lone bias)."""
        return tuple(self.names[j] for j in self.structure.unmatched)

    # -- the vector space: full leaf lists <-> vectors of the (block) variable parameters -------------
    def _full_leaves(self, v):
        leaves = jax.tree_util.tree_leaves(self.params)
        given = jax.tree_util.tree_leaves(v)
        if self.block is None:
            return list(given)
        full = [jnp.zeros(np.shape(p), given[0].dtype if given else jnp.result_type(p)) for p in leaves]
        for i, a in zip(self.block, given):
            full[i] = a
        return full

    def _placed(self, full):
        """A full leaf list laid out like the parameters (sharded parameters; unchanged otherwise)."""
        return full if self.layout is None else self.layout.place_leaves(full)

    def _to_variable(self, full, like):
        treedef = jax.tree_util.tree_structure(self.params)
        chosen = range(len(full)) if self.block is None else self.block
        kept = [full[i].astype(a.dtype) for i, a in zip(chosen, jax.tree_util.tree_leaves(like))]
        out = [None] * len(full)
        for i, a in zip(chosen, kept):
            out[i] = a
        return jax.tree_util.tree_unflatten(treedef, out)

    # -- products (no data pass) ---------------------------------------------------------------------
    def _apply(self, leaves):
        return ka.apply_units(self.structure, self.separate_weight_and_bias, self.eigen_units(), leaves)

    def tree_matvec(self, v):
        return self._to_variable(self._placed(self._apply(self._full_leaves(v))), v)

    def matvec(self, u):
        flat, unravel = self._flat()
        u = jnp.asarray(u, self.dtype)
        out = self.tree_matvec(unravel(u.astype(flat.dtype)))
        return ravel_pytree(out)[0].astype(u.dtype)

    def matmat(self, us):
        return jax.vmap(self.matvec)(jnp.asarray(us, self.dtype))

    def activation_bytes(self) -> int:
        """Bytes of one product's intermediates (one layer matrix at a time)."""
        sizes = [(layer.c + 1) * layer.f for layer in self.structure.layers] or [1]
        return int(max(sizes) * 2 * np.dtype(self.dtype).itemsize)

    def factor_bytes(self) -> int:
        """Bytes held by the fitted factors (compare with the parameters' bytes)."""
        return int(sum(np.size(a) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(self.factors)))

    # -- the eigenbasis ------------------------------------------------------------------------------
    def eigen_units(self, decomposition=None):
        """The operator in its eigenbasis (``kronecker_algebra``): per layer ``Q_A, Q_G`` and the eigenvalues
        ``L [c', f]`` (separate bias: ``[f]``), and the diagonal of the leaves in no layer; from
        ``decomposition`` (what :meth:`decomposition` returns) where given."""
        raise NotImplementedError

    def decomposition(self):
        """What the eigenbasis is computed from, once per operator (KFAC: its factors' eigendecompositions,
        kept on the instance so that ``inverse(d)`` at several dampings shares them); None where the
        eigenbasis is stored (EKFAC)."""
        return None

    def _unit_leaves(self):
        """Per unit (in ``all_eigenvalues`` order) the leaves it acts on."""
        sep = self.separate_weight_and_bias
        units = [(layer.kernel,) if (layer.bias is None or sep) else (layer.kernel, layer.bias)
                 for layer in self.structure.layers]
        units += [(layer.bias,) for layer in self.structure.layers if layer.bias is not None and sep]
        return units + [(j,) for j in self.structure.unmatched]

    def _eigenvalue_mask(self):
        """Which eigenvalues (in ``all_eigenvalues`` order) belong to this operator (a block: whole units only)."""
        if self.block is None:
            return None
        chosen, mask = set(self.block), []
        shapes = [np.shape(p) for p in jax.tree_util.tree_leaves(self.params)]
        for leaves in self._unit_leaves():
            inside = [j in chosen for j in leaves]
            if any(inside) and not all(inside):
                raise ValueError("this block splits a layer whose kernel and bias share one Kronecker factor "
                                 "(separate_weight_and_bias=False); take blocks by layer or use the full operator")
            mask.append(np.full(sum(int(np.prod(shapes[j])) for j in leaves), all(inside)))
        return np.concatenate(mask)

    def _eigenvalues_of(self, units):
        lam = ka.all_eigenvalues(units)
        mask = self._eigenvalue_mask()
        return lam if mask is None else lam[np.flatnonzero(mask)]

    def eigenvalues(self) -> jax.Array:
        """All ``m`` eigenvalues, descending (exact for the Kronecker structure: products of the factors'
        eigenvalues for KFAC, the corrections for EKFAC)."""
        return jnp.sort(self._eigenvalues_of(self.eigen_units()))[::-1]

    def logdet(self, damping=0.0) -> jax.Array:
        """``log det(K + damping I)`` from the eigenvalues (``-inf`` or nan when ``K + damping I`` is singular
        or indefinite)."""
        return jnp.sum(jnp.log(self._eigenvalues_of(self.eigen_units()) + damping))

    def trace(self) -> jax.Array:
        """``tr K``."""
        return jnp.sum(self._eigenvalues_of(self.eigen_units()))

    def diagonal(self):
        """``diag K`` as a pytree shaped like the (variable) parameters."""
        template = jax.tree_util.tree_leaves(self.params)
        full = ka.unit_diagonal(self.structure, self.separate_weight_and_bias, self.eigen_units(), template)
        return self._to_variable(self._placed(full), self.variable_params)

    def _inverse_units(self, damping, heuristic, min_damping, decomposition=None):
        return ka.map_eigenvalues(self.eigen_units(decomposition), lambda lam: 1.0 / (lam + damping))

    def inverse(self, damping, *, heuristic_damping: bool = False, min_damping: float = 1e-8) -> KroneckerInverse:
        """The damped inverse as an operator (``inv @ v``, ``inv.matvec(u)``, ``inv(v)``, ``inv.to_dense()``),
        its eigendecomposition computed once.

        Exact damping (the default): ``(K + damping I)^-1``, per block ``Q (L + damping)^-1 Q^T`` (curvlinops'
        ``use_exact_damping=True``). ``heuristic_damping=True`` (KFAC only; curvlinops'
        ``use_heuristic_damping=True``, Martens & Grosse 2015, Section 6.3): ``(A + d_A I)^-1 (x)
        (G + d_G I)^-1`` with ``d_A = max(sqrt(damping) / pi, min_damping)``, ``d_G = max(sqrt(damping) pi,
        min_damping)``, ``pi = sqrt((tr G / f) / (tr A / c'))``; a separate bias gets ``(G + max(damping,
        min_damping) I)^-1``. A diagonal leaf gets ``(d + damping)^-1`` in both modes.
        """
        if callable(damping):
            raise ValueError(f"damping must be a finite number >= 0, got the callable {damping!r}")
        validation.check_sigma(damping, "damping")  # a real scalar, finite, >= 0 (not a bool, a string, None)
        if heuristic_damping and type(self).__name__ != "KFAC":
            raise ValueError("heuristic_damping applies to KFAC's two factors; EKFAC's inverse is exact")
        self._eigenvalue_mask()  # a block must hold whole units
        return KroneckerInverse(self, _inverse_units(self, damping, heuristic_damping, min_damping))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _inverse_units_jit(op, decomposition, damping, heuristic, min_damping):
    units = op._inverse_units(damping, heuristic, min_damping, decomposition)
    return units if op.layout is None else op.layout.place_units(units, op.structure.unmatched)


def _inverse_units(op, damping, heuristic, min_damping):
    return _inverse_units_jit(op, op.decomposition(), jnp.asarray(damping, op.dtype), bool(heuristic),
                              float(min_damping))


@jax.tree_util.register_pytree_node_class
class KroneckerInverse(Products):
    """A Kronecker operator's damped inverse (``KFAC.inverse``, ``EKFAC.inverse``): ``inv @ v`` (a pytree
    shaped like the operator's parameters, a flat ``[m]`` vector or ``[p, m]``), ``inv.matvec(u)`` and
    ``inv.tree_matvec(v)`` (traceable), ``inv(v)`` (= ``inv @ v``), ``inv.to_dense()``. A preconditioner.

    Its units (``kronecker_algebra``) are computed once, when it is built: a product is two matrix products
    per layer for KFAC's heuristic damping (Kronecker units), four for exact damping (the eigenbasis)."""

    def __init__(self, op, units):
        self.op, self.units = op, units

    def tree_flatten(self):
        return (self.op, self.units), None

    @classmethod
    def tree_unflatten(cls, meta, data):
        return cls(*data)

    def _vector_space(self):
        return self.op

    @property
    def dtype(self):
        return self.op.dtype

    def tree_matvec(self, v):
        op = self.op
        full = ka.apply_units(op.structure, op.separate_weight_and_bias, self.units, op._full_leaves(v))
        return op._to_variable(op._placed(full), v)

    def matvec(self, u):
        flat, unravel = self.op._flat()
        u = jnp.asarray(u, self.dtype)
        return ravel_pytree(self.tree_matvec(unravel(u.astype(flat.dtype))))[0].astype(u.dtype)

    def matmat(self, us):
        return jax.vmap(self.matvec)(jnp.asarray(us, self.dtype))

    def __call__(self, v):
        return self @ v

    def to_dense(self) -> jax.Array:
        return self @ jnp.eye(self.size, dtype=self.dtype)


@functools.partial(jax.jit, static_argnums=(0,))
def factor_eighs(layout, a_factors, g_factors):
    """``[((lambda_A, Q_A), (lambda_G, Q_G)), ...]``: every layer's factors' eigendecompositions, laid out by
    ``layout`` (a ``KroneckerLayout`` or None)."""
    eighs = [(jnp.linalg.eigh(a), jnp.linalg.eigh(g)) for a, g in zip(a_factors, g_factors)]
    return eighs if layout is None else layout.place_decomposition(eighs)
