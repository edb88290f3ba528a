"""The demo command's core path end to end: bag of generated scenes, node process, replay, service and action."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("rclpy")

from conftest import CHECKPOINTS  # noqa: E402
from mobilevlm_ros.demo import DEFAULT_MODEL_DIR  # noqa: E402


def test_demo_runs_end_to_end(tmp_path):
    # The bundled model once it is shipped; the reference checkpoint exercises the same path until then.
    model = DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").is_file() else CHECKPOINTS / "MobileVLM_V2-tiny"
    proc = subprocess.run([sys.executable, "-m", "mobilevlm_ros.demo.run", "--model", str(model), "--out",
                           str(tmp_path), "--scenes", "2", "--seconds-per-scene", "3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("[scene 0]") == 3 and out.count("[scene 1]") == 3
    assert out.count("(service;") == 4 and out.count("(action,") == 2
    assert "captions published on /demo/caption:" in out and "answers match the ground truth" in out
    assert (tmp_path / "scene_0.png").is_file() and (tmp_path / "scene_1.png").is_file()
    assert (tmp_path / "demo_bag" / "metadata.yaml").is_file()
