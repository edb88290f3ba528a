from __future__ import annotations

import json
from pathlib import Path

import pytest

REFERENCE = Path(__file__).parent / "data" / "reference"
CHECKPOINTS = REFERENCE / "checkpoints"
CHECKPOINT_NAMES = ("MobileVLM-tiny-v1", "MobileVLM_V2-tiny")


def golden_cases(checkpoint: str) -> list[dict]:
    return json.loads((REFERENCE / "goldens" / checkpoint / "cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def pipelines():
    """Both reference checkpoints loaded once per session (float32, CPU) with the defaults the node uses (oneDNN
    layers and the compiled decode step on x86). Shared by many test files: tests run them and read them, never
    change them (a test that needs another layout or vision encoder loads its own)."""
    from mobilevlm_ros.model import MobileVLMPipeline

    return {name: MobileVLMPipeline.load(CHECKPOINTS / name) for name in CHECKPOINT_NAMES}
