"""Accuracy of the CPU quantisation modes: logit agreement with float32 on a real-shaped random decoder, and the
bundled demo model's held-out accuracy per question type.

    python -m mobilevlm_ros.bench.accuracy [--model MobileVLM-1.7B] [--layers N] [--tokens 64] [--demo-scenes 200]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..model.quantize import logit_agreement, prompt_logits, weight_bytes
from ..options import QUANTIZE_MODES
from .models import random_mobilevlm, real_config


@torch.inference_mode()
def real_shaped_agreement(model: str = "MobileVLM-1.7B", layers: int | None = None, tokens: int = 64,
                          modes: tuple[str, ...] = QUANTIZE_MODES, seed: int = 0) -> dict:
    """Feed the same random token sequence through the float32 decoder and each quantised one (the decode path,
    one token at a time through the KV cache) and compare the logits at every position."""
    config = real_config(model, llm_layers=layers)
    ids = torch.randint(3, config.llama.vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed + 1))

    def logits_for(quant: str | None) -> tuple[torch.Tensor, int]:
        vlm = random_mobilevlm(config, torch.float32, seed=seed, quant=quant, vision=False)
        llm = vlm.llm
        llm.setup_cache(tokens)
        return prompt_logits(llm, llm.embed_tokens(ids)[None]), weight_bytes(llm)

    reference, ref_bytes = logits_for(None)
    out = {"model": model, "layers": config.llama.num_layers, "tokens": tokens,
           "float32_weight_bytes": ref_bytes, "modes": {}}
    for mode in modes:
        logits, nbytes = logits_for(mode)
        out["modes"][mode] = {**logit_agreement(reference, logits), "weight_bytes": nbytes}
    return out


def demo_report(scenes: int = 200, seed: int = 20240, **load: object) -> dict[str, float]:
    """The bundled demo model, loaded with MobileVLMPipeline.load(**load), scored as its test scores it
    (train.evaluate): accuracy per question type and the fraction of captions naming every class present."""
    from ..demo import DEFAULT_MODEL_DIR
    from ..model import MobileVLMPipeline
    from ..train.evaluate import evaluate

    report = evaluate(MobileVLMPipeline.load(DEFAULT_MODEL_DIR, max_seq_len=512, **load), seed, scenes)
    return {**{kind: report.accuracy(kind) for kind in report.asked},
            "caption_covers": report.caption_covers / report.scenes}


def demo_accuracy(modes: tuple[str, ...] = QUANTIZE_MODES, scenes: int = 200, seed: int = 20240) -> dict:
    """demo_report in float32 and with each quantisation of the decoder."""
    return {"scenes": scenes, "seed": seed,
            "modes": {mode or "float32": demo_report(scenes, seed, quantize=mode) for mode in (None, *modes)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mobilevlm_ros.bench.accuracy", description=__doc__)
    p.add_argument("--model", default="MobileVLM-1.7B")
    p.add_argument("--layers", type=int, help="decoder depth (default: the real one)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--demo-scenes", type=int, default=200)
    args = p.parse_args(argv)
    result = {"real_shaped": real_shaped_agreement(args.model, args.layers, args.tokens),
              "demo": demo_accuracy(scenes=args.demo_scenes)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
