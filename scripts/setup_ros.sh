#!/usr/bin/env bash
# Set up ROS 2 (from PyPI wheels: Kilted, or Jazzy) in a Python venv and build this package's interfaces for
# development.
#
#   bash scripts/setup_ros.sh [kilted|jazzy]          # default kilted
#   VENV=/path/to/venv bash scripts/setup_ros.sh ...  # default VENV: .venv (kilted), .venv-jazzy (jazzy)
#
# Each distribution has its own venv and its own build directory, build/ros (kilted) or build/ros-jazzy: their
# wheels share unprefixed names (ros-rclpy, ...), so one venv never holds both (this script refuses a venv that
# holds the other distribution's). Kilted is what the whole test suite runs on; Jazzy (rclpy 7, an older API line,
# Fast DDS 2) runs the ROS test files as a second distribution (scripts/test_jazzy.sh).
#
# The venv must exist already (python3 -m venv); it need not be activated. Idempotent: a re-run skips every
# step that is already done. What it does (each step below says why):
#   1. pip-installs the distribution's ROS 2 runtime and interface-build wheels (+ catkin-pkg, which
#      ament_cmake_core needs to read package.xml and no wheel pulls in without colcon), and rosbags, if any is
#      missing;
#   2. rewrites the manylinux build container's include paths in the wheels' exported CMake files (once);
#   3. builds msg/ srv/ action/ with plain CMake into build/ros*/install (NOT into the venv: in development the
#      working tree's mobilevlm_ros/ is the package, and an installed copy must not shadow it), skipped when a
#      stamp keyed on the interface files, CMakeLists.txt, package.xml, this step of this script, the venv and
#      its ROS wheel versions matches;
#   4. writes mobilevlm_ros_dev.pth into the venv's site-packages, which puts the repository root and then
#      build/ros*/install/.../site-packages on sys.path (so mobilevlm_ros/__init__.py is the working tree's and
#      its pkgutil.extend_path adds the generated msg/srv/action modules), adds build/ros*/install/lib to
#      LD_LIBRARY_PATH (rosidl's typesupport dispatch looks its libraries up there by name at run time), and
#      build/ros*/install and the venv to AMENT_PREFIX_PATH and the distribution's name to ROS_DISTRO (what
#      sourcing a colcon workspace on a ROS install does), so every Python process of the venv,
#      `ros2 launch mobilevlm_ros ...` and the nodes it starts included, finds the package in the ament index
#      without any sourcing;
#   5. lays build/ros*/install out for the ament index as `colcon build --symlink-install` would, pointing at the
#      working tree: share/mobilevlm_ros/launch and config are symlinks to launch/ and config/, and
#      lib/mobilevlm_ros/mobilevlm_node and mobilevlm_lifecycle_node are launchers that run the working tree's
#      scripts/mobilevlm_node and deploy/mobilevlm_lifecycle_node with the venv's Python;
#   6. installs the ROS 2 command-line tools and launch (ros2 launch/run/service/action/topic/param/lifecycle)
#      from the wheels vendored in third_party/ros2extra (rebuilt from its sources for Jazzy or a Python other than
#      3.11), unless they are installed already or a real ROS 2 install is sourced (its own `ros2` on PATH and
#      AMENT_PREFIX_PATH set: that one is used then);
#   7. checks, in a fresh interpreter, that the types import and serialize, where mobilevlm_ros resolves to, and
#      that the ament index finds the package (and launch imports, where step 6 installed it).
set -euo pipefail

t_start=$(date +%s%N)
elapsed() { local ms=$((($(date +%s%N) - t_start) / 1000000)); printf '%d.%01d' $((ms / 1000)) $((ms % 1000 / 100)); }
log() { echo "[setup_ros $(elapsed)s] $*"; }
die() { echo "[setup_ros] error: $*" >&2; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DISTRO=${1:-kilted}
case $DISTRO in
  kilted) VENV=${VENV:-$REPO/.venv} ROS_DIR=$REPO/build/ros ;;
  jazzy) VENV=${VENV:-$REPO/.venv-jazzy} ROS_DIR=$REPO/build/ros-jazzy ;;
  *) die "unknown ROS 2 distribution '$DISTRO' (kilted or jazzy)" ;;
esac
[[ -d $VENV ]] || die "no venv at '$VENV' (create it first: python3 -m venv $VENV)"
VENV=$(cd "$VENV" && pwd)
PY=$VENV/bin/python
[[ -x $PY ]] || die "$PY is missing"

SRC_DIR=$ROS_DIR/src
BUILD_DIR=$ROS_DIR/build
INSTALL_DIR=$ROS_DIR/install
STAMP=$ROS_DIR/stamp

# The wheels' .pth hook re-executes Python with the venv's library path unless this guard variable is set; one
# inherited from a process of another venv would leave this venv's path out.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE

PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
log "ROS 2 $DISTRO, venv $VENV (Python $PYVER), repository $REPO"
case $PYVER in
  3.10 | 3.11 | 3.12) ;;
  *) die "PyPI's ROS 2 wheels are built for CPython 3.10 to 3.12, not $PYVER: make the venv with one of those, e.g.
  PYTHON=python3.11 bash scripts/setup.sh $DISTRO (pyenv's, if not on PATH; 3.11 is what setup.sh's torch pin is for)" ;;
esac
other_distro=$("$PY" - "$DISTRO" <<'PYEOF'
import sys
from importlib import metadata
for distro in ("kilted", "jazzy"):
    try:
        if distro != sys.argv[1] and metadata.version(f"ros-{distro}-rclpy"):
            print(distro)
    except metadata.PackageNotFoundError:
        pass
PYEOF
)
[[ -z $other_distro ]] || die "$VENV holds the ROS 2 $other_distro wheels: $DISTRO needs its own venv (they share names)"

# --- 1. wheels ------------------------------------------------------------------------------------------------
# Wheels the interface build needs that no wheel's metadata pulls in differ: ament_cmake_ros_core is the part of
# ament_cmake_ros that the build needs, split out in Kilted; Jazzy has only the whole, whose CMake extras
# find_package() its test helpers too, and Jazzy's rosidl_generator_py still finds Python with python_cmake_module.
case $DISTRO in
  kilted) build_extras=(ament-cmake-ros-core) ;;
  jazzy) build_extras=(ament-cmake-ros ament-cmake-gmock ament-cmake-gtest ament-cmake-pytest python-cmake-module) ;;
esac
WHEELS=()
for name in rclpy rmw-fastrtps-cpp std-msgs std-srvs sensor-msgs diagnostic-msgs lifecycle-msgs action-msgs \
    builtin-interfaces ament-cmake ament-package ament-cmake-include-directories rosidl-default-generators \
    rosidl-core-generators "${build_extras[@]}" ament-cmake-python; do
  WHEELS+=("ros-$DISTRO-$name")
done
WHEELS+=(catkin-pkg rosbags numpy)
missing=$("$PY" - "${WHEELS[@]}" <<'PYEOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(name)
PYEOF
)
if [[ -n $missing ]]; then
  log "pip install: $(echo $missing)"
  # (the grep drops the warnings about this machine's local index mirrors that pip prints for each name)
  "$PY" -m pip install --quiet --disable-pip-version-check "${WHEELS[@]}" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  log "wheels installed"
else
  log "wheels already installed"
fi

# --- 2. fix up the manylinux include paths in the wheels' exported CMake files ----------------------------------
PY_INCLUDE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NP_INCLUDE=$("$PY" -c 'import numpy; print(numpy.get_include())')
bad_files=$(grep -rlE '/opt/python/cp3[0-9]+-cp3[0-9]+/(include|lib)' "$VENV/share" --include='*.cmake' || true)
if [[ -n $bad_files ]]; then
  # shellcheck disable=SC2086
  sed -i -E \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#${PY_INCLUDE}#g" \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/(_core|core)/include#${NP_INCLUDE}#g" \
    $bad_files
  log "fixed include paths in $(echo "$bad_files" | wc -l) CMake files"
fi

# --- 3. build the interfaces ------------------------------------------------------------------------------------
ros_versions=$("$PY" -c "from importlib.metadata import version as v; print(v('ros-$DISTRO-rclpy'), v('ros-$DISTRO-rosidl-default-generators'))")
hash=$(cd "$REPO" && {
  echo "venv=$VENV python=$PYVER ros=$ros_versions"
  for f in $(find msg srv action -type f 2>/dev/null | LC_ALL=C sort) CMakeLists.txt package.xml; do
    echo "== $f"; cat "$f"
  done
  # this step of this script (edits elsewhere in it need no rebuild)
  sed -n '/^# --- 3\. /,/^# --- 4\. /p' scripts/setup_ros.sh
} | sha256sum | cut -d' ' -f1)

PYTHON_INSTALL_SITE=$INSTALL_DIR/lib/python$PYVER/site-packages
if [[ -f $STAMP && $(cat "$STAMP") == "$hash" && -d $PYTHON_INSTALL_SITE/mobilevlm_ros ]]; then
  log "interfaces up to date (stamp $STAMP)"
else
  log "building interfaces with CMake into $INSTALL_DIR"
  rm -rf "$BUILD_DIR" "$INSTALL_DIR" "$STAMP" "$SRC_DIR"
  # CMake refuses to export include directories that lie inside the source tree, and the venv's NumPy include
  # directory does when the venv is inside the repository (.venv): configure from a directory of symlinks to the
  # repository's top-level entries instead, whose path is no prefix of the venv's.
  mkdir -p "$SRC_DIR"
  for entry in "$REPO"/*; do
    case ${entry##*/} in build | install | log) continue ;; esac
    ln -s "$entry" "$SRC_DIR/${entry##*/}"
  done
  (
    export PATH=$VENV/bin:$PATH
    export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV
    # RPATH: $ORIGIN for our libraries in lib/, $ORIGIN/../../.. for the Python extension modules in
    # lib/pythonX.Y/site-packages/mobilevlm_ros/, plus the venv's library directories they link against
    # (USE_LINK_PATH), so they load without LD_LIBRARY_PATH.
    cmake -S "$SRC_DIR" -B "$BUILD_DIR" \
      -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_INSTALL_PREFIX="$INSTALL_DIR" \
      -DBUILD_TESTING=OFF \
      -DPython3_EXECUTABLE="$PY" \
      -DMOBILEVLM_INSTALL_PYTHON_SOURCES=OFF \
      '-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../../..' \
      -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=ON \
      > "$ROS_DIR/cmake-configure.log" 2>&1 \
      || { tail -n 40 "$ROS_DIR/cmake-configure.log" >&2; exit 1; }
    cmake --build "$BUILD_DIR" -j "${SETUP_ROS_JOBS:-2}" > "$ROS_DIR/cmake-build.log" 2>&1 \
      || { grep -E -m 20 -B 2 -A 8 'error|Error' "$ROS_DIR/cmake-build.log" >&2; exit 1; }
    cmake --install "$BUILD_DIR" > "$ROS_DIR/cmake-install.log" 2>&1 \
      || { tail -n 40 "$ROS_DIR/cmake-install.log" >&2; exit 1; }
  ) || die "CMake build failed (logs in $ROS_DIR)"
  [[ -d $PYTHON_INSTALL_SITE/mobilevlm_ros ]] || die "no $PYTHON_INSTALL_SITE/mobilevlm_ros after the install"
  # The generated package directory holds an empty __init__.py; drop it, so that this directory is only a
  # namespace portion: even with it before the working tree on sys.path, the import system then still picks
  # the working tree's regular package, whose extend_path adds this directory.
  rm -f "$PYTHON_INSTALL_SITE/mobilevlm_ros/__init__.py"
  echo "$hash" > "$STAMP"
  log "interfaces built"
fi

# --- 4. .pth: working tree first, then the generated modules; our libraries on LD_LIBRARY_PATH ----------------
# rosidl's typesupport dispatch dlopen()s lib<pkg>__rosidl_typesupport_<impl>.so by bare name at run time, so the
# dynamic loader must have build/ros/install/lib in LD_LIBRARY_PATH when the process starts: RPATH does not help
# there, and setting the variable later in the process is ignored by the loader. The wheels'
# ros_wheels_bootstrapper.pth re-executes the interpreter once with the venv's library path; our .pth sorts
# before it, so our directory is added first and goes into that re-exec.
PTH=$SITE/mobilevlm_ros_dev.pth
HOOK=$SITE/_mobilevlm_ros_dev.py
hook_content="\"\"\"Development paths of mobilevlm_ros: written by $REPO/scripts/setup_ros.sh, imported by mobilevlm_ros_dev.pth.

Puts $INSTALL_DIR and the venv on AMENT_PREFIX_PATH, sets ROS_DISTRO=$DISTRO unless set, and
$INSTALL_DIR/lib on LD_LIBRARY_PATH before ros_wheels_bootstrapper.pth
re-executes the interpreter with the venv's library path (.pth files run in name order), because rosidl's
typesupport dispatch dlopen()s our typesupport libraries by bare name. A process that inherited the bootstrapper's
guard variable but not our directory (e.g. a child of another venv's Python, or one started with a rewritten
LD_LIBRARY_PATH) is re-executed here once without that guard, so both paths get set.
\"\"\"
import os
import sys

# The ament index of this package's install prefix and of the venv's ROS wheels, as sourcing a colcon workspace
# would set it: \`ros2 launch mobilevlm_ros ...\` and \`ros2 run mobilevlm_ros ...\` resolve with nothing sourced.
AMENT_PREFIXES = ['$INSTALL_DIR', '$VENV']
_prefixes = [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]
if any(p not in _prefixes for p in AMENT_PREFIXES):
    os.environ['AMENT_PREFIX_PATH'] = os.pathsep.join(
        [*AMENT_PREFIXES, *(p for p in _prefixes if p not in AMENT_PREFIXES)])

# The distribution's name, as a ROS install's setup script sets it: mobilevlm_ros.rosenv names the Fast DDS profile
# file by it (Jazzy's Fast DDS 2 reads FASTRTPS_DEFAULT_PROFILES_FILE, Kilted's Fast DDS 3 FASTDDS_...).
os.environ.setdefault('ROS_DISTRO', '$DISTRO')

LIB = '$INSTALL_DIR/lib'
_parts = [p for p in os.environ.get('LD_LIBRARY_PATH', '').split(os.pathsep) if p]
if LIB not in _parts:
    os.environ['LD_LIBRARY_PATH'] = os.pathsep.join([LIB, *_parts])
    if os.environ.pop('_ROS_WHEELS_BOOTSTRAP_COMPLETE', None) and sys.executable:
        os.execv(sys.executable, sys.orig_argv)"
pth_content="$REPO
$PYTHON_INSTALL_SITE
import _mobilevlm_ros_dev"
if [[ ! -f $HOOK || $(cat "$HOOK") != "$hook_content" ]]; then
  printf '%s\n' "$hook_content" > "$HOOK"
  log "wrote $HOOK"
fi
if [[ ! -f $PTH || $(cat "$PTH") != "$pth_content" ]]; then
  printf '%s\n' "$pth_content" > "$PTH"
  log "wrote $PTH"
fi

# --- 5. the ament index layout of a colcon --symlink-install build, pointing at the working tree ----------------
# CMake installed copies; in development the working tree is the package, so edits to launch files, parameter files
# and launcher scripts take effect without a rebuild (the stamp of step 3 does not cover them). Like colcon, link
# each file, not the directory: `ros2 launch` finds launch files with os.walk, which does not enter linked
# directories. (A new file needs a re-run of this script, as with colcon.)
SHARE=$INSTALL_DIR/share/mobilevlm_ros
for dir in launch config; do
  wanted=$(cd "$REPO/$dir" && find . -type f ! -name '*.pyc' | LC_ALL=C sort)
  have=$(cd "$SHARE/$dir" 2>/dev/null && find . -type l | LC_ALL=C sort \
         | while read -r f; do [[ $(readlink "$f") == "$REPO/$dir/${f#./}" ]] && echo "$f"; done)
  if [[ $wanted != "$have" || -n $(find "$SHARE/$dir" -type f 2>/dev/null) ]]; then
    rm -rf "${SHARE:?}/$dir"
    cp -rs "$REPO/$dir" "$SHARE/$dir"
    find "$SHARE/$dir" -name '__pycache__' -prune -exec rm -rf {} +
    log "$SHARE/$dir: links to the files of $REPO/$dir"
  fi
done
# The launchers colcon installs under lib/mobilevlm_ros/ start with #!/usr/bin/env python3, which is the ROS
# install's Python on a robot but not this venv's: run the working tree's files with the venv's Python instead.
for script in scripts/mobilevlm_node deploy/mobilevlm_lifecycle_node; do
  launcher=$INSTALL_DIR/lib/mobilevlm_ros/${script##*/}
  launcher_content="#!$PY
\"\"\"Development launcher written by scripts/setup_ros.sh, where colcon installs $script: runs that file of the
working tree with the venv's Python (the working tree's mobilevlm_ros is the package, see mobilevlm_ros_dev.pth).\"\"\"
import runpy

runpy.run_path('$REPO/$script', run_name='__main__')"
  if [[ ! -f $launcher || $(cat "$launcher") != "$launcher_content" ]]; then
    mkdir -p "${launcher%/*}"
    rm -f "$launcher"  # CMake installed it read-only
    printf '%s\n' "$launcher_content" > "$launcher"
    chmod 755 "$launcher"
    log "wrote launcher $launcher"
  fi
done

# --- 6. ROS 2 command-line tools and launch -----------------------------------------------------------------------
# A sourced ROS 2 install brings its own ros2 and launch (matching its rclpy): use those. Otherwise install the
# wheels vendored in third_party/ros2extra; they are Kilted's tools (the rolling sources of Dec 2024, whose
# composition_interfaces wheel is compiled for CPython 3.11 against the Kilted wheels), so another Python gets every
# wheel rebuilt from the vendored sources once (build_ros2extra.sh, about 40 s), and Jazzy gets them built from the
# vendored sources of Jazzy's own tools (third_party/ros2extra/jazzy: the rolling ones use Kilted-only rclpy API).
ROS2EXTRA=$REPO/third_party/ros2extra
case $DISTRO in
  kilted) ros2extra_sources=$ROS2EXTRA ;;
  jazzy) ros2extra_sources=$ROS2EXTRA/jazzy ;;
esac
system_ros2=$(command -v ros2 || true)
if [[ -n ${AMENT_PREFIX_PATH:-} && -n $system_ros2 && $(realpath "$system_ros2") != "$VENV"/* ]]; then
  log "ROS 2 tools: using the sourced install's $system_ros2 (AMENT_PREFIX_PATH is set)"
  tools_installed=false
else
  artifacts=$ROS2EXTRA
  if [[ $PYVER != 3.11 || $DISTRO != kilted ]]; then
    artifacts=$ROS_DIR/ros2extra-cp${PYVER/./}
    # (built from these sources: the SOURCES.txt that build_ros2extra.sh copies out of the tarball is theirs)
    if ! compgen -G "$artifacts/wheels/ros_composition_interfaces-*-cp${PYVER/./}-*.whl" > /dev/null \
        || ! cmp -s "$ros2extra_sources/SOURCES.txt" "$artifacts/SOURCES.txt"; then
      log "building the ROS 2 tools' wheels for $DISTRO and Python $PYVER into $artifacts (the vendored ones are Kilted, cp311)"
      rm -rf "$artifacts"
      DISTRO=$DISTRO VENV=$VENV OUT=$artifacts SRC_TARBALL=$ros2extra_sources/ros2extra-src.tar.gz \
        bash "$ROS2EXTRA/build_ros2extra.sh" > "$ROS_DIR/ros2extra-build.log" 2>&1 \
        || { tail -n 40 "$ROS_DIR/ros2extra-build.log" >&2; die "build failed"; }
      cp "$ROS2EXTRA/requirements-pypi.txt" "$artifacts/"
    fi
  fi
  # Installed when every wheel's distribution is there at the wheel's version.
  if "$PY" - "$artifacts"/wheels/*.whl <<'PYEOF'
import sys
from importlib import metadata
from pathlib import Path

for wheel in sys.argv[1:]:
    name, version = Path(wheel).name.split("-")[:2]
    try:
        if metadata.version(name) != version:
            sys.exit(1)
    except metadata.PackageNotFoundError:
        sys.exit(1)
PYEOF
  then
    log "ROS 2 tools already installed (from ${artifacts#"$REPO"/})"
  else
    log "installing the ROS 2 tools from $artifacts"
    bash "$ROS2EXTRA/install.sh" "$VENV" "$artifacts" | sed 's/^/  /'
  fi
  tools_installed=true
fi

# --- 7. check in a fresh interpreter (no LD_LIBRARY_PATH, nothing sourced) --------------------------------------
env -u LD_LIBRARY_PATH -u _ROS_WHEELS_BOOTSTRAP_COMPLETE -u PYTHONPATH -u AMENT_PREFIX_PATH \
  "$PY" - "$REPO" "$INSTALL_DIR" "$tools_installed" <<'PYEOF' \
  || die "the check failed: the interfaces do not import or load, or the ament index does not find the package"
import os, sys
import mobilevlm_ros
from mobilevlm_ros.msg import SceneCaption
from mobilevlm_ros.srv import AskScene
from mobilevlm_ros.action import AskScene as AskSceneAction
from rclpy.serialization import deserialize_message, serialize_message

repo = os.path.realpath(sys.argv[1])
init = os.path.realpath(mobilevlm_ros.__file__)
assert init == os.path.join(repo, "mobilevlm_ros", "__init__.py"), f"mobilevlm_ros resolves to {init}, not {repo}"
for t, kw in ((SceneCaption, {"caption": "a cup"}), (AskScene.Response, {"answer": "yes"}),
              (AskSceneAction.Feedback, {"text_delta": "y"})):
    msg = t(**kw)
    assert deserialize_message(serialize_message(msg), t) == msg
print(f"mobilevlm_ros -> {init}")
print(f"mobilevlm_ros.srv -> {sys.modules['mobilevlm_ros.srv'].__file__}")

from ament_index_python.packages import get_package_prefix

prefix = get_package_prefix("mobilevlm_ros")
assert os.path.samefile(prefix, sys.argv[2]), f"the ament index finds mobilevlm_ros in {prefix}, not {sys.argv[2]}"
for launcher in ("mobilevlm_node", "mobilevlm_lifecycle_node"):
    assert os.access(os.path.join(prefix, "lib", "mobilevlm_ros", launcher), os.X_OK), f"no launcher {launcher}"
assert os.path.isfile(os.path.join(prefix, "share", "mobilevlm_ros", "launch", "vlm.launch.py"))
print(f"ament index: mobilevlm_ros -> {prefix}")
if sys.argv[3] == "true":
    import launch, launch_ros, ros2cli  # noqa: F401,E401 - `ros2 launch` needs all three
    print(f"ros2 -> {os.path.join(sys.prefix, 'bin', 'ros2')} (launch {launch.__file__.rsplit('/', 2)[0]})")
PYEOF
log "done"
