"""Re-evaluating a traced function with a few of its equations handled by the caller.

Two of lsgeo's speed devices work on the jaxpr of a user's function: the ghost-norm tracer of
``lsgeo.per_example`` (it adds zero "taps" at dense layers) and ``lsgeo.cpu_convolutions`` (it rewrites
convolutions into XLA:CPU's fast layout). Both need the same interpreter: walk the equations, hand
the chosen ones (and the calls that contain chosen ones) to a callback, and evaluate every run of
ordinary equations in between as one sub-jaxpr through JAX's own public evaluator
(``jax.extend.core.jaxpr_as_fun``, else ``jax.core.eval_jaxpr``), so that nothing is re-implemented.

JAX surface used, each looked up with ``getattr`` (nothing from ``jax._src``): ``jax.extend.core``
(``Jaxpr``, ``ClosedJaxpr``, ``Literal``, ``DropVar``, ``jaxpr_as_fun``, ``primitives``),
``jax.core.eval_jaxpr``. :func:`missing_surface` names what is missing on the installed JAX, so that
callers can fall back to their generic path.

Example:
  >>> import jax, jax.numpy as jnp
  >>> closed = jax.make_jaxpr(lambda x: jnp.sin(x) * 2.0)(1.0)
  >>> is_mul = lambda idx, eqn: eqn.primitive.name == "mul"
  >>> triple = lambda idx, eqn, ins: [ins[0] * 3.0]
  >>> out, = evaluate(closed.jaxpr, closed.consts, [0.5], select=is_mul, handle=triple)
  >>> round(float(out), 4) == round(float(jnp.sin(0.5) * 3.0), 4)
  True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

try:
    from jax.extend import core as _jex_core
except ImportError:  # pragma: no cover
    _jex_core = None

__all__ = ["LITERAL", "DROPVAR", "CLOSED_JAXPR", "primitives", "missing_surface", "call_body", "evaluate", "apply"]

LITERAL = getattr(_jex_core, "Literal", ())
DROPVAR = getattr(_jex_core, "DropVar", ())
CLOSED_JAXPR = getattr(_jex_core, "ClosedJaxpr", None)
_JAXPR = getattr(_jex_core, "Jaxpr", None)
_DEBUG_INFO = getattr(_jex_core, "DebugInfo", None)


def primitives(*names: str) -> tuple:
    """The primitives ``jax.extend.core.primitives.<name>`` that exist on the installed JAX."""
    module = getattr(_jex_core, "primitives", None)
    return tuple(p for p in (getattr(module, n, None) for n in names) if p is not None)


_CALLS = primitives("jit_p", "pjit_p", "closed_call_p")


def missing_surface() -> str | None:
    """The name of a missing piece of the JAX surface the interpreter needs, or None."""
    needed = {"jax.extend.core": _jex_core, "Jaxpr": _JAXPR, "ClosedJaxpr": CLOSED_JAXPR, "Literal": LITERAL or None,
              "primitives.jit_p": _CALLS or None}
    for name, value in needed.items():
        if not value:
            return name
    if getattr(_jex_core, "jaxpr_as_fun", None) is None and getattr(jax.core, "eval_jaxpr", None) is None:
        return "jaxpr_as_fun"
    return None


def call_body(eqn):
    """The ``ClosedJaxpr`` body of a call equation (``jit``, ``closed_call``) that can be entered, else None."""
    if eqn.primitive not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr"):
        body = eqn.params.get(key)
        if (isinstance(body, CLOSED_JAXPR) and len(body.jaxpr.invars) == len(eqn.invars)
                and len(body.jaxpr.outvars) == len(eqn.outvars)):
            return body
    return None


def _eval_closed(closed, args):
    as_fun = getattr(_jex_core, "jaxpr_as_fun", None)
    if as_fun is not None:
        return as_fun(closed)(*args)
    return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args)


def _last_reads(jaxpr) -> dict:
    """For every variable, the index of the last equation reading it (``len(eqns)`` for an output)."""
    last = {}
    for idx, eqn in enumerate(jaxpr.eqns):
        for a in eqn.invars:
            if not isinstance(a, LITERAL):
                last[a] = idx
    for a in jaxpr.outvars:
        if not isinstance(a, LITERAL):
            last[a] = len(jaxpr.eqns)
    return last


def _segment_debug_info(num_in: int, num_out: int) -> dict:
    """The ``debug_info`` of a segment (public ``jax.extend.core.DebugInfo``): a jaxpr built without one is
    deprecated by JAX. Empty on a JAX without it."""
    if _DEBUG_INFO is None:  # pragma: no cover
        return {}
    names = tuple(f"in{i}" for i in range(num_in)), tuple(f"out{i}" for i in range(num_out))
    info = _DEBUG_INFO("lsgeo.jaxpr_interpreter segment", "lsgeo.jaxpr_interpreter", *names)
    return {"debug_info": info}


def _eval_segment(eqns: Sequence, env: dict, wanted: Callable) -> None:
    """Runs ``eqns`` as one sub-jaxpr through JAX's evaluator; writes the outputs ``wanted`` into ``env``."""
    if not eqns:
        return
    defined, invars = set(), {}
    for eqn in eqns:
        for a in eqn.invars:
            if not isinstance(a, LITERAL) and a not in defined:
                invars.setdefault(a, None)
        defined.update(eqn.outvars)
    outvars = [v for eqn in eqns for v in eqn.outvars if not isinstance(v, DROPVAR) and wanted(v)]
    effects = frozenset().union(*(eqn.effects for eqn in eqns))
    sub = _JAXPR([], list(invars), outvars, list(eqns), effects, **_segment_debug_info(len(invars), len(outvars)))
    env.update(zip(outvars, _eval_closed(CLOSED_JAXPR(sub, []), [env[v] for v in invars])))


def evaluate(jaxpr, consts, args, *, select: Callable, handle: Callable) -> list:
    """The outputs of ``jaxpr`` on ``args``, with every equation ``select(idx, eqn)`` chooses computed by
    ``handle(idx, eqn, invals) -> outvals`` and the runs of other equations by JAX's evaluator.

    ``handle`` may call :func:`evaluate` on ``call_body(eqn)`` to enter a call, or :func:`apply` to
    evaluate the equation itself. Cost: that of the equations (one sub-jaxpr per run between choices).
    """
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    last = _last_reads(jaxpr)

    def read(a):
        return a.val if isinstance(a, LITERAL) else env[a]

    start = 0
    for idx, eqn in enumerate(jaxpr.eqns):
        if not select(idx, eqn):
            continue
        _eval_segment(jaxpr.eqns[start:idx], env, lambda v: last.get(v, -1) >= idx)
        start = idx + 1
        outs = handle(idx, eqn, [read(a) for a in eqn.invars])
        env.update((v, o) for v, o in zip(eqn.outvars, outs) if not isinstance(v, DROPVAR))
    _eval_segment(jaxpr.eqns[start:], env, lambda v: last.get(v, -1) >= len(jaxpr.eqns))
    return [read(a) for a in jaxpr.outvars]


def apply(eqn, invals) -> list:
    """The outputs of the single equation ``eqn`` on ``invals`` (through JAX's evaluator)."""
    env = dict(zip([a for a in eqn.invars if not isinstance(a, LITERAL)],
                   [v for a, v in zip(eqn.invars, invals) if not isinstance(a, LITERAL)]))
    _eval_segment([eqn], env, lambda v: True)
    return [env.get(v) for v in eqn.outvars]
