"""Hostile pass over the surfaces of issue 27 (saddle index, Lanczos claims, trace errors, solve, low_rank_inverse,
the launcher); prints the running tally: tries, clean, obscure, wrong. Run from the repository root:
`PYTHONPATH=. python scripts/hostile_reliability.py` (about 8 minutes on 2 CPU cores)."""
import subprocess, sys, os, json, traceback
import numpy as np
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from lsgeo import curvature
from lsgeo.curvature import krylov

tally = {"tries": 0, "clean": 0, "obscure": 0, "wrong": 0}
notes = []

def record(kind, what):
    tally["tries"] += 1
    tally[kind] += 1
    if kind != "clean":
        notes.append(f"{kind}: {what}")
        print(f"{kind}: {what}", flush=True)
    if tally["tries"] % 10 == 0:
        print(json.dumps(tally), flush=True)

def spectrum_op(eigs, dtype, seed=0):
    m = len(eigs)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, m)))
    a = (q * np.asarray(eigs)) @ q.T
    f = lambda w, b: 0.5 * jnp.sum(w * (b @ w))
    return curvature.Hessian(f, jnp.zeros(m, dtype), jnp.asarray(a, dtype)), a

def expect_error(fn, names, what):
    try:
        fn()
    except (ValueError, TypeError) as e:
        msg = str(e)
        record("clean" if any(n in msg for n in names) else "obscure", f"{what}: {type(e).__name__}: {msg[:100]}")
        return
    except Exception as e:
        record("obscure", f"{what}: {type(e).__name__}: {str(e)[:100]}")
        return
    record("wrong", f"{what}: accepted")

key = jax.random.key(0)
m = 30
# A. saddle index
spectra = {
    "psd-null": (np.r_[np.linspace(0.5, 2, 10), np.zeros(20)], 0.0),
    "zero": (np.zeros(m), 0.0),
    "negdef": (-np.linspace(0.1, 2, m), 1.0),
    "gap": (np.r_[-np.ones(9), np.zeros(10), np.linspace(1, 3, 11)], 0.3),
    "one": (np.r_[np.zeros(m - 1), 5.0], 0.0),
}
for dtype in (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16):
    for name, (eigs, truth) in spectra.items():
        for method in ("exact", "slq"):
            for tol in (None, 0.0):
                try:
                    op, _ = spectrum_op(eigs, dtype)
                    v = float(curvature.saddle_index(op, key=key, method=method, tol=tol, num_iters=20, num_runs=16))
                    ok = abs(v - truth) <= (0.12 if (method == "slq" and name == "gap") else 1e-6)
                    record("clean" if ok else "wrong", f"saddle {jnp.dtype(dtype).name} {name} {method} tol={tol}: {v} vs {truth}")
                except Exception as e:
                    record("obscure", f"saddle {name} {method}: {type(e).__name__} {e}")
# B. repeated top eigenvalues
for dtype in (jnp.float64, jnp.float32):
    for mult in (1, 2, 3):
        for k in (1, 2, 3):
            for tol in (None, 1e-3, 1e-5):
                eigs = np.r_[[1.71] * mult, 1.32, 0.92, np.random.default_rng(mult).uniform(0, 0.5, 100 - mult - 2)]
                op, a = spectrum_op(eigs, dtype)
                ref = np.linalg.eigvalsh(a)[::-1][:k]
                try:
                    v, r = curvature.top_eigenvalues(op, key, k=k, tol=tol, num_iters=60, return_residuals=True)
                    v, r = np.asarray(v, np.float64), np.asarray(r, np.float64)
                    honest = np.all(np.abs(v - ref) <= r * 1.01 + 1e-9) or np.allclose(v, ref, rtol=1e-3)
                    record("clean" if honest else "wrong", f"top {jnp.dtype(dtype).name} mult={mult} k={k} tol={tol}: {v} vs {ref} res {r}")
                except Exception as e:
                    record("obscure", f"top mult={mult} k={k} tol={tol}: {type(e).__name__} {e}")
# C. bad arguments
op, a = spectrum_op(np.linspace(1, 2, 10), jnp.float32)
bad = [
    (lambda: curvature.top_eigenvalues(op, key, k=0), ["k"]),
    (lambda: curvature.top_eigenvalues(op, key, k=11), ["k"]),
    (lambda: curvature.top_eigenvalues(op, key, k=3, num_iters=2), ["num_iters"]),
    (lambda: curvature.top_eigenvalues(op, key, tol=-1.0), ["tol"]),
    (lambda: curvature.top_eigenvalues(op, key, tol=float("nan")), ["tol"]),
    (lambda: curvature.top_eigenvalues(op, key, tol="a"), ["tol"]),
    (lambda: curvature.top_eigenvalues(op, key, tol=1e-9), ["tol"]),
    (lambda: curvature.eigenpairs(op, key, which="middle"), ["which"]),
    (lambda: curvature.saddle_index(op, method="x"), ["method"]),
    (lambda: curvature.saddle_index(op, tol=-1.0), ["tol"]),
    (lambda: curvature.saddle_index(op, rtol=float("nan")), ["rtol"]),
    (lambda: curvature.saddle_index(op, key, method="slq", width=-1.0), ["width"]),
    (lambda: curvature.saddle_index(op, method="slq"), ["key"]),
    (lambda: curvature.hessian_trace(op, key, num_probes=0), ["num_probes"]),
    (lambda: curvature.hessian_trace(op, key, method="x"), ["method"]),
    (lambda: curvature.hessian_trace(op, key, num_probes=40, method="xtrace"), ["num_probes"]),
    (lambda: curvature.hessian_trace(op, key, num_probes=2, method="hutch++"), ["num_probes"]),
    (lambda: curvature.hessian_diagonal(op, key, num_probes=1, method="xdiag"), ["num_probes"]),
    (lambda: curvature.solve(op, jnp.ones(10).at[0].set(jnp.nan), damping=1.0), ["b"]),
    (lambda: curvature.solve(op, jnp.ones(10), damping=1.0, x0=jnp.full(10, jnp.inf)), ["x0"]),
    (lambda: curvature.solve(op, jnp.ones(9), damping=1.0), ["b"]),
    (lambda: curvature.solve(op, jnp.ones((10, 1)), damping=1.0), ["b"]),
    (lambda: curvature.solve(op, jnp.ones(10), damping=-1.0), ["damping"]),
    (lambda: curvature.solve(op, jnp.ones(10), damping=float("nan")), ["damping"]),
    (lambda: curvature.solve(op, jnp.ones(10), damping=1.0, tol=0.0), ["tol"]),
    (lambda: curvature.solve(op, jnp.ones(10), damping=1.0, maxiter=0), ["maxiter"]),
    (lambda: curvature.solve(op, jnp.ones(10), damping=1.0, preconditioner=3), ["preconditioner"]),
    (lambda: curvature.solve(op, jnp.ones(10), damping=1.0, x0=jnp.ones(9)), ["x0"]),
    (lambda: curvature.solve(op, [1.0] * 10, damping=1.0), ["b"]),
    (lambda: curvature.low_rank_inverse(jnp.ones(3), jnp.eye(4)[:2], 1.0), ["vectors"]),
    (lambda: curvature.low_rank_inverse(jnp.ones((2, 2)), jnp.eye(4)[:2], 1.0), ["values"]),
    (lambda: curvature.low_rank_inverse(jnp.ones(2), jnp.eye(4)[:2], 0.0), ["damping"]),
    (lambda: curvature.low_rank_inverse(jnp.ones(2), jnp.eye(4)[:2], 1.0)(jnp.ones(3)), ["b"]),
    (lambda: curvature.low_rank_inverse(jnp.ones(2), jnp.eye(4)[:2], 1.0)({"a": jnp.ones(4)}), ["b"]),
    (lambda: curvature.ritz_pairs(lambda u: u, jnp.ones(5), 2, k=3), ["k"]),
    (lambda: curvature.lanczos(lambda u: u, jnp.zeros(5), 3), ["v0"]),
    (lambda: curvature.lanczos(lambda u: u, jnp.full(5, jnp.nan), 3), ["v0"]),
]
for i, (fn, names) in enumerate(bad):
    expect_error(fn, names, f"bad argument #{i}")
# D. stderr and zero blocks
for method, probes in [("hutchinson", 1), ("hutchinson", 2), ("hutch++", 3), ("hutch++", 4), ("xtrace", 2), ("xtrace", 3), ("xtrace", 4)]:
    est, se = curvature.hessian_trace(op, key, num_probes=probes, method=method, return_stderr=True)
    ok = np.isnan(se) if (probes == 1 or (method == "hutch++" and probes == 3) or (method == "xtrace" and probes < 4)) else (np.isfinite(se) and se >= 0)
    record("clean" if ok else "wrong", f"stderr {method} {probes}: {se}")
zero, _ = spectrum_op(np.zeros(12), jnp.float32)
for method in ("hutchinson", "hutch++", "xtrace"):
    for probes in (4, 8):
        v = float(curvature.hessian_trace(zero, key, num_probes=probes, method=method))
        record("clean" if v == 0.0 else "wrong", f"zero trace {method} {probes}: {v}")
for method in ("hutchinson", "xdiag"):
    d = np.asarray(curvature.hessian_diagonal(zero, key, num_probes=4, method=method))
    record("clean" if np.all(d == 0) else "wrong", f"zero diagonal {method}: {d[:3]}")
# E. solve claims
for dtype in (jnp.float32, jnp.float64):
    for cond in (1e2, 1e5):
        for damping in (1e-5, 1e-3, 1.0):
            for pre in (False, True):
                eigs = np.r_[np.logspace(0, -np.log10(cond), 40), np.zeros(5)]
                o, a = spectrum_op(eigs, dtype, seed=3)
                b = jnp.asarray(np.random.default_rng(0).standard_normal(45), dtype)
                precond = (lambda v, a=a, d=damping: jnp.asarray(np.linalg.inv(a + d * np.eye(45) + 0.1 * d * np.eye(45)), dtype) @ v) if pre else None
                x, info = curvature.solve(o, b, damping=damping, tol=1e-5, maxiter=500, preconditioner=precond, return_info=True)
                true = np.linalg.norm(np.asarray(b, np.float64) - (a + damping * np.eye(45)) @ np.asarray(x, np.float64)) / np.linalg.norm(b)
                honest = (true <= 1.5e-5) if bool(info.converged) else True
                record("clean" if honest else "wrong", f"solve {jnp.dtype(dtype).name} cond={cond} d={damping} pre={pre}: conv={bool(info.converged)} true={true:.2e}")
# F. launcher
root = os.getcwd()
def launch(args, timeout=60):
    return subprocess.run([sys.executable, "-m", "lsgeo.launch", *args], capture_output=True, text=True, timeout=timeout, cwd=root)
for args, code, needle in [
    (["--help"], 0, "--num-processes"),
    (["--num-processes", "2"], 2, "usage"),
    (["--num-processes", "2", "--", "no-such-cmd-zz"], 127, "cannot run"),
    (["--num-processes", "0", "--", "true"], 2, "--num-processes"),
    (["--num-processes", "x", "--", "true"], 2, "invalid int"),
    (["--num-processes", "1", "--"], 2, "command must not be empty"),
    (["--num-processes", "1", "--", "sh", "-c", "kill -9 $$"], 137, ""),
    (["--num-processes", "1", "--", "sh", "-c", "kill -15 $$"], 143, ""),
    (["--num-processes", "2", "--", "sh", "-c", "exit 3"], 3, ""),
    (["--num-processes", "1", "--timeout", "1", "--", "sleep", "30"], 124, ""),
    (["--num-processes", "1", "--", "/etc/passwd"], 126, "cannot run"),
]:
    out = launch(args)
    ok = out.returncode == code and needle in (out.stdout + out.stderr) and "Traceback" not in out.stderr
    record("clean" if ok else ("obscure" if out.returncode == code else "wrong"), f"launch {args}: {out.returncode} {out.stderr[-200:]}")
print(json.dumps(tally))
for n in notes:
    print(n)
