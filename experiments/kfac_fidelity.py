"""How far KFAC and EKFAC are from the exact Gauss-Newton matrix they approximate, along a training run.

Claim (George et al. 2018, Sec. 3): EKFAC, the Kronecker eigenbasis of KFAC with its diagonal re-fitted from the
data, is the Frobenius-best diagonal in that basis; as KFAC's own eigenvalues are one diagonal in the same
basis, EKFAC's relative Frobenius error to the exact Gauss-Newton matrix is never above KFAC's. Judged
deterministically: it must hold on every (seed, checkpoint) pair, up to ``rtol`` for rounding. Negative control:
the reversed test ("KFAC's error is never above EKFAC's") must fail on the same pairs.

Setup: a tanh MLP 64-``hidden``-``hidden``-10 on ``n_train`` digits, softmax cross-entropy, full-batch GD
(``lr``); at each of ``checkpoints`` (GD steps) and for each seed (the initialisation and the training subset):
``G = lsgeo.curvature.GaussNewton``, ``K = KFAC``, ``E = EKFAC`` (type-2, expand, weight and bias separate), all
``Op(predict, loss, params, (x, y))`` and dense (``.to_dense()``, float64). Reported, per layer (its kernel and
bias block) and over all parameters:

- relative Frobenius error ``||C - G||_F / ||G||_F`` (``C`` = K, E; per layer on the layer's diagonal block);
- trace ratio ``tr C / tr G``;
- damped inverse on the gradient: ``||(C + d I)^-1 g - x|| / ||x||`` with ``x = curvature.solve(G, g, damping=d)``
  (CG, tol 1e-10) and ``d = damping x tr G / m`` (Kronfluence's heuristic, 0.1 x the mean eigenvalue);
- the largest principal angle (degrees) between the top-``top_k`` eigenspaces of ``C`` and ``G``.

Figures: each measure against the GD step (log scales; step 0 drawn at 1), KFAC solid, EKFAC dashed, one colour
per layer, the band the range over seeds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from experiments import cli, discrimination, experiment, nets, plots, records
from lsgeo import curvature, losses

CLAIM = "EKFAC's relative Frobenius error to the exact Gauss-Newton matrix is never above KFAC's (George et al. 2018)."
SOURCE = "George et al. 2018, Sec. 3: EKFAC is the Frobenius-optimal diagonal in the Kronecker eigenbasis"
METHODS = ("kfac", "ekfac")
MEASURES = ("frobenius", "trace_ratio", "inverse_error", "angle_deg")


@dataclasses.dataclass(frozen=True)
class Config:
    """KFAC and EKFAC against the exact Gauss-Newton matrix of a digits MLP at a few GD checkpoints."""

    n_train: int = 256  # digits training points (the data of every operator)
    hidden: int = 16  # width of both hidden layers (the dense Gauss-Newton matrix is m x m, m = 1482 at 16)
    lr: float = 0.5  # full-batch GD step size
    checkpoints: tuple[int, ...] = (0, 100, 1000)  # GD steps at which the operators are compared
    damping: float = 0.1  # the inverse's damping, in units of the mean eigenvalue of G
    top_k: int = 10  # eigenspaces compared by principal angles
    rtol: float = 1e-9  # the claim's rounding allowance: err(EKFAC) <= err(KFAC) (1 + rtol)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # paired: initialisation and training subset


PRESETS = {"paper": Config(n_train=1024, hidden=32, checkpoints=(0, 100, 1000, 5000), seeds=tuple(range(10)))}


def validate(cfg: Config) -> None:
    if list(cfg.checkpoints) != sorted(set(cfg.checkpoints)) or min(cfg.checkpoints, default=-1) < 0:
        raise ValueError(f"--checkpoints must be distinct steps >= 0 in increasing order, got {cfg.checkpoints}")
    if cfg.damping <= 0:
        raise ValueError(f"--damping must be > 0, got {cfg.damping}")
    if not 0 < cfg.rtol < 1e-3:
        raise ValueError(f"--rtol must be in (0, 1e-3), got {cfg.rtol}")
    if cfg.top_k >= 10 * cfg.hidden:
        raise ValueError(f"--top-k {cfg.top_k} is too large for --hidden {cfg.hidden}")


def prepare(cfg: Config):
    return nets.splits("digits", n_train=None, n_test=None)


def cells(cfg: Config) -> list[dict]:
    return [{"seed": s} for s in cfg.seeds]


LAYERS = ("Dense_0", "Dense_1", "Dense_2")


def predict(p, x):
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = jnp.tanh(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
    return h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]


def init(key, hidden: int):
    sizes = ((64, hidden), (hidden, hidden), (hidden, 10))
    keys = jax.random.split(key, len(sizes))
    return {name: {"kernel": jax.random.normal(k, s, jnp.float64) / np.sqrt(s[0]), "bias": jnp.zeros(s[1], jnp.float64)}
            for name, k, s in zip(LAYERS, keys, sizes)}  # fmt: skip


def _layer_index(params) -> np.ndarray:
    """The layer (index into ``LAYERS``) of every entry of the flat parameter vector (``ravel_pytree``'s order,
    the order of ``to_dense``)."""
    ids = {name: jax.tree_util.tree_map(lambda a, i=i: jnp.full(a.shape, float(i)), params[name])
           for i, name in enumerate(LAYERS)}  # fmt: skip
    return np.asarray(jax.flatten_util.ravel_pytree(ids)[0]).astype(int)


def _top(a: np.ndarray, k: int) -> np.ndarray:
    """The top-``k`` eigenvectors of the symmetric ``a`` (LAPACK's subset driver: only those are computed)."""
    return scipy.linalg.eigh(a, subset_by_index=[a.shape[0] - k, a.shape[0] - 1])[1]


def _top_angle(a: np.ndarray, b, k: int) -> float:
    """The largest principal angle (degrees) between the top-``k`` eigenspaces of the symmetric ``a`` and ``b``
    (``b``: a matrix, or its top-``k`` eigenvectors)."""
    ub = b if b.shape[1] == k else _top(b, k)
    cosines = np.linalg.svd(_top(a, k).T @ ub, compute_uv=False)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def _compare(cfg: Config, params, batch, seed: int, step: int) -> list[dict]:
    loss = losses.softmax_cross_entropy
    gn = curvature.GaussNewton(predict, loss, params, batch)
    dense = {"exact": np.asarray(gn.to_dense())}
    ops = {"kfac": curvature.KFAC(predict, loss, params, batch), "ekfac": curvature.EKFAC(predict, loss, params, batch)}
    dense.update({name: np.asarray(op.to_dense()) for name, op in ops.items()})
    exact, m = dense["exact"], dense["exact"].shape[0]
    damping = cfg.damping * float(np.trace(exact)) / m
    grad = jax.grad(lambda p: jnp.mean(loss(predict(p, batch[0]), batch[1])))(params)
    g = jax.flatten_util.ravel_pytree(grad)[0]
    x_exact = np.asarray(jax.flatten_util.ravel_pytree(curvature.solve(gn, grad, damping=damping, tol=1e-10))[0])
    layer = _layer_index(params)
    exact_top = _top(exact, cfg.top_k)
    rows = []
    for name, op in ops.items():
        approx = dense[name]
        x = np.asarray(op.inverse(damping) @ g)
        base = {"seed": seed, "step": step, "method": name}
        rows.append({**base, "layer": "all",
                     "frobenius": float(np.linalg.norm(approx - exact) / np.linalg.norm(exact)),
                     "trace_ratio": float(np.trace(approx) / np.trace(exact)),
                     "inverse_error": float(np.linalg.norm(x - x_exact) / np.linalg.norm(x_exact)),
                     "angle_deg": _top_angle(approx, exact_top, cfg.top_k)})  # fmt: skip
        for i, lname in enumerate(LAYERS):
            sel = np.flatnonzero(layer == i)
            a, e = approx[np.ix_(sel, sel)], exact[np.ix_(sel, sel)]
            rows.append({**base, "layer": lname, "frobenius": float(np.linalg.norm(a - e) / np.linalg.norm(e)),
                         "trace_ratio": float(np.trace(a) / np.trace(e)),
                         "angle_deg": _top_angle(a, e, min(cfg.top_k, sel.size - 1))})
        off = np.linalg.norm(approx[layer[:, None] != layer[None, :]])
        rows[-1 - len(LAYERS)]["off_block_norm"] = float(off)  # zero: both are block diagonal over layers
    return rows


def _objective(params, batch):
    return jnp.mean(losses.softmax_cross_entropy(predict(params, batch[0]), batch[1]))


@jax.jit
def _train(params, batch, steps, lr):
    """``params`` after ``steps`` full-batch GD steps of size ``lr`` on ``batch`` (compiled once for every seed)."""
    step = lambda _, p: jax.tree_util.tree_map(lambda a, g: a - lr * g, p, jax.grad(_objective)(p, batch))  # noqa: E731
    return jax.lax.fori_loop(0, steps, step, params)


def _cell(cfg: Config, data, seed: int) -> list[dict]:
    key = jax.random.key(seed)
    idx = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), data.train[0].shape[0])[: cfg.n_train])
    batch = (jnp.asarray(data.train[0][idx], jnp.float64), jnp.asarray(data.train[1][idx]))
    params = init(jax.random.fold_in(key, 0), cfg.hidden)
    rows, done = [], 0
    for step in cfg.checkpoints:
        params = _train(params, batch, step - done, cfg.lr)
        done = step
        cell_rows = _compare(cfg, params, batch, seed, step)
        cell_rows[0]["train_loss"] = float(_objective(params, batch))
        rows += cell_rows
    return rows


def run(cfg: Config, data, group: list[dict]) -> list[list[dict]]:
    with jax.enable_x64(True):
        return [_cell(cfg, data, c["seed"]) for c in group]


def _pairs(rows, cfg):
    """[pairs]: the overall Frobenius errors of KFAC and EKFAC, paired by (seed, checkpoint)."""
    keys = [(s, t) for s in cfg.seeds for t in cfg.checkpoints]
    value = lambda m, s, t: records.select(rows, seed=s, step=t, method=m, layer="all")[0]["frobenius"]  # noqa: E731
    return np.array([value("kfac", s, t) for s, t in keys]), np.array([value("ekfac", s, t) for s, t in keys])


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    kfac, ekfac = _pairs(rows, cfg)
    claim = bool(np.all(ekfac <= kfac * (1 + cfg.rtol)))
    control = bool(np.all(kfac <= ekfac * (1 + cfg.rtol)))
    parts = {"ekfac_frobenius_never_above_kfac": discrimination.Part(
        claim, control, "the reversed test: KFAC's Frobenius error never above EKFAC's")}
    judgement = discrimination.judge(parts)
    figures, table = {}, []
    for method in METHODS:
        for step in cfg.checkpoints:
            for measure in MEASURES:
                values = [r[measure] for r in records.select(rows, method=method, step=step, layer="all")]
                figures[f"{measure}_{method}_step={step}"] = float(np.mean(values))
            values = {m: figures[f"{m}_{method}_step={step}"] for m in MEASURES}
            table.append({"method": method, "step": step, **values})
    ratio = ekfac / kfac
    figures.update(ekfac_over_kfac_min=float(ratio.min()), ekfac_over_kfac_max=float(ratio.max()),
                   pairs=float(ratio.size), pairs_ekfac_not_above=float(np.sum(ekfac <= kfac * (1 + cfg.rtol))),
                   pairs_kfac_not_above=float(np.sum(kfac <= ekfac * (1 + cfg.rtol))))
    reason = (f"EKFAC / KFAC Frobenius error {ratio.min():.4f}-{ratio.max():.4f} over {ratio.size} (seed, checkpoint) "
              f"pairs, EKFAC not above KFAC in {int(figures['pairs_ekfac_not_above'])}; {judgement.reason}; {SOURCE}")
    return experiment.Verdict(judgement.supported, figures, table, reason, judgement.controls)


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    labels = {"frobenius": "relative Frobenius error ||C - G||_F / ||G||_F",
              "trace_ratio": "trace ratio tr C / tr G", "inverse_error": "damped inverse on the gradient: rel. error",
              "angle_deg": f"largest principal angle, top-{cfg.top_k} eigenspaces (deg)"}  # fmt: skip
    colours = dict(zip(("all", *LAYERS), ("k", "tab:blue", "tab:orange", "tab:green")))
    steps = np.array(cfg.checkpoints, dtype=float)
    for ax, measure in zip(axes.ravel(), MEASURES):
        for method, style in (("kfac", "-"), ("ekfac", "--")):
            for layer, colour in colours.items():
                sel = records.select(rows, method=method, layer=layer)
                if not sel or measure not in sel[0]:
                    continue
                values = np.array([[records.select(sel, seed=s, step=t)[0][measure] for t in cfg.checkpoints]
                                   for s in cfg.seeds])  # fmt: skip
                x = np.maximum(steps, 1.0)
                ax.plot(x, np.median(values, axis=0), style, color=colour, marker="o", ms=3,
                        label=f"{method.upper()} {layer}")
                ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.12)
        ax.set(xscale="log", yscale="log", xlabel="GD step (0 drawn at 1)", ylabel=labels[measure])
        if measure == "trace_ratio":
            ax.axhline(1.0, color="gray", lw=0.5)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"KFAC (solid) and EKFAC (dashed) vs the exact Gauss-Newton matrix: digits MLP 64-{cfg.hidden}-"
                 f"{cfg.hidden}-10, {cfg.n_train} points; median and range over {len(cfg.seeds)} seeds", fontsize=9)
    fig.tight_layout()
    return {"kfac_fidelity.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__)

if __name__ == "__main__":
    cli.main(EXPERIMENT)
