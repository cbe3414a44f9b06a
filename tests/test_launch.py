"""lsgeo.launch: N local jax.distributed processes on 127.0.0.1 (gloo CPU collectives, a free port, a time
limit); curvature operators and data-parallel training on a batch sharded over the processes equal the
single-process values."""

import json
import os
import subprocess
import sys

import pytest

from lsgeo import launch

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_processes_give_the_single_process_values():
    command = [sys.executable, "-m", "lsgeo.launch", "--num-processes", "2", "--devices-per-process", "2",
               "--timeout", "300", "--", sys.executable, os.path.join(HERE, "_distributed.py")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=400, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = sorted((json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["process"])
    assert [r["process"] for r in reports] == [0, 1]
    for report in reports:  # each process: 2 of the 4 devices, 11 of the 44 examples on each device
        assert report["processes"] == 2 and report["devices"] == 4 and report["local_examples"] == 11
        for name, error in report["errors"].items():
            assert error < 1e-6, (report["process"], name, error)


def test_a_failing_process_stops_the_others_and_its_code_is_returned():
    code = "import os, sys, time; sys.exit(3) if os.environ['LSGEO_PROCESS_ID'] == '1' else time.sleep(60)"
    out = subprocess.run([sys.executable, "-m", "lsgeo.launch", "--num-processes", "2", "--", sys.executable, "-c",
                          code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 3


@pytest.mark.parametrize("argv, message", [
    (["--num-processes", "2"], "usage"),
    (["--num-processes", "0", "--", "true"], "--num-processes must be >= 1"),
    (["--num-processes", "2", "--"], "command must not be empty"),
])
def test_bad_launches_say_what_is_wrong(argv, message, capsys):
    assert launch.main(argv) == 2
    assert message in capsys.readouterr().err
