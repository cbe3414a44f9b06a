"""lsgeo.influence LDS (float64): the vmapped subset retrains equal separate runs; the LDS of the actual outcome
is 1, of random scores 0 within its standard error, of exact-Hessian influence on a convex model high; the
Spearman statistic against scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from lsgeo import curvature, influence, losses, train

N, D, LAM = 40, 4, 0.05


def _problem():
    kx, kw, kn = jax.random.split(jax.random.key(5), 3)
    x = jnp.concatenate([jax.random.normal(kx, (N + 12, D)), jnp.ones((N + 12, 1))], axis=1)
    y = jnp.sign(x @ jax.random.normal(kw, (D + 1,)) + 0.7 * jax.random.normal(kn, (N + 12,)))
    return (x[:N], y[:N]), (x[N:], y[N:])


def predict(w, x):
    return x @ w


def penalty(w):
    return 0.5 * LAM * jnp.sum(w**2)


def test_vmapped_retrains_equal_separate_runs(x64):
    (x, y), _ = _problem()
    opt = optax.sgd(0.3, momentum=0.5)
    runs = influence.retrain_on_subsets(predict, losses.logistic_loss, jnp.zeros(D + 1), (x, y), opt, num_steps=12,
                                        num_subsets=5, seed=3, batch_size=8, penalty=penalty)
    assert runs.masks.shape == (5, N) and runs.masks.sum(axis=1).tolist() == [N // 2] * 5
    assert len({m.tobytes() for m in runs.masks}) == 5  # every member its own subset
    objective = influence.masked_objective(predict, losses.logistic_loss, penalty)
    for j in (0, 4):
        alone = train.train(objective, opt, jnp.zeros(D + 1), (x, y, jnp.arange(N)), num_steps=12, batch_size=8,
                            model_state=jnp.asarray(runs.masks[j], jnp.float64), key=3 + j)
        np.testing.assert_allclose(runs.params[j], alone.params, rtol=1e-10, atol=1e-12)
    # the masked objective is the mean loss over the subset (+ penalty)
    w = jnp.linspace(-1.0, 1.0, D + 1)
    m = runs.masks[0]
    value, _ = objective(w, jnp.asarray(m, jnp.float64), (x, y, jnp.arange(N)))
    assert float(value) == pytest.approx(float(losses.logistic_loss(x[m] @ w, y[m]) + penalty(w)), rel=1e-12)


def test_lds_of_actual_random_and_influence_scores(x64):
    train_data, query_data = _problem()
    runs = influence.retrain_on_subsets(predict, losses.logistic_loss, jnp.zeros(D + 1), train_data, optax.sgd(1.0),
                                        num_steps=300, num_subsets=24, penalty=penalty)
    # the predictor that is the actual retrained outcome (shifted per query) has LDS 1
    actual = influence.query_losses(predict, losses.logistic_loss, runs.params, query_data)
    score, stderr, per_query = influence.lds_from_predictions(actual - actual.mean(axis=0), actual)
    assert score == pytest.approx(1.0) and np.allclose(per_query, 1.0)
    # random scores: 0 within three standard errors
    noise = np.asarray(jax.random.normal(jax.random.key(9), (N, 12)))
    rand = influence.lds(predict, losses.logistic_loss, None, train_data, query_data, noise, retrains=runs)
    assert abs(rand.score) < 3 * rand.stderr and rand.stderr < 0.1
    # exact-Hessian influence at the full-data minimiser predicts the retrained outcomes on this convex model
    full = train.train(influence.masked_objective(predict, losses.logistic_loss, penalty), optax.sgd(1.0),
                       jnp.zeros(D + 1), (*train_data, jnp.arange(N)), num_steps=300, model_state=jnp.ones(N))
    f = lambda w, b: losses.logistic_loss(b[0] @ w, b[1]) + penalty(w)  # noqa: E731
    scores = influence.pairwise_scores(predict, losses.logistic_loss, full.params, train_data, query_data,
                                       inverse=curvature.Hessian(f, full.params, train_data), damping=0.0, tol=1e-12)
    result = influence.lds(predict, losses.logistic_loss, None, train_data, query_data, scores, retrains=runs)
    assert result.score > 0.9 and result.score > rand.score + 5 * rand.stderr
    np.testing.assert_allclose(result.actual, actual)
    assert result.predicted.shape == (24, 12)


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    predicted, actual = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    actual[:, 1] = predicted[:, 1] ** 3  # monotone: 1
    actual[::2, 2] = 0.0  # ties
    score, stderr, per_query = influence.lds_from_predictions(predicted, actual)
    want = [scipy.stats.spearmanr(predicted[:, q], actual[:, q]).statistic for q in range(4)]
    np.testing.assert_allclose(per_query, want, rtol=1e-12)
    assert per_query[1] == pytest.approx(1.0)
    assert score == pytest.approx(np.mean(want)) and stderr == pytest.approx(np.std(want, ddof=1) / 2)
    with pytest.raises(ValueError, match="M >= 3"):
        influence.lds_from_predictions(predicted[:2], actual[:2])
    with pytest.raises(ValueError, match="retrains="):
        influence.lds(predict, losses.logistic_loss, None, None, None, predicted)
