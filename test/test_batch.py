"""Batches (MobileVLMPipeline.ask_batch, generate.generate_batch): every row answers exactly as the same request
alone, on the reference goldens of both checkpoints (V1, V2), through the node's kernels (oneDNN layers and the
compiled decode step on x86), torch's eager kernels and the quantised decoders."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import CHECKPOINT_NAMES, CHECKPOINTS, REFERENCE, golden_cases
from mobilevlm_ros.model import MobileVLMPipeline, SamplingParams
from mobilevlm_ros.model.cuda_graph import buckets_for, eager_masked_step
from mobilevlm_ros.options import QUANTIZE_MODES

ATOL = 1e-4
KERNELS = ["node", "eager"]  # the pipeline as the node loads it (shared fixture), and onednn=False


def _images(cases):
    return [Image.open(REFERENCE / case["image"]) for case in cases]


def _pipeline(pipelines, checkpoint, kernels):
    return pipelines[checkpoint] if kernels == "node" else MobileVLMPipeline.load(CHECKPOINTS / checkpoint,
                                                                                  onednn=False)


def _counting_cancel(after_polls: int):
    """A cancelled() that says yes from its after_polls-th call on: ask_batch polls it once after the vision
    encode, once after the prefill and once after each token, so after_polls = n + 2 cancels a row after its n-th
    token."""
    polls = []

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) >= after_polls

    return cancelled


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_every_reference_case_in_one_mixed_batch(pipelines, checkpoint, kernels):
    """All cases of a checkpoint (prompts of different lengths, single and multi-turn) in one batch: each row's
    ids, text, prompt and streamed pieces are the goldens, as alone."""
    vlm = _pipeline(pipelines, checkpoint, kernels)
    cases = golden_cases(checkpoint)
    assert len({len(case["input_ids"]) for case in cases}) > 1  # the batch really mixes prompt lengths
    pieces: list[list[str]] = [[] for _ in cases]
    answers = vlm.ask_batch(_images(cases), [case["turns"] for case in cases], SamplingParams(max_new_tokens=16),
                            on_text=[lambda piece, _, row=row: row.append(piece) for row in pieces])
    for answer, case, streamed in zip(answers, cases, pieces):
        assert answer.input_ids == case["input_ids"]
        assert answer.generated_ids == case["generated_ids"]
        assert answer.text == case["output_text"] == "".join(streamed)
        assert answer.stopped_by == "max_new_tokens"
    # the cache, grown for the batch, serves one request alone as before
    alone = vlm.ask(_images(cases[:1])[0], cases[0]["turns"], SamplingParams(max_new_tokens=16))
    assert alone.generated_ids == cases[0]["generated_ids"]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_batched_decode_logits_match_the_goldens(pipelines, checkpoint, kernels):
    """Teacher-forced: every case prefilled into its cache row, then every step of all rows in one batched
    decode step (each row at its own position): each row's logits within 1e-4 of the reference's."""
    vlm = _pipeline(pipelines, checkpoint, kernels)
    cases = golden_cases(checkpoint)
    goldens = [load_file(REFERENCE / "goldens" / checkpoint / f"{case['case']}.safetensors") for case in cases]
    with torch.inference_mode():
        pixels = torch.cat([vlm.pixel_values(image) for image in _images(cases)])
        image_tokens = vlm.encode_images(pixels)  # one batched vision encode
        vlm.model.llm.setup_cache(vlm.max_seq_len, len(cases))
        logits: list[list[torch.Tensor]] = []
        positions = []
        for row, case in enumerate(cases):
            embeds = vlm.model.embed_prompt(case["input_ids"], image_tokens[row:row + 1])
            logits.append([vlm.model.prefill(embeds, row)])
            positions.append(embeds.shape[1])
        steps = len(cases[0]["generated_ids"]) - 1
        assert all(len(case["generated_ids"]) == steps + 1 for case in cases)
        for step in range(steps):
            tokens = torch.tensor([case["generated_ids"][step] for case in cases])
            out = vlm.decode_step(tokens, [pos + step for pos in positions])
            for row in range(len(cases)):
                logits[row].append(out[row:row + 1])
    for row_logits, golden in zip(logits, goldens):
        torch.testing.assert_close(torch.cat(row_logits), golden["step_logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_a_cancelled_row_leaves_the_others_alone(pipelines, checkpoint):
    """Row 1 is cancelled after its third token, row 2 before its prefill (during the vision encode): they stop
    there, and the other rows give their golden answers."""
    vlm = pipelines[checkpoint]
    cases = golden_cases(checkpoint)[:4]
    answers = vlm.ask_batch(_images(cases), [case["turns"] for case in cases], SamplingParams(max_new_tokens=16),
                            cancelled=[None, _counting_cancel(5), lambda: True, None])
    assert answers[1].stopped_by == "cancelled" and answers[1].generated_ids == cases[1]["generated_ids"][:3]
    assert answers[2].stopped_by == "cancelled" and answers[2].generated_ids == [] and answers[2].text == ""
    assert answers[2].timings["prefill_ms"] == 0
    for row in (0, 3):
        assert answers[row].generated_ids == cases[row]["generated_ids"]
        assert answers[row].text == cases[row]["output_text"]


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_rows_finishing_early(pipelines, checkpoint):
    """Rows with fewer tokens to go finish first (the first row, which then rides along, and the last, which
    leaves the batch), each with its golden prefix; the rows still running are undisturbed."""
    vlm = pipelines[checkpoint]
    cases = golden_cases(checkpoint)
    budgets = [2, 16, 7, 16, 1][:len(cases)]
    answers = vlm.ask_batch(_images(cases), [case["turns"] for case in cases],
                            [SamplingParams(max_new_tokens=n) for n in budgets])
    for answer, case, n in zip(answers, cases, budgets):
        assert answer.generated_ids == case["generated_ids"][:n]
        assert answer.stopped_by == "max_new_tokens"
        assert answer.text == vlm.ask(Image.open(REFERENCE / case["image"]), case["turns"],
                                      SamplingParams(max_new_tokens=n)).text


def test_seeded_sampling_rows_as_alone(pipelines):
    """Each row samples with its own params and seeded generator, as alone."""
    vlm = pipelines["MobileVLM_V2-tiny"]
    cases = golden_cases("MobileVLM_V2-tiny")[:3]
    params = [SamplingParams(12, temperature=1.5, seed=7), SamplingParams(12), SamplingParams(12, 1.0, top_k=5, seed=3)]
    answers = vlm.ask_batch(_images(cases), [case["turns"] for case in cases], params)
    for answer, image, case, p in zip(answers, _images(cases), cases, params):
        assert answer.generated_ids == vlm.ask(image, case["turns"], p).generated_ids


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_quantised_decoders_batch_as_alone(checkpoint, mode):
    """Each quantised decoder answers every row of a mixed batch as alone: the same greedy ids; and int8-dynamic,
    whose activations stay float32, teacher-forced with them, each row's batched decode logits within 1e-4 of its
    own alone (it quantises each row on its own range and multiplies the rows together, quantize.DynamicInt8Linear).
    The weight-only kernels take bfloat16 activations (quantize.CPU_ACT_DTYPE): their logits agree to bfloat16's
    precision, not 1e-4, so for them the ids are the check."""
    vlm = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, quantize=mode)
    cases = golden_cases(checkpoint)
    params = SamplingParams(max_new_tokens=16)
    alone = [vlm.ask(image, case["turns"], params).generated_ids for image, case in zip(_images(cases), cases)]
    batch = vlm.ask_batch(_images(cases), [case["turns"] for case in cases], params)
    assert [answer.generated_ids for answer in batch] == alone
    if mode != "int8-dynamic":
        return
    steps = min(len(ids) for ids in alone) - 1
    with torch.inference_mode():
        image_tokens = vlm.encode_images(torch.cat([vlm.pixel_values(image) for image in _images(cases)]))
        embeds = [vlm.model.embed_prompt(case["input_ids"], image_tokens[row:row + 1]) for row, case in enumerate(cases)]
        alone_logits = []
        for prompt, ids in zip(embeds, alone):
            vlm.model.prefill(prompt, 0)
            alone_logits.append(torch.cat([vlm.decode_step(torch.tensor([ids[step]]), prompt.shape[1] + step)
                                           for step in range(steps)]))
        for row, prompt in enumerate(embeds):
            vlm.model.prefill(prompt, row)
        batched = [vlm.decode_step(torch.tensor([ids[step] for ids in alone]),
                                   [prompt.shape[1] + step for prompt in embeds]) for step in range(steps)]
    for row, expected in enumerate(alone_logits):
        torch.testing.assert_close(torch.stack([out[row] for out in batched]), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_static_masked_batch_step_as_the_cuda_graphs_capture_it(pipelines, checkpoint):
    """The computation the CUDA graphs capture for a batch (every row over one fixed bucket, each masked at its
    own position), run eagerly on the CPU: the batched eager step's logits, and the golden greedy ids."""
    vlm = pipelines[checkpoint]
    model = vlm.model
    cases = golden_cases(checkpoint)
    bucket = buckets_for(vlm.max_seq_len)[0]
    with torch.inference_mode():
        image_tokens = vlm.encode_images(torch.cat([vlm.pixel_values(image) for image in _images(cases)]))
        model.llm.setup_cache(vlm.max_seq_len, len(cases))
        ids, positions = [], []
        for row, case in enumerate(cases):
            embeds = model.embed_prompt(case["input_ids"], image_tokens[row:row + 1])
            ids.append([int(model.prefill(embeds, row).argmax(-1))])
            positions.append(embeds.shape[1])
        for _ in range(len(cases[0]["generated_ids"]) - 1):
            tokens = torch.tensor([row_ids[-1] for row_ids in ids])
            eager = model.decode_step(tokens, positions)
            static = eager_masked_step(model, tokens, positions, bucket)  # rewrites the same K/V
            torch.testing.assert_close(static, eager, atol=1e-5, rtol=0)
            for row_ids, token in zip(ids, static.argmax(-1).tolist()):
                row_ids.append(token)
            positions = [pos + 1 for pos in positions]
    assert ids == [case["generated_ids"] for case in cases]
