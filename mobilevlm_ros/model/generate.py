"""Token generation over the static KV cache: prefill once, then one token per step."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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


# (tokens [B], position of every row or a list of each row's) -> logits [B, V], as MobileVLM.decode_step
DecodeStep = Callable[[Tensor, "int | list[int]"], Tensor]


@dataclass(frozen=True)
class Prompt:
    """A prompt as generate_batch runs it: fill(row) puts all its length positions into that KV cache row and
    returns the last position's logits [1, V] (a whole prefill, or a cached prefix and a prefill of the rest)."""

    length: int
    fill: Callable[[int], Tensor]

    @classmethod
    def of_embeds(cls, model: MobileVLM, embeds: Tensor) -> Prompt:
        """The prompt embeddings [1, T, H], prefilled whole from position 0."""
        return cls(embeds.shape[1], lambda row: model.prefill(embeds, row))


class _Row:
    """One prompt's generation inside a batch: everything generate() keeps for a prompt alone."""

    def __init__(self, prompt_len: int, params: SamplingParams, on_text: Callable[[str, int], None] | None,
                 cancelled: Callable[[], bool] | None, device: torch.device):
        self.params, self.on_text, self.cancelled = params, on_text, cancelled
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.pos = prompt_len  # where the next token fed to the decoder goes
        self.next_token = 0  # the token the next decode step feeds (a finished row's last one, again)
        self.ids: list[int] = []
        self.streamed = ""
        self.stopped_by: str | None = None  # set when the row is finished
        self.generation: Generation | None = None

    def sample(self, logits: Tensor) -> None:
        self.next_token = int(sample(logits, self.params, self.generator).item())

    def take(self, tokenizer: Tokenizer) -> None:
        """Append next_token and decide, as generate() does for one prompt, whether the row goes on."""
        self.ids.append(self.next_token)
        reason = stop_reason(self.ids, tokenizer)
        if reason:
            self.stopped_by = reason
            return
        if self.on_text is not None:
            stable = _streamable(tokenizer.decode(self.ids))
            if stable.startswith(self.streamed) and len(stable) > len(self.streamed):
                self.on_text(stable[len(self.streamed):], len(self.ids))
                self.streamed = stable
        if len(self.ids) >= self.params.max_new_tokens:
            self.stopped_by = "max_new_tokens"
        elif self.cancelled is not None and self.cancelled():
            self.stopped_by = "cancelled"

    def finish(self, tokenizer: Tokenizer, prefill_ms: float, decode_ms: float) -> None:
        text = finish_text(tokenizer.decode(self.ids))
        if self.on_text is not None and text.startswith(self.streamed) and len(text) > len(self.streamed):
            self.on_text(text[len(self.streamed):], len(self.ids))
        self.generation = Generation(ids=self.ids, text=text, stopped_by=self.stopped_by or "cancelled",
                                     prefill_ms=prefill_ms, decode_ms=decode_ms)


@torch.inference_mode()
def generate(model: MobileVLM, decode_step: DecodeStep, tokenizer: Tokenizer, embeds: Tensor,
             params: SamplingParams, on_text: Callable[[str, int], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> Generation:
    """Generate from prompt embeddings [1, T, H]: model.prefill, then decode_step for each further token.
    on_text gets each new stable piece of the answer and the number of tokens generated so far; cancelled is
    polled after the prefill (a cancel that came during it returns no tokens) and between tokens, so a cancel
    takes effect within one token."""
    return generate_batch(model, decode_step, tokenizer, [Prompt.of_embeds(model, embeds)], [params], [on_text],
                          [cancelled])[0]


@torch.inference_mode()
def generate_batch(model: MobileVLM, decode_step: DecodeStep, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                   params: Sequence[SamplingParams], on_text: Sequence[Callable[[str, int], None] | None],
                   cancelled: Sequence[Callable[[], bool] | None]) -> list[Generation]:
    """generate() for several prompts at once (the model's KV cache must hold that many rows): each prompt
    filled into its cache row in order, then one decode_step per token for the rows still running.
    Every row runs as generate() runs it alone: its own sampling params and seeded generator, stop rules,
    streaming callback and cancel; a finished row's answer (and its last streamed piece) is out at once.

    Finished rows stay in the batch until the rows after them finish (fed their last token at their last
    position, which they no longer read): the decoder runs the first rows up to the last one still running, so
    removing a row never moves another's cache. A batch of one runs exactly as one prompt alone."""
    device = model.llm.embed_tokens.weight.device
    rows = [_Row(q.length, p, f, c, device) for q, p, f, c in zip(prompts, params, on_text, cancelled)]
    start = _now(device)
    for b, (row, prompt) in enumerate(zip(rows, prompts)):  # alone, as generate() would (llama.py says why)
        row.sample(prompt.fill(b))
    first = _now(device)
    prefill_ms = (first - start) * 1e3
    for row in rows:
        if row.cancelled is not None and row.cancelled():  # a cancel that came during the prefill: no tokens
            row.finish(tokenizer, prefill_ms, 0.0)
    while True:
        for row in rows:
            if row.generation is None:
                row.take(tokenizer)
                if row.stopped_by is not None:
                    row.finish(tokenizer, prefill_ms, (_now(device) - first) * 1e3)
        running = [b for b, row in enumerate(rows) if row.generation is None]
        if not running:
            break
        active = rows[:running[-1] + 1]
        tokens = torch.tensor([row.next_token for row in active], device=device)
        positions = [row.pos for row in active]
        logits = decode_step(tokens, positions[0] if len(active) == 1 else positions)
        for b in running:
            rows[b].sample(logits[b:b + 1])
            rows[b].pos += 1
    return [row.generation for row in rows]
