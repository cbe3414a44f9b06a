"""Per-block Hessian spectra: a transformer's blocks are heterogeneous, an MLP's are not.

Claim (Zhang et al. 2024, *Why Transformers Need Adam: A Hessian Perspective*): the Hessian spectra of
the parameter blocks of a transformer (embedding, query, key, value, attention output, MLP layers,
head) differ from one another much more than the blocks of a network of similar size without
attention; this "block heterogeneity" is their explanation of why one learning rate per block
(Adam) beats SGD on transformers.

Setup: modular addition ``(a + b) mod p`` from the tokens ``a b =`` (generated, embedded), a one-block
decoder-only transformer (``lsgeo.models``-style flax linen: token and position embeddings, a causal
multi-head self-attention, a GELU MLP, layer norms, a linear head reading the last position) and an
MLP of similar size on the one-hot tokens; full-batch Adam on the training pairs, softmax
cross-entropy. At initialisation and after training, the Hessian of the training loss is restricted to
each block (the blocks of a ``curvature.Hessian`` operator; layer norms and the position embedding, a few
dozen parameters, are not compared), and each block's spectral density is estimated by stochastic Lanczos
quadrature (``curvature.block_slq_nodes``: all blocks in one compiled program), broadened on one grid per
model and stage. Heterogeneity is the mean pairwise Jensen-Shannon distance (base 2, in [0, 1]) between the block densities.

Verdict: paired over seeds (the same seed initialises both models and splits the data), the gain of the
transformer's mean JS distance over the MLP's after training (``verdicts.paired_gain``, a two-sided 95% t
test); with fewer than 3 seeds, null.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.spatial.distance

from experiments import cli, experiment, plots, records, verdicts
from lsgeo import curvature, losses, models, train

CLAIM = (
    "The Hessian spectra of a transformer's parameter blocks differ from one another much more than the blocks "
    "of a network of similar size without attention (block heterogeneity, Zhang et al. 2024)."
)
MODELS = ("transformer", "mlp")
STAGES = ("init", "trained")
SKIPPED = ("ln_", "pos_embed")  # tiny blocks (scales, offsets, positions) left out of the comparison


@dataclasses.dataclass(frozen=True)
class Config:
    """Modular addition; a one-block transformer and an MLP of ~4k parameters each; minutes on a CPU."""

    seeds: tuple[int, ...] = (0, 1, 2)
    modulus: int = 23  # p: tokens 0..p-1 and "=", p^2 = 529 pairs
    train_fraction: float = 0.8
    d_model: int = 16
    heads: int = 2
    mlp_widths: tuple[int, ...] = (64,)  # the MLP's hidden widths (4.5k parameters at p = 23)
    steps: int = 400
    eval_every: int = 100
    lr: float = 3e-3
    slq_iters: int = 30  # Lanczos steps per block (capped at the block's size)
    slq_runs: int = 2
    grid_points: int = 400


PRESETS = {
    "paper": Config(modulus=97, d_model=128, heads=4, mlp_widths=(512, 512), steps=5000, eval_every=500,
                    slq_iters=100, slq_runs=10, grid_points=1000),
}


def validate(cfg: Config) -> None:
    if cfg.modulus < 3:
        raise ValueError(f"--modulus must be >= 3, got {cfg.modulus}")
    if cfg.d_model % cfg.heads:
        raise ValueError(f"--d-model ({cfg.d_model}) must be a multiple of --heads ({cfg.heads})")
    if not 0.0 < cfg.train_fraction < 1.0:
        raise ValueError(f"--train-fraction must be in (0, 1), got {cfg.train_fraction}")


def cells(cfg: Config) -> list[dict]:
    return [dict(model=m, seed=s) for m in MODELS for s in cfg.seeds]


class TinyTransformer(nn.Module):
    """Decoder-only, one block, pre-LN: embed + positions, causal self-attention, GELU MLP, head on the last token."""

    vocab: int
    length: int
    d_model: int
    heads: int
    outputs: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (self.length, self.d_model))
        h = nn.LayerNorm(name="ln_attention")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attention")(
            h, mask=nn.make_causal_mask(tokens))
        h = nn.LayerNorm(name="ln_mlp")(x)
        x = x + nn.Dense(self.d_model, name="mlp_out")(nn.gelu(nn.Dense(4 * self.d_model, name="mlp_in")(h)))
        return nn.Dense(self.outputs, name="head")(nn.LayerNorm(name="ln_final")(x)[:, -1])


def block_name(path: tuple[str, ...]) -> str:
    """Zhang et al.'s blocks: the attention's query / key / value / output apart, every other module whole."""
    return "/".join(path[:2]) if path[0] == "attention" else path[0]


def prepare(cfg: Config) -> dict:
    """All p^2 pairs as tokens ``[a, b, p]`` (p is "="), labels (a + b) mod p, one split per seed."""
    p = cfg.modulus
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    tokens = np.stack([a.ravel(), b.ravel(), np.full(p * p, p)], axis=1).astype(np.int32)
    return {"tokens": tokens, "labels": ((a + b) % p).ravel().astype(np.int32)}


@functools.lru_cache(maxsize=8)
def _networks(cfg: Config, model: str):
    """(flax module, predict(params, tokens), objective) of one model: the same objects for every cell, so
    every compiled function is reused across seeds and stages."""
    p = cfg.modulus
    if model == "transformer":
        module = TinyTransformer(p + 1, 3, cfg.d_model, cfg.heads, p)

        def predict(params, t):
            return module.apply({"params": params}, t)
    else:
        module = models.MLP(widths=cfg.mlp_widths, num_outputs=p, activation="gelu")

        def predict(params, t):
            onehot = jax.nn.one_hot(t[:, :2], p).reshape(t.shape[0], 2 * p)
            return module.apply({"params": params}, onehot)

    def objective(params, batch):
        return losses.softmax_cross_entropy(predict(params, batch[0]), batch[1])

    return module, predict, objective


def _init(cfg: Config, model: str, key):
    module, _, _ = _networks(cfg, model)
    p = cfg.modulus
    example = jnp.zeros((1, 3), jnp.int32) if model == "transformer" else jnp.zeros((1, 2 * p))
    return module.init(key, example)["params"]


def _densities(cfg: Config, op, key) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, float]]:
    """SLQ densities of every compared block of ``op`` (``curvature.block_slq_nodes``: all blocks in one
    compiled program) on one common grid, and each block's largest Ritz value:
    ({block: density}, grid, {block: top})."""
    found = curvature.block_slq_nodes(op, key, block_name, num_iters=cfg.slq_iters, num_runs=cfg.slq_runs,
                                      skip=SKIPPED)
    nodes = {name: (np.asarray(t, np.float64).ravel(), np.asarray(w, np.float64).ravel())
             for name, (t, w) in found.items()}
    every = np.concatenate([t for t, _ in nodes.values()])
    span = max(every.max() - every.min(), 1e-12)
    width = 0.01 * span
    grid = np.linspace(every.min() - 5 * width, every.max() + 5 * width, cfg.grid_points)
    dens = {}
    for name, (theta, tau) in nodes.items():
        kernel = np.exp(-0.5 * ((grid[None, :] - theta[:, None]) / width) ** 2) / (width * np.sqrt(2 * np.pi))
        dens[name] = tau @ kernel
    return dens, grid, {name: float(theta.max()) for name, (theta, _) in nodes.items()}


def js_distance(p: np.ndarray, q: np.ndarray, grid: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two densities on the uniform ``grid``
    (``scipy.spatial.distance.jensenshannon`` of their masses per grid cell; values below 1e-200 of a
    density's peak, whose halves underflow, count as 0)."""
    p, q = (np.where(a > 1e-200 * a.max(), a, 0.0) for a in (np.asarray(p), np.asarray(q)))
    return float(scipy.spatial.distance.jensenshannon(p, q, base=2))


def heterogeneity(densities: dict[str, np.ndarray], grid: np.ndarray) -> float:
    """Mean pairwise Jensen-Shannon distance between the block densities."""
    names = list(densities)
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    return float(np.mean([js_distance(densities[names[i]], densities[names[j]], grid) for i, j in pairs]))


def run(cfg: Config, data: dict, cell_list: list[dict]) -> list[list[dict]]:
    out = []
    for cell in cell_list:
        model, seed = cell["model"], cell["seed"]
        _, predict, objective = _networks(cfg, model)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(data["labels"]))
        cut = int(cfg.train_fraction * len(order))
        train_batch = (jnp.asarray(data["tokens"][order[:cut]]), jnp.asarray(data["labels"][order[:cut]]))
        test_batch = (jnp.asarray(data["tokens"][order[cut:]]), jnp.asarray(data["labels"][order[cut:]]))
        params = _init(cfg, model, jax.random.key(seed))
        result = train.train(objective, optax.adam(cfg.lr), params, train_batch, num_steps=cfg.steps,
                             eval_every=cfg.eval_every, key=seed)
        rows = []
        for stage, point in zip(STAGES, (params, result.params)):
            op = curvature.Hessian(objective, point, train_batch)
            densities, grid, tops = _densities(cfg, op, jax.random.key(1000 + seed))
            masses = [float(np.trapezoid(d, grid)) for d in densities.values()]
            rows.append(dict(
                stage=stage, js_mean=heterogeneity(densities, grid), blocks=len(densities),
                min_mass=min(masses), max_mass=max(masses), size=op.size,
                train_loss=float(objective(point, train_batch)),
                train_acc=float(losses.accuracy(predict(point, train_batch[0]), train_batch[1])),
                test_acc=float(losses.accuracy(predict(point, test_batch[0]), test_batch[1])),
                **{f"top/{name}": top for name, top in tops.items()},
            ))
        out.append(rows)
    return out


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    seeds = list(cfg.seeds)
    js = {(m, s): records.per_seed(rows, "js_mean", seeds, model=m, stage=s) for m in MODELS for s in STAGES}
    gain = verdicts.paired_gain(js[("transformer", "trained")], js[("mlp", "trained")])
    figures = {f"js_{m}_{s}": float(np.mean(js[(m, s)])) for m in MODELS for s in STAGES}
    figures["gain_trained"], figures["gain_trained_se"] = float(gain.mean), float(gain.se)
    figures.update({f"train_acc_{m}": float(np.mean(records.per_seed(rows, "train_acc", seeds, model=m,
                                                                    stage="trained"))) for m in MODELS})
    table = [dict(model=m, stage=s, js_mean=f"{np.mean(js[(m, s)]):.3f} +- {verdicts.mean_se(js[(m, s)])[1]:.3f}",
                  train_acc=f"{np.mean(records.per_seed(rows, 'train_acc', seeds, model=m, stage=s)):.3f}")
             for m in MODELS for s in STAGES]
    return experiment.Verdict(gain.supported, figures, table, reason=gain.describe("transformer - MLP mean JS distance"))


def plot(cfg: Config, rows: list[dict]) -> dict:
    fig, (ax, ax_top) = plots.plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    ticks, labels, start = [], [], 0
    for i, m in enumerate(MODELS):
        for j, s in enumerate(STAGES):
            values = records.per_seed(rows, "js_mean", list(cfg.seeds), model=m, stage=s)
            x = i * 3 + j
            ax.bar(x, np.mean(values), color=f"C{i}", alpha=0.45 if s == "init" else 1.0)
            ax.scatter(np.full(len(values), x), values, color="k", s=10, zorder=3)
            ticks.append(x)
            labels.append(f"{m}\n{s}")
        trained = records.select(rows, model=m, stage="trained")  # each block's largest eigenvalue, every seed
        names = sorted({k[4:] for r in trained for k in r if k.startswith("top/") and np.isfinite(r[k])})
        for j, name in enumerate(names):
            tops = [abs(r[f"top/{name}"]) for r in trained if f"top/{name}" in r]
            ax_top.scatter(np.full(len(tops), start + j), tops, color=f"C{i}", s=14, label=m if j == 0 else None)
        for j, name in enumerate(names):
            ax_top.annotate(name, (start + j, 0), xycoords=("data", "axes fraction"), rotation=45,
                            ha="right", va="top", fontsize=8, xytext=(0, -3), textcoords="offset points")
        start += len(names) + 1
    ax.set_xticks(ticks, labels, fontsize=8)
    ax_top.set_xticks([])
    ax.set(ylabel="mean pairwise JS distance\nbetween block spectra", title="block heterogeneity (dots: seeds)")
    ax_top.set_yscale("log")
    ax_top.set_xlim(-1, start - 1)
    ax_top.legend(fontsize=8)
    ax_top.set(ylabel="largest Ritz value of the block", title="per-block top Hessian eigenvalue after training")
    fig.tight_layout()
    return {"block_heterogeneity.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__)

if __name__ == "__main__":
    cli.main(EXPERIMENT)
