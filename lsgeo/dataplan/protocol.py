"""The plan protocol: what every data plan (whole batch, in-memory microbatches, a streamed source, a
process-sharded global batch) tells the one summation ``lsgeo.dataplan.reduce``.

A plan is static and hashable (a ``jit`` static argument, part of an operator's or an objective's
treedef). It states how the ``num_examples`` examples are cut: ``num_full`` microbatches of ``size``
examples and an uneven last one of ``remainder`` examples (0: none), and where they live (``devices``).
It knows three things about the data it cut:

  ``layout(batch)``           the batch placed once, as every later sum reads it (the carried data);
  ``struct(data)``            a ``jax.ShapeDtypeStruct`` pytree of one full microbatch;
  ``sums(fn, operands, data)``  ``(sum_j fn(operands, B_j) over the full microbatches, fn on the last)``,
                              unweighted (either may be None);

and ``place(*trees)`` replicates other arguments over its devices. The weights ``n_j / n`` are not the
plan's business: ``reduce`` derives them once from the counts.

Example:
  >>> from lsgeo import dataplan
  >>> isinstance(dataplan.plan((1.0,)), dataplan.Plan)
  True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from lsgeo.dataplan import devices as devices_lib

__all__ = ["Plan", "PlanCounts"]

PyTree = Any


@runtime_checkable
class Plan(Protocol):
    """A data plan (see the module docstring)."""

    num_examples: int
    size: int
    num_full: int
    remainder: int
    devices: tuple

    @property
    def num_microbatches(self) -> int: ...

    @property
    def in_memory(self) -> bool: ...

    @property
    def whole(self) -> bool: ...

    def layout(self, batch) -> PyTree: ...

    def struct(self, data) -> PyTree: ...

    def sums(self, fn: Callable, operands: PyTree, data) -> tuple[PyTree | None, PyTree | None]: ...

    def place(self, *trees) -> tuple: ...


class PlanCounts:
    """The part every plan shares (a base of the plans' frozen dataclasses): counts and placement."""

    @property
    def num_microbatches(self) -> int:
        """``num_full`` plus one for an uneven last microbatch."""
        return self.num_full + (1 if self.remainder else 0)

    @property
    def in_memory(self) -> bool:
        """Whether the whole batch is in this process's memory (checks can slice it eagerly)."""
        return False

    @property
    def whole(self) -> bool:
        """Whether the batch is used whole, as one microbatch (``f`` itself is the data-set objective)."""
        return False

    @property
    def platform(self) -> str:
        """The platform of the devices the microbatches run on."""
        return self.devices[0].platform

    def place(self, *trees) -> tuple:
        """``trees`` replicated over the plan's devices (``lsgeo.dataplan.place``)."""
        return devices_lib.place(self.devices, *trees)

    def describe(self) -> str:
        """``"3 microbatches of 4"`` (for reprs and messages)."""
        return f"{self.num_microbatches} microbatches of {self.size}"
