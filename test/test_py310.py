"""Python 3.10 compatibility (the robots: Ubuntu 22.04, ROS 2 Humble, Python 3.10), checked two ways:

- vermin (always): no language feature or standard-library name newer than 3.10 anywhere in the package, its
  launchers or its tests;
- a real Python 3.10 where this machine has one (pyenv's, or python3.10 on PATH): every source file compiles, and
  the ROS-free, dependency-free modules import and run (the manifest tool end to end). torch and numpy are not
  installed for it, so modules that need them are compiled, not imported.
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

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mobilevlm_ros"
LAUNCHERS = [ROOT / "scripts" / "mobilevlm_node", ROOT / "deploy" / "mobilevlm_lifecycle_node"]
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "test").glob("*.py")) + \
    [p for p in LAUNCHERS if p.exists()]
STDLIB_ONLY_MODULES = ["mobilevlm_ros.manifest", "mobilevlm_ros.cli.manifest", "mobilevlm_ros.rosenv"]


def python310() -> str | None:
    candidates = sorted(glob.glob("/root/.pyenv/versions/3.10.*/bin/python")) + \
        [p for p in (shutil.which("python3.10"),) if p]
    for candidate in candidates:
        try:
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 10)":  # a pyenv shim without 3.10 fails here
            return candidate
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
        pytest.skip("no Python 3.10 on this machine (vermin still checked the sources)")
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
