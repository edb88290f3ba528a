"""Real-shaped MobileVLM models with seeded random weights (no download), and the same weights for baselines.

Every tensor is drawn from its own generator seeded by sha256(seed/name), so any process (ours, the Hugging Face
baseline, the GGUF writer) can rebuild exactly the same weights one tensor at a time without a file in between.
Distributions follow the reference fixtures' README: matrices N(0,1)/sqrt(fan_in), norm gains 1+0.1 N(0,1),
biases 0.05 N(0,1), embeddings N(0,1) (CLIP's class/position embeddings 0.5 N(0,1)).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..model.config import LlamaConfig, MobileVLMConfig, VisionConfig
from ..model.mobilevlm import MobileVLM

MOBILELLAMA_1_4B = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16, num_kv_heads=16)
MOBILELLAMA_2_7B = LlamaConfig(hidden_size=2560, intermediate_size=6912, num_layers=32, num_heads=32, num_kv_heads=32)
REAL_MODELS = {
    "MobileVLM-1.7B": (MOBILELLAMA_1_4B, "ldpnet"),
    "MobileVLM_V2-1.7B": (MOBILELLAMA_1_4B, "ldpnetv2"),
    "MobileVLM-3B": (MOBILELLAMA_2_7B, "ldpnet"),
}


def real_config(name: str, llm_layers: int | None = None, vision_layers: int | None = None) -> MobileVLMConfig:
    """The published model's config; llm_layers / vision_layers shrink the depth (for fast tests) only."""
    llama, projector = REAL_MODELS[name]
    if llm_layers is not None:
        llama = LlamaConfig(**{**llama.__dict__, "num_layers": llm_layers})
    vision = VisionConfig() if vision_layers is None else VisionConfig(num_layers=vision_layers)
    return MobileVLMConfig(llama=llama, vision=vision, projector_type=projector, mm_hidden_size=vision.hidden_size,
                           image_aspect_ratio="pad", use_im_patch_token=False)


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def init_tensor(name: str, shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The seeded random value of one parameter, by its name (the distribution depends on the name)."""
    g = torch.Generator().manual_seed(_seed(seed, name))
    x = torch.randn(shape, generator=g)  # scaled in place: no second copy of the largest tensors
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and ("norm" in name or "layrnorm" in name or name.endswith("block.0.1.weight")
                            or name.endswith("block.2.1.weight")) and leaf == "weight":
        x.mul_(0.1).add_(1)
    elif leaf == "bias":
        x.mul_(0.05)
    elif "class_embedding" in name or "position_embedding" in name:
        x.mul_(0.5)
    elif "embed_tokens" not in name:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        x.mul_(1 / fan_in ** 0.5)
    return x.to(dtype)


def our_named_shapes(model: nn.Module) -> Iterator[tuple[str, tuple[int, ...]]]:
    for name, t in model.state_dict().items():
        yield name, tuple(t.shape)


def random_mobilevlm(config: MobileVLMConfig, dtype: torch.dtype = torch.float32, seed: int = 0,
                     quant: str | None = None, groupsize: int = 32, vision: bool = True,
                     vision_dtype: torch.dtype | None = None, llm: bool = True) -> MobileVLM:
    """Build the model on the meta device and materialise one tensor at a time (quantising Linear layers of the
    decoder as they are made), so peak memory stays near the final weights' size. vision=False leaves the vision
    tower and projector on the meta device (decoder-only benchmarks), llm=False the decoder."""
    from ..model.quantize import fuse_shared_inputs, quantize_linear
    from ..model.swap import return_freed_memory

    with torch.device("meta"):
        model = MobileVLM(config)
    vdtype = vision_dtype or (dtype if quant is None else torch.float32)
    for mod_name, module in list(model.named_modules()):
        is_llm = mod_name == "llm" or mod_name.startswith("llm.")
        if (not is_llm and not vision) or (is_llm and not llm):
            continue
        if quant is not None and is_llm and isinstance(module, nn.Linear):
            w = init_tensor(f"{mod_name}.weight", tuple(module.weight.shape), seed)
            lin = nn.Linear(module.in_features, module.out_features, bias=False)
            lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
            parent_name, leaf = mod_name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), leaf, quantize_linear(lin, quant, groupsize))
            del lin, w
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            value = init_tensor(full, tuple(p.shape), seed, dtype if is_llm else vdtype)
            setattr(module, pname, nn.Parameter(value, requires_grad=False))
    if quant is not None:
        fuse_shared_inputs(model.llm)  # as quantize_llm does (int8-dynamic)
        return_freed_memory()  # as quantize_llm does: the float weights just quantised
    return model.eval()


def hf_llama_state(config: MobileVLMConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                   ) -> Iterator[tuple[str, Tensor]]:
    """Our decoder's weights under Hugging Face LlamaForCausalLM names."""
    with torch.device("meta"):
        model = MobileVLM(config)
    for name, shape in our_named_shapes(model.llm):
        value = init_tensor(f"llm.{name}", shape, seed, dtype)
        yield (name if name == "lm_head.weight" else f"model.{name}"), value


def hf_clip_state(config: MobileVLMConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                  ) -> Iterator[tuple[str, Tensor]]:
    """Our vision tower's weights under CLIPVisionModel names, plus the layers after the selected one and
    post_layernorm (which the reference computes or holds but never uses) drawn the same way."""
    v = config.vision
    with torch.device("meta"):
        full = MobileVLM(MobileVLMConfig(**{**config.__dict__, "vision_select_layer": -1}))
    for name, shape in our_named_shapes(full.vision_tower):
        yield f"vision_model.{name}", init_tensor(f"vision_tower.{name}", shape, seed, dtype)
    for leaf in ("weight", "bias"):
        yield f"vision_model.post_layernorm.{leaf}", init_tensor(f"vision_tower.post_layernorm.{leaf}",
                                                                 (v.hidden_size,), seed, dtype)


def random_projector(config: MobileVLMConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The projector alone, with the same seeded weights as ``random_mobilevlm``'s."""
    from ..model.projector import build_projector

    with torch.device("meta"):
        projector = build_projector(config)
    for mod_name, module in list(projector.named_modules()):
        for pname, p in list(module.named_parameters(recurse=False)):
            full = ".".join(x for x in ("mm_projector", mod_name, pname) if x)
            setattr(module, pname, nn.Parameter(init_tensor(full, tuple(p.shape), seed, dtype), requires_grad=False))
    return projector.eval()


def write_checkpoint(config: MobileVLMConfig, out_dir, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """The seeded model as a MobileVLM_V2 checkpoint directory in the published layout (train/export.py's: config
    files, the CLIP directory config.json names, the whole CLIP tower embedded in model.safetensors), with the
    bundled demo model's tokenizer (the benchmark's prompts; ids past its 512 pieces are never text), for the node.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    from ..train.export import VISION_PREFIX, write_configs

    if config.projector_type != "ldpnetv2":
        raise ValueError("the published layout written here is MobileVLM_V2's (ldpnetv2 projector, CLIP tower "
                         "embedded); V1 checkpoints keep the tower in a separate CLIP directory")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {VISION_PREFIX + name.removeprefix("vision_model."): t.to(dtype)
               for name, t in hf_clip_state(config, seed)}
    tensors.update({"model.mm_projector." + name: t.to(dtype)
                    for name, t in random_projector(config, seed=seed).state_dict().items()})
    tensors.update({name: t.to(dtype) for name, t in hf_llama_state(config, seed)})
    demo = Path(__file__).resolve().parent.parent / "demo_model" / "tokenizer.model"
    (out_dir / "tokenizer.model").write_bytes(demo.read_bytes())
    write_configs(out_dir, config)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
