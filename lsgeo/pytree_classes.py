"""Dataclasses as pytrees whose structures tell the classes apart.

``jax.tree_util.register_dataclass`` (jax 0.8-0.10) builds structures that compare equal for two different
classes with equal static fields, although their hashes differ: ``tree_structure(GaussNewton(...)) ==
tree_structure(EmpiricalFisher(...))`` was True for one model and data. ``jax.jit`` keys its compiled
programs by the structure of its arguments, so when the two hashes fall in one bucket of its cache, a call
with one class ran the program compiled for the other: an order-dependent wrong result, with no error (the
empirical Fisher returned the Gauss-Newton matrix, 2 of 1,020 tests, in about one suite run in four). The
same defect is reported for sibling dataclasses in cusp-ai-oss/kUPS#114. A node registered with
``jax.tree_util.register_pytree_with_keys`` compares its registration (its class) first, so
:func:`register_dataclass` registers that way, with ``register_dataclass``'s semantics: fields with
``metadata={"static": True}`` are the structure's auxiliary data (hashed and compared), the others children
(with ``GetAttrKey`` paths), and unflattening calls the class with keywords.

Example:
  >>> import dataclasses, jax
  >>> @register_dataclass
  ... @dataclasses.dataclass(frozen=True)
  ... class A:
  ...     x: float
  ...     name: str = dataclasses.field(default="a", metadata={"static": True})
  >>> @register_dataclass
  ... @dataclasses.dataclass(frozen=True)
  ... class B:
  ...     x: float
  ...     name: str = dataclasses.field(default="a", metadata={"static": True})
  >>> jax.tree_util.tree_structure(A(1.0)) == jax.tree_util.tree_structure(B(1.0))
  False
"""

from __future__ import annotations

import dataclasses

import jax

__all__ = ["register_dataclass"]


def register_dataclass(cls: type) -> type:
    """Registers the dataclass ``cls`` as a pytree node distinct from every other class (module doc) and returns it.
    Every field must be an ``__init__`` argument (as ``jax.tree_util.register_dataclass`` requires)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_dataclass: {cls!r} is not a dataclass")
    fields = dataclasses.fields(cls)
    if not_init := [f.name for f in fields if not f.init]:
        raise TypeError(f"register_dataclass: {cls.__name__} has fields outside __init__: {not_init}")
    data = tuple(f.name for f in fields if not f.metadata.get("static", False))
    meta = tuple(f.name for f in fields if f.metadata.get("static", False))

    def flatten_with_keys(obj):
        return [(jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data], tuple(getattr(obj, n) for n in meta)

    def flatten(obj):
        return [getattr(obj, n) for n in data], tuple(getattr(obj, n) for n in meta)

    def unflatten(aux, children):
        return cls(**dict(zip(meta, aux)), **dict(zip(data, children)))

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
