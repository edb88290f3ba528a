"""Training-only modules around the inference model: the vision tower's pretraining heads and LoRA.

The trained parameters live in the very modules inference uses (``model.clip.CLIPVisionTower``,
``model.projector``, ``model.llama.MobileLlama``), so what is saved is exactly what the loader reads back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.clip import CLIPVisionTower
from ..model.config import VisionConfig
from .data import ATTRS, NUM_CLASSES


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """LLaMA / CLIP style: normal(0, std) matrices and embeddings, zero biases, unit norm gains."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("class_embedding"):
            nn.init.normal_(p, std=std)


def sincos_2d(grid: int, dim: int) -> Tensor:
    """[grid * grid, dim] fixed 2-D sine-cosine embeddings, rows in row-major patch order."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out = [f(c.reshape(-1, 1) * omega) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    emb = torch.cat(out, dim=1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1])).float()


class VisionPretrainer(nn.Module):
    """The CLIP ViT tower MobileVLM reads (layers up to ``select_layer``) with dense pretraining heads.

    Stands in for CLIP's web-scale contrastive pretraining, which a demo cannot afford: the generator's ground
    truth supervises the patch tokens MobileVLM takes (hidden_states[select_layer]) directly: the class and the
    attribute (colour, light state) covering each patch, and the patches holding an object's centre. The layers
    after the selected one (and post_layernorm) never influence MobileVLM, so they are neither trained nor shipped.
    """

    def __init__(self, config: VisionConfig, select_layer: int):
        super().__init__()
        self.config = config
        self.selected = select_layer % (config.num_layers + 1)  # index into hidden_states = layers computed
        self.tower = CLIPVisionTower(config, self.selected)
        d = config.hidden_size
        self.dense = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, NUM_CLASSES + len(ATTRS) + NUM_CLASSES))
        init_weights(self)
        with torch.no_grad():  # 2-D sin-cos start (as MAE): where a patch is, left/right above all, is linear
            grid = config.image_size // config.patch_size
            self.tower.embeddings.position_embedding.weight[1:] = sincos_2d(grid, d)
            self.tower.embeddings.position_embedding.weight[0] = 0.0

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """-> patch features [B, N, D] (what MobileVLM's tower returns), dense logits [B, N, C]."""
        features = self.tower(pixel_values)
        return features, self.dense(features)

    def features(self, pixel_values: Tensor) -> Tensor:
        return self.tower(pixel_values)


def vision_losses(dense: Tensor, patch_class: Tensor, patch_attr: Tensor, patch_center: Tensor,
                  object_weight: float = 10.0) -> dict[str, Tensor]:
    """Soft cross-entropy on the patch class/attribute fractions (object patches weighted up, as they are a few
    percent of the frame) and weighted cross-entropy on the centre patches."""
    weight = 1.0 + (object_weight - 1.0) * (1.0 - patch_class[..., 0])  # [B, N]
    weight = weight / weight.mean()
    center_weight = torch.ones(NUM_CLASSES, device=patch_class.device)
    center_weight[1:] = 20.0  # a centre patch is rare: about one in a hundred
    c_logits, a_logits, z_logits = dense.split([NUM_CLASSES, len(ATTRS), NUM_CLASSES], dim=-1)
    return {
        "class": (-(patch_class * F.log_softmax(c_logits, -1)).sum(-1) * weight).mean(),
        "attr": (-(patch_attr * F.log_softmax(a_logits, -1)).sum(-1) * weight).mean(),
        "center": F.cross_entropy(z_logits.reshape(-1, NUM_CLASSES), patch_center.reshape(-1).long(),
                                  weight=center_weight),
    }


def dense_report(dense: Tensor, patch_class: Tensor, patch_attr: Tensor, patch_center: Tensor) -> dict[str, float]:
    """Recall of the patch class over object patches, attribute accuracy, centre recall and false centres/image."""
    c_logits, a_logits, z_logits = dense.split([NUM_CLASSES, len(ATTRS), NUM_CLASSES], dim=-1)
    tc = patch_class.argmax(-1)
    obj = tc > 0
    ta = patch_attr.argmax(-1)
    has_attr = ta > 0
    z = z_logits.argmax(-1)
    centre = patch_center > 0
    return {"class_recall": float((c_logits.argmax(-1)[obj] == tc[obj]).float().mean()),
            "attr_acc": float((a_logits.argmax(-1)[has_attr] == ta[has_attr]).float().mean()),
            "center_recall": float((z[centre] == patch_center[centre].long()).float().mean()),
            "false_centers": float(((z > 0) & ~centre).float().sum() / dense.shape[0])}


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen; merged back into W before saving."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        self.base.weight.requires_grad_(True)
        return self.base


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(module: nn.Module, rank: int, alpha: float) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and name in LORA_TARGETS:
            setattr(module, name, LoRALinear(child, rank, alpha))
        else:
            add_lora(child, rank, alpha)


def merge_lora(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            setattr(module, name, child.merged())
        else:
            merge_lora(child)


def packed_forward(llm, embeds: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
    """The decoder over packed sequences: hidden states [B, T, D] before the final norm.

    positions [B, T] are each token's RoPE position and mask [B, T, T] (True = may attend) says which earlier
    tokens it sees, so several single-turn conversations sharing one prompt prefix and image can be packed into
    one row and each is computed exactly as inference computes it alone (same positions, same visible tokens).
    Uses the very layers of ``MobileLlama`` (LoRA-wrapped projections included).
    """
    from ..model.llama import apply_rope, rope_tables

    cfg = llm.config
    b, t, d = embeds.shape
    cos_t, sin_t = rope_tables(int(positions.max()) + 1, cfg.head_dim, cfg.rope_theta)
    cos, sin = cos_t.to(embeds)[positions][:, None], sin_t.to(embeds)[positions][:, None]  # [B, 1, T, hd]
    attn_mask = mask[:, None]
    x = embeds
    for layer in llm.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attn.num_kv_heads != attn.num_heads:
            repeat = attn.num_heads // attn.num_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(b, t, d))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x
