"""Load a published MobileVLM checkpoint directory into :class:`MobileVLM`.

Tensors are read one at a time (safetensors, or memory-mapped ``torch.load(weights_only=True)``: pickled code is
never executed) and assigned into a model built on the meta device, so peak memory stays near the weights' size.
Which vision weights are used follows the reference loader: projectors with 'v2' in their name keep the tower
embedded in the checkpoint; all others reload it from the CLIP directory named by ``mm_vision_tower``.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from ..options import DTYPES
from .config import MobileVLMConfig, read_clip_vision_config, read_mobilevlm_config
from .errors import CheckpointError
from .mobilevlm import MobileVLM
from .tokenizer import Tokenizer

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
EMBEDDED_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
CLIP_DIR_VISION_PREFIX = "vision_model."
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Keys that published files may carry but that hold nothing this model needs.
_IGNORED_VISION = re.compile(r"^(post_layernorm\.|embeddings\.position_ids$)")
_IGNORED_LLM = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_VISION_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


def expand_path(path: str | Path) -> Path:
    """``~`` and ``$VARS`` in path expanded, as a shell would."""
    return Path(os.path.expanduser(os.path.expandvars(str(path))))


def weight_files(directory: Path) -> list[Path]:
    """The weight shards of a checkpoint directory, safetensors preferred, in a stable order."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(path, f"not a valid shard index: {e!r}") from None
        shards = [directory / shard for shard in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(shard, f"shard listed in {name} is missing")
        return shards
    raise CheckpointError(directory, f"no weights found (looked for {', '.join(WEIGHT_FILES)})")


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one weight file without executing pickled code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
            return
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as e:  # torch and safetensors raise several unrelated types for a damaged file
        raise CheckpointError(path, f"cannot be read (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"expected a state dict, found {type(state).__name__}")
    yield from state.items()


def find_vision_tower_dir(model_dir: Path, name: str, override: str | Path | None) -> Path | None:
    """mm_vision_tower as given, next to the checkpoint, inside it, then relative to the working directory.

    Published configs often name a hub id or a path on the training machine, hence the basename tries.
    """
    if override:
        path = Path(override)
        if not (path / "config.json").is_file():
            raise CheckpointError(path / "config.json", "vision tower override has no config.json")
        return path
    if not name:
        return None
    candidates = [Path(name), model_dir.parent / name, model_dir / name, Path.cwd() / name]
    base = Path(name).name
    candidates += [model_dir.parent / base, model_dir / base]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    return None


def _target_name(key: str, config: MobileVLMConfig, embedded_vision: bool) -> str | None:
    """Our parameter name for a checkpoint key, None for a key that is known and not needed."""
    if key.startswith(EMBEDDED_VISION_PREFIX):
        return _vision_name(key[len(EMBEDDED_VISION_PREFIX):], config) if embedded_vision else None
    if key.startswith("model.mm_projector."):
        return key[len("model."):]
    if _IGNORED_LLM.match(key):
        return None
    if key.startswith("model."):
        return "llm." + key[len("model."):]
    if key == "lm_head.weight":
        return "llm.lm_head.weight"
    return key  # unexpected: reported with its file by the caller


def _vision_name(rest: str, config: MobileVLMConfig) -> str | None:
    if _IGNORED_VISION.match(rest):
        return None
    layer = _VISION_LAYER.match(rest)
    if layer and int(layer.group(1)) >= config.vision_layers_needed:
        return None  # layers after the selected one are never computed
    return "vision_tower." + rest


def load_model(model_dir: str | Path, vision_tower: str | Path | None = None, device: str = "cpu",
               dtype: str | torch.dtype = "float32") -> tuple[MobileVLM, Tokenizer]:
    """The checkpoint in model_dir (``~`` and ``$VARS`` in it and in vision_tower expanded) and its tokenizer."""
    model_dir = expand_path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(model_dir, "model directory not found")
    torch_dtype = TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
    config = read_mobilevlm_config(model_dir / "config.json")
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    # The reference adds an <im_patch> token (and embedding row) unless mm_use_im_patch_token is false.
    vocab = max(config.llama.vocab_size, tokenizer.vocab_size + int(config.use_im_patch_token))
    config = replace(config, llama=replace(config.llama, vocab_size=vocab))

    embedded_vision = "v2" in config.projector_type
    clip_dir = find_vision_tower_dir(model_dir, config.mm_vision_tower, vision_tower and expand_path(vision_tower))
    if clip_dir is not None:
        config = replace(config, vision=read_clip_vision_config(clip_dir / "config.json"))
    elif not embedded_vision:
        raise CheckpointError(model_dir / "config.json",
                              f"vision tower directory {config.mm_vision_tower!r} not found next to the checkpoint, "
                              "inside it or in the working directory; pass the CLIP directory explicitly")
    # else: V2 keeps its embedded tower; without a CLIP directory the ViT-L/14 @336 defaults describe it.

    sources = [(path, "checkpoint", read_tensors(path)) for path in weight_files(model_dir)]
    if not embedded_vision:
        sources += [(path, "clip", read_tensors(path)) for path in weight_files(clip_dir)]
    return build_model(config, sources, device, torch_dtype), tokenizer


def build_model(config: MobileVLMConfig, sources: list[tuple[Path, str, Iterable[tuple[str, torch.Tensor]]]],
                device: str | torch.device, dtype: torch.dtype) -> MobileVLM:
    """Assign checkpoint tensors into a MobileVLM built on the meta device.

    sources: (file, kind, tensors) with kind "checkpoint" (a MobileVLM weight file) or "clip" (a CLIP directory's
    weights, used for the vision tower instead of the checkpoint's embedded copy).
    """
    embedded_vision = all(kind == "checkpoint" for _, kind, _ in sources)
    with torch.device("meta"):
        model = MobileVLM(config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for path, kind, tensors in sources:
        for key, tensor in tensors:
            if kind == "clip":  # a CLIPVisionModel or a whole CLIPModel (its text half is unused)
                name = _vision_name(key[len(CLIP_DIR_VISION_PREFIX):], config) \
                    if key.startswith(CLIP_DIR_VISION_PREFIX) else None
            else:
                name = _target_name(key, config, embedded_vision)
            if name is None:
                continue
            if name not in expected:
                raise CheckpointError(path, f"unexpected key {key!r} for a {config.projector_type} MobileVLM")
            want = expected[name].shape
            if tensor.shape != want:
                hint = (" (mm_use_im_patch_token adds one row: set it to false if the checkpoint has none)"
                        if name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight") else "")
                raise CheckpointError(path, f"shape mismatch for {key!r}: checkpoint {list(tensor.shape)}, "
                                            f"model expects {list(want)}{hint}")
            state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(", ".join(str(path) for path, _, _ in sources), f"missing keys: {shown}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()

