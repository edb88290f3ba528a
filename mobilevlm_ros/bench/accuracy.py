"""Accuracy of the CPU quantisation modes: logit agreement with float32 on a real-shaped random decoder, and the
bundled demo model's answer accuracy when that model exists.

    python -m mobilevlm_ros.bench.accuracy [--model MobileVLM-1.7B] [--layers N] [--tokens 64] [--demo-scenes 24]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..model.quantize import MODES, logit_agreement, prompt_logits, weight_bytes
from .models import random_mobilevlm, real_config


@torch.inference_mode()
def real_shaped_agreement(model: str = "MobileVLM-1.7B", layers: int | None = None, tokens: int = 64,
                          modes: tuple[str, ...] = MODES, seed: int = 0) -> dict:
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


@torch.inference_mode()
def demo_accuracy(modes: tuple[str, ...] = MODES, scenes: int = 24, seed: int = 1000) -> dict | None:
    """Exact-match accuracy of the demo model's answers (one question per generated scene) per mode, or None
    when the demo model is not present."""
    try:
        from ..demo import DEFAULT_MODEL_DIR
        from ..demo.scenes import answer_matches, make_scene
    except ImportError:
        return None
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        return None
    from ..model import MobileVLMPipeline, SamplingParams
    from ..model.quantize import quantize_llm

    questions = []
    for i in range(scenes):
        scene = make_scene(seed, i)
        if scene.qa:
            qa = scene.qa[i % len(scene.qa)]
            questions.append((scene.image, qa.question, qa.answer))
    out = {"model_dir": str(DEFAULT_MODEL_DIR), "questions": len(questions), "modes": {}}
    reference_answers = None
    for mode in (None, *modes):
        vlm = MobileVLMPipeline.load(DEFAULT_MODEL_DIR)
        try:
            if mode is not None:
                quantize_llm(vlm.model.llm, mode)
            answers = [vlm.ask(image, q, SamplingParams(max_new_tokens=24)).text for image, q, _ in questions]
        except RuntimeError as e:  # a kernel's shape constraint the demo's small dims do not meet
            out["modes"][mode or "float32"] = {"error": str(e)[:200]}
            continue
        correct = sum(answer_matches(a, expected) for a, (_, _, expected) in zip(answers, questions))
        entry = {"accuracy": correct / max(1, len(questions))}
        if reference_answers is None:
            reference_answers = answers
        else:
            entry["same_answer_as_float32"] = sum(a == b for a, b in zip(answers, reference_answers)) / len(answers)
        out["modes"][mode or "float32"] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mobilevlm_ros.bench.accuracy", description=__doc__)
    p.add_argument("--model", default="MobileVLM-1.7B")
    p.add_argument("--layers", type=int, help="decoder depth (default: the real one)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--demo-scenes", type=int, default=24)
    args = p.parse_args(argv)
    result = {"real_shaped": real_shaped_agreement(args.model, args.layers, args.tokens),
              "demo": demo_accuracy(scenes=args.demo_scenes)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
