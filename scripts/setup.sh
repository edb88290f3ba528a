#!/usr/bin/env bash
# From a fresh clone to a working CPU environment in .venv: the package (editable), its test tools, the ROS 2
# Kilted wheels and this package's interfaces, and the TensorRT type check's tools (pyright from npm into
# build/tools, the TensorRT 10 stubs into the venv). Idempotent; every step is skipped when already done.
# With `jazzy`: the same in .venv-jazzy with the ROS 2 Jazzy wheels instead, for the ROS test files on a second
# distribution (scripts/test_jazzy.sh); the TensorRT type check's tools are left out there.
#
#   bash scripts/setup.sh [kilted|jazzy]   # default kilted; PYTHON=python3.10 or VENV=/path override the defaults
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DISTRO=${1:-kilted}
PYTHON=${PYTHON:-python3}
case $DISTRO in
  kilted) VENV=${VENV:-$REPO/.venv} ;;
  jazzy) VENV=${VENV:-$REPO/.venv-jazzy} ;;
  *) echo "setup.sh: unknown ROS 2 distribution '$DISTRO' (kilted or jazzy)" >&2; exit 1 ;;
esac
# Pinned: the TensorRT type check (test_engines.py) must mean the same on every machine.
PYRIGHT_VERSION=1.1.414
TENSORRT_STUBS_VERSION=10.13.0.35.1
TOOLS=$REPO/build/tools

[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; any other spec would download a CUDA
# build of several GB. Everything after it only needs "torch", which 2.13.0 then satisfies.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e "$REPO[test]"
VENV=$VENV bash "$REPO/scripts/setup_ros.sh" "$DISTRO"
[[ $DISTRO == kilted ]] || exit 0  # the TensorRT type check runs on Kilted only

# The TensorRT 10 stubs: type information only (they install an empty `tensorrt` namespace, which
# engines/tensorrt_backend.py tells from a real TensorRT). --no-deps: they would pull in nothing useful.
if [[ $("$VENV/bin/python" -c "from importlib import metadata
try:
    print(metadata.version('tensorrt-stubs'))
except metadata.PackageNotFoundError:
    print('')") != "$TENSORRT_STUBS_VERSION" ]]; then
  "${PIP[@]}" --no-deps "tensorrt-stubs==$TENSORRT_STUBS_VERSION"
fi

# pyright from the npm registry into a repository-local prefix (build/ is ignored by git): the test finds it at
# build/tools/node_modules/.bin/pyright.
installed_pyright=""
if [[ -f $TOOLS/node_modules/pyright/package.json ]]; then
  installed_pyright=$(node -p "require('$TOOLS/node_modules/pyright/package.json').version" 2>/dev/null || true)
fi
if [[ $installed_pyright != "$PYRIGHT_VERSION" ]]; then
  if command -v npm >/dev/null; then
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error "pyright@$PYRIGHT_VERSION"
  elif [[ ${CI:-} == true ]]; then
    echo "setup.sh: npm is needed to install pyright for the TensorRT type check (apt-get install npm)" >&2
    exit 1
  else  # a developer machine without npm: the type check skips (it fails under CI)
    echo "setup.sh: npm not found; pyright not installed, the TensorRT type check will skip" >&2
  fi
fi
