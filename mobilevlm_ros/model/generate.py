"""Token generation over the static KV cache: prefill once, then one token per step."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .mobilevlm import MobileVLM
from .prompt import STOP_STR
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy, as the reference's README and benchmarks
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):  # also refuses NaN
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """logits [1, V] -> token [1]. Temperature, then top-k, then top-p: transformers' warper order."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - params.top_p
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def finish_text(text: str) -> str:
    """The reference's post-processing: strip, drop a trailing stop string, strip."""
    text = text.strip()
    if text.endswith(STOP_STR):
        text = text[: -len(STOP_STR)]
    return text.strip()


def _streamable(text: str) -> str:
    """The part of a partial answer that later tokens cannot change.

    An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives, a trailing '<', '</' or '</s'
    may still become the stop string, and trailing whitespace is stripped from a final answer: all are held back.
    """
    text = text.strip().rstrip("\ufffd").rstrip()
    for n in range(len(STOP_STR) - 1, 0, -1):
        if text.endswith(STOP_STR[:n]):
            return text[:-n]
    return text


def stop_reason(ids: list[int], tokenizer: Tokenizer) -> str | None:
    """'eos' or 'stop_str' when the answer so far is complete, else None."""
    if ids[-1] == tokenizer.eos_id:
        return "eos"
    # The reference's KeywordsStoppingCriteria looks for the stop string in the last three tokens' text.
    if STOP_STR in tokenizer.decode(ids[-3:]):
        return "stop_str"
    return None


@dataclass
class Generation:
    ids: list[int]
    text: str
    stopped_by: str  # eos, stop_str, max_new_tokens or cancelled
    prefill_ms: float
    decode_ms: float


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


DecodeStep = Callable[[Tensor, int], Tensor]  # (token [1], position) -> logits [1, V], as MobileVLM.decode_step


@torch.inference_mode()
def generate(model: MobileVLM, decode_step: DecodeStep, tokenizer: Tokenizer, embeds: Tensor,
             params: SamplingParams, on_text: Callable[[str, int], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> Generation:
    """Generate from prompt embeddings [1, T, H]: model.prefill, then decode_step for each further token.
    on_text gets each new stable piece of the answer and the number of tokens generated so far; cancelled is
    polled after the prefill (a cancel that came during it returns no tokens) and between tokens, so a cancel
    takes effect within one token."""
    device = embeds.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    start = _now(device)
    pos = embeds.shape[1]
    token = sample(model.prefill(embeds), params, generator)
    first = _now(device)
    if cancelled is not None and cancelled():
        return Generation(ids=[], text="", stopped_by="cancelled", prefill_ms=(first - start) * 1e3, decode_ms=0.0)
    ids: list[int] = []
    streamed = ""
    stopped_by = "max_new_tokens"
    while True:
        ids.append(int(token.item()))
        reason = stop_reason(ids, tokenizer)
        if reason:
            stopped_by = reason
            break
        if on_text is not None:
            stable = _streamable(tokenizer.decode(ids))
            if stable.startswith(streamed) and len(stable) > len(streamed):
                on_text(stable[len(streamed):], len(ids))
                streamed = stable
        if len(ids) >= params.max_new_tokens:
            break
        if cancelled is not None and cancelled():
            stopped_by = "cancelled"
            break
        token = sample(decode_step(token, pos), params, generator)
        pos += 1
    end = _now(device)
    text = finish_text(tokenizer.decode(ids))
    if on_text is not None and text.startswith(streamed) and len(text) > len(streamed):
        on_text(text[len(streamed):], len(ids))
    return Generation(ids=ids, text=text, stopped_by=stopped_by,
                      prefill_ms=(first - start) * 1e3, decode_ms=(end - first) * 1e3)
