"""The streamed plan: a data source read batch by batch from the host, each of its batches a microbatch.

A data source is a zero-argument callable returning a fresh iterator of batches (a generator function, a
numpy memmap cut into batches, a grain DataLoader). ``stream_plan`` reads it once (host memory: one batch
at a time), checks that every batch but the last holds the same number of examples and every batch the
same structure, trailing shapes and dtypes, and records a cheap checksum of each batch (CRC-32 of its
bytes). Each later sum is one pass over the source inside the compiled program (a ``lax.fori_loop`` whose
body fetches batch j with ``jax.pure_callback``), and a pass whose batches differ from the first pass's
(another count, structure or contents: augmentation, a random subset) is an error: the products of
estimators that combine several passes would mix two data sets. The error is raised in the host
callback; ``user_errors`` (applied where lsgeo compiles a program that evaluates an objective,
``lsgeo.objective.compiled``) turns the runtime error that JAX reports into the exception it was: the
``SourceChanged`` (a ``ValueError``), or the source's own error on a later pass (an ``OSError`` of a file that
went away, any exception the source raised).

Device memory: one batch; host memory: what the source holds. Batches arrive through a host callback
that XLA may run on another thread: for float64 sources set ``jax.config.update("jax_enable_x64", True)``
globally or use ``with jax.enable_x64():`` around the whole computation (the batches are handed over with
the dtypes recorded on the first pass).

Example:
  >>> import jax.numpy as jnp, numpy as np
  >>> from lsgeo import dataplan
  >>> x = np.arange(10.0)
  >>> plan = dataplan.stream_plan(lambda: (x[i : i + 4] for i in range(0, 10, 4)))
  >>> plan.num_examples, plan.size, plan.num_full, plan.remainder
  (10, 4, 2, 2)
  >>> float(dataplan.reduce(lambda ops, b: jnp.mean(b), (), None, plan))
  4.5
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo.dataplan.protocol import PlanCounts

__all__ = ["StreamPlan", "SourceChanged", "is_source", "check_not_iterator", "stream_plan", "user_errors"]


class SourceChanged(ValueError):
    """A data source yielded other batches on a later pass than on its first."""


def is_source(batch) -> bool:
    """Whether ``batch`` is a data source: a zero-argument callable returning an iterator of batches."""
    return callable(batch) and not isinstance(batch, (jax.Array, np.ndarray, tuple, list, dict))


def check_not_iterator(batch, name: str = "batch") -> None:
    """A generator or other iterator passed where a data source is meant is a ValueError (it can be read only
    once, and every product needs a pass)."""
    if isinstance(batch, collections.abc.Iterator):
        raise ValueError(
            f"{name} is an iterator ({type(batch).__name__}), which can be read only once; a data source is a "
            f"zero-argument callable returning a fresh iterator on every call: pass the generator function itself "
            f"(source, not source()), or e.g. lambda: iter(loader)"
        )


def _leaves_of(batch, where: str):
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    if not leaves or any(np.ndim(a) == 0 for a in leaves):
        raise ValueError(f"{where} must be a pytree of arrays with a leading example axis, got {type(batch).__name__}")
    sizes = {int(np.shape(a)[0]) for a in leaves}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"{where}: leaves must share a non-empty leading example axis, got sizes {sorted(sizes)}")
    return leaves, treedef, sizes.pop()


def _structure(leaves):
    return tuple((tuple(np.shape(a)[1:]), np.dtype(jnp.result_type(a))) for a in leaves)


def _checksum(leaves) -> int:
    value = 0
    for a in leaves:
        value = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), value)
    return value


def _what_changed(treedef, struct, n, expected_treedef, expected_struct, expected_n) -> str:
    if treedef != expected_treedef:
        return f"its structure is {treedef} where it was {expected_treedef}"
    for i, ((shape, dtype), (shape0, dtype0)) in enumerate(zip(struct, expected_struct)):
        if shape != shape0:
            return f"leaf {i} has trailing shape {shape} where it had {shape0}"
        if dtype != dtype0:
            return f"leaf {i} has dtype {dtype} where it had {dtype0}"
    if n != expected_n:
        return f"it holds {n} examples where it held {expected_n}"
    return "its contents differ (another checksum)"


@dataclasses.dataclass(frozen=True)
class StreamPlan(PlanCounts):
    """A data source read batch by batch from the host (static, hashable; ``stream_plan`` makes it).

    source:     the zero-argument callable that returns a fresh iterator of batches.
    num_examples, size, num_full, remainder: the source's batches are the microbatches (every batch of
                ``size`` examples but the last, which may hold fewer).
    treedef, structs: the structure of a batch and ``(shape[1:], dtype)`` of each leaf.
    checksums:  CRC-32 of each batch of the first pass.
    devices:    the one device the batches are fetched to.
    """

    source: Callable
    num_examples: int
    size: int
    num_full: int
    remainder: int
    treedef: Any
    structs: tuple
    checksums: tuple
    devices: tuple

    def layout(self, batch):
        return None

    def struct(self, data):
        structs = [jax.ShapeDtypeStruct((self.size, *shape), dtype) for shape, dtype in self.structs]
        return jax.tree_util.tree_unflatten(self.treedef, structs)

    def sums(self, fn, operands, data):
        """A ``lax.fori_loop`` over the full batches, each fetched from the host (``jax.pure_callback``)."""
        reader = _Reader(self)

        def fetch(j, n):
            structs = tuple(jax.ShapeDtypeStruct((n, *shape), dtype) for shape, dtype in self.structs)
            leaves = jax.pure_callback(reader, structs, j, vmap_method="sequential")
            return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

        full = None
        if self.num_full:
            struct = jax.eval_shape(lambda o: fn(o, fetch(jnp.zeros((), jnp.int32), self.size)), operands)
            init = jax.tree_util.tree_map(lambda sd: jnp.zeros(sd.shape, sd.dtype), struct)
            full = jax.lax.fori_loop(
                0, self.num_full, lambda j, acc: jax.tree_util.tree_map(jnp.add, acc, fn(operands, fetch(j, self.size))),
                init)
        last = fn(operands, fetch(jnp.asarray(self.num_full, jnp.int32), self.remainder)) if self.remainder else None
        return full, last

    def describe(self) -> str:
        return f"a source of {self.num_microbatches} batches of {self.size}"


def stream_plan(source: Callable, *, name: str = "batch", check: Callable | None = None) -> StreamPlan:
    """Reads the data source ``source`` once and returns its plan (see the module docstring); ``check(batch)``,
    if given, runs on every batch (e.g. a loss's label check).

    Raises:
      ValueError: a source that yields nothing, a batch (not the last) smaller than the first, a last batch
        larger than the others, a batch whose structure, trailing shapes or dtypes differ from batch 0's
        (the message names the batch and what changed), or an iterator in place of a source.
    """
    check_not_iterator(source, name)
    first, sizes, checksums = None, [], []
    for index, batch in enumerate(source()):
        leaves, treedef, n = _leaves_of(batch, f"{name} source: batch {index}")
        struct = _structure(leaves)
        if first is None:
            first = (treedef, struct)
        elif (treedef, struct) != first:
            change = _what_changed(treedef, struct, n, first[0], first[1], n)
            raise ValueError(f"{name} source: batch {index} differs from batch 0: {change}")
        if sizes and sizes[-1] != sizes[0]:
            raise ValueError(
                f"{name} source: batch {index - 1} holds {sizes[-1]} examples where the others hold {sizes[0]}: "
                f"only the last batch may be smaller"
            )
        if check is not None:
            check(batch)
        sizes.append(n)
        checksums.append(_checksum(leaves))
    if first is None:
        raise ValueError(f"{name} source yielded no batch")
    size = sizes[0]
    if len(sizes) > 1 and sizes[-1] > size:
        raise ValueError(f"{name} source: the last batch holds {sizes[-1]} examples, more than the {size} of the others")
    remainder = sizes[-1] if sizes[-1] != size else 0
    return StreamPlan(source, sum(sizes), size, len(sizes) - (1 if remainder else 0), remainder, first[0], first[1],
                      tuple(checksums), (jax.devices()[0],))


#: the exceptions the host side of a stream raised most recently (a callback's exception reaches the caller only as
#: the text of a ``JaxRuntimeError``; ``user_errors`` finds it here and re-raises it)
_RAISED: collections.deque = collections.deque(maxlen=16)


class _Reader:
    """Host side of a stream: hands out batch ``j`` of the current pass, restarting the source when asked for
    an earlier batch, and checks that each pass yields the batches of the first (count, structure, checksum).
    Whatever it raises (``SourceChanged``, the source's own error) is recorded for ``user_errors``."""

    def __init__(self, plan: StreamPlan):
        self.plan, self.iterator, self.position = plan, None, 0

    def __call__(self, j):
        try:
            return self._batch(int(j))
        except Exception as error:
            self.iterator = None  # the next pass starts afresh
            _RAISED.append(error)
            raise

    def _batch(self, j):
        plan = self.plan
        if self.iterator is None or j < self.position:
            self.iterator, self.position = iter(plan.source()), 0
        while self.position <= j:
            batch = next(self.iterator, None)
            if batch is None:
                raise SourceChanged(
                    f"the data source yielded {self.position} batches on this pass, where its first pass yielded "
                    f"{plan.num_microbatches}: a source must yield the same batches on every pass"
                )
            self.position += 1
        expected = plan.size if j < plan.num_full else plan.remainder
        leaves, treedef, n = _leaves_of(batch, f"data source batch {j}")
        struct = _structure(leaves)
        if n != expected or treedef != plan.treedef or struct != plan.structs or _checksum(leaves) != plan.checksums[j]:
            change = _what_changed(treedef, struct, n, plan.treedef, plan.structs, expected)
            raise SourceChanged(
                f"the data source yielded another batch {j} than on its first pass: {change}. A source must yield the "
                f"same batches on every pass (estimators combine several passes); draw augmentations or subsets "
                f"outside the source, or fix their seed per pass"
            )
        if j == plan.num_microbatches - 1 and next(self.iterator, None) is not None:
            raise SourceChanged(
                f"the data source yielded more than the {plan.num_microbatches} batches of its first pass: a source "
                f"must yield the same batches on every pass"
            )
        return tuple(np.asarray(a, dtype) for a, (_, dtype) in zip(leaves, plan.structs))


def user_errors(fn: Callable) -> Callable:
    """``fn`` with the errors of a data source's host side (``SourceChanged``, or the source's own ``OSError`` /
    any exception on a later pass), which JAX reports as a ``JaxRuntimeError`` (or a ``ValueError``) whose text
    names them, re-raised as themselves. The result is waited for (``jax.block_until_ready``) so that the error
    arrives here, not at a later use of an asynchronously dispatched result."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return jax.block_until_ready(fn(*args, **kwargs))
        except Exception as error:  # a JaxRuntimeError (or, from some dispatch paths, a ValueError) naming it
            original = _original(error)
            if original is None or original is error:
                raise
            raise original from error

    return wrapped


def _original(error: Exception) -> BaseException | None:
    """The recorded host-side exception whose ``"Type: message"`` the text of ``error`` holds, the latest first."""
    text = str(error)
    for raised in reversed(_RAISED):
        if f"{type(raised).__name__}: {raised}" in text:
            return raised
    return None
