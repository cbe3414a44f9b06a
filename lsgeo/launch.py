"""Run a command as N local JAX processes (``jax.distributed``), for a laptop or one node.

    python -m lsgeo.launch --num-processes 2 --devices-per-process 2 -- python my_script.py --flag

starts N copies of the command with the coordinator on 127.0.0.1 (a free port), each told its process id
through the environment; the command calls ``lsgeo.launch.initialize()`` before any other JAX work, which
runs ``jax.distributed.initialize`` from that environment (and uses gloo for CPU collectives). When one
process fails or the time limit passes, the others are stopped with all their descendants (each process
runs in its own process group); the exit code is the first non-zero one (128 + N for a process killed by
signal N, 124 on the time limit, 128 + N when the launcher itself gets signal N).

A cluster needs no launcher: under SLURM (``srun``), Open MPI, Kubernetes or a Cloud TPU pod,
``jax.distributed.initialize()`` without arguments detects the coordinator, the process count and the id;
``lsgeo.launch.initialize()`` calls it so when the launcher's variables are absent and ``LSGEO_DISTRIBUTED=1``
is set, e.g. ``srun -N 4 --ntasks-per-node 1 env LSGEO_DISTRIBUTED=1 python my_script.py``.

In the command, each process feeds only its own shard of the data: a batch built with
``jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_part)`` is used where it lies
by every curvature operator (``lsgeo.dataplan.ShardedPlan``) and by ``lsgeo.train.train`` (data parallel over
every process's devices), and every process gets the same result. An experiment runs unchanged under the
launcher (``python -m lsgeo.launch --num-processes 2 -- python -m experiments.sigma_sweep``): every process
computes, process 0 alone writes the results folder and prints.

Example (one process, no distribution: ``initialize`` is a no-op):
  >>> from lsgeo import launch
  >>> launch.initialize()
  False
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

__all__ = ["initialize", "launch", "main", "free_port", "exit_code"]

ADDRESS, COUNT, RANK = "LSGEO_COORDINATOR_ADDRESS", "LSGEO_NUM_PROCESSES", "LSGEO_PROCESS_ID"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(*, timeout_s: int = 120) -> bool:
    """``jax.distributed.initialize`` from the launcher's environment (or auto-detected on a cluster when
    ``LSGEO_DISTRIBUTED=1``); returns whether it ran. Call it first, before any other JAX computation."""
    import jax  # noqa: PLC0415 (imported late: the launcher itself needs no JAX)

    if ADDRESS in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(os.environ[ADDRESS], num_processes=int(os.environ[COUNT]),
                                   process_id=int(os.environ[RANK]), initialization_timeout=timeout_s)
        return True
    if os.environ.get("LSGEO_DISTRIBUTED") == "1":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return True
    return False


def exit_code(returncode: int) -> int:
    """A child's exit status in the shell's convention: ``128 + N`` for a child killed by signal ``N``
    (``Popen`` reports ``-N``; 137 for SIGKILL), its own code otherwise."""
    return 128 - returncode if returncode < 0 else returncode


def _stop_groups(children, grace_s: float = 10.0) -> None:
    """SIGTERM to every child's process group (the child and all its descendants, ``sh -c`` included), then
    SIGKILL to the groups still alive after ``grace_s`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for c in children:
            try:
                os.killpg(c.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGKILL:
            break
        deadline = time.monotonic() + grace_s
        for c in children:
            try:
                c.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if not any(_group_alive(c.pid) for c in children):
            return
    for c in children:
        c.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def launch(command: list[str], num_processes: int, *, devices_per_process: int | None = None,
           timeout_s: float = 3600.0) -> int:
    """Runs ``command`` as ``num_processes`` local processes; returns the exit code.

    Each process is started in its own process group, and every group is ended when the launcher ends: when
    all processes exit, when one fails (the others and all their descendants, ``sh -c`` grandchildren
    included, get SIGTERM, then SIGKILL after 10 s), on the time limit (124), and when the launcher itself
    gets SIGTERM / SIGHUP / Ctrl-C (exit ``128 + signal``: 143, 129, 130). The exit code is the first
    non-zero one in the shell's convention (a process killed by signal N: ``128 + N``, 137 for SIGKILL).

    Raises:
      ValueError: an empty command, ``num_processes < 1``; FileNotFoundError / PermissionError: the command
        cannot be started (no process is left running)."""
    if not command:
        raise ValueError("command must not be empty: python -m lsgeo.launch --num-processes N -- COMMAND ...")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    address = f"127.0.0.1:{free_port()}"
    children = []

    received = []  # a flag, not an exception: an exception raised in a handler can land in a gc callback and be lost

    def on_signal(signum, _frame):
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    code = 0
    try:
        for rank in range(num_processes):
            if received:
                break
            env = dict(os.environ, **{ADDRESS: address, COUNT: str(num_processes), RANK: str(rank)})
            if devices_per_process:
                flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
                env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
            children.append(subprocess.Popen(command, env=env, process_group=0))
        deadline = time.monotonic() + timeout_s
        while not received and [c.poll() for c in children].count(None):
            failed = [c.returncode for c in children if c.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                code = exit_code(failed[0]) if failed else 124
                break
            time.sleep(0.1)
    except KeyboardInterrupt:  # SIGINT before the handler was installed
        received.append(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up is not interrupted
        _stop_groups(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        return 128 + int(received[0])
    return code or next((exit_code(c.returncode) for c in children if c.returncode), 0)


USAGE = "python -m lsgeo.launch --num-processes N [--devices-per-process K] [--timeout S] -- COMMAND ..."


def main(argv=None) -> int:
    """The command line; returns the exit code (2 on a bad launch, 127 when the command is not found)."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m lsgeo.launch", usage=USAGE,
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Exit code: the first non-zero one of the processes (128 + N for a "
                                            "process killed by signal N), 124 on the time limit, 130 on Ctrl-C.")
    parser.add_argument("--num-processes", type=int, required=True, help="local processes to start")
    parser.add_argument("--devices-per-process", type=int, default=None, help="forced CPU devices per process")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before every process is stopped")
    args = parser.parse_args(argv[:split])  # --help: prints the help and exits 0
    if split == len(argv):
        print(f"usage: {USAGE}\npython -m lsgeo.launch: error: missing '--' before the command", file=sys.stderr)
        return 2
    try:
        return launch(argv[split + 1 :], args.num_processes, devices_per_process=args.devices_per_process,
                      timeout_s=args.timeout)
    except ValueError as error:
        print(f"python -m lsgeo.launch: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError) as error:
        print(f"python -m lsgeo.launch: error: cannot run {argv[split + 1]!r}: {error.strerror}", file=sys.stderr)
        return 127 if isinstance(error, FileNotFoundError) else 126


if __name__ == "__main__":
    sys.exit(main())
