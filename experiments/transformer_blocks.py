"""Per-block Hessian spectra: a transformer's blocks are heterogeneous, an MLP's are not.

Claim (Zhang et al. 2024, *Why Transformers Need Adam: A Hessian Perspective*): the Hessian spectra of
the parameter blocks of a transformer (embedding, query, key, value, attention output, MLP layers,
head) differ from one another much more than the blocks of a network of similar size without
attention; this "block heterogeneity" is their explanation of why one learning rate per block
(Adam) beats SGD on transformers.

Setup: modular addition ``(a + b) mod p`` from the tokens ``a b =`` (generated, embedded), a one-block
decoder-only transformer (``lsgeo.models``-style flax linen: token and position embeddings, a causal
multi-head self-attention, a GELU MLP, layer norms, a linear head reading the last position) and a deeper
GELU MLP of similar size on the one-hot tokens, whose hidden layers are blocks of the same kind (the
homogeneous side: its blocks are its weight tensors, the kernels; biases left out); full-batch Adam on the
training pairs, softmax cross-entropy. The Hessian of the training loss is restricted to each block (the
blocks of a ``curvature.Hessian`` operator; layer norms and the position embedding are not compared) and each
block's spectrum estimated by stochastic Lanczos quadrature (``curvature.block_slq_nodes``, the reference
code's 100 Lanczos steps x 10 probes by default, capped at the smallest block's size).

JS^0 as Zhang et al. define it: the mean over pairs of blocks of the Jensen-Shannon distance between their
spectral densities at initialisation, each block's density normalised on its own support (a grid of
``grid_points`` over the block's own [lambda_min, lambda_max], Gaussian broadening of ``width_fraction`` of
that span), the two densities compared bin by bin (``js0``; base 2, in [0, 1]). So a block's scale does not
matter, only the shape of its spectrum: a block whose eigenvalues are 1000x another's but alike in shape
is at distance 0, not in a spike on a shared grid.

Verdict (``discrimination.judge``): JS^0 of the transformer above the MLP's, paired over seeds (the same seed
initialises both and splits the data; ``verdicts.paired_gain``, 95% Student-t); negative control: a second
homogeneous network (the MLP at twice the width) in place of the transformer must not pass the same test.
The trained stage is reported separately (JS at the end of training and the accuracies), not judged. Power:
the minimum detectable effect of the rule, in JS units (Zhang et al. report JS^0 per model, not a difference
in these units).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special

from experiments import cli, discrimination, experiment, plots, records, verdicts
from lsgeo import curvature, losses, models, train

CLAIM = (
    "At initialisation, the Hessian spectra of a transformer's parameter blocks differ from one another more than "
    "the blocks of a homogeneous network of similar size: JS^0, the mean pairwise Jensen-Shannon distance between "
    "block densities each normalised on its own support, is larger (block heterogeneity, Zhang et al. 2024, Sec. 3)."
)
MODELS = ("transformer", "mlp", "mlp_wide")  # mlp_wide: the negative control, at initialisation only
STAGES = ("init", "trained")
SKIPPED = ("ln_", "pos_embed", "bias")  # tiny blocks (scales, offsets, positions, MLP biases) left out


@dataclasses.dataclass(frozen=True)
class Config:
    """Modular addition; a one-block transformer and an MLP of ~4k parameters each; minutes on a CPU."""

    seeds: tuple[int, ...] = (0, 1, 2)
    modulus: int = 23  # p: tokens 0..p-1 and "=", p^2 = 529 pairs
    train_fraction: float = 0.8
    d_model: int = 16
    heads: int = 2
    layers: int = 1  # transformer blocks (attention + MLP each; GPT2-nano: 6)
    mlp_widths: tuple[int, ...] = (32, 32, 32)  # the MLP's hidden widths (4.6k parameters at p = 23)
    steps: int = 400
    eval_every: int = 100
    lr: float = 3e-3
    slq_iters: int = 100  # Lanczos steps per block (the reference code's; capped at the smallest block's size)
    slq_runs: int = 10  # probes per block (the reference code's)
    grid_points: int = 1000  # bins of each block's own grid
    width_fraction: float = 0.01  # Gaussian broadening: this fraction of the block's own eigenvalue span


PRESETS = {
    # GPT2-nano, Zhang et al.'s smallest GPT2 (their code builds on nanoGPT; its small character-level "baby GPT"):
    # 6 blocks of width 384 with 6 heads, 10.7M parameters here (vocabulary p + 1 = 98, 3 positions: the task is
    # modular addition, not Shakespeare, so the context is 3, not 256); the MLP side of similar size, 4 hidden
    # layers of width 1880 (11.2M; its control at twice the width, 43.5M). Adam at lr 1e-3 (nanoGPT's for this size).
    # For a GPU: 100 Lanczos steps x 10 probes on each of the transformer's 38 blocks (per layer query, key, value,
    # attention output, MLP in and out; the embedding; the head) is ~38k Hessian-vector products per seed and stage.
    "paper": Config(modulus=97, d_model=384, heads=6, layers=6, mlp_widths=(1880,) * 4, steps=5000, eval_every=500,
                    lr=1e-3),
}


def validate(cfg: Config) -> None:
    if cfg.modulus < 3:
        raise ValueError(f"--modulus must be >= 3, got {cfg.modulus}")
    if cfg.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {cfg.layers}")
    if cfg.d_model % cfg.heads:
        raise ValueError(f"--d-model ({cfg.d_model}) must be a multiple of --heads ({cfg.heads})")
    if not 0.0 < cfg.train_fraction < 1.0:
        raise ValueError(f"--train-fraction must be in (0, 1), got {cfg.train_fraction}")


def cells(cfg: Config) -> list[dict]:
    return [dict(model=m, seed=s) for m in MODELS for s in cfg.seeds]


class TinyTransformer(nn.Module):
    """Decoder-only, pre-LN, ``layers`` blocks (GPT-2's layout): embed + positions, then per block a causal
    self-attention and a GELU MLP (width 4 d_model), each after a layer norm and added to the residual stream; a
    final layer norm and a head on the last token. With one block its modules are ``attention``, ``mlp_in``, ...;
    with several, ``attention_0``, ``mlp_in_0``, ... (one block of Zhang et al. per weight tensor either way)."""

    vocab: int
    length: int
    d_model: int
    heads: int
    outputs: int
    layers: int = 1

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (self.length, self.d_model))
        for i in range(self.layers):  # a static Python loop over the architecture's blocks, unrolled at trace time
            end = "" if self.layers == 1 else f"_{i}"
            h = nn.LayerNorm(name=f"ln_attention{end}")(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name=f"attention{end}")(
                h, mask=nn.make_causal_mask(tokens))
            h = nn.LayerNorm(name=f"ln_mlp{end}")(x)
            hidden = nn.gelu(nn.Dense(4 * self.d_model, name=f"mlp_in{end}")(h))
            x = x + nn.Dense(self.d_model, name=f"mlp_out{end}")(hidden)
        return nn.Dense(self.outputs, name="head")(nn.LayerNorm(name="ln_final")(x)[:, -1])


def block_name(path: tuple[str, ...]) -> str:
    """Zhang et al.'s blocks: the attention's query / key / value / output apart, every other module whole; an
    MLP layer's (``Dense_i``) kernel is its block, its bias is named ``bias ...`` (``SKIPPED``)."""
    if path[0].startswith("attention"):
        return "/".join(path[:2])
    if path[0].startswith("Dense_"):
        return path[0] if path[-1] == "kernel" else f"bias {path[0]}"
    return path[0]


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
        module = TinyTransformer(p + 1, 3, cfg.d_model, cfg.heads, p, cfg.layers)

        def predict(params, t):
            return module.apply({"params": params}, t)
    else:
        widths = cfg.mlp_widths if model == "mlp" else tuple(2 * w for w in cfg.mlp_widths)
        module = models.MLP(widths=widths, num_outputs=p, activation="gelu")

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


def own_support_density(theta, tau, grid_points: int, width_fraction: float) -> np.ndarray:
    """One block's SLQ density normalised on its own support: nodes ``theta`` and weights ``tau`` (flat) broadened by
    a Gaussian of ``width_fraction`` of the block's eigenvalue span, on ``grid_points`` bins over
    [min theta - 5 width, max theta + 5 width]; returned as the masses of the bins (summing to 1)."""
    theta, tau = np.asarray(theta, np.float64).ravel(), np.asarray(tau, np.float64).ravel()
    span = theta.max() - theta.min()
    width = width_fraction * (span if span > 0 else max(abs(theta.max()), 1e-12))
    grid = np.linspace(theta.min() - 5 * width, theta.max() + 5 * width, grid_points)
    kernel = np.exp(-0.5 * ((grid[None, :] - theta[:, None]) / width) ** 2)
    mass = tau @ (kernel / kernel.sum(axis=1, keepdims=True))  # each node's Gaussian as masses over the bins
    return mass / mass.sum()


def _densities(cfg: Config, op, key) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every compared block's density on its own support (``own_support_density``) and largest Ritz value, from
    ``curvature.block_slq_nodes`` (all blocks in one compiled program)."""
    sizes = {name: b.size for name, b in curvature.blocks(op, block_name).items() if not name.startswith(SKIPPED)}
    iters = min(cfg.slq_iters, *sizes.values())
    found = curvature.block_slq_nodes(op, key, block_name, num_iters=iters, num_runs=cfg.slq_runs, skip=SKIPPED)
    dens = {name: own_support_density(t, w, cfg.grid_points, cfg.width_fraction) for name, (t, w) in found.items()}
    return dens, {name: float(np.max(np.asarray(t))) for name, (t, _) in found.items()}


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two densities given as masses on index-aligned bins:
    sqrt(KL(p || m) / 2 + KL(q || m) / 2), m = (p + q) / 2, each normalised to sum 1 (0 log 0 = 0; the
    divergence clipped at 0 against rounding, where ``scipy.spatial.distance.jensenshannon`` returns NaN)."""
    p, q = (np.asarray(a, np.float64) / np.sum(a) for a in (p, q))
    m = (p + q) / 2
    divergence = (scipy.special.rel_entr(p, m).sum() + scipy.special.rel_entr(q, m).sum()) / (2 * np.log(2))
    return float(np.sqrt(max(divergence, 0.0)))


def js0(densities: dict[str, np.ndarray]) -> float:
    """Zhang et al.'s JS^0 at initialisation (or the same statistic at another stage): the mean over pairs of
    blocks of the Jensen-Shannon distance between their own-support densities."""
    names = list(densities)
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    return float(np.mean([js_distance(densities[names[i]], densities[names[j]]) for i, j in pairs]))


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
        points = {"init": params}
        if model != "mlp_wide":  # the control is judged at initialisation only
            points["trained"] = train.train(objective, optax.adam(cfg.lr), params, train_batch, num_steps=cfg.steps,
                                            eval_every=cfg.eval_every, key=seed).params  # fmt: skip
        rows = []
        for stage, point in points.items():
            op = curvature.Hessian(objective, point, train_batch)
            densities, tops = _densities(cfg, op, jax.random.key(1000 + seed))
            rows.append(dict(
                stage=stage, js=js0(densities), blocks=len(densities), size=op.size,
                train_loss=float(objective(point, train_batch)),
                train_acc=float(losses.accuracy(predict(point, train_batch[0]), train_batch[1])),
                test_acc=float(losses.accuracy(predict(point, test_batch[0]), test_batch[1])),
                **{f"top/{name}": top for name, top in tops.items()},
                **{f"density/{name}": ",".join(f"{v:.4g}" for v in d[:: max(1, len(d) // 100)])
                   for name, d in densities.items()},
            ))  # fmt: skip
        out.append(rows)
    return out


def _density(row: dict, name: str) -> np.ndarray:
    return np.array([float(v) for v in row[f"density/{name}"].split(",")])


def summarize(cfg: Config, rows: list[dict]) -> experiment.Verdict:
    seeds = list(cfg.seeds)
    js = {(m, s): records.per_seed(rows, "js", seeds, model=m, stage=s)
          for m in MODELS for s in STAGES if records.select(rows, model=m, stage=s)}  # fmt: skip
    claim = verdicts.paired_gain(js[("transformer", "init")], js[("mlp", "init")])
    control = verdicts.paired_gain(js[("mlp_wide", "init")], js[("mlp", "init")])
    trained = verdicts.paired_gain(js[("transformer", "trained")], js[("mlp", "trained")])
    part = discrimination.Part(claim, control, "a second homogeneous net (the MLP at twice the width) in place of "
                               "the transformer")  # fmt: skip
    judgement = discrimination.judge({"js0": part})
    power = discrimination.Power.of(claim, None, " (JS distance)", "Zhang et al. 2024 report JS^0 per model "
                                    "(transformers far above CNNs), not a difference in these units")  # fmt: skip
    figures = {f"js_{m}_{s}": float(np.mean(v)) for (m, s), v in js.items()}
    figures.update({"js0_gain": claim.mean, "js0_gain_se": claim.se, "control_gain": control.mean,
                    "control_gain_se": control.se, "trained_gain": trained.mean, "trained_gain_se": trained.se,
                    "mde_js0": power.mde})  # fmt: skip
    figures.update({f"{k}_{m}": float(np.mean(records.per_seed(rows, k, seeds, model=m, stage="trained")))
                    for m in ("transformer", "mlp") for k in ("train_acc", "test_acc")})  # fmt: skip
    table = [dict(model=m, stage=s, js=f"{np.mean(v):.3f} +- {verdicts.mean_se(v)[1]:.3f}",
                  test_acc=f"{np.mean(records.per_seed(rows, 'test_acc', seeds, model=m, stage=s)):.3f}")
             for (m, s), v in js.items()]  # fmt: skip
    reason = "; ".join([
        claim.describe("JS^0 at initialisation, transformer - MLP"),
        control.describe("control: JS^0, MLP at twice the width - MLP"),
        "trained stage (reported, not judged): " + trained.describe("JS after training, transformer - MLP"),
        judgement.reason, power.describe(),
    ])  # fmt: skip
    return experiment.Verdict(judgement.supported, figures, table, reason, judgement.controls, {"js0": power.record()})


def plot(cfg: Config, rows: list[dict]) -> dict:
    plt = plots.plt
    fig = plt.figure(figsize=(16, 8))
    ax = fig.add_subplot(2, 3, 1)
    ticks, labels = [], []
    for i, m in enumerate(MODELS):
        for j, s in enumerate(STAGES):
            if not records.select(rows, model=m, stage=s):
                continue
            values = records.per_seed(rows, "js", list(cfg.seeds), model=m, stage=s)
            x = i * 3 + j
            mean, se = verdicts.mean_se(values)
            ax.bar(x, mean, color=f"C{i}", alpha=1.0 if s == "init" else 0.45)
            ax.errorbar(x, mean, yerr=verdicts.t_critical(len(values)) * se if len(values) > 1 else 0, color="k",
                        capsize=4)  # fmt: skip
            ax.scatter(np.full(len(values), x), values, color="k", s=10, zorder=3)
            ticks.append(x)
            labels.append(f"{m}\n{s}")
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set(ylabel="mean pairwise JS distance between\nown-support block densities",
           title="JS^0 (init: judged; mlp_wide: control)\nbars: mean, 95% t interval; dots: seeds")  # fmt: skip
    for k, m in enumerate(("transformer", "mlp")):
        for j, stage in enumerate(STAGES):
            axd = fig.add_subplot(2, 3, 2 + k + 3 * j)
            (row,) = records.select(rows, model=m, stage=stage, seed=cfg.seeds[0])
            for name in sorted(n[len("density/"):] for n in row if n.startswith("density/")):
                d = _density(row, name)
                axd.plot(np.linspace(0, 1, len(d)), d / d.sum(), lw=1, label=name)
            axd.set(yscale="log", ylim=(1e-6, 1.5), xlabel="eigenvalue, rescaled to the block's own support [0, 1]",
                    ylabel="mass per bin (100 bins shown)",
                    title=f"{m}, {stage} (seed {cfg.seeds[0]}): per-block spectra")  # fmt: skip
            axd.legend(fontsize=6, ncol=2)
    ax_top = fig.add_subplot(2, 3, 4)
    start = 0
    for i, m in enumerate(("transformer", "mlp")):
        init = records.select(rows, model=m, stage="init")
        names = sorted({k[4:] for r in init for k in r if k.startswith("top/") and np.isfinite(r[k])})
        for j, name in enumerate(names):
            tops = [abs(r[f"top/{name}"]) for r in init if f"top/{name}" in r]
            ax_top.scatter(np.full(len(tops), start + j), tops, color=f"C{i}", s=14, label=m if j == 0 else None)
            ax_top.annotate(name, (start + j, 0), xycoords=("data", "axes fraction"), rotation=45,
                            ha="right", va="top", fontsize=7, xytext=(0, -3), textcoords="offset points")  # fmt: skip
        start += len(names) + 1
    ax_top.set_xticks([])
    ax_top.set(yscale="log", ylabel="largest Ritz value of the block",
               title="per-block top eigenvalue at initialisation\n(scales differ; JS^0 compares shapes)")  # fmt: skip
    ax_top.legend(fontsize=8)
    fig.tight_layout()
    return {"block_heterogeneity.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__)

if __name__ == "__main__":
    cli.main(EXPERIMENT)
