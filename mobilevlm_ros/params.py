"""The node's configuration without ROS: what every parameter means, its default and allowed values, and the
validated :class:`NodeConfig` the serving core is built from."""
from __future__ import annotations

from dataclasses import dataclass

from .server import ServerConfig


@dataclass(frozen=True)
class CameraConfig:
    camera_id: str
    topic: str
    transport: str
    reliability: str


@dataclass(frozen=True)
class NodeConfig:
    model_path: str
    vision_tower: str
    device: str
    dtype: str
    backend: str
    engines_dir: str
    max_seq_len: int
    cameras: tuple[CameraConfig, ...]
    server: ServerConfig
    caption_rate_hz: float
    caption_prompt: str
    caption_cameras: tuple[str, ...]
    caption_max_new_tokens: int
    diagnostics_period_s: float
    build_engines: bool = True
    cuda_graphs: bool = True
    cuda_graph_compile: str = ""
    quantize: str = ""
    onednn: bool = True
    require_manifest: bool = False
    memory_reserve_mb: int = 0
    deactivate_timeout_s: float = 5.0
