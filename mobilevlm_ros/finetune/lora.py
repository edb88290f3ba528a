"""LoRA on the decoder's Linear layers, in PEFT's semantics and file layout, without PEFT.

Defaults are the reference's LoRA fine-tune (Meituan-AutoML/MobileVLM):
- rank 128, alpha 256: ``run.sh`` / ``run_v1.sh``, task ``finetune.lora`` (``--lora_enable True --lora_r 128
  --lora_alpha 256``; train.py's own defaults, 64 / 16, are overridden there);
- dropout 0.05 and no bias: train.py's TrainingArguments (``lora_dropout: float = 0.05``, ``lora_bias = "none"``);
- target modules: train.py's ``find_all_linear_names``: every nn.Linear outside the projector and the vision tower,
  ``lm_head`` excluded, which on MobileLLaMA is q/k/v/o_proj and gate/up/down_proj of every layer.

A layer computes ``W x + (alpha / r) B A dropout(x)`` with B zero at the start (PEFT's LoraLayer). Files: the
adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` for the reference's
PeftModel(MobileLlamaForCausalLM)); the other trained weights (the projector) go to ``non_lora_trainables.bin``
as the reference's train.py writes them (keys ``base_model.model.model.mm_projector.*``), which its loader and
``scripts/mergelora.py`` read. Adapters trained with the reference code load here unchanged.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..model.errors import CheckpointError
from ..model.mobilevlm import MobileVLM
from .data import read_json

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT writes the first, older PEFT the second
NON_LORA_WEIGHTS = "non_lora_trainables.bin"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped MobileLlamaForCausalLM


@dataclass(frozen=True)
class LoraSettings:
    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS
    rslora: bool = False  # PEFT's use_rslora: scaling alpha / sqrt(r) instead of alpha / r

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update, as PEFT's lora.Linear: the update runs in the LoRA
    weights' dtype (float32 masters over a bfloat16 base on a GPU) and is added in the base output's dtype."""

    def __init__(self, base: nn.Linear, settings: LoraSettings):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, settings.r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(settings.r, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.scaling = settings.scaling

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> Tensor:
        """(alpha / r) B A in float32: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def add_lora(model: MobileVLM, settings: LoraSettings) -> dict[str, LoraLinear]:
    """Wrap the target Linear layers of the decoder (not lm_head); returns them by their path in the model."""
    wrapped: dict[str, LoraLinear] = {}
    for layer_no, layer in enumerate(model.llm.layers):
        for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name, child in list(parent.named_children()):
                if name in settings.target_modules and isinstance(child, nn.Linear):
                    lora = LoraLinear(child, settings)
                    setattr(parent, name, lora)
                    wrapped[f"llm.layers.{layer_no}.{parent_name}.{name}"] = lora
    if not wrapped:
        raise ValueError(f"no decoder Linear layer matches target_modules {list(settings.target_modules)}")
    return wrapped


def lora_layers(model: MobileVLM) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def peft_module_name(path: str) -> str:
    """Our module path (llm.layers.0.self_attn.q_proj) -> PEFT's (base_model.model.model.layers.0...)."""
    if not path.startswith("llm."):
        raise ValueError(f"{path}: LoRA is applied to the decoder only")
    return PEFT_PREFIX + "model." + path[len("llm."):]


def checkpoint_key(name: str) -> str:
    """Our parameter name -> the published checkpoint's key (the inverse of the loader's mapping)."""
    if name == "llm.lm_head.weight":
        return "lm_head.weight"
    if name.startswith("llm."):
        return "model." + name[len("llm."):]
    if name.startswith("mm_projector."):
        return "model." + name
    raise ValueError(f"{name}: not a decoder or projector parameter")


def parameter_name(key: str) -> str:
    """A checkpoint key (model.mm_projector.*, model.*, lm_head.weight) -> our parameter name."""
    if key == "lm_head.weight":
        return "llm.lm_head.weight"
    if key.startswith("model.mm_projector."):
        return key[len("model."):]
    if key.startswith("model.") and not key.startswith("model.vision_tower."):
        return "llm." + key[len("model."):]
    raise ValueError(f"{key}: not a decoder or projector weight")


def adapter_config(settings: LoraSettings, base_model: str) -> dict:
    """adapter_config.json as PEFT's LoraConfig(task_type="CAUSAL_LM") writes it."""
    return {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
            "layers_to_transform": None, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
            "modules_to_save": None, "peft_type": "LORA", "r": settings.r, "rank_pattern": {}, "revision": None,
            "target_modules": sorted(settings.target_modules), "task_type": "CAUSAL_LM", "use_dora": False,
            "use_rslora": settings.rslora}


@dataclass
class Adapter:
    """An adapter directory read back: the LoRA pairs by our module path, and other trained weights by our
    parameter name."""

    settings: LoraSettings
    pairs: dict[str, tuple[Tensor, Tensor]]  # path -> (A [r, in], B [out, r])
    extra: dict[str, Tensor]

    def deltas(self) -> Iterator[tuple[str, Tensor]]:
        """(weight name, (alpha / r) B A in float32) for every adapted layer."""
        for path, (a, b) in self.pairs.items():
            yield path + ".weight", (b.float() @ a.float()) * self.settings.scaling


def save_adapter(adapter: Adapter, out_dir: Path, base_model: str) -> None:
    """Write the adapter in PEFT's layout, its other trained weights (the projector) as non_lora_trainables.bin."""
    from safetensors.torch import save_file

    tensors = {}
    for path, (a, b) in adapter.pairs.items():
        prefix = peft_module_name(path)
        tensors[prefix + ".lora_A.weight"] = a.contiguous()
        tensors[prefix + ".lora_B.weight"] = b.contiguous()
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(adapter.settings, base_model), indent=2) + "\n",
                                          encoding="utf-8")
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
    if adapter.extra:
        torch.save({PEFT_PREFIX + checkpoint_key(name): t for name, t in adapter.extra.items()},
                   out_dir / NON_LORA_WEIGHTS)


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """An adapter directory written here or by the reference's training (PEFT), checked; CheckpointError names
    the file and the problem."""
    from ..model.loader import read_tensors

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    cfg = read_json(config_path, CheckpointError, "adapter config not found (is this a LoRA adapter directory?)")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(config_path, f"peft_type {cfg.get('peft_type')!r}: only LORA adapters are supported")
    for unsupported in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                        "layers_to_transform"):
        if cfg.get(unsupported):
            raise CheckpointError(config_path, f"{unsupported}={cfg[unsupported]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(config_path, f"bias {cfg['bias']!r}: MobileLLaMA's Linear layers have no bias")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise CheckpointError(config_path, f"r {r!r} and lora_alpha {alpha!r} must be a positive int and a number")
    targets = cfg.get("target_modules") or []
    settings = LoraSettings(r=r, alpha=float(alpha), dropout=float(cfg.get("lora_dropout", 0.0)),
                            target_modules=tuple([targets] if isinstance(targets, str) else targets),
                            rslora=bool(cfg.get("use_rslora")))
    weights = next((adapter_dir / name for name in ADAPTER_WEIGHTS if (adapter_dir / name).is_file()), None)
    if weights is None:
        raise CheckpointError(adapter_dir, f"no adapter weights (looked for {', '.join(ADAPTER_WEIGHTS)})")
    halves: dict[str, dict[str, Tensor]] = {}
    for key, tensor in read_tensors(weights):
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise CheckpointError(weights, f"unexpected key {key!r} (expected {PEFT_PREFIX}...lora_A/B.weight)")
        module, half = key[len(PEFT_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        halves.setdefault(module, {})[half] = tensor
    pairs = {}
    for module, found in halves.items():
        if set(found) != {"lora_A", "lora_B"}:
            raise CheckpointError(weights, f"{module}: lora_A and lora_B must both be present")
        a, b = found["lora_A"], found["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(weights, f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not "
                                           f"have rank r={r}")
        try:
            pairs[parameter_name(module + ".weight")[: -len(".weight")]] = (a, b)
        except ValueError as e:
            raise CheckpointError(weights, str(e)) from None
    if not pairs:
        raise CheckpointError(weights, "holds no LoRA weights")
    extra = {}
    if (adapter_dir / NON_LORA_WEIGHTS).is_file():
        for key, tensor in read_tensors(adapter_dir / NON_LORA_WEIGHTS):
            stripped = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            if stripped.startswith("model.model."):  # mergelora.py strips one "model." more in this case
                stripped = stripped[len("model."):]
            try:
                extra[parameter_name(stripped)] = tensor
            except ValueError as e:
                raise CheckpointError(adapter_dir / NON_LORA_WEIGHTS, str(e)) from None
    return Adapter(settings, pairs, extra)


@torch.no_grad()
def merge_adapter(model: MobileVLM, adapter: Adapter | str | Path) -> list[str]:
    """Add the adapter's updates into the model's weights (in float32, then cast to the weight's dtype) and load
    its other trained weights: the model then computes what base + adapter computes. Returns the names changed."""
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    params = dict(model.named_parameters())
    changed = []
    for name, delta in adapter.deltas():
        if name not in params:
            raise CheckpointError(name, "the adapter adapts a layer this model does not have")
        weight = params[name]
        if weight.shape != delta.shape:
            raise CheckpointError(name, f"adapter update {list(delta.shape)} does not fit weight {list(weight.shape)}")
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        changed.append(name)
    for name, tensor in adapter.extra.items():
        if name not in params or params[name].shape != tensor.shape:
            raise CheckpointError(name, f"the adapter's trained weight {list(tensor.shape)} does not fit this model")
        params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        changed.append(name)
    return changed


def adapter_from_model(model: MobileVLM, settings: LoraSettings, extra: dict[str, Tensor]) -> Adapter:
    """The adapter a model with LoRA layers holds now (detached copies), and extra trained weights."""
    def copy(weight: Tensor) -> Tensor:
        return weight.detach().float().cpu().clone()

    pairs = {path: (copy(layer.lora_A.weight), copy(layer.lora_B.weight)) for path, layer in lora_layers(model).items()}
    return Adapter(settings, pairs, {name: t.detach().cpu().clone() for name, t in extra.items()})


def unwrap_lora(model: MobileVLM) -> None:
    """Put the base Linear layers (unchanged by training) back in place of the LoRA wrappers."""
    for path, layer in lora_layers(model).items():
        parent_path, name = path.rsplit(".", 1)
        setattr(model.get_submodule(parent_path), name, layer.base_layer)

