"""The damped inverse curvature of influence scores: ``b -> (A + damping I)^-1 b``, chosen by name or given.

``inverse=`` of :func:`lsgeo.influence.pairwise_scores` / ``self_scores``:

  ``"cg"``        conjugate gradients (``lsgeo.curvature.solve``) on ``curvature`` (default: the Gauss-Newton
                  matrix of the training data, ``GaussNewton(predict, loss, params, train_data)``); exact to
                  ``tol``. Cost per vector: one CG run (tens to hundreds of products over the training data).
  ``"lowrank"``   ``(U diag(lambda) U^T + d I)^-1`` from the top ``rank`` Lanczos eigenpairs of ``curvature``
                  (``eigenpairs`` + ``low_rank_inverse``; Schioppa et al. 2022): ``rank + 20`` products once,
                  then ``O(rank m)`` per vector; exact on the top eigenspace, ``1/d`` on its complement.
  ``"identity"``  no curvature: scores are gradient dot products (TracIn at one checkpoint; Kronfluence's
                  ``identity`` strategy). ``damping`` is not used (must be None).
  ``"kfac"``, ``"ekfac"``  ``lsgeo.curvature.KFAC`` / ``EKFAC`` (type-2) of the training data, inverted exactly
                  through their eigenbases by their own ``inverse(damping)``: one fit (one data pass, two for
                  EKFAC), then ``O(sum_l c_l^2 f_l + c_l f_l^2)`` per vector.
  an object with ``inverse(damping)``   its inverse (a function of a pytree, or an object with ``@`` /
                  ``matvec``), e.g. a KFAC operator built with other options.
  a ``CurvatureOperator``  (``Hessian``, ``GaussNewton``, a Fisher, a block) solved by CG, as ``"cg"``.
  a callable      the damped inverse itself, ``b -> (A + d I)^-1 b`` on pytrees; ``damping`` must be None.

Damping: given, or ``0.1 x`` the mean eigenvalue ``tr(A) / m`` (Kronfluence's ``damping=None`` heuristic, Grosse
et al. 2023), ``tr(A)`` estimated by Hutch++ with ``num_probes`` products (``lsgeo.curvature.hessian_trace``).

References: J. Martens, Deep learning via Hessian-free optimization, ICML 2010 (CG); A. Schioppa, P. Zablotskaia,
D. Vilar, A. Sokolov, Scaling up influence functions, AAAI 2022 (Arnoldi / Lanczos low rank); R. Grosse et al.,
Studying large language model generalization with influence functions, 2023 (EK-FAC, the damping heuristic).
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

from lsgeo import curvature

__all__ = ["INVERSES", "Preconditioner", "resolve_inverse", "default_damping"]

INVERSES = ("cg", "lowrank", "identity", "kfac", "ekfac")


@dataclasses.dataclass(frozen=True)
class Preconditioner:
    """``fn(operands, b) -> ((A + d I)^-1 b, ok)`` with ``fn`` static (hashable) and ``operands`` a pytree (traced),
    and the damping used (None for ``identity`` and given maps)."""

    fn: Callable
    operands: Any
    damping: float | None
    name: str

    def apply(self, vectors, vectors_per_pass: int | None = None):
        """The inverse applied to every row of ``vectors`` (a pytree with a leading axis); ValueError where CG
        did not converge."""
        n = jax.tree_util.tree_leaves(vectors)[0].shape[0]
        chunk = n if vectors_per_pass is None else min(int(vectors_per_pass), n)
        out, ok = _apply_rows(self.fn, self.operands, vectors, chunk)
        check_converged(ok, self.name)
        return out


def check_converged(ok, name: str) -> None:
    ok = np.asarray(ok)
    if not ok.all():
        raise ValueError(f"inverse={name!r}: the conjugate-gradient solve did not converge for {int((~ok).sum())} of "
                         f"{ok.size} vectors (raise damping, maxiter or tol)")


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply_rows(fn, operands, vectors, chunk):
    return jax.lax.map(lambda b: fn(operands, b), vectors, batch_size=chunk)


def _identity(operands, b):
    return b, jnp.asarray(True)


@dataclasses.dataclass(frozen=True)
class _CG:
    tol: float
    maxiter: int | None

    def __call__(self, operands, b):
        op, damping = operands
        x, info = curvature.solve(op, b, damping=damping, tol=self.tol, maxiter=self.maxiter, return_info=True)
        return x, info.converged


def _low_rank(operands, b):
    values, vectors, damping = operands
    return curvature.low_rank_inverse(values, vectors, damping)(b), jnp.asarray(True)


def apply_linear_map(lin, b):
    """``lin`` applied to the pytree ``b``: a function, an object with ``@`` on pytrees, or ``matvec`` on flat."""
    if callable(lin):
        return lin(b)
    if hasattr(lin, "__matmul__"):
        return lin @ b
    if hasattr(lin, "matvec"):
        flat, unravel = ravel_pytree(b)
        return unravel(lin.matvec(flat))
    raise ValueError(f"inverse(damping) must return a function, an object with @ or matvec; got {type(lin).__name__}")


@dataclasses.dataclass(frozen=True)
class _LinearMap:
    static: Any = None  # the map, when it is not a pytree of arrays (a closure: its arrays become constants)

    def __call__(self, operands, b):
        return apply_linear_map(operands if self.static is None else self.static, b), jnp.asarray(True)


@dataclasses.dataclass(frozen=True)
class _GivenMap:
    fn: Callable

    def __call__(self, operands, b):
        return self.fn(b), jnp.asarray(True)


def default_damping(op, key, num_probes: int = 30) -> float:
    """``0.1 tr(A) / m``, Kronfluence's default (``damping=None``): 0.1 x the mean eigenvalue of ``A``, with
    ``tr(A)`` exact for a Kronecker operator (``op.trace()``), else by Hutch++ (exact once ``num_probes // 3 >= m``)."""
    if isinstance(op, curvature.KroneckerOperator):
        return 0.1 * float(op.trace()) / op.size
    trace = curvature.hessian_trace(op, key, num_probes=max(3, int(num_probes)), method="hutch++")
    return 0.1 * float(trace) / op.size


def _is_pytree_of_arrays(obj) -> bool:
    try:
        leaves = jax.tree_util.tree_leaves(obj)
    except Exception:  # noqa: BLE001 - an object jax cannot flatten is static
        return False
    return bool(leaves) and all(isinstance(a, (jax.Array, np.ndarray)) for a in leaves) and not leaves == [obj]


def _kronecker(name, predict, loss, params, train_data, microbatch_size):
    cls = {"kfac": curvature.KFAC, "ekfac": curvature.EKFAC}[name]
    return cls(predict, loss, params, train_data, microbatch_size=microbatch_size)


def resolve_inverse(inverse, predict, loss, params, train_data, *, damping=None, curvature_op=None, key=None,
                    rank: int = 32, num_iters: int | None = None, tol: float = 1e-6, maxiter: int | None = None,
                    num_probes: int = 30, microbatch_size: int | None = None) -> Preconditioner:
    """The :class:`Preconditioner` of ``inverse`` (module docstring) on the training data."""
    key = jax.random.key(0) if key is None else key
    if isinstance(inverse, str):
        if inverse not in INVERSES:
            raise ValueError(f"inverse must be one of {INVERSES}, a curvature operator, an object with an "
                             f"inverse(damping) method or a callable; got {inverse!r}")
        if inverse == "identity":
            if damping is not None:
                raise ValueError("damping must be None for inverse='identity' (gradient dot products use no curvature)")
            return Preconditioner(_identity, None, None, "identity")
        if inverse in ("kfac", "ekfac"):
            return _object(_kronecker(inverse, predict, loss, params, train_data, microbatch_size), damping, key,
                           num_probes, inverse)
        op = curvature_op
        if op is None:
            op = curvature.GaussNewton(predict, loss, params, train_data, microbatch_size=microbatch_size)
        elif not isinstance(op, curvature.CurvatureOperator):
            raise ValueError(f"curvature must be a curvature operator (GaussNewton, Hessian, ...), got "
                             f"{type(op).__name__}")
        d = _damping(damping, op, key, num_probes)
        if inverse == "cg":
            return Preconditioner(_CG(float(tol), maxiter), (op, d), d, "cg")
        if not 1 <= int(rank) <= op.size:
            raise ValueError(f"rank must be in [1, m={op.size}] for inverse='lowrank', got {rank}")
        if not d > 0:
            raise ValueError(f"damping must be > 0 for inverse='lowrank', got {d}")
        values, vectors = curvature.eigenpairs(op, jax.random.fold_in(key, 1), k=int(rank), num_iters=num_iters)
        return Preconditioner(_low_rank, (values, vectors, jnp.asarray(d, values.dtype)), d, "lowrank")
    if hasattr(inverse, "inverse"):
        return _object(inverse, damping, key, num_probes, type(inverse).__name__)
    if isinstance(inverse, curvature.CurvatureOperator):
        d = _damping(damping, inverse, key, num_probes)
        return Preconditioner(_CG(float(tol), maxiter), (inverse, d), d, "cg")
    if callable(inverse):
        if damping is not None:
            raise ValueError("damping must be None when inverse is a callable (it is the damped inverse itself)")
        return Preconditioner(_GivenMap(inverse), None, None, getattr(inverse, "__name__", "callable"))
    raise ValueError(f"inverse must be one of {INVERSES}, a curvature operator, an object with an inverse(damping) "
                     f"method or a callable; got {type(inverse).__name__}")


def _damping(damping, op, key, num_probes) -> float:
    if damping is None:
        return default_damping(op, key, num_probes)
    if not np.isfinite(float(damping)) or float(damping) < 0:
        raise ValueError(f"damping must be a finite number >= 0 or None, got {damping!r}")
    return float(damping)


def _object(obj, damping, key, num_probes, name) -> Preconditioner:
    """The inverse of an object with ``inverse(damping)``, built once here (outside any trace): a map that is a
    pytree of arrays (e.g. ``jax.tree_util.Partial``, a registered operator) travels as an argument of the compiled
    programs; any other map is static."""
    if damping is None:
        if not isinstance(obj, curvature.CurvatureOperator):
            raise ValueError(f"damping=None needs the mean eigenvalue of the curvature; {type(obj).__name__} is not a "
                             f"curvature operator: give damping")
        damping = default_damping(obj, key, num_probes)
    damping = float(damping)
    lin = obj.inverse(damping)
    if _is_pytree_of_arrays(lin):
        return Preconditioner(_LinearMap(), lin, damping, name)
    return Preconditioner(_LinearMap(lin), None, damping, name)
