"""The ``ask_scene`` service and action: translate requests into :class:`~mobilevlm_ros.server.SceneRequest` s for
the admission gate, wait for their job, and translate the result back.

Both exist as long as the node does (no request is lost to a service destroyed under it); while the gate is closed
they answer NOT_ACTIVE or SHUTTING_DOWN at once. Callbacks run in a reentrant group on the executor's threads and
only wait for their own job; inference happens on the server's worker thread.
"""
from __future__ import annotations

import threading
import time

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Header

from ..action import AskScene as AskSceneAction
from ..camera import Frame
from ..server import AdmissionGate, ErrorCode, Job, SceneRequest, SceneResult
from ..srv import AskScene as AskSceneService

# The default service QoS keeps 10 requests: a burst beyond that would be dropped by DDS before the node could
# answer BUSY, and those clients would wait forever. Every request must get an answer, so keep them all.
REQUEST_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE)
# Action feedback carries text deltas that a client concatenates. With the default depth of 10, a client that falls
# behind (a busy 2-core machine) loses the first deltas of a longer answer; keep them all, as for requests.
FEEDBACK_QOS = REQUEST_QOS
# rclpy marks a goal as cancel-requested only after our cancel callback returns, while a queued job is answered
# CANCELLED inside it: the goal waits this long for that mark before it reports CANCELED.
CANCEL_MARK_TIMEOUT_S = 5.0


def frame_header(frame: Frame) -> Header:
    header = Header()
    header.stamp.sec = frame.stamp_sec
    header.stamp.nanosec = frame.stamp_nanosec
    header.frame_id = frame.frame_id
    return header


def fill_result(target, result: SceneResult) -> None:
    """Copy a SceneResult into an AskScene service response or action result (they share their fields)."""
    target.success = result.success
    target.error_code = result.error_code
    target.error_message = result.error_message
    target.answer = result.answer
    target.camera_id = result.camera_id
    target.tokens_generated = result.tokens_generated
    target.vision_ms = float(result.vision_ms)
    target.prefill_ms = float(result.prefill_ms)
    target.decode_ms = float(result.decode_ms)
    target.total_ms = float(result.total_ms)
    target.choice_probabilities = [float(p) for p in result.choice_probabilities]
    if result.frame is not None:
        target.image_header = frame_header(result.frame)


def scene_request(msg) -> SceneRequest:
    """An AskScene service request or action goal (they share their fields) as a SceneRequest."""
    return SceneRequest(msg.question, msg.camera_id, msg.max_new_tokens, msg.temperature,
                        (msg.frame_stamp.sec, msg.frame_stamp.nanosec), tuple(msg.choices))


class AskSceneEndpoints:
    def __init__(self, node: Node, gate: AdmissionGate, log_result):
        self.node = node
        self.gate = gate
        self._log_result = log_result  # (SceneResult) -> None
        self._in_flight = 0  # request callbacks running (shutdown waits for them to send their answers)
        self._in_flight_lock = threading.Lock()
        self._action_jobs: dict[bytes, Job] = {}
        requests = ReentrantCallbackGroup()
        self.service = node.create_service(AskSceneService, "ask_scene", self._on_service,
                                           qos_profile=REQUEST_QOS, callback_group=requests)
        self.action_server = ActionServer(node, AskSceneAction, "ask_scene", self._on_goal_execute,
                                          goal_callback=lambda _: GoalResponse.ACCEPT,
                                          cancel_callback=self._on_goal_cancel, callback_group=requests,
                                          goal_service_qos_profile=REQUEST_QOS,
                                          result_service_qos_profile=REQUEST_QOS,
                                          cancel_service_qos_profile=REQUEST_QOS,
                                          feedback_pub_qos_profile=FEEDBACK_QOS)

    @property
    def in_flight(self) -> int:
        with self._in_flight_lock:
            return self._in_flight

    def _track(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta

    def wait_idle(self, timeout_s: float, spin=None) -> bool:
        """Wait until no request callback is running (spin(timeout) turns an executor while waiting, for callers
        outside the executor)."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            if spin is not None:
                spin(0.05)
            else:
                time.sleep(0.05)
        return not self.in_flight

    def _result(self, job: Job) -> SceneResult:
        result = self.gate.result(job)
        self._log_result(result)
        return result

    def _on_service(self, request, response):
        self._track(+1)
        try:
            job = self.gate.submit(scene_request(request))
            job.wait()  # always set: answered, failed, cancelled or shut down
            fill_result(response, self._result(job))
            return response
        finally:
            self._track(-1)

    def _on_goal_cancel(self, goal_handle) -> CancelResponse:
        job = self._action_jobs.get(bytes(goal_handle.goal_id.uuid))
        if job is not None:
            job.cancel()  # a queued job is answered at once; a running one stops within one token
        return CancelResponse.ACCEPT

    def _on_goal_execute(self, goal_handle):
        self._track(+1)
        try:
            return self._execute_goal(goal_handle)
        finally:
            self._track(-1)

    def _execute_goal(self, goal_handle):
        goal = goal_handle.request
        pieces: list[tuple[str, str, int]] = []
        wake = threading.Event()

        def on_text(delta: str, partial: str, tokens: int) -> None:  # worker thread: hand over, publish here
            pieces.append((delta, partial, tokens))
            wake.set()

        key = bytes(goal_handle.goal_id.uuid)
        job = self.gate.submit(scene_request(goal), on_text)
        self._action_jobs[key] = job
        job.add_done_callback(lambda _: wake.set())
        try:
            sent = 0
            while True:
                wake.wait(0.5)
                wake.clear()
                if goal_handle.is_cancel_requested:
                    job.cancel()
                while sent < len(pieces):
                    delta, partial, tokens = pieces[sent]
                    sent += 1
                    goal_handle.publish_feedback(AskSceneAction.Feedback(text_delta=delta, partial_answer=partial,
                                                                         tokens_generated=tokens))
                if job.done and sent == len(pieces):
                    break
        finally:
            self._action_jobs.pop(key, None)
        result = self._result(job)
        msg = AskSceneAction.Result()
        fill_result(msg, result)
        if result.error_code == ErrorCode.CANCELLED and job.cancelled:
            deadline = time.monotonic() + CANCEL_MARK_TIMEOUT_S
            while not goal_handle.is_cancel_requested and time.monotonic() < deadline:
                time.sleep(0.01)
        if result.error_code == ErrorCode.CANCELLED and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return msg

    def destroy(self) -> None:
        self.action_server.destroy()
        self.node.destroy_service(self.service)
