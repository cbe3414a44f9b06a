#!/usr/bin/env bash
# Proves the dependency floors of pyproject.toml: installs exactly the declared minimum version of every
# dependency (and of the [test] extra) in a fresh virtual environment, prints what was installed, and
# runs the README's fast suite there (or the pytest arguments given).
#
#   scripts/check_floors.sh                         # fast suite: pytest -q -n 2 -m "not slow"
#   scripts/check_floors.sh tests/test_optim.py     # a subset (any pytest arguments)
#   scripts/check_floors.sh --resolve               # only: do exactly the floors resolve together? (pip
#                                                   # install --dry-run of the pins; a minute, no test run)
#
# Environment: PYTHON (default python3), FLOORS_VENV (default /tmp/lsgeo-floors-venv; removed first),
# FLOORS_WORKERS (pytest-xdist workers, default 2). Needs PyPI (or a configured index). Exit status: pytest's,
# or 1 when an installed version differs from its floor.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
venv="${FLOORS_VENV:-/tmp/lsgeo-floors-venv}"
workers="${FLOORS_WORKERS:-2}"

rm -rf "$venv"
"$python" -m venv "$venv"
pins="$venv/floors.txt"

# ">=X" of every requirement -> "==X" (tomllib: Python >= 3.11; the floors are read, never typed twice)
"$venv/bin/python" - "$root/pyproject.toml" "$pins" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["test"]
pins = []
for req in reqs:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([A-Za-z0-9_.]+)\s*", req)
    if not m:
        sys.exit(f"check_floors: requirement {req!r} has no plain '>=' floor")
    pins.append(f"{m[1]}=={m[2]}")
open(sys.argv[2], "w").write("\n".join(pins) + "\n")
EOF
echo "== floors (from pyproject.toml)"; cat "$pins"

"$venv/bin/pip" install -q --upgrade pip
if [[ "${1:-}" == "--resolve" ]]; then
  # every declared package at exactly its floor, with the dependencies those versions declare themselves
  "$venv/bin/pip" install --dry-run --ignore-installed -r "$pins"
  echo "== check_floors: the floors resolve together"
  exit 0
fi
# the floors as constraints: every declared package at exactly its floor, the rest resolved by pip
"$venv/bin/pip" install -q -c "$pins" -e "$root[test]"

echo "== installed"
"$venv/bin/python" - "$pins" <<'EOF'
import importlib.metadata as md, sys
from pip._vendor.packaging.version import Version
bad = 0
for line in open(sys.argv[1]).read().split():
    name, floor = line.split("==")
    got = md.version(name)
    ok = Version(got) == Version(floor)
    bad += not ok
    print(f"{name:16s} {got:12s} {'ok' if ok else 'DIFFERS from the floor ' + floor}")
print("python", sys.version.split()[0])
sys.exit(f"check_floors: {bad} installed version(s) differ from their floor" if bad else 0)
EOF

cd "$root"
if [[ $# -eq 0 ]]; then set -- -m "not slow"; fi
echo "== pytest -q -n $workers $*"
start=$(date +%s)
set +e
"$venv/bin/python" -m pytest -q -n "$workers" -p no:cacheprovider "$@"
rc=$?
set -e
echo "== check_floors: pytest exit status $rc in $(( $(date +%s) - start )) s"
exit $rc
