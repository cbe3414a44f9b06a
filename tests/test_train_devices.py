"""Minibatch training with the data sharded over 4 forced host devices gives the one-device trajectory
(a subprocess: the device count is fixed when jax starts), with a microbatched tracker too. A small version of the slow
test_train_loop::test_multi_device_minibatch_matches_one_device that runs in the default suite (issue 22)."""

import textwrap

from conftest import DEVICE_TRAIN_PROBLEM, run_python

_SCRIPT = DEVICE_TRAIN_PROBLEM + textwrap.dedent(
    """
    assert len(jax.devices()) == 4, jax.devices()
    from lsgeo.optim import noise_injection
    from lsgeo.train import train
    tx = noise_injection(optax.sgd(0.1), 0.1, seed=1)
    a = train(loss, tx, W0, (X, Y), num_steps=4, eval_every=2, batch_size=8)
    b = train(loss, tx, W0, (X, Y), num_steps=4, eval_every=2, batch_size=8, devices=[jax.devices()[0]])
    assert len(a.params["a"].sharding.device_set) == 4, a.params["a"].sharding
    assert np.all(np.isfinite(a.history["train_loss"]))
    np.testing.assert_allclose(a.history["train_loss"], b.history["train_loss"], rtol=1e-5)
    for k in W0:
        np.testing.assert_allclose(a.params[k], b.params[k], atol=1e-5)
        assert not np.allclose(a.params[k], W0[k])  # it trained
    print("OK")
    """
)


def test_minibatch_training_on_four_devices_matches_one_device():
    assert "OK" in run_python("-c", _SCRIPT, devices=4, timeout=300)


_TRACKED = DEVICE_TRAIN_PROBLEM + textwrap.dedent(
    """
    assert len(jax.devices()) == 2, jax.devices()
    from lsgeo.curvature.track import top_eigenvalue_tracker
    from lsgeo.train import sweep, train
    cut = top_eigenvalue_tracker(loss, num_iters=12, tol=None, microbatch_size=4)  # microbatches over both devices
    whole = top_eigenvalue_tracker(loss, num_iters=12, tol=None)
    one = train(loss, optax.sgd(0.1), W0, (X, Y), num_steps=2, measure=whole, devices=[jax.devices()[0]])
    two = train(loss, optax.sgd(0.1), W0, (X, Y), num_steps=2, measure=cut)
    swept = sweep(loss, lambda lr, seed: optax.sgd(lr), W0, (X, Y), {"lr": [0.1, 0.1]}, [0], num_steps=2, measure=cut)
    np.testing.assert_allclose(two.history["lambda_max"], one.history["lambda_max"], rtol=1e-4)
    np.testing.assert_allclose(swept.history["lambda_max"][:, 0], [one.history["lambda_max"]] * 2, rtol=1e-4)
    print("OK")
    """
)


def test_a_microbatched_tracker_on_two_devices_matches_one_device():
    """A tracker whose operator shards its microbatches over both devices, inside train (data sharded over them)
    and inside a sweep (members sharded over them), records the one-device whole-batch lambda_max."""
    assert "OK" in run_python("-c", _TRACKED, devices=2, timeout=300)
