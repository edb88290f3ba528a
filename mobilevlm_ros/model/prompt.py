"""The ``v1`` (Vicuna v1) conversation template and the reference's image-token splice."""
from __future__ import annotations

from collections.abc import Sequence

from .mobilevlm import IMAGE_TOKEN_INDEX
from .tokenizer import Tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
STOP_STR = "</s>"
IMAGE_PLACEHOLDER = "<image>"


def build_prompt(turns: Sequence[str]) -> str:
    """turns alternate user, assistant, ..., user; the image belongs to the first user turn."""
    if len(turns) % 2 != 1:
        raise ValueError("turns must alternate user and assistant and end with a user turn (odd count)")
    prompt = SYSTEM + " "
    for i, text in enumerate(turns):
        if i % 2 == 0:
            content = IMAGE_PLACEHOLDER + "\n" + text if i == 0 else text
            prompt += "USER: " + content + " "
        else:
            prompt += "ASSISTANT: " + text + STOP_STR
    return prompt + "ASSISTANT:"


def tokenize_with_image(prompt: str, tokenizer: Tokenizer) -> list[int]:
    """Each chunk between ``<image>`` markers is tokenized on its own (BOS kept only on the first), joined by -200.

    Tokenizing chunk by chunk, not the whole prompt, is what gives the text after the image its own dummy-prefix
    piece; the published models were trained on exactly these ids.
    """
    chunks = [tokenizer.encode(chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_id:
        offset = 1
        ids.append(tokenizer.bos_id)
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids
