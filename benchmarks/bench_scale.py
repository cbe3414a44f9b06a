"""Curvature of ResNet-18 over a data set, by microbatches: lsgeo against PyHessian (when installed).

    python benchmarks/bench_scale.py                  # CPU preset: 7 minutes on 2 cores, 12 with PyHessian
    python benchmarks/bench_scale.py --preset gpu     # ResNet-18 width 64, 1024 and 50,000 images

The model is ``lsgeo.models.ResNet18`` (BatchNorm in evaluation mode, ``models.make_predict(model,
model_state)``), softmax cross-entropy, CIFAR-shaped random images (32x32x3, 10 classes), float32. For
each image count n (``--images``) with its ``--microbatch`` size, measured in this one run:

1. one data-set gradient (``lsgeo.dataplan.reduce`` of per-microbatch gradients) and one data-set HVP
   (``curvature.hvp(..., microbatch_size=...)``): compile time, then ``--repeats`` rounds of one run of
   each (alternating, so that a change in load hits both); medians and the median per-round ratio.
2. on ``--spectrum-images`` (default: the same n) the top-1 and the top-5 eigenvalues and the smallest
   one to a relative residual of ``--tol`` (``top_eigenvalues(..., tol=1e-3)``: each eigenvalue within
   1e-3 of one of H) and a Hutchinson trace with ``--probes`` probes: "first call" = trace + compile +
   run, "warm" = a run of the compiled program. With fewer than 100 probes the 100-probe time is
   projected as compile + run * 100 / probes (the probes run one after another, so the cost is linear).
3. memory: XLA's estimate for each compiled program (``memory_analysis()``: arguments + outputs +
   temporaries); on a GPU also the device's peak bytes in use over the whole run.
4. PyHessian (``torch`` and ``pyhessian`` importable, else skipped): the same network in PyTorch with
   lsgeo's weights and BatchNorm statistics copied in (eval mode), on the same images in its dataloader
   mode (batches of the microbatch size): ``eigenvalues(top_n=1 and 5, tol)`` and
   ``trace(maxIter=probes, tol=0)``, each timed once (PyTorch has no compilation), peak memory
   (``torch.cuda.max_memory_allocated`` or the RSS), and the relative difference of each of its top-5
   (the largest in magnitude) to the nearest of lsgeo's eigenvalues: the same Hessian, so they agree.

XLA:CPU note: lsgeo puts convolutions in XLA:CPU's canonical layout inside its loops
(``lsgeo.cpu_convolutions``); without it the kernel gradients of a conv net inside a scan ran 10-45x
slower on CPU. Timings on a machine shared with other jobs are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsgeo import Objective, curvature, dataplan, losses, models

PRESETS = {
    "cpu": {
        "width": 16,
        "images": [4096],
        "microbatch": [512],
        "spectrum_images": 512,
        "spectrum_microbatch": 128,
        "probes": 10,
    },
    "gpu": {
        "width": 64,
        "images": [1024, 50000],
        "microbatch": [256, 400],
        "spectrum_images": None,
        "spectrum_microbatch": None,
        "probes": 100,
    },
}


def gib(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def program_bytes(compiled):
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes


def compiled_run(fn, *args):
    """(output, seconds to trace and compile, seconds of the first run of the compiled program, XLA bytes)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, t_compile, time.perf_counter() - t0, program_bytes(compiled)


def problem(width, n, seed=0):
    model = models.ResNet18(width=width)
    params, state = models.init_model(model, jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    predict = models.make_predict(model, state)

    def objective(p, batch):
        x, y = batch
        return losses.softmax_cross_entropy(predict(p, x), y)

    kx, ky = jax.random.split(jax.random.key(seed + 1))
    batch = (jax.random.normal(kx, (n, 32, 32, 3), jnp.float32), jax.random.randint(ky, (n,), 0, 10))
    return objective, params, state, batch


def bench_products(objective, params, batch, size, repeats):
    """Data-set gradient and HVP: both compiled, then ``repeats`` rounds that time one of each in turn
    (so that a change in the machine's load hits both), medians and the median of the per-round ratios."""
    plan = dataplan.plan(batch, size)

    def gradient(p, b):
        return dataplan.reduce(lambda q, mb: jax.grad(objective)(q, mb), p, b, plan)

    def hvp(p, b, v):
        return curvature.hvp(objective, p, b, v, microbatch_size=size)

    v = optax.tree.random_like(jax.random.key(2), params, jax.random.normal)
    programs = {}
    for name, fn, args in [("gradient", gradient, (params, batch)), ("HVP", hvp, (params, batch, v))]:
        t0 = time.perf_counter()
        programs[name] = (jax.jit(fn).lower(*args).compile(), args, time.perf_counter() - t0)
    times = {name: [] for name in programs}
    for _ in range(max(1, repeats)):
        for name, (compiled, args, _) in programs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - t0)
    for name, (compiled, _, t_compile) in programs.items():
        print(
            f"  data-set {name:15s} compile {t_compile:7.1f} s   run {statistics.median(times[name]):8.2f} s "
            f"(median of {len(times[name])})   XLA memory {gib(program_bytes(compiled))}"
        )
    ratio = statistics.median(h / g for h, g in zip(times["HVP"], times["gradient"]))
    print(f"  HVP / gradient = {ratio:.2f} (median over rounds)")
    return ratio


def bench_spectrum(objective, params, batch, size, tol, probes):
    key = jax.random.key(3)
    rows = {}
    for name, fn in [
        ("top-1", lambda p, b, k: curvature.top_eigenvalues(objective, p, b, k, k=1, tol=tol, microbatch_size=size)),
        ("top-5", lambda p, b, k: curvature.top_eigenvalues(objective, p, b, k, k=5, tol=tol, microbatch_size=size)),
        ("smallest", lambda p, b, k: curvature.min_eigenvalue(Objective(objective, b, microbatch_size=size), p,
                                                              None, k, tol=tol)[0]),
        (
            f"trace, {probes} probes",
            lambda p, b, k: curvature.hessian_trace(objective, p, b, k, num_probes=probes, microbatch_size=size),
        ),
    ]:
        out, c, t, m = compiled_run(fn, params, batch, key)
        rows[name] = (c, t, np.atleast_1d(np.asarray(out)))
        values = np.array2string(np.atleast_1d(np.asarray(out)), precision=4)
        print(f"  {name:23s}  first call {c + t:7.1f} s   warm {t:7.1f} s   XLA memory {gib(m)}   {values}")
    if probes != 100:
        c, t, _ = rows[f"trace, {probes} probes"]
        print(
            f"  {'trace, 100 probes':23s}  first call {c + t * 100 / probes:7.1f} s   warm {t * 100 / probes:7.1f} s"
            f"   (projected from {probes} probes)"
        )
    return rows


def torch_resnet18(params, model_state):
    """``lsgeo.models.ResNet18`` in PyTorch with the same weights and BatchNorm statistics (eval mode).

    Flax conv kernels are HWIO and PyTorch's OIHW; a flax Dense kernel is the transposed nn.Linear weight.
    """
    import torch
    import torch.nn as tnn

    def conv(kernel, stride):
        kernel = np.asarray(kernel)
        layer = tnn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0], stride, kernel.shape[0] // 2, bias=False)
        layer.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        return layer

    def norm(p, s):
        layer = tnn.BatchNorm2d(p["scale"].shape[0], eps=1e-5)
        for name, value in [
            ("weight", p["scale"]),
            ("bias", p["bias"]),
            ("running_mean", s["mean"]),
            ("running_var", s["var"]),
        ]:
            getattr(layer, name).data = torch.from_numpy(np.array(value))
        return layer

    class Block(tnn.Module):
        def __init__(self, p, s, stride):
            super().__init__()
            self.conv1, self.bn1 = conv(p["conv1"]["kernel"], stride), norm(p["bn1"], s["bn1"])
            self.conv2, self.bn2 = conv(p["conv2"]["kernel"], 1), norm(p["bn2"], s["bn2"])
            self.shortcut = tnn.Sequential()
            if "shortcut_conv" in p:
                self.shortcut = tnn.Sequential(
                    conv(p["shortcut_conv"]["kernel"], stride), norm(p["shortcut_bn"], s["shortcut_bn"])
                )

        def forward(self, x):
            y = self.bn2(self.conv2(tnn.functional.relu(self.bn1(self.conv1(x)))))
            return tnn.functional.relu(y + self.shortcut(x))

    stats = model_state["batch_stats"]
    layers = [conv(params["stem_conv"]["kernel"], 1), norm(params["stem_bn"], stats["stem_bn"]), tnn.ReLU()]
    blocks = sorted(name for name in params if name.startswith("stage"))
    for name in blocks:
        stride = 2 if name.endswith("block1") and not name.startswith("stage1") else 1
        layers.append(Block(params[name], stats[name], stride))
    head = tnn.Linear(*params["head"]["kernel"].shape)
    head.weight.data = torch.from_numpy(np.array(params["head"]["kernel"]).T.copy())
    head.bias.data = torch.from_numpy(np.array(params["head"]["bias"]))
    layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), head]
    return tnn.Sequential(*layers)


def bench_pyhessian(params, model_state, batch, size, tol, probes, lsgeo_top5, lsgeo_smallest):
    try:
        import torch
        from pyhessian import hessian
    except ImportError as e:
        print(f"  PyHessian: skipped ({e})")
        return None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = torch_resnet18(params, model_state).to(device).eval()
    x = torch.from_numpy(np.array(batch[0])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.array(batch[1])).long()
    loader = [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]
    computer = hessian(model, torch.nn.CrossEntropyLoss(), dataloader=loader, cuda=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows = {}
    for name, call in [
        ("top-1", lambda: computer.eigenvalues(top_n=1, tol=tol)[0]),
        ("top-5", lambda: computer.eigenvalues(top_n=5, tol=tol)[0]),
        (f"trace, {probes} probes", lambda: [float(np.mean(computer.trace(maxIter=probes, tol=0.0)))]),
    ]:
        t0 = time.perf_counter()
        out = call()
        if cuda:
            torch.cuda.synchronize()
        rows[name] = (time.perf_counter() - t0, np.asarray(out))
        print(f"  PyHessian {name:13s}  {rows[name][0]:7.1f} s   {np.array2string(rows[name][1], precision=4)}")
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"  PyHessian peak memory {gib(peak)} ({'device' if cuda else 'process RSS, lsgeo included'})")
    # PyHessian's top_n are the largest in magnitude (power iteration with deflation): match each to the
    # nearest of lsgeo's top-5 and smallest eigenvalue.
    ours = np.concatenate([lsgeo_top5, lsgeo_smallest])
    nearest = ours[np.argmin(np.abs(rows["top-5"][1][:, None] - ours[None, :]), axis=1)]
    differences = np.abs(rows["top-5"][1] - nearest) / np.abs(nearest)
    shown = " ".join(f"{d:.1e}" for d in differences)
    print(
        f"  PyHessian top-5 vs the nearest lsgeo eigenvalue: relative differences {shown} "
        f"(PyHessian stops at a relative change of {tol}, lsgeo at a relative residual of {tol})"
    )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--width", type=int)
    ap.add_argument("--images", type=int, nargs="+", help="data-set sizes n")
    ap.add_argument("--microbatch", type=int, nargs="+", help="microbatch size per n (one value: for all)")
    ap.add_argument("--spectrum-images", type=int, help="n for the eigenvalues and the trace (default: each n)")
    ap.add_argument("--spectrum-microbatch", type=int, help="microbatch size there (default: --microbatch)")
    ap.add_argument("--probes", type=int, help="Hutchinson probes of the timed trace")
    ap.add_argument("--tol", type=float, default=1e-3, help="relative residual of the top-k Ritz pairs")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of one gradient and one HVP (medians)")
    ap.add_argument("--no-pyhessian", action="store_true")
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    for name in ("width", "images", "microbatch", "spectrum_images", "spectrum_microbatch", "probes"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    sizes = cfg["microbatch"] * len(cfg["images"]) if len(cfg["microbatch"]) == 1 else cfg["microbatch"]
    t_start = time.perf_counter()
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {device.device_kind} ({jax.default_backend()}, {len(jax.devices())} device(s), "
        f"{os.cpu_count()} CPU cores); ResNet-18 width {cfg['width']}, float32, tol {args.tol}"
    )
    for n, size in zip(cfg["images"], sizes):
        objective, params, model_state, batch = problem(cfg["width"], n)
        print(f"\nn = {n} images, microbatch_size {size}, m = {optax.tree.size(params)} parameters")
        bench_products(objective, params, batch, size, args.repeats)
        spec_n = min(cfg["spectrum_images"] or n, n)
        spec_size = cfg["spectrum_microbatch"] or size
        if spec_n != n:
            batch = jax.tree_util.tree_map(lambda a, k=spec_n: a[:k], batch)
            print(f" eigenvalues and trace on the first {spec_n} images, microbatch_size {spec_size}:")
        spectrum = bench_spectrum(objective, params, batch, spec_size, args.tol, cfg["probes"])
        if not args.no_pyhessian:
            bench_pyhessian(
                params,
                model_state,
                batch,
                spec_size,
                args.tol,
                cfg["probes"],
                spectrum["top-5"][2],
                spectrum["smallest"][2],
            )
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        print(f"\ndevice peak bytes in use over the run: {gib(stats['peak_bytes_in_use'])}")
    print(
        f"process peak RSS {gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}; "
        f"total {time.perf_counter() - t_start:.0f} s"
    )


if __name__ == "__main__":
    main()
