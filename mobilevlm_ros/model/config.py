"""The model configuration, read from a published MobileVLM checkpoint's config.json.

Missing mm_* fields get the reference code's defaults (mobilevlm/model/*.py reads them with getattr), so a
checkpoint behaves here exactly as it does under the authors' loader.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

PROJECTOR_TYPES = ("ldpnet", "ldpnetv2", "linear")  # plus mlp{N}x_gelu
MLP_GELU_PROJECTOR = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


LDP_V2_GRID = 12  # LDP v2's AdaptiveAvgPool2d((12, 12)): 144 visual tokens whatever the patch grid


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP ViT as in Hugging Face's CLIPVisionConfig (ViT-L/14 @336 by default)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class MobileVLMConfig:
    llama: LlamaConfig
    vision: VisionConfig
    projector_type: str = "linear"
    mm_hidden_size: int = 1024
    vision_select_layer: int = -2
    vision_select_feature: str = "patch"
    image_aspect_ratio: str | None = None  # None: resize + centre-crop, as the reference when the field is absent
    use_im_patch_token: bool = True
    mm_vision_tower: str = ""

    @property
    def vision_layers_needed(self) -> int:
        """How many encoder layers produce hidden_states[select_layer] (hidden_states[0] is the embeddings)."""
        return self.vision_select_layer % (self.vision.num_layers + 1)

    @property
    def image_tokens(self) -> int:
        """Visual tokens the projector hands the decoder: LDP v1 halves the patch grid in each direction (a stride-2
        conv), LDP v2 pools it to 12 x 12 whatever its size."""
        if self.projector_type == "ldpnetv2":
            return LDP_V2_GRID * LDP_V2_GRID
        patches = self.vision.num_patches + (1 if self.vision_select_feature == "cls_patch" else 0)
        return patches // 4 if self.projector_type == "ldpnet" else patches


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON: {e}") from None


def _field(cfg: dict, path: Path, name: str, kind: type, default=None):
    value = cfg.get(name, default)
    if value is None and default is None:
        raise CheckpointError(path, f"required field '{name}' is missing")
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(path, f"field '{name}' must be {kind.__name__}, got {value!r}")
    return value


def read_mobilevlm_config(path: Path) -> MobileVLMConfig:
    path = Path(path)
    cfg = _read_json(path)
    if cfg.get("vision_tower_type", "clip") != "clip":
        raise CheckpointError(path, f"unknown vision_tower_type {cfg['vision_tower_type']!r} (only 'clip' exists)")
    projector_type = cfg.get("mm_projector_type", "linear")
    if projector_type not in PROJECTOR_TYPES and not MLP_GELU_PROJECTOR.match(str(projector_type)):
        raise CheckpointError(path, f"unknown mm_projector_type {projector_type!r} "
                                    f"(known: {', '.join(PROJECTOR_TYPES)}, mlp<N>x_gelu)")
    if cfg.get("mm_use_im_start_end", False):
        raise CheckpointError(path, "mm_use_im_start_end=true is not supported (no published MobileVLM uses it)")
    select_feature = cfg.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise CheckpointError(path, f"unknown mm_vision_select_feature {select_feature!r}")
    if projector_type in ("ldpnet", "ldpnetv2") and select_feature != "patch":
        raise CheckpointError(path, f"{projector_type} needs mm_vision_select_feature 'patch' (a square token grid)")
    heads = _field(cfg, path, "num_attention_heads", int)
    llama = LlamaConfig(
        vocab_size=_field(cfg, path, "vocab_size", int),
        hidden_size=_field(cfg, path, "hidden_size", int),
        intermediate_size=_field(cfg, path, "intermediate_size", int),
        num_layers=_field(cfg, path, "num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=_field(cfg, path, "num_key_value_heads", int, heads),
        rms_norm_eps=_field(cfg, path, "rms_norm_eps", float, 1e-6),
        rope_theta=_field(cfg, path, "rope_theta", float, 10000.0),
        max_position_embeddings=_field(cfg, path, "max_position_embeddings", int, 2048),
    )
    if cfg.get("rope_scaling"):
        raise CheckpointError(path, f"rope_scaling {cfg['rope_scaling']!r} is not supported")
    if llama.hidden_size % llama.num_heads or llama.num_heads % llama.num_kv_heads:
        raise CheckpointError(path, "hidden_size, num_attention_heads and num_key_value_heads do not divide evenly")
    return MobileVLMConfig(
        llama=llama,
        vision=VisionConfig(),  # replaced by the CLIP directory's own config when the loader finds one
        projector_type=projector_type,
        mm_hidden_size=_field(cfg, path, "mm_hidden_size", int),
        vision_select_layer=_field(cfg, path, "mm_vision_select_layer", int, -2),
        vision_select_feature=select_feature,
        image_aspect_ratio=cfg.get("image_aspect_ratio"),
        use_im_patch_token=bool(cfg.get("mm_use_im_patch_token", True)),
        mm_vision_tower=str(cfg.get("mm_vision_tower", "")),
    )


def read_clip_vision_config(path: Path) -> VisionConfig:
    """config.json of a CLIP directory: a CLIPVisionModel config or a full CLIPModel config (vision_config)."""
    path = Path(path)
    cfg = _read_json(path)
    cfg = cfg.get("vision_config", cfg)
    if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(path, f"hidden_act {cfg['hidden_act']!r} is not supported (CLIP uses quick_gelu)")
    return VisionConfig(
        hidden_size=_field(cfg, path, "hidden_size", int, 1024),
        intermediate_size=_field(cfg, path, "intermediate_size", int, 4096),
        num_layers=_field(cfg, path, "num_hidden_layers", int, 24),
        num_heads=_field(cfg, path, "num_attention_heads", int, 16),
        image_size=_field(cfg, path, "image_size", int, 336),
        patch_size=_field(cfg, path, "patch_size", int, 14),
        layer_norm_eps=_field(cfg, path, "layer_norm_eps", float, 1e-5),
    )
