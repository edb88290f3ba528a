"""The demo command's core path end to end: bag of generated scenes, node process, replay, service and action."""
from __future__ import annotations

import re
import subprocess
import sys

from requirements import require_module

require_module("rclpy")


def test_demo_runs_end_to_end(tmp_path):
    # As README runs it: no --model, so the node loads the bundled demo model.
    proc = subprocess.run([sys.executable, "-m", "mobilevlm_ros.demo.run", "--out", str(tmp_path),
                           "--scenes", "2", "--seconds-per-scene", "3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("[scene 0]") == 3 and out.count("[scene 1]") == 3
    assert out.count("(service;") == 4 and out.count("(action,") == 2
    assert "captions published on /demo/caption:" in out
    score = re.search(r"(\d+)/(\d+) answers match the ground truth", out)
    assert score is not None, out
    assert int(score[1]) >= int(score[2]) - 1, out  # the model is right on 95%+ of held-out questions
    assert (tmp_path / "scene_0.png").is_file() and (tmp_path / "scene_1.png").is_file()
    assert (tmp_path / "demo_bag" / "metadata.yaml").is_file()
