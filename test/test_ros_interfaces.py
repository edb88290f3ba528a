"""The generated interfaces (AskScene service and action, SceneCaption, SceneMonitor, MonitorSpec, MonitorSet,
SetMonitor) import, have the documented fields, and work over real DDS between two processes.

Needs rclpy and the interfaces built (``bash scripts/setup.sh``): skipped without them, a failure under CI
(test/requirements.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from requirements import require_module

rclpy = require_module("rclpy")
require_module("mobilevlm_ros.srv", "the generated interfaces")

from action_msgs.msg import GoalStatus  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402

from mobilevlm_ros.action import AskScene as AskSceneAction  # noqa: E402
from mobilevlm_ros.msg import MonitorSet, MonitorSpec, SceneCaption, SceneMonitor  # noqa: E402
from mobilevlm_ros.rosenv import isolated_ros_env  # noqa: E402
from mobilevlm_ros.srv import AskScene, SetMonitor  # noqa: E402

HELPER = Path(__file__).parent / "ros_helpers" / "ask_scene_server.py"
TIMEOUT_S = 30.0

REQUEST_FIELDS = {
    "question": "string",
    "camera_id": "string",
    "max_new_tokens": "uint32",
    "temperature": "float",
    "frame_stamp": "builtin_interfaces/Time",
    "choices": "sequence<string>",
}
RESULT_FIELDS = {
    "success": "boolean",
    "error_code": "string",
    "error_message": "string",
    "answer": "string",
    "image_header": "std_msgs/Header",
    "camera_id": "string",
    "tokens_generated": "uint32",
    "vision_ms": "float",
    "prefill_ms": "float",
    "decode_ms": "float",
    "total_ms": "float",
    "choice_probabilities": "sequence<float>",
}
ERROR_CODES = (
    "UNKNOWN_CAMERA", "NO_FRAME", "STALE_FRAME", "UNSUPPORTED_ENCODING", "BAD_FRAME", "BAD_REQUEST",
    "PROMPT_TOO_LONG", "BUSY",
    "CANCELLED", "SHUTTING_DOWN", "NOT_ACTIVE", "INFERENCE_FAILED", "FRAME_GONE",
)


def test_service_fields():
    assert AskScene.Request.get_fields_and_field_types() == REQUEST_FIELDS
    assert AskScene.Response.get_fields_and_field_types() == RESULT_FIELDS
    for code in ERROR_CODES:
        assert getattr(AskScene.Response, code) == code
    request = AskScene.Request()
    assert (request.question, request.camera_id, request.max_new_tokens, request.temperature) == ("", "", 0, 0.0)
    assert (request.frame_stamp.sec, request.frame_stamp.nanosec, list(request.choices)) == (0, 0, [])
    request.temperature = -1.0
    request.max_new_tokens = 2**32 - 1
    response = AskScene.Response()
    assert response.success is False and response.error_code == "" and response.answer == ""
    assert type(response.image_header).__name__ == "Header"


def test_action_fields():
    assert AskSceneAction.Goal.get_fields_and_field_types() == REQUEST_FIELDS
    assert AskSceneAction.Result.get_fields_and_field_types() == RESULT_FIELDS
    assert AskSceneAction.Feedback.get_fields_and_field_types() == {
        "text_delta": "string",
        "partial_answer": "string",
        "tokens_generated": "uint32",
    }
    for code in ERROR_CODES:
        assert getattr(AskSceneAction.Result, code) == code


def test_scene_caption_fields():
    assert SceneCaption.get_fields_and_field_types() == {
        "header": "std_msgs/Header",
        "camera_id": "string",
        "caption": "string",
        "prompt": "string",
        "latency_ms": "float",
    }
    msg = SceneCaption(camera_id="front", caption="a red cup on a table", prompt="Describe.", latency_ms=12.5)
    msg.header.frame_id = "front_optical_frame"
    from rclpy.serialization import deserialize_message, serialize_message

    assert deserialize_message(serialize_message(msg), SceneCaption) == msg


def test_monitor_interfaces():
    assert SceneMonitor.get_fields_and_field_types() == {
        "header": "std_msgs/Header", "name": "string", "camera_id": "string", "question": "string",
        "answer": "string", "probability": "float", "changed": "boolean"}
    assert MonitorSpec.get_fields_and_field_types() == {
        "name": "string", "question": "string", "camera_id": "string", "rate_hz": "double",
        "choices": "sequence<string>"}
    assert MonitorSet.get_fields_and_field_types() == {"monitors": "sequence<mobilevlm_ros/MonitorSpec>"}
    assert SetMonitor.Request.get_fields_and_field_types() == {
        "name": "string", "question": "string", "camera_id": "string", "rate_hz": "double",
        "choices": "sequence<string>"}
    assert SetMonitor.Response.get_fields_and_field_types() == {
        "success": "boolean", "error_code": "string", "error_message": "string"}
    from mobilevlm_ros.server import UNKNOWN_MONITOR, ErrorCode

    for code in ("BAD_REQUEST", "UNKNOWN_CAMERA", "UNKNOWN_MONITOR", "PROMPT_TOO_LONG", "NOT_ACTIVE"):
        assert getattr(SetMonitor.Response, code) == code
        assert code == UNKNOWN_MONITOR or getattr(ErrorCode, code) == code
    msg = SceneMonitor(name="walker", camera_id="front", question="Is there a pedestrian?", answer="yes",
                       probability=0.75, changed=True)
    from rclpy.serialization import deserialize_message, serialize_message

    assert deserialize_message(serialize_message(msg), SceneMonitor) == msg


def test_rosenv_isolation(tmp_path):
    a = isolated_ros_env({"PATH": "/bin"}, tmp_dir=tmp_path / "a")
    b = isolated_ros_env({"PATH": "/bin"}, tmp_dir=tmp_path / "b")
    assert a["ROS_DOMAIN_ID"] != b["ROS_DOMAIN_ID"]
    for env in (a, b):
        assert 1 <= int(env["ROS_DOMAIN_ID"]) <= 101
        assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST" and env["ROS_LOCALHOST_ONLY"] == "1"
        assert env["RMW_IMPLEMENTATION"] == "rmw_fastrtps_cpp" and env["PATH"] == "/bin"
        assert Path(env["ROS_LOG_DIR"]).is_dir()
        assert Path(env["FASTDDS_DEFAULT_PROFILES_FILE"]).read_text().count("<count>30</count>") == 1
        assert "FASTRTPS_DEFAULT_PROFILES_FILE" not in env
    humble = isolated_ros_env({"ROS_DISTRO": "humble"}, tmp_dir=tmp_path / "h")
    assert "FASTDDS_DEFAULT_PROFILES_FILE" not in humble and Path(humble["FASTRTPS_DEFAULT_PROFILES_FILE"]).is_file()
    assert humble["ROS_LOCALHOST_ONLY"] == "1"
    # Jazzy: Fast DDS 2's variable, and no ROS_LOCALHOST_ONLY (deprecated there: it would override the range and
    # log warnings), not even an inherited one
    jazzy = isolated_ros_env({"ROS_DISTRO": "jazzy", "ROS_LOCALHOST_ONLY": "1"}, tmp_dir=tmp_path / "j")
    assert "FASTDDS_DEFAULT_PROFILES_FILE" not in jazzy and Path(jazzy["FASTRTPS_DEFAULT_PROFILES_FILE"]).is_file()
    assert "ROS_LOCALHOST_ONLY" not in jazzy and jazzy["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    kilted = isolated_ros_env({"ROS_DISTRO": "kilted"}, tmp_dir=tmp_path / "k")
    assert "ROS_LOCALHOST_ONLY" not in kilted and Path(kilted["FASTDDS_DEFAULT_PROFILES_FILE"]).is_file()
    plain = isolated_ros_env({"FASTDDS_DEFAULT_PROFILES_FILE": "/x.xml"}, tmp_dir=tmp_path / "c", fast_discovery=False)
    assert "FASTDDS_DEFAULT_PROFILES_FILE" not in plain


@pytest.fixture(scope="module")
def ros_graph(tmp_path_factory):
    """An echo server in its own process and a client node in this one, on a fresh isolated domain."""
    env = isolated_ros_env(tmp_dir=tmp_path_factory.mktemp("ros"))
    server = subprocess.Popen(
        [sys.executable, str(HELPER), "120"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    context = rclpy.Context()
    try:
        with pytest.MonkeyPatch.context() as mp:
            # rcl reads ROS_DOMAIN_ID and the rest from this process's environment when it makes the context
            # and the node (and Fast DDS its profile when it makes the first participant).
            for name, value in env.items():
                if os.environ.get(name) != value:
                    mp.setenv(name, value)
            rclpy.init(context=context)
            node = rclpy.create_node("ask_scene_test_client", context=context)
            executor = SingleThreadedExecutor(context=context)
            executor.add_node(node)
            try:
                yield node, executor, server
            finally:
                executor.shutdown()
                node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
        try:
            server.communicate(timeout=15)  # closes its stdin: the server exits by itself
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()


def _wait_for(condition, server, what: str, timeout: float = TIMEOUT_S) -> None:
    """Wait until ``condition()`` holds, failing early with the server's output if the server died."""
    deadline = time.monotonic() + timeout
    while not condition():
        if server.poll() is not None:
            pytest.fail(f"the server process exited ({server.returncode}) while waiting for {what}:\n"
                        f"{server.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")


def test_service_round_trip_over_dds(ros_graph):
    node, executor, server = ros_graph
    client = node.create_client(AskScene, "ask_scene")
    _wait_for(lambda: client.wait_for_service(timeout_sec=0.5), server, "the AskScene service")

    request = AskScene.Request(question="what is on the table?", camera_id="", max_new_tokens=0, temperature=-1.0)
    future = client.call_async(request)
    _wait_for(lambda: executor.spin_until_future_complete(future, timeout_sec=0.5) or future.done(), server,
              "the AskScene response")
    response = future.result()
    assert response.success and response.error_code == ""
    assert response.answer == "echo: what is on the table?"
    assert response.camera_id == "front" and response.image_header.frame_id == "front_optical_frame"
    assert response.image_header.stamp.sec > 0
    assert response.tokens_generated == 6 and response.total_ms == pytest.approx(6.5)

    future = client.call_async(AskScene.Request(question=""))
    _wait_for(lambda: executor.spin_until_future_complete(future, timeout_sec=0.5) or future.done(), server,
              "the AskScene error response")
    response = future.result()
    assert not response.success and response.error_code == AskScene.Response.BAD_REQUEST
    node.destroy_client(client)


def test_action_round_trip_over_dds(ros_graph):
    node, executor, server = ros_graph
    client = ActionClient(node, AskSceneAction, "ask_scene_action")
    _wait_for(lambda: client.wait_for_server(timeout_sec=0.5), server, "the AskScene action server")

    feedback: list = []
    goal = AskSceneAction.Goal(question="any people here", camera_id="rear", max_new_tokens=16, temperature=0.0)
    goal_future = client.send_goal_async(goal, feedback_callback=lambda msg: feedback.append(msg.feedback))
    _wait_for(lambda: executor.spin_until_future_complete(goal_future, timeout_sec=0.5) or goal_future.done(),
              server, "the goal response")
    goal_handle = goal_future.result()
    assert goal_handle.accepted

    # The server streams the answer, then re-sends its last feedback until cancelled.
    _wait_for(lambda: executor.spin_once(timeout_sec=0.1) or (feedback and feedback[-1].tokens_generated == 4),
              server, "the complete feedback")
    for f in feedback:
        assert "echo: any people here".startswith(f.partial_answer) and f.partial_answer.endswith(f.text_delta)
    assert feedback[-1].partial_answer == "echo: any people here"

    cancel_future = goal_handle.cancel_goal_async()
    _wait_for(lambda: executor.spin_until_future_complete(cancel_future, timeout_sec=0.5) or cancel_future.done(),
              server, "the cancel response")
    assert len(cancel_future.result().goals_canceling) == 1

    result_future = goal_handle.get_result_async()
    _wait_for(lambda: executor.spin_until_future_complete(result_future, timeout_sec=0.5) or result_future.done(),
              server, "the action result")
    assert result_future.result().status == GoalStatus.STATUS_CANCELED
    result = result_future.result().result
    assert not result.success and result.error_code == AskSceneAction.Result.CANCELLED
    assert result.answer == "echo: any people here" and result.camera_id == "rear"
    assert result.image_header.frame_id == "rear_optical_frame" and result.tokens_generated == 4
    client.destroy()


def test_server_error_codes_are_the_interface_constants():
    from mobilevlm_ros.server import ErrorCode

    assert {v for k, v in vars(ErrorCode).items() if k.isupper()} == set(ERROR_CODES)
