"""Constrained answers: the one of a few given answers that the model finds most likely after the prompt.

A choice's score is the log-likelihood of its tokens after ``ASSISTANT:``, the tokens being those the tokenizer
gives when the prompt's text is continued with a space and the choice (what the model would have to generate to
answer with it). The first token's log-probability comes from the prompt's own last logits; the others from the
logits at the choice's earlier tokens, fed as a branch after the prompt (MobileLlama.forward_tree): all of a
prompt's branches in the same forward as the prompt's own last tokens, so choices cost no extra pass over the
weights. Most answers a planner acts on ("Yes", "No", "red", "green") are one token long and need no branch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

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


def branches(choice_ids: Sequence[list[int]]) -> list[list[int]]:
    """The tokens to feed after the prompt to score the choices: each longer choice's tokens but its last (whose
    logits predict nothing it needs); a one-token choice needs none."""
    return [ids[:-1] for ids in choice_ids if len(ids) > 1]


def score(last_logits: Tensor, branch_logits: Sequence[Tensor], choice_ids: Sequence[list[int]]) -> list[float]:
    """Each choice's log-likelihood (a float32 sum of its tokens' log-probabilities) from the prompt's last logits
    [V] and the logits [n, V] of the branches (in the order branches() gives them)."""
    first = last_logits.float().log_softmax(-1)
    later = iter(branch_logits)
    scores = []
    for ids in choice_ids:
        log_likelihood = first[ids[0]]
        if len(ids) > 1:
            log_probs = next(later).float().log_softmax(-1)
            log_likelihood = log_likelihood + log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()
        scores.append(float(log_likelihood))
    return scores


def choice_of(choices: Sequence[str], log_likelihoods: list[float], input_ids: list[int], prefix_cached: bool,
              timings: dict[str, float]) -> Choice:
    probabilities = torch.tensor(log_likelihoods, dtype=torch.float64).softmax(-1).tolist()
    index = max(range(len(choices)), key=lambda c: log_likelihoods[c])
    return Choice(choices[index], index, probabilities, log_likelihoods, input_ids, prefix_cached, timings)
