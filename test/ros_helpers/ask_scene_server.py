"""A tiny AskScene service and action server for test_ros_interfaces.py, run as a separate process.

Usage: python ask_scene_server.py [LIFETIME_S]

Answers every question with "echo: <question>" (the action streams it word by word as feedback and finishes when
cancelled, see EchoServer._execute), prints READY once
its servers exist, and exits on SIGINT/SIGTERM, when its standard input closes, or after LIFETIME_S seconds
(default 120), so that it never outlives a crashed test run.
"""
from __future__ import annotations

import sys
import threading
import time

import rclpy
from rclpy.action import ActionServer, CancelResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node

from mobilevlm_ros.action import AskScene as AskSceneAction
from mobilevlm_ros.srv import AskScene

SERVICE = "ask_scene"
ACTION = "ask_scene_action"


def _fill(result, question: str, camera_id: str, stamp) -> None:
    """Fill an AskScene service response or action result (same fields) for ``question``."""
    if not question:
        result.success = False
        result.error_code = result.BAD_REQUEST
        result.error_message = "empty question"
        return
    result.success = True
    result.answer = "echo: " + question
    result.camera_id = camera_id or "front"
    result.image_header.frame_id = result.camera_id + "_optical_frame"
    result.image_header.stamp = stamp
    result.tokens_generated = len(result.answer.split())
    result.vision_ms, result.prefill_ms, result.decode_ms, result.total_ms = 1.0, 2.0, 3.0, 6.5


class EchoServer(Node):
    def __init__(self) -> None:
        super().__init__("ask_scene_echo_server")
        self.create_service(AskScene, SERVICE, self._on_request)
        self._action = ActionServer(
            self,
            AskSceneAction,
            ACTION,
            self._execute,
            cancel_callback=lambda _request: CancelResponse.ACCEPT,
            callback_group=ReentrantCallbackGroup(),
        )

    def _on_request(self, request, response):
        _fill(response, request.question, request.camera_id, self.get_clock().now().to_msg())
        return response

    def _execute(self, goal_handle):
        """Stream the answer word by word, then keep re-sending the last feedback until the goal is cancelled.

        Feedback is a volatile topic: messages sent before the client's subscription is matched are lost, and
        rclpy's ActionClient drops feedback that arrives after the result. Re-sending the complete feedback until
        the client cancels (bounded, 30 s) lets the test wait on conditions only, and exercises cancellation.
        """
        goal = goal_handle.request
        result = AskSceneAction.Result()
        _fill(result, goal.question, goal.camera_id, self.get_clock().now().to_msg())
        feedback = AskSceneAction.Feedback()
        for i, word in enumerate(result.answer.split()):
            feedback = AskSceneAction.Feedback()
            feedback.text_delta = word if i == 0 else " " + word
            feedback.partial_answer = " ".join(result.answer.split()[: i + 1])
            feedback.tokens_generated = i + 1
            goal_handle.publish_feedback(feedback)
        deadline = time.monotonic() + 30.0
        while not goal_handle.is_cancel_requested and time.monotonic() < deadline:
            time.sleep(0.1)
            goal_handle.publish_feedback(feedback)
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
            result.success = False
            result.error_code = result.CANCELLED
            result.error_message = "cancelled by the client"
        else:
            goal_handle.succeed()
        return result


def main() -> None:
    lifetime = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
    rclpy.init()
    node = EchoServer()
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    stdin_closed = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stdin_closed.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    print("READY", flush=True)
    deadline = time.monotonic() + lifetime
    try:
        while rclpy.ok() and not stdin_closed.is_set() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
