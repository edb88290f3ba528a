"""Captions: on each tick, a caption job per caption camera whose newest frame is new, submitted together so the
worker runs them as one batch (only while the worker is idle: captions never delay questions), each published on
``caption`` with the header of the frame it describes."""
from __future__ import annotations

from rclpy.node import Node

from ..msg import SceneCaption
from ..server import Job, SceneServer
from .endpoints import frame_header


class Captions:
    def __init__(self, node: Node, publisher, callback_group, log_result):
        self.node = node
        self.publisher = publisher
        self.callback_group = callback_group
        self._log_result = log_result
        self._server: SceneServer | None = None
        self._timer = None
        self._last_seq: dict[str, int] = {}
        self.cameras: tuple[str, ...] = ()
        self.prompt = ""
        self.max_new_tokens = 0
        self.rate_hz = 0.0

    def start(self, server: SceneServer, cameras: tuple[str, ...], prompt: str, max_new_tokens: int,
              rate_hz: float) -> None:
        self._server = server
        self.cameras, self.prompt, self.max_new_tokens = cameras, prompt, max_new_tokens
        self._last_seq = dict.fromkeys(cameras, -1)
        self.set_rate(rate_hz)

    def set_rate(self, rate_hz: float) -> None:
        """(Re)start the timer at rate_hz; 0 stops it."""
        self.rate_hz = rate_hz
        if self._timer is not None:
            self.node.destroy_timer(self._timer)
            self._timer = None
        if rate_hz > 0 and self._server is not None:
            self._timer = self.node.create_timer(1.0 / rate_hz, self._on_tick, callback_group=self.callback_group)

    def stop(self) -> None:
        self.set_rate(0.0)
        self._server = None

    def _on_tick(self) -> None:
        server = self._server
        if server is None:
            return
        jobs = server.submit_captions({camera_id: self._last_seq[camera_id] for camera_id in self.cameras},
                                      self.prompt, self.max_new_tokens)
        for camera_id, job in jobs.items():
            self._last_seq[camera_id] = job.not_before_seq
            job.add_done_callback(self._publish)

    def _publish(self, job: Job) -> None:
        result = job.result
        if not result.success:
            self._log_result(result)
            return
        if self._server is None:  # finished after a deactivate: captions are off
            return
        self.publisher.publish(SceneCaption(
            header=frame_header(result.frame), camera_id=result.camera_id, caption=result.answer,
            prompt=job.request.question, latency_ms=float(result.total_ms)))
