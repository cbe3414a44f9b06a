"""One optimizer step, pure: ``train_step(objective, optimizer, state, batch) -> (state, loss)``.

The step a user compiles in their own loop (flax ``examples/imagenet``'s ``train_step``): the gradient
of the objective at the point the loop holds, ``optimizer.update`` (which receives ``params``, and
``grad_fn`` for ``optax.GradientTransformationExtraArgs`` such as ``optax.contrib.sam``) and
``optax.apply_updates``. As ``optax.apply_if_finite``, a step whose loss, gradient or updated
parameters are not finite is not applied: the state stays at the last finite step (no NaN
propagates, nothing is lost), and ``state.divergence`` records the first such step and what was
non-finite. Once diverged, the state stays frozen.

Objectives (the lsgeo contract):
- ``state.model_state is None``: ``objective(params, batch) -> scalar``;
- otherwise ``objective(params, model_state, batch) -> (loss, new_model_state)`` (BatchNorm in
  training mode); the statistics are updated by the forward pass at the point the loop holds.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from lsgeo.train import init_state
  >>> f = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
  >>> batch = (jnp.eye(2), jnp.array([1.0, -1.0]))
  >>> state = init_state(jnp.zeros(2), optax.sgd(0.5))
  >>> step = jax.jit(train_step, static_argnums=(0, 1))
  >>> for _ in range(3):
  ...     state, loss = step(f, optax.sgd(0.5), state, batch)
  >>> print(state.params.round(3), int(state.step))
  [ 0.875 -0.875] 3
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lsgeo.train.state import Divergence, TrainState

__all__ = ["train_step", "objective_value", "scalar_loss"]


def scalar_loss(loss):
    """``loss``, or a ValueError when the objective did not return a scalar (checked while tracing)."""
    if jnp.ndim(loss) != 0:
        raise ValueError(
            f"objective must return a scalar (the mean loss over the batch), got an array of shape {jnp.shape(loss)}"
        )
    return loss


def objective_value(objective: Callable, params, model_state, batch):
    """The loss of ``objective`` at ``params`` (model state read, not updated)."""
    if model_state is None:
        return scalar_loss(objective(params, batch))
    return scalar_loss(objective(params, model_state, batch)[0])


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_step(
    objective: Callable, optimizer: optax.GradientTransformation, state: TrainState, batch
) -> tuple[TrainState, jax.Array]:
    """One step of ``optimizer`` on ``objective`` at ``state.params`` with ``batch``.

    Returns ``(new_state, loss)`` with ``loss`` the objective the optimizer saw (at the point the loop
    holds, before the update). Non-finite steps are skipped and recorded (module docstring).
    Cost: one gradient evaluation and one optimizer update.
    """
    if state.model_state is None:
        loss, grads = jax.value_and_grad(lambda p: scalar_loss(objective(p, batch)))(state.params)
        model_state = None
    else:

        def stateful(p):
            loss, new_model_state = objective(p, state.model_state, batch)
            return scalar_loss(loss), new_model_state

        (loss, model_state), grads = jax.value_and_grad(stateful, has_aux=True)(state.params)
    extra = {}
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
        extra["grad_fn"] = lambda p, _i: jax.grad(lambda q: objective_value(objective, q, state.model_state, batch))(p)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)

    loss_ok, grad_ok, params_ok = jnp.isfinite(loss), _all_finite(grads), _all_finite(params)
    finite = loss_ok & grad_ok & params_ok
    running = state.divergence.step < 0
    applied = state._replace(params=params, opt_state=opt_state, model_state=model_state, step=state.step + 1)
    first_bad = running & ~finite
    frozen = state._replace(
        divergence=jax.tree_util.tree_map(
            lambda new, old: jnp.where(first_bad, new, old),
            Divergence(state.step, ~loss_ok, ~grad_ok, ~params_ok),
            state.divergence,
        )
    )
    new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite & running, a, b), applied, frozen)
    return new_state, loss
