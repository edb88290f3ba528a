"""Errors a caller can act on: each names what is wrong and where."""
from __future__ import annotations

from pathlib import Path


class CheckpointError(Exception):
    """A model directory or file cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class PromptTooLongError(ValueError):
    """The prompt plus the requested answer does not fit in the decoder's context."""

    def __init__(self, needed: int, limit: int):
        self.needed = needed
        self.limit = limit
        super().__init__(f"prompt needs {needed} positions (image tokens, text and max_new_tokens) "
                         f"but the context holds {limit}")
