"""Data parallelism over ``jax.devices()``: a 1-D mesh named ``"data"`` and where arrays live on it.

With one device nothing changes (no mesh). With several, ``lsgeo.train.train`` shards the example axis
of the data and of every batch (XLA inserts the gradient all-reduce), and ``lsgeo.train.sweep`` shards
its members; everything else is replicated. The same code runs multi-host after
``jax.distributed.initialize()``.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lsgeo.microbatch import resolve_devices

__all__ = ["check_devices", "data_mesh", "shard_examples", "replicate", "constrain_examples"]


def check_devices(devices, name: str = "devices") -> list:
    """``devices`` as a list: a non-empty sequence of distinct ``jax.Device`` (``lsgeo.microbatch.resolve_devices``,
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
