"""Run by tests/test_dataplan.py in a subprocess: the Hessian trace of a 3-layer conv net over 8192
CIFAR-shaped images (32x32x3) by microbatches of 256. The first call compiles; the second is measured:
the process's RSS just before it (/proc/self/statm) and its peak RSS during it (VmHWM after resetting it
through /proc/self/clear_refs; ru_maxrss where that is not possible). Prints one JSON line with both and
XLA's estimate (memory_analysis of the compiled program, not run) of what the same trace needs on the
whole batch at once."""

import functools
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lsgeo import curvature, losses


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    """Resets the kernel's high-water mark of this process's RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def predict(params, x):
    h = jax.nn.relu(conv(x, params["c1"], 1))  # [n, 32, 32, C]
    h = jax.nn.relu(conv(h, params["c2"], 2))  # [n, 16, 16, C]
    h = jax.nn.relu(conv(h, params["c3"], 2))  # [n, 8, 8, C]
    return jnp.mean(h, axis=(1, 2)) @ params["head"]


def objective(params, batch):
    x, y = batch
    return losses.softmax_cross_entropy(predict(params, x), y)


def main(n=8192, microbatch_size=256, channels=8):
    rng = np.random.default_rng(0)
    params = {
        "c1": jnp.asarray(rng.standard_normal((3, 3, 3, channels)) / 5, jnp.float32),
        "c2": jnp.asarray(rng.standard_normal((3, 3, channels, channels)) / 9, jnp.float32),
        "c3": jnp.asarray(rng.standard_normal((3, 3, channels, channels)) / 9, jnp.float32),
        "head": jnp.asarray(rng.standard_normal((channels, 10)) / 3, jnp.float32),
    }
    images = rng.standard_normal((n, 32, 32, 3), dtype=np.float32)
    batch = (jnp.asarray(images), jnp.asarray(rng.integers(0, 10, n)))
    del images
    jax.block_until_ready(batch)
    key = jax.random.key(0)
    run = functools.partial(curvature.hessian_trace, objective, params, batch, key, num_probes=1,
                            microbatch_size=microbatch_size)
    start = time.perf_counter()
    trace = float(run())  # the first call traces and compiles (LLVM's memory is not the computation's)
    seconds = time.perf_counter() - start
    resettable = reset_peak_rss()
    before = current_rss_bytes()
    float(run())
    after = peak_rss_since_reset() if resettable else peak_rss_bytes()
    whole = jax.jit(lambda p, b, k: curvature.hessian_trace(objective, p, b, k, num_probes=1))
    analysis = whole.lower(params, batch, key).compile().memory_analysis()
    whole_batch = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
    mb = jax.jit(lambda p, b, k: curvature.hessian_trace(objective, p, b, k, num_probes=1,
                                                          microbatch_size=microbatch_size))
    mb_analysis = mb.lower(params, batch, key).compile().memory_analysis()
    print(json.dumps({
        "trace": trace, "seconds": seconds, "rss_before": before, "rss_peak": after, "peak_reset": resettable, "whole_batch_bytes": whole_batch,
        "microbatched_temp_bytes": mb_analysis.temp_size_in_bytes, "batch_bytes": int(batch[0].nbytes),
    }))


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:]])
