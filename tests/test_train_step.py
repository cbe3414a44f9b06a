"""lsgeo.train's building blocks used in a loop of your own: train_step, init_state, minibatch, swa_update."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _train_problem import W0, X, Y, _at, _manual, loss

from lsgeo.optim import clean_params, noise_injection
from lsgeo.train import TrainState, init_state, minibatch, swa_update, train_step
from lsgeo.train.state import SWAState


def test_train_step_and_init_state_compose_a_loop_of_your_own():

    opt = noise_injection(optax.sgd(0.1), 0.05, seed=3)
    state = init_state(W0, opt)
    step = jax.jit(train_step, static_argnums=(0, 1))
    for _ in range(4):
        state, _ = step(loss, opt, state, (X, Y))
    chex.assert_trees_all_close(clean_params(state.params, state.opt_state), _at(_manual(opt, W0, lambda t: (X, Y), 4), -1), atol=1e-6)
    assert isinstance(state, TrainState) and int(state.step) == 4




def test_minibatch_is_a_pure_function_of_key_and_step():
    key = jax.random.key_data(jax.random.key(1))
    data = (jnp.arange(16), jnp.arange(16) * 2)
    seen = np.concatenate([np.asarray(minibatch(data, key, t, 5)[0]) for t in range(3)])  # one epoch, 1 dropped
    assert len(set(seen.tolist())) == 15
    np.testing.assert_array_equal(minibatch(data, key, 4, 5)[1], 2 * minibatch(data, key, 4, 5)[0])
    np.testing.assert_array_equal(minibatch(data, key, 4, 5)[0], jax.jit(minibatch, static_argnums=3)(data, key, 4, 5)[0])
    assert minibatch(data, key, 4, None) is data


def test_swa_update_is_the_mean_of_the_scheduled_iterates():
    iterates = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    swa = SWAState(jnp.zeros(3), jnp.zeros((), jnp.int32))
    for t in range(1, 11):
        swa = swa_update(swa, jnp.asarray(iterates[t - 1]), t, start=3, every=3)
    np.testing.assert_allclose(swa.params, iterates[[2, 5, 8]].mean(0), rtol=1e-6)
    assert int(swa.count) == 3


def test_evaluate_train_loss_is_the_loss_over_all_examples_with_an_uneven_last_batch():
    from lsgeo.train import evaluate

    state = init_state(W0, optax.sgd(0.1))
    metrics = evaluate(loss, None, state, (X, Y), None, batch_size=5)  # 16 = 5 + 5 + 5 + 1
    np.testing.assert_allclose(metrics["train_loss"], loss(W0, (X, Y)), rtol=1e-6)
