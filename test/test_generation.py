"""Generation controls on the real tiny checkpoints: sampling, seeds, stopping, cancelling, context limits."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import CHECKPOINTS, REFERENCE, golden_cases
from mobilevlm_ros.model import MobileVLMPipeline, PromptTooLongError, SamplingParams
from mobilevlm_ros.model.generate import finish_text, stop_reason

IMAGE = Image.open(REFERENCE / "images" / "img0_street_500x300_rgb.png")
QUESTION = "What is the robot doing on the street?"


@pytest.fixture(scope="module")
def vlm():
    return MobileVLMPipeline.load(CHECKPOINTS / "MobileVLM_V2-tiny")


def test_seeded_sampling_is_reproducible_and_seed_dependent(vlm):
    params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=7)
    first = vlm.ask(IMAGE, QUESTION, params).generated_ids
    assert vlm.ask(IMAGE, QUESTION, params).generated_ids == first
    others = {tuple(vlm.ask(IMAGE, QUESTION, SamplingParams(12, 1.5, seed=s)).generated_ids) for s in range(1, 5)}
    assert len(others | {tuple(first)}) > 1


@pytest.mark.parametrize("params", [SamplingParams(16, temperature=1.0, top_k=1, seed=3),
                                    SamplingParams(16, temperature=1.0, top_p=1e-6, seed=3)])
def test_top_k_1_and_tiny_top_p_reduce_to_greedy(vlm, params):
    greedy = golden_cases("MobileVLM_V2-tiny")[0]["generated_ids"]
    assert vlm.ask(IMAGE, QUESTION, params).generated_ids == greedy


def test_cancel_stops_within_one_token(vlm):
    pieces: list[str] = []
    answer = vlm.ask(IMAGE, QUESTION, SamplingParams(max_new_tokens=16),
                     on_text=lambda piece, _: pieces.append(piece), cancelled=lambda: len(pieces) >= 3)
    assert answer.stopped_by == "cancelled"
    assert len(answer.generated_ids) <= 4  # pieces can lag tokens by one held-back byte piece


@pytest.mark.parametrize("cancel_during", ["vision", "prefill"])
def test_cancel_during_vision_or_prefill_decodes_nothing(cancel_during):
    """A cancel that arrives while the image is encoded or the prompt prefilled takes effect before the first
    decode step: no tokens, stopped_by "cancelled". Forward hooks on the pipeline's own modules mark the moment
    (the projector ends the vision encode; the decoder's first call is the prefill) and count the decoder's
    calls: one is the prefill, every further one a decode step."""
    vlm = MobileVLMPipeline.load(CHECKPOINTS / "MobileVLM_V2-tiny")  # its own: hooks are added below
    cancel, decoder_calls = [], []
    vlm.model.llm.register_forward_hook(lambda *_: decoder_calls.append(1))
    marker = vlm.model.mm_projector if cancel_during == "vision" else vlm.model.llm
    marker.register_forward_hook(lambda *_: cancel.append(1))
    pieces: list[str] = []
    answer = vlm.ask(IMAGE, QUESTION, SamplingParams(max_new_tokens=16), on_text=lambda piece, _: pieces.append(piece),
                     cancelled=lambda: bool(cancel))
    assert answer.stopped_by == "cancelled" and answer.generated_ids == [] and answer.text == "" and not pieces
    assert len(decoder_calls) == (0 if cancel_during == "vision" else 1)  # no decode step ran
    assert answer.timings["decode_ms"] == 0 and answer.timings["vision_ms"] > 0
    assert (answer.timings["prefill_ms"] > 0) == (cancel_during == "prefill")


def test_eos_stops_generation():
    vlm = MobileVLMPipeline.load(CHECKPOINTS / "MobileVLM_V2-tiny", onednn=False)  # plain weights, edited below
    with torch.no_grad():
        vlm.model.llm.lm_head.weight[vlm.tokenizer.eos_id] = 10 * vlm.model.llm.lm_head.weight.abs().max()
        vlm.model.llm.lm_head.weight[vlm.tokenizer.eos_id] *= torch.sign(vlm.model.llm.lm_head.weight[5])
    answer = vlm.ask(IMAGE, QUESTION, SamplingParams(max_new_tokens=16))
    # Whatever the hidden state, EOS now wins within a step or two and ends the answer there.
    assert answer.stopped_by == "eos" and answer.generated_ids[-1] == vlm.tokenizer.eos_id
    assert len(answer.generated_ids) < 16


def test_stop_string_window_and_post_processing(vlm):
    tok = vlm.tokenizer
    # This vocabulary spells "</s>" as four pieces ('<0x3C>', '/', 's', '<0x3E>'); the reference's
    # KeywordsStoppingCriteria decodes only the last three tokens, so it does not stop on it, and neither do we.
    text_ids = tok.sp.encode("It is red.</s>")
    assert tok.decode(text_ids).endswith("</s>")
    assert stop_reason(text_ids, tok) is None
    assert stop_reason(tok.encode("red", bos=False), tok) is None
    assert stop_reason([5, tok.eos_id], tok) == "eos"
    # ... and the answer text is post-processed as the reference's inference script does.
    assert finish_text(tok.decode(text_ids)) == "It is red."
    assert finish_text("  red </s> ") == "red"


def test_prompt_too_long_is_refused_before_any_work():
    vlm = MobileVLMPipeline.load(CHECKPOINTS / "MobileVLM_V2-tiny", max_seq_len=256)
    ids = vlm.prompt_ids(QUESTION)
    fits = 256 - (len(ids) - 1 + 144)
    vlm.check_fits(ids, fits)
    with pytest.raises(PromptTooLongError, match=r"needs 257 positions .* context holds 256"):
        vlm.ask(IMAGE, QUESTION, SamplingParams(max_new_tokens=fits + 1))
    with pytest.raises(PromptTooLongError):
        vlm.ask(IMAGE, "word " * 200, SamplingParams(max_new_tokens=1))


@pytest.mark.parametrize("params,message", [
    (SamplingParams(max_new_tokens=0), "max_new_tokens"), (SamplingParams(temperature=-1), "temperature"),
    (SamplingParams(temperature=float("nan")), "temperature"),
    (SamplingParams(top_p=0), "top_p"), (SamplingParams(top_k=-2), "top_k")])
def test_bad_sampling_params(vlm, params, message):
    with pytest.raises(ValueError, match=message):
        vlm.ask(IMAGE, QUESTION, params)


def test_reuses_the_cache_across_requests(vlm):
    """A long answer followed by a short one: stale cache entries past the prompt must not leak in."""
    cases = golden_cases("MobileVLM_V2-tiny")
    vlm.ask(IMAGE, cases[4]["turns"], SamplingParams(max_new_tokens=16))
    assert vlm.ask(IMAGE, QUESTION, SamplingParams(max_new_tokens=16)).generated_ids == cases[0]["generated_ids"]
