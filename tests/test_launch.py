"""lsgeo.launch: N local jax.distributed processes on 127.0.0.1 (gloo CPU collectives, a free port, a time
limit); curvature operators and data-parallel training on a batch sharded over the processes equal the
single-process values."""

import json
import os
import signal
import subprocess
import sys
import time

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


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for init to reap it is gone
        return stat.read().split(")")[-1].split()[0] != "Z"


def _start(tmp_path, *argv):
    """The launcher in a subprocess running ``sh -c`` whose grandchild (``sleep``) writes its pid to a file."""
    script = f'sleep 60 & echo $! > {tmp_path}/pid_$LSGEO_PROCESS_ID; wait'
    proc = subprocess.Popen([sys.executable, "-m", "lsgeo.launch", *argv, "--", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = []
    deadline = time.monotonic() + 30
    while len(pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = [int(p.read_text()) for p in tmp_path.glob("pid_*") if p.read_text().strip()]
    assert len(pids) == 2, "the grandchildren did not start"
    return proc, pids


def _gone(pids, within_s=15):
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_to_the_launcher_ends_every_descendant(tmp_path, sig, code):
    proc, pids = _start(tmp_path, "--num-processes", "2")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err  # Ctrl-C: no launcher traceback
    assert _gone(pids), "grandchildren survived the launcher"


def test_the_time_limit_ends_the_grandchildren_too(tmp_path):
    """A Python child whose own child (a grandchild of the launcher) outlives it unless its group is ended."""
    code = ("import os, subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
            f"open(os.path.join({str(tmp_path)!r}, 'pid_' + os.environ['LSGEO_PROCESS_ID']), 'w').write(str(p.pid)); "
            "time.sleep(60)")
    out = subprocess.run([sys.executable, "-m", "lsgeo.launch", "--num-processes", "2", "--timeout", "5", "--",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 124, out.stderr
    pids = [int(p.read_text()) for p in tmp_path.glob("pid_*")]
    assert len(pids) == 2
    assert _gone(pids)


def test_a_failing_process_ends_the_grandchildren_of_the_others(tmp_path):
    script = (f'if [ "$LSGEO_PROCESS_ID" = 1 ]; then sleep 1; exit 5; fi; '
              f'sleep 60 & echo $! > {tmp_path}/pid; wait')
    out = subprocess.run([sys.executable, "-m", "lsgeo.launch", "--num-processes", "2", "--", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 5, out.stderr
    assert _gone([int((tmp_path / "pid").read_text())])


def test_a_process_killed_by_a_signal_exits_128_plus_the_signal():
    out = subprocess.run([sys.executable, "-m", "lsgeo.launch", "--num-processes", "1", "--", "sh", "-c",
                          "kill -KILL $$"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 137, (out.returncode, out.stderr)
    assert launch.exit_code(-15) == 143 and launch.exit_code(3) == 3


def test_an_unknown_command_is_a_clean_message(capsys):
    assert launch.main(["--num-processes", "2", "--", "lsgeo-no-such-command"]) == 127
    err = capsys.readouterr().err
    assert "cannot run 'lsgeo-no-such-command'" in err and "Traceback" not in err


def test_help_prints_the_options_and_exits_zero():
    out = subprocess.run([sys.executable, "-m", "lsgeo.launch", "--help"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "--num-processes" in out.stdout and "--timeout" in out.stdout and "128 + N" in out.stdout
