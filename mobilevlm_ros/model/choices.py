"""Constrained answers: the one of a few given answers that the model finds most likely after the prompt.

A choice's score is the log-likelihood of its tokens after ``ASSISTANT:``, the tokens being those the tokenizer
gives when the prompt's text is continued with a space and the choice (what the model would have to generate to
answer with it). The first token's log-probability comes from the prompt's own last logits; the others from one
forward over every longer choice at once, each in a cache row holding a copy of its prompt. Most answers a planner
acts on ("Yes", "No", "red", "green") are one token long and need no forward at all.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .llama import MobileLlama

MAX_CHOICES = 16  # more is a classification task, not a question to a robot's planner


@dataclass
class Choice:
    answer: str  # the most likely choice, as given
    index: int  # its index in the choices
    probabilities: list[float]  # softmax over the choices' log-likelihoods, in the order given
    log_likelihoods: list[float]
    input_ids: list[int]  # the prompt, with -200 where the image goes
    prefix_cached: bool  # the frame's prefix came from the prefix cache
    timings: dict[str, float] = field(default_factory=dict)


def check_choices(choices: Sequence[str]) -> None:
    """ValueError with the reason unless choices are 1..MAX_CHOICES distinct non-blank strings."""
    if not choices:
        raise ValueError("no choices given")
    if len(choices) > MAX_CHOICES:
        raise ValueError(f"{len(choices)} choices: at most {MAX_CHOICES} are allowed")
    for choice in choices:
        if not choice.strip():
            raise ValueError("a choice is empty")
    seen = set()
    for choice in choices:
        if choice.strip() in seen:
            raise ValueError(f"choice {choice.strip()!r} is given twice")
        seen.add(choice.strip())


def continuation_ids(prompt_ids: list[int], prompt_with_choice_ids: list[int], choice: str) -> list[int]:
    """The choice's tokens: what the prompt's text continued with " " + choice tokenises to after the prompt's
    own tokens. ValueError when that text does not start with the prompt's tokens (no such case is known: the
    prompt ends with "ASSISTANT:" and SentencePiece starts a new piece at the space)."""
    n = len(prompt_ids)
    if prompt_with_choice_ids[:n] != prompt_ids or len(prompt_with_choice_ids) == n:
        raise ValueError(f"choice {choice!r} does not continue the prompt's tokens")
    return prompt_with_choice_ids[n:]


@dataclass(frozen=True)
class ScoredPrompt:
    """A prompt filled into cache row ``row`` (positions < length), its last logits [1, V] and its choices'
    tokens."""

    row: int
    length: int
    last_logits: Tensor
    choice_ids: list[list[int]]


@torch.inference_mode()
def score(llm: MobileLlama, prompts: Sequence[ScoredPrompt]) -> list[list[float]]:
    """Each prompt's choices' log-likelihoods (float32 sums of their tokens' log-probabilities).

    Choices longer than a token run in one forward per llm.max_batch of them, each in a cache row that first
    gets a copy of its prompt's positions (read before any row is overwritten), right-padded to the longest; a
    row's padding comes after its tokens, which therefore never see it."""
    scores = [[float(p.last_logits[0].float().log_softmax(-1)[ids[0]]) for ids in p.choice_ids] for p in prompts]
    longer = [(i, c) for i, p in enumerate(prompts) for c, ids in enumerate(p.choice_ids) if len(ids) > 1]
    if not longer:
        return scores
    device = llm.embed_tokens.weight.device
    kv = {i: llm.read_cache(prompts[i].row, prompts[i].length) for i in {i for i, _ in longer}}
    for first in range(0, len(longer), llm.max_batch):
        chunk = longer[first:first + llm.max_batch]
        width = max(len(prompts[i].choice_ids[c]) - 1 for i, c in chunk)  # the last token is never fed
        tokens = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        positions = torch.empty(len(chunk), width, dtype=torch.long, device=device)
        for row, (i, c) in enumerate(chunk):
            ids = prompts[i].choice_ids[c][:-1]
            tokens[row, :len(ids)] = torch.tensor(ids, device=device)
            positions[row] = prompts[i].length + torch.arange(width, device=device)
            llm.write_cache(row, kv[i])
        logits = llm(llm.embed_tokens(tokens), positions, int(positions.max()) + 1, all_positions=True)
        log_probs = logits.float().log_softmax(-1)
        for row, (i, c) in enumerate(chunk):
            ids = prompts[i].choice_ids[c]
            scores[i][c] += float(sum(log_probs[row, t, ids[t + 1]] for t in range(len(ids) - 1)))
    return scores


def choice_of(choices: Sequence[str], log_likelihoods: list[float], input_ids: list[int], prefix_cached: bool,
              timings: dict[str, float]) -> Choice:
    probabilities = torch.tensor(log_likelihoods, dtype=torch.float64).softmax(-1).tolist()
    index = max(range(len(choices)), key=lambda c: log_likelihoods[c])
    return Choice(choices[index], index, probabilities, log_likelihoods, input_ids, prefix_cached, timings)
