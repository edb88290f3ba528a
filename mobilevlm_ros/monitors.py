"""Standing monitors without ROS: questions with a few allowed answers (default yes/no) that the node answers on new
frames of a camera, at most ``rate_hz`` times a second, and publishes as they come.

:class:`MonitorBoard` holds the set (parameters at configure, ``set_monitor`` at run time) and what each monitor
last did: the frame it last answered (never twice on one frame), when (its rate), and its previous answer (so a
published answer says whether it ``changed``). The server (``SceneServer.submit_monitors``) asks it which monitors are
due on a camera's new frame and answers all of them from one vision pass.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from .model.choices import check_choices

DEFAULT_CHOICES = ("yes", "no")
MIN_RATE_HZ = 1e-3  # once in 1000 s
DEFAULT_RATE_HZ = 1.0
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # usable in a parameter name (monitor.NAME.question)


@dataclass(frozen=True)
class Monitor:
    name: str
    question: str
    camera_id: str
    rate_hz: float
    choices: tuple[str, ...] = DEFAULT_CHOICES


def monitor_problem(name: str, question: str, rate_hz: float, choices: Sequence[str]) -> str | None:
    """Why these values make no monitor, or None (the camera and the prompt's fit are checked by the caller, which
    knows the cameras and the model)."""
    if not NAME_PATTERN.fullmatch(name):
        return f"monitor name {name!r}: use letters, digits and _, starting with a letter"
    if not question.strip():
        return f"monitor {name}: the question is empty"
    if not rate_hz >= MIN_RATE_HZ:
        return f"monitor {name}: rate_hz {rate_hz:g} must be at least {MIN_RATE_HZ:g}"
    try:
        check_choices(choices)
    except ValueError as e:
        return f"monitor {name}: {e}"
    return None


@dataclass(frozen=True)
class MonitorAnswer:
    monitor: Monitor
    answer: str
    probability: float
    changed: bool  # the answer differs from this monitor's previous one


@dataclass
class _History:
    monitor: Monitor  # as it was when it last answered: a changed monitor starts afresh
    frame_seq: int = -1  # the last frame it was due on (answered or skipped)
    due_at: float = float("-inf")  # monotonic time it is due again
    answer: str | None = None  # its previous answer


class MonitorBoard:
    """The current monitors (in the order they were added) and their history; thread-safe."""

    def __init__(self, monitors: Sequence[Monitor] = ()):
        self._lock = threading.Lock()
        self._monitors: dict[str, Monitor] = {}
        self._history: dict[str, _History] = {}
        for monitor in monitors:
            self.set(monitor)

    def set(self, monitor: Monitor) -> None:
        """Add or replace the monitor of this name (a replaced one is due at once, with no previous answer)."""
        with self._lock:
            self._monitors[monitor.name] = monitor
            self._history[monitor.name] = _History(monitor)

    def remove(self, name: str) -> bool:
        with self._lock:
            self._history.pop(name, None)
            return self._monitors.pop(name, None) is not None

    def all(self) -> list[Monitor]:
        with self._lock:
            return list(self._monitors.values())

    def take_due(self, camera_id: str, frame_seq: int, now: float) -> list[Monitor]:
        """The monitors of camera_id due on frame frame_seq at monotonic time now; each taken is marked as having had
        its tick on this frame (answered or skipped), so it is never due twice on one frame, and not again before
        1 / rate_hz."""
        due = []
        with self._lock:
            for monitor in self._monitors.values():
                history = self._history[monitor.name]
                if monitor.camera_id != camera_id or frame_seq <= history.frame_seq or now < history.due_at:
                    continue
                history.frame_seq = frame_seq
                history.due_at = now + 1.0 / monitor.rate_hz
                due.append(monitor)
        return due

    def record(self, monitor: Monitor, answer: str, probability: float) -> MonitorAnswer:
        """Remember monitor's answer; whether it changed is judged against the previous answer of the same monitor
        (one changed or removed since it was asked has none)."""
        with self._lock:
            history = self._history.get(monitor.name)
            previous = history.answer if history is not None and history.monitor == monitor else None
            if history is not None and history.monitor == monitor:
                history.answer = answer
        return MonitorAnswer(monitor, answer, probability, previous is not None and previous != answer)
