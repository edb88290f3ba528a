"""Decoder fast paths: CPU int8 / int8-dynamic / int4 quantisation (accuracy against float32) and the static-shape
decode step that the CUDA graphs capture (checked on CPU against the eager path; on a GPU when one is present)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from conftest import CHECKPOINT_NAMES, CHECKPOINTS, REFERENCE, golden_cases
from mobilevlm_ros.model import MobileVLMPipeline, SamplingParams
from mobilevlm_ros.model.quantize import (Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_linear, quantize_llm,
                                          weight_bytes)
from mobilevlm_ros.options import QUANTIZE_MODES


def _linear(n=512, k=256, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data = torch.randn(n, k) / k ** 0.5
    return lin


@pytest.mark.parametrize("mode,max_rel", [("int8", 0.02), ("int8-dynamic", 0.05), ("int4", 0.12)])
def test_quantized_linear_error_and_shapes(mode, max_rel):
    lin = _linear()
    x = torch.randn(2, 5, 256)
    ref = lin(x)
    q = quantize_linear(copy.deepcopy(lin), mode)
    out = q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert ((out - ref).norm() / ref.norm()).item() < max_rel
    assert torch.equal(q(x[:, :1]), out[:, :1]) or mode == "int8-dynamic"  # row-independent (dynamic: per-call
    # activation ranges make it batch-dependent by design)


def test_int4_dequantisation_formula():
    """The packed kernel computes x @ ((q - 8) * scale + zero)^T with our scales_and_zeros layout."""
    from mobilevlm_ros.model.quantize import int4_groupwise

    lin = _linear(64, 128)
    q, sz = int4_groupwise(lin.weight, 32)
    scale, zero = sz[..., 0].t().repeat_interleave(32, 1), sz[..., 1].t().repeat_interleave(32, 1)
    dequant = (q.float() - 8) * scale + zero
    x = torch.randn(3, 128)
    out = Int4WeightOnlyLinear.from_linear(lin)(x)
    expected = x.bfloat16().float() @ dequant.t()  # the kernel takes bfloat16 activations
    assert (out - expected).abs().max().item() < 2e-2 * expected.abs().max().item()


def test_weight_bytes_counts_the_weights_not_the_kv_cache():
    """weight_bytes is what a checkpoint holds: allocating the KV cache and RoPE tables (non-persistent buffers)
    does not change it (the e2e benchmark's follow-up floor and the GPU check's bandwidth floor divide by it)."""
    from mobilevlm_ros.bench.models import random_mobilevlm, real_config

    llm = random_mobilevlm(real_config("MobileVLM-1.7B", llm_layers=1), vision=False).llm
    parameters = sum(p.numel() * p.element_size() for p in llm.parameters())
    assert weight_bytes(llm) == parameters
    llm.setup_cache(512, batch=4)
    assert weight_bytes(llm) == parameters


def test_quantize_llm_replaces_every_linear_and_shrinks_weights():
    from mobilevlm_ros.bench.models import random_mobilevlm, real_config

    config = real_config("MobileVLM-1.7B", llm_layers=1)
    fp32 = random_mobilevlm(config, vision=False).llm
    total = weight_bytes(fp32)
    linear = sum(m.weight.numel() * 4 for m in fp32.modules() if isinstance(m, nn.Linear))
    int8 = quantize_llm(fp32, "int8")  # in place
    assert not any(isinstance(m, nn.Linear) for m in int8.modules())
    assert sum(isinstance(m, Int8WeightOnlyLinear) for m in int8.modules()) == 8  # q k v o gate up down lm_head
    assert weight_bytes(int8) == pytest.approx(total - linear * 3 / 4, rel=0.01)
    int4 = random_mobilevlm(config, quant="int4", vision=False).llm  # built layer by layer, never float
    # 4 bits per weight plus a bfloat16 scale and zero per group of 32: 0.625 bytes per weight
    assert weight_bytes(int4) == pytest.approx(total - linear * (1 - 0.625 / 4), rel=0.01)
    with pytest.raises(ValueError):
        quantize_llm(int4, "int3")


@pytest.fixture(scope="module")
def agreement():
    """Real-shaped MobileLLaMA-1.4B layers (hidden 2048, MLP 5632, 16 heads, vocab 32000), 2 of 24 layers."""
    from mobilevlm_ros.bench.accuracy import real_shaped_agreement

    result = real_shaped_agreement("MobileVLM-1.7B", layers=2, tokens=24)
    print(result)
    return result


# Floors well under what was measured here (24 tokens: int8 0.92, int8-dynamic 0.88, int4 0.75 top-1 agreement,
# reference top-1 always in the candidate's top 5) on random weights, whose logit margins are far thinner than a
# trained model's; other CPUs round differently, hence the slack.
@pytest.mark.parametrize("mode,min_top1,min_top5", [("int8", 0.75, 0.95), ("int8-dynamic", 0.7, 0.95),
                                                    ("int4", 0.5, 0.9)])
def test_logit_agreement_on_real_shaped_model(agreement, mode, min_top1, min_top5):
    m = agreement["modes"][mode]
    assert m["top1_agreement"] >= min_top1, m
    assert m["ref_top1_in_top5"] >= min_top5, m
    assert m["mean_abs_diff"] < 0.5 * m["ref_logit_std"], m
    assert m["weight_bytes"] < agreement["float32_weight_bytes"] / 2  # the float32 embedding table is kept


@pytest.mark.parametrize("mode,layer", [("int8", Int8WeightOnlyLinear), ("int8-dynamic", DynamicQuantizedLinear)])
def test_int8_keeps_the_reference_answers_close(mode, layer):
    """On the tiny reference checkpoints int8 decoding (weight-only, and with dynamically quantised activations:
    the mode README recommends on the CPU) keeps at least the first tokens of the golden greedy answers (their
    margins are as thin as 0.0025, so full equality is not expected)."""
    for name in CHECKPOINT_NAMES:
        vlm = MobileVLMPipeline.load(CHECKPOINTS / name, quantize=mode)
        assert any(isinstance(m, layer) for m in vlm.model.llm.modules())
        case = golden_cases(name)[0]
        answer = vlm.ask(Image.open(REFERENCE / case["image"]), case["turns"], SamplingParams(max_new_tokens=4))
        assert answer.generated_ids[0] == case["generated_ids"][0]


# ------------------------------------------------------------------------------------ static-shape decode step


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_masked_static_decode_matches_eager_on_goldens(pipelines, checkpoint):
    """The computation the CUDA graphs capture (attend over a fixed bucket of the cache with a position mask)
    gives the eager path's logits and the golden greedy ids, on CPU in float32."""
    from mobilevlm_ros.model.cuda_graph import buckets_for, eager_masked_step

    vlm = pipelines[checkpoint]
    model = vlm.model
    case = golden_cases(checkpoint)[0]
    from safetensors.torch import load_file

    golden = load_file(REFERENCE / "goldens" / checkpoint / f"{case['case']}.safetensors")
    stem = Path(case["image"]).stem
    pixels = load_file(REFERENCE / "goldens" / "pixel_values" / f"{stem}.safetensors")["pixel_values"]
    with torch.inference_mode():
        embeds = model.embed_prompt(golden["input_ids"][0].tolist(), model.encode_images(pixels))
        token = model.prefill(embeds).argmax(-1)
        pos = embeds.shape[1]
        ids = [int(token)]
        bucket = buckets_for(vlm.max_seq_len)[0]
        for _ in range(golden["generated_ids"].shape[1] - 1):
            eager = model.decode_step(token, pos)
            # re-run the same position through the masked path: it rewrites the same K/V, so the cache is unchanged
            static = eager_masked_step(model, token, pos, bucket)
            torch.testing.assert_close(static, eager, atol=1e-5, rtol=0)
            token = static.argmax(-1)
            ids.append(int(token))
            pos += 1
    assert ids == golden["generated_ids"][0].tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_is_identical_to_eager_float16(tmp_path):
    from mobilevlm_ros.bench.gpu_check import check_cuda_graph_greedy

    for result in check_cuda_graph_greedy():
        assert result["graph_ids"] == result["eager_ids"], result
        assert result["max_logit_diff_graph_vs_static_eager"] == 0.0, result


@pytest.mark.parametrize("mode", [None, *QUANTIZE_MODES], ids=lambda mode: mode or "float32")
def test_demo_model_keeps_its_accuracy_quantised(mode):
    """The bundled (trained) demo model answers held-out scenes as well with int8, int8-dynamic or int4 weights
    (200 scenes at shipping: within one colour answer of float32 in every mode, docs/DEMO_MODEL.md); here 40
    scenes, through the pipeline the node builds (MobileVLMPipeline.load with the mode)."""
    from mobilevlm_ros.bench.accuracy import demo_report

    accuracy = demo_report(scenes=40, quantize=mode)
    assert min(accuracy.values()) >= 0.9, accuracy
