"""The whole-batch plan: the batch used at once, on the default device, as one microbatch."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo.dataplan.protocol import PlanCounts

__all__ = ["WholeBatch"]


@dataclasses.dataclass(frozen=True)
class WholeBatch(PlanCounts):
    """The batch at once (no cut): ``fn(operands, batch)`` is the sum, with weight 1. ``num_examples`` is
    the batch's common leading size, or 0 when its leaves have none (an objective that ignores its batch)."""

    num_examples: int
    devices: tuple

    size = property(lambda self: self.num_examples)
    num_full = property(lambda self: 1)
    remainder = property(lambda self: 0)
    whole = property(lambda self: True)
    in_memory = property(lambda self: True)

    def layout(self, batch):
        return batch

    def struct(self, data):
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), data)

    def sums(self, fn, operands, data) -> tuple[Any, None]:
        return fn(operands, data), None

    def describe(self) -> str:
        return "whole batch"
