"""Score a checkpoint on freshly generated scenes through MobileVLMPipeline.ask, the node's own code path."""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..demo.scenes import CLASSES, QUESTION_TYPES, answer_matches, caption_classes, make_scene
from ..model import MobileVLMPipeline, SamplingParams

GREEDY = SamplingParams(max_new_tokens=48, temperature=0.0)


@dataclass
class Report:
    scenes: int = 0
    asked: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    caption_covers: int = 0  # captions naming every class present
    caption_exact: int = 0
    caption_extra: int = 0  # captions naming a class that is absent
    mistakes: list[tuple[str, str, str, str]] = field(default_factory=list)  # kind, question, expected, got
    seconds: float = 0.0

    def accuracy(self, kind: str) -> float:
        return self.correct[kind] / self.asked[kind] if self.asked[kind] else float("nan")

    def table(self) -> str:
        rows = [f"{'question type':<14} {'asked':>6} {'correct':>8} {'accuracy':>9}"]
        for kind in QUESTION_TYPES:
            rows.append(f"{kind:<14} {self.asked[kind]:>6} {self.correct[kind]:>8} {self.accuracy(kind):>9.3f}")
        n = self.scenes
        rows.append(f"{'caption':<14} {n:>6} {self.caption_covers:>8} {self.caption_covers / max(n, 1):>9.3f}"
                    "   (names every class present)")
        rows.append(f"{'':<14} {'':>6} {self.caption_exact:>8} {self.caption_exact / max(n, 1):>9.3f}"
                    "   (exact caption)")
        rows.append(f"{'':<14} {'':>6} {self.caption_extra:>8} {self.caption_extra / max(n, 1):>9.3f}"
                    "   (names an absent class)")
        rows.append(f"{n} scenes, {sum(self.asked.values()) + n} answers in {self.seconds:.1f} s")
        return "\n".join(rows)


def evaluate(model: str | Path | MobileVLMPipeline, seed: int, scenes: int, per_type: int = 1,
             start: int = 0) -> Report:
    """Ask up to ``per_type`` questions of each type and one caption request about each held-out scene."""
    vlm = model if isinstance(model, MobileVLMPipeline) else MobileVLMPipeline.load(model, max_seq_len=512)
    rng = np.random.default_rng([seed, 0xE7A1, 0])
    report = Report()
    t0 = time.perf_counter()
    for index in range(start, start + scenes):
        scene = make_scene(seed, index)
        report.scenes += 1
        for kind in QUESTION_TYPES:
            items = scene.questions(kind)
            if not items:
                continue
            for i in rng.permutation(len(items))[:per_type]:
                qa = items[i]
                got = vlm.ask(scene.image, qa.question, GREEDY).text
                report.asked[kind] += 1
                if answer_matches(got, qa.answer):
                    report.correct[kind] += 1
                else:
                    report.mistakes.append((kind, qa.question, qa.answer, got))
        request = scene.questions("caption")[0]
        caption = vlm.ask(scene.image, request.question, GREEDY).text
        present = {o.cls for o in scene.objects}
        named = caption_classes(caption)
        report.caption_covers += present <= named
        report.caption_extra += bool(named - present)
        report.caption_exact += answer_matches(caption, request.answer)
        if not present <= named or named - present:
            report.mistakes.append(("caption", request.question, request.answer, caption))
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["CLASSES", "Report", "evaluate"]
