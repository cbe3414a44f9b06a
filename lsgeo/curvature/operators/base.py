"""Curvature operators: a curvature matrix of a model on a data set, built once, applied to vectors.

A curvature operator ``A`` is a symmetric ``m x m`` matrix of the parameters (the Hessian, the
Gauss-Newton matrix, a Fisher) that is never formed: it holds the parameters and the data as pytree
leaves and, static, the functions and the data plan (an ``lsgeo.Objective``: how the batch is cut into
microbatches and laid out over the devices, decided and placed once, when the objective is built). It
passes through ``jax.jit`` like any pytree, the compile cache keyed by its functions, plan and shapes,
and every estimator of ``lsgeo.curvature`` takes one (``top_eigenvalues(op, key, k=5)``,
``hessian_trace(op, key)``, ``solve(op, b, damping=...)``), as in curvlinops, where an operator is built
once from (model, loss, params, data) and every algorithm takes any operator.

Every operator is a mean over examples, ``A = 1/n sum_i A_i``: with microbatches each product is the
example-weighted mean of per-microbatch products, exact whatever the cut or the device count.

Products (``v`` a pytree shaped like the parameters, ``u`` a flat vector in ``ravel_pytree`` order):

  ``op @ v``          a pytree shaped like ``v`` (compiled; the parameters' dtypes)
  ``op @ u``          ``[m] -> [m]``; ``op @ U`` with ``U [p, m]``: p products that share the primal pass
  ``op.matvec(u)``    the traceable flat product in ``op.dtype`` (what estimators call inside ``jit``)
  ``op.tree_matvec(v)`` the traceable pytree product, no ravel (keeps sharded parameters' layout)
  ``op.matmat(U)``    ``[p, m] -> [p, m]``: the model is linearised once per microbatch, the tangents vmapped
  ``op.to_dense()``   ``[m, m]`` (small models)
  ``op.size``, ``op.dtype`` (work dtype: at least float32), ``op.ravel(v)``, ``op.unravel(u)``

``blocks(op, groups)`` restricts an operator to the diagonal block of each parameter group: a block
acts on its group's leaves only (the other leaves of its vectors are ``None``) and differentiates with
respect to them only, so a block product costs less than a full one.

Cost of one product, per microbatch: Hessian, a forward-over-reverse pass (about 2-3 gradients);
Gauss-Newton and Fisher operators, a JVP and a VJP through ``predict`` (about 2 gradients). ``p``
products at once cost one primal pass plus ``p`` tangent passes (memory: ``p`` sets of tangents).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from lsgeo import dataplan, pytree_classes, validation
from lsgeo import groups as groups_lib
from lsgeo.objective import DataSetObjective

PyTree = Any

__all__ = ["CurvatureOperator", "OperatorType", "operator_dataclass", "blocks", "Products", "DEFAULT_VECTORS_PER_PASS"]

DEFAULT_VECTORS_PER_PASS = 256
_STATIC = {"static": True}


class OperatorType(type):
    """The metaclass of the operators: the one place where the two construction forms are told apart.

    ``Op(objective, params, ...)`` (first argument an ``Objective``/``Risk``) is the canonical form:
    ``Op._from_objective`` checks the parameters against the objective and places them. ``Op(f, params,
    batch, ...)`` / ``Op(predict, loss, params, batch, ...)`` is the positional form of DESIGN section 3:
    ``Op._from_functions`` builds the objective and calls the canonical form. Keyword-only calls (what
    ``jax.tree_util`` and ``dataclasses.replace`` do) set the fields as given."""

    def __call__(cls, *args, **kwargs):
        if not args:
            return super().__call__(**kwargs)
        if isinstance(args[0], DataSetObjective):
            return cls._from_objective(*args, **kwargs)
        return cls._from_functions(*args, **kwargs)

    def _make(cls, **fields):
        return super().__call__(**fields)


def operator_dataclass(cls):
    """``cls`` as a frozen dataclass registered as a pytree (``lsgeo.pytree_classes.register_dataclass``: fields with
    ``metadata={"static": True}`` are static, the others leaves): the decorator of every operator class."""
    return pytree_classes.register_dataclass(dataclasses.dataclass(frozen=True, repr=False)(cls))


class Products:
    """The product protocol of every linear operator on parameter vectors (a ``CurvatureOperator``, a
    ``KFAC.inverse``): a subclass defines ``tree_matvec``, ``matvec``, ``matmat`` and ``dtype``, and
    :meth:`_vector_space` (the operator whose ``variable_params``, ``size``, ``block`` and ``place`` define
    its vectors); this gives ``op @ v`` (compiled; a pytree, a flat ``[m]`` vector or ``[p, m]``) and
    :meth:`product` (the traceable map on one kind of vector, what ``solve`` calls for a preconditioner)."""

    def _vector_space(self):
        return self

    def product(self, *, flat: bool) -> Callable:
        """The traceable product on flat vectors (``matvec``) when ``flat``, else on pytrees (``tree_matvec``)."""
        return self.matvec if flat else self.tree_matvec

    @property
    def variable_params(self) -> PyTree:
        return self._vector_space().variable_params

    @property
    def size(self) -> int:
        return self._vector_space().size

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @dataplan.user_errors
    def __matmul__(self, v):
        space = self._vector_space()
        if _is_tree_like(v, space.variable_params):
            return _apply_tree(self, *space.place(v))
        _check_not_a_tree(space, v)
        u = v if isinstance(v, jax.Array) else np.asarray(v)
        m = space.size
        if u.ndim in (1, 2) and u.shape[-1] == m and jnp.issubdtype(u.dtype, jnp.floating):
            return _apply_flat(self, *space.place(jnp.asarray(u)))
        raise ValueError(
            f"v must be a pytree shaped like the operator's parameters, a flat vector [m={m}] or a matrix "
            f"[p, m={m}] of floats; got {type(v).__name__} of shape {np.shape(v)}"
        )


@operator_dataclass
class CurvatureOperator(Products, metaclass=OperatorType):
    """Base class of the curvature operators: a frozen dataclass registered as a pytree (the objective's data
    and the parameters are leaves; ``block`` and the subclasses' settings static). A subclass defines
    ``_linear_map(params, mb)`` (the operator on one microbatch as a linear function of a tangent shaped like
    the variable parameters), ``_from_functions`` (its positional form) and, if it needs more than an
    ``Objective``, ``_objective_type``."""

    objective: DataSetObjective
    params: PyTree
    block: tuple | None = dataclasses.field(default=None, metadata=_STATIC, kw_only=True)

    _objective_type = DataSetObjective

    @classmethod
    def _from_objective(cls, objective, params, **settings):
        if not isinstance(objective, cls._objective_type):
            raise ValueError(f"{cls.__name__} is built from a {cls._objective_type.__name__}, got "
                             f"{type(objective).__name__}" + (" (build a Risk(predict, loss, data, ...))"
                                                              if cls._objective_type.__name__ == "Risk" else ""))
        objective.check(params)
        (params,) = objective.place(params)
        return cls._make(objective=objective, params=params, **settings)

    @classmethod
    def _from_functions(cls, *args, **kwargs):
        raise TypeError(f"{cls.__name__} is built from an objective: {cls.__name__}(objective, params)")

    # -- fields and copies -------------------------------------------------------------------------
    @property
    def data(self) -> PyTree:
        """The objective's (laid-out) data; None for a data source."""
        return self.objective.data

    @property
    def plan(self):
        """The objective's data plan (``lsgeo.dataplan``)."""
        return self.objective.plan

    def replace(self, **changes) -> CurvatureOperator:
        """A copy with fields replaced: ``params=`` (another point, same data plan: no re-validation of the
        data), ``data=`` (the objective rebuilt on new data with the same microbatch size and devices, its
        checks run again), ``objective=``, ``block=``."""
        if "params" in changes:
            new = changes["params"]
            validation.check_same_structure(self.params, new, "params")
            validation.check_float_params(new)
        if "data" in changes:
            objective = self.objective.replace(data=changes.pop("data"))
            changes["objective"] = objective
            objective.check(changes.get("params", self.params))
        return dataclasses.replace(self, **changes)

    def _without_data(self):
        """This operator with no data: an operand of ``objective.map``, whose data travels separately."""
        return dataclasses.replace(self, objective=self.objective.without_data())

    def __repr__(self):
        block = "" if self.block is None else f", block of {len(self.block)} leaves"
        return f"{type(self).__name__}(m={self.size}, dtype={np.dtype(self.dtype).name}, {self.plan.describe()}{block})"

    # -- the vector space --------------------------------------------------------------------------
    def _variable(self, params):
        """``(pv, merge)``: the parameters the operator acts on (all, or a block's leaves with ``None``
        elsewhere) and ``merge(pv) -> params`` that puts them back into the full tree."""
        if self.block is None:
            return params, lambda pv: pv
        leaves, treedef = jax.tree_util.tree_flatten(params)
        chosen = set(self.block)
        pv = jax.tree_util.tree_unflatten(treedef, [a if i in chosen else None for i, a in enumerate(leaves)])

        def merge(pv):
            full = list(leaves)
            for i, a in zip(self.block, jax.tree_util.tree_leaves(pv)):
                full[i] = a
            return jax.tree_util.tree_unflatten(treedef, full)

        return pv, merge

    @property
    def variable_params(self) -> PyTree:
        """The parameters this operator acts on (a block's leaves, ``None`` elsewhere)."""
        return self._variable(self.params)[0]

    def _flat(self):
        flat, unravel = ravel_pytree(self.variable_params)
        return flat, unravel

    @property
    def size(self) -> int:
        """``m``, the number of scalars the operator acts on."""
        return int(sum(np.size(a) for a in jax.tree_util.tree_leaves(self.variable_params)))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def param_dtype(self):
        """The dtype of ``ravel_pytree`` of the parameters (products are evaluated in the parameters' dtypes)."""
        return jnp.result_type(*jax.tree_util.tree_leaves(self.variable_params))

    @property
    def dtype(self):
        """The work dtype of flat vectors and of the estimators: at least float32 (bfloat16/float16
        parameters get float32 reductions and eigensolvers)."""
        return jnp.promote_types(self.param_dtype, jnp.float32)

    def ravel(self, v: PyTree) -> jax.Array:
        """A pytree shaped like the (variable) parameters as a flat ``[m]`` vector in ``self.dtype``."""
        return ravel_pytree(v)[0].astype(self.dtype)

    def unravel(self, u: jax.Array) -> PyTree:
        """A flat ``[m]`` vector as a pytree shaped like the (variable) parameters, in their dtypes."""
        flat, unravel = self._flat()
        return unravel(jnp.asarray(u).astype(flat.dtype))

    # -- products ----------------------------------------------------------------------------------
    def _linear_map(self, params, mb) -> Callable:
        raise NotImplementedError

    def _value_fn(self) -> Callable:
        return self.objective.f

    def _on_microbatch(self, vectors, mb, *, batched: bool):
        flat, unravel = self._flat()
        lin = self._linear_map(self.params, mb)

        def apply(u):
            out = lin(unravel(u.astype(flat.dtype)))
            return ravel_pytree(out)[0].astype(u.dtype)

        return jax.vmap(apply)(vectors) if batched else apply(vectors)

    def _on_microbatch_tree(self, v, mb):
        lin = self._linear_map(self.params, mb)
        pv = self.variable_params
        out = lin(jax.tree_util.tree_map(lambda a, p: a.astype(jnp.result_type(p)), v, pv))
        return jax.tree_util.tree_map(lambda o, a: o.astype(a.dtype), out, v)

    def _reduce(self, vectors, *, batched: bool):
        operands = (self._without_data(), vectors)
        return self.objective.map(lambda ops, mb: ops[0]._on_microbatch(ops[1], mb, batched=batched), operands)

    def tree_matvec(self, v: PyTree) -> PyTree:
        """``A v`` for a pytree ``v`` shaped like the (variable) parameters (traceable). No ravel: each leaf
        enters the product in its parameter's dtype and comes back in its own dtype, and under ``jit`` it
        keeps the layout XLA propagates from the parameters (sharded parameters give sharded products;
        what ``lanczos`` with ``shardings`` runs on)."""
        return self.objective.map(lambda ops, mb: ops[0]._on_microbatch_tree(ops[1], mb), (self._without_data(), v))

    def matvec(self, u: jax.Array) -> jax.Array:
        """``A u`` for a flat vector ``u [m]`` (traceable; computed in ``self.dtype``)."""
        return self._reduce(jnp.asarray(u, self.dtype), batched=False)

    def matmat(self, us: jax.Array) -> jax.Array:
        """``[A u_1, ..., A u_p]`` for ``us [p, m]`` (traceable): one linearisation per microbatch, the p
        tangents vmapped through it."""
        return self._reduce(jnp.asarray(us, self.dtype), batched=True)

    def place(self, *trees):
        """``trees`` put where the operator's computation runs (replicated over the plan's devices; unchanged
        with one device or under tracing): vectors and keys passed to compiled estimators."""
        return self.objective.place(*trees)

    @dataplan.user_errors
    def to_dense(self, *, vectors_per_pass: int = DEFAULT_VECTORS_PER_PASS) -> jax.Array:
        """The dense matrix ``[m, m]`` (row ``i`` is ``A e_i``), ``vectors_per_pass`` rows at a time.
        Small models only: ``m`` products and ``O(m^2)`` memory."""
        validation.check_positive_int(vectors_per_pass, "vectors_per_pass")
        return _to_dense(self, vectors_per_pass)

    def activation_bytes(self) -> int:
        """Bytes of the intermediates of one evaluation on one microbatch (the memory one more vector of a
        batched product costs, up to a factor of about 2 for the tangents)."""
        return dataplan.activation_bytes(self._value_fn(), self.params, self.objective.microbatch_struct())


def _check_not_a_tree(op, v) -> None:
    """A pytree that is not shaped like the operator's vectors is a ValueError saying what it should be."""
    if isinstance(v, (jax.Array, np.ndarray)) or np.isscalar(v):
        return
    leaves = jax.tree_util.tree_leaves(v)
    if not leaves or isinstance(v, (list, tuple)) and all(np.isscalar(a) for a in leaves):
        return
    full = jax.tree_util.tree_structure(op.params)
    if op.block is not None and jax.tree_util.tree_structure(v) == full:
        raise ValueError(
            f"op is a block of {len(op.block)} of the {full.num_leaves} parameter leaves: apply it to a vector with "
            f"None outside its group (shaped like op.variable_params) or to a flat vector [m={op.size}], not to the "
            f"full parameter tree"
        )
    raise ValueError(
        f"v must be a pytree shaped like the operator's parameters ({jax.tree_util.tree_structure(op.variable_params)})"
        f" or a flat vector [m={op.size}]; got a {type(v).__name__} of {len(leaves)} leaves with structure "
        f"{jax.tree_util.tree_structure(v)} (a tuple of leaves is not a parameter tree: rebuild it with "
        f"jax.tree.unflatten(jax.tree.structure(params), leaves))"
    )


def _is_tree_like(v, pv) -> bool:
    if jax.tree_util.tree_structure(v) != jax.tree_util.tree_structure(pv):
        return False
    return all(np.shape(a) == np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(pv)))


@jax.jit
def _apply_tree(op, v):
    v = jax.tree_util.tree_map(lambda a: a.astype(op.dtype), v)  # what op.ravel did: the work dtype
    return jax.tree_util.tree_map(lambda o, p: o.astype(jnp.result_type(p)), op.tree_matvec(v), op.variable_params)


@jax.jit
def _apply_flat(op, u):
    out = op.matvec(u) if u.ndim == 1 else op.matmat(u)
    return out.astype(jnp.promote_types(u.dtype, op.dtype))


@functools.partial(jax.jit, static_argnums=(1,))
def _to_dense(op, vectors_per_pass):
    m = op.size
    eye = jnp.eye(m, dtype=op.dtype)
    return dataplan.chunked_map(op.matmat, eye, vectors_per_pass, batched=True)


def blocks(op: CurvatureOperator, groups: groups_lib.GroupSpec = None) -> dict[str, CurvatureOperator]:
    """The diagonal block of ``op`` for each parameter group: ``{name: operator}``.

    Block ``g`` is ``A_gg = P_g A P_g^T``, the rows and columns of the group's parameters (groups as in
    ``lsgeo.groups``: by default one per top-level module, ``"leaf"`` one per array, or a callable on the
    leaf path). It acts on vectors shaped like the parameters with ``None`` outside the group (flat:
    the group's ``m_g`` scalars) and differentiates with respect to the group only, so its product is
    cheaper than a full one. Every estimator takes a block: per-block spectra (Zhang et al. 2024, *Why
    Transformers Need Adam: A Hessian Perspective*) are ``{g: spectral_density(b, key) for g, b in
    blocks(op).items()}``.

    Example:
      >>> import jax.numpy as jnp
      >>> from lsgeo import curvature
      >>> f = lambda w, b: jnp.sum(w["a"] ** 2 * w["b"][0] ** 2) * b.mean()
      >>> op = curvature.Hessian(f, {"a": jnp.ones(2), "b": jnp.ones(1)}, jnp.ones(3))
      >>> {g: b.to_dense().tolist() for g, b in curvature.blocks(op).items()}
      {'a': [[2.0, 0.0], [0.0, 2.0]], 'b': [[4.0]]}
    """
    if not isinstance(op, CurvatureOperator):
        raise TypeError(f"op must be a curvature operator (Hessian, GaussNewton, ...), got {type(op).__name__}")
    if op.block is not None:
        raise ValueError("op is already a block; take blocks of the full operator")
    ids, names = groups_lib.group_ids(op.params, groups)
    leaf_ids = jax.tree_util.tree_leaves(ids)
    return {
        name: op.replace(block=tuple(i for i, g in enumerate(leaf_ids) if g == gid)) for gid, name in enumerate(names)
    }
