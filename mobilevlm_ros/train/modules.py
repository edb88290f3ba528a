"""Training-only modules around the inference model: the vision tower's pretraining heads and LoRA.

The trained parameters live in the very modules inference uses (``model.clip.CLIPVisionTower``,
``model.projector``, ``model.llama.MobileLlama``), so what is saved is exactly what the loader reads back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..demo.scenes import CLASSES
from ..model.clip import CLIPVisionTower
from ..model.config import VisionConfig
from .data import ATTRS, IGNORE, SCENE_FACTS, SIDES


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


TOKEN_SPLIT = (len(CLASSES), len(ATTRS), len(SIDES))  # which classes a patch shows, its object's attribute and side
DENSE_SPLIT = TOKEN_SPLIT + (len(CLASSES),)  # and the density map
SHOWN = 0.03  # a patch shows an object covering at least 3% of it: thin pedestrians and traffic lights count too


def token_targets(patch_class: Tensor, patch_attr: Tensor, patch_side: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per patch (or 12 x 12 visual token): which classes it shows [.., C] (0/1), and the attribute and side of the
    object covering most of it [..] (IGNORE where it shows none). Coverage fractions would leave a patch that a
    thin object crosses labelled background; these targets make such a patch say what it shows."""
    background = patch_class[..., :1]
    shown = (patch_class[..., 1:] >= SHOWN).float()
    on_object = shown.any(-1)

    def of_the_object(fractions: Tensor) -> Tensor:  # "none" counts only object pixels without the property
        target = torch.cat([fractions[..., :1] - background, fractions[..., 1:]], -1).argmax(-1)
        return torch.where(on_object, target, torch.full_like(target, IGNORE))

    return shown, of_the_object(patch_attr), of_the_object(patch_side)


def token_losses(logits: Tensor, shown: Tensor, attr: Tensor, side: Tensor) -> dict[str, Tensor]:
    """logits [..., B, N, sum(TOKEN_SPLIT)] against token_targets [B, N, ...]: multi-label cross-entropy on the
    classes shown (positives weighted up: most patches show nothing), cross-entropy on the attribute and side of
    object patches."""
    c_logits, a_logits, s_logits = logits.split(TOKEN_SPLIT, dim=-1)
    attr, side = attr.expand(a_logits.shape[:-1]), side.expand(s_logits.shape[:-1])
    return {"class": F.binary_cross_entropy_with_logits(c_logits, shown.expand_as(c_logits),
                                                        pos_weight=c_logits.new_full((len(CLASSES),), 3.0)),
            "attr": F.cross_entropy(a_logits.flatten(0, -2), attr.flatten(), ignore_index=IGNORE),
            "side": F.cross_entropy(s_logits.flatten(0, -2), side.flatten(), ignore_index=IGNORE)}


class VisionPretrainer(nn.Module):
    """The CLIP ViT tower MobileVLM reads (layers up to ``select_layer``) with pretraining heads.

    Stands in for CLIP's web-scale contrastive pretraining, which a demo cannot afford: the generator's ground
    truth supervises the layers MobileVLM reads. Dense heads on every layer's patch tokens (deep supervision) learn
    which classes each patch shows, the attribute (colour, light state) and the side of the frame of the object
    covering it (token_targets), and each object's share of its pixels (the density map: summed over the patches of
    a class it is the count), so the tokens the projector receives say what is where. Side is a property of the
    object, like its colour, and undefined off objects: a patch column target, non-zero on the background too, was
    averaged away downstream (left/right stayed at chance) while colour, so encoded, was learnt. A head on every
    output token also learns the scene facts (counts, presence, the single car's colour, ...), which asks the
    attention to gather the frame's content into each token. The layers after the selected one (and
    post_layernorm) never influence MobileVLM, so they are neither trained nor shipped.
    """

    def __init__(self, config: VisionConfig, select_layer: int):
        super().__init__()
        self.config = config
        self.selected = select_layer % (config.num_layers + 1)  # index into hidden_states = layers computed
        self.tower = CLIPVisionTower(config, self.selected)
        d = config.hidden_size
        self.dense = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, sum(DENSE_SPLIT)))
                                   for _ in range(self.selected))
        self.scene_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, sum(SCENE_FACTS.values())))
        init_weights(self)
        with torch.no_grad():  # 2-D sin-cos start (as MAE): where a patch is, left/right above all, is linear
            grid = config.image_size // config.patch_size
            self.tower.embeddings.position_embedding.weight[1:] = sincos_2d(grid, d)
            self.tower.embeddings.position_embedding.weight[0] = 0.0

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> patch features [B, N, D] (what MobileVLM's tower returns), every layer's dense outputs
        [L, B, N, sum(DENSE_SPLIT)] and each patch token's scene-fact logits [B, N, F]."""
        x = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
        dense = []
        for layer, head in zip(self.tower.encoder.layers, self.dense):
            x = layer(x)
            dense.append(head(x[:, 1:]))
        features = x[:, 1:]
        return features, torch.stack(dense), self.scene_head(features)

    def features(self, pixel_values: Tensor) -> Tensor:
        return self.tower(pixel_values)


def vision_losses(dense: Tensor, scene_logits: Tensor, patch_class: Tensor, patch_attr: Tensor, patch_side: Tensor,
                  patch_density: Tensor, facts: Tensor) -> dict[str, Tensor]:
    """token_losses on every layer's patch tokens, squared error on the density map (scaled so one object's patches
    matter) and cross-entropy of every token's scene-fact prediction."""
    b, n, _ = scene_logits.shape
    per_fact = [F.cross_entropy(part.reshape(b * n, -1), facts[:, i].long().repeat_interleave(n))
                for i, part in enumerate(scene_logits.split(list(SCENE_FACTS.values()), dim=-1))]
    token_part, density = dense.split([sum(TOKEN_SPLIT), len(CLASSES)], dim=-1)  # [L, B, N, .]
    return {**token_losses(token_part, *token_targets(patch_class, patch_attr, patch_side)),
            "density": 100.0 * (density - patch_density).pow(2).sum(-1).mean(),
            "scene": torch.stack(per_fact).mean()}


def vision_report(dense: Tensor, scene_logits: Tensor, patch_class: Tensor, patch_attr: Tensor, patch_side: Tensor,
                  patch_density: Tensor, facts: Tensor) -> dict[str, float]:
    """Held-out quality of the output tokens: recall and precision of the classes shown, attribute and side accuracy
    on object patches, counts read off the density map (rounded sum, all classes right) and the scene-fact accuracy
    (mean, and the worst fact)."""
    c_logits, a_logits, s_logits, density = dense[-1].split(DENSE_SPLIT, dim=-1)
    shown, attr, side = token_targets(patch_class, patch_attr, patch_side)
    said = c_logits > 0
    on = attr != IGNORE
    counts_ok = density.sum(1).round() == patch_density.sum(1).round()
    votes = [p.mean(1).argmax(-1) for p in scene_logits.split(list(SCENE_FACTS.values()), dim=-1)]
    fact_acc = {name: float((v == facts[:, i].long()).float().mean()) for i, (name, v) in
                enumerate(zip(SCENE_FACTS, votes))}
    worst = min(fact_acc, key=fact_acc.get)
    return {"class_recall": float(said[shown.bool()].float().mean()),
            "class_precision": float(shown[said].mean()),
            "attr_acc": float((a_logits.argmax(-1)[on] == attr[on]).float().mean()),
            "side_acc": float((s_logits.argmax(-1)[on] == side[on]).float().mean()),
            "density_count_acc": float(counts_ok.float().mean()),
            "scene_fact_acc": sum(fact_acc.values()) / len(fact_acc), f"worst:{worst}": fact_acc[worst]}


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


def packed_forward(llm, embeds: Tensor, positions: Tensor, mask: Tensor) -> list[Tensor]:
    """The decoder over packed sequences: the output [B, T, D] of every layer (the last one before the final norm).

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
    outputs = []
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
        outputs.append(x)
    return outputs
