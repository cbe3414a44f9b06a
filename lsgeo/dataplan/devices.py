"""The one device check, the one mesh axis and the one placement helper of lsgeo.

Every computation of lsgeo over several devices (microbatches of a data plan, ``lsgeo.train``'s data
parallelism) uses a 1-D mesh whose axis is named ``AXIS = "data"``. Arguments that every device needs
(parameters, tangents, keys) are replicated over it by ``place``.

Example:
  >>> import jax
  >>> from lsgeo import dataplan
  >>> dataplan.resolve_devices(None) == tuple(jax.devices())
  True
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsgeo.validation import is_concrete

__all__ = ["AXIS", "resolve_devices", "mesh", "place"]

AXIS = "data"


def resolve_devices(devices, name: str = "devices") -> tuple:
    """``devices`` as a tuple (``None``: ``jax.devices()``): a non-empty sequence of distinct ``jax.Device``;
    anything else is a ValueError naming ``name``. The one device check of lsgeo (``lsgeo.train`` too)."""
    if devices is None:
        return tuple(jax.devices())
    if isinstance(devices, jax.Device):
        raise ValueError(f"{name} must be a sequence of jax devices (e.g. [{devices!r}]), got one device")
    try:
        devices = tuple(devices)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of jax devices, got {type(devices).__name__}") from None
    if not devices:
        raise ValueError(f"{name} must hold at least one device, got an empty sequence (None: jax.devices())")
    bad = [d for d in devices if not isinstance(d, jax.Device)]
    if bad:
        raise ValueError(f"{name} must hold jax devices (jax.devices()), got {bad[0]!r}")
    repeated = sorted({str(d) for d in devices if devices.count(d) > 1})
    if repeated:
        raise ValueError(f"{name} must not repeat a device; {', '.join(repeated)} appears more than once")
    return devices


def mesh(devices: Sequence) -> Mesh:
    """The 1-D mesh ``(AXIS,)`` over ``devices``."""
    return Mesh(np.asarray(devices), (AXIS,))


def place(devices: Sequence, *trees):
    """``trees`` with every concrete array that is not on exactly ``devices`` replicated over them; unchanged
    with one device. A computation over several devices cannot take an argument committed to one device
    (``jax.device_put(x, d)``). Over several processes (``jax.distributed``) the replicated array is assembled
    from each process's own copy of the value (``jax.make_array_from_callback``: every process must pass the
    same value, as for any replicated input). Tracers (a call inside the caller's own ``jit``) pass unchanged."""
    if len(devices) == 1:
        return trees
    device_set = set(devices)
    sharding = NamedSharding(mesh(devices), PartitionSpec())

    def put(a):
        if not isinstance(a, (jax.Array, np.ndarray)) or not is_concrete(a):
            return a
        if isinstance(a, jax.Array) and a.sharding.device_set == device_set:
            return a
        if sharding.is_fully_addressable:
            return jax.device_put(a, sharding)
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        value = np.asarray(a)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return tuple(jax.tree_util.tree_map(put, t) for t in trees)
