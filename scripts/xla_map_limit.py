"""Shows why a long-lived JAX process on the CPU can die in the compiler: the memory-map limit.

Every XLA:CPU executable maps its code and data as separate memory regions, and Linux refuses a process more
than ``vm.max_map_count`` of them (65530 by default). This script fills the process's maps to just under the
limit with anonymous pages, then compiles small jitted functions: within about a hundred compilations LLVM
reports "LLVM compilation error: Cannot allocate memory" and the process segfaults. ``--clear`` calls
``jax.clear_caches()`` whenever the process is within 200 regions of the limit, and the same compilations
succeed.

    python scripts/xla_map_limit.py            # exits by SIGSEGV (139) after ~100 compilations
    python scripts/xla_map_limit.py --clear    # compiles 200 functions and exits 0

The test suite compiles thousands of programs per pytest-xdist worker; tests/conftest.py clears JAX's caches
once a worker maps half the limit.
"""

import argparse
import mmap

import jax
import jax.numpy as jnp


def mapped_regions() -> int:
    with open("/proc/self/maps", "rb") as maps:
        return sum(1 for _ in maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clear", action="store_true", help="clear JAX's caches near the limit")
    parser.add_argument("--compilations", type=int, default=200)
    args = parser.parse_args()
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    filler = []  # shared anonymous pages: each one its own region (they never merge)
    while mapped_regions() < limit - 400:
        filler.extend(mmap.mmap(-1, mmap.PAGESIZE) for _ in range(max(1, min(1000, (limit - 400 - mapped_regions())))))
    print(f"limit {limit}, mapped {mapped_regions()} before compiling", flush=True)
    for i in range(args.compilations):
        if args.clear and mapped_regions() > limit - 200:
            jax.clear_caches()
        f = jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cos(x @ x.T).sum())
        f(jnp.ones((i + 2, 3))).block_until_ready()
        if i % 10 == 0:
            print(f"compiled {i + 1}, mapped {mapped_regions()}", flush=True)
    print(f"compiled {args.compilations} functions without a crash")


if __name__ == "__main__":
    main()
