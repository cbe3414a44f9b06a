"""Data parallelism over ``jax.devices()``: a 1-D mesh named ``"data"`` and where arrays live on it.

With one device nothing changes (no mesh). With several, ``lsgeo.train.train`` shards the example axis
of the data and of every batch (XLA inserts the gradient all-reduce), and ``lsgeo.train.sweep`` shards
its members; everything else is replicated. The same code runs on several processes after
``jax.distributed.initialize()`` (``python -m lsgeo.launch``): the mesh spans every process's devices, data
given as a global ``jax.Array`` sharded along its example axis (``jax.make_array_from_process_local_data``)
stays where it lies, host arrays are placed shard by shard, and what a run returns (history, final state)
is gathered to every process (``to_host``), so each gets the single-process result.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lsgeo.dataplan import resolve_devices

__all__ = ["check_devices", "data_mesh", "shard_examples", "replicate", "constrain_examples", "to_host"]


def check_devices(devices, name: str = "devices") -> list:
    """``devices`` as a list: a non-empty sequence of distinct ``jax.Device`` (``lsgeo.dataplan.resolve_devices``,
    the one device check of lsgeo; ValueError naming ``name``)."""
    return list(resolve_devices(devices, name))


def data_mesh(devices=None) -> Mesh | None:
    """A 1-D mesh ``("data",)`` over ``devices`` (default ``jax.devices()``); None for a single device."""
    devices = jax.devices() if devices is None else check_devices(devices)
    if len(devices) <= 1:
        return None
    return Mesh(np.asarray(devices), ("data",))


def shard_examples(mesh: Mesh | None, data, n: int, batch_size: int | None):
    """``(data, sharded)``: the example axis split over the mesh when it divides evenly, else replicated."""
    if mesh is None:
        return data, False
    shard = n % mesh.size == 0 and (batch_size is None or batch_size % mesh.size == 0)
    return jax.device_put(data, NamedSharding(mesh, P("data") if shard else P())), shard


def replicate(mesh: Mesh | None, tree):
    """``tree`` copied to every device of the mesh (unchanged without a mesh)."""
    if mesh is None or tree is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))


def constrain_examples(mesh: Mesh | None, batch):
    """Inside ``jit``: keep ``batch`` split along its example axis over the mesh."""
    if mesh is None:
        return batch
    return jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P("data")))


def to_host(tree):
    """``tree`` with every array that spans other processes' devices gathered, whole, into every process (a numpy
    array; ``multihost_utils.process_allgather``; PRNG key arrays stay keys); other leaves unchanged. With one
    process this is the identity. Call it on every process (it is a collective)."""

    def gather(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = multihost_utils.process_allgather(jax.random.key_data(x), tiled=True)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree_util.tree_map(gather, tree)
