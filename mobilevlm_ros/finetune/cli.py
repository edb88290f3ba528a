"""mobilevlm finetune: LoRA fine-tuning of a MobileVLM checkpoint on LLaVA-style data (docs/FINETUNE.md)."""
from __future__ import annotations

import argparse
import sys
import time

from ..options import DTYPES
from .lora import LORA_TARGETS, LoraSettings
from .train import FinetuneSettings

DEFAULTS = FinetuneSettings()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobilevlm finetune", description=__doc__.split(": ", 1)[1])
    p.add_argument("--model", required=True, help="base checkpoint directory (published MobileVLM layout)")
    p.add_argument("--data", required=True, help="LLaVA-style JSON: [{'image': ..., 'conversations': [...]}]")
    p.add_argument("--out", required=True, help="output directory for the adapter (must not exist or be empty)")
    p.add_argument("--image-folder", help="where relative image paths start (default: the JSON file's directory)")
    p.add_argument("--vision-tower", help="CLIP directory overriding config.json's mm_vision_tower (V1 checkpoints)")
    p.add_argument("--merge", action="store_true",
                   help="also write the merged full checkpoint to OUT/merged (published layout)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the frozen weights (default: bfloat16 on CUDA, "
                                                   "float32 on the CPU); LoRA weights train in float32")
    lora = DEFAULTS.lora
    p.add_argument("--lora-r", type=int, default=lora.r, help="LoRA rank (reference: 128)")
    p.add_argument("--lora-alpha", type=float, default=lora.alpha, help="LoRA alpha (reference: 256)")
    p.add_argument("--lora-dropout", type=float, default=lora.dropout, help="LoRA dropout (reference: 0.05)")
    p.add_argument("--target-modules", default=",".join(LORA_TARGETS),
                   help="decoder Linear layers to adapt, comma-separated (reference: all of them)")
    p.add_argument("--freeze-projector", action="store_true",
                   help="keep the projector frozen (the reference trains it alongside LoRA)")
    p.add_argument("--lr", type=float, default=DEFAULTS.learning_rate,
                   help="peak learning rate (reference LoRA: 1e-4 for 1.7B, 2e-4 for 3B)")
    p.add_argument("--projector-lr", type=float, help="the projector's learning rate (default: --lr)")
    p.add_argument("--epochs", type=float, default=DEFAULTS.epochs)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--warmup-ratio", type=float, default=DEFAULTS.warmup_ratio)
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep activations instead of recomputing them (faster, more memory)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (a quick check of a setup)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from ..model.errors import CheckpointError
    from .data import DatasetError
    from .train import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = FinetuneSettings(
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip())),
        train_projector=not args.freeze_projector, learning_rate=args.lr, projector_learning_rate=args.projector_lr,
        epochs=args.epochs, batch_size=args.batch_size, warmup_ratio=args.warmup_ratio,
        gradient_checkpointing=not args.no_gradient_checkpointing, seed=args.seed)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    try:
        finetune(args.model, args.data, args.out, settings, image_folder=args.image_folder,
                 vision_tower=args.vision_tower, device=args.device, dtype=args.dtype, merge=args.merge,
                 max_steps=args.max_steps, log=log)
    except (DatasetError, CheckpointError, FileExistsError, ValueError) as e:
        print(f"mobilevlm finetune: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
