"""Memory of LoRA fine-tuning for the real-shaped MobileVLM-1.7B and 3B, computed and measured.

    python -m mobilevlm_ros.finetune.memory                      # computed, both models, the reference's settings
    python -m mobilevlm_ros.finetune.memory --measure 1.7B --dtype bfloat16 --batch 1 --seq 400

Computed: exact parameter counts of the models as this package builds them (on the meta device), LoRA of the
reference's settings on every decoder Linear layer, the projector trained, and what training holds per trained
parameter (float32 weight, gradient and AdamW's two moments: 16 bytes) next to the frozen weights in the chosen
dtype. Activations depend on batch and sequence length and are not in the computed figure: ``--measure`` runs one
training step of the real-shaped model (random weights, random image, a sequence of ``--seq`` positions with the
last ``--answer`` labelled) through train.py's own functions on the CPU and reports the process's peak resident
memory, which includes them.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace

import torch

from ..model.config import LlamaConfig, MobileVLMConfig, VisionConfig
from ..model.mobilevlm import IMAGE_TOKEN_INDEX, MobileVLM
from .lora import LoraSettings, add_lora
from .train import FinetuneSettings, batch_inputs, image_tokens_for, lm_loss, prepare_model

# MobileLLaMA 1.4B and 2.7B (docs: /work/shared/MODEL_SPEC.md) with CLIP ViT-L/14 @336 and LDP v2, as the published
# MobileVLM_V2-1.7B and -3B; vocabulary 32000 (mm_use_im_patch_token false).
MODELS = {
    "1.7B": MobileVLMConfig(llama=LlamaConfig(hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16,
                                              num_kv_heads=16), vision=VisionConfig(), projector_type="ldpnetv2",
                            image_aspect_ratio="pad", use_im_patch_token=False),
    "3B": MobileVLMConfig(llama=LlamaConfig(hidden_size=2560, intermediate_size=6912, num_layers=32, num_heads=32,
                                            num_kv_heads=32), vision=VisionConfig(), projector_type="ldpnetv2",
                          image_aspect_ratio="pad", use_im_patch_token=False),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRAINED_BYTES = 16  # float32 weight + gradient + AdamW exp_avg + exp_avg_sq


def parameter_counts(config: MobileVLMConfig, lora: LoraSettings) -> dict[str, int]:
    with torch.device("meta"):
        model = MobileVLM(config)
        add_lora(model, lora)
    count = {"vision": 0, "projector": 0, "decoder": 0, "lora": 0}
    for name, p in model.named_parameters():
        part = ("lora" if ".lora_" in name else "vision" if name.startswith("vision_tower.")
                else "projector" if name.startswith("mm_projector.") else "decoder")
        count[part] += p.numel()
    return count


def computed(name: str, dtype: str, settings: FinetuneSettings) -> dict:
    counts = parameter_counts(MODELS[name], settings.lora)
    trained = counts["lora"] + (counts["projector"] if settings.train_projector else 0)
    frozen = counts["vision"] + counts["decoder"] + (0 if settings.train_projector else counts["projector"])
    gib = 1 << 30
    return {"model": f"MobileVLM_V2-{name}", "parameters": counts, "trained_parameters": trained,
            "frozen_weights_gib": round(frozen * DTYPE_BYTES[dtype] / gib, 2),
            "trained_state_gib": round(trained * TRAINED_BYTES / gib, 2),
            "total_without_activations_gib": round((frozen * DTYPE_BYTES[dtype] + trained * TRAINED_BYTES) / gib, 2)}


def measure(name: str, dtype: str, settings: FinetuneSettings, batch: int, seq: int, answer: int) -> dict:
    """One training step of the real-shaped model on the CPU (random weights): peak resident memory."""
    torch.manual_seed(0)
    config = MODELS[name]
    with torch.device("meta"):
        model = MobileVLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    groups = prepare_model(model, settings)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    text = seq - config.image_tokens
    ids = [1] + [IMAGE_TOKEN_INDEX] + torch.randint(3, 32000, (text - 1,)).tolist()
    labels = [-100] * (len(ids) - answer) + ids[-answer:]

    class Row:  # what batch_inputs reads of an Example
        input_ids = ids

        @staticmethod
        def spliced_labels(image_tokens: int) -> list[int]:
            return labels[:1] + [-100] * image_tokens + labels[2:]

    start = time.perf_counter()
    image_tokens = image_tokens_for(model, torch.randn(batch, 3, 336, 336))
    embeds, targets = batch_inputs(model, [Row()] * batch, image_tokens)
    loss = lm_loss(model, embeds, targets, settings.gradient_checkpointing)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": f"MobileVLM_V2-{name}", "dtype": dtype, "batch": batch, "sequence": seq, "labelled": answer,
            "gradient_checkpointing": settings.gradient_checkpointing, "peak_rss_gib": round(peak_kib / (1 << 20), 2),
            "step_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobilevlm_ros.finetune.memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPE_BYTES))
    parser.add_argument("--measure", choices=tuple(MODELS), help="run one step of this model and measure")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=400, help="positions per row, 144 image tokens included")
    parser.add_argument("--answer", type=int, default=100, help="labelled positions per row")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    settings = replace(FinetuneSettings(), gradient_checkpointing=not args.no_gradient_checkpointing)
    if args.measure:
        print(json.dumps(measure(args.measure, args.dtype, settings, args.batch, args.seq, args.answer)))
    else:
        for name in MODELS:
            print(json.dumps(computed(name, args.dtype, settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
