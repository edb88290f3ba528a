"""An isolated ROS 2 environment for tests, demos and CI (imports nothing from ROS).

Every ROS process started for a test or a demo must keep its DDS traffic on this machine and away from other
runs: by default DDS discovery multicasts on the machine's network interface and every run shares domain 0.
:func:`isolated_ros_env` returns environment variables that pin discovery to localhost, give each call its own
domain, keep rcl's log files out of ``~/.ros/log`` and pick Fast DDS explicitly. Pass the result as ``env=`` to
``subprocess`` or copy it into ``os.environ`` (before ``rclpy.init``) for the current process.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Mapping

# ROS 2 domain ids 0..101 are valid with every RMW on Linux (Fast DDS derives its UDP ports from the id). 0 is
# everyone's default, so calls get 1..101.
DOMAIN_ID_MIN = 1
DOMAIN_ID_MAX = 101

_calls = itertools.count()

# Distributions whose Fast DDS (2.x) reads FASTRTPS_DEFAULT_PROFILES_FILE; later ones read FASTDDS_...
_FAST_DDS_2_DISTROS = ("foxy", "galactic", "humble", "iron", "jazzy")
# Distributions with ROS_AUTOMATIC_DISCOVERY_RANGE, where ROS_LOCALHOST_ONLY is left out: Jazzy still honours it,
# overriding the range, and logs two deprecation warnings in every process (into every ros2 command's output);
# Kilted ignores it.
_DISCOVERY_RANGE_DISTROS = ("jazzy", "kilted", "lyrical", "rolling")

# Fast DDS sends a new participant's first announcements (its discovery "hello") 5 times at 100 ms by default; a
# busy 2-core machine starting several ROS processes at once then often misses them and discovery waits for the
# next periodic announcement (seconds). 30 announcements at 100 ms cut that tail.
FAST_DISCOVERY_PROFILE = """\
<?xml version="1.0" encoding="UTF-8" ?>
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <participant profile_name="mobilevlm_ros_fast_discovery" is_default_profile="true">
      <rtps>
        <builtin>
          <discovery_config>
            <initialAnnouncements>
              <count>30</count>
              <period>
                <sec>0</sec>
                <nanosec>100000000</nanosec>
              </period>
            </initialAnnouncements>
          </discovery_config>
        </builtin>
      </rtps>
    </participant>
  </profiles>
</dds>
"""


def next_domain_id() -> int:
    """A ROS_DOMAIN_ID in DOMAIN_ID_MIN..DOMAIN_ID_MAX, different for each call of this process.

    Derived from the process id and a per-process counter, so that concurrent test processes most likely differ
    too; discovery is pinned to localhost anyway, so a rare clash only mixes two local runs' graphs.
    """
    span = DOMAIN_ID_MAX - DOMAIN_ID_MIN + 1
    return DOMAIN_ID_MIN + (os.getpid() * 37 + next(_calls)) % span


def isolated_ros_env(
    base: Mapping[str, str] | None = None,
    *,
    tmp_dir: str | os.PathLike[str] | None = None,
    fast_discovery: bool = True,
) -> dict[str, str]:
    """Return a copy of ``base`` (default: ``os.environ``) set up for an isolated, local-only ROS 2 run.

    - ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` (Jazzy and later) and, unless ``ROS_DISTRO`` names one of those,
      ``ROS_LOCALHOST_ONLY=1`` (Humble), with ``ROS_STATIC_PEERS`` cleared: no discovery traffic leaves the machine.
    - ``ROS_DOMAIN_ID`` from :func:`next_domain_id`: a unique domain per call, so parallel runs do not see each
      other's nodes, services and topics.
    - ``ROS_LOG_DIR`` in a temporary directory (``tmp_dir`` if given, else a new one): rcl would otherwise write a
      log file per process under ``~/.ros/log``.
    - ``RMW_IMPLEMENTATION=rmw_fastrtps_cpp``: the RMW that the wheels ship and these settings were checked with.
    - With ``fast_discovery``, a Fast DDS XML profile (:data:`FAST_DISCOVERY_PROFILE`) written to that directory
      and named by ``FASTRTPS_DEFAULT_PROFILES_FILE`` where ``ROS_DISTRO`` is humble, iron or jazzy (Fast DDS 2),
      else by ``FASTDDS_DEFAULT_PROFILES_FILE`` (Fast DDS 3: Kilted, which warns about the old name; also where no
      ROS_DISTRO is set, as with PyPI's wheels outside scripts/setup_ros.sh's venvs). Without it, both variables are
      removed.

    The directory is not removed: pass ``tmp_dir`` (e.g. pytest's ``tmp_path``) to have it cleaned up for you.
    """
    env = dict(os.environ if base is None else base)
    directory = (
        os.fspath(tmp_dir) if tmp_dir is not None else tempfile.mkdtemp(prefix="mobilevlm_ros_env_")
    )
    log_dir = os.path.join(directory, "ros_log")
    os.makedirs(log_dir, exist_ok=True)
    env.update(
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_STATIC_PEERS="",
        ROS_DOMAIN_ID=str(next_domain_id()),
        ROS_LOG_DIR=log_dir,
        RMW_IMPLEMENTATION="rmw_fastrtps_cpp",
    )
    if env.get("ROS_DISTRO", "").lower() in _DISCOVERY_RANGE_DISTROS:
        env.pop("ROS_LOCALHOST_ONLY", None)
    else:
        env["ROS_LOCALHOST_ONLY"] = "1"
    for name in ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE"):
        env.pop(name, None)
    if fast_discovery:
        profile = os.path.join(directory, "fastdds_fast_discovery.xml")
        with open(profile, "w", encoding="utf-8") as f:
            f.write(FAST_DISCOVERY_PROFILE)
        fast_dds_2 = env.get("ROS_DISTRO", "").lower() in _FAST_DDS_2_DISTROS
        env["FASTRTPS_DEFAULT_PROFILES_FILE" if fast_dds_2 else "FASTDDS_DEFAULT_PROFILES_FILE"] = profile
    return env
