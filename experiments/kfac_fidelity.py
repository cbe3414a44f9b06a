"""How far KFAC and EKFAC are from the exact Gauss-Newton matrix they approximate, along a training run of an
MLP, a small CNN and the transformer of ``experiments.transformer_blocks``.

Claim (George et al. 2018, Sec. 3): EKFAC, the Kronecker eigenbasis of KFAC with its diagonal re-fitted from the
data, is the Frobenius-best diagonal in that basis; as KFAC's own eigenvalues are one diagonal in the same
basis, EKFAC's relative Frobenius error to the exact Gauss-Newton matrix is never above KFAC's. Judged
deterministically on every (model, seed, checkpoint) pair computed densely, up to ``rtol`` for rounding (the
rule's minimum detectable effect: a violation of ``rtol`` relative; the source states an inequality, no effect
size). Negative control: the reversed test ("KFAC's error is never above EKFAC's") must fail on the same pairs.

Setup, softmax cross-entropy, full-batch GD (``lr``; ``lr_transformer`` for the transformer) from the seed's
initialisation, the operators compared at each of ``checkpoints`` (GD steps):

- ``mlp``: tanh MLP 64-``hidden``-``hidden``-10 on ``n_train`` digits (a seed's own subset);
- ``cnn``: two 3x3 tanh convolutions of ``channels`` channels (2x2 average pooling between) and a dense head on
  the same digits (8 x 8 images): convolution layers with weight sharing over positions (KFAC-expand);
- ``transformer``: ``transformer_blocks.TinyTransformer`` (one pre-LN block, ``d_model``, ``heads``) on all
  ``modulus^2`` pairs of modular addition: dense layers shared over the sequence axis (the attention's
  projections), and an embedding, positions and LayerNorm scales in no layer (their exact diagonal).

``G = lsgeo.curvature.GaussNewton``, ``K = KFAC``, ``E = EKFAC`` (type-2, expand, weight and bias separate), in
float64. Reported, per top-level module (its diagonal block) and over all parameters:

- relative Frobenius error ``||C - G||_F / ||G||_F`` (``C`` = K, E): dense (``.to_dense()``) while ``m <=
  dense_limit``, else a randomized estimate ``sqrt(sum_j ||(C - G) z_j||^2 / sum_j ||G z_j||^2)`` over
  ``num_probes`` Rademacher probes shared by K and E (``estimate`` = 1 in the row; not judged);
- trace ratio ``tr C / tr G`` (``tr C`` exact from the factors; ``tr G`` dense, else Hutchinson's estimate);
- damped inverse on the gradient: ``||(C + d I)^-1 g - x|| / ||x||`` with ``x = curvature.solve(G, g, damping=d)``
  (CG on the exact operator, tol 1e-10) and ``d = damping x tr G / m`` (0.1 x the mean eigenvalue);
- the largest principal angle (degrees) between the top-``top_k`` eigenspaces of ``C`` and ``G`` (dense only).

Figures: one row per model, each measure against the GD step (log scales with decimal labels, angles linear; step 0
drawn at 1), KFAC solid, EKFAC dashed, the median over seeds, one colour per module (legend right of each row), all
parameters black with the range over seeds as a band.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from experiments import cli, discrimination, experiment, nets, plots, records, transformer_blocks
from lsgeo import curvature, losses

CLAIM = "EKFAC's relative Frobenius error to the exact Gauss-Newton matrix is never above KFAC's (George et al. 2018)."
SOURCE = "George et al. 2018, Sec. 3: EKFAC is the Frobenius-optimal diagonal in the Kronecker eigenbasis"
METHODS = ("kfac", "ekfac")
MEASURES = ("frobenius", "trace_ratio", "inverse_error", "angle_deg")
MODELS = ("mlp", "cnn", "transformer")


@dataclasses.dataclass(frozen=True)
class Config:
    """KFAC and EKFAC against the exact Gauss-Newton matrix of a digits MLP, a digits CNN and a one-block
    transformer on modular addition, at a few GD checkpoints."""

    models: tuple[str, ...] = MODELS
    n_train: int = 256  # digits training points (the data of every operator of the MLP and the CNN)
    hidden: int = 16  # width of both hidden layers of the MLP (m = 1482 at 16)
    channels: int = 4  # channels of both convolutions of the CNN (m = 838 at 4)
    modulus: int = 7  # the transformer's modular addition: modulus^2 examples, tokens 0..modulus
    d_model: int = 8  # the transformer's width (m = 1068 at 8, modulus 7)
    heads: int = 2
    lr: float = 0.5  # full-batch GD step size (MLP, CNN)
    lr_transformer: float = 0.1  # full-batch GD step size (transformer)
    checkpoints: tuple[int, ...] = (0, 100, 1000)  # GD steps at which the operators are compared
    damping: float = 0.1  # the inverse's damping, in units of the mean eigenvalue of G
    top_k: int = 10  # eigenspaces compared by principal angles
    rtol: float = 1e-9  # the claim's rounding allowance: err(EKFAC) <= err(KFAC) (1 + rtol)
    dense_limit: int = 6000  # above this many parameters: randomized Frobenius and trace estimates
    num_probes: int = 64  # Rademacher probes of the randomized estimates
    seeds: tuple[int, ...] = (0, 1, 2)  # paired: initialisation and training subset (the claim is deterministic)


PRESETS = {"paper": Config(n_train=1024, hidden=32, channels=8, modulus=23, d_model=16,
                           checkpoints=(0, 100, 1000, 5000), seeds=tuple(range(10)))}


def validate(cfg: Config) -> None:
    if not cfg.models or set(cfg.models) - set(MODELS) or len(set(cfg.models)) != len(cfg.models):
        raise ValueError(f"--models must be distinct names among {MODELS}, got {cfg.models}")
    if list(cfg.checkpoints) != sorted(set(cfg.checkpoints)) or min(cfg.checkpoints, default=-1) < 0:
        raise ValueError(f"--checkpoints must be distinct steps >= 0 in increasing order, got {cfg.checkpoints}")
    if cfg.damping <= 0:
        raise ValueError(f"--damping must be > 0, got {cfg.damping}")
    if not 0 < cfg.rtol < 1e-3:
        raise ValueError(f"--rtol must be in (0, 1e-3), got {cfg.rtol}")
    if cfg.top_k >= 10 * cfg.hidden or cfg.top_k < 1:
        raise ValueError(f"--top-k {cfg.top_k} must be >= 1 and small next to --hidden {cfg.hidden}")
    if cfg.d_model % cfg.heads or cfg.modulus < 3:
        raise ValueError(f"--d-model must be a multiple of --heads and --modulus >= 3, got {cfg.d_model}, "
                         f"{cfg.heads}, {cfg.modulus}")


def prepare(cfg: Config):
    return nets.splits("digits", n_train=None, n_test=None)


def cells(cfg: Config) -> list[dict]:
    return [{"model": m, "seed": s} for m in cfg.models for s in cfg.seeds]


LAYERS = ("Dense_0", "Dense_1", "Dense_2")


def predict(p, x):
    """The MLP."""
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = jnp.tanh(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
    return h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]


def init(key, hidden: int):
    sizes = ((64, hidden), (hidden, hidden), (hidden, 10))
    keys = jax.random.split(key, len(sizes))
    return {name: {"kernel": jax.random.normal(k, s, jnp.float64) / np.sqrt(s[0]), "bias": jnp.zeros(s[1], jnp.float64)}
            for name, k, s in zip(LAYERS, keys, sizes)}  # fmt: skip


class SmallCNN(nn.Module):
    """Two 3x3 tanh convolutions (2x2 average pooling between) and a dense head, on 8 x 8 digits."""

    channels: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], 8, 8, 1)
        x = nn.avg_pool(jnp.tanh(nn.Conv(self.channels, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = jnp.tanh(nn.Conv(self.channels, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@functools.lru_cache(maxsize=8)
def _network(cfg: Config, model: str):
    """``(predict, init(key) -> float64 params)`` of one model: the same objects for every cell (compiled once)."""
    if model == "mlp":
        return predict, lambda key: init(key, cfg.hidden)
    if model == "cnn":
        module, example = SmallCNN(cfg.channels), jnp.zeros((1, 64))
    else:
        p = cfg.modulus
        module = transformer_blocks.TinyTransformer(p + 1, 3, cfg.d_model, cfg.heads, p)
        example = jnp.zeros((1, 3), jnp.int32)

    def apply(params, x):
        return module.apply({"params": params}, x)

    def init_params(key):
        params = module.init(key, example)["params"]
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)

    return apply, init_params


def _batch(cfg: Config, data, model: str, key):
    if model == "transformer":
        pairs = transformer_blocks.prepare(transformer_blocks.Config(modulus=cfg.modulus))
        return jnp.asarray(pairs["tokens"]), jnp.asarray(pairs["labels"])
    idx = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), data.train[0].shape[0])[: cfg.n_train])
    return jnp.asarray(data.train[0][idx], jnp.float64), jnp.asarray(data.train[1][idx])


def _layer_index(params) -> tuple[np.ndarray, tuple[str, ...]]:
    """The top-level module (index into the returned names) of every entry of the flat parameter vector
    (``ravel_pytree``'s order, the order of ``to_dense``)."""
    names = tuple(sorted(params))
    ids = {name: jax.tree_util.tree_map(lambda a, i=i: jnp.full(a.shape, float(i)), params[name])
           for i, name in enumerate(names)}  # fmt: skip
    return np.asarray(jax.flatten_util.ravel_pytree(ids)[0]).astype(int), names


def _top(a: np.ndarray, k: int) -> np.ndarray:
    """The top-``k`` eigenvectors of the symmetric ``a`` (LAPACK's subset driver: only those are computed)."""
    return scipy.linalg.eigh(a, subset_by_index=[a.shape[0] - k, a.shape[0] - 1])[1]


def _top_angle(a: np.ndarray, b, k: int) -> float:
    """The largest principal angle (degrees) between the top-``k`` eigenspaces of the symmetric ``a`` and ``b``
    (``b``: a matrix, or its top-``k`` eigenvectors)."""
    ub = b if b.shape[1] == k else _top(b, k)
    cosines = np.linalg.svd(_top(a, k).T @ ub, compute_uv=False)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def _dense_measures(cfg: Config, exact, approx, layer, names) -> list[dict]:
    """The rows of one method from the dense matrices: all parameters, then one per module."""
    exact_top = _top(exact, cfg.top_k)
    rows = [{"layer": "all", "frobenius": float(np.linalg.norm(approx - exact) / np.linalg.norm(exact)),
             "trace_ratio": float(np.trace(approx) / np.trace(exact)),
             "angle_deg": _top_angle(approx, exact_top, cfg.top_k),
             "off_block_norm": float(np.linalg.norm(approx[layer[:, None] != layer[None, :]]))}]  # fmt: skip
    for i, lname in enumerate(names):
        sel = np.flatnonzero(layer == i)
        a, e = approx[np.ix_(sel, sel)], exact[np.ix_(sel, sel)]
        k = min(cfg.top_k, sel.size - 1)
        rows.append({"layer": lname, "frobenius": float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300)),
                     "trace_ratio": float(np.trace(a) / max(np.trace(e), 1e-300)),
                     "angle_deg": _top_angle(a, e, k) if k >= 1 else float("nan")})
    return rows


def _compare(cfg: Config, network, params, batch, seed: int, step: int, model: str = "mlp") -> list[dict]:
    apply, loss = network, losses.softmax_cross_entropy
    gn = curvature.GaussNewton(apply, loss, params, batch)
    ops = {"kfac": curvature.KFAC(apply, loss, params, batch), "ekfac": curvature.EKFAC(apply, loss, params, batch)}
    m, dense = gn.size, gn.size <= cfg.dense_limit
    grad = jax.grad(lambda p: jnp.mean(loss(apply(p, batch[0]), batch[1])))(params)
    g = jax.flatten_util.ravel_pytree(grad)[0]
    key = jax.random.fold_in(jax.random.key(seed), 1000 + step)
    if dense:
        exact = np.asarray(gn.to_dense())
        trace_g = float(np.trace(exact))
    else:
        probes = jax.random.rademacher(key, (cfg.num_probes, m), jnp.float64)
        g_probes = np.asarray(gn @ probes)
        trace_g = float(np.mean(np.sum(np.asarray(probes) * g_probes, axis=1)))
    damping = cfg.damping * trace_g / m
    x_exact = np.asarray(jax.flatten_util.ravel_pytree(curvature.solve(gn, grad, damping=damping, tol=1e-10))[0])
    layer, names = _layer_index(params)
    rows = []
    for name, op in ops.items():
        x = np.asarray(op.inverse(damping) @ g)
        base = {"model": model, "seed": seed, "step": step, "method": name, "estimate": 0.0 if dense else 1.0}
        if dense:
            measured = _dense_measures(cfg, exact, np.asarray(op.to_dense()), layer, names)
        else:
            diff = np.asarray(op @ probes) - g_probes
            measured = [{"layer": "all", "frobenius": float(np.sqrt(np.sum(diff**2) / np.sum(g_probes**2))),
                         "trace_ratio": float(op.trace()) / trace_g, "angle_deg": float("nan")}]  # fmt: skip
        measured[0]["inverse_error"] = float(np.linalg.norm(x - x_exact) / np.linalg.norm(x_exact))
        rows += [{**base, **r} for r in measured]
    return rows


@functools.partial(jax.jit, static_argnums=(0,))
def _train(apply, params, batch, steps, lr):
    """``params`` after ``steps`` full-batch GD steps of size ``lr`` on ``batch`` (compiled once per model)."""
    def objective(p):
        return jnp.mean(losses.softmax_cross_entropy(apply(p, batch[0]), batch[1]))

    step = lambda _, p: jax.tree_util.tree_map(lambda a, g: a - lr * g, p, jax.grad(objective)(p))  # noqa: E731
    return jax.lax.fori_loop(0, steps, step, params)


def _cell(cfg: Config, data, model: str, seed: int) -> list[dict]:
    key = jax.random.key(seed)
    apply, init_params = _network(cfg, model)
    batch = _batch(cfg, data, model, key)
    params = init_params(jax.random.fold_in(key, 0))
    lr = cfg.lr_transformer if model == "transformer" else cfg.lr
    rows, done = [], 0
    for step in cfg.checkpoints:
        params = _train(apply, params, batch, step - done, lr)
        done = step
        cell_rows = _compare(cfg, apply, params, batch, seed, step, model)
        cell_rows[0]["train_loss"] = float(jnp.mean(losses.softmax_cross_entropy(apply(params, batch[0]), batch[1])))
        rows += cell_rows
    return rows


def run(cfg: Config, data, group: list[dict]) -> list[list[dict]]:
    with jax.enable_x64(True):
        return [_cell(cfg, data, c.get("model", "mlp"), c["seed"]) for c in group]


def _pairs(rows, cfg):
    """[pairs]: the overall Frobenius errors of KFAC and EKFAC computed densely, paired by (model, seed, checkpoint)."""
    judged = [r for r in records.select(rows, method="kfac", layer="all") if not r.get("estimate")]
    keys = [(r["model"], r["seed"], r["step"]) for r in judged]

    def value(method, model, seed, step):
        return records.select(rows, model=model, seed=seed, step=step, method=method, layer="all")[0]["frobenius"]

    return np.array([value("kfac", *k) for k in keys]), np.array([value("ekfac", *k) for k in keys])


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    kfac, ekfac = _pairs(rows, cfg)
    figures, table = {}, []
    for model in cfg.models:
        for method in METHODS:
            for step in cfg.checkpoints:
                sel = records.select(rows, model=model, method=method, step=step, layer="all")
                values = {}
                for measure in MEASURES:
                    finite = [r[measure] for r in sel if np.isfinite(r[measure])]
                    if finite:
                        values[measure] = figures[f"{measure}_{method}_{model}_step={step}"] = float(np.mean(finite))
                table.append({"model": model, "method": method, "step": step, **values})
    power = discrimination.Power(cfg.rtol, None, " (relative)", "George et al. 2018 state an inequality, no effect "
                                 "size; the rule detects any violation above rtol")
    if not kfac.size:
        reason = f"no (model, seed, checkpoint) pair was computed densely (every m > --dense-limit {cfg.dense_limit})"
        return experiment.Verdict(None, figures, table, reason, {},
                                  {"ekfac_frobenius_never_above_kfac": power.record()})
    claim = bool(np.all(ekfac <= kfac * (1 + cfg.rtol)))
    control = bool(np.all(kfac <= ekfac * (1 + cfg.rtol)))
    parts = {"ekfac_frobenius_never_above_kfac": discrimination.Part(
        claim, control, "the reversed test: KFAC's Frobenius error never above EKFAC's")}
    judgement = discrimination.judge(parts)
    ratio = ekfac / kfac
    figures.update(ekfac_over_kfac_min=float(ratio.min()), ekfac_over_kfac_max=float(ratio.max()),
                   pairs=float(ratio.size), pairs_ekfac_not_above=float(np.sum(ekfac <= kfac * (1 + cfg.rtol))),
                   pairs_kfac_not_above=float(np.sum(kfac <= ekfac * (1 + cfg.rtol))))
    reason = (f"EKFAC / KFAC Frobenius error {ratio.min():.4f}-{ratio.max():.4f} over {ratio.size} dense (model, seed, "
              f"checkpoint) pairs of {', '.join(cfg.models)}, EKFAC not above KFAC in "
              f"{int(figures['pairs_ekfac_not_above'])}; {judgement.reason}; {power.describe()}; {SOURCE}")
    return experiment.Verdict(judgement.supported, figures, table, reason, judgement.controls,
                              {"ekfac_frobenius_never_above_kfac": power.record()})


def _plain_log_ticks(ax) -> None:
    """Decimal tick labels on a log y axis (``0.6``, not ``6 x 10^-1``); minor ticks labelled within a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if high / low < 10 else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    from matplotlib.lines import Line2D

    models = list(cfg.models)
    fig, axes = plt.subplots(len(models), len(MEASURES), figsize=(4.0 * len(MEASURES) + 2.2, 3.3 * len(models)),
                             squeeze=False)
    labels = {"frobenius": "rel. Frobenius error ||C - G|| / ||G||", "trace_ratio": "trace ratio tr C / tr G",
              "inverse_error": "damped inverse on the gradient: rel. error",
              "angle_deg": f"largest principal angle, top-{cfg.top_k} (deg)"}  # fmt: skip
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    steps = np.maximum(np.array(cfg.checkpoints, dtype=float), 1.0)
    for row_axes, model in zip(axes, models):
        modules = list(dict.fromkeys(r["layer"] for r in records.select(rows, model=model) if r["layer"] != "all"))
        colours = {"all": "k", **{name: cycle[i % len(cycle)] for i, name in enumerate(modules)}}
        for ax, measure in zip(row_axes, MEASURES):
            for method, style in (("kfac", "-"), ("ekfac", "--")):
                for layer, colour in colours.items():
                    sel = records.select(rows, model=model, method=method, layer=layer)
                    if not sel or measure not in sel[0]:
                        continue
                    values = np.array([[records.select(sel, seed=s, step=t)[0][measure] for t in cfg.checkpoints]
                                       for s in cfg.seeds])  # fmt: skip
                    if not np.all(np.isfinite(values)) or np.any(values <= 0):
                        continue
                    if layer == "all":  # the band (range over seeds) for all parameters only: readable
                        plots.seed_band(ax, steps, values, color=colour, style=style, label=f"{method} {layer}")
                    else:
                        ax.plot(steps, np.median(values, axis=0), style, color=colour, lw=1.0, marker="o", ms=2.5,
                                alpha=0.85)
            ax.set(xscale="log", yscale="linear" if measure == "angle_deg" else "log",
                   xlabel="GD step (log; 0 drawn at 1)", ylabel=labels[measure])
            ax.set_title(model, fontsize=9)
            ax.set_xticks(steps, [str(c) for c in cfg.checkpoints])  # the checkpoints themselves (0 drawn at 1)
            ax.xaxis.set_minor_locator(plt.NullLocator())
            if measure == "trace_ratio":
                ax.axhline(1.0, color="gray", lw=0.5)
            if measure != "angle_deg":
                _plain_log_ticks(ax)
        handles = [Line2D([], [], color="gray", ls="-", label="KFAC"),
                   Line2D([], [], color="gray", ls="--", label="EKFAC")]
        handles += [Line2D([], [], color=c, lw=2, label="all parameters" if name == "all" else name)
                    for name, c in colours.items()]
        row_axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                            title=model, title_fontsize=8)
    fig.suptitle(f"KFAC (solid) and EKFAC (dashed) vs the exact Gauss-Newton matrix, per module (colours; all "
                 f"parameters black); median over {len(cfg.seeds)} seeds, band: their range (all parameters)",
                 fontsize=10)
    fig.tight_layout()
    return {"kfac_fidelity.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__)

if __name__ == "__main__":
    cli.main(EXPERIMENT)
