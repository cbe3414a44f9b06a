"""Nguyen & Hein (2017): with one layer at least N - 1 wide, training reaches a global minimum.

Claim (Theorem 3.8, seed 002): for squared loss, an analytic strictly increasing activation and a
layer k of width n_k >= N - 1 followed by a pyramidal structure (n_k >= n_{k+1} >= ... >= n_L), every
critical point at which the feature matrix F_k = [f_k(x_1), ..., f_k(x_N)]^T has full rank N (and
the later weight matrices full column rank) is a global minimum, so gradient training of such a
network ends at zero training loss from (almost) every initialisation.

Setup: N distinct inputs x_i ~ N(0, I_d) with random targets y_i ~ N(0, 1) (the theorem holds for any
targets). Softplus MLPs
(``lsgeo.models.MLP``, biases, LeCun init), squared loss 1/(2N) sum_i (f(x_i) - y_i)^2:
- wide:      hidden widths ``wide`` (first layer n_1 >= N - 1, then non-increasing: pyramidal);
- symmetric: the negative control: the same wide net on its symmetric set, where all n_1 first-layer units
  and their outgoing weights are equal (so rank F_1 <= 1 < N). Gradient descent keeps that set (a
  permutation of the units leaves the loss unchanged), and a critical point of the loss restricted to it is
  a critical point of the wide net (the gradient there is symmetric too). It is trained as the net with
  one first-layer unit (hidden widths ``(1,) + wide[1:]``) and embedded (the unit copied n_1 times, its
  outgoing row divided by n_1: the same function); the wide net's own gradient norm at the embedded point
  is reported. It has more than N free parameters, so a parameter count does not rule a fit out: if the
  rank hypothesis were not needed, it would fit like the wide net; it must not.
- narrow:    hidden widths ``narrow`` (first layer below N - 1, at least N parameters), reported, not
  judged: the theorem's width is sufficient, not necessary (a narrow net with enough parameters fits too).
From ``seeds`` random initialisations each (vmapped, ``lsgeo.train.sweep``) full-batch Adam with a
cosine-decayed step runs ``steps`` steps to a stationary point (the final gradient norm is reported).
A run "reaches a global minimum" when its train loss is below ``threshold`` (the global minimum is 0
for the wide net). At the end, F_1 (the first hidden layer's features) is examined: its singular values,
numerical rank (singular values above max(N, n_1) eps_64 s_max) and smallest singular value.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli, discrimination, experiment, nets, plots, records
from lsgeo import models, train

CLAIM = (
    "With squared loss, an analytic increasing activation and a first hidden layer of width >= N - 1 followed "
    "by a pyramidal structure, training reaches a global minimum (zero loss) from nearly every initialisation "
    "with a full-rank feature matrix F_k; the rank hypothesis is needed: the same wide net on its symmetric set "
    "(all first-layer units equal, rank F_1 = 1 < N; more free parameters than N) stays above zero loss after the "
    "same training (Nguyen & Hein 2017, Theorem 3.8; the control)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """N random-target points, wide vs narrow softplus MLPs; the defaults run in about a minute on a CPU."""

    n_points: int = 48  # N
    input_dim: int = 16  # d (N > d + 1: the inputs are not linearly independent, Theorem 3.4 does not apply)
    wide: tuple[int, ...] = (48, 16)  # first hidden layer >= N - 1, then pyramidal
    narrow: tuple[int, ...] = (8, 4)  # reported: first layer < N - 1, 177 >= N parameters (width is not necessary)
    activation: Literal["softplus", "tanh"] = "softplus"  # analytic and strictly increasing: "softplus" or "tanh"
    seeds: tuple[int, ...] = tuple(range(32))
    steps: int = 4000
    lr: float = 1e-2  # Adam peak step (cosine decay to 0)
    threshold: float = 1e-4  # train loss below this counts as a global minimum (initial loss ~0.5)
    min_fraction: float = 0.9  # the wide net must reach a global minimum from at least this fraction
    data_seed: int = 0


PRESETS = {
    "paper": Config(n_points=100, input_dim=16, wide=(100, 32, 8), narrow=(8, 8), seeds=tuple(range(100)), steps=20_000)
}

ARCHITECTURES = ("wide", "symmetric", "narrow")
CONTROL = "the wide net on its symmetric set (all first-layer units and their outgoing weights equal: rank F_1 = 1)"


def validate(cfg: Config) -> None:
    """Checks beyond the runner's field conventions (``config_checks.check_config``), before a run folder exists."""
    if cfg.wide[0] < cfg.n_points - 1 or list(cfg.wide) != sorted(cfg.wide, reverse=True):
        raise ValueError(
            f"--wide {' '.join(map(str, cfg.wide))} must start with a layer >= --n-points - 1 = {cfg.n_points - 1} "
            "and be non-increasing"
        )


def prepare(cfg: Config):
    if cfg.wide[0] < cfg.n_points - 1 or list(cfg.wide) != sorted(cfg.wide, reverse=True):
        raise ValueError(f"wide={cfg.wide} must start with a layer >= N - 1 = {cfg.n_points - 1} and be non-increasing")
    rng = np.random.default_rng(cfg.data_seed)
    x = rng.normal(size=(cfg.n_points, cfg.input_dim)).astype(np.float32)
    y = rng.normal(size=(cfg.n_points, 1)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def widths(cfg: Config, arch: str) -> tuple[int, ...]:
    """The hidden widths of the net ``arch`` computes with (the symmetric control: the wide net's)."""
    return cfg.narrow if arch == "narrow" else cfg.wide


def make_model(cfg: Config, arch: str) -> models.MLP:
    """The net that is trained: the symmetric control trains the net with one first-layer unit (``embed``)."""
    trained = (1, *cfg.wide[1:]) if arch == "symmetric" else widths(cfg, arch)
    return models.MLP(widths=trained, num_outputs=1, activation=cfg.activation)


def embed_symmetric(params, n_1: int):
    """The wide net's parameters on its symmetric set from those of the net with one first-layer unit: the
    unit's weights and bias copied ``n_1`` times, its outgoing row repeated and divided by ``n_1`` (each copy
    carries 1/n_1 of it), so the embedded net computes the same function."""
    first, second = params["Dense_0"], params["Dense_1"]
    return {
        **params,
        "Dense_0": {"kernel": jnp.tile(first["kernel"], (1, n_1)), "bias": jnp.tile(first["bias"], (n_1,))},
        "Dense_1": {"kernel": jnp.tile(second["kernel"] / n_1, (n_1, 1)), "bias": second["bias"]},
    }


def features(params, x, activation: str, k: int = 1):
    """F_k = [f_k(x_1), ..., f_k(x_N)]^T, the outputs of hidden layer k (1-based) of an ``MLP``, ``[N, n_k]``."""
    act = models.ACTIVATIONS[activation]
    h = x
    for i in range(k):
        layer = params[f"Dense_{i}"]
        h = act(h @ layer["kernel"] + layer["bias"])
    return h


def feature_spectrum(params, x, activation: str):
    """(numerical rank, smallest singular value, smallest / largest) of F_1 (vmappable).

    The rank counts singular values above max(N, n_1) eps s_max in the dtype of ``params``."""
    f = features(params, x, activation)
    s = jnp.linalg.svd(f, compute_uv=False)  # descending, min(N, n_1) values
    n = x.shape[0]
    tol = max(f.shape) * jnp.finfo(s.dtype).eps * s[0]
    s_min = s[-1] if s.shape[0] >= n else jnp.zeros((), s.dtype)  # fewer columns than N: rank-deficient
    return jnp.sum(s > tol), s_min, s_min / s[0]


def train_from_seeds(cfg: Config, arch: str, batch, seeds):
    """Trains ``arch`` (``make_model``) from every seed (one vmapped sweep); returns the final params, stacked."""
    model = make_model(cfg, arch)
    schedule = optax.cosine_decay_schedule(cfg.lr, cfg.steps)
    result = train.sweep(
        nets.Objective(model, "squared_loss"),
        lambda seed: optax.adam(schedule),
        nets.init_fn(model, batch[0]),
        batch,
        {},
        list(seeds),
        num_steps=cfg.steps,
    )
    return jax.tree_util.tree_map(lambda a: a[0], result.params)


def cells(cfg: Config):
    return [dict(arch=a, seed=s) for a in ARCHITECTURES for s in cfg.seeds]


def run(cfg: Config, batch, group):
    arch = group[0]["arch"]
    params = train_from_seeds(cfg, arch, batch, [c["seed"] for c in group])
    free_params = optax.tree.size(jax.tree_util.tree_map(lambda a: a[0], params))
    if arch == "symmetric":
        params = jax.vmap(lambda p: embed_symmetric(p, cfg.wide[0]))(params)
    model = models.MLP(widths=widths(cfg, arch), num_outputs=1, activation=cfg.activation)
    objective = nets.Objective(model, "squared_loss")
    # the loss and gradient of the net itself (symmetric: of the wide net, at the embedded point)
    losses, grads = jax.vmap(lambda p: jax.value_and_grad(objective)(p, batch))(params)
    grad_norms = jax.vmap(optax.tree.norm)(grads)
    with jax.enable_x64(True):  # F_1 of the trained float32 weights, formed and factored in float64
        to64 = lambda a: jnp.asarray(a, jnp.float64)
        rank, s_min, s_rel = jax.vmap(lambda p: feature_spectrum(p, to64(batch[0]), cfg.activation))(
            jax.tree_util.tree_map(to64, params)
        )
    num_params = optax.tree.size(jax.tree_util.tree_map(lambda a: a[0], params))
    return [
        [
            dict(
                num_params=num_params,
                free_params=free_params,
                width_k=widths(cfg, arch)[0],
                train_loss=float(losses[i]),
                grad_norm=float(grad_norms[i]),
                global_min=bool(losses[i] < cfg.threshold),
                rank_F=int(rank[i]),
                sigma_min_F=float(s_min[i]),
                sigma_min_rel_F=float(s_rel[i]),
            )
        ]
        for i in range(len(group))
    ]


def _arch_summary(cfg: Config, rows, arch: str) -> dict:
    sel = records.select(rows, arch=arch)
    losses = np.array([r["train_loss"] for r in sel])
    return dict(
        arch=arch,
        widths=str(widths(cfg, arch)),
        num_params=sel[0]["num_params"],
        free_params=sel[0]["free_params"],
        runs=len(sel),
        fraction_global_min=float(np.mean([r["global_min"] for r in sel])),
        median_loss=float(np.median(losses)),
        min_loss=float(losses.min()),
        max_loss=float(losses.max()),
        median_grad_norm=float(np.median([r["grad_norm"] for r in sel])),
        min_rank_F=min(r["rank_F"] for r in sel),
        min_sigma_min_F=min(r["sigma_min_F"] for r in sel),
    )


def summarize(cfg: Config, rows):
    archs = [a for a in ARCHITECTURES if records.select(rows, arch=a)]
    summaries = {a: _arch_summary(cfg, rows, a) for a in archs}
    wide, symmetric, narrow = (summaries.get(a) for a in ARCHITECTURES)
    figures = {
        f"{s['arch']}_{k}": s[k]
        for s in summaries.values()
        for k in (
            "fraction_global_min",
            "median_loss",
            "min_loss",
            "median_grad_norm",
            "min_rank_F",
            "min_sigma_min_F",
            "num_params",
            "free_params",
        )
    }
    figures["n_points"] = cfg.n_points
    reaches = lambda s: bool(s["fraction_global_min"] >= cfg.min_fraction)  # noqa: E731
    part = discrimination.Part(reaches(wide) and wide["min_rank_F"] == cfg.n_points,
                               reaches(symmetric) if symmetric else None, CONTROL if symmetric else "not run")
    judgement = discrimination.judge({"global_minimum": part})
    reasons = [f"wide: {wide['fraction_global_min']:.0%} of {wide['runs']} runs below {cfg.threshold:g} (needs >= "
               f"{cfg.min_fraction:.0%}), min rank F_1 {wide['min_rank_F']} of N = {cfg.n_points}"]  # fmt: skip
    if symmetric:
        reasons.append(
            f"control, {CONTROL}, {symmetric['free_params']} free parameters for N = {cfg.n_points}: "
            f"{symmetric['fraction_global_min']:.0%} (must stay below {cfg.min_fraction:.0%}; median loss "
            f"{symmetric['median_loss']:.3g}, the wide net's gradient norm there {symmetric['median_grad_norm']:.2g})")
    if narrow:
        reasons.append(f"reported, not judged: narrow {cfg.narrow} ({narrow['num_params']} parameters): "
                       f"{narrow['fraction_global_min']:.0%} below {cfg.threshold:g} (the width is sufficient, "
                       "not necessary)")  # fmt: skip
    reason = "; ".join([*reasons, judgement.reason])
    supported = judgement.supported
    if len(cfg.seeds) < 5:
        supported, reason = None, f"too few initialisations to speak of nearly every one; {reason}"
    power = {"global_minimum": discrimination.Power(
        1.0 - cfg.min_fraction, None, " (share of initialisations that may miss)",
        "Nguyen & Hein 2017, Theorem 3.8: every such critical point (nearly every initialisation; no rate)",
        "tolerance")}
    return experiment.Verdict(supported, figures, list(summaries.values()), reason, judgement.controls,
                              {n: p.record() for n, p in power.items()})


def plot(cfg: Config, rows: list[dict]) -> dict:
    fig, axes = plots.plt.subplots(1, 2, figsize=(12, 4.5))
    jitter = np.random.default_rng(0)
    floor = 1e-30  # a loss of exactly 0 is drawn here
    archs = [a for a in ARCHITECTURES if records.select(rows, arch=a)]
    losses = {a: [r["train_loss"] for r in records.select(rows, arch=a)] for a in archs}
    logs = {a: np.log10(np.maximum(v, floor)) for a, v in losses.items()}
    bins = np.linspace(min(v.min() for v in logs.values()) - 0.5, max(v.max() for v in logs.values()) + 0.5, 40)
    ranks = {cfg.n_points}
    for i, arch in enumerate(archs):
        rank = np.array([r["rank_F"] for r in records.select(rows, arch=arch)])
        ranks |= set(rank.tolist())
        name = f"{arch} {widths(cfg, arch)}" + (" (control: units equal)" if arch == "symmetric" else "")
        axes[0].hist(logs[arch], bins=bins, alpha=0.6, color=f"C{i}", label=name)
        axes[1].scatter(rank + jitter.uniform(-0.3, 0.3, rank.size), 10.0 ** logs[arch], color=f"C{i}", s=12,
                        label=name)
    axes[0].axvline(np.log10(cfg.threshold), color="k", ls=":", label="global-minimum threshold")
    axes[0].set(xlabel="log10 final train loss (float32)", ylabel="initialisations", title=f"N = {cfg.n_points} points")
    axes[1].axhline(cfg.threshold, color="k", ls=":", label="global-minimum threshold")
    axes[1].set_xticks(sorted(ranks))
    axes[1].set(yscale="log", xlabel="numerical rank of F_1 (first-layer features; N = full rank)",
                ylabel="final train loss", title="one point per initialisation")
    for ax in axes:
        ax.legend(fontsize=8)
    return {"wide_networks.png": fig}


EXPERIMENT = experiment.Experiment.from_module(__name__, batch_over=("seed",))

if __name__ == "__main__":
    cli.main(EXPERIMENT)
