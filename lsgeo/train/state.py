"""The state of a training run: everything a resumed run needs to continue bit for bit.

``TrainState.params`` is the point the loop holds (z_t = w_t + xi_t under ``lsgeo.optim.noise_injection``,
the adversarial point between syncs of transparent-mode SAM); the clean iterate w_t is
``lsgeo.optim.clean_params(state.params, state.opt_state)``. Resuming from the clean w_t instead would
redo the floating-point sum w_t + xi_t and drift by an ulp, and would lose SAM's cached outer iterate:
``lsgeo.train.train(..., params=result.state)`` resumes from the state itself.

Example:
  >>> import jax.numpy as jnp, optax
  >>> state = init_state(jnp.zeros(3), optax.sgd(0.1), key=0, swa=True)
  >>> int(state.step), int(state.swa.count), int(state.divergence.step)
  (0, 0, -1)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lsgeo import streams

PyTree = Any

__all__ = ["TrainState", "SWAState", "Divergence", "init_state", "split_key", "with_state_views"]


class SWAState(NamedTuple):
    """Stochastic weight averaging (Izmailov et al. 2018): the running mean of the clean iterates.

    Attributes:
      params: the mean of the ``count`` iterates averaged so far (the initial clean params while
        ``count == 0``; evaluation reports NaN for SWA metrics until the first iterate is taken).
      count: number of iterates averaged (int32).
    """

    params: PyTree
    count: jax.Array


class Divergence(NamedTuple):
    """Where a run stopped being finite; the state is frozen at the last finite step from then on.

    Attributes:
      step: the step t whose update was non-finite (int32), -1 while every step was finite.
      loss, gradient, params: which of the loss, the gradient and the updated parameters of that
        step were non-finite (bool).
    """

    step: jax.Array
    loss: jax.Array
    gradient: jax.Array
    params: jax.Array

    def quantity(self) -> str:
        """The first non-finite quantity by name (concrete state only): "loss", "gradient" or "params"."""
        for name in ("loss", "gradient", "params"):
            if bool(getattr(self, name)):
                return name
        return "params"


class TrainState(NamedTuple):
    """A training run's state (a pytree: it ``vmap``s, ``jit``s and checkpoints).

    Attributes:
      params: the point the loop holds and differentiates at (see the module docstring).
      opt_state: the optax state.
      model_state: non-parameter state (BatchNorm statistics), None for stateless objectives.
      step: the number of optimizer steps done (int32).
      data_key: raw key data of the data stream (minibatch order, augmentation).
      swa: the SWA running mean, or None without SWA.
      divergence: see :class:`Divergence`.
      measure: the state of the run's measurement (any ``(init, update)`` pair, e.g. ``lsgeo.curvature.track``), or None without one.
    """

    params: PyTree
    opt_state: Any
    model_state: Any
    step: jax.Array
    data_key: jax.Array
    swa: SWAState | None
    divergence: Divergence
    measure: Any = None


def split_key(key) -> tuple[jax.Array, jax.Array]:
    """``(init_key, data_key)`` from ``key`` (an int seed, possibly traced, a typed PRNG key or raw key data).

    Disjoint subtrees of the root key (:mod:`lsgeo.streams`): ``init_key = fold_in(root, STREAMS["init"])``,
    ``data_key = fold_in(root, STREAMS["data"])``; noise injection seeded with the same seed draws from a
    third one, ``STREAMS["noise"]``.
    """
    return streams.stream(key, "init"), streams.stream(key, "data")


def init_state(
    params: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    model_state=None,
    key=0,
    swa: bool = False,
    step: int = 0,
    measure=None,
) -> TrainState:
    """The state at step ``step`` of a run starting at the clean ``params`` w_0.

    ``optimizer.init(params)``; for ``lsgeo.optim.noise_injection`` xi_0 = 0, so the loop's point is w_0.
    ``key`` gives the data stream: ``data_key = split_key(key)[1]`` (``split_key(key)[0]`` is the
    key that initialises parameters given as a function of a key, in ``lsgeo.train.train``).
    ``measure``: a measurement (e.g. ``lsgeo.curvature.track.Measurement``) whose ``init(params)`` starts ``state.measure``.
    """
    _, data_key = split_key(key)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        model_state=model_state,
        step=jnp.asarray(step, jnp.int32),
        data_key=jax.random.key_data(data_key),
        swa=SWAState(params, jnp.zeros((), jnp.int32)) if swa else None,
        divergence=Divergence(jnp.asarray(-1, jnp.int32), *(jnp.asarray(False),) * 3),
        measure=None if measure is None else measure.init(params),
    )


def with_state_views(cls):
    """Class decorator for results holding a ``state`` field: read-only ``opt_state``, ``model_state``
    and ``swa_params`` (None without SWA) views of it."""
    cls.opt_state = property(lambda self: self.state.opt_state, doc="The optax state of ``state``.")
    cls.model_state = property(lambda self: self.state.model_state, doc="The model state of ``state``.")
    cls.swa_params = property(
        lambda self: None if self.state.swa is None else self.state.swa.params, doc="The SWA mean (None without SWA)."
    )
    return cls
