"""The node's parameters, frame age and camera QoS over real DDS: descriptors that document every parameter, sets
that are refused with a reason or applied to the next request, staleness judged by the header stamp, `reliability:
auto` receiving every 1080p and 4K raw frame of a reliable camera driver, the bundled demo model's warning, and a
cancelled queued goal answered at once."""
from __future__ import annotations

import time

import numpy as np
import pytest

from requirements import require_module

rclpy = require_module("rclpy")

from action_msgs.msg import GoalStatus  # noqa: E402
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg, ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import DescribeParameters, SetParameters  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from mobilevlm_ros.action import AskScene as AskSceneAction  # noqa: E402
from mobilevlm_ros.params import BY_NAME  # noqa: E402
from rosgraph import SCRIPTED_NODE_EXE, Graph, wait_until  # noqa: E402
from test_node import HOLD, PARAMS, QUESTION, SCRIPTED_PARAMS, STREET, Robot, image_msg, start_robot  # noqa: E402

NS = "/robot11"


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    graph = Graph(tmp_path_factory.mktemp("params"))
    yield graph
    graph.close()


@pytest.fixture(scope="module")
def robot(graph):
    """The tiny checkpoint, frames judged by their header stamp (the default)."""
    params = {k: v for k, v in PARAMS.items() if k != "frame_age_from"}
    robot = start_robot(graph, {**params, "caption_rate_hz": 0.0, "max_frame_age_s": 2.0}, NS)
    node = f"{NS}/mobilevlm_node"
    robot.describe = graph.node.create_client(DescribeParameters, f"{node}/describe_parameters")
    robot.set = graph.node.create_client(SetParameters, f"{node}/set_parameters")
    yield robot
    assert robot.process.proc.poll() is None, "the node died during the tests:\n" + robot.process.log()


def _value(value) -> ParameterValue:
    if isinstance(value, str):
        return ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)
    if isinstance(value, bool):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
    if isinstance(value, int):
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)


def set_parameter(graph: Graph, robot: Robot, name: str, value):
    """What `ros2 param set` sends; returns the SetParametersResult."""
    request = SetParameters.Request(parameters=[ParameterMsg(name=name, value=_value(value))])
    return graph.call(robot.set, request).results[0]


def test_parameters_are_described(graph, robot):
    assert robot.describe.wait_for_service(timeout_sec=60)
    names = ["dtype", "queue_length", "temperature", "caption_prompt", "model_path", "autostart",
             "camera.front.reliability"]
    described = {d.name: d for d in graph.call(robot.describe, DescribeParameters.Request(names=names)).descriptors}
    assert described["dtype"].additional_constraints == "one of: 'float32', 'bfloat16', 'float16'"
    assert described["dtype"].description.startswith(BY_NAME["dtype"].description.replace("`", ""))
    assert [(r.from_value, r.to_value) for r in described["queue_length"].integer_range] == [(1, 64)]
    assert described["temperature"].floating_point_range[0].from_value == 0.0
    assert described["temperature"].description.endswith("[applies to the next request]")
    assert described["model_path"].description.endswith("[read at configure]")
    assert described["autostart"].read_only
    assert "auto" in described["camera.front.reliability"].additional_constraints
    assert all(described[name].description for name in names)


@pytest.mark.parametrize("name,value,reason", [
    ("model_path", "/other/model", "model_path is read at configure and the node is configured"),
    ("prefix_cache_frames", 8, "prefix_cache_frames is read at configure and the node is configured"),
    ("dtype", "int3", "dtype 'int3': expected one of float32, bfloat16, float16"),
    ("temperature", -1.0, "temperature"),
    ("max_new_tokens", 5000, "max_new_tokens 5000: no question would fit"),
    ("caption_prompt", "describe " * 2000, "caption_prompt"),
    ("autostart", True, "read-only"),
])
def test_refused_sets_say_why_and_change_nothing(graph, robot, name, value, reason):
    result = set_parameter(graph, robot, name, value)
    assert not result.successful and reason in result.reason, result.reason


def test_live_parameters_apply_to_the_next_request(graph, robot):
    robot.publish_front()
    before = wait_until(lambda: (r := robot.question()).success and r, what="an answer")
    assert before.tokens_generated == PARAMS["max_new_tokens"]
    assert set_parameter(graph, robot, "max_new_tokens", 3).successful
    robot.publish_front()
    after = wait_until(lambda: (r := robot.question()).success and r, what="an answer")
    assert after.tokens_generated == 3 and before.answer.startswith(after.answer)
    assert set_parameter(graph, robot, "max_frame_age_s", 0.001).successful
    time.sleep(0.01)  # older than 1 ms by construction: the frame above was published before the set
    stale = robot.question()
    assert stale.error_code == "STALE_FRAME" and "max_frame_age_s 0.001" in stale.error_message
    assert set_parameter(graph, robot, "max_frame_age_s", 2.0).successful
    assert set_parameter(graph, robot, "max_new_tokens", PARAMS["max_new_tokens"]).successful


def test_late_frame_is_stale_by_its_header_stamp(graph, robot):
    """A frame delivered now but stamped 5 s ago is not a fresh frame."""
    wait_until(lambda: robot.front.get_subscription_count() > 0, what="node subscribed to front")
    robot.front.publish(image_msg(STREET, time.time_ns() - 5 * 10**9))
    stale = wait_until(lambda: (r := robot.question()).error_code == "STALE_FRAME" and r, what="STALE_FRAME")
    assert "old by its header stamp (max_frame_age_s 2, frame_age_from stamp)" in stale.error_message
    stamp = robot.publish_front()
    fresh = wait_until(lambda: (r := robot.question()).success and r, what="an answer about the fresh frame")
    assert fresh.image_header.stamp.sec * 10**9 + fresh.image_header.stamp.nanosec == stamp


def _camera_status(robot: Robot, camera: str):
    for array in reversed(list(robot.diagnostics)):
        for status in array.status:
            if status.name.endswith(f"{robot.ns}/mobilevlm_node: camera {camera}"):
                return {kv.key: kv.value for kv in status.values}
    return None


@pytest.mark.parametrize("width,height", [(1920, 1080), (3840, 2160)])
def test_auto_reliability_receives_every_large_raw_frame(graph, robot, width, height):
    """A camera driver's usual publisher (reliable, keep last 10: the rclpy/rclcpp default that usb_cam and
    realsense2_camera use for images) sending raw bgr8 frames: `reliability: auto` (the default) subscribes
    reliably, and the node answers about every frame sent, one after another."""
    publisher = graph.node.create_publisher(Image, f"{NS}/aux/image_raw", QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE))
    # Arrival, not freshness, is under test: a 25 MB frame can take seconds to cross a busy 2-core machine.
    assert set_parameter(graph, robot, "max_frame_age_s", 120.0).successful
    try:
        wait_until(lambda: (s := _camera_status(robot, "aux")) and s["reliability"] == "reliable",
                   what="the aux subscription switched to reliable")
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:, : width // 2] = (0, 0, 255)  # bgr8 red on the left
        for i in range(3):
            stamp = time.time_ns()
            msg = Image(height=height, width=width, encoding="bgr8", step=width * 3, data=pixels.tobytes())
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 10**9)
            msg.header.frame_id = f"aux_{i}"
            publisher.publish(msg)
            last = []

            def answered():
                last[:] = [robot.question(camera_id="aux", max_new_tokens=1)]
                return last[0].success and last[0].image_header.frame_id == f"aux_{i}" and last[0]
            answer = wait_until(answered, timeout=60, what=f"an answer about {width}x{height} frame {i}",
                                details=lambda: f"last answer: {last[0].error_code} {last[0].error_message!r} "
                                                f"{last[0].image_header.frame_id}")
            assert answer.image_header.stamp.sec * 10**9 + answer.image_header.stamp.nanosec == stamp
    finally:
        graph.node.destroy_publisher(publisher)
        assert set_parameter(graph, robot, "max_frame_age_s", 2.0).successful


def test_empty_model_path_serves_the_demo_model_with_a_warning(tmp_path):
    graph = Graph(tmp_path)
    try:
        robot = start_robot(graph, {"model_path": "", "caption_rate_hz": 0.0, "diagnostics_period_s": 0.5},
                            "/demo3")
        status = robot.wait_for_status(lambda s: "bundled demo model" in s.message, "the demo-model warning")
        assert status.level == DiagnosticStatus.WARN and "demo_model" in status.values["model"]
        log = robot.process.log()
        assert "[WARN]" in log and "model_path is empty: loading the bundled demo model" in log
    finally:
        graph.close()


def test_cancelled_queued_goal_is_answered_at_once(graph):
    """Goal B waits behind a running goal A; cancelling B answers it CANCELLED while A is still running."""
    robot = start_robot(graph, {**SCRIPTED_PARAMS, "caption_rate_hz": 0.0, "max_frame_age_s": 60.0}, "/robot12",
                        SCRIPTED_NODE_EXE, ("front", "side"))
    try:
        robot.publish_front()
        running_feedback = []
        running = graph.result(robot.action.send_goal_async(
            AskSceneAction.Goal(question=HOLD + QUESTION, max_new_tokens=32, temperature=0.0),
            feedback_callback=running_feedback.append))
        wait_until(lambda: running_feedback, what="the held goal under way")
        queued = graph.result(robot.action.send_goal_async(
            AskSceneAction.Goal(question=QUESTION, max_new_tokens=8, temperature=0.0)))
        assert queued.accepted
        graph.result(queued.cancel_goal_async())
        result = graph.result(queued.get_result_async())
        assert result.status == GoalStatus.STATUS_CANCELED and result.result.error_code == "CANCELLED"
        assert "while waiting in the queue" in result.result.error_message
        running_result = running.get_result_async()
        assert not running_result.done()  # A is still held: B did not wait for it
        graph.result(running.cancel_goal_async())
        assert graph.result(running_result).status == GoalStatus.STATUS_CANCELED
    finally:
        robot.process.stop()
