"""Write a trained model as a MobileVLM_V2 checkpoint directory in the published layout.

config.json (model_type mobilevlm, LLaMA fields, mm_* fields), generation_config.json, tokenizer.model with
tokenizer_config.json and special_tokens_map.json, model.safetensors with the published key names (LLaMA under
``model.``/``lm_head``, projector under ``model.mm_projector.``, the whole CLIP tower embedded under
``model.vision_tower.vision_tower.vision_model.``), and the small CLIP directory ``mm_vision_tower`` names, which
gives the loader the vision dimensions.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..model.config import MobileVLMConfig

CLIP_DIR = "clip-vit-tiny"
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."

_SPECIAL = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _token(content: str, added: bool = False) -> dict:
    return ({"__type": "AddedToken"} if added else {}) | {**_SPECIAL, "content": content}


def state_dict(vision, model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, t in vision.tower.state_dict().items():  # the layers MobileVLM reads (see VisionPretrainer)
        tensors[VISION_PREFIX + name] = t
    for name, t in model.mm_projector.state_dict().items():
        tensors["model.mm_projector." + name] = t
    for name, t in model.llm.state_dict().items():
        tensors["lm_head.weight" if name == "lm_head.weight" else "model." + name] = t
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sorted(tensors.items())}


def write_configs(out_dir: Path, config: MobileVLMConfig) -> None:
    llama, vision = config.llama, config.vision
    cfg = {
        "architectures": ["MobileLlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": llama.hidden_size,
        "image_aspect_ratio": "pad", "image_grid_pinpoints": None, "initializer_range": 0.02,
        "intermediate_size": llama.intermediate_size, "max_position_embeddings": llama.max_position_embeddings,
        "mm_hidden_size": config.mm_hidden_size, "mm_projector_lr": None, "mm_projector_type": "ldpnetv2",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": config.vision_select_layer, "mm_vision_tower": CLIP_DIR,
        "model_type": "mobilevlm", "num_attention_heads": llama.num_heads, "num_hidden_layers": llama.num_layers,
        "num_key_value_heads": llama.num_kv_heads, "pad_token_id": 0, "pretraining_tp": 1,
        "rms_norm_eps": llama.rms_norm_eps, "rope_scaling": None, "rope_theta": llama.rope_theta,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.33.1",
        "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "vision_tower_type": "clip",
        "vocab_size": llama.vocab_size,
    }
    _write_json(out_dir / "config.json", cfg)
    _write_json(out_dir / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1,
                                                      "eos_token_id": 2, "pad_token_id": 0,
                                                      "transformers_version": "4.33.1"})
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": _token("<s>"), "eos_token": _token("</s>"),
                                                      "pad_token": "<unk>", "unk_token": _token("<unk>")})
    _write_json(out_dir / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": _token("<s>", True),
        "clean_up_tokenization_spaces": False, "eos_token": _token("</s>", True), "legacy": None,
        "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
        "unk_token": _token("<unk>", True), "use_default_system_prompt": True})
    clip = out_dir / CLIP_DIR
    clip.mkdir(parents=True, exist_ok=True)
    _write_json(clip / "config.json", {
        "architectures": ["CLIPVisionModel"], "attention_dropout": 0.0, "hidden_act": "quick_gelu",
        "hidden_size": vision.hidden_size, "image_size": vision.image_size, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": vision.intermediate_size,
        "layer_norm_eps": vision.layer_norm_eps, "model_type": "clip_vision_model",
        "num_attention_heads": vision.num_heads, "num_channels": 3, "num_hidden_layers": vision.num_layers,
        "patch_size": vision.patch_size, "projection_dim": vision.hidden_size, "torch_dtype": "float32",
        "transformers_version": "4.33.1"})
    _write_json(clip / "preprocessor_config.json", {
        "crop_size": vision.image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": vision.image_size})


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_checkpoint(out_dir: Path, recipe, config: MobileVLMConfig, vision, model: nn.Module,
                      sp_bytes: bytes, timings: dict[str, float]) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(sp_bytes)
    write_configs(out_dir, config)
    save_file(state_dict(vision, model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "training.json", {
        "recipe": asdict(recipe), "command": f"mobilevlm dev train-demo --out DIR --seed {recipe.seed}",
        "torch": torch.__version__, "threads": recipe.threads,
        "timings_s": {k: round(v, 1) for k, v in timings.items()}})
