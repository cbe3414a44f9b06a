"""Where the Kronecker factors of sharded parameters live: laid out along the kernel's sharded axes.

A layer's kernel, in its canonical layout ``W_mat [c', f]`` (``kronecker_layers.to_matrix``: the input dims,
then the output dims), is sharded over mesh axes ``(s_c, s_f)`` when the parameters are (tensor parallelism:
``NamedSharding(mesh, P(None, "model"))`` on a dense kernel ``[d_in, d_out]`` gives ``(None, "model")``).
Everything of that layer is then laid out along the same axes, never gathered onto every device:

  ``A``, ``Q_A``, a Kronecker unit ``P_A`` ``[c', c']``:  ``P(s_c, None)`` (rows split like the kernel's rows)
  ``G``, ``Q_G``, ``P_G``, a bias unit ``P_b`` ``[f, f]``:  ``P(s_f, None)``
  eigenvalues / corrections ``L [c', f]``:                ``P(s_c, s_f)`` (like the kernel's matrix)
  ``lambda_A [c']``, ``lambda_G``, a separate bias's ``l_b [f]``: ``P(s_c)``, ``P(s_f)``
  the diagonal of a leaf in no layer:                     the leaf's own sharding

and every product ``op @ v``, ``inverse(d) @ v`` returns its leaves sharded like the parameters. These are
sharding constraints (``jax.lax.with_sharding_constraint``) inside the compiled fit, eigendecomposition,
inverse and products; XLA inserts the communication. ``eigh`` itself has no distributed algorithm in XLA:
each factor is gathered while its eigendecomposition is computed, and its eigenvectors are stored split.

A group of kernel dims merged into one matrix axis (a convolution's ``(c_in, kh, kw)``) carries the sharding
of its first dim when the others are unsharded; an axis whose sharding does not survive the merge, or whose
length (``c' = c + 1`` with a joint bias) is not a multiple of its mesh axes' size, is replicated. No layout
(``None``) when no parameter is partitioned (one device, data parallelism) or when the operator is built
inside ``jit`` (tracers carry no sharding: the caller's ``jit`` decides).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lsgeo.curvature.krylov_space import vector_shardings

__all__ = ["KroneckerLayout", "kronecker_layout"]

_ROWS_C = ("A", "qa", "pa")  # [c', c'] per layer
_ROWS_F = ("G", "qg", "pg", "pb")  # [f, f] per layer
_MATRIX = ("lam", "kernel")  # [c', f] per layer
_VECTOR_F = ("lam_bias", "bias")  # [f] per layer


@dataclasses.dataclass(frozen=True)
class KroneckerLayout:
    """The layout of a Kronecker operator's arrays (static, hashable): the mesh, per layer the mesh axes
    ``(s_c, s_f)`` of its matrix, per parameter leaf its ``NamedSharding``."""

    mesh: jax.sharding.Mesh
    axes: tuple  # per layer (s_c, s_f), each None, a mesh axis name or a tuple of names
    leaves: tuple  # per parameter leaf a NamedSharding

    def _put(self, x, *spec):
        if x is None:
            return None
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*spec)))

    def rows_c(self, i, x):
        return self._put(x, self.axes[i][0], None)

    def rows_f(self, i, x):
        return self._put(x, self.axes[i][1], None)

    def vector_c(self, i, x):
        return self._put(x, self.axes[i][0])

    def vector_f(self, i, x):
        return self._put(x, self.axes[i][1])

    def matrix(self, i, x):
        return self._put(x, *self.axes[i])

    def place_leaves(self, leaves, indices=None):
        """Leaves (a list, ``None`` entries kept) sharded like the parameters ``indices`` (default: all)."""
        indices = range(len(leaves)) if indices is None else indices
        return [None if a is None else jax.lax.with_sharding_constraint(a, self.leaves[j])
                for j, a in zip(indices, leaves)]

    def place_units(self, units, unmatched):
        """A dict of per-layer arrays (factors, units, corrections: keys as in ``kronecker_algebra``) laid out
        as the module says; ``"diag"`` (per leaf in no layer, ``unmatched`` its leaf indices) like its leaf."""
        out = {}
        for key, values in units.items():
            if key == "diag":
                out[key] = tuple(self.place_leaves(list(values), unmatched))
                continue
            place = (self.rows_c if key in _ROWS_C else self.rows_f if key in _ROWS_F else
                     self.matrix if key in _MATRIX else self.vector_f if key in _VECTOR_F else None)
            if place is None:
                raise ValueError(f"no layout for the Kronecker units {key!r}")
            out[key] = tuple(place(i, x) for i, x in enumerate(values))
        return out

    def place_decomposition(self, eighs):
        """``[((lambda_A, Q_A), (lambda_G, Q_G)), ...]`` laid out per layer."""
        return [((self.vector_c(i, la), self.rows_c(i, qa)), (self.vector_f(i, lg), self.rows_f(i, qg)))
                for i, ((la, qa), (lg, qg)) in enumerate(eighs)]


def _group_axes(spec, dims, length, mesh):
    """The mesh axes of a matrix axis merged from the kernel dims ``dims`` (row-major), or None."""
    entries = [spec[d] if d < len(spec) else None for d in dims]
    if not entries or entries[0] is None or any(e is not None for e in entries[1:]):
        return None
    names = entries[0] if isinstance(entries[0], tuple) else (entries[0],)
    if length % math.prod(mesh.shape[n] for n in names):
        return None
    return entries[0]


def kronecker_layout(structure, params, separate_weight_and_bias):
    """The ``KroneckerLayout`` of the operator's arrays for ``params``, or None where nothing is partitioned
    (or ``params`` are tracers). Raises ValueError as ``vector_shardings`` (a partitioned leaf not laid out by a
    ``NamedSharding``, leaves on different meshes)."""
    shardings = vector_shardings(params)
    if shardings is None:
        return None
    leaves = tuple(jax.tree_util.tree_leaves(shardings))
    mesh = leaves[0].mesh
    axes = []
    for layer in structure.layers:
        spec = tuple(leaves[layer.kernel].spec)
        joint = layer.bias is not None and not separate_weight_and_bias
        s_c = _group_axes(spec, layer.perm[: layer.num_in], layer.c + int(joint), mesh)
        s_f = _group_axes(spec, layer.perm[layer.num_in:], layer.f, mesh)
        axes.append((s_c, s_f))
    return KroneckerLayout(mesh, tuple(axes), leaves)
