"""Peer comparison (not a test): lsgeo's KFAC / EKFAC dense matrices against curvlinops-for-pytorch 3.0.1's
``KFACLinearOperator`` / ``EKFACLinearOperator`` on the same weights and data, for an MLP and a CNN.

    /work/peers-venv/bin/python scripts/peer_kfac_curvlinops.py          # torch side (this interpreter)
        -> runs `python scripts/peer_kfac_curvlinops.py --lsgeo IN OUT` with LSGEO_PYTHON (default
           /work/main/.venv/bin/python) for the lsgeo side, exchanging arrays through .npz files.

Both sides in float64. The torch models copy the flax weights: a ``Linear`` weight is the transpose of a flax
``Dense`` kernel; a ``Conv2d`` weight ``[O, C, kh, kw]`` is the flax kernel ``[kh, kw, C, O]`` transposed; torch
images are NCHW and the flattening before the dense head follows flax's (h, w, c) order (a permute). The
matrices are compared after permuting lsgeo's coordinates (``ravel_pytree`` order of the flax tree) into
curvlinops' (parameters in ``model.parameters()`` order, each row-major). Prints one line per setting: the
largest absolute difference and the largest entry.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N, D_IN, HIDDEN, K, SIZE, CHANNELS = 12, 4, 5, 3, 4, 2

SETTINGS = [(model, cls, fisher, approx, sep) for model in ("mlp", "cnn") for cls in ("KFAC", "EKFAC")
            for fisher in ("type-2", "empirical", "forward-only") for approx in ("expand", "reduce")
            for sep in (True, False)
            if not (cls == "EKFAC" and fisher == "forward-only") and not (model == "mlp" and approx == "reduce")
            and os.environ.get("PEER_FILTER", "") in f"{model} {cls} {fisher} {approx}"]


def weights_and_data():
    rng = np.random.default_rng(0)
    mlp = {"Dense_0": {"kernel": rng.standard_normal((D_IN, HIDDEN)) / 2, "bias": rng.standard_normal(HIDDEN)},
           "Dense_1": {"kernel": rng.standard_normal((HIDDEN, K)) / 2, "bias": rng.standard_normal(K)}}
    cnn = {"Conv_0": {"kernel": rng.standard_normal((3, 3, CHANNELS, 2)) / 3, "bias": rng.standard_normal(2)},
           "Dense_0": {"kernel": rng.standard_normal((SIZE * SIZE * 2, K)) / 4, "bias": rng.standard_normal(K)}}
    data = {"mlp_x": rng.standard_normal((N, D_IN)), "cnn_x": rng.standard_normal((N, SIZE, SIZE, CHANNELS)),
            "y": rng.integers(0, K, N)}
    return mlp, cnn, data


def flat_arrays(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(flat_arrays(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": np.asarray(v)})
    return out


# -- the lsgeo side (main venv) -------------------------------------------------------------------------------------

def lsgeo_side(path_in, path_out):
    sys.path.insert(0, ROOT)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from lsgeo import curvature, losses

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Dense(HIDDEN)(x))
            return nn.Dense(K)(h)

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Conv(2, (3, 3))(x))
            return nn.Dense(K)(h.reshape(h.shape[0], -1))

    mlp, cnn, data = weights_and_data()
    models = {"mlp": (MLP(), mlp, data["mlp_x"]), "cnn": (CNN(), cnn, data["cnn_x"])}
    y = jnp.asarray(data["y"])
    out = {}
    for model, cls, fisher, approx, sep in SETTINGS:
        module, params, x = models[model]
        predict = lambda p, x, module=module: module.apply({"params": p}, x)  # noqa: E731
        params = jax.tree_util.tree_map(jnp.asarray, params)
        op = getattr(curvature, cls)(predict, losses.softmax_cross_entropy, params, (jnp.asarray(x), y),
                                     fisher_type=fisher, kfac_approx=approx, separate_weight_and_bias=sep)
        out[f"{model}|{cls}|{fisher}|{approx}|{sep}"] = np.asarray(op.to_dense())
    np.savez(path_out, **out)


# -- the torch side (peers venv) ----------------------------------------------------------------------------------

def torch_side():
    import torch
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    torch.set_default_dtype(torch.float64)
    mlp, cnn, data = weights_and_data()
    with tempfile.TemporaryDirectory() as tmp:
        path_in, path_out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(path_in, x=0)
        python = os.environ.get("LSGEO_PYTHON", "/work/main/.venv/bin/python")
        subprocess.run([python, os.path.abspath(__file__), "--lsgeo", path_in, path_out], check=True, cwd=ROOT)
        lsgeo = dict(np.load(path_out))

    class Permute(torch.nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1)

    t_mlp = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, K))
    t_cnn = torch.nn.Sequential(torch.nn.Conv2d(CHANNELS, 2, 3, padding=1), torch.nn.Tanh(), Permute(),
                                torch.nn.Linear(SIZE * SIZE * 2, K))
    with torch.no_grad():
        t_mlp[0].weight.copy_(torch.tensor(mlp["Dense_0"]["kernel"].T))
        t_mlp[0].bias.copy_(torch.tensor(mlp["Dense_0"]["bias"]))
        t_mlp[2].weight.copy_(torch.tensor(mlp["Dense_1"]["kernel"].T))
        t_mlp[2].bias.copy_(torch.tensor(mlp["Dense_1"]["bias"]))
        t_cnn[0].weight.copy_(torch.tensor(cnn["Conv_0"]["kernel"].transpose(3, 2, 0, 1)))
        t_cnn[0].bias.copy_(torch.tensor(cnn["Conv_0"]["bias"]))
        t_cnn[3].weight.copy_(torch.tensor(cnn["Dense_0"]["kernel"].T))
        t_cnn[3].bias.copy_(torch.tensor(cnn["Dense_0"]["bias"]))
    y = torch.tensor(data["y"])
    models = {"mlp": (t_mlp, torch.tensor(data["mlp_x"])),
              "cnn": (t_cnn, torch.tensor(data["cnn_x"].transpose(0, 3, 1, 2).copy()))}
    perms = {"mlp": permutation(mlp, [("Dense_0", "kernel", "T"), ("Dense_0", "bias", None),
                                      ("Dense_1", "kernel", "T"), ("Dense_1", "bias", None)]),
             "cnn": permutation(cnn, [("Conv_0", "kernel", (3, 2, 0, 1)), ("Conv_0", "bias", None),
                                      ("Dense_0", "kernel", "T"), ("Dense_0", "bias", None)])}
    worst = 0.0
    for model, cls, fisher, approx, sep in SETTINGS:
        net, x = models[model]
        params = [p for p in net.parameters()]
        op_cls = KFACLinearOperator if cls == "KFAC" else EKFACLinearOperator
        op = op_cls(net, torch.nn.CrossEntropyLoss(), params, [(x, y)], fisher_type=fisher, kfac_approx=approx,
                    separate_weight_and_bias=sep, check_deterministic=False)
        dim = sum(p.numel() for p in params)
        theirs = (op @ torch.eye(dim)).detach().numpy()
        perm = perms[model]
        ours = lsgeo[f"{model}|{cls}|{fisher}|{approx}|{sep}"][np.ix_(perm, perm)]
        diff = float(np.max(np.abs(ours - theirs)))
        worst = max(worst, diff / max(float(np.max(np.abs(theirs))), 1e-300))
        print(f"{model:3s} {cls:5s} {fisher:12s} {approx:6s} separate={sep!s:5s}  max|lsgeo - curvlinops| = "
              f"{diff:.2e}  (max entry {np.max(np.abs(theirs)):.2e})")
    print(f"largest relative difference over all settings: {worst:.2e}")


def permutation(tree, torch_order):
    """For each curvlinops coordinate (parameters in torch order, row-major), the lsgeo coordinate
    (``ravel_pytree`` order of the flax tree: sorted keys, row-major)."""
    flat = flat_arrays(tree)
    names = sorted(flat)  # ravel_pytree order of nested dicts with sorted keys
    start = dict(zip(names, np.cumsum([0] + [flat[n].size for n in names])))
    out = []
    for module, leaf, transform in torch_order:
        name = f"{module}/{leaf}"
        index = np.arange(start[name], start[name] + flat[name].size).reshape(flat[name].shape)
        if transform == "T":
            index = index.T
        elif transform is not None:
            index = index.transpose(transform)
        out.append(index.reshape(-1))
    return np.concatenate(out)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--lsgeo":
        lsgeo_side(sys.argv[2], sys.argv[3])
    else:
        torch_side()
