"""LoRA fine-tuning of a MobileVLM checkpoint: the reference's objective, optimiser and schedule, and its outputs.

What trains, as in the reference's ``finetune.lora`` (train.py with ``--lora_enable True``): LoRA on the decoder's
Linear layers (lora.py) and, unless frozen, the projector (its ``initialize_vision_modules`` sets the projector
trainable again after PEFT froze it, and saves it as ``non_lora_trainables.bin``). The vision tower and every other
decoder weight stay frozen. The objective is the reference's: causal LM cross-entropy over the spliced sequence,
mean over the tokens whose label is not IGNORE_INDEX (data.py), across the whole batch. Optimiser and schedule are
the HF Trainer's as the reference's scripts configure it: AdamW (betas 0.9 / 0.999, eps 1e-8), weight decay 0,
3% linear warm-up then cosine decay to 0, gradient norm clipped at 1.0, one epoch of batches of 16, gradient
checkpointing. The loss is taken only at the positions that have a label, so logits for the other positions are
never materialised (the same value as the reference's full-vocabulary logits over every position, without the
[batch, length, 32000] tensor).

Outputs go to a temporary directory beside ``out`` and are renamed into place at the end: a failure leaves nothing
in ``out``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..model.image import preprocess
from ..model.llama import rope_tables
from ..model.loader import (WEIGHT_FILES, expand_path, find_vision_tower_dir, load_model, read_tensors,
                            weight_files)
from ..model.mobilevlm import MobileVLM
from .data import IGNORE_INDEX, DatasetError, Example, load_examples
from .lora import (Adapter, LoraSettings, adapter_from_model, add_lora, checkpoint_key, merge_adapter, save_adapter,
                   unwrap_lora)

MERGED_DIR = "merged"  # --merge: the full checkpoint, inside the output directory
MANIFEST = "mobilevlm_manifest.json"  # the base's file hashes no longer hold for merged weights: not copied


@dataclass(frozen=True)
class FinetuneSettings:
    lora: LoraSettings = field(default_factory=LoraSettings)
    train_projector: bool = True
    learning_rate: float = 2e-4  # the reference's LoRA rate for MobileVLM-3B; 1e-4 for 1.7B (run.sh LR_CONF)
    projector_learning_rate: float | None = None  # the reference's mm_projector_lr: None = learning_rate
    epochs: float = 1.0
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    seed: int = 0


@dataclass
class FinetuneResult:
    out_dir: Path
    steps: int
    examples: int
    losses: list[float]  # one per step
    seconds: float
    merged_dir: Path | None


def lr_at(step: int, total: int, warmup: int) -> float:
    """transformers' get_cosine_schedule_with_warmup factor (the reference's lr_scheduler_type "cosine")."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def decoder_hidden(model: MobileVLM, embeds: Tensor, gradient_checkpointing: bool) -> Tensor:
    """The decoder over whole sequences from position 0 (MobileLlama.forward_all without lm_head): the final-norm
    hidden states [B, T, D]. Each layer is MobileLlama's own; with gradient_checkpointing their activations are
    recomputed in the backward pass instead of kept (the reference trains with it on)."""
    llm = model.llm
    t = embeds.shape[1]
    cos, sin = rope_tables(t, llm.config.head_dim, llm.config.rope_theta)
    cos, sin = cos.to(embeds), sin.to(embeds)
    x = embeds
    for layer in llm.layers:
        if gradient_checkpointing and torch.is_grad_enabled():
            x = checkpoint(layer, x, cos, sin, None, t, use_reentrant=False)
        else:
            x = layer(x, cos, sin, None, t)
    return llm.norm(x)


def image_tokens_for(model: MobileVLM, pixel_values: Tensor) -> Tensor:
    """Frozen vision tower, then the projector (trained or not) in its own dtype: [B, tokens, D] in the decoder's
    dtype."""
    with torch.no_grad():
        features = model.vision_tower(pixel_values.to(model.llm.embed_tokens.weight.device))
    projector_dtype = next(model.mm_projector.parameters()).dtype
    return model.mm_projector(features.to(projector_dtype)).to(model.llm.embed_tokens.weight.dtype)


def batch_inputs(model: MobileVLM, examples: Sequence[Example], image_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Spliced embeddings [B, T, D], right-padded with zeros, and labels [B, T] padded with IGNORE_INDEX: the
    reference's prepare_inputs_labels_for_multimodal."""
    rows = [model.embed_prompt(ex.input_ids, image_tokens[i: i + 1])[0] for i, ex in enumerate(examples)]
    labels = [ex.spliced_labels(image_tokens.shape[1]) for ex in examples]
    length = max(row.shape[0] for row in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[1], dtype=rows[0].dtype, device=rows[0].device)
    padded = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=rows[0].device)
    for i, (row, label) in enumerate(zip(rows, labels)):
        embeds[i, : row.shape[0]] = row
        padded[i, : len(label)] = torch.tensor(label)
    return embeds, padded


def lm_loss(model: MobileVLM, embeds: Tensor, labels: Tensor, gradient_checkpointing: bool = False) -> Tensor:
    """Mean next-token cross-entropy over the positions whose label is set, logits in float32 (the reference's
    LlamaForCausalLM loss), computed only where a label is."""
    hidden = decoder_hidden(model, embeds, gradient_checkpointing)
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX
    logits = model.llm.lm_head(hidden[:, :-1][where])
    return F.cross_entropy(logits.float(), targets[where])


def pixel_values(model: MobileVLM, image_path: Path) -> Tensor:
    """The image as the pipeline (and the reference's training data loader) preprocesses it: [1, 3, S, S]."""
    with Image.open(image_path) as im:
        return preprocess(im, model.config.vision.image_size, pad=model.config.image_aspect_ratio == "pad")


def example_loss(model: MobileVLM, examples: Sequence[Example], gradient_checkpointing: bool = False) -> Tensor:
    """The training loss of a batch of examples, from their image files to the scalar."""
    pixels = torch.cat([pixel_values(model, ex.record.image) for ex in examples])
    embeds, labels = batch_inputs(model, examples, image_tokens_for(model, pixels))
    return lm_loss(model, embeds, labels, gradient_checkpointing)


def prepare_model(model: MobileVLM, settings: FinetuneSettings) -> list[dict]:
    """Freeze everything, add LoRA, make the projector trainable (in float32) if asked: the optimiser's groups."""
    model.requires_grad_(False)
    layers = add_lora(model, settings.lora)
    groups = [{"params": [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)],
               "lr": settings.learning_rate}]
    if settings.train_projector:
        model.mm_projector.float().requires_grad_(True)
        groups.append({"params": list(model.mm_projector.parameters()),
                       "lr": settings.projector_learning_rate or settings.learning_rate})
    return groups


def trained_extra(model: MobileVLM, settings: FinetuneSettings) -> dict[str, Tensor]:
    if not settings.train_projector:
        return {}
    return {"mm_projector." + name: p for name, p in model.mm_projector.named_parameters()}


def finetune(model_dir: str | Path, data: str | Path, out_dir: str | Path,
             settings: FinetuneSettings = FinetuneSettings(),
             image_folder: str | Path | None = None, vision_tower: str | Path | None = None, device: str = "cpu",
             dtype: str | None = None, merge: bool = False, max_steps: int | None = None,
             log: Callable[[str], None] = print) -> FinetuneResult:
    """Train an adapter on the data and write it (and with merge, the merged checkpoint in out/merged).
    dtype: of the frozen weights; default bfloat16 on CUDA (the reference trains in bf16), float32 on the CPU.
    max_steps: stop early (a quick check of a setup); the schedule still spans the full run."""
    start = time.perf_counter()
    out = expand_path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: output directory exists and is not empty")
    model_dir = expand_path(model_dir)
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, tokenizer = load_model(model_dir, vision_tower, device, dtype)
    examples = load_examples(data, tokenizer, model.config.image_tokens, model.config.llama.max_position_embeddings,
                             image_folder)
    log(f"{len(examples)} examples from {data}; base {model_dir} on {device} in {dtype}")

    torch.manual_seed(settings.seed)
    groups = prepare_model(model, settings)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total = max(1, math.ceil(steps_per_epoch * settings.epochs))
    warmup = math.ceil(settings.warmup_ratio * total)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    log(f"LoRA r={settings.lora.r} alpha={settings.lora.alpha:g} dropout={settings.lora.dropout:g} on "
        f"{', '.join(settings.lora.target_modules)}; projector {'trained' if settings.train_projector else 'frozen'}; "
        f"{trainable:,} trainable parameters; {total} steps of {settings.batch_size}")
    order_gen = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    params = [p for g in groups for p in g["params"]]
    for step in range(min(total, max_steps or total)):
        if len(order) < settings.batch_size:
            order += torch.randperm(len(examples), generator=order_gen).tolist()
        batch, order = [examples[i] for i in order[: settings.batch_size]], order[settings.batch_size:]
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * lr_at(step, total, warmup)
        loss = example_loss(model, batch, settings.gradient_checkpointing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0 or step + 1 == total or step == 0:
            recent = losses[-10:]
            log(f"  step {step + 1}/{total} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    adapter = adapter_from_model(model, settings.lora, trained_extra(model, settings))
    seconds = time.perf_counter() - start

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_adapter(adapter, tmp, str(model_dir))
        summary = {"base_model": str(model_dir), "data": str(data), "examples": len(examples), "steps": len(losses),
                   "device": device, "dtype": dtype, "settings": asdict(settings), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "trainable_parameters": trainable,
                   "first_loss": losses[0] if losses else None,
                   "last_10_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
                   "train_seconds": round(seconds, 1)}
        (tmp / "training.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if merge:
            unwrap_lora(model)
            merge_adapter(model, adapter)
            write_merged_checkpoint(model_dir, model, adapter, tmp / MERGED_DIR,
                                    vision_tower and expand_path(vision_tower))
            log(f"merged checkpoint written ({MERGED_DIR}/)")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"adapter written to {out} ({len(losses)} steps, {seconds:.0f} s)")
    return FinetuneResult(out, len(losses), len(examples), losses, seconds, out / MERGED_DIR if merge else None)


def write_merged_checkpoint(base_dir: Path, model: MobileVLM, adapter: Adapter, out: Path,
                            vision_tower: str | Path | None = None) -> None:
    """The base checkpoint directory with the adapted weights replaced by the merged model's: every other file
    (config, tokenizer, CLIP directory) copied, the weights written as one model.safetensors with the published key
    names, each tensor in the base file's dtype. A CLIP directory the base found outside itself (beside it, or
    vision_tower) is named by its absolute path in the new config.json, as the reference's training writes it, so
    the merged checkpoint finds the same vision tower wherever it is written."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    changed = {checkpoint_key(name): params[name] for name, _ in adapter.deltas()}
    changed |= {checkpoint_key(name): params[name] for name in adapter.extra}
    shards = weight_files(base_dir)
    skip = {base_dir / name for name in (*WEIGHT_FILES, MANIFEST)} | set(shards)
    out.mkdir(parents=True)
    for path in sorted(base_dir.iterdir()):
        if path in skip:
            continue
        if path.is_dir():
            shutil.copytree(path, out / path.name)
        else:
            shutil.copy2(path, out / path.name)
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        for key, tensor in read_tensors(shard):
            tensors[key] = (changed[key].detach().to("cpu", tensor.dtype) if key in changed else tensor).contiguous()
    missing = set(changed) - set(tensors)
    if missing:
        raise KeyError(f"merged weights {sorted(missing)[:3]} are not in the base checkpoint {base_dir}")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    clip_dir = find_vision_tower_dir(base_dir, config.get("mm_vision_tower", ""), vision_tower)
    if clip_dir is not None and base_dir.resolve() not in clip_dir.resolve().parents:
        config["mm_vision_tower"] = str(clip_dir.resolve())
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


__all__ = ["DatasetError", "FinetuneResult", "FinetuneSettings", "finetune"]
