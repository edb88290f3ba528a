"""The inference core against goldens produced by the authors' reference code (see data/reference/README.md)."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from conftest import CHECKPOINT_NAMES, CHECKPOINTS, REFERENCE, golden_cases
from mobilevlm_ros.cli.ask import main as ask_main
from mobilevlm_ros.model import SamplingParams
from mobilevlm_ros.model.config import MobileVLMConfig, LlamaConfig
from mobilevlm_ros.model.cpu_linear import OneDNNLinear
from mobilevlm_ros.model.image import preprocess
from mobilevlm_ros.model.projector import build_projector

ATOL = 1e-4
IMAGES = sorted(p.stem for p in (REFERENCE / "images").iterdir())
CASES = [(ck, case) for ck in CHECKPOINT_NAMES for case in golden_cases(ck)]


def image_path(stem: str):
    return next((REFERENCE / "images").glob(stem + ".*"))


@pytest.mark.parametrize("stem", IMAGES)
def test_pixel_values(stem):
    golden = load_file(REFERENCE / "goldens" / "pixel_values" / f"{stem}.safetensors")["pixel_values"]
    pixels = preprocess(Image.open(image_path(stem)))
    if image_path(stem).suffix == ".png":
        assert torch.equal(pixels, golden)
    else:  # JPEG: another libjpeg build may differ by one level in a few pixels (README quirk 7)
        assert (pixels - golden).abs().max() < 0.02


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_pipelines_run_the_nodes_kernels(pipelines, checkpoint):
    """The goldens below run through the pipeline as the node loads it (onednn=True): on x86 its vision tower,
    projector and decoder are on oneDNN layers, and images go through the model's torch encoder over them."""
    vlm = pipelines[checkpoint]
    assert vlm.encode_images == vlm.model.encode_images
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert vlm.fast_paths.onednn_layers
        for part in (vlm.model.vision_tower, vlm.model.mm_projector, vlm.model.llm):
            linears = [m for m in part.modules() if isinstance(m, (nn.Linear, OneDNNLinear))]
            assert linears and all(isinstance(m, OneDNNLinear) for m in linears)


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
@pytest.mark.parametrize("stem", IMAGES)
def test_vision_features_and_projector(pipelines, checkpoint, stem):
    vlm = pipelines[checkpoint]
    model = vlm.model
    golden = load_file(REFERENCE / "goldens" / checkpoint / f"vision_{stem}.safetensors")
    pixels = load_file(REFERENCE / "goldens" / "pixel_values" / f"{stem}.safetensors")["pixel_values"]
    with torch.inference_mode():
        features = model.vision_tower(pixels)
        projected = model.mm_projector(features)
        encoded = vlm.encode_images(pixels)  # the pipeline's vision encoder, the one the node runs
    torch.testing.assert_close(features, golden["vision_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(projected, golden["projector_output"], atol=ATOL, rtol=0)
    assert torch.equal(encoded, projected)


@pytest.mark.parametrize("kind", ["ldpnet", "ldpnetv2"])
def test_projector_only_goldens(kind):
    meta = json.loads((REFERENCE / "projector" / "projector_meta.json").read_text())[kind]
    config = MobileVLMConfig(llama=LlamaConfig(hidden_size=meta["hidden_size"]), vision=None,
                             projector_type=kind, mm_hidden_size=meta["mm_hidden_size"])
    projector = build_projector(config)
    weights = load_file(REFERENCE / "projector" / f"{kind}_weights.safetensors")
    projector.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in weights.items()}, strict=True)
    io = load_file(REFERENCE / "projector" / f"{kind}_io.safetensors")
    with torch.inference_mode():
        torch.testing.assert_close(projector(io["input"]), io["output"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("grid", [24, 18, 12])
def test_ldpnetv2_pools_any_patch_grid_to_12x12_as_the_reference(grid):
    """The reference pools with nn.AdaptiveAvgPool2d((12, 12)): 144 tokens whatever the patch grid (ViT-L/14's is
    24 x 24, the bundled demo tower's 12 x 12)."""
    torch.manual_seed(0)
    config = MobileVLMConfig(llama=LlamaConfig(hidden_size=32), vision=None, projector_type="ldpnetv2",
                             mm_hidden_size=16)
    projector = build_projector(config)
    x = torch.randn(2, grid * grid, 16)
    with torch.inference_mode():
        pooled = torch.nn.AdaptiveAvgPool2d((12, 12))(projector.mlp.mlp(x).transpose(1, 2).reshape(2, 32, grid, grid))
        expected = (projector.peg.peg(pooled) + pooled).flatten(2).transpose(1, 2)
        torch.testing.assert_close(projector(x), expected, atol=1e-6, rtol=0)
    assert config.image_tokens == 144


def _golden_tensors(checkpoint, case):
    return load_file(REFERENCE / "goldens" / checkpoint / f"{case['case']}.safetensors")


@pytest.mark.parametrize("checkpoint,case", CASES, ids=[f"{ck}-{c['case']}" for ck, c in CASES])
def test_prefill_and_kv_cached_step_logits(pipelines, checkpoint, case):
    """Teacher-forced through the static cache: prefill logits, then every logit of the pipeline's decode step."""
    vlm = pipelines[checkpoint]
    golden = _golden_tensors(checkpoint, case)
    input_ids = vlm.prompt_ids(case["turns"])
    assert input_ids == golden["input_ids"][0].tolist() == case["input_ids"]
    assert len(input_ids) - 1 + 144 == case["prefill_len_after_splice"]
    with torch.inference_mode():
        pixels = vlm.pixel_values(Image.open(REFERENCE / case["image"]))
        embeds = vlm.model.embed_prompt(input_ids, vlm.encode_images(pixels))
        logits = [vlm.model.prefill(embeds)]
        pos = embeds.shape[1]
        for token in case["generated_ids"][:-1]:
            logits.append(vlm.decode_step(torch.tensor([token]), pos))
            pos += 1
    logits = torch.cat(logits)
    torch.testing.assert_close(logits[:1], golden["logits_last"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, golden["step_logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("checkpoint,case", CASES, ids=[f"{ck}-{c['case']}" for ck, c in CASES])
def test_greedy_generation_python_api(pipelines, checkpoint, case):
    vlm = pipelines[checkpoint]
    pieces: list[str] = []
    answer = vlm.ask(Image.open(REFERENCE / case["image"]), case["turns"],
                     SamplingParams(max_new_tokens=len(case["generated_ids"])),
                     on_text=lambda piece, _: pieces.append(piece))
    assert answer.input_ids == case["input_ids"]
    assert answer.generated_ids == case["generated_ids"]
    assert answer.text == case["output_text"]
    assert answer.stopped_by == case["stopped_by"] == "max_new_tokens"
    assert "".join(pieces) == answer.text  # the streamed pieces add up to the answer
    for key in ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms", "decode_tokens_per_s"):
        assert answer.timings[key] > 0


@pytest.mark.parametrize("checkpoint,case", CASES, ids=[f"{ck}-{c['case']}" for ck, c in CASES])
def test_greedy_generation_cli_json(checkpoint, case, tmp_path, capsys):
    args = ["--model", str(CHECKPOINTS / checkpoint), "--image", str(REFERENCE / case["image"]),
            "--max-new-tokens", str(len(case["generated_ids"])), "--json"]
    if len(case["turns"]) == 1:
        args.append(case["turns"][0])
    else:
        chat = tmp_path / "chat.json"
        chat.write_text(json.dumps(case["turns"]))
        args += ["--chat", str(chat)]
    assert ask_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_ids"] == case["input_ids"]
    assert out["generated_ids"] == case["generated_ids"]
    assert out["answer"] == case["output_text"]
    assert out["timings"]["ttft_ms"] > 0


def test_installed_console_script(tmp_path):
    """The real entry point in a child process, run from an unrelated working directory."""
    exe = shutil.which("mobilevlm") or str(__import__("pathlib").Path(sys.executable).parent / "mobilevlm")
    case = golden_cases("MobileVLM_V2-tiny")[3]
    proc = subprocess.run([exe, "ask", "--model", str(CHECKPOINTS / "MobileVLM_V2-tiny"), "--image",
                           str(REFERENCE / case["image"]), "--max-new-tokens", "16", "--json", case["turns"][0]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["generated_ids"] == case["generated_ids"] and out["answer"] == case["output_text"]
