#!/usr/bin/env bash
# The one-command demo on a fresh machine: set up .venv (scripts/setup.sh), then record generated road scenes into a
# bag, run the real node with the bundled demo model, replay the bag and ask questions (mobilevlm demo --help).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
bash "$REPO/scripts/setup.sh"
exec "$VENV/bin/python" -m mobilevlm_ros.demo.run "$@"
