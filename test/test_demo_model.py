"""The bundled demo model: published layout, same loader, and accuracy on freshly generated held-out scenes."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from mobilevlm_ros.demo import DEFAULT_MODEL_DIR
from mobilevlm_ros.demo.scenes import QUESTION_TYPES, answer_matches, make_scene
from mobilevlm_ros.model import MobileVLMPipeline, load_model
from mobilevlm_ros.model.loader import EMBEDDED_VISION_PREFIX, read_tensors, weight_files
from mobilevlm_ros.train.evaluate import evaluate

HELD_OUT_SEED = 20240  # the shipped model was trained on seed 0's scenes
HELD_OUT_SCENES = 200
MIN_ACCURACY = 0.95


@pytest.fixture(scope="module")
def vlm() -> MobileVLMPipeline:
    return MobileVLMPipeline.load(DEFAULT_MODEL_DIR, max_seq_len=512)


def test_bundled_model_has_the_published_layout():
    d = DEFAULT_MODEL_DIR
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "model.safetensors"):
        assert (d / name).is_file(), name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "mobilevlm" and cfg["vision_tower_type"] == "clip"
    assert cfg["mm_projector_type"] == "ldpnetv2" and cfg["mm_vision_select_layer"] == -2
    assert cfg["mm_vision_select_feature"] == "patch" and cfg["image_aspect_ratio"] == "pad"
    assert cfg["mm_use_im_start_end"] is False and cfg["mm_use_im_patch_token"] is False
    clip = d / cfg["mm_vision_tower"]
    clip_cfg = json.loads((clip / "config.json").read_text())
    assert clip_cfg["image_size"] == 336 and clip_cfg["patch_size"] == 28  # a 12 x 12 grid: LDP v2 keeps 144
    assert clip_cfg["hidden_size"] == cfg["mm_hidden_size"]
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"bundled model is {size / 2**20:.1f} MiB"
    keys = [k for path in weight_files(d) for k, _ in read_tensors(path)]
    assert any(k.startswith(EMBEDDED_VISION_PREFIX + "encoder.layers.") for k in keys)
    assert "lm_head.weight" in keys and "model.mm_projector.peg.peg.0.weight" in keys


def test_bundled_model_loads_through_the_package_loader():
    model, tokenizer = load_model(DEFAULT_MODEL_DIR)
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert model.config.image_tokens == 144 and model.config.vision.num_patches == 144
    assert model.config.vision.hidden_size == cfg["mm_hidden_size"]
    assert tokenizer.vocab_size == cfg["vocab_size"] and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


def test_accuracy_on_held_out_scenes(vlm):
    report = evaluate(vlm, seed=HELD_OUT_SEED, scenes=HELD_OUT_SCENES)
    print(f"\nbundled demo model on {HELD_OUT_SCENES} held-out scenes (seed {HELD_OUT_SEED}), greedy, "
          "through MobileVLMPipeline.ask:\n" + report.table())
    for mistake in report.mistakes[:20]:
        print("  miss:", mistake)
    for kind in QUESTION_TYPES:
        assert report.asked[kind] >= 80, kind  # traffic-light questions: about 90 in 200 scenes
        assert report.accuracy(kind) >= MIN_ACCURACY, f"{kind}: {report.accuracy(kind):.3f}"
    # captions, held to the same bar: at least 95% of them name every object class present (198/200 at shipping)
    assert report.caption_covers >= MIN_ACCURACY * report.scenes, f"captions: {report.caption_covers}/{report.scenes}"


def test_mobilevlm_ask_uses_the_bundled_model_by_default(tmp_path, capsys):
    from mobilevlm_ros.cli import ask

    scene = next(s for s in (make_scene(HELD_OUT_SEED + 1, i) for i in range(50)) if s.count("cone") >= 2)
    path = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(path)
    assert ask.main(["--image", str(path), "How many cones are there?"]) == 0
    assert answer_matches(capsys.readouterr().out, str(scene.count("cone")))


def test_train_demo_command_writes_a_loadable_checkpoint(tmp_path):
    """mobilevlm dev train-demo end to end on a toy budget: every phase runs and the result loads and answers through
    the inference pipeline (the full recipe is the same code with larger numbers)."""
    import subprocess
    import sys

    out = tmp_path / "model"
    toy = {"scenes": 24, "vision_steps": 2, "vision_batch": 4, "align_steps": 1, "align_batch": 4,
           "instruct_steps": 2, "instruct_batch": 4}
    cmd = [sys.executable, "-m", "mobilevlm_ros.train.cli", "--out", str(out), "--seed", "3", "--workers", "1"]
    for name, value in toy.items():
        cmd += ["--set", f"{name}={value}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "phase 3: instruction tuning" in done.stdout
    info = json.loads((out / "training.json").read_text())
    assert info["recipe"]["seed"] == 3 and info["recipe"]["instruct_steps"] == 2
    vlm = MobileVLMPipeline.load(out, max_seq_len=512)
    answer = vlm.ask(make_scene(5, 0).image, "How many cones are there?")
    assert answer.generated_ids and answer.stopped_by in ("eos", "stop_str", "max_new_tokens")


def _tiny_training_model(tmp_path):
    import torch

    from mobilevlm_ros.model.config import MobileVLMConfig
    from mobilevlm_ros.model.tokenizer import Tokenizer
    from mobilevlm_ros.train.modules import init_weights
    from mobilevlm_ros.train.recipe import BlockEncoder, Recipe, VLMForTraining
    from mobilevlm_ros.train.text import corpus, train_tokenizer

    scenes = [make_scene(1, i) for i in range(20)]
    (tmp_path / "tokenizer.model").write_bytes(train_tokenizer(corpus(scenes, 0), 512))
    tok = Tokenizer(tmp_path / "tokenizer.model")
    enc = BlockEncoder(tok)
    r = Recipe(llm_width=32, llm_layers=2, llm_heads=2, llm_mlp=64, vision_width=16, vision_mlp=32, vision_heads=2)
    cfg = MobileVLMConfig(llama=r.llama_config(tok.vocab_size), vision=r.vision_config(), projector_type="ldpnetv2",
                          mm_hidden_size=r.vision_width, image_aspect_ratio="pad", use_im_patch_token=False)
    torch.manual_seed(0)
    model = VLMForTraining(cfg, enc.prefix, subject_layer=1)
    init_weights(model, 0.2)
    return model.eval(), enc, scenes


def test_packed_training_forward_equals_single_turn_inference_forward(tmp_path):
    """Packing several single-turn conversations after one image computes each exactly as it runs alone."""
    import torch

    from mobilevlm_ros.train.modules import packed_forward
    from mobilevlm_ros.train.recipe import pack

    model, enc, scenes = _tiny_training_model(tmp_path)
    rows = [[enc.block(qa.question, qa.answer) for qa in s.qa] for s in scenes[:2]]
    features = torch.randn(2, 144, 16)
    context = len(enc.prefix) + 144
    batch = pack(rows, context)
    embed = model.llm.embed_tokens
    with torch.no_grad():
        image = model.mm_projector(features)
        embeds = torch.cat([embed(model.prefix).expand(2, -1, -1), image, embed(batch.ids)], dim=1)
        hidden = packed_forward(model.llm, embeds, batch.positions, batch.mask)[-1]
        packed = model.llm.lm_head(model.llm.norm(hidden[batch.pred_rows, batch.pred_cols]))
        alone = []
        for i, row in enumerate(rows):
            for ids, flags in row:
                logits = model.llm.forward_all(torch.cat([embed(model.prefix), image[i], embed(torch.tensor(ids))])[None])
                alone += [logits[0, context + k - 1] for k in range(1, len(ids)) if flags[k]]
    assert packed.shape[0] == len(alone) == len(batch.targets)
    torch.testing.assert_close(packed, torch.stack(alone), atol=1e-4, rtol=1e-4)


def test_lora_merges_into_plain_weights():
    import torch

    from mobilevlm_ros.model.config import LlamaConfig
    from mobilevlm_ros.model.llama import MobileLlama
    from mobilevlm_ros.train.modules import LoRALinear, add_lora, merge_lora

    torch.manual_seed(0)
    llm = MobileLlama(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                  num_kv_heads=2))
    add_lora(llm, rank=4, alpha=8.0)
    for m in llm.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.1)
    x = torch.randn(1, 7, 32)
    with torch.no_grad():
        before = llm.forward_all(x)
        merge_lora(llm)
        after = llm.forward_all(x)
    assert not any(isinstance(m, LoRALinear) for m in llm.modules())
    assert set(llm.state_dict()) == set(MobileLlama(llm.config).state_dict())
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
