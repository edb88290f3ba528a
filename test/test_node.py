"""mobilevlm_node over real DDS: node, bag replay and this client in separate processes, in a /robot7 namespace.

The node serves the real tiny V2 reference checkpoint, so answers are checked against the reference's greedy ids.
"""
from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

rclpy = pytest.importorskip("rclpy")

from action_msgs.msg import GoalStatus  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from conftest import CHECKPOINTS, REFERENCE, golden_cases  # noqa: E402
from mobilevlm_ros.action import AskScene as AskSceneAction  # noqa: E402
from mobilevlm_ros.bags import CameraFrame, write_camera_bag  # noqa: E402
from mobilevlm_ros.demo.scenes import answer_matches, make_scene  # noqa: E402
from mobilevlm_ros.msg import SceneCaption  # noqa: E402
from mobilevlm_ros.node import FEEDBACK_QOS  # noqa: E402
from mobilevlm_ros.srv import AskScene  # noqa: E402
from rosgraph import Graph, NodeProcess, wait_until  # noqa: E402

MODEL = CHECKPOINTS / "MobileVLM_V2-tiny"
NS = "/robot7"
STREET = np.asarray(PILImage.open(REFERENCE / "images" / "img0_street_500x300_rgb.png").convert("RGB"))
QUESTION = golden_cases("MobileVLM_V2-tiny")[0]["turns"][0]
PARAMS = {
    "model_path": str(MODEL),
    "cameras": ["front", "rear", "aux"],
    "default_camera": "front",
    "camera": {"rear": {"transport": "compressed"}},
    "max_frame_age_s": 1.5,
    "max_new_tokens": 8,
    "queue_length": 2,
    "max_question_chars": 20000,
    "caption_rate_hz": 2.0,
    "caption_prompt": "Describe the scene.",
    "caption_cameras": ["front"],
    "caption_max_new_tokens": 6,
    "diagnostics_period_s": 0.5,
}


def image_msg(rgb: np.ndarray, stamp_ns: int, encoding: str = "rgb8", data: bytes | None = None) -> Image:
    h, w, _ = rgb.shape
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=w * 3)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = "front_optical_frame"
    msg.data = rgb.tobytes() if data is None else data
    return msg


def jpeg_msg(rgb: np.ndarray, stamp_ns: int, truncate: bool = False) -> CompressedImage:
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    msg = CompressedImage(format="jpeg", data=data[: len(data) // 2] if truncate else data)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = "rear_optical_frame"
    return msg


class Robot:
    """The client side of one node: service, action, camera publishers, caption and diagnostics subscriptions."""

    def __init__(self, graph: Graph, ns: str = NS):
        node = graph.node
        self.graph = graph
        self.ns = ns
        # A client that sends bursts needs a response history as deep as its burst (the default keeps 10).
        self.ask = node.create_client(AskScene, f"{ns}/ask_scene", qos_profile=QoSProfile(depth=100))
        self.action = ActionClient(node, AskSceneAction, f"{ns}/ask_scene", feedback_sub_qos_profile=FEEDBACK_QOS)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.front = node.create_publisher(Image, f"{ns}/front/image_raw", qos)
        self.rear = node.create_publisher(CompressedImage, f"{ns}/rear/image_raw/compressed", qos)
        self.captions: list[tuple[float, SceneCaption]] = []
        self.diagnostics: list[DiagnosticArray] = []
        node.create_subscription(SceneCaption, f"{ns}/caption",
                                 lambda m: self.captions.append((time.monotonic(), m)), 10)
        node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)

    def question(self, question: str = QUESTION, camera_id: str = "", max_new_tokens: int = 0,
                 temperature: float = -1.0, timeout: float = 60.0):
        request = AskScene.Request(question=question, camera_id=camera_id, max_new_tokens=max_new_tokens,
                                   temperature=temperature)
        return self.graph.call(self.ask, request, timeout)

    @contextlib.contextmanager
    def streaming_front(self, period_s: float = 0.1, rgb: np.ndarray = STREET):
        """A live camera: a fresh front frame every period_s while the block runs."""
        stop = threading.Event()

        def publish():
            while not stop.wait(period_s):
                self.front.publish(image_msg(rgb, time.time_ns()))

        self.publish_front(rgb)
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        try:
            yield
        finally:
            stop.set()
            publisher.join()

    def publish_front(self, rgb=STREET, **kwargs) -> int:
        stamp = time.time_ns()
        wait_until(lambda: self.front.get_subscription_count() > 0, what="node subscribed to front")
        self.front.publish(image_msg(rgb, stamp, **kwargs))
        return stamp


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    graph = Graph(tmp_path_factory.mktemp("robot7"))
    yield graph
    graph.close()


@pytest.fixture(scope="module")
def robot(graph):
    process = graph.start_node(PARAMS, "robot7", ["-r", f"__ns:={NS}"])
    robot = Robot(graph)
    graph.wait_for_service(robot.ask, process)
    assert robot.action.wait_for_server(timeout_sec=60)
    robot.process = process
    yield robot
    assert process.proc.poll() is None, "the node died during the tests:\n" + process.log()


def inference_values(robot: Robot) -> dict:
    """The newest /diagnostics values of this robot's inference status ({} before the first arrives)."""
    for array in reversed(robot.diagnostics):
        for status in array.status:
            if status.name.endswith(f"{robot.ns}/mobilevlm_node: inference"):
                return {kv.key: kv.value for kv in status.values}
    return {}


def answered_frame(response) -> tuple[int, int, str]:
    h = response.image_header
    return h.stamp.sec, h.stamp.nanosec, h.frame_id


def wait_for_frame_answer(robot: Robot, camera_id: str, stamps: set[int], timeout: float = 60.0):
    """Ask until the node has a frame from the replay (discovery and the first frames take a moment)."""
    def attempt():
        response = robot.question(camera_id=camera_id)
        if response.success and response.image_header.stamp.sec * 10**9 + response.image_header.stamp.nanosec \
                in stamps:
            return response
        assert response.error_code in ("", "NO_FRAME", "STALE_FRAME"), response.error_message
        return None
    return wait_until(attempt, timeout, interval=0.1, what=f"an answer about a {camera_id} frame from the bag")


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_replay_service_and_action(graph, robot, tmp_path, storage):
    start = 1_700_000_000 * 10**9
    frames = []
    for i in range(40):  # 4 s at 10 Hz per camera, real timestamps
        stamp = start + i * 100_000_000
        frames.append(CameraFrame(f"{NS}/front/image_raw", stamp, STREET, "front_optical_frame"))
        frames.append(CameraFrame(f"{NS}/rear/image_raw/compressed", stamp + 5_000_000, STREET[::-1].copy(),
                                  "rear_optical_frame", compressed=True))
    bag = write_camera_bag(tmp_path / f"cameras_{storage}", frames, storage)
    assert (bag / "metadata.yaml").read_text().count("version: 8") == 1
    stamps = {f.stamp_ns for f in frames}
    replay = subprocess.Popen([sys.executable, "-m", "mobilevlm_ros.bags", str(bag)], env=graph.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        front = wait_for_frame_answer(robot, "front", stamps)
        assert answered_frame(front)[2] == "front_optical_frame" and front.camera_id == "front"
        golden = golden_cases("MobileVLM_V2-tiny")[0]["generated_ids"][:8]
        assert front.tokens_generated == 8 and front.answer  # the street image, the golden question
        rear = wait_for_frame_answer(robot, "rear", stamps)
        assert answered_frame(rear)[2] == "rear_optical_frame"
        assert rear.vision_ms > 0 and rear.prefill_ms > 0 and rear.decode_ms > 0 and rear.total_ms > 0

        feedback = []
        goal = AskSceneAction.Goal(question=QUESTION, camera_id="front", max_new_tokens=16, temperature=0.0)
        handle = graph.result(robot.action.send_goal_async(goal, feedback_callback=lambda f: feedback.append(
            f.feedback)))
        assert handle.accepted
        result = graph.result(handle.get_result_async())
        assert result.status == GoalStatus.STATUS_SUCCEEDED and result.result.success
        assert result.result.image_header.stamp.sec * 10**9 + result.result.image_header.stamp.nanosec in stamps
        # Feedback (a topic) and the result (a service) travel separately, and rclpy's ActionClient drops
        # feedback that arrives after the result: what did arrive must add up to a prefix of the answer.
        assert feedback and result.result.answer.startswith("".join(f.text_delta for f in feedback))
        assert all(result.result.answer.startswith(f.partial_answer) for f in feedback)
        assert result.result.tokens_generated == 16
        assert golden  # the service answer above used the same question with 8 tokens
    finally:
        out, _ = replay.communicate(timeout=60)
    assert replay.returncode == 0 and "published 80 messages" in out


def test_error_codes_from_real_requests(graph, robot):
    assert robot.question(camera_id="left").error_code == "UNKNOWN_CAMERA"
    assert robot.question(camera_id="aux").error_code == "NO_FRAME"
    empty = robot.question(question="  ")
    assert (empty.success, empty.error_code) == (False, "BAD_REQUEST")
    too_long = robot.question(question="How many cars are in the image? " * 400)
    assert too_long.error_code == "PROMPT_TOO_LONG" and "context holds 2048" in too_long.error_message

    robot.publish_front(encoding="32FC1")
    unsupported = wait_until(lambda: (r := robot.question()).error_code == "UNSUPPORTED_ENCODING" and r,
                             what="UNSUPPORTED_ENCODING")
    assert "32FC1" in unsupported.error_message
    robot.publish_front(data=STREET.tobytes()[:1000])
    short = wait_until(lambda: (r := robot.question()).error_code == "BAD_FRAME" and r, what="BAD_FRAME")
    assert "wrong data length" in short.error_message

    wait_until(lambda: robot.rear.get_subscription_count() > 0, what="node subscribed to rear")
    robot.rear.publish(jpeg_msg(STREET, time.time_ns(), truncate=True))
    truncated = wait_until(lambda: (r := robot.question(camera_id="rear")).error_code == "BAD_FRAME" and r,
                           what="BAD_FRAME for a truncated JPEG")
    assert "truncated" in truncated.error_message

    stamp = robot.publish_front()
    fresh = wait_until(lambda: (r := robot.question()).success and r, what="an answer about the good frame")
    assert fresh.image_header.stamp.sec * 10**9 + fresh.image_header.stamp.nanosec == stamp
    stale = wait_until(lambda: (r := robot.question()).error_code == "STALE_FRAME" and r, what="STALE_FRAME")
    assert "max_frame_age_s 1.5" in stale.error_message
    # Logged once per camera, not per frame.
    wait_until(lambda: "32FC1" in robot.process.log(), what="the encoding error in the node log")
    robot.publish_front(encoding="32FC1")
    wait_until(lambda: robot.question().error_code == "UNSUPPORTED_ENCODING", what="UNSUPPORTED_ENCODING again")
    assert robot.process.log().count("image encoding '32FC1' is not supported") == 1


def test_burst_of_50_gets_answers_or_busy(graph, robot):
    with robot.streaming_front():
        wait_until(lambda: robot.question().success, what="a first answer")
        request = AskScene.Request(question=QUESTION, max_new_tokens=8, temperature=-1.0)
        futures = [robot.ask.call_async(request) for _ in range(50)]
        responses = [graph.result(f, 180) for f in futures]
    codes = [r.error_code for r in responses]
    assert set(codes) <= {"", "BUSY"}, codes
    assert codes.count("") >= 1 and codes.count("BUSY") >= 1
    busy = next(r for r in responses if r.error_code == "BUSY")
    assert "already waiting" in busy.error_message
    robot.publish_front()
    assert wait_until(lambda: robot.question().success, what="an answer after the burst")


def test_cancel_mid_generation_and_no_captions_while_busy(graph, robot):
    with robot.streaming_front():
        wait_until(lambda: robot.question().success, what="a fresh frame")
        feedback = []
        goal = AskSceneAction.Goal(question=QUESTION, max_new_tokens=1800, temperature=0.0)
        handle = graph.result(robot.action.send_goal_async(goal, feedback_callback=feedback.append))
        wait_until(lambda: len(feedback) >= 3, what="streamed feedback")
        busy_since = time.monotonic()
        wait_until(lambda: len(feedback) >= 60, what="more feedback")  # generation is well under way
        captions_while_busy = [m for t, m in robot.captions if t > busy_since + 0.6]
        graph.result(handle.cancel_goal_async())
        result = graph.result(handle.get_result_async())
        assert result.status == GoalStatus.STATUS_CANCELED
        assert result.result.error_code == "CANCELLED" and not result.result.success
        assert 0 < result.result.tokens_generated < 1800
        assert captions_while_busy == []  # captions are skipped, not queued, while a question runs
        count = len(robot.captions)
        wait_until(lambda: len(robot.captions) > count, what="captions resuming when idle")


def test_captions_and_diagnostics(graph, robot):
    stop = threading.Event()
    stamps = []

    def publish():
        while not stop.wait(0.1):
            stamps.append(time.time_ns())
            robot.front.publish(image_msg(STREET, stamps[-1]))

    robot.captions.clear()
    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        wait_until(lambda: len(robot.captions) >= 4, what="4 captions")
    finally:
        stop.set()
        publisher.join()
    times = [t for t, _ in robot.captions]
    for _, caption in robot.captions:
        assert caption.camera_id == "front" and caption.prompt == "Describe the scene."
        assert caption.header.frame_id == "front_optical_frame"
        assert caption.header.stamp.sec * 10**9 + caption.header.stamp.nanosec in stamps
        assert caption.caption and caption.latency_ms > 0
    # At most caption_rate_hz (2 Hz): the timer never fires faster, whatever the frame rate.
    assert len(times) - 1 <= (times[-1] - times[0]) * 2.0 + 1

    values = wait_until(lambda: inference_values(robot), what="diagnostics")
    for key in ("model", "backend", "device", "queue_depth", "rejected_busy", "failed", "total_ms_p50",
                "vision_ms_p90", "decode_ms_p99"):
        assert key in values, key
    assert values["backend"] == "torch" and values["model"] == str(MODEL)
    cameras = {s.name.rsplit(" ", 1)[-1]: s for a in robot.diagnostics for s in a.status if "camera" in s.name}
    assert {"front", "rear", "aux"} <= set(cameras)
    assert cameras["aux"].message == "no frame yet"


def test_shutdown_answers_requests_in_flight(tmp_path):
    graph = Graph(tmp_path)
    try:
        process = graph.start_node({**PARAMS, "queue_length": 3, "caption_rate_hz": 0.0,
                                    "max_frame_age_s": 60.0}, "shutdown", ["-r", "__ns:=/robot9"])
        robot = Robot(graph, "/robot9")
        graph.wait_for_service(robot.ask, process)
        assert robot.action.wait_for_server(timeout_sec=60)
        # A live camera: one frame sent the moment the node's subscription shows up can be lost while DDS
        # discovery is still one-sided.
        with robot.streaming_front():
            wait_until(lambda: robot.question().success, what="a first answer")
            feedback = []
            goal = AskSceneAction.Goal(question=QUESTION, max_new_tokens=1800)
            handle = graph.result(robot.action.send_goal_async(goal, feedback_callback=feedback.append))
            wait_until(lambda: len(feedback) >= 3, what="generation under way")
            request = AskScene.Request(question=QUESTION, max_new_tokens=1800, temperature=-1.0)
            futures = [robot.ask.call_async(request) for _ in range(3)]
            wait_until(lambda: inference_values(robot).get("queue_depth") == "3",
                       what="the three requests queued behind the goal")
            process.proc.send_signal(signal.SIGINT)
            responses = [graph.result(f, 60) for f in futures]
            result = graph.result(handle.get_result_async(), 60)
        assert process.proc.wait(60) == 0, process.log()
    finally:
        graph.close()
    assert result.result.error_code == "SHUTTING_DOWN" and result.status == GoalStatus.STATUS_ABORTED
    assert {r.error_code for r in responses} <= {"SHUTTING_DOWN", "BUSY"}
    assert any(r.error_code == "SHUTTING_DOWN" for r in responses)


def test_quantize_parameter_lists_the_model_modes():
    from mobilevlm_ros.model.quantize import MODES
    from mobilevlm_ros.node import QUANTIZE_MODES

    assert QUANTIZE_MODES == MODES


@pytest.mark.parametrize("change,message", [
    ({"dtype": "int3"}, "dtype 'int3': expected one of float32, bfloat16, float16"),
    ({"cameras": ["front", "front"]}, "all non-empty and distinct"),
    ({"default_camera": "left"}, "default_camera 'left' is not in cameras"),
    ({"camera": {"rear": {"transport": "h264"}}}, "camera.rear.transport 'h264'"),
    ({"queue_length": 0}, "queue_length 0: must be in 1..64"),
    ({"cuda_graph_compile": "fast"}, "cuda_graph_compile 'fast': expected one of ''"),
    ({"quantize": "int3"}, "quantize 'int3': expected '' or one of int8, int8-dynamic, int4"),
    ({"model_path": "/nonexistent"}, "model_path '/nonexistent' is not a directory"),
])
def test_bad_parameters_stop_the_node_with_a_clear_message(tmp_path, change, message):
    env_graph = Graph(tmp_path)
    try:
        process = env_graph.start_node({**PARAMS, **change}, "bad")
        assert process.proc.wait(120) == 1
    finally:
        env_graph.close()
    assert message in process.log()


def test_shipped_params_file_starts_the_node(tmp_path):
    """config/vlm.yaml as README starts it: model_path is empty there, so the bundled demo model answers about a
    generated road scene."""
    graph = Graph(tmp_path)
    try:
        config = Path(__file__).resolve().parent.parent / "config" / "vlm.yaml"
        process = NodeProcess(graph.env, config, tmp_path / "vlm.log", ["-r", "__ns:=/cfg"])
        graph.processes.append(process)
        robot = Robot(graph, "/cfg")
        graph.wait_for_service(robot.ask, process)
        response = robot.question("How many cones are there?", temperature=0.0)
        assert response.error_code == "NO_FRAME" and "'front'" in response.error_message
        scene = next(s for s in (make_scene(20241, i) for i in range(50)) if s.count("cone") >= 2)
        responses = []

        def answered() -> bool:  # the first frames may still be on their way
            responses.append(robot.question("How many cones are there?", temperature=0.0))
            return responses[-1].error_code != "NO_FRAME"

        with robot.streaming_front(rgb=scene.image):
            wait_until(answered, what="an answer about the published scene")
        assert responses[-1].success, responses[-1].error_message
        assert answer_matches(responses[-1].answer, str(scene.count("cone"))), responses[-1].answer
    finally:
        graph.close()
