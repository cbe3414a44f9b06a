"""The risk R(w) = L(Phi(w)) and its noise-injected versions (Orvieto et al., AISTATS 2023).

  R(w)               = L(Phi(w))                                            (Eq. 1)
  R_sigma(w)         = E_eps[ L(Phi(w + sigma eps)) ]                        (Eq. 2)
  R~_sigma(w)        = 1/M sum_j E_eps[ L(Phi(w + sigma sqrt(M) eps_j)) ]    (layer-wise, Sections 3.2, 4)

Model contract: ``predict(params, x) -> [n, k] or [n]``, ``loss(outputs, y) -> scalar`` (a mean over
examples), ``batch = (x, y)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lsgeo import tree as tree_lib
from lsgeo._checks import check_choice, check_positive_int, check_sigma
from lsgeo.perturbation import MODES, perturbation

__all__ = ["risk", "perturbed_risk"]


def risk(predict, loss, params, batch):
    """R(w) = L(Phi(w)). Cost: one forward pass."""
    x, y = batch
    return loss(predict(params, x), y)


def perturbed_risk(
    predict,
    loss,
    params,
    batch,
    sigma,
    key,
    *,
    num_samples=1,
    mode="full",
    groups=None,
    scale_by_num_groups=True,
    chunk_size=16,
):
    """Monte Carlo estimate of R_sigma (``mode="full"``) or of the layer-wise R~_sigma.

    ``mode="full"``: mean over ``num_samples`` draws of L(Phi(w + sigma eps)).
    ``mode="layerwise"``: for each draw, the expectation over the perturbed group j is taken exactly,
    i.e. the mean over all M groups of L(Phi(w + sigma sqrt(M) eps_j)) with eps_j on group j only.

    Unbiased for R_sigma / R~_sigma. Cost: ``num_samples`` (times M for layer-wise) forward passes,
    evaluated ``chunk_size`` at a time with ``lax.map`` so memory stays bounded.
    """
    check_choice(mode, "mode", MODES)
    check_sigma(sigma)
    check_positive_int(num_samples, "num_samples")
    x, y = batch
    keys = jax.random.split(key, num_samples)

    if mode == "full":

        def one(k):
            xi = perturbation(k, params, sigma, mode="full")
            return loss(predict(tree_lib.add(params, xi), x), y)

        values = jax.lax.map(one, keys, batch_size=min(chunk_size, num_samples))
        return jnp.mean(values)

    num_groups = len(tree_lib.group_names(params, groups))
    group_index = jnp.tile(jnp.arange(num_groups), num_samples)
    draw_keys = jnp.repeat(keys, num_groups, axis=0)

    def one_group(args):
        k, j = args
        xi = perturbation(
            k, params, sigma, mode="layerwise", group=j, groups=groups, scale_by_num_groups=scale_by_num_groups
        )
        return loss(predict(tree_lib.add(params, xi), x), y)

    values = jax.lax.map(one_group, (draw_keys, group_index), batch_size=min(chunk_size, num_samples * num_groups))
    return jnp.mean(values)
