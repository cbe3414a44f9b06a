"""lsgeo.train evaluates ``eval_fn`` on a data source (a zero-argument callable returning a fresh iterator of
batches, here a numpy memmap on disk): each metric is the example-weighted mean over the source's batches, equal
to ``eval_fn`` on the whole in-memory set, in ``train`` and in a vmapped ``sweep``, one batch at a time."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsgeo import train

N_EVAL, BATCH = 23, 5  # 4 batches of 5 and a last one of 3


@pytest.fixture
def problem(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((N_EVAL, 4)))
    np.save(tmp_path / "y.npy", rng.standard_normal(N_EVAL))
    x, y = np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")
    sizes = []

    def source():
        for start in range(0, N_EVAL, BATCH):
            sizes.append(min(BATCH, N_EVAL - start))
            yield np.asarray(x[start : start + BATCH]), np.asarray(y[start : start + BATCH])

    train_data = (rng.standard_normal((30, 4)), rng.standard_normal(30))
    return source, (np.asarray(x), np.asarray(y)), train_data, sizes


def objective(w, batch):
    return jnp.mean((batch[0] @ w - batch[1]) ** 2)


def eval_fn(w, batch):  # means over the examples of the batch
    residual = batch[0] @ w - batch[1]
    return {"eval_loss": jnp.mean(residual**2), "eval_abs": jnp.mean(jnp.abs(residual))}


def test_train_on_a_source_equals_the_in_memory_evaluation(global_x64, problem):
    source, in_memory, data, sizes = problem
    run = dict(num_steps=10, eval_every=5, eval_fn=eval_fn)
    streamed = train.train(objective, optax.sgd(0.05), jnp.zeros(4), data, eval_data=source, **run)
    reference = train.train(objective, optax.sgd(0.05), jnp.zeros(4), data, eval_data=in_memory, **run)
    assert streamed.history.keys() == reference.history.keys()
    for name in ("eval_loss", "eval_abs"):
        np.testing.assert_allclose(streamed.history[name], reference.history[name], rtol=1e-12)
    assert abs(streamed.history["eval_loss"][-1] - streamed.history["eval_loss"][0]) > 1e-3  # it moves with w_t
    assert max(sizes) == BATCH and N_EVAL % BATCH in sizes  # read batch by batch, the last one uneven


def test_sweep_on_a_source_equals_the_in_memory_evaluation(global_x64, problem):
    source, in_memory, data, _ = problem
    run = dict(num_steps=6, eval_every=3, eval_fn=eval_fn)
    make = lambda lr, seed: optax.sgd(lr)  # noqa: E731
    streamed = train.sweep(objective, make, jnp.zeros(4), data, {"lr": [0.01, 0.05]}, [0, 1], eval_data=source, **run)
    reference = train.sweep(objective, make, jnp.zeros(4), data, {"lr": [0.01, 0.05]}, [0, 1], eval_data=in_memory,
                            **run)
    np.testing.assert_allclose(streamed.history["eval_loss"], reference.history["eval_loss"], rtol=1e-12)
    assert not np.allclose(streamed.history["eval_loss"][0, 0, -1], streamed.history["eval_loss"][1, 0, -1])


def test_a_source_without_eval_fn_is_an_error(problem):
    source, _, data, _ = problem
    with pytest.raises(ValueError, match="eval_data is a data source but eval_fn is None"):
        train.train(objective, optax.sgd(0.05), jnp.zeros(4), data, num_steps=2, eval_data=source)
