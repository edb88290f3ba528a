"""Python 3.10 compatibility (the robots: Ubuntu 22.04, ROS 2 Humble, Python 3.10), checked two ways:

- vermin (always): no language feature or standard-library name newer than 3.10 anywhere in the package, its
  launchers or its tests;
- a real Python 3.10: every source file compiles, and the ROS-free, dependency-free modules import and run (the
  manifest tool end to end). torch and numpy are not installed for it, so modules that need them are compiled, not
  imported. It is found without a machine-specific path: $PYTHON310 if set, else python3.10 on PATH, else pyenv's
  (under $PYENV_ROOT, `pyenv root`, or ~/.pyenv). Without one these tests skip, and fail under CI
  (test/requirements.py).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CHECKPOINTS
from requirements import missing

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mobilevlm_ros"
LAUNCHERS = [ROOT / "scripts" / "mobilevlm_node", ROOT / "deploy" / "mobilevlm_lifecycle_node"]
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "test").rglob("*.py")) + \
    [p for p in LAUNCHERS if p.exists()]
STDLIB_ONLY_MODULES = ["mobilevlm_ros.manifest", "mobilevlm_ros.cli.manifest", "mobilevlm_ros.rosenv"]


def _pyenv_root() -> str:
    root = os.environ.get("PYENV_ROOT")
    if not root and shutil.which("pyenv"):
        try:
            root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            root = None
    return root or os.path.expanduser("~/.pyenv")


def python310_candidates() -> list[str]:
    """Where a Python 3.10 may be, most explicit first. (A pyenv shim on PATH fails unless 3.10 is selected, so
    pyenv's installed versions are listed too.)"""
    candidates = [os.environ.get("PYTHON310", ""), shutil.which("python3.10") or ""]
    candidates += sorted(glob.glob(os.path.join(_pyenv_root(), "versions", "3.10.*", "bin", "python3.10")),
                         reverse=True)
    return [c for c in candidates if c]


def python310() -> str | None:
    """The first candidate that really is CPython 3.10 (PYTHON310, when set, must be one)."""
    for candidate in python310_candidates():
        try:
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip() == "(3, 10)":
            return candidate
        # a pyenv shim without 3.10 selected fails here; an explicit choice that is not 3.10 is a mistake
        assert candidate != os.environ.get("PYTHON310"), f"PYTHON310={candidate} is not a working Python 3.10"
    return None


def run310(python: str, code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1")
    return subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


VERMIN = [sys.executable, "-c", "import sys; from vermin import main; sys.argv[0] = 'vermin'; sys.exit(main())"]


def test_vermin_finds_nothing_newer_than_310():
    out = subprocess.run([*VERMIN, "-t=3.10-", "--violations", "--no-tips",
                          "--eval-annotations", *map(str, SOURCES)], capture_output=True, text=True)
    assert "No module named 'vermin'" not in out.stderr, "vermin is missing: bash scripts/setup.sh installs it"
    assert out.returncode == 0, out.stdout + out.stderr


def test_vermin_would_catch_311_code(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import tomllib\n")
    out = subprocess.run([*VERMIN, "-t=3.10-", "--violations", "--no-tips", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "tomllib" in out.stdout


@pytest.fixture(scope="module")
def py310():
    python = python310()
    if python is None:
        missing(f"no Python 3.10 found (tried {python310_candidates() or 'nothing'}; vermin still checked the "
                "sources)", "install one, e.g. pyenv install 3.10, or set PYTHON310 to its path")
    return python


def test_every_source_compiles_under_310(py310):
    code = ("import sys\nbad = []\nfor path in sys.argv[1:]:\n    try:\n"
            "        compile(open(path, encoding='utf-8').read(), path, 'exec')\n"
            "    except SyntaxError as e:\n        bad.append(f'{path}:{e.lineno}: {e.msg}')\n"
            "print('\\n'.join(bad))\nsys.exit(1 if bad else 0)\n")
    out = run310(py310, code, *map(str, SOURCES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(SOURCES) > 50


def test_ros_free_modules_import_and_run_under_310(py310, tmp_path):
    out = run310(py310, "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
                        "print(sys.version_info[:2])", *STDLIB_ONLY_MODULES)
    assert out.returncode == 0 and out.stdout.strip() == "(3, 10)", out.stderr
    model = tmp_path / "model"
    shutil.copytree(CHECKPOINTS / "MobileVLM_V2-tiny", model)
    cli = "import sys\nfrom mobilevlm_ros.cli.manifest import main\nsys.exit(main(sys.argv[1:]))"
    assert run310(py310, cli, "write", str(model)).returncode == 0
    checked = run310(py310, cli, "check", str(model))
    assert checked.returncode == 0 and '"ok": true' in checked.stdout, checked.stderr
    (model / "tokenizer.model").write_bytes(b"truncated")
    broken = run310(py310, cli, "check", str(model))
    assert broken.returncode == 1 and "tokenizer.model: size 9 bytes" in broken.stderr
