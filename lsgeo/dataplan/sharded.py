"""The process-sharded plan: a batch of ``jax.Array``s sharded along the example axis (over the devices of
one process or of several, as ``jax.make_array_from_process_local_data`` builds it), used where it lies.

Each device cuts its own ``local_examples`` into microbatches of ``size`` (``num_full`` of them and a
``remainder``) and one ``psum`` over the example axis of the batch's mesh combines the devices. Nothing is
gathered or replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsgeo.dataplan.protocol import PlanCounts
from lsgeo.validation import check_batch, is_concrete

__all__ = ["ShardedPlan", "sharded_examples", "sharded_plan"]


def sharded_examples(batch):
    """``(mesh, axis)`` when every leaf of ``batch`` is a ``jax.Array`` with one ``NamedSharding`` that splits
    its leading (example) axis over a mesh axis and nothing else (and the batch spans several devices);
    None otherwise."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or not all(isinstance(a, jax.Array) and is_concrete(a) for a in leaves):
        return None
    shardings = {a.sharding for a in leaves}
    if len(shardings) != 1:
        return None
    sharding = shardings.pop()
    if not isinstance(sharding, NamedSharding) or len(sharding.device_set) < 2:
        return None
    spec = tuple(sharding.spec) + (None,) * (max(a.ndim for a in leaves) - len(sharding.spec))
    if not spec or spec[0] is None or any(p is not None for p in spec[1:]):
        return None
    return sharding.mesh, spec[0]


@dataclasses.dataclass(frozen=True)
class ShardedPlan(PlanCounts):
    """A batch sharded along its examples over ``axis`` of ``mesh`` (see the module docstring)."""

    num_examples: int
    size: int
    local_examples: int
    num_full: int
    remainder: int
    mesh: Mesh
    axis: Any
    devices: tuple

    def layout(self, batch):
        return batch

    def struct(self, data):
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((self.size, *np.shape(a)[1:]), jnp.result_type(a)),
                                      data)

    def sums(self, fn, operands, data):
        """On each device a ``lax.scan`` over its own full microbatches and ``fn`` on its uneven last one, each
        summed over the devices by one ``psum``."""
        s, q, r = self.size, self.num_full, self.remainder

        def local(operands, shard):
            full = last = None
            if q:
                def body(acc, j):
                    mb = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, j * s, s, axis=0), shard)
                    return jax.tree_util.tree_map(jnp.add, acc, fn(operands, mb)), None

                mb_struct = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((s, *a.shape[1:]), a.dtype), shard)
                zeros = jax.tree_util.tree_map(lambda sd: jnp.zeros(sd.shape, sd.dtype),
                                               jax.eval_shape(fn, operands, mb_struct))
                full, _ = jax.lax.scan(body, zeros, jnp.arange(q))
                full = jax.lax.psum(full, self.axis)
            if r:
                last = jax.lax.psum(fn(operands, jax.tree_util.tree_map(lambda a: a[q * s :], shard)), self.axis)
            return full, last

        spec = PartitionSpec(self.axis)
        return jax.shard_map(local, mesh=self.mesh, in_specs=(PartitionSpec(), spec), out_specs=PartitionSpec(),
                             check_vma=False)(operands, data)


def sharded_plan(batch, microbatch_size, mesh, axis, name: str = "batch") -> ShardedPlan:
    """The plan of a batch sharded over ``axis`` of ``mesh`` (``sharded_examples``), microbatches of
    ``microbatch_size`` examples per device (None: each device's share at once)."""
    n = check_batch(batch, name, common_axis=True)
    axes = axis if isinstance(axis, tuple) else (axis,)
    parts = int(np.prod([mesh.shape[a] for a in axes]))
    if n % parts:
        raise ValueError(f"{name}: {n} examples do not split evenly over the {parts} shards of its example axis")
    local = n // parts
    size = local if microbatch_size is None else min(int(microbatch_size), local)
    num_full, remainder = divmod(local, size)
    return ShardedPlan(n, size, local, num_full, remainder, mesh, axis, tuple(mesh.devices.flat))
