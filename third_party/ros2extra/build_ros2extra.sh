#!/usr/bin/env bash
# Build the ROS 2 pieces that PyPI's ros-kilted-* and ros-jazzy-* wheels lack (launch, launch_ros, ros2cli + verbs,
# rosidl_runtime_py, composition_interfaces) into installable artifacts.
#
#   VENV=/path/to/venv OUT=/path/to/out [DISTRO=jazzy] bash build_ros2extra.sh
#
# DISTRO: kilted (default) or jazzy: which sources (the commits below) and so which rclpy API line they are for.
# VENV: a Python venv that already holds that distribution's runtime AND interface-build wheels (what the
#       project's scripts/setup_ros.sh installs: ros-<distro>-rclpy ... ros-<distro>-ament-cmake-python, catkin-pkg,
#       numpy). It is modified only by the idempotent CMake include-path fix-up (same sed as setup_ros.sh step 2).
# OUT:  output folder (default ./out). Gets wheels/*.whl (16 pure-Python wheels + one cpXY wheel of
#       composition_interfaces), licenses/, requirements-pypi.txt, SOURCES.txt, and ros2extra-src.tar.gz (the
#       exact sources used).
# Sources: SRC_TARBALL=<a ros2extra-src.tar.gz from an earlier run>, or git mirrors under MIRRORS
#       (bare git mirrors laid out as MIRRORS/ros2+<repo>/repo) at the commits pinned below: for kilted, rolling as
#       of Dec 2024 (no kilted branch exists in the snapshots); for jazzy, the jazzy branches as of Dec 2024 (the
#       rolling tools use Kilted-only rclpy API, e.g. `with rclpy.init():` in ros2 service call).
# Needs: cmake >= 3.16, a C/C++ compiler, git (only with MIRRORS). No network (pip runs --no-index, no isolation).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DISTRO=${DISTRO:-kilted}
VENV=${VENV:?set VENV to a venv holding the ros-$DISTRO wheels}
VENV=$(cd "$VENV" && pwd)
OUT=${OUT:-$PWD/out}
MIRRORS=${MIRRORS:-}
JOBS=${JOBS:-2}
PY=$VENV/bin/python
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE PYTHONPATH
log() { echo "[build_ros2extra] $*"; }

case $DISTRO in
  kilted) declare -A COMMIT=(
    [launch]=02595bafc7891d4d287667b6aa9161edf738e9f3            # launch 3.7.1
    [launch_ros]=f9ab9371824d470bca47602bc7d277eb2217c90d        # launch_ros 0.28.0
    [ros2cli]=e20d2c664fc2981b0b80ebed534e5becc6fdbf34           # ros2cli 0.36.1
    [rosidl_runtime_py]=3327b1dc488af514017c5446ffff12d102bbe94a # rosidl_runtime_py 0.14.0
    [rcl_interfaces]=f6b3741d921ef5414125091b2ccc74b863be3c24    # rcl_interfaces 2.2.0 (composition_interfaces)
  ) ;;
  jazzy) declare -A COMMIT=(
    [launch]=09403fcebedb68dd259e9ab6b35bd8712b6596ec            # launch 3.4.3
    [launch_ros]=62c56e53e86812023697fe330c83d327f54e7b18        # launch_ros 0.26.6
    [ros2cli]=de6cd27284937044d8dff47a617581c28865210c           # ros2cli 0.32.2
    [rosidl_runtime_py]=df2361f64ecb85f65f4bf22e804424e0f1ac4197 # rosidl_runtime_py 0.13.1
    [rcl_interfaces]=003987ecb81a32802ab27dd6d325b8c6b8b813cc    # rcl_interfaces 2.0.2 (composition_interfaces)
  ) ;;
  *) echo "unknown DISTRO '$DISTRO' (kilted or jazzy)" >&2; exit 1 ;;
esac
# repo:package-dir ("." = repository root)
PY_PKGS=(
  launch:launch launch:launch_xml launch:launch_yaml
  launch_ros:launch_ros launch_ros:ros2launch
  ros2cli:ros2cli ros2cli:ros2pkg ros2cli:ros2node ros2cli:ros2topic ros2cli:ros2service ros2cli:ros2action
  ros2cli:ros2param ros2cli:ros2lifecycle ros2cli:ros2interface ros2cli:ros2run
  rosidl_runtime_py:.
)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ros2extra-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/src
mkdir -p "$SRC" "$OUT/wheels" "$OUT/licenses"
rm -f "$OUT"/wheels/*.whl

# --- 1. sources ---------------------------------------------------------------------------------------------------
if [[ -n ${SRC_TARBALL:-} ]]; then
  tar -xzf "$SRC_TARBALL" -C "$SRC"
  log "sources from $SRC_TARBALL"
else
  : > "$WORK/SOURCES.txt"
  for repo in "${!COMMIT[@]}"; do
    git_dir=$MIRRORS/ros2+$repo/repo
    [[ -d $git_dir ]] || { echo "no mirror $git_dir (fetch github:ros2/$repo, or pass SRC_TARBALL)" >&2; exit 1; }
    mkdir -p "$SRC/$repo"
    git -C "$git_dir" archive "${COMMIT[$repo]}" | tar -x -C "$SRC/$repo"
    echo "https://github.com/ros2/$repo ${COMMIT[$repo]}" >> "$WORK/SOURCES.txt"
  done
  # keep only what is built (+ LICENSE files)
  (cd "$SRC" && for repo in *; do
     keep=" LICENSE "
     for spec in "${PY_PKGS[@]}" rcl_interfaces:composition_interfaces; do
       [[ ${spec%%:*} == "$repo" ]] && keep+=" ${spec#*:} "
     done
     [[ $keep == *" . "* ]] && continue
     for entry in "$repo"/* "$repo"/.[!.]*; do
       [[ -e $entry ]] || continue
       [[ $keep == *" ${entry#*/} "* ]] || rm -rf "$entry"
     done
   done)
  cp "$WORK/SOURCES.txt" "$SRC/SOURCES.txt"
  tar -czf "$OUT/ros2extra-src.tar.gz" -C "$SRC" .
  log "sources exported from $MIRRORS"
fi
cp "$SRC/SOURCES.txt" "$OUT/SOURCES.txt"

# Fix-up (metadata only): launch_ros lists 'ament_index_python' in install_requires, but in a wheel-based venv that
# module comes from the dist 'ros-ament-index-python', so pip check reports it as missing. Drop it.
sed -i "/^ *'ament_index_python',\$/d" "$SRC/launch_ros/launch_ros/setup.py"

# --- 2. pure-Python wheels ------------------------------------------------------------------------------------------
"$PY" -c 'import setuptools, wheel' 2>/dev/null || "$PY" -m pip install --quiet setuptools wheel
for spec in "${PY_PKGS[@]}"; do
  dir=$SRC/${spec%%:*}/${spec#*:}
  "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-index -w "$OUT/wheels" "$dir" \
    > "$WORK/pip-wheel.log" 2>&1 || { cat "$WORK/pip-wheel.log" >&2; exit 1; }
done
log "built $(ls "$OUT"/wheels/*.whl | wc -l) pure-Python wheels"

# --- 3. composition_interfaces (rosidl) -----------------------------------------------------------------------------
PY_INCLUDE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NP_INCLUDE=$("$PY" -c 'import numpy; print(numpy.get_include())')
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
CP=cp${PYVER/./}
# (a) the wheels' exported CMake files name the manylinux container's include dirs: rewrite once per venv
bad_files=$(grep -rlE '/opt/python/cp3[0-9]+-cp3[0-9]+/(include|lib)' "$VENV/share" --include='*.cmake' || true)
if [[ -n $bad_files ]]; then
  # shellcheck disable=SC2086
  sed -i -E \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#${PY_INCLUDE}#g" \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/(_core|core)/include#${NP_INCLUDE}#g" \
    $bad_files
  log "fixed include paths in $(echo "$bad_files" | wc -l) CMake files of $VENV"
fi
STAGE=$WORK/stage
(
  export PATH=$VENV/bin:$PATH AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV
  cmake -S "$SRC/rcl_interfaces/composition_interfaces" -B "$WORK/build" \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$STAGE" -DBUILD_TESTING=OFF \
    -DPython3_EXECUTABLE="$PY" '-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../../..' \
    > "$WORK/configure.log" 2>&1 || { tail -40 "$WORK/configure.log" >&2; exit 1; }
  cmake --build "$WORK/build" -j "$JOBS" > "$WORK/build.log" 2>&1 || { grep -m20 -A8 -i error "$WORK/build.log" >&2; exit 1; }
  cmake --install "$WORK/build" > "$WORK/install.log" 2>&1 || { tail -40 "$WORK/install.log" >&2; exit 1; }
)
strip --strip-unneeded "$STAGE"/lib/*.so "$STAGE"/lib/python*/site-packages/composition_interfaces/*.so
# (b) make the staged tree relocatable the way the ros-kilted wheels are: their absolute paths say
# /opt/python/cpXY-cpXY, which step (a) of any target venv's fix-up rewrites again
text_files=$(grep -rlI -e "$VENV" -e "$STAGE" -e "$PY_INCLUDE" "$STAGE/share" || true)
if [[ -n $text_files ]]; then
  # shellcheck disable=SC2086
  sed -i -e "s#${NP_INCLUDE}#/opt/python/${CP}-${CP}/lib/python${PYVER}/site-packages/numpy/_core/include#g" \
    -e "s#${PY_INCLUDE}#/opt/python/${CP}-${CP}/include/python${PYVER}#g" \
    -e "s#${STAGE}#/opt/python/${CP}-${CP}#g" -e "s#${VENV}#/opt/python/${CP}-${CP}#g" $text_files
fi
version=$(sed -n 's#.*<version>\(.*\)</version>.*#\1#p' "$SRC/rcl_interfaces/composition_interfaces/package.xml")
"$PY" "$HERE/make_prefix_wheel.py" "$STAGE" ros-composition-interfaces "$version" "$OUT/wheels" \
  --license "$SRC/rcl_interfaces/LICENSE" > /dev/null
log "built ros_composition_interfaces $version ($CP)"

# --- 4. licenses, PyPI requirements -------------------------------------------------------------------------------
for repo in "${!COMMIT[@]}"; do cp "$SRC/$repo/LICENSE" "$OUT/licenses/LICENSE.$repo"; done
sed -n '1,/^$/p' "$SRC/ros2cli/ros2topic/ros2topic/verb/hz.py" > "$OUT/licenses/LICENSE.ros2topic-hz-bw-delay.BSD-3-Clause"
cat > "$OUT/requirements-pypi.txt" <<'EOF'
# Runtime dependencies of the ros2extra wheels that PyPI provides (the ros-kilted-* wheels bring the rest:
# rclpy, ament_index_python, rosidl_parser, lark-parser, PyYAML, numpy, ...)
osrf-pycommon>=2.0
argcomplete
psutil
packaging
pyyaml
EOF
# install.sh takes OUT as its ARTIFACTS_DIR (no copy when rebuilding in place)
[[ $OUT -ef $HERE ]] || cp "$HERE/install.sh" "$OUT/"
du -sh "$OUT/wheels" | sed 's/^/[build_ros2extra] artifacts: /'
