"""The real node in its own process, with a model that fails or holds when a question asks it to.

Usage: python scripted_node.py [--lifecycle] --ros-args ...

Runs ``mobilevlm_ros.node.main()`` (with ``--lifecycle``: ``mobilevlm_ros.lifecycle_node.main()``) unchanged, after
wrapping the class attribute ``mobilevlm_ros.model.MobileVLMPipeline.ask_batch``, through which the node's worker
answers every question (``ask`` is its batch of one). Markers anywhere in a question:

- ``[fail]``: the batch holding it raises ``RuntimeError("scripted failure ...")`` before touching the model: what an out-of-memory
  or a driver error in the model looks like to the node.
- ``[hold]``: the real generation runs; after its first streamed piece it waits until the request is cancelled (by
  the client, a deactivate or a shutdown), then stops within one token as a cancelled generation does. A request
  that stays in flight exactly as long as a test needs, with no race against the model's speed.
- ``[hold:NAME]``: as ``[hold]``, and also released when the file NAME appears in the directory named by
  ``$SCRIPTED_NODE_RELEASE_DIR``; then the generation goes on to its ``max_new_tokens`` and finishes normally.

Every hold ends after HOLD_LIMIT_S at the latest, so a crashed test never leaves a node holding forever. Questions
without a marker reach the real model unchanged.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

FAIL = "[fail]"
HOLD = re.compile(r"\[hold(?::([A-Za-z0-9_.-]+))?\]")
HOLD_LIMIT_S = 300.0
RELEASE_DIR_ENV = "SCRIPTED_NODE_RELEASE_DIR"


def _question(turns) -> str:
    return turns if isinstance(turns, str) else turns[-1]


def install() -> None:
    """Wrap MobileVLMPipeline.ask_batch (the class attribute, so every pipeline the node loads has it; ask is its
    batch of one, and the worker runs several waiting jobs as one batch)."""
    from mobilevlm_ros.model import MobileVLMPipeline

    real_ask_batch = MobileVLMPipeline.ask_batch

    def ask_batch(self, images, turns, params=None, on_text=None, cancelled=None, frame_keys=None):
        questions = [_question(t) for t in turns]
        failing = [q for q in questions if FAIL in q]
        if failing:  # a model failure fails the whole batch, as a real one would
            raise RuntimeError(f"scripted failure: the question was marked {FAIL}")
        rows = len(questions)
        row_on_text = list(on_text) if on_text is not None else [None] * rows
        row_cancelled = list(cancelled) if cancelled is not None else [None] * rows
        for i, question in enumerate(questions):
            hold = HOLD.search(question)
            if hold is not None:
                row_on_text[i] = _holding(row_on_text[i], row_cancelled[i], hold.group(1))
        kwargs = {} if params is None else {"params": params}
        return real_ask_batch(self, images, turns, on_text=row_on_text, cancelled=row_cancelled, frame_keys=frame_keys,
                              **kwargs)

    MobileVLMPipeline.ask_batch = ask_batch


def _holding(on_text, cancelled, release_name):
    """on_text that, after the first streamed piece, waits until cancelled (or the release file appears)."""
    release = Path(os.environ.get(RELEASE_DIR_ENV, "."), release_name) if release_name else None
    is_cancelled = cancelled if cancelled is not None else (lambda: False)
    held = []

    def holding(piece: str, tokens: int) -> None:
        if on_text is not None:
            on_text(piece, tokens)  # the client sees this piece: generation is under way
        if held:
            return
        held.append(True)
        deadline = time.monotonic() + HOLD_LIMIT_S
        while time.monotonic() < deadline and not is_cancelled() and not (release is not None and release.exists()):
            time.sleep(0.01)
    return holding


def main() -> int:
    args = sys.argv[1:]
    lifecycle = "--lifecycle" in args
    if lifecycle:
        args.remove("--lifecycle")
    install()
    sys.argv = [sys.argv[0], *args]  # rclpy reads the --ros-args from sys.argv
    if lifecycle:
        from mobilevlm_ros.lifecycle_node import main as node_main
    else:
        from mobilevlm_ros.node import main as node_main
    print(f"[scripted_node] {FAIL} and [hold] questions are scripted", file=sys.stderr, flush=True)
    return node_main()


if __name__ == "__main__":
    sys.exit(main())
