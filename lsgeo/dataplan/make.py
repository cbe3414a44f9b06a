"""``plan(batch, microbatch_size, devices=...)``: the one constructor that picks the plan of a batch."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from lsgeo.dataplan.devices import resolve_devices
from lsgeo.dataplan.memory import MicrobatchPlan
from lsgeo.dataplan.sharded import sharded_examples, sharded_plan
from lsgeo.dataplan.stream import check_not_iterator, is_source, stream_plan
from lsgeo.dataplan.whole import WholeBatch
from lsgeo.validation import check_batch, check_positive_int

__all__ = ["plan", "in_memory_plan"]


def plan(batch, microbatch_size: int | None = None, *, devices: Sequence | None = None, name: str = "batch"):
    """The plan of ``batch``:

    - a data source (a zero-argument callable returning a fresh iterator of batches): ``StreamPlan``, its
      batches the microbatches (``microbatch_size`` must be None; read on one device);
    - a batch of ``jax.Array``s sharded along its example axis: ``ShardedPlan``, used where it lies
      (``devices`` must be None);
    - otherwise an in-memory batch: ``WholeBatch`` (``microbatch_size=None``) or ``MicrobatchPlan``.

    Raises ValueError for an empty batch, leaves that disagree on n, a bad
    ``microbatch_size`` or ``devices``, or an iterator in place of a source (all naming ``name``).
    """
    check_not_iterator(batch, name)
    if is_source(batch):
        if microbatch_size is not None:
            raise ValueError(
                f"microbatch_size must be None when {name} is a data source: the source's batches are the "
                f"microbatches (got microbatch_size={microbatch_size!r})"
            )
        if devices is not None and len(resolve_devices(devices)) > 1:
            raise ValueError(f"a data source is read on one device; got devices={devices!r}")
        return stream_plan(batch, name=name)
    if microbatch_size is not None:
        check_positive_int(microbatch_size, "microbatch_size")
    where = sharded_examples(batch)
    if where is not None:
        if devices is not None:
            raise ValueError(f"devices must be None when {name} is sharded along its example axis: it is used "
                             f"where it lies (on {len(where[0].devices.flat)} devices)")
        return sharded_plan(batch, microbatch_size, *where, name)
    return in_memory_plan(batch, microbatch_size, devices=devices, name=name)


def in_memory_plan(batch, microbatch_size: int | None, *, devices: Sequence | None = None, name: str = "batch"):
    """``WholeBatch`` (``microbatch_size`` None) or the ``MicrobatchPlan`` of an in-memory batch.

    Args:
      batch: pytree of arrays; with microbatches every leaf needs the leading example axis n.
      microbatch_size: ``None`` or a positive int ``s`` (capped at n).
      devices: devices to shard the microbatches over (default ``jax.devices()``).
      name: the name of the batch argument in error messages.
    """
    if microbatch_size is None:
        n = check_batch(batch, name)
        if devices is not None:
            resolve_devices(devices)
        return WholeBatch(n or 0, (jax.devices()[0],))
    check_positive_int(microbatch_size, "microbatch_size")
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        if np.ndim(leaf) == 0:
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path) or '(root)'} has no leading example axis (shape "
                f"{np.shape(leaf)}); with microbatch_size every leaf of {name} must be an array [n, ...] "
                f"(bind constants such as BatchNorm statistics into the function instead)"
            )
    n = check_batch(batch, name, common_axis=True)
    devices = resolve_devices(devices)
    size = min(int(microbatch_size), n)
    num_full, remainder = divmod(n, size)
    return MicrobatchPlan(n, size, num_full, remainder, devices[: max(1, min(len(devices), num_full))])
