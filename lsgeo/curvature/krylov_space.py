"""The vectors of a Krylov run (``lsgeo.curvature.krylov``): pytrees of arrays, a flat vector being a one-leaf
pytree, with their shardings and where the basis lives (device or host memory).

``vector_shardings(params)`` gives the layout Lanczos keeps (``None`` on one device or under data parallelism:
the flat path); ``KrylovSpace`` is the static description a run works with (leaf shapes, shardings, basis
memory), handling vectors and bases as lists of leaves.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["KrylovSpace", "vector_shardings", "HOST_BLOCK"]

PyTree = Any
HOST_BLOCK = 8  # basis rows fetched from host memory at a time
_HIGHEST = jax.lax.Precision.HIGHEST


def vector_shardings(tree: PyTree):
    """The layout of a pytree of parameters as Lanczos wants it: ``None`` when no leaf is partitioned over
    several devices (one device, or replicated over several: the flat path), else a pytree of ``NamedSharding``
    shaped like ``tree``.

    Leaves with a ``NamedSharding`` keep it; single-device and host (numpy) leaves of a sharded tree are
    replicated over the mesh of the first sharded leaf (they are replicated there by ``jit`` anyway).

    Raises:
      ValueError: a leaf laid out over several devices by a sharding that is not a ``NamedSharding``, or
        leaves sharded over meshes of different devices."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sharded = [getattr(a, "sharding", None) for a in leaves]
    sharded = [s for s in sharded if s is not None and len(s.device_set) > 1]
    if all(s.is_fully_replicated for s in sharded):  # nothing partitioned (e.g. data parallelism): the flat path
        return None
    named = [s for s in sharded if isinstance(s, NamedSharding)]
    if len(named) != len(sharded):
        bad = next(s for s in sharded if not isinstance(s, NamedSharding))
        raise ValueError(f"params must be sharded by NamedSharding (a mesh and a PartitionSpec) to keep Krylov "
                         f"bases sharded, got a leaf with {bad!r}")
    mesh = named[0].mesh
    if any(s.mesh.devices.tolist() != mesh.devices.tolist() or s.mesh.axis_names != mesh.axis_names for s in named):
        raise ValueError("params must be sharded over one mesh, got leaves on different meshes")
    replicated = NamedSharding(mesh, PartitionSpec())

    def layout(a):
        s = getattr(a, "sharding", None)
        return s if isinstance(s, NamedSharding) and len(s.device_set) > 1 else replicated

    return jax.tree_util.tree_unflatten(treedef, [layout(a) for a in leaves])


class KrylovSpace:
    """Static description of the vectors of a run: the pytree structure, the leaf shapes, their shardings
    (or None) and where the basis lives. Vectors and bases are handled as lists of leaves."""

    def __init__(self, v0, shardings, basis_memory):
        leaves, self.treedef = jax.tree_util.tree_flatten(v0)
        self.shapes = [tuple(a.shape) for a in leaves]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int).tolist()
        self.size = int(sum(self.sizes))
        self.host = basis_memory == "host"
        if shardings is None:
            self.vec_shardings = self.basis_shardings = None
        else:
            try:
                given = self.treedef.flatten_up_to(shardings)
            except (ValueError, TypeError) as err:
                raise ValueError(f"shardings must be a pytree shaped like v0 with one sharding per leaf: {err}") from err
            if not all(isinstance(s, NamedSharding) for s in given):
                raise ValueError(f"shardings must hold a jax.sharding.NamedSharding per leaf, got {given!r}")
            self.vec_shardings = given
            self.basis_shardings = [NamedSharding(s.mesh, PartitionSpec(None, *s.spec)) for s in given]

    # layout
    def constrain(self, w):
        if self.vec_shardings is None:
            return w
        return [jax.lax.with_sharding_constraint(a, s) for a, s in zip(w, self.vec_shardings)]

    def constrain_basis(self, basis):
        if self.basis_shardings is not None:
            basis = [jax.lax.with_sharding_constraint(b, s) for b, s in zip(basis, self.basis_shardings)]
        if self.host:
            basis = [jax.device_put(b, jax.memory.Space.Host) for b in basis]
        return basis

    def tree(self, leaves):
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def leaves(self, tree):
        return self.treedef.flatten_up_to(tree)

    # algebra
    @staticmethod
    def inner(x, y):
        return sum(jnp.tensordot(a, b, axes=a.ndim, precision=_HIGHEST) for a, b in zip(x, y))

    def norm(self, x):
        return jnp.sqrt(self.inner(x, x))

    @staticmethod
    def axpy(alpha, x, y):
        """``y + alpha x``."""
        return [b + alpha * a for a, b in zip(x, y)]

    # the basis
    def row(self, basis, i):
        rows = [jax.lax.dynamic_index_in_dim(b, i, 0, keepdims=False) for b in basis]
        if self.host:
            rows = [jax.device_put(r, jax.memory.Space.Device) for r in rows]
        return self.constrain(rows)

    def block(self, basis, start, size):
        """Rows ``[start, start + size)`` of a host basis, fetched to device memory (``dynamic_slice``
        clamps ``start`` so that the block lies inside the basis)."""
        rows = [jax.device_put(jax.lax.dynamic_slice_in_dim(b, start, size, 0), jax.memory.Space.Device)
                for b in basis]
        return self.constrain_rows(rows)

    def write(self, basis, w, i):
        if self.host:
            w = [jax.device_put(a, jax.memory.Space.Host) for a in w]
        return self.constrain_basis([jax.lax.dynamic_update_index_in_dim(b, a, i, axis=0) for b, a in zip(basis, w)])

    @staticmethod
    def _cgs(rows, w):
        coeffs = sum(jnp.tensordot(b, a, axes=a.ndim, precision=_HIGHEST) for b, a in zip(rows, w))
        return [a - jnp.tensordot(coeffs, b, axes=1, precision=_HIGHEST) for a, b in zip(w, rows)]

    def project_out(self, basis, w, rows):
        """``w`` orthogonalised twice against the first ``rows`` basis vectors ("twice is enough", Kahan /
        Parlett); the rows after them are zero. Device basis: classical Gram-Schmidt against the whole
        basis, two matrix-vector products per pass. Host basis: block Gram-Schmidt over blocks of
        ``HOST_BLOCK`` rows fetched one block at a time (classical within a block, modified across
        blocks; ``ceil(rows / HOST_BLOCK)`` fetches per pass, device memory ``HOST_BLOCK`` rows)."""
        if not self.host:
            for _ in range(2):
                w = self.constrain(self._cgs(basis, w))
            return w
        size = min(HOST_BLOCK, basis[0].shape[0])

        def one(i, w):
            return self.constrain(self._cgs(self.block(basis, i * size, size), w))

        for _ in range(2):
            w = jax.lax.fori_loop(0, (rows + size - 1) // size, one, w)
        return w

    def restart_vector(self, j, dtype):
        """A fixed, generic pseudo-random vector (a sine hash of the flat index), the ``j``-th restart after
        breakdown. Deterministic and free of PRNG state; the same values, in ``ravel_pytree`` order,
        whatever the pytree structure."""
        out = []
        for shape, size, offset in zip(self.shapes, self.sizes, self.offsets):
            i = jnp.arange(offset + 1, offset + size + 1, dtype=dtype).reshape(shape)
            h = jnp.sin(i * 12.9898 + (j + 1) * 78.233) * 43758.5453
            out.append(h - jnp.floor(h) - 0.5)
        return self.constrain(out)

    def combine(self, basis, coefficients):
        """``sum_i coefficients[i, c] v_i`` for each column ``c``: leaves with a leading axis of the columns."""
        num = coefficients.shape[0]
        if not self.host:
            return self.constrain_rows([jnp.tensordot(coefficients.T, b[:num], axes=1, precision=_HIGHEST)
                                        for b in basis])

        size = min(HOST_BLOCK, num)

        def add(acc, rows, coeffs):
            return [c + jnp.tensordot(coeffs.T, b, axes=1, precision=_HIGHEST) for c, b in zip(acc, rows)]

        def one(i, acc):
            coeffs = jax.lax.dynamic_slice_in_dim(coefficients, i * size, size, 0)
            return add(acc, self.block(basis, i * size, size), coeffs)

        acc = [jnp.zeros((coefficients.shape[1], *s), coefficients.dtype) for s in self.shapes]
        full, rest = divmod(num, size)
        acc = jax.lax.fori_loop(0, full, one, acc)
        if rest:  # the last, partial block (static)
            acc = add(acc, self.block(basis, full * size, rest), coefficients[full * size:])
        return self.constrain_rows(acc)

    def constrain_rows(self, leaves):
        if self.basis_shardings is None:
            return leaves
        return [jax.lax.with_sharding_constraint(a, s) for a, s in zip(leaves, self.basis_shardings)]
