"""lsgeo.train.sweep: vmapped members equal separate runs, one compilation, any hyperparameter, NaN
history after a member diverges."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _train_problem import W0, X, Y, _at, _manual, loss

from lsgeo.optim import noise_injection
from lsgeo.train import sweep, train


def test_sweep_matches_separate_runs_and_compiles_once():
    sigmas = np.linspace(0.0, 0.35, 8)
    traces = []

    def counted_loss(params, batch):
        traces.append(1)
        return loss(params, batch)

    def make(sigma, seed):
        return noise_injection(optax.sgd(0.1), sigma, mode="layerwise", seed=seed)

    kw = dict(num_steps=10, eval_every=5)
    res = sweep(counted_loss, make, W0, (X, Y), {"sigma": sigmas}, [4], members_per_chunk=4, **kw)
    first = len(traces)
    assert first <= 4  # start + chunk (step and evaluation); independent of the 8 sigmas
    res2 = sweep(counted_loss, make, W0, (X, Y), {"sigma": sigmas[::-1]}, [4], members_per_chunk=4, **kw)
    assert len(traces) == first  # new sigma values: no retrace, no recompilation
    assert res.history["train_loss"].shape == (8, 1, 3) and res.history["step"][3, 0].tolist() == [0, 5, 10]
    np.testing.assert_array_equal(res.diverged_step, -1)
    run = jax.jit(lambda s: _manual(make(s, 4), W0, lambda t: (X, Y), 10))  # the 8 runs one after another
    for i, s in enumerate(sigmas):
        traj = run(jnp.float32(s))
        chex.assert_trees_all_close(_at(_at(res.params, i), 0), _at(traj, -1), atol=2e-6, rtol=1e-5)
        losses = [float(loss(_at(traj, k), (X, Y))) for k in (4, 9)]
        np.testing.assert_allclose(res.history["train_loss"][i, 0, 1:], losses, rtol=1e-5)
    chex.assert_trees_all_close(_at(_at(res2.params, 7), 0), _at(_at(res.params, 0), 0), atol=2e-6)


def test_sweep_over_learning_rate_and_a_diverging_member():
    """Any hyperparameter of the factory; a member that diverges has NaN history after its step, the
    others equal single runs."""
    lrs = [0.05, 0.2, 400.0]

    def make(learning_rate, seed):
        return optax.sgd(learning_rate, momentum=0.5)

    res = sweep(loss, make, W0, (X, Y), {"learning_rate": lrs}, [0, 1], num_steps=12, eval_every=3, batch_size=8)
    assert np.all(res.diverged_step[:2] == -1) and np.all(res.diverged_step[2] >= 0)
    for j, seed in enumerate([0, 1]):
        step = res.diverged_step[2, j]
        after = res.history["step"][2, j] > step
        assert np.all(np.isnan(res.history["train_loss"][2, j][after]))
        assert np.all(np.isnan(res.history["batch_loss"][2, j][after]))
        assert np.all(np.isfinite(res.history["train_loss"][2, j][~after]))
        for i in range(2):
            single = train(loss, make(lrs[i], seed), W0, (X, Y), num_steps=12, eval_every=3, batch_size=8, key=seed)
            np.testing.assert_allclose(res.history["train_loss"][i, j], single.history["train_loss"], rtol=1e-5)


