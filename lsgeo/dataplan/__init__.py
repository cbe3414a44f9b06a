"""The data plan: data-set-level evaluation in the memory of one microbatch, on one device or several.

Every objective of lsgeo is a mean over examples, f(w, B) = 1/n sum_{i in B} l(w, z_i), and so is each of
its derivatives. Cut the batch B into ``J = ceil(n / s)`` consecutive microbatches B_j of ``s`` examples
(the last one holds the remaining ``n - (J - 1) s``); then exactly

    f(w, B) = sum_j (n_j / n) f(w, B_j),     D^p f(w, B)[v, ...] = sum_j (n_j / n) D^p f(w, B_j)[v, ...],

so a value, a gradient, a Hessian-vector product or a Gauss-Newton trace over a whole training set is an
example-weighted mean of the same quantity over microbatches, and only one microbatch is live at a time.
This holds only when ``f`` is a mean over independent examples (``check_mean_over_examples``).

One protocol (``Plan``: counts, ``layout``, ``struct``, ``sums``, ``place``), four plans:

  ``WholeBatch``       the batch at once (``microbatch_size=None``);
  ``MicrobatchPlan``   an in-memory batch cut into microbatches, a ``lax.scan`` over them, sharded over
                       several devices by ``shard_map`` (one ``psum``; each device holds its share);
  ``StreamPlan``       a data source (zero-argument callable returning an iterator of batches) read batch by
                       batch from the host, contents checked between passes;
  ``ShardedPlan``      a global ``jax.Array`` batch sharded along its examples over processes, used in place.

``plan(batch, microbatch_size, devices=...)`` picks one; ``reduce(fn, operands, data, plan)`` is the one
weighted sum (weights derived once from the counts); ``dataset_objective(f, plan)`` the data-set value with
a memory-bounded gradient. ``AXIS``, ``mesh``, ``place`` and ``resolve_devices`` are the one mesh axis and
placement of lsgeo; ``MEMORY_BUDGET_BYTES`` and ``chunked_map`` the one memory budget and chunked map.
Users normally meet all of this through ``lsgeo.Objective`` / ``lsgeo.Risk``.

Cost: that of ``fn`` on every microbatch. Memory: ``fn`` on one microbatch (per device) plus the result.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lsgeo import dataplan
  >>> batch = (jnp.arange(10.0), jnp.ones(10))
  >>> p = dataplan.plan(batch, 4, devices=[jax.devices()[0]])
  >>> p.size, p.num_full, p.remainder
  (4, 2, 2)
  >>> float(dataplan.reduce(lambda ops, b: jnp.mean(b[0]), (), batch, p))
  4.5
"""

from lsgeo.dataplan.budget import MEMORY_BUDGET_BYTES, activation_bytes, chunked_map
from lsgeo.dataplan.checks import check_mean_over_examples
from lsgeo.dataplan.devices import AXIS, mesh, place, resolve_devices
from lsgeo.dataplan.make import in_memory_plan, plan
from lsgeo.dataplan.memory import Layout, MicrobatchPlan
from lsgeo.dataplan.protocol import Plan
from lsgeo.dataplan.sharded import ShardedPlan, sharded_examples
from lsgeo.dataplan.stream import SourceChanged, StreamPlan, check_not_iterator, is_source, stream_plan, user_errors
from lsgeo.dataplan.summation import dataset_objective, reduce, weights
from lsgeo.dataplan.whole import WholeBatch

__all__ = [
    "Plan",
    "WholeBatch",
    "MicrobatchPlan",
    "Layout",
    "StreamPlan",
    "ShardedPlan",
    "SourceChanged",
    "plan",
    "in_memory_plan",
    "stream_plan",
    "is_source",
    "check_not_iterator",
    "sharded_examples",
    "reduce",
    "weights",
    "dataset_objective",
    "check_mean_over_examples",
    "user_errors",
    "AXIS",
    "mesh",
    "place",
    "resolve_devices",
    "MEMORY_BUDGET_BYTES",
    "chunked_map",
    "activation_bytes",
]
