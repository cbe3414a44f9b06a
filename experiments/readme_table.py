"""The README's table of experiments, generated from the runs' ``summary.json`` files so that it cannot drift.

    python -m experiments.readme_table [RESULTS] [--write README.md]

For every experiment (in the README's order) the newest run under ``RESULTS/NAME/`` (default
``results/``) whose config is the module's default config gives one row: what the experiment
reproduces and the claim of its source (fixed text, here), the run's own numbers, its negative controls'
outcomes and the minimum detectable effect of its rule next to the source's effect (``control_power``, the
same words for every experiment, from ``summary.json``'s ``controls`` and ``power``), its verdict and its
wall-clock time. An experiment without such a run gets a row that says so.
The Markdown table is printed, or with ``--write`` put between the lines ``<!-- experiments-table -->``
and ``<!-- /experiments-table -->`` of the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np

from experiments.experiment import VERDICT_WORDS
from lsgeo.data import write_atomic

BEGIN, END = "<!-- experiments-table -->", "<!-- /experiments-table -->"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(mean: float, se: float) -> str:
    return f"{100 * mean:+.1f} ± {100 * se:.1f} points"


def _window(c: dict) -> str:
    """How the accuracies of the row were taken: each run's mean over its last ``judge_last`` of the steps."""
    if "judge_last" not in c:
        return ""
    return f", test accuracy averaged over the last {100 * c['judge_last']:g}% of the steps"


def _sigma_sweep(f: dict, c: dict) -> str:
    out = f"{c['dataset']}, width {c['width']}{_window(c)}: GD {_pct(f['acc_gd_sigma=0'])}"
    for m, name in (("layer", "layer-wise"), ("noise", "full noise")):
        if f"{m}_best_sigma" in f:
            s = f[f"{m}_best_sigma"]
            gain = _pts(f[f"{m}_gain"], f[f"{m}_gain_se"])
            out += f"; {name} {_pct(f[f'acc_{m}_sigma={s:g}'])} at sigma {s:g} (validation), {gain}"
    return out


def _regularized_loss(f: dict, c: dict) -> str:
    parts = [
        f"width {w}: final R_eff {f[f'R_eff_w{w}_layer']:.3g} (layer) vs {f[f'R_eff_w{w}_noise']:.3g} (full)"
        for w in sorted(c["widths"], reverse=True)
    ]
    w, v = max(c["widths"]), min(c["widths"])
    gap = f"; gap at {w}: {f[f'R_eff_gap_full_minus_layer_w{w}']:.3g} ± {f[f'R_eff_gap_se_w{w}']:.2g}"
    if f"R_eff_gap_full_minus_layer_w{v}" in f and v != w:
        gap += f" (at {v}: {f[f'R_eff_gap_full_minus_layer_w{v}']:.2g})"
    return "; ".join(parts) + gap


def _lasso(f: dict, c: dict) -> str:
    eff = [f[f"eff_rel_dist_sigma={s:g}"] for s in c["sigmas"]]
    noise = [f[f"noise_rel_dist_sigma={s:g}"] for s in c["sigmas"]]
    gd = [f.get(f"gd_rel_dist_sigma={s:g}", float("nan")) for s in c["sigmas"]]
    return (
        f"GD on R_eff within {max(eff):.1e} (relative L2) of scikit-learn's Lasso; noisy GD "
        f"{100 * min(noise):.1f}-{100 * max(noise):.1f}% at the end ({len(c['seeds'])} runs, needs < "
        f"{100 * c['near']:g}%); control, plain GD: {100 * min(gd):.0f}-{100 * max(gd):.0f}%"
    )


def _nuclear_norm(f: dict, c: dict) -> str:
    return (
        f"layer-wise: rank {f['layer_rank_mean']:.3g} (solution {f['prox_rank']:g}), Eq. (10) "
        f"{100 * f['layer_objective_gap_max']:.2g}% above the optimum (needs < {100 * c['objective_tol']:g}%); "
        f"control, GD without noise: rank {f.get('gd_rank_mean', float('nan')):.3g}, "
        f"{100 * f.get('gd_objective_gap_max', float('nan')):.2g}%"
    )


def _deep_mlp(f: dict, c: dict) -> str:
    out = []
    for w in sorted(c["widths"], reverse=True):
        accs = ", ".join(
            f"{n} {_pct(f[f'test_acc_w{w}_{m}'])}" for m, n in (("gd", "GD"), ("noise", "full"), ("layer", "layer"))
        )
        key = "gn_trace_at_equal_loss_w{w}_{m}" if f"gn_trace_at_equal_loss_w{w}_gd" in f else "gn_trace_w{w}_{m}"
        traces = " / ".join(f"{f[key.format(w=w, m=m)]:.3g}" for m in ("gd", "noise", "layer"))
        at = f" at train loss {f[f'equal_train_loss_w{w}']:.2g}" if f"equal_train_loss_w{w}" in f else ""
        out.append(f"width {w}: {accs}; Gauss-Newton trace{at} {traces} (GD / full / layer)")
    window = _window(c)
    return (f"{window[2].upper()}{window[3:]}: " if window else "") + "; ".join(out)


def _cnn(f: dict, c: dict) -> str:
    parts = []
    for a, name in (("toy", "toy CNN"), ("wide", "wide net")):
        if f"{a}_layer_gain" in f:
            parts.append(
                f"{name}: SGD {_pct(f[f'test_acc_{a}_gd_sigma=0'])}, layer-wise at sigma "
                f"{f[f'{a}_layer_best_sigma']:g} "
                f"(validation) {_pts(f[f'{a}_layer_gain'], f[f'{a}_layer_gain_se'])}"
            )
    return f"{c['dataset']}, {len(c['seeds'])} seeds{_window(c)}: " + "; ".join(parts)


def _resnet(f: dict, c: dict) -> str:
    n = len(c["seeds"])
    out = f"smoke size ({c['dataset']}, {c['n_train']} points, {n} seed{'s' if n != 1 else ''}): SGD "
    out += f"{_pct(f['test_acc_gd_sigma=0'])}"
    for s in c["sigmas"]:
        full, layer = _pct(f[f"test_acc_noise_sigma={s:g}"]), _pct(f[f"test_acc_layer_sigma={s:g}"])
        out += f"; sigma {s:g}: full {full}, layer {layer}"
    if "layer_gain" in f:
        out += f"; layer-wise gain {_pts(f['layer_gain'], f['layer_gain_se'])}"
    return out


def _geometry_report(f: dict, c: dict) -> str:
    smooth = next(a for a in c["activations"] if a != "relu")
    order = lambda a, k: f"{f[f'order_{a}_{k}']:.2f} [{f[f'order_{a}_{k}_lo']:.2f}, {f[f'order_{a}_{k}_hi']:.2f}]"
    return (
        f"order of R_sigma - R - sigma^2/2 tr(C) over sigma {', '.join(f'{s:g}' for s in c['sigmas'])} "
        f"({len(c['seeds'])} networks, 95% interval): {smooth} with the Hessian {order(smooth, 'hessian')}, with the "
        f"Gauss-Newton trace (control) {order(smooth, 'gauss_newton')}; relu, R_sigma - R_eff "
        f"{order('relu', 'gauss_newton')}; saddle index {f['saddle_index']:.3g} (eigenvalues < -{c['saddle_rtol']:g} "
        f"max|lambda|), lambda_min {f['smallest_Hessian_eigenvalue']:.3g} vs lambda_max {f['Hessian_eigenvalue_1']:.3g}"
    )


def _reparametrization(f: dict, c: dict) -> str:
    return (
        f"max relative output change {f['max_rel_function_change']:.1e}; lambda_max varies "
        f"{f['lambda_max_span']:.2g}x, epsilon-sharpness {f['epsilon_sharpness_span']:.2g}x, adaptive sharpness "
        f"{f['adaptive_sharpness_rel_span']:.1e}"
    )


def _wide_networks(f: dict, c: dict) -> str:
    out = (f"wide: {f['wide_fraction_global_min']:.0%} of runs reach a global minimum, rank F_1 = "
           f"{f['wide_min_rank_F']:g} = N")  # fmt: skip
    if "symmetric_fraction_global_min" in f:
        out += (f"; control, the wide net with equal first-layer units (rank F_1 = {f['symmetric_min_rank_F']:g}, "
                f"{f['symmetric_free_params']:g} free parameters): {f['symmetric_fraction_global_min']:.0%}, median "
                f"loss {f['symmetric_median_loss']:.2g}")  # fmt: skip
    if "narrow_fraction_global_min" in f:
        out += (f"; narrow first layer ({f['narrow_num_params']:g} parameters, not judged): "
                f"{f['narrow_fraction_global_min']:.0%}")  # fmt: skip
    return out


def _hessian_spectrum(f: dict, c: dict) -> str:
    ratios = ", ".join(f"{f[f'lr_{lr:g}_lambda_max_over_edge_median']:.2f}" for lr in c["lrs"])
    return (
        f"lambda_max / (2/lr) = {ratios} at lr {', '.join(f'{lr:g}' for lr in c['lrs'])} ({len(c['seeds'])} "
        f"initialisations); saddle index {f['init_saddle_index']:.2g} -> {f['end_saddle_index']:.2g}"
    )


def _double_descent(f: dict, c: dict) -> str:
    consistent = {True: "equal", False: "NOT equal", None: "untested"}[f.get("variance_consistent_with_exact")]
    return (
        f"variance {consistent} to the exact finite-n expectation within noise away from 1 (control at 1.1 sigma "
        f"rejected; asymptotic formula {100 * f['max_variance_rel_err_away_from_1']:.2g}% off); GD vs pinv "
        f"{f['gd_from_zero_max_rel_dist_to_pinv']:.0e}, from a random start "
        f"{f['gd_from_random_init_min_rel_dist_gamma_gt_1']:.2g}; test error peaks at gamma "
        f"{f['test_error_peak_gamma']:g}"
    )


def _saddle_escape(f: dict, c: dict) -> str:
    def step(value):  # a run that never escapes has an infinite step, stored as null
        return "never" if value is None or not np.isfinite(value) else f"{value:g}"

    steps = ", ".join(f"{m} {step(f[f'{m}_median_escape_step'])}" for m in c["methods"]
                      if f"{m}_median_escape_step" in f)  # fmt: skip
    out = f"median escape step: {steps}"
    if "gd_escape_rate_predicted" in f:
        out += (
            f"; GD's escape rate {f['gd_escape_rate_min']:.3g}-{f['gd_escape_rate_max']:.3g} per step vs "
            f"2 log(1 + lr |lambda_min|) = {f['gd_escape_rate_predicted']:.3g}"
        )
    return out


def _mode_connectivity(f: dict, c: dict) -> str:
    n = len(c["seeds"])
    return (
        f"barrier {f['line_barrier']:.3g} (line) vs {f['curve_barrier']:.2g} (Bezier), mean of {n} pair"
        f"{'s' if n != 1 else ''}; min line {f['min_line_barrier']:.3g}, max curve {f['max_curve_barrier']:.2g}"
    )


def _landscape_2d(f: dict, c: dict) -> str:
    parts = [(k[: -len("_gain")], f[k]) for k in f if k.endswith("_gain") and not k.endswith("control_gain")]
    out = ", ".join(
        f"{name} {gain:+.2g} ± {f.get(f'{name}_gain_se', float('nan')):.2g} (control "
        f"{f.get(f'{name}_control_gain', float('nan')):+.2g}, {f.get(f'{name}_pairs', 0):g} pairs)"
        for name, gain in parts
    )
    return f"at training loss {c.get('target_loss', float('nan')):g}, log curvature sharper minus flatter: {out}"


def _swa(f: dict, c: dict) -> str:
    interval = ""
    if "acc_gain_margin" in f and f["acc_gain_margin"] is not None:
        low, high = f["acc_gain"] - f["acc_gain_margin"], f["acc_gain"] + f["acc_gain_margin"]
        bound = 100 * c["acc_bound"]
        interval = f" (interval {100 * low:+.2g} to {100 * high:+.2g}; equal or better: above -{bound:g})"
    return (
        f"at equal training loss {f.get('equal_loss', float('nan')):.2g}: log lambda_max SGD minus SWA "
        f"{f.get('log_ratio_at_equal_loss', float('nan')):+.2g} ± "
        f"{f.get('log_ratio_at_equal_loss_se', float('nan')):.2g}"
        f" (control, un-averaged iterate: {f.get('control_log_ratio', float('nan')):+.2g}); at the end lambda_max "
        f"{f['swa_lambda_max']:.3g} vs {f['sgd_lambda_max']:.3g} (SWA vs SGD, unequal losses); accuracy "
        f"{_pts(f['acc_gain'], f['acc_gain_se'])}{interval}"
    )


def _batch_size(f: dict, c: dict) -> str:
    return (
        f"large batch: lambda_max x{f['lambda_max_ratio']:.2f}, epsilon-sharpness x{f['epsilon_sharpness_ratio']:.2f} "
        f"(control, small batch from another seed: x{f.get('control_lambda_max_ratio', float('nan')):.2f}, "
        f"x{f.get('control_epsilon_sharpness_ratio', float('nan')):.2f}); "
        f"accuracy gap (small - large) {_pts(f['acc_gap'], f['acc_gap_se'])}"
    )


def _transformer_blocks(f: dict, c: dict) -> str:
    js = lambda k: f.get(f"js_{k}", float("nan"))  # noqa: E731
    return (
        f"JS^0 (own-support block densities, at initialisation): transformer {js('transformer_init'):.3g} vs MLP "
        f"{js('mlp_init'):.3g}, gain {f.get('js0_gain', float('nan')):+.3g} ± "
        f"{f.get('js0_gain_se', float('nan')):.2g} "
        f"({len(c['seeds'])} seeds); control, MLP at twice the width: {js('mlp_wide_init'):.3g}; after training "
        f"(reported): {js('transformer_trained'):.3g} vs {js('mlp_trained'):.3g}"
    )


def _influence(f: dict, c: dict) -> str:
    others = ", ".join(f"{label} {f[f'lds_{m}']:.3g}" for m, label in (("ekfac", "EKFAC"), ("kfac", "KFAC"),
                                                                       ("lowrank", "low rank")) if f"lds_{m}" in f)
    ekfac = (f", EKFAC gain {f['lds_gain_ekfac_over_identity']:+.3g} (margin {f['lds_gain_ekfac_margin']:.2g})"
             if "lds_gain_ekfac_over_identity" in f else "")
    return (
        f"LDS: CG-GGN {f['lds_cg']:.3g} vs gradient dot products {f['lds_identity']:.3g}, gain "
        f"{f['lds_gain_cg_over_identity']:+.3g} (margin {f['lds_gain_margin']:.2g}){ekfac}"
        f"{'; ' + others if others else ''}; leave-one-out correlation "
        f"{f['loo_corr_exact_hessian']:.3f} (needs > {c['loo_threshold']:g}); control, random scores: "
        f"{f['loo_corr_random']:+.2f}"
    )


def _kfac_fidelity(f: dict, c: dict) -> str:
    steps, last = c["checkpoints"], c["checkpoints"][-1]
    models = c.get("models") or [None]  # runs from before the models field: the MLP only, keys without a model

    def value(quantity: str, method: str, model: str | None, step: int, fmt: str) -> str:
        v = f.get(f"{quantity}_{method}_{model}_step={step}" if model else f"{quantity}_{method}_step={step}")
        return "n/a" if v is None else format(v, fmt)

    parts = []
    for model in models:
        errors = {m: ", ".join(value("frobenius", m, model, t, ".3g") for t in steps) for m in ("kfac", "ekfac")}
        at_last = {q: f"{value(q, 'kfac', model, last, '.4g')} / {value(q, 'ekfac', model, last, '.4g')}"
                   for q in ("inverse_error", "trace_ratio")}  # fmt: skip
        parts.append(f"{model or 'mlp'}: KFAC {errors['kfac']}, EKFAC {errors['ekfac']} (at step {last}, KFAC / "
                     f"EKFAC: damped-inverse error {at_last['inverse_error']}, trace ratio {at_last['trace_ratio']})")
    return (
        f"relative Frobenius error at steps {', '.join(map(str, steps))}: {'; '.join(parts)}; EKFAC / KFAC "
        f"{f['ekfac_over_kfac_min']:.4f}-{f['ekfac_over_kfac_max']:.4f}, not above in {f['pairs_ekfac_not_above']:.0f} "
        f"of {f['pairs']:.0f} (model, seed, step) pairs; control, the reversed test (KFAC not above EKFAC): "
        f"{f['pairs_kfac_not_above']:.0f} of {f['pairs']:.0f}"
    )


Formatter = Callable[[dict, dict], str]
ROWS: dict[str, tuple[str, str, Formatter]] = {
    "sigma_sweep": (
        "Figure 3: test accuracy vs sigma, 2-hidden-layer ReLU MLP, GD / GD+noise / GD+noise (layer)",
        "layer-wise noise beats GD on Fashion-MNIST (width 5000) over a range of sigma",
        _sigma_sweep,
    ),
    "regularized_loss": (
        "Figure 2: R and R_sigma^(eff) over GD iterations, 1-hidden-layer linear net, widths 50 / 300",
        "only layer-wise noise minimises R_eff at large width (variance explosion)",
        _regularized_loss,
    ),
    "lasso": (
        "Section 2.3: diagonal net with noise / on R_eff vs scikit-learn's weighted Lasso",
        "noise injection on a diagonal net = Lasso with weights 2 sigma^2 diag(X^T X/n); plain GD does not",
        _lasso,
    ),
    "nuclear_norm": (
        "Section 2.4: 2-layer linear net with layer-wise noise vs proximal gradient on Eq. (10)",
        "the equivalent problem is nuclear-norm regularised (low rank)",
        _nuclear_norm,
    ),
    "deep_mlp": (
        "Figure 4: 5 hidden ReLU layers, narrow / wide, test accuracy and Gauss-Newton trace",
        "layer-wise noise best, with the smallest trace (widths 1000 / 5000)",
        _deep_mlp,
    ),
    "cnn": (
        "Figure 5: toy CNN and wide fully convolutional net, SGD",
        "layer-wise noise improves SGD in both (CIFAR-10)",
        _cnn,
    ),
    "resnet": (
        "Figure 6: ResNet + BatchNorm, cosine SGD, noise off late, accuracy and Hessian trace",
        "layer-wise +0.3% over a 94.4% SGD baseline; full noise hurts for sigma > 0.1",
        _resnet,
    ),
    "geometry_report": (
        "R, R_sigma^(eff), Hessian trace and spectrum, saddle index, NTK trace of a digits MLP, each timed",
        "R_sigma = R_eff + O(sigma^3) for ReLU (Sections 2.1-2.2); exactly: the second-order term is "
        "sigma^2/2 tr(Hessian)",
        _geometry_report,
    ),
    "reparametrization": (
        "Dinh et al. 2017: T_alpha for alpha in [1e-3, 1e3]",
        "same function, sharpness changes arbitrarily",
        _reparametrization,
    ),
    "wide_networks": (
        "Nguyen & Hein 2017: wide first layer (>= N - 1), many initialisations; the same net with F_1 rank-deficient",
        "critical points with full-rank F_k are global minima",
        _wide_networks,
    ),
    "hessian_spectrum": (
        "SLQ density at init / mid / end, saddle index, lambda_max vs 2/lr under full-batch GD",
        "edge of stability (Cohen et al. 2021)",
        _hessian_spectrum,
    ),
    "double_descent": (
        "min-norm least squares across gamma = p/n = 1; GD from zero = pseudo-inverse",
        "variance sigma^2 p/(n-p-1), sigma^2 n/(p-n-1) (-> gamma/(1-gamma), 1/(gamma-1)); implicit min-norm bias",
        _double_descent,
    ),
    "saddle_escape": (
        "steps to leave a strict saddle: GD, SGD, momentum, Adam, noise (full / layer)",
        "noise and momentum escape saddles faster than GD, Adam faster than normalised GD of its step length",
        _saddle_escape,
    ),
    "mode_connectivity": (
        "straight line vs trained quadratic Bezier curve between two minima",
        "minima are connected by low-loss curves (Garipov et al. 2018)",
        _mode_connectivity,
    ),
    "landscape_2d": (
        "filter-normalised 1-D slices and 2-D surfaces at equal training loss: batch size, noise, skip connections "
        "(controls: GD from another seed, the skip pair at depth 2)",
        "small batch, noise and skips give flatter regions at equal loss (Li et al. 2018)",
        _landscape_2d,
    ),
    "swa": (
        "SGD vs SWA: lambda_max at equal training loss (control: the un-averaged iterate), test accuracy",
        "SWA finds flatter solutions, equal or better accuracy (Izmailov et al. 2018)",
        _swa,
    ),
    "batch_size": (
        "small vs large batch at the same train loss: lambda_max, epsilon-sharpness, accuracy (control: the small "
        "batch from another seed)",
        "large batch: sharper minima that generalise worse (Keskar et al. 2017)",
        _batch_size,
    ),
    "transformer_blocks": (
        "per-block Hessian spectra (SLQ, 100 x 10) of a one-block transformer vs a 3-hidden-layer MLP, "
        "modular addition",
        "JS^0 at initialisation: a transformer's blocks are heterogeneous, an MLP's are not "
        "(Zhang et al. 2024, Sec. 3)",
        _transformer_blocks,
    ),
    "influence": (
        "LDS of influence (CG on the Gauss-Newton matrix, low-rank, KFAC, EKFAC) vs gradient dot products, digits "
        "MLP; leave-one-out on L2 logistic regression",
        "curvature-aware influence beats gradient dot products (Grosse et al. 2023); exact-Hessian influence "
        "predicts leave-one-out (Koh & Liang 2017)",
        _influence,
    ),
    "kfac_fidelity": (
        "KFAC and EKFAC (type-2) vs the exact Gauss-Newton matrix along GD on a digits MLP, a digits CNN and the "
        "one-block transformer of `transformer_blocks` (per module; randomized estimates above `--dense-limit`): "
        "Frobenius error, trace, damped inverse, top-k eigenspaces",
        "EKFAC is the Frobenius-best diagonal in the Kronecker eigenbasis: never farther than KFAC "
        "(George et al. 2018)",
        _kfac_fidelity,
    ),
}


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def default_config(name: str) -> dict:
    """The default config of experiment ``name`` as its ``summary.json`` stores it."""
    module = importlib.import_module(f"experiments.{name}")
    return json.loads(json.dumps({k: _plain(v) for k, v in dataclasses.asdict(module.Config()).items()}))


# Config fields added to an experiment after runs were made, each with the value that reproduces the code before it
# (read off the commit that added it): a run whose stored config lacks the field ran as if it had that value. Only
# fields whose default leaves the computation unchanged belong here (not, e.g., sigma_sweep's judge_last, which
# changed the verdict).
ADDED_FIELDS: dict[str, dict] = {
    "transformer_blocks": {"layers": 1},  # 6893b28: TinyTransformer was one block, with the same module names
}


def latest_default_run(results: Path, name: str) -> dict | None:
    """The summary of the newest run of ``name`` under ``results`` with the default config, or None. A stored config
    that lacks a field of ``ADDED_FIELDS`` is read with that field's value from before it was added."""
    default = default_config(name)
    summaries = sorted((results / name).glob("*/summary.json"), key=lambda p: p.parent.name, reverse=True)
    for path in summaries:
        summary = json.loads(path.read_text())
        if {**ADDED_FIELDS.get(name, {}), **summary["config"]} == default:
            return summary
    return None


def cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell: a ``|`` (as in ``max|lambda|``) would end the cell, so it is
    escaped (``\\|``, shown as ``|``); a line break would end the row, so it becomes a space."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _control_ran(record: dict) -> bool:
    """Whether a part's control was run: it has an outcome, a statistic or a verdict on whether it discriminates."""
    return record.get("control_passed") is not None or "control_mean" in record or record.get("discriminates") is not None


def _controls(controls: dict) -> str:
    """The controls of ``summary.json`` in words: how many fail as they must, and which do not, naming each."""
    if not controls:
        return "no control recorded"
    ran = [p for p, r in controls.items() if _control_ran(r)]
    loose = [p for p in ran if controls[p].get("control_passed") is True]
    described = "; ".join(sorted({controls[p]["control"] for p in ran if p not in loose}))
    out = [f"controls: {len(ran) - len(loose)} of {len(ran)} fail as they must" + (f" ({described})" * bool(described))]
    out = out if ran else []
    out += [f"{p} ({controls[p]['control']}): passes too, does not discriminate" for p in loose]
    unrun = [p for p in controls if p not in ran]
    if unrun:
        out.append("no control for " + ", ".join(f"{p} ({controls[p]['control']})" for p in unrun))
    return "; ".join(out)


def _power(power: dict) -> str:
    """The minimum detectable effects of ``summary.json``'s ``power`` next to the source's effects, per part."""
    if not power:
        return "no minimum detectable effect recorded"
    def part(name, p):
        unit, mde = p.get("unit", ""), p.get("mde")  # a non-finite MDE (too few seeds) is stored as null
        kind = p.get("kind", "statistical")  # discrimination.Power.kind
        if mde is None:
            text = f"{name}: MDE infinite (too few seeds)"
        elif kind == "tolerance":
            text = f"{name}: tolerance {mde:.3g}{unit} (deterministic)"
        elif kind == "shown":
            text = f"{name}: MDE <= {mde:.3g}{unit} (its control's effect, rejected)"
        else:
            text = f"{name}: MDE {mde:.3g}{unit}"
        if p.get("source_effect") is None:
            return text + " (the source gives no number in these units)"
        word = "can" if p.get("detectable") else "cannot"
        return text + f" vs the source's {p['source_effect']:.3g}{unit}: {word} detect it"

    statistical = all(p.get("kind", "statistical") == "statistical" for p in power.values())
    head = "power (80%)" if statistical else "power (80% where statistical)"
    return f"{head}: " + "; ".join(part(name, p) for name, p in power.items())


def control_power(summary: dict) -> str:
    """The row's control and power cell, the same words for every experiment, from ``summary.json``'s ``controls``
    (``discrimination.Part.record``) and ``power`` (``discrimination.Power.record``)."""
    if "controls" not in summary and "power" not in summary:
        return "not recorded (a run from before controls and power were stored)"
    return f"{_controls(summary.get('controls') or {})}; {_power(summary.get('power') or {})}"


def _row(name: str, summary: dict | None) -> str:
    what, source, formatter = ROWS[name]
    if summary is None:
        cells = [f"`{name}`", what, source, "no default run found", "", "", ""]
    else:
        cells = [f"`{name}`", what, source, formatter(summary["figures"], summary["config"]), control_power(summary),
                 VERDICT_WORDS[summary["supported"]], f"{summary['runtime_s']:.0f} s"]  # fmt: skip
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def machine() -> str:
    """This machine in words: processor, CPU count and the load average (1 / 15 min) now."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpus = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"
    return f"{cpus}, load average {load[0]:.1f} / {load[2]:.1f}"


def table(results: Path, machine_note: str | None = None) -> str:
    """The Markdown table of every experiment's newest default run under ``results``; ``machine_note``: the
    machine and its load during the runs, for the header (default: ``machine()`` now)."""
    summaries = {name: latest_default_run(results, name) for name in ROWS}
    devices = sorted({d for s in summaries.values() if s is not None for d in s["devices"]})
    total = sum(s["runtime_s"] for s in summaries.values() if s is not None)
    lines = [
        f"Generated by `python -m experiments.readme_table` from the default runs' `summary.json` "
        f"(devices: {', '.join(devices) or 'none'}; machine: {machine_note or machine()}; wall-clock time, "
        f"{total / 60:.0f} min in all).",
        "",
        "| experiment | what it reproduces | paper / source | this run (default config) | negative controls; minimum "
        "detectable effect vs the source's | verdict | time |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [_row(name, s) for name, s in summaries.items()])


def replace_table(text: str, new_table: str) -> str:
    """``text`` with the part between the ``BEGIN`` and ``END`` marker lines replaced by ``new_table``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the README must contain the marker lines {BEGIN} and {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{new_table}\n{END}{tail}"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m experiments.readme_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path, default=Path("results"), help="the results folder")
    parser.add_argument("--write", type=Path, default=None, help="the README whose table to replace")
    parser.add_argument("--machine", default=None, help="the machine and its load during the runs (default: now)")
    args = parser.parse_args(argv)
    new_table = table(args.results, args.machine)
    if args.write is None:
        print(new_table)
    else:
        write_atomic(args.write, replace_table(args.write.read_text(), new_table))
    return new_table


if __name__ == "__main__":
    main()
