"""The in-memory plan: a batch cut into microbatches of ``size`` examples, on one device or sharded over
several (each device holds its share of the microbatches, not a copy of the data set)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lsgeo.dataplan import devices as devices_lib
from lsgeo.dataplan.devices import AXIS
from lsgeo.dataplan.protocol import PlanCounts
from lsgeo.validation import is_concrete

__all__ = ["MicrobatchPlan", "Layout"]

PyTree = Any


class Layout(NamedTuple):
    """A batch laid out once for a plan over several devices: the full microbatches stacked as
    ``[q_pad, s, ...]`` and sharded along their first axis over the plan's devices (padding copies carry
    weight 0), and the uneven last microbatch ``[r, ...]`` (``None`` when ``r = 0``), replicated."""

    full: PyTree
    rest: PyTree


def _zeros(struct):
    return jax.tree_util.tree_map(lambda sd: jnp.zeros(sd.shape, sd.dtype), struct)


@dataclasses.dataclass(frozen=True)
class MicrobatchPlan(PlanCounts):
    """How an in-memory batch of ``num_examples`` is cut (static, hashable).

    size:       examples per microbatch ``s``.
    num_full:   number of full microbatches, ``n // s``.
    remainder:  examples in the uneven last microbatch, ``n % s`` (0: none).
    devices:    the devices the full microbatches are sharded over (one: no sharding).
    """

    num_examples: int
    size: int
    num_full: int
    remainder: int
    devices: tuple

    in_memory = property(lambda self: True)

    @property
    def num_padded(self) -> int:
        """Full microbatches padded to a multiple of the device count (padding carries weight 0)."""
        return -(-self.num_full // len(self.devices)) * len(self.devices)

    def layout(self, batch):
        """``batch`` laid out once. Several devices: a ``Layout`` whose full microbatches are sharded over the
        devices (about ``n / devices`` examples each) and whose last microbatch is replicated. One device:
        ``batch`` unchanged (microbatches are sliced in place, no copy). Inside ``jit`` the same layout is
        requested with a sharding constraint."""
        if len(self.devices) == 1 or isinstance(batch, Layout):
            return batch
        s, q, q_pad = self.size, self.num_full, self.num_padded
        mesh = devices_lib.mesh(self.devices)

        def stack(a):
            a = jnp.asarray(a)
            a = a[: q * s].reshape(q, s, *a.shape[1:])
            return jnp.concatenate([a, a[: q_pad - q]]) if q_pad > q else a

        def put(tree, spec):
            sharding = NamedSharding(mesh, spec)
            if is_concrete(tree):
                return jax.device_put(tree, sharding)
            return jax.lax.with_sharding_constraint(tree, sharding)

        full = put(jax.tree_util.tree_map(stack, batch), PartitionSpec(AXIS))
        rest = None
        if self.remainder:
            rest = put(jax.tree_util.tree_map(lambda a: jnp.asarray(a)[q * s :], batch), PartitionSpec())
        return Layout(full, rest)

    def struct(self, data):
        if isinstance(data, Layout):
            return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), data.full)
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((self.size, *np.shape(a)[1:]), jnp.result_type(a)),
                                      data)

    def sums(self, fn, operands, data):
        if len(self.devices) > 1:
            data = self.layout(data)
            full = self._sharded_sum(fn, operands, data.full)
            last = fn(operands, data.rest) if self.remainder else None
            return full, last
        s, q = self.size, self.num_full

        def body(acc, j):
            mb = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, j * s, s, axis=0), data)
            return jax.tree_util.tree_map(jnp.add, acc, fn(operands, mb)), None

        full, _ = jax.lax.scan(body, _zeros(jax.eval_shape(fn, operands, self.struct(data))), jnp.arange(q))
        last = fn(operands, jax.tree_util.tree_map(lambda a: a[q * s :], data)) if self.remainder else None
        return full, last

    def _sharded_sum(self, fn, operands, full):
        """The full microbatches ``[q_pad, s, ...]`` sharded over a 1-D mesh: a ``lax.scan`` on each device
        over its share (padding masked out), one ``psum``."""
        mask = jnp.asarray(np.arange(self.num_padded) < self.num_full)
        struct = jax.eval_shape(fn, operands, jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                                                                     full))

        def local(operands, full, mask):
            def body(acc, xs):
                mb, w = xs
                out = fn(operands, mb)
                return jax.tree_util.tree_map(lambda t, o: t + jnp.where(w, o, jnp.zeros_like(o)), acc, out), None

            total, _ = jax.lax.scan(body, _zeros(struct), (full, mask))
            return jax.lax.psum(total, AXIS)

        spec = PartitionSpec(AXIS)
        return jax.shard_map(local, mesh=devices_lib.mesh(self.devices), in_specs=(PartitionSpec(), spec, spec),
                             out_specs=PartitionSpec(), check_vma=False)(operands, full, mask)
