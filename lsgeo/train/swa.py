"""Stochastic weight averaging (Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, UAI 2018).

w_SWA is the running mean of the clean iterates w_t for t >= start with (t - start) a multiple of
``every`` (e.g. the steps per epoch: one snapshot per epoch). After the c-th snapshot,
w_SWA <- w_SWA + (w_t - w_SWA) / c, i.e. ``optax.incremental_update(w_t, w_SWA, 1 / c)``.
BatchNorm statistics are not averaged: recompute them for w_SWA before evaluating a BN network.

Example:
  >>> import jax.numpy as jnp
  >>> from lsgeo.train.state import SWAState
  >>> s = SWAState(jnp.zeros(2), jnp.zeros((), jnp.int32))
  >>> for t, w in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
  ...     s = swa_update(s, jnp.full(2, w), t, start=2, every=1)
  >>> print(s.params, int(s.count))
  [3. 3.] 3
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lsgeo.train.state import SWAState

__all__ = ["swa_update"]


def swa_update(swa: SWAState, params, step, *, start: int, every: int) -> SWAState:
    """``swa`` with the clean ``params`` of step ``step`` averaged in when the schedule takes it."""
    take = jnp.asarray((step >= start) & ((step - start) % every == 0))
    count = swa.count + take.astype(swa.count.dtype)
    rate = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
    mean = optax.incremental_update(params, swa.params, rate)
    return SWAState(jax.tree_util.tree_map(lambda m, old: jnp.where(take, m, old).astype(old.dtype), mean, swa.params), count)
