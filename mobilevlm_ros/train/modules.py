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
from .data import ATTRS, GLOBAL_HEADS, NUM_CLASSES


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


class VisionPretrainer(nn.Module):
    """The whole CLIP ViT (all layers + post_layernorm, the published CLIPVisionModel) with pretraining heads.

    Stands in for CLIP's web-scale contrastive pretraining, which a demo cannot afford: the generator's ground
    truth supervises the tower directly. Dense heads read the patch tokens MobileVLM takes
    (hidden_states[select_layer]): the class and attribute covering each patch and object centres. Global heads
    read CLIP's pooled output (the last layer's CLS token after post_layernorm) and the mean of the selected
    patch tokens: counts, presence, colours, light state and left/right.
    """

    def __init__(self, config: VisionConfig, select_layer: int):
        super().__init__()
        self.config = config
        self.tower = CLIPVisionTower(config, config.num_layers, keep_cls=True)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.selected = select_layer % (config.num_layers + 1)  # index into hidden_states
        d = config.hidden_size
        self.dense = nn.Linear(d, NUM_CLASSES + len(ATTRS) + NUM_CLASSES)
        n_global = sum(GLOBAL_HEADS.values())
        self.pooled_head = nn.Linear(d, n_global)
        self.patch_mean_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, n_global))
        init_weights(self)
        nn.init.normal_(self.tower.embeddings.position_embedding.weight, std=0.02)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> selected patch features [B, N, D], dense logits [B, N, C], global logits (pooled, patch-mean)."""
        x = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
        selected = x if self.selected == 0 else None
        for i, layer in enumerate(self.tower.encoder.layers):
            x = layer(x)
            if i + 1 == self.selected:
                selected = x
        patches = selected[:, 1:]
        pooled = self.post_layernorm(x[:, 0])
        return patches, self.dense(patches), (self.pooled_head(pooled), self.patch_mean_head(patches.mean(1)))

    def features(self, pixel_values: Tensor) -> Tensor:
        """What MobileVLM's vision tower returns: hidden_states[select_layer] without CLS."""
        x = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
        for layer in self.tower.encoder.layers[: self.selected]:
            x = layer(x)
        return x[:, 1:]


def vision_losses(dense: Tensor, global_logits: tuple[Tensor, Tensor], patch_class: Tensor, patch_attr: Tensor,
                  patch_center: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Soft cross-entropy on the patch class/attribute fractions, weighted CE on centres, CE per global head."""
    c_logits, a_logits, z_logits = dense.split([NUM_CLASSES, len(ATTRS), NUM_CLASSES], dim=-1)
    losses = {
        "patch_class": -(patch_class * F.log_softmax(c_logits, -1)).sum(-1).mean(),
        "patch_attr": -(patch_attr * F.log_softmax(a_logits, -1)).sum(-1).mean(),
    }
    weight = torch.ones(NUM_CLASSES, device=dense.device)
    weight[1:] = 20.0  # a centre patch is rare: about one in a hundred
    losses["patch_center"] = F.cross_entropy(z_logits.reshape(-1, NUM_CLASSES), patch_center.reshape(-1).long(),
                                             weight=weight)
    total_g = []
    for logits in global_logits:
        parts = logits.split(list(GLOBAL_HEADS.values()), dim=-1)
        per_head = [F.cross_entropy(p, targets[:, i].long(), ignore_index=-100)
                    for i, p in enumerate(parts) if (targets[:, i] != -100).any()]
        total_g.append(torch.stack(per_head).mean())
    losses["global_pooled"], losses["global_patch_mean"] = total_g
    return losses


def global_accuracy(global_logits: Tensor, targets: Tensor) -> dict[str, float]:
    out = {}
    parts = global_logits.split(list(GLOBAL_HEADS.values()), dim=-1)
    for i, (name, p) in enumerate(zip(GLOBAL_HEADS, parts)):
        mask = targets[:, i] != -100
        if mask.any():
            out[name] = (p.argmax(-1)[mask] == targets[mask, i].long()).float().mean().item()
    return out


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
