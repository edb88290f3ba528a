"""The frame prefix cache (model/prefix_cache.py through MobileVLMPipeline): a question about a frame asked before
starts from the frame's cached prompt prefix and gives the answer of the uncached path, on every reference case of
both checkpoints (V1, V2), in any order and interleaved across frames, through the node's kernels, torch's eager
kernels, the quantised decoders and the ONNX Runtime vision engine."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import CHECKPOINT_NAMES, CHECKPOINTS, REFERENCE, golden_cases
from requirements import require_module
from mobilevlm_ros.model import MobileVLMPipeline, SamplingParams
from mobilevlm_ros.options import QUANTIZE_MODES

ATOL = 1e-4


def _image(case) -> Image.Image:
    return Image.open(REFERENCE / case["image"])


def _recording_logits(vlm: MobileVLMPipeline) -> list[torch.Tensor]:
    """Every logits tensor the decoder returns from now on (prefills and decode steps), in order."""
    seen: list[torch.Tensor] = []
    vlm.model.llm.register_forward_hook(lambda _module, _args, out: seen.append(out.detach().clone()))
    return seen


@pytest.mark.parametrize("onednn", [True, False], ids=["node-kernels", "eager"])
@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_cached_frames_answer_as_uncached_in_any_order(checkpoint, onednn):
    """Every case asked cold (no frame key), then with its frame's key twice, in reverse order and interleaved
    across frames (the first keyed ask of a frame computes its prefix, the second starts from it): the same greedy
    ids as the goldens, and every logits tensor (first token and each decode step) within 1e-4 of the uncached
    path's."""
    vlm = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, onednn=onednn, prefix_cache_frames=8)
    cases = golden_cases(checkpoint)
    params = SamplingParams(max_new_tokens=len(cases[0]["generated_ids"]))
    logits = _recording_logits(vlm)

    def ask(case, key):
        logits.clear()
        answer = vlm.ask(_image(case), case["turns"], params, frame_key=key)
        return answer, list(logits)

    cold = [ask(case, None) for case in cases]
    order = [*reversed(range(len(cases))), *range(len(cases))]  # each frame keyed twice, frames interleaved
    seen_frames = set()
    for i in order:
        answer, steps = ask(cases[i], cases[i]["image"])
        assert answer.prefix_cached == (cases[i]["image"] in seen_frames)
        seen_frames.add(cases[i]["image"])
        assert answer.generated_ids == cold[i][0].generated_ids == cases[i]["generated_ids"]
        torch.testing.assert_close(torch.cat(steps), torch.cat(cold[i][1]), atol=ATOL, rtol=0)
    stats = vlm.prefix_cache.stats()
    frames = len({case["image"] for case in cases})
    assert (stats.frames, stats.misses, stats.hits) == (frames, frames, len(order) - frames)
    assert stats.nbytes == frames * vlm.prefix_nbytes()


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_a_cached_frame_reproduces_the_golden_logits(checkpoint):
    """Teacher-forced against the reference: the first case's prompt filled from its frame's cached prefix (put
    there by a different question about the frame), then the golden tokens decoded one by one: the logits of
    every step within 1e-4 of the reference's."""
    vlm = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, onednn=False, prefix_cache_frames=1)
    case = golden_cases(checkpoint)[0]
    golden = load_file(REFERENCE / "goldens" / checkpoint / f"{case['case']}.safetensors")
    vlm.ask(_image(case), "Something else entirely?", SamplingParams(max_new_tokens=1), frame_key="frame")
    logits = _recording_logits(vlm)
    answer = vlm.ask(_image(case), case["turns"], SamplingParams(max_new_tokens=len(case["generated_ids"])),
                     frame_key="frame")
    assert answer.prefix_cached and answer.timings["vision_ms"] == 0
    assert answer.generated_ids == case["generated_ids"]
    torch.testing.assert_close(torch.cat(logits), golden["step_logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_quantised_decoders_answer_cached_frames_as_uncached(mode):
    """With a quantised decoder, a cached frame's answers are the uncached greedy ids: the first keyed question
    about a frame (which computes its prefix) and the later ones (which start from it). int8-dynamic quantises
    each call's activations with one range, so with a frame key its prompts are prefilled as prefix and tail in
    two calls, cold or cached; the weight-only modes also equal the unkeyed whole-prompt prefill."""
    checkpoint = CHECKPOINT_NAMES[-1]
    vlm = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, quantize=mode, prefix_cache_frames=8)
    cases = golden_cases(checkpoint)
    params = SamplingParams(max_new_tokens=16)
    unkeyed = [vlm.ask(_image(case), case["turns"], params).generated_ids for case in cases]
    keyed = [[vlm.ask(_image(case), case["turns"], params, frame_key=(case["image"], i)).generated_ids
              for case in cases] for i in range(2)]  # two frame keys per image: each computed, then cached
    cached = [vlm.ask(_image(case), case["turns"], params, frame_key=(case["image"], 0)).generated_ids
              for case in cases]
    assert keyed[0] == keyed[1] == cached
    if mode != "int8-dynamic":
        assert cached == unkeyed
    assert vlm.prefix_cache.stats().hits >= len(cases)


def test_rows_about_one_frame_share_one_vision_pass_and_prefix():
    """Three questions about one new frame in one batch: the vision encoder runs once (for the frame's first row),
    the other rows start from the prefix it left, and each answer equals the question asked alone."""
    checkpoint = CHECKPOINT_NAMES[-1]
    vlm = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, prefix_cache_frames=1)
    case = golden_cases(checkpoint)[0]
    questions = [case["turns"], "What colour is it?", "Describe the image."]
    params = SamplingParams(max_new_tokens=12)
    alone = [vlm.ask(_image(case), q, params) for q in questions]
    encoded = []
    vlm.model.mm_projector.register_forward_hook(lambda *_: encoded.append(1))
    batch = vlm.ask_batch([_image(case)] * 3, questions, params, frame_keys=["f"] * 3)
    assert len(encoded) == 1
    assert [a.prefix_cached for a in batch] == [False, True, True]
    assert [a.generated_ids for a in batch] == [a.generated_ids for a in alone]


def test_the_lru_keeps_the_newest_frames_and_a_new_frame_evicts_only_the_oldest():
    """With room for two frames, asking about frames A, B, A, C, A keeps A (used most recently) and C; B is
    computed again when asked; answers stay those of the uncached path throughout."""
    checkpoint = CHECKPOINT_NAMES[-1]
    vlm = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, prefix_cache_frames=2)
    cases = {case["image"]: case for case in golden_cases(checkpoint)}
    names = list(cases)[:3]
    params = SamplingParams(max_new_tokens=8)
    cold = {name: vlm.ask(_image(cases[name]), "What is in the image?", params).generated_ids for name in names}
    a, b, c = names
    cached = []
    for name in (a, b, a, c, a, b):
        answer = vlm.ask(_image(cases[name]), "What is in the image?", params, frame_key=name)
        cached.append(answer.prefix_cached)
        assert answer.generated_ids == cold[name]
    assert cached == [False, False, True, False, True, False]  # B was evicted by C
    stats = vlm.prefix_cache.stats()
    assert (stats.frames, stats.max_frames, stats.hits, stats.misses) == (2, 2, 2, 4)


def test_without_a_cache_frame_keys_change_nothing():
    """prefix_cache_frames=0 (the default): keyed questions are encoded and prefilled whole every time and the
    cache stays empty."""
    checkpoint = CHECKPOINT_NAMES[-1]
    vlm = MobileVLMPipeline.load(CHECKPOINTS / checkpoint)
    case = golden_cases(checkpoint)[0]
    for _ in range(2):
        answer = vlm.ask(_image(case), case["turns"], SamplingParams(max_new_tokens=8), frame_key="f")
        assert not answer.prefix_cached and answer.timings["vision_ms"] > 0
        assert answer.generated_ids == case["generated_ids"][:8]
    assert vlm.prefix_cache.stats().frames == 0


def test_the_onnx_runtime_vision_engine_with_cached_frames(tmp_path):
    """The pipeline on the ONNX Runtime vision engine (as the node builds it with backend onnxruntime): cached
    frames answer as uncached ones."""
    require_module("onnxruntime")
    from mobilevlm_ros.engines import make_visual_encoder
    from mobilevlm_ros.model.pipeline import choose_fast_paths, load_checkpoint

    checkpoint = CHECKPOINT_NAMES[-1]
    model, tokenizer = load_checkpoint(CHECKPOINTS / checkpoint)
    engine = make_visual_encoder("onnxruntime", model, tmp_path)
    vlm = MobileVLMPipeline(model, tokenizer, 2048, choose_fast_paths(), engine, prefix_cache_frames=4)
    cases = golden_cases(checkpoint)
    params = SamplingParams(max_new_tokens=16)
    cold = [vlm.ask(_image(case), case["turns"], params).generated_ids for case in cases]
    warm = [[vlm.ask(_image(case), case["turns"], params, frame_key=case["image"]).generated_ids
             for case in cases] for _ in range(2)]
    assert warm[0] == warm[1] == cold == [case["generated_ids"][:16] for case in cases]


def test_max_batch_rows_are_allocated_at_start_and_choices_score_in_the_prompt_forward():
    """max_batch=4 (the node passes its max_batch): the KV cache holds 4 rows from the start; choose() scores
    two several-token choices of one question inside the prompt's own forward (one forward in all) with the same
    scores as a pipeline whose cache holds one row."""
    checkpoint = CHECKPOINT_NAMES[-1]
    wide = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, onednn=False, max_batch=4)
    narrow = MobileVLMPipeline.load(CHECKPOINTS / checkpoint, onednn=False)
    assert (wide.model.llm.max_batch, narrow.model.llm.max_batch) == (4, 1)
    case = golden_cases(checkpoint)[0]
    choices = ["a red car on the left", "green light ahead", "no"]
    forwards = []
    wide.model.llm.register_forward_hook(lambda *_: forwards.append(1))
    got = wide.choose(_image(case), case["turns"], choices)
    assert len(forwards) == 1  # the prompt's prefill, with both several-token choices as branches after it
    want = narrow.choose(_image(case), case["turns"], choices)
    torch.testing.assert_close(torch.tensor(got.log_likelihoods), torch.tensor(want.log_likelihoods), atol=ATOL,
                               rtol=0)


def test_gpu_checks_of_batches_and_the_prefix_cache_pass_on_the_cpu():
    """The GPU check's batch / prefix-cache / choices part (bench/gpu_check.py, run with CUDA graphs on a GPU) is
    the same code on the CPU (the node's kernels): it must run here and pass its own criteria, so that a GPU session
    only has to run it."""
    from mobilevlm_ros.bench.gpu_check import batches_and_prefix_cache_ok, check_batches_and_prefix_cache

    results = check_batches_and_prefix_cache(device="cpu", dtype="float32")
    assert len(results) == 2 and batches_and_prefix_cache_ok(results), results
    assert all(r["decode_step"] for r in results)
