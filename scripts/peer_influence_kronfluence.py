"""Peer comparison: lsgeo.influence against Kronfluence 1.0.1 (PyTorch) on the same MLP weights and data.

    /work/main/.venv/bin/python scripts/peer_influence_kronfluence.py       # lsgeo side; runs the torch side itself

The lsgeo side trains a 20-32-5 tanh MLP briefly (softmax cross-entropy, float64), computes lsgeo's pairwise
scores (``identity``; ``cg`` on the Gauss-Newton matrix; ``ekfac`` when ``lsgeo.curvature.EKFAC`` exists) and
writes weights, data and scores to an ``.npz``; the torch side (``--torch IN OUT``, run with the peer venv's
python, ``PEER_PYTHON``, default /work/peers-venv/bin/python) copies the weights into ``nn.Linear`` layers
(kernel transposed), runs Kronfluence's ``identity`` and ``ekfac`` strategies (float64 everywhere; train loss
summed over the batch, measurement = the query's cross-entropy; the true Fisher with sampled labels, its
default, and the empirical Fisher) and writes its scores back. Printed: the largest relative difference of the
identity scores, and the Spearman correlation (all pairs, and per query averaged) of Kronfluence EKFAC with
lsgeo's scores; and the low-rank query gradients of both (rank ``QUERY_RANK``, Kronfluence's exact SVD).

Conventions compared: both score ``g_q^T (A + d I)^-1 g_i`` with per-example loss gradients and no minus sign
(positive = helpful); Kronfluence's scores are ``[n_query, n_train]``, lsgeo's ``[n_train, n_query]``; both
leave out the ``1/n``. Damping: Kronfluence's ``damping_factor`` default is 1e-8 (``None``: 0.1 x the mean
eigenvalue); lsgeo's ``damping=None`` is 0.1 x the mean eigenvalue. Compared at one explicit damping (1e-3) and
with each library's heuristic (``damping=None``: 0.1 x the mean eigenvalue of its own curvature: Kronfluence's
EKFAC eigenvalues, lsgeo's ``tr(GGN) / m``, here exact with 3000 Hutch++ products).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

SIZES = (20, 32, 5)
N_TRAIN, N_QUERY, DAMPING = 256, 16, 1e-3
QUERY_RANK = 2  # low-rank query gradients (Kronfluence's query_gradient_low_rank, lsgeo's query_rank)


def lsgeo_side(path: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    from lsgeo import curvature, influence, losses, train

    k = jax.random.split(jax.random.key(0), 6)
    centers = 2.0 * jax.random.normal(k[0], (SIZES[2], SIZES[0]))
    y = jax.random.randint(k[1], (N_TRAIN + N_QUERY,), 0, SIZES[2])
    x = centers[y] + jax.random.normal(k[2], (N_TRAIN + N_QUERY, SIZES[0])) * 1.5
    params = {f"Dense_{i}": {"kernel": jax.random.normal(k[3 + i], SIZES[i:i + 2]) / np.sqrt(SIZES[i]),
                             "bias": jnp.zeros(SIZES[i + 1])} for i in range(2)}

    def predict(p, x):
        hidden = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return hidden @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    loss = losses.softmax_cross_entropy
    tr, q = (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])
    params = train.train(lambda p, b: loss(predict(p, b[0]), b[1]), optax.sgd(0.3), params, tr, num_steps=100).params
    out = {"x": np.asarray(x), "y": np.asarray(y)}
    out.update({f"{layer}_{name}": np.asarray(a) for layer, d in params.items() for name, a in d.items()})
    out["lsgeo_identity"] = influence.pairwise_scores(predict, loss, params, tr, q, inverse="identity")
    out["lsgeo_cg"] = influence.pairwise_scores(predict, loss, params, tr, q, inverse="cg", damping=DAMPING, tol=1e-10)
    out["lsgeo_cg_heuristic"] = influence.pairwise_scores(predict, loss, params, tr, q, inverse="cg", tol=1e-10,
                                                          num_probes=3 * 1000)
    out["lsgeo_ekfac"] = influence.pairwise_scores(predict, loss, params, tr, q, inverse="ekfac", damping=DAMPING)
    # Kronfluence's conventions: the bias a ones column of the layer input (joint), the empirical Fisher
    emp = curvature.EKFAC(predict, loss, params, tr, fisher_type="empirical", separate_weight_and_bias=False)
    out["lsgeo_ekfac_empirical_joint"] = influence.pairwise_scores(predict, loss, params, tr, q, inverse=emp,
                                                                   damping=DAMPING)
    out["lsgeo_ekfac_empirical_joint_rank"] = influence.pairwise_scores(predict, loss, params, tr, q, inverse=emp,
                                                                        damping=DAMPING, query_rank=QUERY_RANK)
    return out


def torch_side(src: str, dst: str) -> None:
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch import nn

    torch.manual_seed(0)
    data = np.load(src)
    model = nn.Sequential(nn.Linear(*SIZES[:2]), nn.Tanh(), nn.Linear(*SIZES[1:])).double()
    with torch.no_grad():
        for i, layer in ((0, model[0]), (1, model[2])):
            layer.weight.copy_(torch.from_numpy(data[f"Dense_{i}_kernel"].T.copy()))
            layer.bias.copy_(torch.from_numpy(data[f"Dense_{i}_bias"]))
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).long()
    train_set = torch.utils.data.TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    query_set = torch.utils.data.TensorDataset(x[N_TRAIN:], y[N_TRAIN:])

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, dim=-1), 1).flatten()
            return nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return nn.functional.cross_entropy(model(inputs), labels, reduction="sum")

    task = Classification()
    model = prepare_model(model, task)
    f64 = dict(activation_covariance_dtype=torch.float64, gradient_covariance_dtype=torch.float64,
               lambda_dtype=torch.float64)
    s64 = dict(per_sample_gradient_dtype=torch.float64, score_dtype=torch.float64, precondition_dtype=torch.float64)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("peer", model=model, task=task, cpu=True, output_dir=tmp, disable_tqdm=True)
        for name, strategy, empirical, damping in (("identity", "identity", False, DAMPING),
                                                   ("ekfac", "ekfac", False, DAMPING),
                                                   ("ekfac_empirical", "ekfac", True, DAMPING),
                                                   ("ekfac_heuristic", "ekfac", False, None)):
            analyzer.fit_all_factors(name, dataset=train_set, per_device_batch_size=64, overwrite_output_dir=True,
                                     factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=empirical,
                                                                 **f64))
            analyzer.compute_pairwise_scores(name, factors_name=name, query_dataset=query_set, train_dataset=train_set,
                                             per_device_query_batch_size=N_QUERY, per_device_train_batch_size=64,
                                             score_args=ScoreArguments(damping_factor=damping, **s64),
                                             overwrite_output_dir=True)
            out[f"kronfluence_{name}"] = analyzer.load_pairwise_scores(name)["all_modules"].numpy().T  # [n, Q]
        # low-rank query gradients on the empirical-Fisher factors: the exact truncated SVD (use_full_svd)
        low = ScoreArguments(damping_factor=DAMPING, query_gradient_low_rank=QUERY_RANK, use_full_svd=True,
                             query_gradient_svd_dtype=torch.float64, **s64)
        analyzer.compute_pairwise_scores("ekfac_empirical_rank", factors_name="ekfac_empirical",
                                         query_dataset=query_set, train_dataset=train_set,
                                         per_device_query_batch_size=N_QUERY, per_device_train_batch_size=64,
                                         score_args=low, overwrite_output_dir=True)
        out["kronfluence_ekfac_empirical_rank"] = analyzer.load_pairwise_scores(
            "ekfac_empirical_rank")["all_modules"].numpy().T
    np.savez(dst, **out)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)


def per_query(a, b) -> float:
    return float(np.mean([spearman(a[:, q], b[:, q]) for q in range(a.shape[1])]))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "lsgeo.npz"), os.path.join(tmp, "kronfluence.npz")
        ours = lsgeo_side(src)
        np.savez(src, **ours)
        peer = os.environ.get("PEER_PYTHON", "/work/peers-venv/bin/python")
        subprocess.run([peer, os.path.abspath(__file__), "--torch", src, dst], check=True)
        theirs = dict(np.load(dst))
    diff = np.abs(ours["lsgeo_identity"] - theirs["kronfluence_identity"])
    rel = np.max(diff) / np.max(np.abs(ours["lsgeo_identity"]))
    print(f"MLP {SIZES}, {N_TRAIN} train x {N_QUERY} queries, damping {DAMPING:g}, float64")
    print(f"identity: max |lsgeo - kronfluence| / max |score| = {rel:.2e}; "
          f"Spearman {spearman(ours['lsgeo_identity'], theirs['kronfluence_identity']):.6f}")
    print(f"lsgeo_cg vs lsgeo_identity: Spearman all pairs {spearman(ours['lsgeo_cg'], ours['lsgeo_identity']):.4f}")
    a, b = theirs["kronfluence_ekfac_empirical"], ours["lsgeo_ekfac_empirical_joint"]
    print(f"EKFAC, empirical Fisher, joint bias, damping {DAMPING:g}: max |lsgeo - kronfluence| / max |score| = "
          f"{np.max(np.abs(a - b)) / np.max(np.abs(b)):.2e}; Spearman {spearman(a, b):.6f}")
    a, b = theirs["kronfluence_ekfac_empirical_rank"], ours["lsgeo_ekfac_empirical_joint_rank"]
    exact_k, exact_l = theirs["kronfluence_ekfac_empirical"], ours["lsgeo_ekfac_empirical_joint"]
    print(f"EKFAC, empirical Fisher, query rank {QUERY_RANK}: lsgeo vs kronfluence Spearman {spearman(a, b):.6f}, "
          f"per query {per_query(a, b):.6f}, max |difference| / max |score| {np.max(np.abs(a - b)) / np.max(np.abs(b)):.2e} "
          f"(kronfluence truncates the [out, in + 1] matrix of weight and bias, lsgeo the [in, out] kernel and keeps "
          f"the bias whole); each vs its own exact scores: kronfluence {spearman(a, exact_k):.6f}, "
          f"lsgeo {spearman(b, exact_l):.6f}")
    for k_name in ("kronfluence_ekfac", "kronfluence_ekfac_empirical", "kronfluence_ekfac_heuristic"):
        for o_name in [n for n in ("lsgeo_ekfac", "lsgeo_ekfac_empirical_joint", "lsgeo_cg", "lsgeo_cg_heuristic", "lsgeo_identity") if n in ours]:
            a, b = theirs[k_name], ours[o_name]
            print(f"{k_name} vs {o_name}: Spearman all pairs {spearman(a, b):.4f}, per query {per_query(a, b):.4f}")


if __name__ == "__main__":
    if "--torch" in sys.argv:
        i = sys.argv.index("--torch")
        torch_side(sys.argv[i + 1], sys.argv[i + 2])
    else:
        main()
