#!/usr/bin/env bash
# From a fresh clone to a working CPU environment in .venv: the package (editable), its test tools, the ROS 2
# Kilted wheels and this package's interfaces. Idempotent; every step is skipped when already done.
#
#   bash scripts/setup.sh            # PYTHON=python3.10 or VENV=/path override the defaults
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$REPO/.venv}

[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; any other spec would download a CUDA
# build of several GB. Everything after it only needs "torch", which 2.13.0 then satisfies.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e "$REPO[test]"
VENV=$VENV bash "$REPO/scripts/setup_ros.sh"
