"""bfloat16 and float16 against the float32 goldens.

Stated tolerance: every prefill and KV-cached step logit within LOGIT_TOL of the float32 reference (logits are
O(1) here). Greedy ids must then be identical at least up to the first step whose reference top-1/top-2 margin is
below 2 * LOGIT_TOL: above that margin no error within tolerance can change the argmax.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import CHECKPOINT_NAMES, CHECKPOINTS, REFERENCE, golden_cases
from mobilevlm_ros.model import MobileVLMPipeline, SamplingParams

LOGIT_TOL = {"float16": 0.05, "bfloat16": 0.25}


@pytest.mark.parametrize("dtype", sorted(LOGIT_TOL))
@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_half_precision_against_float32(dtype, checkpoint):
    vlm = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, dtype=dtype)
    tol = LOGIT_TOL[dtype]
    for case in golden_cases(checkpoint):
        golden = load_file(REFERENCE / "goldens" / checkpoint / f"{case['case']}.safetensors")
        image = Image.open(REFERENCE / case["image"])
        with torch.inference_mode():
            embeds = vlm.model.embed_prompt(case["input_ids"], vlm.encode_images(vlm.pixel_values(image)))
            assert embeds.dtype == getattr(torch, dtype)
            logits = [vlm.model.prefill(embeds)]
            for i, token in enumerate(case["generated_ids"][:-1]):
                logits.append(vlm.decode_step(torch.tensor([token]), embeds.shape[1] + i))
        diff = (torch.cat(logits).float() - golden["step_logits"]).abs().max().item()
        assert diff < tol, f"{case['case']}: max logit error {diff:.4f} >= {tol}"

        answer = vlm.ask(image, case["turns"], SamplingParams(max_new_tokens=len(case["generated_ids"])))
        safe = next((i for i, m in enumerate(case["margins"]) if m < 2 * tol), len(case["margins"]))
        assert answer.generated_ids[:safe] == case["generated_ids"][:safe], case["case"]
