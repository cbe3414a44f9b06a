"""The one weighted sum over the microbatches of a plan, and the data-set objective built on it.

For a mean over examples ``f(w, B) = 1/n sum_{i in B} l(w, z_i)`` cut into microbatches ``B_j`` of ``n_j``
examples, exactly

    f(w, B) = sum_j (n_j / n) f(w, B_j),     D^p f(w, B)[v, ...] = sum_j (n_j / n) D^p f(w, B_j)[v, ...].

``reduce`` evaluates ``sum_j c_j fn(operands, B_j)``: the plan supplies the unweighted sums (its ``sums``),
and the weights ``c_j = n_j / n`` (``mean=True``) or 1 (``mean=False``: a sum over examples) are derived
here, once, from the plan's counts.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lsgeo import dataplan
  >>> batch = (jnp.arange(10.0), jnp.ones(10))
  >>> plan = dataplan.plan(batch, 4, devices=[jax.devices()[0]])
  >>> float(dataplan.reduce(lambda ops, b: jnp.mean(b[0]), (), batch, plan))
  4.5
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lsgeo.cpu_convolutions import canonicalize_convolutions

__all__ = ["weights", "reduce", "dataset_objective"]

PyTree = Any


def weights(plan, mean: bool = True) -> tuple[float, float]:
    """``(c_full, c_last)``: the weight of each full microbatch and of the uneven last one."""
    if not mean or plan.whole:
        return 1.0, 1.0
    n = plan.num_examples
    return plan.size / n, plan.remainder / n


def _scaled(tree, c: float):
    if c == 1.0:
        return tree
    return jax.tree_util.tree_map(lambda t: t * jnp.asarray(c, t.dtype), tree)


def reduce(fn: Callable, operands: PyTree, data, plan, *, mean: bool = True) -> PyTree:
    """``sum_j c_j fn(operands, B_j)`` over the microbatches ``B_j`` of ``plan``.

    ``c_j = n_j / n`` (``mean=True``: the exact data-set value of a mean over examples) or 1 (``mean=False``:
    a sum over examples, e.g. an NTK trace). ``data`` is the batch or its ``plan.layout(batch)`` (None for a
    streamed source). ``fn`` returns a pytree of floating arrays; ``operands`` (parameters, tangents, keys)
    are passed unchanged to every call. Traceable; one compiled body of ``fn`` runs every full microbatch.

    On CPU, ``fn``'s convolutions are first put in XLA:CPU's canonical layout (``lsgeo.cpu_convolutions``:
    inside a loop body XLA:CPU would otherwise run the kernel-gradient convolutions of a conv net 10-45x
    slower); this is decided here, by the plan's platform, and nowhere else.

    Cost: ``fn`` on every microbatch. Memory: ``fn`` on one microbatch (per device) plus the result.
    """
    fn = canonicalize_convolutions(fn, plan.platform)
    full, last = plan.sums(fn, operands, data)
    c_full, c_last = weights(plan, mean)
    total = None if full is None else _scaled(full, c_full)
    if last is not None:
        last = _scaled(last, c_last)
        total = last if total is None else jax.tree_util.tree_map(jnp.add, total, last)
    return total


def dataset_objective(f: Callable, plan) -> Callable:
    """``F(params, data) = sum_j (n_j / n) f(params, B_j)``, the data-set objective, with a memory-bounded
    gradient.

    ``F`` is a ``jax.custom_vjp``: its value is one ``reduce`` of ``f``; under ``jax.grad`` the forward pass
    runs ``jax.value_and_grad(f)`` on each microbatch inside the same loop and keeps only the accumulated
    gradient (differentiating through the loop would store every microbatch's activations). Reverse mode
    with respect to ``params`` only. With one microbatch (``plan.num_microbatches == 1`` in memory) it is
    ``f`` itself. Cost of a gradient: one gradient per microbatch.
    """
    if plan.whole:
        return f

    @jax.custom_vjp
    def value(params, data):
        return reduce(lambda p, mb: f(p, mb), params, data, plan)

    def fwd(params, data):
        return reduce(lambda p, mb: jax.value_and_grad(f)(p, mb), params, data, plan)

    def bwd(grad, g):
        return jax.tree_util.tree_map(lambda x: (g * x).astype(x.dtype), grad), None

    value.defvjp(fwd, bwd)
    return value
