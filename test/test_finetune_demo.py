"""Fine-tuning the bundled demo model (mobilevlm_ros.finetune.demo): the mechanics of a short run, and the shipped
adapter of the proof (docs/FINETUNE.md) answering the stop-or-go question it was taught."""
from __future__ import annotations

import json

import numpy as np
import torch

from mobilevlm_ros.demo import DEFAULT_MODEL_DIR
from mobilevlm_ros.demo.scenes import make_scene, stop_or_go
from mobilevlm_ros.finetune.data import load_examples
from mobilevlm_ros.finetune.demo import SHIPPED_ADAPTER, evaluate_stop_or_go, write_dataset
from mobilevlm_ros.finetune.lora import LoraSettings, merge_adapter
from mobilevlm_ros.finetune.train import FinetuneSettings, example_loss, finetune
from mobilevlm_ros.model import MobileVLMPipeline, SamplingParams, load_model
from mobilevlm_ros.model.pipeline import load_checkpoint

SHORT = SamplingParams(max_new_tokens=4, temperature=0.0)  # "stop" or "go" and the end of the answer


def prefill_logits(pipeline: MobileVLMPipeline, image: np.ndarray, question: str) -> torch.Tensor:
    with torch.inference_mode():
        pixels = pipeline.pixel_values(image)
        embeds = pipeline.model.embed_prompt(pipeline.prompt_ids(question), pipeline.encode_images(pixels))
        return pipeline.model.prefill(embeds)


def test_short_run_lowers_the_loss_and_merged_checkpoint_equals_base_plus_adapter(tmp_path):
    """A few steps on generated scenes lower the training loss; the adapter is in PEFT's layout; the merged
    checkpoint loads through MobileVLMPipeline.load and gives bit-identical logits to the base with the adapter
    merged at load (the node's `adapter` parameter path)."""
    data = write_dataset(tmp_path / "data", scenes=4)
    settings = FinetuneSettings(lora=LoraSettings(r=8, alpha=16.0), learning_rate=3e-3, batch_size=4, epochs=1,
                                gradient_checkpointing=False)
    result = finetune(DEFAULT_MODEL_DIR, data, tmp_path / "out", settings, merge=True, log=lambda line: None)
    assert result.steps == 3 and result.examples == 12

    base, tokenizer = load_model(DEFAULT_MODEL_DIR)
    examples = load_examples(data, tokenizer, base.config.image_tokens, 2048)
    tuned, _ = load_model(result.merged_dir)
    with torch.no_grad():
        assert float(example_loss(tuned, examples)) < float(example_loss(base, examples))

    from safetensors.torch import load_file

    keys = load_file(result.out_dir / "adapter_model.safetensors")
    assert len(keys) == 4 * 7 * 2 and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert json.loads((result.out_dir / "adapter_config.json").read_text())["r"] == 8

    model, tokenizer = load_checkpoint(DEFAULT_MODEL_DIR)
    merge_adapter(model, result.out_dir)
    with_adapter = MobileVLMPipeline(model, tokenizer, max_seq_len=512)
    merged = MobileVLMPipeline.load(result.merged_dir, max_seq_len=512, onednn=False)
    scene = make_scene(4242, 0)
    question = stop_or_go(scene, np.random.default_rng(0)).question
    assert torch.equal(prefill_logits(with_adapter, scene.image, question), prefill_logits(merged, scene.image, question))


def test_shipped_adapter_answers_the_new_question():
    """The proof's adapter (docs/FINETUNE.md), merged into the demo model at load, answers the stop-or-go question
    on held-out scenes at least 90% right, where the base model never answers it ("stop" or "go" at all)."""
    model, tokenizer = load_checkpoint(DEFAULT_MODEL_DIR)
    base = MobileVLMPipeline(model, tokenizer, max_seq_len=512)
    correct, asked, given = evaluate_stop_or_go(base, seed=777, scenes=10, params=SHORT)
    assert correct <= asked // 2 + 2, given

    model, tokenizer = load_checkpoint(DEFAULT_MODEL_DIR)
    merge_adapter(model, SHIPPED_ADAPTER)
    tuned = MobileVLMPipeline(model, tokenizer, max_seq_len=512)
    correct, asked, given = evaluate_stop_or_go(tuned, seed=777, scenes=40, params=SHORT)
    assert correct >= 0.9 * asked, given
