#!/usr/bin/env bash
# The ROS test files (test/ros_test_files.txt) on ROS 2 Jazzy, a second distribution next to the Kilted of the whole
# suite (scripts/test.sh): sets up .venv-jazzy (scripts/setup.sh jazzy: the Jazzy wheels, rclpy 7, with this
# package's interfaces built into build/ros-jazzy and the ROS 2 command-line tools rebuilt against them), then runs
# pytest on those files there. Extra arguments go to pytest (e.g. bash scripts/test_jazzy.sh -k lifecycle).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv-jazzy}
VENV=$VENV bash "$REPO/scripts/setup.sh" jazzy
cd "$REPO"
mapfile -t files < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' test/ros_test_files.txt)
"$VENV/bin/python" -c "from importlib.metadata import version; print('ROS 2 Jazzy: rclpy', version('ros-jazzy-rclpy'))"
# As in scripts/test.sh: a file that cannot be collected fails the run without stopping the others.
exec "$VENV/bin/python" -m pytest "${files[@]}" -q -p no:cacheprovider --continue-on-collection-errors "$@"
