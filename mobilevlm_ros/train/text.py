"""The text side: the generated corpus and a SentencePiece tokenizer trained on it with LLaMA's settings.

LLaMA's tokenizer.model is a BPE model with byte fallback, split digits, an identity normaliser and ids
unk/bos/eos = 0/1/2; the same trainer spec here makes the package's slow-LLaMA Tokenizer behave on the demo model
exactly as on real MobileVLM checkpoints.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

from ..demo.scenes import (CAPTION_QUESTIONS, CLASSES, COLORED_CLASSES, COUNTED_CLASSES, GROUND_CLASSES, PLURAL,
                           TEMPLATES, Scene, questions_for)
from ..model.prompt import IMAGE_PLACEHOLDER, build_prompt

import numpy as np


def conversation_text(turns: list[str]) -> str:
    """A whole conversation (user, assistant, ..., assistant) as the v1 template writes it, image marker removed."""
    prompt = build_prompt(turns[:-1]) + " " + turns[-1] + "</s>"
    return prompt.replace(IMAGE_PLACEHOLDER, "")


def every_question() -> Iterator[str]:
    """Each template filled in with each class it can be asked about."""
    for kind, templates in TEMPLATES.items():
        classes = {"color": list(COLORED_CLASSES), "count": list(COUNTED_CLASSES), "light": ["traffic light"],
                   "presence": list(CLASSES), "position": list(CLASSES)}[kind]
        for template in templates:
            for cls in classes:
                if kind == "presence" and cls not in GROUND_CLASSES and "on the road" in template:
                    continue
                yield template.format(c=cls, p=PLURAL[cls])
    yield from CAPTION_QUESTIONS


def corpus(scenes: Iterable[Scene], seed: int) -> Iterator[str]:
    rng = np.random.default_rng([seed, 0x70C])
    yield from every_question()
    for scene in scenes:
        qa = questions_for(scene.objects, scene.meta["width"], rng)
        turns = []
        for item in qa:
            turns += [item.question, item.answer]
        yield conversation_text(turns)


def train_tokenizer(sentences: Iterable[str], vocab_size: int) -> bytes:
    """A serialized SentencePiece model (tokenizer.model) trained on the sentences, LLaMA-style."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, split_by_number=True,
        split_by_unicode_script=True, split_by_whitespace=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, max_sentencepiece_length=16, hard_vocab_limit=False, minloglevel=2)
    return out.getvalue()
