"""Which examples step t sees: full batch (GD) or the minibatches of shuffled epochs (SGD).

With ``batch_size=None`` every step sees all of ``data`` (the paper's full-batch GD). Otherwise epoch
e = t // S, S = n // batch_size steps per epoch, visits ``epoch_permutation(data_key, e, n)`` in
order, ``batch_size`` examples at a time (the last n mod batch_size examples of each permutation are
dropped). The permutation of epoch e and the augmentation key of step t come from disjoint subtrees
of the data key (:mod:`lsgeo.streams`). The batch is a pure function of (data_key, t), so a run
resumed at any step, mid-epoch included, sees exactly the batches of the uninterrupted run.

Example:
  >>> import jax, jax.numpy as jnp
  >>> data = (jnp.arange(6.0), jnp.arange(6))
  >>> key = jax.random.key_data(jax.random.key(0))
  >>> [minibatch(data, key, t, 2)[1].tolist() for t in range(3)] == [
  ...     epoch_permutation(key, 0, 6)[2 * t: 2 * t + 2].tolist() for t in range(3)]
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lsgeo import streams

__all__ = ["epoch_permutation", "minibatch", "augment_key"]


def epoch_permutation(data_key, epoch, num_examples: int) -> jax.Array:
    """The order in which minibatch SGD visits the examples in ``epoch`` (``data_key``: typed or raw)."""
    return jax.random.permutation(streams.stream(data_key, "permutation", epoch), num_examples)


def minibatch(data, data_key, step, batch_size: int | None):
    """The examples step ``step`` trains on: all of ``data`` (``batch_size=None``) or its minibatch.

    Cost: one permutation of n indices (a sort) and a gather of ``batch_size`` examples.
    """
    if batch_size is None:
        return data
    n = jax.tree_util.tree_leaves(data)[0].shape[0]
    steps_per_epoch = n // batch_size
    epoch, i = step // steps_per_epoch, step % steps_per_epoch
    perm = epoch_permutation(data_key, epoch, n)
    idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), data)


def augment_key(data_key, step) -> jax.Array:
    """The key of step ``step``'s data augmentation (a subtree of ``data_key`` disjoint from the minibatch order)."""
    return streams.stream(data_key, "augment", step)
