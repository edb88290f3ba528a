"""Tokenizer and prompt ids against the reference slow LlamaTokenizer (transformers 4.33.1) goldens."""
from __future__ import annotations

import json

import pytest

from conftest import CHECKPOINT_NAMES, REFERENCE, golden_cases
from mobilevlm_ros.model import Tokenizer
from mobilevlm_ros.model.prompt import build_prompt, tokenize_with_image

GOLDEN = json.loads((REFERENCE / "tokenizer_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(REFERENCE / "tokenizer.model")


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: repr(c["text"])[:40])
def test_encode_and_decode_match_reference(tokenizer, case):
    assert tokenizer.encode(case["text"]) == case["input_ids"]
    assert tokenizer.decode(case["input_ids"]) == case["decode_skip_special"]
    assert tokenizer.decode(case["input_ids"], skip_special_tokens=False) == case["decode_keep_special"]


@pytest.mark.parametrize("case", GOLDEN["tokenizer_image_token_cases"], ids=lambda c: repr(c["prompt"])[:40])
def test_image_token_splice_matches_reference(tokenizer, case):
    assert tokenize_with_image(case["prompt"], tokenizer) == case["input_ids"]


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_v1_prompt_template_matches_reference(checkpoint):
    for case in golden_cases(checkpoint):
        assert build_prompt(case["turns"]) == case["prompt"]


def test_special_ids(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.vocab_size == GOLDEN["tokenizer"]["vocab_size"]


def test_even_turn_count_is_rejected():
    with pytest.raises(ValueError, match="odd"):
        build_prompt(["q", "a"])
