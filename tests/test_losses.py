"""lsgeo.losses: the mean losses, their label checks and the registry of output Hessians, each
against autodiff of the one-example loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgeo import losses

RNG = np.random.default_rng(0)
PHI = jnp.asarray(RNG.standard_normal((5, 3)))
LABELS = jnp.asarray([0, 2, 1, 1, 0])
CASES = [
    (losses.squared_loss, PHI, jnp.asarray(RNG.standard_normal((5, 3)))),
    (losses.logistic_loss, PHI[:, 0], jnp.asarray([1.0, -1.0, 1.0, 1.0, -1.0])),
    (losses.softmax_cross_entropy, PHI, LABELS),
]


def _autodiff_hessians(loss, outputs, y):
    scalar = outputs.ndim == 1

    def one(phi_i, y_i):
        return loss(phi_i[None] if not scalar else phi_i.reshape(1), y_i[None])

    phi = losses.as_matrix(outputs)
    return jax.vmap(jax.hessian(lambda p, t: one(p[0] if scalar else p, t)))(phi, y)


@pytest.mark.parametrize("loss, outputs, y", CASES)
def test_closed_form_hessians_and_factors_match_autodiff(x64, loss, outputs, y):
    outputs, y = jnp.asarray(outputs, jnp.float64), jnp.asarray(y)
    reference = _autodiff_hessians(loss, outputs, y).reshape(outputs.shape[0], -1)
    closed = losses.output_hessians(loss, outputs, y)
    np.testing.assert_allclose(closed.reshape(reference.shape), reference, atol=1e-12)
    b, signs = losses.output_hessian_factors(loss, outputs, y)
    assert signs is None
    np.testing.assert_allclose(jnp.einsum("nkr,nlr->nkl", b, b).reshape(reference.shape), reference, atol=1e-12)


def test_registry_looks_through_wrappers_and_falls_back_to_autodiff(x64):
    @functools.wraps(losses.softmax_cross_entropy)
    def wrapped(outputs, labels):
        return losses.softmax_cross_entropy(outputs, labels)

    phi = jnp.asarray(PHI, jnp.float64)
    closed = losses.output_hessians(losses.softmax_cross_entropy, phi, LABELS)
    np.testing.assert_allclose(losses.output_hessians(wrapped, phi, LABELS), closed, atol=1e-12)
    np.testing.assert_allclose(losses.output_hessians(jax.jit(losses.softmax_cross_entropy), phi, LABELS), closed, atol=1e-12)

    def unregistered(outputs, labels):  # same function, no closed form: vmap(hessian) of one example
        return jnp.mean(jax.nn.logsumexp(outputs, -1) - jnp.take_along_axis(outputs, labels[:, None], -1)[:, 0])

    np.testing.assert_allclose(losses.output_hessians(unregistered, phi, LABELS), closed, atol=1e-12)
    b, signs = losses.output_hessian_factors(unregistered, phi, LABELS)  # eigh factors, H = B diag(s) B^T
    np.testing.assert_allclose(jnp.einsum("nkr,nr,nlr->nkl", b, signs, b), closed, atol=1e-12)


def test_losses_match_their_definitions(x64):
    y = jnp.asarray(RNG.standard_normal((5, 3)))
    np.testing.assert_allclose(losses.squared_loss(PHI, y), 0.5 * np.mean(np.sum((np.asarray(y) - np.asarray(PHI)) ** 2, -1)))
    s = jnp.asarray([1.0, -1.0, 1.0, 1.0, -1.0])
    np.testing.assert_allclose(losses.logistic_loss(PHI[:, 0], s), np.mean(np.log1p(np.exp(-np.asarray(s) * np.asarray(PHI[:, 0])))))
    p = np.exp(np.asarray(PHI)) / np.exp(np.asarray(PHI)).sum(-1, keepdims=True)
    np.testing.assert_allclose(losses.softmax_cross_entropy(PHI, LABELS), -np.mean(np.log(p[np.arange(5), np.asarray(LABELS)])), rtol=1e-6)
    assert float(losses.accuracy(PHI, jnp.argmax(PHI, -1))) == 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: losses.softmax_cross_entropy(PHI, jnp.asarray([0, 3, 1, 1, 0])), r"labels must be in \[0, 3\)"),
        (lambda: losses.softmax_cross_entropy(PHI, jnp.asarray([0, -1, 1, 1, 0])), r"labels must be in \[0, 3\)"),
        (lambda: losses.softmax_cross_entropy(PHI, jnp.zeros(5)), "integer class indices"),
        (lambda: losses.softmax_cross_entropy(PHI, LABELS[:4]), "labels must be integers of shape"),
        (lambda: losses.logistic_loss(PHI[:, 0], jnp.asarray([0.0, 1.0, 1.0, 0.0, 1.0])), "labels must be -1 or"),
        (lambda: losses.squared_loss(PHI, PHI[:, 0]), "targets must have the shape"),
    ],
)
def test_bad_labels_are_errors_not_nans(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_labels_are_not_checked_under_jit():
    # traced labels cannot be inspected; the check is free under jit and never raises there
    value = jax.jit(losses.softmax_cross_entropy)(PHI, LABELS)
    np.testing.assert_allclose(value, losses.softmax_cross_entropy(PHI, LABELS), rtol=1e-6)


SIGNS = jnp.asarray([1.0, -1.0, 1.0, 1.0, -1.0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: losses.logistic_loss(PHI[:, 0], SIGNS[:4]), r"labels must have shape \(5,\) or \(5, 1\)"),
        (lambda: losses.logistic_loss(PHI[:, :1], jnp.ones(6)), r"labels must have shape \(5,\) or \(5, 1\)"),
        (lambda: losses.logistic_loss(PHI, SIGNS), r"outputs of logistic_loss must be scalar predictions"),
        (lambda: losses.accuracy(PHI, LABELS[:4]), r"labels must be integer classes of shape \(5,\)"),
        (lambda: losses.accuracy(PHI, LABELS[:, None]), r"labels must be integer classes of shape \(5,\)"),
        (lambda: losses.accuracy(PHI[:, 0], SIGNS[:3]), r"labels must have shape \(5,\) or \(5, 1\)"),
    ],
)
def test_wrong_number_of_labels_is_a_clear_error(call, match):
    """Before: a reshape error from deep inside jax, or (accuracy with [n, 1] labels) a silent [n, n] broadcast."""
    with pytest.raises(ValueError, match=match):
        call()
    with pytest.raises(ValueError, match=match):  # shapes are static: the same error under jit
        jax.jit(call)()


def test_scalar_outputs_accept_column_labels():
    np.testing.assert_allclose(losses.logistic_loss(PHI[:, :1], SIGNS[:, None]), losses.logistic_loss(PHI[:, 0], SIGNS))
    assert float(losses.accuracy(PHI[:, 0], SIGNS[:, None])) == float(losses.accuracy(PHI[:, 0], SIGNS))


def test_traced_labels_outside_the_classes_make_the_loss_nan_not_a_wrong_number():
    """Labels -1 and k inside a compiled objective (where they cannot be checked): NaN, and so is every curvature
    estimate of an objective written by hand with this loss (before: finite, wrong values)."""
    import jax

    from lsgeo import curvature

    outputs = jnp.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
    assert np.isfinite(jax.jit(losses.softmax_cross_entropy)(outputs, jnp.array([0, 2])))
    for bad in ([0, 3], [-1, 2]):
        assert np.isnan(jax.jit(losses.softmax_cross_entropy)(outputs, jnp.array(bad)))
    f = lambda w, b: losses.softmax_cross_entropy(b[0] @ w, b[1])  # noqa: E731
    w, x = jnp.ones((2, 3)) / 3, jnp.array([[1.0, 0.0], [0.5, 2.0]])
    assert np.isfinite(curvature.hessian_trace(f, w, (x, jnp.array([0, 2])), jax.random.key(0), num_probes=4))
    assert np.isnan(curvature.hessian_trace(f, w, (x, jnp.array([0, 3])), jax.random.key(0), num_probes=4))
