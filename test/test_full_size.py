"""Every published parameter name and shape of the real MobileVLM-1.7B / V2-1.7B / 3B is accepted by the loader.

The published key list is written out here from the Hugging Face names (MODEL_SPEC.md), independent of the model
code, and fed to the loader as meta tensors: no 3 GB download, no memory.
"""
from __future__ import annotations

import pytest
import torch

from mobilevlm_ros.model.config import LlamaConfig, MobileVLMConfig, VisionConfig
from mobilevlm_ros.model.errors import CheckpointError
from mobilevlm_ros.model.loader import build_model

LLAMA_1_4B = dict(hidden=2048, mlp=5632, layers=24)
LLAMA_2_7B = dict(hidden=2560, mlp=6912, layers=32)


def llama_keys(hidden: int, mlp: int, layers: int, vocab: int = 32000) -> dict[str, list[int]]:
    keys = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden],
            "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys.update({p + f"self_attn.{n}_proj.weight": [hidden, hidden] for n in "qkvo"})
        keys.update({p + "mlp.gate_proj.weight": [mlp, hidden], p + "mlp.up_proj.weight": [mlp, hidden],
                     p + "mlp.down_proj.weight": [hidden, mlp], p + "input_layernorm.weight": [hidden],
                     p + "post_attention_layernorm.weight": [hidden]})
    return keys


def clip_vit_l_keys(prefix: str) -> dict[str, list[int]]:
    d, keys = 1024, {}
    keys.update({prefix + "embeddings.class_embedding": [d], prefix + "embeddings.patch_embedding.weight":
                 [d, 3, 14, 14], prefix + "embeddings.position_embedding.weight": [577, d]})
    for name in ("pre_layrnorm", "post_layernorm"):
        keys.update({prefix + f"{name}.weight": [d], prefix + f"{name}.bias": [d]})
    for i in range(24):
        p = prefix + f"encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            keys.update({p + f"self_attn.{n}_proj.weight": [d, d], p + f"self_attn.{n}_proj.bias": [d]})
        for n in ("layer_norm1", "layer_norm2"):
            keys.update({p + f"{n}.weight": [d], p + f"{n}.bias": [d]})
        keys.update({p + "mlp.fc1.weight": [4096, d], p + "mlp.fc1.bias": [4096],
                     p + "mlp.fc2.weight": [d, 4096], p + "mlp.fc2.bias": [d]})
    return keys


def projector_keys(kind: str, h: int) -> dict[str, list[int]]:
    if kind == "ldpnetv2":
        p = "model.mm_projector."
        return {p + "mlp.mlp.0.weight": [h, 1024], p + "mlp.mlp.0.bias": [h], p + "mlp.mlp.2.weight": [h, h],
                p + "mlp.mlp.2.bias": [h], p + "peg.peg.0.weight": [h, 1, 3, 3], p + "peg.peg.0.bias": [h]}
    p, keys = "model.mm_projector.model.", {}
    keys.update({p + "mlp.1.weight": [h, 1024], p + "mlp.1.bias": [h], p + "mlp.3.weight": [h, h],
                 p + "mlp.3.bias": [h]})
    for b in (1, 2):
        q = p + f"mb_block.{b}.block."
        keys.update({q + "0.0.weight": [h, 1, 3, 3], q + "0.1.weight": [h], q + "0.1.bias": [h],
                     q + "1.fc1.weight": [h // 4, h, 1, 1], q + "1.fc1.bias": [h // 4],
                     q + "1.fc2.weight": [h, h // 4, 1, 1], q + "1.fc2.bias": [h],
                     q + "2.0.weight": [h, h, 1, 1], q + "2.1.weight": [h], q + "2.1.bias": [h]})
    return keys


def meta_tensors(keys: dict[str, list[int]]):
    return [(k, torch.empty(shape, device="meta")) for k, shape in keys.items()]


def config_for(kind: str, llama: dict) -> MobileVLMConfig:
    heads = llama["hidden"] // (128 if llama["hidden"] == 2048 else 80)
    return MobileVLMConfig(
        llama=LlamaConfig(vocab_size=32000, hidden_size=llama["hidden"], intermediate_size=llama["mlp"],
                          num_layers=llama["layers"], num_heads=heads, num_kv_heads=heads),
        vision=VisionConfig(), projector_type=kind, mm_hidden_size=1024, image_aspect_ratio="pad",
        use_im_patch_token=False)


@pytest.mark.parametrize("name,kind,llama", [
    ("MobileVLM-1.7B", "ldpnet", LLAMA_1_4B), ("MobileVLM_V2-1.7B", "ldpnetv2", LLAMA_1_4B),
    ("MobileVLM-3B", "ldpnet", LLAMA_2_7B), ("MobileVLM_V2-3B", "ldpnetv2", LLAMA_2_7B),
])
def test_published_names_and_shapes_are_accepted(name, kind, llama):
    h = llama["hidden"]
    checkpoint = {**llama_keys(**llama), **clip_vit_l_keys("model.vision_tower.vision_tower.vision_model."),
                  **projector_keys(kind, h)}
    if name == "MobileVLM_V2-1.7B":
        assert len(checkpoint) == 616  # the published file's tensor count
    sources = [("pytorch_model.bin", "checkpoint", meta_tensors(checkpoint))]
    if kind == "ldpnet":  # V1 reloads the tower from the CLIP directory: a whole CLIPModel, text half unused
        clip = {**clip_vit_l_keys("vision_model."), "text_model.embeddings.token_embedding.weight": [49408, 768],
                "logit_scale": [], "visual_projection.weight": [768, 1024]}
        sources.append(("clip-vit-large-patch14-336/pytorch_model.bin", "clip", meta_tensors(clip)))
    model = build_model(config_for(kind, llama), sources, "meta", torch.float16)
    assert len(model.vision_tower.encoder.layers) == 23  # layer 24 and post_layernorm are never built
    params = sum(p.numel() for p in model.parameters())
    llm = sum(p.numel() for p in model.llm.parameters())
    assert llm == sum(torch.Size(s).numel() for s in llama_keys(**llama).values())
    assert params > llm  # and the tower (up to layer 23) and the projector came along
    with torch.device("meta"):
        out = model.encode_images(torch.empty(1, 3, 336, 336, dtype=torch.float16))
    assert list(out.shape) == [1, 144, h]


def test_wrong_full_size_shape_is_named():
    keys = {**llama_keys(**LLAMA_1_4B), **clip_vit_l_keys("model.vision_tower.vision_tower.vision_model."),
            **projector_keys("ldpnetv2", 2048)}
    keys["model.layers.7.mlp.up_proj.weight"] = [5632, 2560]
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model.layers.7.mlp.up_proj.weight': "
                                              r"checkpoint \[5632, 2560\], model expects \[5632, 2048\]"):
        build_model(config_for("ldpnetv2", LLAMA_1_4B),
                    [("pytorch_model.bin", "checkpoint", meta_tensors(keys))], "meta", torch.float16)
