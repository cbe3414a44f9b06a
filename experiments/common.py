"""What the experiments share: data, the model contract, the training methods, paired verdicts, curves.

Training methods of Orvieto et al. (AISTATS 2023, Section 5), as runner cells (``method_cells``):

- ``gd``:    (S)GD, w_{t+1} = w_t - lr grad R(w_t);
- ``noise``: "GD+noise", the gradient taken at w_t + sigma eps (every parameter perturbed);
- ``layer``: "GD+noise (layer)", the gradient taken at w_t + sigma sqrt(M) eps_j on one layer j,
  uniform at random (M = number of layers; the same second-order regulariser as ``noise``, without
  its variance explosion at large width, Sections 3.2 and 4).

The noise goes through ``lsgeo.optim.noise_injection`` and the runs through ``lsgeo.train.sweep``:
the cells of one method are one vmapped sweep over (sigma, seed), compiled once, evaluated at the
clean iterate w_t. ``gd`` has the single cell sigma = 0. A seed fixes the initialisation (and the
minibatch order), so the methods are *paired* by seed.

Verdicts (``paired_gain``): the gain of a method over its reference is the mean of the per-seed
differences; its standard error is that of those differences (the seeds pair the methods). A gain
supports a claim when it exceeds ``t s.e. + one example's worth``, with t the two-sided 95% Student-t
critical value for the number of seeds (``t_critical``: 4.30 with 3 seeds, 2.78 with 5, 2.26 with 10),
contradicts it when it is below the negative of that margin, and is null (within noise) in between,
or with fewer than 3 seeds. The "example's worth" (``resolution``, e.g. 1 / n_test for an accuracy)
is the most the statistic ``mean - t s.e.`` can move when one test example changes its answer in one
run, so a verdict is never decided by a single example. A claim of several parts (``combine``) is
supported when every part is, and contradicted only by a part that survives Holm's correction for
the number of parts. Hyperparameters (sigma) are chosen on a validation split carved from the
training data (``splits``, ``best_sigma``), never on the test set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import runner
from lsgeo import curvature, losses, models, optim, risk, sharpness, train
from lsgeo import data as data_lib

METHODS = ("gd", "noise", "layer")
COLORS = {"gd": "black", "noise": "tab:blue", "layer": "tab:red"}
_SUFFIX = {"gd": "", "noise": "+noise", "layer": "+noise (layer)"}
_MODES = {"noise": "full", "layer": "layerwise"}
METRICS = {"loss": losses.softmax_cross_entropy, "accuracy": losses.accuracy, "squared_loss": losses.squared_loss}


def label(method: str, *, minibatch: bool = False) -> str:
    """ "GD", "GD+noise", "GD+noise (layer)", or with ``minibatch`` the same with "SGD"."""
    return ("SGD" if minibatch else "GD") + _SUFFIX[method]


def load_dataset(name: str, **kwargs) -> data_lib.Dataset:
    """``lsgeo.data.load_dataset`` with the run's ``--data-dir`` and ``--download`` (``runner.data_options``)."""
    options = runner.data_options()
    return data_lib.load_dataset(name, data_dir=options.data_dir, download=options.download, **kwargs)


class Splits(NamedTuple):
    """Train, validation (None without one) and test batches ``(x, y)`` of jax arrays of a classification set."""

    train: tuple
    val: tuple | None
    test: tuple
    num_classes: int


def splits(
    dataset: str, *, n_train: int | None, n_val: int = 0, n_test: int | None = None, flatten: bool | None = None
) -> Splits:
    """``n_train`` training and ``n_val`` validation points drawn disjointly from the training split of
    ``dataset`` (``n_train=None``: all but ``n_val``), and ``n_test`` test points (None: all); deterministic.

    The inputs are standardised with the statistics of the training and validation inputs together
    (``lsgeo.data.load_dataset``: no labels involved); sigma is chosen on ``val``, never on ``test``."""
    ds = load_dataset(
        dataset, n_train=None if n_train is None else n_train + n_val, n_test=n_test, seed=0, flatten=flatten
    )
    if not 0 <= n_val < len(ds.x_train):
        raise ValueError(f"n_val={n_val} must leave training points of the {len(ds.x_train)} in {dataset}")
    order = np.random.default_rng(0).permutation(len(ds.x_train)) if n_val else np.arange(len(ds.x_train))
    val, tr = order[:n_val], order[n_val:]
    as_jax = lambda x, y: (jnp.asarray(x), jnp.asarray(y))
    return Splits(
        as_jax(ds.x_train[tr], ds.y_train[tr]),
        as_jax(ds.x_train[val], ds.y_train[val]) if n_val else None,
        as_jax(ds.x_test, ds.y_test),
        ds.num_classes,
    )


@dataclasses.dataclass(frozen=True)
class Objective:
    """``f(params, batch)``: the mean ``metric`` ("loss": softmax cross-entropy, "accuracy",
    "squared_loss") of the flax ``model`` on ``batch = (x, y)``: ``lsgeo.risk.risk`` of
    ``lsgeo.models.make_predict``. For a BatchNorm model the batch carries the statistics, and ``stats``
    says which are used:

    - ``"running"``:   ``batch = (x, y, model_state)``, evaluation mode with those statistics;
    - ``"batch"``:     ``batch = (x, y, model_state)``, training mode: the statistics of ``x`` itself (on a
      full data set, the exact population statistics at ``params``);
    - ``"recompute"``: ``batch = (x, y, model_state, x_stats)``, evaluation mode with the statistics of
      ``x_stats`` recomputed at ``params`` (``lsgeo.models.recompute_batch_stats``: test data at a path point).

    Hashable by value, so jit-compiled library functions (``f`` static) compile once per model."""

    model: Any
    metric: str = "loss"
    stats: str = "running"

    def __call__(self, params, batch):
        x, y, *rest = batch
        state = rest[0] if rest else None
        if self.stats == "recompute" and state:
            state = models.recompute_batch_stats(self.model, params, state, rest[1])
        predict = models.make_predict(self.model, state, train=self.stats == "batch")
        return risk.risk(predict, METRICS[self.metric], params, (x, y))


@dataclasses.dataclass(frozen=True)
class TrainObjective:
    """The training objective of a BatchNorm model, ``f(params, model_state, batch) -> (loss, new_state)``:
    batch statistics, running averages updated (``lsgeo.models.make_train_apply``)."""

    model: Any
    metric: str = "loss"

    def __call__(self, params, model_state, batch):
        outputs, new_state = models.make_train_apply(self.model)(params, model_state, batch[0])
        return METRICS[self.metric](outputs, batch[1]), new_state


def init_fn(model, x_example) -> Callable:
    """``key -> params`` of a flax model, traceable (``lsgeo.train.sweep`` vmaps it over seeds)."""
    x = jnp.asarray(x_example[:1])
    return lambda key: model.init(key, x, train=False)["params"]


def state_init_fn(model, x_example) -> Callable:
    """``key -> model_state`` (the non-parameter collections, BatchNorm statistics) of a flax model."""
    x = jnp.asarray(x_example[:1])
    return lambda key: {k: v for k, v in model.init(key, x, train=False).items() if k != "params"}


@dataclasses.dataclass(frozen=True)
class Evaluate:
    """``eval_fn`` of ``lsgeo.train``: ``{split}_acc`` and ``{split}_loss`` for the splits ``"val"`` and ``"test"``
    (batches ``(x, y)``) of the dict ``eval_data`` (other entries are ignored). With a model state
    (``eval_fn(params, model_state, eval_data)``)
    and ``recompute=True``, the BatchNorm statistics are first recomputed at ``params`` on the inputs
    ``eval_data["stats"]`` (``lsgeo.models.recompute_batch_stats``: right for SWA averages and path points)."""

    model: Any
    recompute: bool = False
    batch_size: int | None = None

    def __call__(self, params, *args):
        state, eval_data = (None, args[0]) if len(args) == 1 else args
        if self.recompute and state:
            state = models.recompute_batch_stats(
                self.model, params, state, eval_data["stats"], batch_size=self.batch_size
            )
        predict = models.make_predict(self.model, state)
        out = {}
        for name in ("val", "test"):
            if name in eval_data:
                logits = predict(params, eval_data[name][0])
                out[f"{name}_acc"] = losses.accuracy(logits, eval_data[name][1])
                out[f"{name}_loss"] = losses.softmax_cross_entropy(logits, eval_data[name][1])
        return out


ARCHS = ("mlp", "resnet")


def check_arch(arch: str) -> None:
    """``arch`` must be one of ``ARCHS`` (a ValueError naming it otherwise)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


@dataclasses.dataclass(frozen=True)
class Net:
    """A classifier of the experiments, a ReLU ``MLP`` or a ``ResNet18`` with BatchNorm, and what training
    and measuring it need, alike for both (``batch_norm``: whether there are statistics to carry)."""

    model: Any
    x_example: Any = dataclasses.field(compare=False, hash=False)
    batch_norm: bool = False

    @classmethod
    def of(cls, cfg, data: Splits) -> Net:
        """The net of ``cfg.arch`` ("mlp": ``cfg.widths``; "resnet": ``cfg.resnet_width``, ``cfg.stage_sizes``)."""
        check_arch(cfg.arch)
        if cfg.arch == "mlp":
            return cls(models.MLP(widths=cfg.widths, num_outputs=data.num_classes), data.train[0][:1])
        model = models.ResNet18(num_classes=data.num_classes, width=cfg.resnet_width, stage_sizes=cfg.stage_sizes)
        return cls(model, data.train[0][:1], batch_norm=True)

    @property
    def objective(self) -> Objective:
        """``f(params, (x, y[, model_state]))``, evaluation mode."""
        return Objective(self.model)

    @property
    def train_objective(self):
        """The objective ``lsgeo.train`` differentiates (BatchNorm: training mode, statistics threaded)."""
        return TrainObjective(self.model) if self.batch_norm else Objective(self.model)

    @property
    def init(self) -> Callable:
        return init_fn(self.model, self.x_example)

    @property
    def init_state(self) -> Callable | None:
        return state_init_fn(self.model, self.x_example) if self.batch_norm else None

    @property
    def evaluate(self) -> Evaluate:
        """``eval_fn``: accuracy and loss on val / test, with recomputed statistics for a BatchNorm net."""
        return Evaluate(self.model, recompute=self.batch_norm)

    def eval_data(self, data: Splits) -> dict:
        out = {"test": data.test} if data.val is None else {"val": data.val, "test": data.test}
        return {**out, "stats": data.train[0]} if self.batch_norm else out

    def population_stats(self, params, states, x):
        """``[R]`` stacked BatchNorm states with the exact statistics of ``x`` at the ``[R]`` stacked ``params``
        (``lsgeo.models.recompute_batch_stats``); None for a net without BatchNorm."""
        if not self.batch_norm:
            return None
        recompute = jax.vmap(lambda p, s, xx: models.recompute_batch_stats(self.model, p, s, xx), in_axes=(0, 0, None))
        return jax.jit(recompute)(params, states, x)


def method_grid(methods, sigmas) -> list[tuple[str, float]]:
    """The (method, sigma) pairs; ``gd`` gets sigma = 0 only."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be among {METHODS}, got {m!r}")
    return [(m, float(s)) for m in methods for s in ((0.0,) if m == "gd" else sigmas)]


def method_cells(methods, sigmas, seeds, **fixed) -> list[dict]:
    """The (method, sigma, seed) grid (``method_grid`` x seeds). ``fixed`` fields come first."""
    return [dict(**fixed, method=m, sigma=s, seed=int(k)) for m, s in method_grid(methods, sigmas) for k in seeds]


def optimizer_fn(method: str, inner: optax.GradientTransformation, *, noise_until: int | None = None) -> Callable:
    """``(sigma, seed) -> optimizer`` for ``lsgeo.train.sweep``; ``noise_until``: noise off from that step on."""
    if method == "gd":
        return lambda sigma, seed: inner

    def make(sigma, seed):
        level = sigma if noise_until is None else (lambda t: jnp.where(t < noise_until, sigma, 0.0))
        return optim.noise_injection(inner, level, mode=_MODES[method], seed=seed)

    return make


def train_cells(
    objective,
    init_params,
    data,
    cells,
    *,
    inner,
    num_steps,
    eval_every,
    eval_fn,
    eval_data,
    batch_size=None,
    model_state=None,
    noise_until=None,
    members_per_chunk=None,
    augment=None,
    final_fn=None,
) -> list[list[dict]]:
    """Trains the cells of one method (same ``method`` field) with one ``lsgeo.train.sweep``.

    The sweep runs the grid of the cells' distinct sigmas x seeds (on a resume, possibly a few
    finished cells again) and returns, per cell, its history as rows ``{step, train_loss, ...}``.
    A diverged run has NaN rows after its divergence (``lsgeo.train.sweep`` semantics).
    ``final_fn(params, model_state) -> dict`` adds measurements at the final clean parameters of each
    run to its last row, outside the vmapped training program (which it would make larger to compile).
    With a test split in ``eval_data`` (a dict), the last row records its size ``n_test`` (``resolution``).
    """
    (method,) = {c["method"] for c in cells}
    sigmas = sorted({c["sigma"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    with runner.progress_bar(num_steps, f"{method} x {len(sigmas) * len(seeds)} runs") as callback:
        result = train.sweep(
            objective, optimizer_fn(method, inner, noise_until=noise_until), init_params, data, {"sigma": sigmas},
            seeds, num_steps=num_steps, eval_every=eval_every, batch_size=batch_size, eval_fn=eval_fn,
            eval_data=eval_data, model_state=model_state, members_per_chunk=members_per_chunk, augment=augment,
            callback=callback,
        )  # fmt: skip
    out = []
    for c in cells:
        index = (sigmas.index(c["sigma"]), seeds.index(c["seed"]))
        rows = history_rows(result.history, index)
        if final_fn is not None:
            member = jax.tree_util.tree_map(lambda a: a[index], (result.params, result.model_state))
            rows[-1].update({k: float(v) for k, v in final_fn(*member).items()})
        if isinstance(eval_data, dict) and "test" in eval_data:
            rows[-1]["n_test"] = int(eval_data["test"][1].shape[0])
        out.append(rows)
    return out


def train_methods(objective, init_params, data, cells, **kwargs) -> list[list[dict]]:
    """``train_cells`` for cells of several methods, with one compiled program per noise mode.

    The ``gd`` cells join the sweep of a noise method in ``cells`` (``noise`` if present, else ``layer``)
    as its members at sigma = 0: the noise xi = 0 * eps is exactly zero, so the iterates are those of
    plain (S)GD bit for bit, and the (S)GD program is not compiled separately. ``kwargs``: those of
    ``train_cells``. Returns the rows of each cell, in the order of ``cells``."""
    methods = {c["method"] for c in cells}
    host = next((m for m in ("noise", "layer") if m in methods), "gd")
    programs: dict[str, list[int]] = {}
    for i, c in enumerate(cells):
        programs.setdefault(host if c["method"] == "gd" else c["method"], []).append(i)
    out: list = [None] * len(cells)
    for method, index in programs.items():
        group = [dict(cells[i], method=method) for i in index]
        for i, rows in zip(index, train_cells(objective, init_params, data, group, **kwargs)):
            out[i] = rows
    return out


def history_rows(history: dict, index: tuple = (), prefix: str = "", **fields) -> list[dict]:
    """Rows ``{**fields, step, train_loss, ...}`` of one run of a ``lsgeo.train`` history (``index`` picks the
    member of a sweep's ``[S, R]`` axes), without the SWA keys. With ``prefix="swa_"``, only the SWA
    average's keys (``swa_k`` named ``k``), at the evaluations where they are finite (NaN before averaging starts)."""
    if prefix:
        history = {"step": history["step"], **{k[len(prefix) :]: v for k, v in history.items() if k.startswith(prefix)}}
    h = {k: np.asarray(v)[index] for k, v in history.items() if prefix or not k.startswith("swa_")}
    rows = [
        {**fields, "step": int(t), **{k: float(v[e]) for k, v in h.items() if k != "step"}}
        for e, t in enumerate(h["step"])
    ]
    if prefix:
        rows = [r for r in rows if all(np.isfinite(r[k]) for k in h if k != "step")]
    return rows


def resolution(rows: list[dict]) -> float:
    """1 / n_test: what one test example changes in a run's accuracy (``train_cells`` records n_test)."""
    return 1.0 / max(r.get("n_test", 0) for r in rows)


def select(rows: list[dict], **fields) -> list[dict]:
    """The rows whose fields equal ``fields`` (e.g. ``select(rows, method="gd", sigma=0.0)``)."""
    return [r for r in rows if all(r.get(k) == v for k, v in fields.items())]


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for a single value; NaN for none)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se


def stack(trees: Sequence) -> Any:
    """The pytrees ``trees`` stacked along a new leading axis (numpy)."""
    return jax.tree_util.tree_map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *trees)


def per_seed(rows: list[dict], key: str, seeds: Sequence[int], **fields) -> np.ndarray:
    """``[len(seeds)]``: ``key`` of the one row per seed that matches ``fields`` (e.g. the final step)."""
    out = []
    for s in seeds:
        (row,) = select(rows, seed=s, **fields) or [None]
        if row is None:
            raise KeyError(f"no row with seed={s} and {fields}")
        out.append(row[key])
    return np.asarray(out, dtype=float)


def at_loss(rows: list[dict], key: str, target: float, loss_key: str = "train_loss", **fields) -> float:
    """``key`` of one run (the rows matching ``fields``, by step) where its ``loss_key`` first falls to ``target``:
    linear in log(loss) between the two evaluations around that point; NaN if the run never gets there.

    Comparing runs at the same training loss (rather than the same step) keeps a method that merely trains
    slower from looking flatter or sharper."""
    run = sorted((r for r in select(rows, **fields) if key in r), key=lambda r: r["step"])
    for prev, row in zip([None, *run], run):
        if row[loss_key] <= target:
            if prev is None or prev[loss_key] <= row[loss_key]:
                return float(row[key])
            lo, hi = np.log(row[loss_key]), np.log(prev[loss_key])
            frac = (hi - np.log(target)) / (hi - lo)
            return float(prev[key] + frac * (row[key] - prev[key]))
    return float("nan")


def curve(rows: list[dict], key: str, **fields) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, mean over the matching rows at each step)`` of ``key`` (e.g. over the seeds of a method)."""
    sel = [r for r in select(rows, **fields) if key in r]
    steps = np.array(sorted({r["step"] for r in sel}))
    return steps, np.array([np.mean([r[key] for r in sel if r["step"] == t]) for t in steps])


LEVEL = 0.05  # two-sided level of every paired test (a 95% interval for the gain)


def t_critical(n: int, level: float = LEVEL) -> float:
    """The two-sided Student-t critical value t_{1 - level/2, n - 1} for ``n`` paired seeds (4.30 for 3 seeds,
    2.78 for 5, -> 1.96 for many): ``mean - t se > 0`` is a paired t test at ``level``."""
    if n < 2:
        return float("inf")
    from scipy import stats  # a dependency of jax itself

    return float(stats.t.ppf(1.0 - level / 2.0, n - 1))


class Gain(NamedTuple):
    """A paired comparison over seeds (``paired_gain``)."""

    mean: float  # mean of the per-seed differences
    se: float  # standard error of the per-seed differences
    n: int  # seeds
    margin: float  # t se + the most one example can move mean - t se (t: ``t_critical(n, level)``)
    supported: bool | None  # mean > margin: True; mean < -margin: False; else None
    level: float = LEVEL  # two-sided level of the test
    resolution: float = 0.0  # the most one example changes a per-seed value

    @property
    def t(self) -> float:
        """The critical value the margin uses."""
        return t_critical(self.n, self.level)

    @property
    def p_value(self) -> float:
        """Two-sided p-value of the paired t test of mean = 0 (1.0 when untestable; 0.0 for an exact nonzero
        difference, se = 0)."""
        if self.n < MIN_SEEDS or not np.isfinite(self.mean):
            return 1.0
        if self.se == 0:
            return 0.0 if self.mean != 0 else 1.0
        from scipy import stats

        return float(2.0 * stats.t.sf(abs(self.mean) / self.se, self.n - 1))

    def at(self, level: float) -> Gain:
        """The same comparison judged at another two-sided ``level`` (e.g. a Holm-corrected one)."""
        if not np.isfinite(self.margin):
            return self._replace(level=level)
        margin = _margin(self.se, self.n, self.resolution, level)
        supported = True if self.mean > margin else (False if self.mean < -margin else None)
        return self._replace(margin=margin, supported=supported, level=level)

    def noninferior(self, bound: float) -> bool | None:
        """A non-inferiority test ("equal or better", up to ``bound``): True when the whole interval
        mean ± margin lies above -bound, False when it lies below -bound (worse by more than the bound beyond
        noise), None otherwise or when untestable. With identical per-seed values the interval is the
        resolution's width around 0, so the answer says how close "equal" is, not that nothing was measured."""
        if not np.isfinite(self.margin):
            return None
        if self.mean - self.margin > -bound:
            return True
        return False if self.mean + self.margin < -bound else None

    def describe(self, what: str, scale: float = 1.0, unit: str = "") -> str:
        """``what`` with its value, s.e. and the verdict, e.g.
        "accuracy gain +1.2 ± 0.4 points (3 seeds): > margin 1.9 (95% paired t, t=4.3)"."""
        test = f"{100 * (1 - self.level):.3g}% paired t, t={self.t:.3g}"
        word = {
            True: f"> margin {scale * self.margin:.3g} ({test})",
            False: f"< -margin {scale * self.margin:.3g} ({test})",
            None: f"within ±{scale * self.margin:.3g} (noise; {test})"
            if np.isfinite(self.margin)
            else f"fewer than {MIN_SEEDS} seeds, or a run that never got there: cannot tell",
        }
        seeds = f"{self.n} seed{'s' if self.n != 1 else ''}"
        return f"{what} {scale * self.mean:+.3g} ± {scale * self.se:.2g}{unit} ({seeds}): {word[self.supported]}"


MIN_SEEDS = 3  # below this the s.e. of the differences (1 degree of freedom for 2 seeds) decides nothing


def _margin(se: float, n: int, resolution: float, level: float) -> float:
    t = t_critical(n, level)
    return float(t * se + resolution * (1.0 / n + t / np.sqrt(n * (n - 1))))


def paired_gain(treated, control, *, resolution: float = 0.0, level: float = LEVEL) -> Gain:
    """Gain of ``treated`` over ``control`` (sequences paired by seed; higher is better); null with fewer
    than ``MIN_SEEDS`` seeds or a non-finite difference.

    A two-sided paired Student-t test at ``level`` (default 5%): supported when the mean difference exceeds
    ``t se``, with t = ``t_critical(n, level)`` for the n seeds (4.30 for 3 seeds, 2.78 for 5, 2.26 for 10),
    contradicted below minus that margin. ``resolution``: the most one example can change a per-seed value
    (1 / n_test for an accuracy, 0 for a continuous quantity). The margin is t se + resolution
    (1/n + t/sqrt(n (n-1))): changing one per-seed difference by ``resolution`` moves the mean by at most
    resolution / n and the s.e. by at most resolution / sqrt(n (n-1)), so a verdict beyond the margin
    survives any single example.
    """
    with np.errstate(invalid="ignore"):  # inf - inf: a run that never reached its event
        d = np.asarray(treated, dtype=float) - np.asarray(control, dtype=float)
    n = d.size
    mean, se = mean_se(d)
    if n < MIN_SEEDS or not np.all(np.isfinite(d)):
        return Gain(mean, se, n, float("nan"), None, level, resolution)
    margin = _margin(se, n, resolution, level)
    supported = True if mean > margin else (False if mean < -margin else None)
    return Gain(mean, se, n, margin, supported, level, resolution)


def holm(gains: Mapping[str, Gain], level: float = LEVEL) -> dict[str, Gain]:
    """Holm's step-down correction of the paired tests ``gains`` for their number: ordered by p-value, the
    i-th (from 0) of k is judged at level / (k - i) until one is not decided; it and all later ones are
    null. The chance that any part is wrongly decided stays below ``level`` (Holm 1979)."""
    order = sorted(gains, key=lambda name: gains[name].p_value)
    out, stopped = {}, False
    for i, name in enumerate(order):
        g = gains[name].at(level / (len(order) - i))
        if stopped or g.supported is None:
            stopped = True
            g = g._replace(supported=None)
        out[name] = g
    return {name: out[name] for name in gains}


def combine(parts: Mapping[str, Gain | bool | None], level: float = LEVEL) -> bool | None:
    """The verdict of a claim made of ``parts``: paired tests (``Gain``) and exact checks (bool, or None when
    untested). True if every part is supported, False if any part is contradicted, None otherwise.

    Several parts, corrected for their number: a part counts as contradicted only when Holm's correction of
    the k paired tests (``holm``) still decides it, so k parts do not add up k chances of a spurious
    contradiction. "Supported" needs every part supported at ``level`` (an intersection-union test: the
    claim is wrongly called supported only if some false part is, with chance at most ``level``, so no
    correction is needed there). ``combine_reason`` says this in words."""
    gains = {k: v for k, v in parts.items() if isinstance(v, Gain)}
    corrected = holm(gains, level) if len(gains) > 1 else gains
    values = [v.at(level).supported if isinstance(v, Gain) else v for v in parts.values()]
    contradicted = [corrected[k].supported is False if k in gains else v is False for k, v in parts.items()]
    if any(contradicted):
        return False
    return True if values and all(v is True for v in values) else None


def combine_reason(parts: Mapping[str, Gain | bool | None], level: float = LEVEL) -> str:
    """One clause stating how ``combine`` judged ``parts`` (the correction), for a verdict's ``reason``."""
    k = sum(isinstance(v, Gain) for v in parts.values())
    if k <= 1:
        return f"{len(parts)} part{'s' if len(parts) != 1 else ''}, each at {100 * (1 - level):.3g}%"
    corrected = holm({n: v for n, v in parts.items() if isinstance(v, Gain)}, level)
    contradicted = [n for n, g in corrected.items() if g.supported is False]
    return (
        f"{k} paired tests: supported needs every part at {100 * (1 - level):.3g}% (intersection-union); "
        f"a contradiction must survive Holm's correction for {k} parts"
        + (f" (contradicted after it: {', '.join(contradicted)})" if contradicted else " (none does)")
    )


def best_sigma(
    rows: list[dict], method: str, sigmas: Sequence[float], step: int, key: str = "val_acc", **fields
) -> float:
    """The sigma of ``method`` with the highest mean validation ``key`` at ``step`` (never the test set).

    A sigma at which any seed diverged (a NaN value) ranks last: it is never chosen on its survivors.
    """

    def score(sigma):
        mean = np.mean([r[key] for r in select(rows, method=method, sigma=sigma, step=step, **fields)])
        return mean if np.isfinite(mean) else -np.inf

    return max(sigmas, key=score)


def compare_to_gd(
    rows: list[dict], method: str, sigmas: Sequence[float], seeds: Sequence[int], step: int, **fields
) -> tuple[float, Gain]:
    """``(best sigma on validation, paired test-accuracy gain of method at it over (S)GD)``."""
    best = best_sigma(rows, method, sigmas, step, **fields)
    treated = per_seed(rows, "test_acc", seeds, method=method, sigma=best, step=step, **fields)
    control = per_seed(rows, "test_acc", seeds, method="gd", step=step, **fields)
    return best, paired_gain(treated, control, resolution=resolution(rows))


def unfit(rows: list[dict], cells: Mapping[str, dict], seeds, step: int, fit_loss: float) -> str:
    """The fit check of a comparison: "" when every run named in ``cells`` (``name -> fields``, e.g.
    ``{"GD": dict(method="gd")}``) ends (at ``step``) with a mean train loss over ``seeds`` at most ``fit_loss``,
    else a clause naming the under-trained ones: a comparison of runs that have not fit their data does not
    test a claim about trained networks (the verdict is then null)."""
    losses = {name: float(np.mean(per_seed(rows, "train_loss", seeds, step=step, **f))) for name, f in cells.items()}
    bad = {name: v for name, v in losses.items() if not v <= fit_loss}
    if not bad:
        return ""
    listed = ", ".join(f"{name} {v:.3g}" for name, v in bad.items())
    return f"under-trained, cannot test the claim: final train loss above fit_loss={fit_loss:g} ({listed})"


def method_table(
    rows: list[dict],
    methods,
    sigmas,
    seeds,
    step: int,
    *,
    minibatch: bool = False,
    keys=("test_acc", "val_acc", "train_loss"),
    **fields,
) -> list[dict]:
    """One table row per (method, sigma): the mean (and the s.e. of the first key) over seeds at ``step``."""
    table = []
    for m, s in method_grid(methods, sigmas):
        entry = {**fields, "method": label(m, minibatch=minibatch), "sigma": s}
        for i, k in enumerate(keys):
            entry[k], se = mean_se(per_seed(rows, k, seeds, method=m, sigma=s, step=step, **fields))
            if i == 0:
                entry[f"{k}_se"] = se
        table.append(entry)
    return table


def final_measures(
    objective,
    params,
    seeds,
    train_batch,
    test_batch,
    *,
    lanczos_iters: int,
    trace_probes: int,
    states=None,
    rho: float | None = None,
    sharpness_steps: int = 10,
) -> dict[str, np.ndarray]:
    """At each of the ``[R]`` stacked ``params`` (seed r's probes from ``seeds[r]``), on the whole training
    set: lambda_max of the Hessian (Lanczos), its trace (Hutch++), the train loss, the test accuracy and
    loss, and with ``rho`` Keskar's epsilon-sharpness and the weight norm. ``states``: ``[R]`` stacked
    BatchNorm statistics (evaluation mode) for BatchNorm models. One vmapped, compiled program."""
    accuracy = dataclasses.replace(objective, metric="accuracy")

    def one(w, state, seed, train_data, test_data):
        if state is not None:
            train_data, test_data = (*train_data, state), (*test_data, state)
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        out = dict(
            lambda_max=curvature.top_eigenvalues(objective, w, train_data, k1, num_iters=lanczos_iters)[0],
            hessian_trace=curvature.hessian_trace(
                objective, w, train_data, k2, num_probes=trace_probes, method="hutch++"
            ),
            train_loss=objective(w, train_data),
            test_acc=accuracy(w, test_data),
            test_loss=objective(w, test_data),
        )
        if rho is not None:
            out["epsilon_sharpness"] = sharpness.epsilon_sharpness(
                objective, w, train_data, rho, key=k3, steps=sharpness_steps
            )
            out["weight_norm"] = optax.tree.norm(w)
        return out

    fn = jax.vmap(one, in_axes=(0, None if states is None else 0, 0, None, None))
    values = jax.jit(fn)(params, states, jnp.asarray(seeds), train_batch, test_batch)
    return {k: np.asarray(v) for k, v in values.items()}


def paired_scatter(ax, groups: Mapping[str, tuple[list[dict], Any]], x: str, y: str) -> None:
    """On ``ax``: one point per row of each ``label -> (rows, color)`` group, the points of the same seed joined
    by a grey line (the seeds pair the groups)."""
    by_seed = {label: {r["seed"]: r for r in group} for label, (group, _) in groups.items()}
    for seed in set.intersection(*(set(v) for v in by_seed.values())):
        ax.plot([v[seed][x] for v in by_seed.values()], [v[seed][y] for v in by_seed.values()], color="gray", lw=0.8)
    for label, (group, color) in groups.items():
        ax.scatter([r[x] for r in group], [r[y] for r in group], color=color, label=label, zorder=3)


def sigma_axis(ax, sigmas: Sequence[float]) -> None:
    """A log-scale sigma axis with a labelled tick at every sigma of the grid (and no others)."""
    ax.set_xscale("log")
    ax.set_xticks(list(sigmas), [f"{s:g}" for s in sigmas])
    ax.minorticks_off()
    ax.set_xlabel("sigma")


def plot_curves(ax, rows: list[dict], key: str, series: Mapping[str, tuple[dict, Any]], **style) -> None:
    """On ``ax``: for each ``label -> (fields, color)`` of ``series`` the mean over seeds of ``key`` vs step."""
    for name, (fields, color) in series.items():
        steps, values = curve(rows, key, **fields)
        ax.plot(steps, values, color=color, label=name, **style)
