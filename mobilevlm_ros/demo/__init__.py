"""The bundled demo: a small MobileVLM trained on procedurally generated road scenes, shipped with the package.

``DEFAULT_MODEL_DIR`` is the checkpoint the node and ``mobilevlm ask`` use when no model is given. It is an
ordinary MobileVLM checkpoint directory (published V2 layout) and loads through the same loader as real weights.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"

__all__ = ["DEFAULT_MODEL_DIR"]
