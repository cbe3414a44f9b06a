"""BatchNorm statistics recomputed for new weights: SWA averages and points on paths between minima.

A BatchNorm layer normalises with running averages of the batch statistics seen during training.
Weights that training never visited (the SWA average, a point on a line or Bezier curve between two
minima) come with no matching statistics, and evaluating them with the statistics of other weights
gives wrong losses (Izmailov et al. 2018, "bn_update"; Garipov et al. 2018, Section 5).
``recompute_batch_stats`` replaces them by the exact population statistics of the data ``x`` at
``params``: for every BatchNorm layer the mean and (biased) variance of its input over all examples
(and spatial positions), with every earlier layer normalised by its own population statistics.
Evaluation mode with these statistics then computes exactly what a training-mode forward pass on all
of ``x`` at once computes.

Algorithm: a pass runs the model in evaluation mode over ``x`` in batches (``lax.scan``) and
accumulates, at each BatchNorm layer, the sums of its input and of its square (a flax method
interceptor reads the layer's input); the statistics of a layer are exact once those of every layer
before it are, so passes repeat (``lax.while_loop``) until the statistics stop changing, at most
(number of BatchNorm layers + 1) times: depth + 1 passes for a chain of BatchNorm layers.
Cost: (BatchNorm depth + 1) forward passes over x; memory of one batch. Traceable (jit, vmap).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lsgeo.models import ResNet18, init_model, make_predict
  >>> model = ResNet18(num_classes=2, width=2, stage_sizes=(1,))
  >>> x = jax.random.normal(jax.random.key(1), (12, 8, 8, 1))
  >>> params, state = init_model(model, jax.random.key(0), x[:1])
  >>> state = recompute_batch_stats(model, params, state, x, batch_size=5)
  >>> full_batch_train_mode = make_predict(model, state, train=True)(params, x)
  >>> bool(jnp.allclose(make_predict(model, state)(params, x), full_batch_train_mode, atol=1e-5))
  True
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsgeo.validation import check_batch, check_positive_int

__all__ = ["recompute_batch_stats", "num_batchnorm_layers"]

PyTree = Any


def num_batchnorm_layers(model_state: dict) -> int:
    """The number of BatchNorm layers whose statistics ``model_state['batch_stats']`` holds."""
    stats = (model_state or {}).get("batch_stats", {})
    return len(jax.tree_util.tree_leaves(stats)) // 2


def _set(tree: dict, path: tuple, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _batch_sums(model, params, model_state, x, weights):
    """Per BatchNorm layer (a tree like ``batch_stats``): the weighted sums of its input, of its square,
    and the weighted count, over the reduction axes, in evaluation mode with ``model_state``."""
    sums: dict = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
            h = jnp.asarray(args[0])
            h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
            features = {a % h.ndim for a in ((module.axis,) if isinstance(module.axis, int) else module.axis)}
            reduce = tuple(a for a in range(h.ndim) if a not in features)
            if 0 not in reduce:
                raise ValueError(f"BatchNorm {module.path} normalises over the example axis 0; cannot recompute")
            w = weights.reshape((-1,) + (1,) * (h.ndim - 1)).astype(h.dtype)
            positions = 1
            for a in reduce[1:]:
                positions *= h.shape[a]
            _set(
                sums,
                tuple(module.path),
                {
                    "sum": jnp.sum(w * h, reduce),
                    "sum_sq": jnp.sum(w * h * h, reduce),
                    "count": jnp.sum(weights).astype(h.dtype) * positions,
                },
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply({"params": params, **model_state}, x, train=False)
    return sums


def _statistics(sums: dict, like: dict) -> dict:
    """Population ``{"mean", "var"}`` per layer from the sums (variance E[h^2] - E[h]^2, as flax computes it)."""

    def layer(s, old):
        mean = s["sum"] / s["count"]
        var = jnp.maximum(0.0, s["sum_sq"] / s["count"] - mean * mean)
        return {"mean": mean.astype(old["mean"].dtype), "var": var.astype(old["var"].dtype)}

    return jax.tree_util.tree_map(layer, sums, like, is_leaf=lambda t: isinstance(t, dict) and "sum" in t)


def recompute_batch_stats(
    model: nn.Module,
    params: PyTree,
    model_state: dict,
    x,
    *,
    batch_size: int | None = None,
    max_passes: int | None = None,
) -> dict:
    """``model_state`` with its ``batch_stats`` replaced by the exact population statistics of ``x`` at ``params``.

    Args:
      model: a flax linen model whose BatchNorm layers use ``use_running_average=not train``
        (``ResNet18``) and normalise over the example axis 0.
      params: the weights (e.g. an SWA average, a point on a path).
      model_state: the model's non-parameter collections (``init_model``'s second output); only
        ``batch_stats`` is replaced, and only its structure and dtypes are used.
      x: inputs ``[n, ...]`` (the training data, without augmentation).
      batch_size: examples per forward pass (default all n); a last partial batch is padded and masked out.
      max_passes: at most this many passes (default: number of BatchNorm layers + 1, enough for exact
        statistics); fewer gives exact statistics for the first layers only.

    Returns:
      the new ``model_state``. Cost: (BatchNorm depth + 1) forward passes over ``x``.
    """
    if not model_state or "batch_stats" not in model_state:
        return model_state
    x = jnp.asarray(x)
    n = check_batch(x, "x", common_axis=True)
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    if max_passes is not None:
        check_positive_int(max_passes, "max_passes")
    batch_size = n if batch_size is None else min(batch_size, n)
    passes = num_batchnorm_layers(model_state) + 1 if max_passes is None else max_passes
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    xs = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]).reshape((num_batches, batch_size) + x.shape[1:])
    ws = (jnp.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size)
    other = {k: v for k, v in model_state.items() if k != "batch_stats"}

    def one_pass(stats):
        state = {**other, "batch_stats": stats}
        shapes = jax.eval_shape(functools.partial(_batch_sums, model), params, state, xs[0], ws[0])
        zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def accumulate(total, batch):
            sums = _batch_sums(model, params, state, *batch)
            return jax.tree_util.tree_map(jnp.add, total, sums), None

        total, _ = jax.lax.scan(accumulate, zero, (xs, ws))
        return _statistics(total, stats)

    def cond(carry):
        _, count, changed = carry
        return changed & (count < passes)

    def body(carry):
        stats, count, _ = carry
        new = one_pass(stats)
        changed = jnp.any(
            jnp.stack(
                [jnp.any(a != b) for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(stats))]
            )
        )
        return new, count + 1, changed

    stats = jax.tree_util.tree_map(jnp.asarray, dict(model_state["batch_stats"]))
    stats, _, _ = jax.lax.while_loop(cond, body, (stats, jnp.int32(0), jnp.bool_(True)))
    return {**other, "batch_stats": stats}
