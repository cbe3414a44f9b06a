"""Hostile pass over this session's surfaces: the data-set objective reached through the geometry entry points
(objective kinds x data kinds x microbatch sizes) and the KFAC / EKFAC damped inverse (damping values). Each
try is judged: clean (the right number, or a ValueError that names the argument or the remedy), obscure (any
other error), wrong (a number that differs from the dense reference, or no error where one is due). Prints
the tally. Run from the repository root: `PYTHONPATH=. python scripts/hostile_objective.py` (a few minutes).
"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
from lsgeo import curvature, landscape, losses  # noqa: E402

tally = {"tries": 0, "clean": 0, "obscure": 0, "wrong": 0}


def record(kind, what):
    tally["tries"] += 1
    tally[kind] += 1
    if kind != "clean":
        print(f"{kind}: {what}", flush=True)


n, d = 7, 3
rng = np.random.default_rng(0)
X, Y = jnp.asarray(rng.standard_normal((n, d))), jnp.asarray(rng.standard_normal(n))
W = jnp.asarray(rng.standard_normal(d)) * 0.5
V = jnp.asarray(rng.standard_normal(d))

OBJECTIVES = {  # name -> (f, what is due: "ok", "coupled" (error only when cut), "error")
    "mean": (lambda w, b: jnp.mean((jnp.tanh(b[0] @ w) - b[1]) ** 2), "ok"),
    "scaled_mean": (lambda w, b: 3.0 * jnp.mean((jnp.tanh(b[0] @ w) - b[1]) ** 2), "ok"),
    "sum": (lambda w, b: jnp.sum((jnp.tanh(b[0] @ w) - b[1]) ** 2), "error"),
    "coupled": (lambda w, b: jnp.mean((jnp.tanh(b[0] @ w - jnp.mean(b[0] @ w)) - b[1]) ** 2), "coupled"),
    "vector": (lambda w, b: (jnp.tanh(b[0] @ w) - b[1]) ** 2, "error"),
}


def data_kind(kind):
    batches = [(X[:4], Y[:4]), (X[4:], Y[4:])]
    if kind == "batch":
        return (X, Y)
    if kind == "source":
        return lambda: iter(batches)
    if kind == "generator":
        return (b for b in batches)
    if kind == "changing":
        state = {"k": 0}

        def source():
            state["k"] += 1
            s = 1.0 + 0.5 * state["k"]
            return iter([(X[:4] * s, Y[:4]), (X[4:] * s, Y[4:])])
        return source
    raise ValueError(kind)


def judge(what, run, reference, due_error, allowed=None):
    try:
        out = np.asarray(run())
    except ValueError as e:
        msg = str(e)
        if due_error or (allowed and allowed(msg)):
            record("clean", what)
        else:
            record("wrong" if not due_error else "obscure", f"{what}: unexpected ValueError {msg[:150]}")
        return
    except Exception as e:  # noqa: BLE001
        record("obscure", f"{what}: {type(e).__name__}: {str(e)[:150]}")
        return
    if due_error:
        record("wrong", f"{what}: no error, returned {out.ravel()[:3]}")
    elif not np.allclose(out, reference, rtol=1e-8, atol=1e-10):
        record("wrong", f"{what}: {out.ravel()[:3]} vs {np.asarray(reference).ravel()[:3]}")
    else:
        record("clean", what)


ALPHAS = jnp.array([-0.5, 0.0, 0.7])
for (oname, (f, due)), kind, mb, entry in itertools.product(
        OBJECTIVES.items(), ["batch", "source", "generator", "changing"], [None, 2, 3, 7, 8, 0, -1, 2.5, "2"],
        ["hessian", "slice_1d"]):
    what = f"{entry} f={oname} data={kind} microbatch_size={mb!r}"
    bad_mb = mb in (0, -1, 2.5, "2")
    cut = mb is not None and not bad_mb and mb < n or kind in ("source", "changing")
    due_error = (bad_mb or due == "error" or kind == "generator" or (due == "coupled" and cut)
                 or (kind != "batch" and mb is not None))  # a source's batches are its microbatches
    data = data_kind(kind)
    if entry == "hessian":
        ref = jax.hessian(f)(W, (X, Y)) @ V if due != "error" else None
        run = lambda: curvature.Hessian(f, W, data, microbatch_size=mb) @ V  # noqa: E731
    else:
        ref = jnp.stack([f(W + a * V, (X, Y)) for a in ALPHAS]) if due != "error" else None
        run = lambda: landscape.slice_1d(f, W, data, V, ALPHAS, microbatch_size=mb)  # noqa: E731
    # a source that changes between passes: an error, or (one pass read) the value of one of its data sets
    allowed = (lambda m: "change" in m.lower()) if kind == "changing" else None
    if kind == "changing" and not due_error:
        due_error = True
    judge(what, run, ref, due_error, allowed)

# KFAC / EKFAC damped inverse: (K + d I)^-1 against the dense matrix
params = {"w": jnp.asarray(rng.standard_normal((d, 2))) * 0.5, "b": jnp.zeros(2)}
predict = lambda p, x: jnp.tanh(x @ p["w"] + p["b"])  # noqa: E731
labels = jnp.asarray(rng.integers(0, 2, n))
for cls, damping, heuristic in itertools.product(
        [curvature.KFAC, curvature.EKFAC],
        [0.0, 1e-12, 1e-3, 1.0, 1e6, -1.0, float("nan"), float("inf"), "0.1", None, True, jnp.array(0.1),
         jnp.array([0.1, 0.2]), np.float32(0.1)], [False, True]):
    what = f"{cls.__name__}.inverse({damping!r}, heuristic_damping={heuristic})"
    op = cls(predict, losses.softmax_cross_entropy, params, (X, labels))
    k = np.asarray(op.to_dense())
    valid = not isinstance(damping, (str, type(None), bool)) and np.ndim(damping) == 0 and np.isfinite(
        float(damping)) and float(damping) >= 0
    if heuristic and cls is curvature.EKFAC:
        valid = False
    if valid and not heuristic and float(damping) < 1e-6 and np.linalg.matrix_rank(k) < k.shape[0]:
        valid = "singular"  # (K + 0 I)^-1 of a singular K: an error or inf/nan, never a finite number
    v = np.asarray(rng.standard_normal(op.size))
    try:
        out = np.asarray(op.inverse(damping, heuristic_damping=heuristic) @ jnp.asarray(v))
    except (ValueError, TypeError) as e:
        ok = valid is not True and ("damping" in str(e) or "heuristic" in str(e))
        record("clean" if ok else ("obscure" if valid is not True else "wrong"), f"{what}: {type(e).__name__} {e}")
        continue
    except Exception as e:  # noqa: BLE001
        record("obscure", f"{what}: {type(e).__name__}: {str(e)[:150]}")
        continue
    if valid is False:
        record("wrong", f"{what}: no error")
    elif valid == "singular":
        record("clean" if not np.all(np.isfinite(out)) or np.allclose(k @ out, v, atol=1e-6) else "wrong", what)
    elif heuristic:
        record("clean" if np.all(np.isfinite(out)) else "wrong", what)  # checked against its formula in the tests
    else:
        expected = np.linalg.solve(k + float(damping) * np.eye(op.size), v)
        good = np.allclose(out, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
        record("clean" if good else "wrong", f"{what}: {out[:2]} vs {expected[:2]}")

print(json.dumps(tally))
