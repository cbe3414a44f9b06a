"""Data-set-level evaluation in the memory of one microbatch, on one device or several.

Every objective of lsgeo is a mean over examples, f(w, B) = 1/n sum_{i in B} l(w, z_i), and so is each
of its derivatives. Cut the batch B (a pytree whose array leaves share a leading example axis n) into
``J = ceil(n / s)`` consecutive microbatches B_j of ``s = microbatch_size`` examples (the last one holds
the remaining ``n - (J - 1) s``); then exactly

    f(w, B) = sum_j (n_j / n) f(w, B_j),     D^p f(w, B)[v, ...] = sum_j (n_j / n) D^p f(w, B_j)[v, ...],

so the value, the gradient, a Hessian-vector product or a Gauss-Newton trace over a whole training set
is an example-weighted mean of the same quantity over microbatches, and only one microbatch is live at
a time. This holds only when ``f`` really is a mean over independent examples: a BatchNorm layer must be
in evaluation mode (its running statistics bound into ``predict``, e.g. ``lsgeo.models.make_predict(model,
model_state)``), since batch statistics couple the examples of a microbatch.

``reduce`` evaluates ``sum_j c_j fn(operands, B_j)`` (``c_j = n_j / n``, or 1 for sums) with a
``lax.scan`` over the full microbatches (one compiled body, whatever J is) plus one evaluation of the
uneven last microbatch (a second body of another shape; choose ``s`` dividing ``n`` to avoid it). With
several devices the full microbatches are sharded over a 1-D mesh (``jax.shard_map``): each device
scans its share and one ``psum`` (an all-reduce) combines them, so the result equals the one-device
value up to the order of the summation. The number of full microbatches is padded to a multiple of the
number of devices with copies that carry weight 0 (at most ``devices - 1`` wasted microbatches). The
data is laid out once (``layout``: each device holds its share of the microbatches, not a copy of the data
set), as the curvature operators do when they are built; the other arguments are replicated (``place``). On CPU, ``fn``'s convolutions are put in XLA:CPU's canonical layout (``lsgeo.cpu_convolutions``).

Cost: that of ``fn`` on every microbatch, ``ceil(n / s)`` evaluations. Memory: ``fn`` on one
microbatch (per device) plus the accumulated result.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lsgeo import microbatch
  >>> batch = (jnp.arange(10.0), jnp.ones(10))
  >>> plan = microbatch.make_plan(batch, 4, devices=[jax.devices()[0]])
  >>> plan.size, plan.num_full, plan.remainder
  (4, 2, 2)
  >>> mean_x = microbatch.reduce(lambda ops, b: jnp.mean(b[0]), (), batch, plan)
  >>> float(mean_x)
  4.5
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsgeo.cpu_convolutions import canonicalize_convolutions
from lsgeo.validation import check_batch, check_positive_int, is_concrete

PyTree = Any

__all__ = [
    "MicrobatchPlan",
    "Layout",
    "resolve_devices",
    "make_plan",
    "place",
    "layout",
    "reduce",
    "objective",
    "microbatch_struct",
    "single_example",
    "check_mean_over_examples",
    "MEMORY_BUDGET_BYTES",
    "StreamPlan",
    "is_source",
    "stream_plan",
    "data_plan",
    "ShardedPlan",
    "sharded_examples",
]

AXIS = "microbatches"

MEMORY_BUDGET_BYTES = 2**28
"""The one memory budget of lsgeo's automatic chunking (256 MiB): how many vectors go through one curvature
product together (``lsgeo.curvature.chunking``), how many examples one chunk of per-example Jacobians or
gradients holds (``lsgeo.per_example``, ``lsgeo.ntk``, ``lsgeo.risk.gauss_newton_diagonal``)."""


class MicrobatchPlan(NamedTuple):
    """How a batch of ``num_examples`` is cut (static, hashable: a ``jit`` static argument).

    size:       examples per microbatch ``s``.
    num_full:   number of full microbatches, ``n // s``.
    remainder:  examples in the uneven last microbatch, ``n % s`` (0: none).
    devices:    the devices the full microbatches are sharded over (one: no sharding).
    """

    num_examples: int
    size: int
    num_full: int
    remainder: int
    devices: tuple

    @property
    def num_microbatches(self) -> int:
        return self.num_full + (1 if self.remainder else 0)


class Layout(NamedTuple):
    """A batch laid out once for a plan over several devices (``layout``): the full microbatches stacked
    as ``[q_pad, s, ...]`` and sharded along their first axis over the plan's devices (each device holds
    its ``q_pad / devices`` microbatches, not a copy of the data set; padding copies carry weight 0), and
    the uneven last microbatch ``[r, ...]`` (``None`` when ``r = 0``), replicated."""

    full: PyTree
    rest: PyTree


def resolve_devices(devices, name: str = "devices") -> tuple:
    """``devices`` as a tuple (``None``: ``jax.devices()``): a non-empty sequence of distinct ``jax.Device``;
    anything else is a ValueError naming ``name``. The one device check of lsgeo (``lsgeo.train`` too)."""
    if devices is None:
        return tuple(jax.devices())
    if isinstance(devices, jax.Device):
        raise ValueError(f"{name} must be a sequence of jax devices (e.g. [{devices!r}]), got one device")
    try:
        devices = tuple(devices)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of jax devices, got {type(devices).__name__}") from None
    if not devices:
        raise ValueError(f"{name} must hold at least one device, got an empty sequence (None: jax.devices())")
    bad = [d for d in devices if not isinstance(d, jax.Device)]
    if bad:
        raise ValueError(f"{name} must hold jax devices (jax.devices()), got {bad[0]!r}")
    repeated = sorted({str(d) for d in devices if devices.count(d) > 1})
    if repeated:
        raise ValueError(f"{name} must not repeat a device; {', '.join(repeated)} appears more than once")
    return devices


class ShardedPlan(NamedTuple):
    """A batch given as ``jax.Array``s sharded along the example axis (over the devices of one process or of
    several, as ``jax.make_array_from_process_local_data`` builds it), used where it lies: each device cuts
    its own ``local_examples`` into microbatches of ``size`` (``num_full`` of them and a ``remainder``), and one
    ``psum`` over ``axis`` of ``mesh`` combines the devices. Nothing is gathered or replicated."""

    num_examples: int
    size: int
    local_examples: int
    num_full: int
    remainder: int
    mesh: Mesh
    axis: Any
    devices: tuple

    @property
    def num_microbatches(self) -> int:
        return self.num_full + (1 if self.remainder else 0)


def sharded_examples(batch):
    """``(mesh, axis)`` when every leaf of ``batch`` is a ``jax.Array`` with one ``NamedSharding`` that splits
    its leading (example) axis over a mesh axis and nothing else (and the batch spans several devices);
    None otherwise."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or not all(isinstance(a, jax.Array) and is_concrete(a) for a in leaves):
        return None
    shardings = {a.sharding for a in leaves}
    if len(shardings) != 1:
        return None
    sharding = shardings.pop()
    if not isinstance(sharding, NamedSharding) or len(sharding.device_set) < 2:
        return None
    spec = tuple(sharding.spec) + (None,) * (max(a.ndim for a in leaves) - len(sharding.spec))
    if not spec or spec[0] is None or any(p is not None for p in spec[1:]):
        return None
    return sharding.mesh, spec[0]


def _sharded_plan(batch, microbatch_size, mesh, axis, name):
    n = check_batch(batch, name, common_axis=True)
    axes = axis if isinstance(axis, tuple) else (axis,)
    parts = int(np.prod([mesh.shape[a] for a in axes]))
    if n % parts:
        raise ValueError(f"{name}: {n} examples do not split evenly over the {parts} shards of its example axis")
    local = n // parts
    size = local if microbatch_size is None else min(int(microbatch_size), local)
    num_full, remainder = divmod(local, size)
    return ShardedPlan(n, size, local, num_full, remainder, mesh, axis, tuple(mesh.devices.flat))


def data_plan(batch, microbatch_size: int | None, *, devices: Sequence | None = None, name: str = "batch"):
    """The plan of ``batch``, an in-memory batch (``make_plan``) or a data source (``stream_plan``: each of its
    batches is a microbatch, so ``microbatch_size`` must be None, and it is read on one device)."""
    if not is_source(batch):
        if microbatch_size is not None:
            check_positive_int(microbatch_size, "microbatch_size")
        where = sharded_examples(batch)
        if where is not None:
            if devices is not None:
                raise ValueError(f"devices must be None when {name} is sharded along its example axis: it is used "
                                 f"where it lies (on {len(where[0].devices.flat)} devices)")
            return _sharded_plan(batch, microbatch_size, *where, name)
        return make_plan(batch, microbatch_size, devices=devices, name=name)
    if microbatch_size is not None:
        raise ValueError(
            f"microbatch_size must be None when {name} is a data source: the source's batches are the microbatches "
            f"(got microbatch_size={microbatch_size!r})"
        )
    if devices is not None and len(resolve_devices(devices)) > 1:
        raise ValueError(f"a data source is read on one device; got devices={devices!r}")
    return stream_plan(batch, name=name)


def make_plan(batch, microbatch_size: int | None, *, devices: Sequence | None = None, name: str = "batch"):
    """Validates ``batch`` and ``microbatch_size`` and returns the ``MicrobatchPlan`` (``None`` when
    ``microbatch_size`` is None: the batch is used whole, on the default device).

    Args:
      batch: pytree of arrays; with microbatches every leaf needs the leading example axis n.
      microbatch_size: ``None`` or a positive int ``s`` (capped at n).
      devices: devices to shard the microbatches over (default ``jax.devices()``); used only with
        ``microbatch_size``.
      name: the name of the batch argument in error messages.

    Raises:
      ValueError: an empty batch (naming ``name``), leaves that disagree on n, a leaf without a leading
        axis, ``microbatch_size`` not a positive int, or ``devices`` not a sequence of devices.
    """
    if microbatch_size is None:
        check_batch(batch, name)
        if devices is not None:
            resolve_devices(devices)
        return None
    check_positive_int(microbatch_size, "microbatch_size")
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        if np.ndim(leaf) == 0:
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path) or '(root)'} has no leading example axis (shape "
                f"{np.shape(leaf)}); with microbatch_size every leaf of {name} must be an array [n, ...] "
                f"(bind constants such as BatchNorm statistics into the function instead)"
            )
    n = check_batch(batch, name, common_axis=True)
    devices = resolve_devices(devices)
    size = min(int(microbatch_size), n)
    num_full, remainder = divmod(n, size)
    return MicrobatchPlan(n, size, num_full, remainder, devices[: max(1, min(len(devices), num_full))])


def place(plan: MicrobatchPlan | None, *trees):
    """``trees`` with every concrete array that is not on exactly the plan's devices replicated over them; unchanged
    with one device. A computation over several devices cannot take an argument committed to one device
    (``jax.device_put(x, d)``): the public functions call this first. Over several processes
    (``jax.distributed``) the replicated array is assembled from each process's own copy of the value
    (``jax.make_array_from_callback``: every process must pass the same value, as for any replicated input).
    Tracers (a call inside the caller's own ``jit``) pass unchanged."""
    if plan is None or len(plan.devices) == 1:
        return trees
    devices = set(plan.devices)
    sharding = NamedSharding(_mesh(plan), PartitionSpec())

    def put(a):
        if not isinstance(a, (jax.Array, np.ndarray)) or not is_concrete(a):
            return a
        if isinstance(a, jax.Array) and a.sharding.device_set == devices:
            return a
        if sharding.is_fully_addressable:
            return jax.device_put(a, sharding)
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        value = np.asarray(a)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return tuple(jax.tree_util.tree_map(put, t) for t in trees)


def _mesh(plan: MicrobatchPlan) -> Mesh:
    return Mesh(np.asarray(plan.devices), (AXIS,))


def _num_padded(plan: MicrobatchPlan) -> int:
    return -(-plan.num_full // len(plan.devices)) * len(plan.devices)


def layout(plan: MicrobatchPlan | None, batch):
    """``batch`` laid out for ``plan``, once, so that every later ``reduce`` uses it where it lies.

    With several devices: a ``Layout`` whose full microbatches are sharded over the devices (data
    bytes per device: about ``n / devices`` examples, plus the uneven last microbatch) and whose last
    microbatch is replicated. With one device or no plan: ``batch`` unchanged (``reduce`` slices the
    microbatches in place, no copy). Concrete arrays are placed with ``jax.device_put``; inside ``jit``
    the same layout is requested with a sharding constraint.
    """
    if isinstance(plan, StreamPlan):
        return None
    if plan is None or isinstance(plan, ShardedPlan) or len(plan.devices) == 1 or isinstance(batch, Layout):
        return batch
    s, q, q_pad = plan.size, plan.num_full, _num_padded(plan)
    mesh = _mesh(plan)

    def stack(a):
        a = jnp.asarray(a)
        a = a[: q * s].reshape(q, s, *a.shape[1:])
        if q_pad > q:
            a = jnp.concatenate([a, a[: q_pad - q]])
        return a

    def put(tree, spec):
        sharding = NamedSharding(mesh, spec)
        if is_concrete(tree):
            return jax.device_put(tree, sharding)
        return jax.lax.with_sharding_constraint(tree, sharding)

    full = put(jax.tree_util.tree_map(stack, batch), PartitionSpec(AXIS))
    rest = None
    if plan.remainder:
        rest = put(jax.tree_util.tree_map(lambda a: jnp.asarray(a)[q * s :], batch), PartitionSpec())
    return Layout(full, rest)


def microbatch_struct(batch, plan: MicrobatchPlan | None):
    """``jax.ShapeDtypeStruct`` pytree of one full microbatch (of the whole batch when ``plan`` is None)."""
    if plan is None:
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), batch)
    if isinstance(plan, StreamPlan):
        structs = [jax.ShapeDtypeStruct((plan.size, *shape), dtype) for shape, dtype in plan.structs]
        return jax.tree_util.tree_unflatten(plan.treedef, structs)
    if isinstance(batch, Layout):
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), batch.full)
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((plan.size, *np.shape(a)[1:]), jnp.result_type(a)), batch
    )


class StreamPlan(NamedTuple):
    """A data source read batch by batch from the host (static, hashable; ``stream_plan`` makes it).

    source:     the zero-argument callable that returns a fresh iterator of batches.
    num_examples, size, num_full, remainder: as in ``MicrobatchPlan``, the source's batches being the
                microbatches (every batch of ``size`` examples but the last, which may hold fewer).
    treedef, structs: the structure of a batch and ``(shape[1:], dtype)`` of each leaf.
    devices:    the one device the batches are fetched to.
    """

    source: Callable
    num_examples: int
    size: int
    num_full: int
    remainder: int
    treedef: Any
    structs: tuple
    devices: tuple

    @property
    def num_microbatches(self) -> int:
        return self.num_full + (1 if self.remainder else 0)


def is_source(batch) -> bool:
    """Whether ``batch`` is a data source: a zero-argument callable returning an iterator of batches."""
    return callable(batch) and not isinstance(batch, (jax.Array, np.ndarray, tuple, list, dict))


def _leaves_of(batch, where: str):
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    if not leaves or any(np.ndim(a) == 0 for a in leaves):
        raise ValueError(f"{where} must be a pytree of arrays with a leading example axis, got {type(batch).__name__}")
    sizes = {int(np.shape(a)[0]) for a in leaves}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"{where}: leaves must share a non-empty leading example axis, got sizes {sorted(sizes)}")
    return leaves, treedef, sizes.pop()


def stream_plan(source: Callable, *, name: str = "batch") -> StreamPlan:
    """Reads the data source ``source`` once (host memory: one batch at a time) and returns its plan.

    Every batch but the last must hold the same number of examples (the last may hold fewer) and every
    batch the same structure, trailing shapes and dtypes: a ValueError names the batch that does not.
    Later passes (one per product) must yield the same sequence; one that does not is an error when read.

    Each product is then one pass over the source inside the compiled program: a ``lax.fori_loop`` whose
    body fetches the next batch from the host (``jax.pure_callback``) and evaluates the per-batch product,
    weighted exactly by its share of the examples, so every estimator runs unchanged (PyHessian's
    dataloader mode, compiled). Device memory: one batch; host memory: what the source holds (a numpy
    memmap cut into batches reads from disk). Prefer in-memory microbatches (``microbatch_size``) when the
    data set fits in device memory: they need no host round trip per batch and shard over devices;
    stream when it does not. Batches arrive through a host callback that XLA may run on another thread:
    for float64, set ``jax.config.update("jax_enable_x64", True)`` globally (the thread-local
    ``jax.enable_x64`` context does not reach that thread).

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from lsgeo import microbatch
      >>> x = np.arange(10.0)
      >>> plan = microbatch.stream_plan(lambda: (x[i : i + 4] for i in range(0, 10, 4)))
      >>> plan.num_examples, plan.size, plan.num_full, plan.remainder
      (10, 4, 2, 2)
      >>> float(microbatch.reduce(lambda ops, b: jnp.mean(b), (), None, plan))
      4.5
    """
    leaves_seen, first, count, sizes = None, None, 0, []
    for index, batch in enumerate(source()):
        leaves, treedef, n = _leaves_of(batch, f"{name} source: batch {index}")
        struct = tuple((tuple(np.shape(a)[1:]), np.dtype(jnp.result_type(a))) for a in leaves)
        if first is None:
            first = (treedef, struct)
        elif (treedef, struct) != first:
            raise ValueError(f"{name} source: batch {index} has structure/shapes {treedef}, {struct}; batch 0 had {first}")
        if sizes and sizes[-1] != sizes[0]:
            raise ValueError(
                f"{name} source: batch {index - 1} holds {sizes[-1]} examples where the others hold {sizes[0]}: "
                f"only the last batch may be smaller"
            )
        sizes.append(n)
        count += n
        leaves_seen = True
    if not leaves_seen:
        raise ValueError(f"{name} source yielded no batch")
    size = sizes[0]
    if len(sizes) > 1 and sizes[-1] > size:
        raise ValueError(f"{name} source: the last batch holds {sizes[-1]} examples, more than the {size} of the others")
    remainder = sizes[-1] if sizes[-1] != size else 0
    return StreamPlan(source, count, size, len(sizes) - (1 if remainder else 0), remainder, first[0], first[1],
                      (jax.devices()[0],))


class _Reader:
    """Host side of a stream: hands out batch ``j`` of the current pass, restarting the source when asked for
    an earlier batch, and checks that each pass yields the batches of the plan."""

    def __init__(self, plan: StreamPlan):
        self.plan, self.iterator, self.position = plan, None, 0

    def __call__(self, j):
        plan, j = self.plan, int(j)
        if self.iterator is None or j < self.position:
            self.iterator, self.position = iter(plan.source()), 0
        while self.position <= j:
            batch = next(self.iterator, None)
            if batch is None:
                raise ValueError(
                    f"the data source yielded {self.position} batches on this pass, where its first pass yielded "
                    f"{plan.num_microbatches}: a source must yield the same batches on every pass"
                )
            self.position += 1
        expected = plan.size if j < plan.num_full else plan.remainder
        leaves, treedef, n = _leaves_of(batch, f"data source batch {j}")
        if n != expected or treedef != plan.treedef:
            raise ValueError(
                f"the data source yielded a batch {j} of {n} examples where its first pass had {expected}: a source "
                f"must yield the same batches on every pass (the data set's products would be wrongly weighted)"
            )
        if j == plan.num_microbatches - 1 and next(self.iterator, None) is not None:
            raise ValueError(
                f"the data source yielded more than the {plan.num_microbatches} batches of its first pass: a source "
                f"must yield the same batches on every pass"
            )
        return tuple(np.asarray(a, dtype) for a, (_, dtype) in zip(leaves, plan.structs))


def _stream_sum(fn, operands, plan: StreamPlan):
    """``(sum of fn over the full batches, fn on the last batch or None)``: a ``lax.fori_loop`` whose body
    fetches batch j from the host (``jax.pure_callback``) and evaluates ``fn`` on it."""
    reader = _Reader(plan)

    def fetch(j, n):
        structs = tuple(jax.ShapeDtypeStruct((n, *shape), dtype) for shape, dtype in plan.structs)
        leaves = jax.pure_callback(reader, structs, j, vmap_method="sequential")
        return jax.tree_util.tree_unflatten(plan.treedef, list(leaves))

    struct = jax.eval_shape(lambda o: fn(o, fetch(jnp.zeros((), jnp.int32), plan.size)), operands)
    total = _zeros(struct)
    if plan.num_full:
        total = jax.lax.fori_loop(
            0, plan.num_full, lambda j, acc: jax.tree_util.tree_map(jnp.add, acc, fn(operands, fetch(j, plan.size))),
            total,
        )
    rest = fn(operands, fetch(jnp.asarray(plan.num_full, jnp.int32), plan.remainder)) if plan.remainder else None
    return total, rest


def reduce(fn: Callable, operands: PyTree, batch, plan: MicrobatchPlan | None, *, mean: bool = True) -> PyTree:
    """``sum_j c_j fn(operands, B_j)`` over the microbatches B_j of ``plan``; ``fn(operands, batch)`` if
    ``plan`` is None.

    ``c_j = n_j / n`` (``mean=True``: the exact data-set value of a mean over examples) or 1 (``mean=False``:
    a sum over examples, e.g. an NTK trace). ``batch`` is the batch itself or its ``layout(plan, batch)``
    (several devices: laid out once, then used where it lies by every call). ``fn`` returns a pytree of floating arrays; ``operands`` (the
    parameters, a tangent, a key) are passed unchanged to every call and replicated over the devices.
    Traceable: call it inside ``jit``; one compiled body of ``fn`` runs every full microbatch. On CPU the
    convolutions of ``fn`` are put in XLA:CPU's canonical layout first (``lsgeo.cpu_convolutions``: inside
    a loop body XLA:CPU would otherwise run the kernel-gradient convolutions of a conv net 10-45x slower).
    """
    fn = canonicalize_convolutions(fn, plan.devices[0].platform if plan is not None else None)
    if plan is None:
        return fn(operands, batch)
    n, s, q, r = plan.num_examples, plan.size, plan.num_full, plan.remainder
    full_weight = s / n if mean else 1.0
    if isinstance(plan, ShardedPlan):
        return _global_sum(fn, operands, batch, plan, mean)
    if isinstance(plan, StreamPlan):
        total, rest = _stream_sum(fn, operands, plan)
        total = jax.tree_util.tree_map(lambda t: t * jnp.asarray(full_weight, t.dtype), total)
        if rest is not None:
            rest_weight = r / n if mean else 1.0
            total = jax.tree_util.tree_map(lambda t, o: t + o * jnp.asarray(rest_weight, o.dtype), total, rest)
        return total
    if len(plan.devices) > 1:
        batch = layout(plan, batch)
        total = _sharded_sum(fn, operands, batch.full, plan)
    else:
        total = _scan_sum(fn, operands, batch, plan)
    total = jax.tree_util.tree_map(lambda t: t * jnp.asarray(full_weight, t.dtype), total)
    if r:
        last = batch.rest if isinstance(batch, Layout) else jax.tree_util.tree_map(lambda a: a[q * s :], batch)
        rest = fn(operands, last)
        rest_weight = r / n if mean else 1.0
        total = jax.tree_util.tree_map(lambda t, o: t + o * jnp.asarray(rest_weight, o.dtype), total, rest)
    return total


def _output_struct(fn, operands, batch, plan):
    return jax.eval_shape(fn, operands, microbatch_struct(batch, plan))


def _zeros(struct):
    return jax.tree_util.tree_map(lambda sd: jnp.zeros(sd.shape, sd.dtype), struct)


def _scan_sum(fn, operands, batch, plan):
    """One device: ``lax.scan`` over the full microbatches, each sliced in place (no copy of the batch)."""
    s = plan.size

    def body(acc, j):
        mb = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, j * s, s, axis=0), batch)
        return jax.tree_util.tree_map(jnp.add, acc, fn(operands, mb)), None

    init = _zeros(_output_struct(fn, operands, batch, plan))
    total, _ = jax.lax.scan(body, init, jnp.arange(plan.num_full))
    return total


def _sharded_sum(fn, operands, full, plan):
    """Several devices: the full microbatches ``[q_pad, s, ...]`` (a ``Layout``'s, sharded over a 1-D mesh),
    a ``lax.scan`` on each device over its share (padding copies masked out), one ``psum``."""
    weights = jnp.asarray(np.arange(_num_padded(plan)) < plan.num_full)
    struct = jax.eval_shape(fn, operands, jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), full))

    def local(operands, full, weights):
        def body(acc, xs):
            mb, w = xs
            out = fn(operands, mb)
            return jax.tree_util.tree_map(lambda t, o: t + jnp.where(w, o, jnp.zeros_like(o)), acc, out), None

        total, _ = jax.lax.scan(body, _zeros(struct), (full, weights))
        return jax.lax.psum(total, AXIS)

    sharded = jax.shard_map(
        local,
        mesh=_mesh(plan),
        in_specs=(PartitionSpec(), PartitionSpec(AXIS), PartitionSpec(AXIS)),
        out_specs=PartitionSpec(),
        check_vma=False,
    )
    return sharded(operands, full, weights)


def _global_sum(fn, operands, batch, plan: ShardedPlan, mean: bool):
    """A batch sharded along its examples: on each device a ``lax.scan`` over its own microbatches (and its
    uneven last one), weighted by their share of all ``n`` examples, then one ``psum`` over the example axis."""
    n, s, q, r = plan.num_examples, plan.size, plan.num_full, plan.remainder

    def local(operands, shard):
        total = None
        if q:
            def body(acc, j):
                mb = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, j * s, s, axis=0), shard)
                return jax.tree_util.tree_map(jnp.add, acc, fn(operands, mb)), None

            mb_struct = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((s, *a.shape[1:]), a.dtype), shard)
            total, _ = jax.lax.scan(body, _zeros(jax.eval_shape(fn, operands, mb_struct)), jnp.arange(q))
            total = jax.tree_util.tree_map(lambda t: t * jnp.asarray(s / n if mean else 1.0, t.dtype), total)
        if r:
            rest = fn(operands, jax.tree_util.tree_map(lambda a: a[q * s :], shard))
            rest = jax.tree_util.tree_map(lambda o: o * jnp.asarray(r / n if mean else 1.0, o.dtype), rest)
            total = rest if total is None else jax.tree_util.tree_map(jnp.add, total, rest)
        return jax.lax.psum(total, plan.axis)

    spec = PartitionSpec(plan.axis)
    return jax.shard_map(local, mesh=plan.mesh, in_specs=(PartitionSpec(), spec), out_specs=PartitionSpec(),
                         check_vma=False)(operands, batch)


def objective(f: Callable, plan: MicrobatchPlan | None) -> Callable:
    """``F(params, batch) = sum_j (n_j / n) f(params, B_j)``, the data-set objective, with a
    memory-bounded gradient (``f`` itself when ``plan`` is None).

    ``F`` is a ``jax.custom_vjp``: its value is one ``reduce`` of ``f``; under ``jax.grad`` /
    ``value_and_grad`` the forward pass runs ``jax.value_and_grad(f)`` on each microbatch inside the same
    scan and keeps only the accumulated gradient (differentiating through the scan itself would store
    the activations of every microbatch). Reverse mode with respect to ``params`` only; no forward-mode
    derivatives (use ``lsgeo.curvature`` for curvature). Cost of a gradient: one gradient per microbatch.
    """
    if plan is None:
        return f

    @jax.custom_vjp
    def dataset_objective(params, batch):
        return reduce(lambda p, mb: f(p, mb), params, batch, plan)

    def fwd(params, batch):
        value, grad = reduce(lambda p, mb: jax.value_and_grad(f)(p, mb), params, batch, plan)
        return value, grad

    def bwd(grad, g):
        return jax.tree_util.tree_map(lambda x: (g * x).astype(x.dtype), grad), None

    dataset_objective.defvjp(fwd, bwd)
    return dataset_objective


def single_example(predict: Callable) -> Callable:
    """``phi_i(params, x_i) = predict(params, x_i[None])`` flattened to ``[k]``: the predictor on one
    example (``x_i`` a pytree slice without the example axis), for per-example Jacobians."""

    @functools.wraps(predict)
    def one(params, xi):
        out = predict(params, jax.tree_util.tree_map(lambda a: a[None], xi))
        return jnp.reshape(out, (-1,))

    return one


_CHECKED: dict = {}  # (fn, plan) pairs already checked, oldest first (at most _MAX_CHECKED kept)
_MAX_CHECKED = 128


def check_mean_over_examples(fn: Callable, params, batch, plan: MicrobatchPlan | None, *, name: str = "f") -> None:
    """Raises ValueError when the scalar ``fn(params, batch)`` is evidently not a mean over independent
    examples, the precondition of every microbatched value (a BatchNorm layer in training mode couples the
    examples of a microbatch through its batch statistics, and the "data-set value" would silently depend
    on the cut).

    Checks ``fn(B_1 u B_2) = (fn(B_1) + fn(B_2)) / 2`` on the first two full microbatches (three eager
    evaluations; tolerance ``1000 eps`` relative to the values), once per (``fn``, plan). Nothing is
    checked without a plan, with fewer than two full microbatches, or under tracing.
    """
    if not isinstance(plan, MicrobatchPlan) or plan.num_full < 2 or not _checkable(params, batch):
        return
    try:
        token = (fn, plan)
        if token in _CHECKED:
            return
    except TypeError:  # an unhashable fn: check every time
        token = None
    s = plan.size
    first = jax.tree_util.tree_map(lambda a: a[:s], batch)
    second = jax.tree_util.tree_map(lambda a: a[s : 2 * s], batch)
    both = jax.tree_util.tree_map(lambda a: a[: 2 * s], batch)
    values = [fn(params, b) for b in (first, second, both)]
    if not is_concrete(values):  # called inside an outer jit: every operation is staged, nothing to check
        return
    values = [np.asarray(v, np.float64) for v in values]
    if all(np.ndim(v) == 0 and np.isfinite(v) for v in values):
        eps = float(jnp.finfo(jnp.result_type(*jax.tree_util.tree_leaves(params))).eps)
        scale = max(abs(float(v)) for v in values)
        if abs(float(values[2]) - 0.5 * float(values[0] + values[1])) > 1000 * eps * max(scale, 1e-30):
            raise ValueError(
                f"{name} is not a mean over independent examples: on two microbatches of {s} examples it gives "
                f"{float(values[0]):.6g} and {float(values[1]):.6g}, but {float(values[2]):.6g} on both together "
                f"(their mean is {0.5 * float(values[0] + values[1]):.6g}). With microbatch_size the data-set value "
                f"would depend on the cut. A BatchNorm layer in training mode does this: bind its running "
                f"statistics (evaluation mode), e.g. lsgeo.models.make_predict(model, model_state); or pass "
                f"microbatch_size=None to use the batch whole"
            )
    if token is not None:
        _CHECKED[token] = None
        if len(_CHECKED) > _MAX_CHECKED:
            del _CHECKED[next(iter(_CHECKED))]


def _checkable(params, batch) -> bool:
    """Whether ``params`` and ``batch`` hold values (not tracers) on which a check can run eagerly."""
    return is_concrete(params) and is_concrete(batch) and not isinstance(batch, Layout)
