"""The tiny regression problem and the hand-written reference loop shared by the lsgeo.train tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsgeo.optim import clean_params
from lsgeo.train import epoch_permutation, split_key

# inputs are built with numpy (eager jax ops would compile a kernel per shape)
_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(16, 3)).astype(np.float32)
Y = (X @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.1 * _RNG.normal(size=(16, 1))).astype(np.float32)
W0 = {"l1": {"w": (0.5 * _RNG.normal(size=(3, 4))).astype(np.float32)}, "l2": {"w": (0.5 * _RNG.normal(size=(4, 1))).astype(np.float32)}}


def loss(params, batch):
    x, y = batch
    return 0.5 * jnp.mean((jnp.tanh(x @ params["l1"]["w"]) @ params["l2"]["w"] - y) ** 2)


def eval_fn(params, batch):
    return {"test_loss": loss(params, batch), "w_norm": jnp.sum(params["l2"]["w"] ** 2)}


def _manual(opt, w0, batch_at, num_steps):
    """The ordinary optax loop (no lsgeo code but clean_params); returns the clean iterates w_1..w_T."""

    @jax.jit
    def run(w0):
        def body(carry, t):
            z, state = carry
            updates, state = opt.update(jax.grad(loss)(z, batch_at(t)), state, z)
            z = optax.apply_updates(z, updates)
            return (z, state), clean_params(z, state)

        return jax.lax.scan(body, (w0, opt.init(w0)), jnp.arange(num_steps))[1]

    return run(w0)


def _at(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _minibatches(key, batch_size, num_epochs):
    """The batch of every step, from the documented order: epoch e visits epoch_permutation(data_key, e)."""
    _, data_key = split_key(key)
    perms = np.stack([np.asarray(epoch_permutation(data_key, e, 16)) for e in range(num_epochs)])
    assert all(sorted(p) == list(range(16)) for p in perms)
    idx = jnp.asarray(perms[:, : 16 // batch_size * batch_size].reshape(-1, batch_size))
    return lambda t: (jnp.asarray(X)[idx[t]], jnp.asarray(Y)[idx[t]])
