"""What the tests need from the install, in one place: outside CI a missing piece skips the tests that need it (a
developer without ROS can still run the rest); in CI (``CI=true``, as .ci/run runs) it is a failure, because there
scripts/setup.sh has installed everything and a missing piece means a broken install, which a skip would hide.

Only what scripts/setup.sh installs goes through here (rclpy and the ROS 2 interfaces, onnx and onnxruntime,
pyright and the TensorRT stubs, Python 3.10 found on the machine; `scripts/setup.sh jazzy` installs the same for the
ROS test files, test/ros_test_files.txt, on Jazzy: there too nothing of theirs skips in CI). What no install step can provide (a CUDA GPU,
TensorRT, an x86 CPU for oneDNN, the bench extra) stays a plain skip.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import pytest

CI_VALUES = ("1", "true", "yes")


def in_ci() -> bool:
    """True when the CI environment variable says so (GitHub Actions, GitLab and this project's CI set CI=true)."""
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def missing(what: str, remedy: str = "bash scripts/setup.sh installs it") -> None:
    """Report a missing requirement: skip outside CI, fail in CI. Works in a test, a fixture or at module level."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: a missing requirement is a broken install, not a skip; {remedy})",
                    pytrace=False)
    pytest.skip(f"{what} ({remedy})", allow_module_level=True)


def require_module(name: str, why: str = ""):
    """Import and return module ``name``; when it cannot be imported, :func:`missing` (skip, or fail in CI).

    The replacement for ``pytest.importorskip`` for everything setup.sh installs."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing(f"cannot import {name}{f' ({why})' if why else ''}: {error}")


def needs_modules(*names: str, why: str = ""):
    """A decorator for tests that need modules ``names`` (for files that run other tests without them):
    outside CI a skip mark when one is missing; in CI the test fails, naming the module."""
    absent = [name for name in names if importlib.util.find_spec(name) is None]
    if not absent:
        return lambda test: test
    what = f"cannot import {', '.join(absent)}{f' ({why})' if why else ''}"
    if not in_ci():
        return pytest.mark.skip(reason=f"{what} (bash scripts/setup.sh installs it)")

    def decorate(test):
        @functools.wraps(test)  # keeps the signature, so pytest still resolves the test's fixtures
        def fail(*args, **kwargs):
            missing(what)
        return fail
    return decorate
