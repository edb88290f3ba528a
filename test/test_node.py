"""mobilevlm_node over real DDS: the node, bag replay and this client in separate processes, in namespaces.

/robot7 is ``python -m mobilevlm_ros.node`` serving the real tiny V2 reference checkpoint. Its answers are compared
with the reference's greedy answers (test/data/reference/goldens: the text the reference decoded from its 16 greedy
ids) for the reference's own images, sent the way cameras send them: the PNGs' pixels as rgb8, rgba8 and mono8
Images, demo.jpg's bytes as a CompressedImage (data/reference/README.md names each case's image and question).

/robot8 is the same node with a scripted model (ros_helpers/scripted_node.py): a question marked [fail] makes the
model raise, one marked [hold] stays in flight until it is cancelled. Inference failures, bursts against a busy
worker, cancels and shutdowns with requests in flight then happen on demand, not in a race with the model's speed.
"""
from __future__ import annotations

import contextlib
import io
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from requirements import require_module

rclpy = require_module("rclpy")

from action_msgs.msg import GoalStatus  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from conftest import CHECKPOINTS, REFERENCE, golden_cases  # noqa: E402
from mobilevlm_ros.action import AskScene as AskSceneAction  # noqa: E402
from mobilevlm_ros.bags import CameraFrame, write_camera_bag  # noqa: E402
from mobilevlm_ros.demo.scenes import answer_matches, make_scene  # noqa: E402
from mobilevlm_ros.msg import SceneCaption  # noqa: E402
from mobilevlm_ros.srv import AskScene  # noqa: E402
from rosgraph import SCRIPTED_NODE_EXE, Graph, NodeProcess, interrupt, wait_until  # noqa: E402

MODEL = CHECKPOINTS / "MobileVLM_V2-tiny"
NS = "/robot7"
SCRIPTED_NS = "/robot8"
CASES = {case["case"]: case for case in golden_cases("MobileVLM_V2-tiny")}
STREET_CASE = CASES["case0_img0"]
QUESTION = STREET_CASE["turns"][0]
STREET = np.asarray(PILImage.open(REFERENCE / STREET_CASE["image"]).convert("RGB"))
STREET_ANSWER = STREET_CASE["output_text"]  # what the reference answers QUESTION about STREET in 16 greedy tokens
GOLDEN_TOKENS = len(STREET_CASE["generated_ids"])
# README: action feedback is reliable, keep-last 1000; a client that joins the deltas subscribes as deep.
FEEDBACK_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE)
PARAMS = {
    "model_path": str(MODEL),
    "cameras": ["front", "rear", "aux"],
    "default_camera": "front",
    "camera": {"rear": {"transport": "compressed"}},
    # The bag is replayed with its recorded stamps (2023) and no /clock: judge a frame's age by its arrival.
    "frame_age_from": "arrival",
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
# /robot8: questions on front, captions only of a second camera, so that tests choose whether captions run.
SCRIPTED_PARAMS = {**{k: v for k, v in PARAMS.items() if k != "camera"}, "cameras": ["front", "side"],
                   "caption_cameras": ["side"]}
HOLD = "[hold] "  # scripted_node.py: generation stays in flight until cancelled
FAIL = "[fail] "  # scripted_node.py: the model raises RuntimeError


def stamp_ns(header) -> int:
    return header.stamp.sec * 10**9 + header.stamp.nanosec


def _stamp(msg, stamp: int, frame_id: str):
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 10**9)
    msg.header.frame_id = frame_id
    return msg


def image_msg(rgb: np.ndarray, stamp: int, encoding: str = "rgb8", data: bytes | None = None,
              frame_id: str = "front_optical_frame") -> Image:
    h, w, _ = rgb.shape
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=w * 3)
    msg.data = rgb.tobytes() if data is None else data
    return _stamp(msg, stamp, frame_id)


def raw_msg(pixels: np.ndarray, stamp: int, encoding: str, frame_id: str = "front_optical_frame") -> Image:
    """An Image of [H, W] or [H, W, C] uint8 pixels, as stored (no conversion), rows unpadded."""
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=w * channels)
    msg.data = np.ascontiguousarray(pixels).tobytes()
    return _stamp(msg, stamp, frame_id)


def jpeg_msg(rgb: np.ndarray, stamp: int, truncate: bool = False) -> CompressedImage:
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return compressed_msg(data[: len(data) // 2] if truncate else data, stamp)


def compressed_msg(data: bytes, stamp: int, frame_id: str = "rear_optical_frame") -> CompressedImage:
    return _stamp(CompressedImage(format="jpeg", data=data), stamp, frame_id)


@dataclass
class NodeStatus:
    """A node's main '<ns>/mobilevlm_node: inference' status and the stamp of the array it came in (the node's clock
    when it published it)."""

    stamp: int
    level: bytes
    message: str
    values: dict


class Robot:
    """The client side of one node: service, action, camera publishers, caption and diagnostics subscriptions."""

    def __init__(self, graph: Graph, ns: str = NS, raw_cameras: tuple[str, ...] = ("front",)):
        node = graph.node
        self.graph = graph
        self.ns = ns
        # A client that sends bursts needs a response history as deep as its burst (the default keeps 10).
        self.ask = node.create_client(AskScene, f"{ns}/ask_scene", qos_profile=QoSProfile(depth=100))
        self.action = ActionClient(node, AskSceneAction, f"{ns}/ask_scene", feedback_sub_qos_profile=FEEDBACK_QOS)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.publishers = {camera: node.create_publisher(Image, f"{ns}/{camera}/image_raw", qos)
                           for camera in raw_cameras}
        self.publishers["rear"] = node.create_publisher(CompressedImage, f"{ns}/rear/image_raw/compressed", qos)
        self.front, self.rear = self.publishers["front"], self.publishers["rear"]
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
    def streaming(self, camera: str, make_msg, period_s: float = 0.1):
        """A live camera: make_msg(stamp) published on ``camera`` every period_s while the block runs. Yields the
        set of stamps published (each is added before its message goes out)."""
        publisher = self.publishers[camera]
        wait_until(lambda: publisher.get_subscription_count() > 0, what=f"node subscribed to {camera}")
        stamps: set[int] = set()
        stop = threading.Event()

        def publish_one():
            stamp = time.time_ns()
            stamps.add(stamp)
            publisher.publish(make_msg(stamp))

        def publish():
            while not stop.wait(period_s):
                publish_one()

        publish_one()
        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        try:
            yield stamps
        finally:
            stop.set()
            thread.join()

    def streaming_front(self, period_s: float = 0.1, rgb: np.ndarray = STREET):
        return self.streaming("front", lambda stamp: image_msg(rgb, stamp), period_s)

    def publish_front(self, rgb=STREET, **kwargs) -> int:
        stamp = time.time_ns()
        wait_until(lambda: self.front.get_subscription_count() > 0, what="node subscribed to front")
        self.front.publish(image_msg(rgb, stamp, **kwargs))
        return stamp

    def node_statuses(self) -> list[NodeStatus]:
        out = []
        for array in list(self.diagnostics):
            for status in array.status:
                if status.name.endswith(f"{self.ns}/mobilevlm_node: inference"):
                    out.append(NodeStatus(stamp_ns(array.header), status.level, status.message,
                                          {kv.key: kv.value for kv in status.values}))
        return out

    def wait_for_status(self, condition, what: str, timeout: float = 60.0) -> NodeStatus:
        """The newest main status received that satisfies condition(NodeStatus), waiting for one."""
        return wait_until(lambda: next((s for s in reversed(self.node_statuses()) if condition(s)), None),
                          timeout, what=what)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    graph = Graph(tmp_path_factory.mktemp("robots"))
    yield graph
    graph.close()


def start_robot(graph: Graph, params: dict, ns: str, command=None, raw_cameras=("front",)) -> Robot:
    kwargs = {} if command is None else {"command": command}
    process = graph.start_node(params, ns.strip("/"), ["-r", f"__ns:={ns}"], **kwargs)
    robot = Robot(graph, ns, raw_cameras)
    graph.wait_until_serving(robot.ask, process)
    assert robot.action.wait_for_server(timeout_sec=60)
    robot.process = process
    return robot


@pytest.fixture(scope="module")
def robot(graph):
    robot = start_robot(graph, PARAMS, NS)
    yield robot
    assert robot.process.proc.poll() is None, "the node died during the tests:\n" + robot.process.log()


@pytest.fixture(scope="module")
def scripted(graph):
    robot = start_robot(graph, SCRIPTED_PARAMS, SCRIPTED_NS, SCRIPTED_NODE_EXE, ("front", "side"))
    yield robot
    assert robot.process.proc.poll() is None, "the node died during the tests:\n" + robot.process.log()


def inference_values(robot: Robot) -> dict:
    """The newest /diagnostics values of this robot's inference status ({} before the first arrives)."""
    statuses = robot.node_statuses()
    return statuses[-1].values if statuses else {}


def answered_frame(response) -> tuple[int, int, str]:
    h = response.image_header
    return h.stamp.sec, h.stamp.nanosec, h.frame_id


def answer_about(robot: Robot, stamps: set[int], what: str, timeout: float = 60.0, **question):
    """Ask until the answer is about one of ``stamps`` (frames of this test; discovery and the first frames take a
    moment, and a fresh frame of an earlier test may still be the newest)."""
    def attempt():
        response = robot.question(**question)
        if response.success and stamp_ns(response.image_header) in stamps:
            return response
        assert response.error_code in ("", "NO_FRAME", "STALE_FRAME"), (response.error_code, response.error_message)
        return None
    return wait_until(attempt, timeout, interval=0.1, what=what)


def send_goal(graph: Graph, robot: Robot, question: str, max_new_tokens: int, feedback: list,
              camera_id: str = ""):
    goal = AskSceneAction.Goal(question=question, camera_id=camera_id, max_new_tokens=max_new_tokens,
                               temperature=0.0)
    handle = graph.result(robot.action.send_goal_async(goal, feedback_callback=lambda f: feedback.append(f.feedback)))
    assert handle.accepted
    return handle


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_replay_service_and_action(graph, robot, tmp_path, storage):
    """A bag written by mobilevlm_ros.bags (sqlite3 or MCAP, metadata version 8) replayed by mobilevlm replay-bag:
    the service answers about the bag's front frames (the reference's street image, rgb8) with the reference's
    greedy answer, the rear (JPEG) frames are answered with timings, and the action streams the reference's answer
    as feedback. The replay loops until the test has its answers, so slow discovery cannot outlast the bag."""
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
    replay = subprocess.Popen([sys.executable, "-m", "mobilevlm_ros.bags", str(bag), "--loop"], env=graph.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(replay.stdout), daemon=True)
    reader.start()
    try:
        front = answer_about(robot, stamps, "an answer about a front frame from the bag", camera_id="front",
                             max_new_tokens=GOLDEN_TOKENS, temperature=0.0)
        assert answered_frame(front)[2] == "front_optical_frame" and front.camera_id == "front"
        assert front.answer == STREET_ANSWER and front.tokens_generated == GOLDEN_TOKENS
        rear = answer_about(robot, stamps, "an answer about a rear frame from the bag", camera_id="rear")
        assert answered_frame(rear)[2] == "rear_optical_frame" and rear.tokens_generated > 0
        assert rear.vision_ms > 0 and rear.prefill_ms > 0 and rear.decode_ms > 0 and rear.total_ms > 0

        feedback = []
        handle = send_goal(graph, robot, QUESTION, GOLDEN_TOKENS, feedback, camera_id="front")
        result = graph.result(handle.get_result_async())
        assert result.status == GoalStatus.STATUS_SUCCEEDED and result.result.success
        assert stamp_ns(result.result.image_header) in stamps
        assert result.result.answer == STREET_ANSWER and result.result.tokens_generated == GOLDEN_TOKENS
        # Feedback (a topic) and the result (a service) travel separately, and rclpy's ActionClient drops
        # feedback that arrives after the result: what did arrive must add up to a prefix of the answer.
        assert feedback and STREET_ANSWER.startswith("".join(f.text_delta for f in feedback))
        assert all(STREET_ANSWER.startswith(f.partial_answer) for f in feedback)
        wait_until(lambda: any("published 80 messages" in line for line in lines), what="a whole pass over the bag")
    finally:
        interrupt(replay)
        reader.join(10)
    assert replay.returncode == 0, "".join(lines)


def test_replay_bag_exits_cleanly_on_ctrl_c_while_publishing(graph, tmp_path):
    """Ctrl-C to mobilevlm replay-bag while it publishes as fast as it can (a looping bag at 1000x, so the signal
    lands inside a publish now and then, where rclpy has shut the context down before Python raises
    KeyboardInterrupt): exit status 0, five times over."""
    frames = [CameraFrame(f"{NS}/replay_test/image_raw", i * 1_000_000, STREET, "f") for i in range(20)]
    bag = write_camera_bag(tmp_path / "bag", frames)
    for _ in range(5):
        replay = subprocess.Popen([sys.executable, "-m", "mobilevlm_ros.bags", str(bag), "--loop", "--rate", "1000",
                                   "--wait-for-subscribers", "0"], env=graph.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        first = replay.stdout.readline()  # a whole pass is out: it is publishing now
        status = interrupt(replay)
        assert "published 20 messages" in first and status == 0, first + replay.stdout.read()


# Each single-turn golden case: the camera and the encoding its reference image travels in. The reference opened
# each file with PIL and .convert("RGB"): the node must decode the wire format to the same pixels (rgba8 drops the
# alpha without compositing, mono8 replicates the grey, the JPEG is decoded by Pillow as the reference's was).
REFERENCE_FRAMES = [
    ("case0_img0", "front", "rgb8"),
    ("case1_img1", "front", "rgba8"),
    ("case2_img2", "front", "mono8"),
    ("case3_demo", "rear", "jpeg"),
]
PIL_MODES = {"rgb8": "RGB", "rgba8": "RGBA", "mono8": "L"}


def reference_frame(case: dict, encoding: str):
    """stamp -> the message that carries the case's reference image in ``encoding``."""
    path = REFERENCE / case["image"]
    if encoding == "jpeg":
        data = path.read_bytes()  # the reference's file, byte for byte
        return lambda stamp: compressed_msg(data, stamp)
    with PILImage.open(path) as image:
        assert image.mode == PIL_MODES[encoding], (path, image.mode)
        pixels = np.asarray(image)
    return lambda stamp: raw_msg(pixels, stamp, encoding)


@pytest.mark.parametrize("case_name,camera,encoding", REFERENCE_FRAMES, ids=[c for c, _, _ in REFERENCE_FRAMES])
def test_answers_are_the_reference_greedy_answers(graph, robot, case_name, camera, encoding):
    """Every single-turn golden case over DDS: the reference's image sent as a camera sends it, the case's question,
    16 greedy tokens: the node's answer is the text the reference decoded from its greedy ids."""
    case = CASES[case_name]
    assert len(case["turns"]) == 1
    with robot.streaming(camera, reference_frame(case, encoding)) as stamps:
        response = answer_about(robot, stamps, f"an answer about the {case['image']} frames", question=case["turns"][0],
                                camera_id=camera, max_new_tokens=len(case["generated_ids"]), temperature=0.0)
    assert response.answer == case["output_text"], (response.answer, case["output_text"])
    assert response.tokens_generated == len(case["generated_ids"]) == 16
    assert response.camera_id == camera


def error_about(robot: Robot, stamps: set[int], code: str, camera_id: str = "", exclude: set[int] = frozenset()):
    """Ask until the node answers ``code`` about one of ``stamps`` (not in ``exclude``)."""
    def attempt():
        response = robot.question(camera_id=camera_id)
        stamp = stamp_ns(response.image_header)
        return response.error_code == code and stamp in stamps and stamp not in exclude and response
    return wait_until(attempt, interval=0.1, what=f"{code} about a frame of this test")


def test_error_codes_from_real_requests(graph, robot):
    """Each request error code from a real request over DDS (frames streamed, so a frame lost to discovery does
    not matter); a broken camera stream is logged at most once per FRAME_ERROR_LOG_PERIOD_S, not once per frame."""
    from mobilevlm_ros.ros.intake import FRAME_ERROR_LOG_PERIOD_S

    assert robot.question(camera_id="left").error_code == "UNKNOWN_CAMERA"
    assert robot.question(camera_id="aux").error_code == "NO_FRAME"
    empty = robot.question(question="  ")
    assert (empty.success, empty.error_code) == (False, "BAD_REQUEST")
    too_long = robot.question(question="How many cars are in the image? " * 400)
    assert too_long.error_code == "PROMPT_TOO_LONG" and "context holds 2048" in too_long.error_message

    logged = "image encoding '32FC1' is not supported"
    assert logged not in robot.process.log()
    since = time.monotonic()
    with robot.streaming("front", lambda stamp: image_msg(STREET, stamp, encoding="32FC1")) as stamps:
        first = error_about(robot, stamps, "UNSUPPORTED_ENCODING")
        assert "32FC1" in first.error_message
        second = error_about(robot, stamps, "UNSUPPORTED_ENCODING", exclude={stamp_ns(first.image_header)})
    wait_until(lambda: logged in robot.process.log(), what="the encoding error in the node log")
    # At least two frames refused; the log says so at most once per period since the first frame was sent.
    assert stamp_ns(second.image_header) != stamp_ns(first.image_header)
    lines = robot.process.log().count(logged)
    assert 1 <= lines <= 1 + (time.monotonic() - since) / FRAME_ERROR_LOG_PERIOD_S, lines

    with robot.streaming("front", lambda stamp: image_msg(STREET, stamp, data=STREET.tobytes()[:1000])) as stamps:
        short = error_about(robot, stamps, "BAD_FRAME")
    assert "wrong data length" in short.error_message

    with robot.streaming("rear", lambda stamp: jpeg_msg(STREET, stamp, truncate=True)) as stamps:
        truncated = error_about(robot, stamps, "BAD_FRAME", camera_id="rear")
    assert "truncated" in truncated.error_message

    with robot.streaming_front() as stamps:
        fresh = answer_about(robot, stamps, "an answer about a good frame")
    # No frame after the last of these: the newest one goes stale once max_frame_age_s has passed.
    stale = wait_until(lambda: (r := robot.question()).error_code == "STALE_FRAME" and r, what="STALE_FRAME")
    assert "max_frame_age_s 1.5" in stale.error_message and stamp_ns(stale.image_header) in stamps
    assert stamp_ns(stale.image_header) >= stamp_ns(fresh.image_header)


def test_captions_carry_their_frame_and_follow_the_timer(graph, robot):
    """Captions of the streaming front camera carry their source frame's header (a frame this test published), the
    caption prompt and the camera; no frame is captioned twice. On the node's own clock (the stamps of two
    /diagnostics messages, span S) its captions counter grows by at most caption_rate_hz * S + 4: ticks fall on the
    timer's fixed grid (+1 for a partial period), one tick may run late from before the span, one caption may
    finish from before it, and the counters are read just before their message is stamped."""
    rate = PARAMS["caption_rate_hz"]
    seen_before = len(robot.captions)
    with robot.streaming_front() as stamps:
        def ours():
            return [c for _, c in robot.captions[seen_before:] if stamp_ns(c.header) in stamps]
        wait_until(ours, what="a caption of this test's frames")
        after_first = time.time_ns()
        first = robot.wait_for_status(lambda s: s.stamp > after_first, "a status after the first caption")
        # Captions of frames sent after that status (this machine's clock is the node's) were made after it.
        wait_until(lambda: sum(stamp_ns(c.header) > first.stamp for c in ours()) >= 4, what="four more captions")
        after_more = time.time_ns()
        last = robot.wait_for_status(lambda s: s.stamp > after_more and
                                     int(s.values["captions"]) > int(first.values["captions"]),
                                     "a status counting the captions made since the first")
    captions = ours()
    for caption in captions:
        assert caption.camera_id == "front" and caption.prompt == "Describe the scene."
        assert caption.header.frame_id == "front_optical_frame"
        assert caption.caption and caption.latency_ms > 0
    assert len({stamp_ns(c.header) for c in captions}) == len(captions)  # no frame captioned twice
    span_s = (last.stamp - first.stamp) / 1e9
    grown = int(last.values["captions"]) - int(first.values["captions"])
    assert grown <= rate * span_s + 4, (grown, span_s)

    values = inference_values(robot)
    for key in ("model", "backend", "device", "queue_depth", "rejected_busy", "failed", "total_ms_p50",
                "vision_ms_p90", "decode_ms_p99"):
        assert key in values, key
    assert values["backend"] == "torch" and values["model"] == str(MODEL)
    cameras = {s.name.rsplit(" ", 1)[-1]: s for a in robot.diagnostics for s in a.status
               if s.name.startswith(f"{NS}/") and "camera" in s.name}
    assert {"front", "rear", "aux"} <= set(cameras)
    assert cameras["aux"].message == "no frame yet"


def test_burst_of_50_while_busy_gets_answers_or_busy(graph, scripted):
    """50 requests at once while a goal holds the worker ([hold]): exactly queue_length of them wait, and get the
    reference's answer once the goal is cancelled; the other 50 - queue_length are answered BUSY while the goal still
    runs. None is lost."""
    queue_length = SCRIPTED_PARAMS["queue_length"]
    with scripted.streaming_front() as stamps:
        answer_about(scripted, stamps, "a first answer")
        feedback = []
        handle = send_goal(graph, scripted, HOLD + QUESTION, 1000, feedback)
        wait_until(lambda: feedback, what="the held goal generating")
        request = AskScene.Request(question=QUESTION, max_new_tokens=GOLDEN_TOKENS, temperature=0.0)
        futures = [scripted.ask.call_async(request) for _ in range(50)]
        wait_until(lambda: sum(f.done() for f in futures) >= 50 - queue_length, 120,
                   what=f"{50 - queue_length} answers while the goal holds the worker")
        busy = [f.result() for f in futures if f.done()]
        waiting = [f for f in futures if not f.done()]
        assert len(waiting) == queue_length, [r.error_code for r in busy]
        assert all(r.error_code == "BUSY" and not r.success for r in busy), [r.error_code for r in busy]
        assert "already waiting" in busy[0].error_message
        graph.result(handle.cancel_goal_async())
        result = graph.result(handle.get_result_async())
        assert result.status == GoalStatus.STATUS_CANCELED
        answers = [graph.result(f, 120) for f in waiting]
    for answer in answers:
        assert answer.success and answer.answer == STREET_ANSWER, (answer.error_code, answer.answer)
        assert stamp_ns(answer.image_header) in stamps
    scripted.wait_for_status(lambda s: int(s.values["rejected_busy"]) >= 50 - queue_length,
                             "the BUSY answers counted on /diagnostics")


def test_inference_failure_is_answered_and_diagnostics_recover(graph, scripted):
    """A real request on which the model raises ([fail]) is answered INFERENCE_FAILED naming the error, and the
    node keeps serving (the next question gets the reference's answer). /diagnostics goes from OK ('serving') to
    WARN ('serving; 1 of the last N inference runs failed (...)'), stays WARN through 9 successful answers and is OK
    ('serving') again after the 10th. No captions run meanwhile (no frame on the caption camera), so the answers
    are the only inference runs."""
    with scripted.streaming_front() as stamps:
        answer_about(scripted, stamps, "a first answer")
        idle = time.time_ns()
        before = scripted.wait_for_status(lambda s: s.stamp > idle and s.message == "serving",
                                          "OK 'serving' before the failure")
        assert before.level == DiagnosticStatus.OK
        failed_before = int(before.values["inference_failed"])

        failed = scripted.question(FAIL + QUESTION)
        assert (failed.success, failed.error_code) == (False, "INFERENCE_FAILED")
        assert "RuntimeError" in failed.error_message and "scripted failure" in failed.error_message
        warn = scripted.wait_for_status(lambda s: int(s.values["inference_failed"]) == failed_before + 1,
                                        "the failure on /diagnostics")
        assert warn.level == DiagnosticStatus.WARN, warn
        assert re.fullmatch(rf"serving; 1 of the last \d+ inference runs failed \({failed_before + 1} since start\)",
                            warn.message), warn.message
        answered = int(warn.values["answered"])  # nothing else runs: this is the count at the failure
        captions = warn.values["captions"]
        for k in range(1, 11):
            response = scripted.question(max_new_tokens=GOLDEN_TOKENS, temperature=0.0)
            assert response.success and response.answer == STREET_ANSWER, (k, response.error_code, response.answer)
            status = scripted.wait_for_status(lambda s: int(s.values["answered"]) == answered + k,
                                              f"the status after {k} answers")
            assert status.values["captions"] == captions  # only answers ran
            if k < 10:
                assert status.level == DiagnosticStatus.WARN, (k, status)
                assert re.fullmatch(r"serving; 1 of the last \d+ inference runs failed \(\d+ since start\)",
                                    status.message), (k, status.message)
            else:
                assert (status.level, status.message) == (DiagnosticStatus.OK, "serving"), status
    assert "scripted failure" in scripted.process.log()  # the node logs the model's error


def test_cancel_mid_generation_and_no_captions_while_busy(graph, scripted):
    """While a goal is generating (held after its first piece) and the caption camera streams, caption ticks are
    skipped, not queued: /diagnostics shows captions_skipped growing while no caption finishes and nothing is
    queued. The cancel stops the generation (CANCELLED, with the tokens made so far), and captions resume when the
    worker is idle."""
    side = lambda stamp: image_msg(STREET, stamp, frame_id="side_optical_frame")  # noqa: E731
    with scripted.streaming_front() as stamps, scripted.streaming("side", side) as side_stamps:
        answer_about(scripted, stamps, "a first answer")
        feedback = []
        handle = send_goal(graph, scripted, HOLD + QUESTION, 1000, feedback)
        wait_until(lambda: feedback, what="the goal generating")
        busy_since = time.time_ns()
        first = scripted.wait_for_status(lambda s: s.stamp > busy_since, "a status while the goal generates")
        skipped = int(first.values["captions_skipped"])
        later = scripted.wait_for_status(
            lambda s: s.stamp > first.stamp and int(s.values["captions_skipped"]) >= skipped + 2,
            "two caption ticks skipped")
        assert later.values["captions"] == first.values["captions"]  # none ran ...
        assert later.values["queue_depth"] == "0"  # ... and none waits
        graph.result(handle.cancel_goal_async())
        result = graph.result(handle.get_result_async())
        assert result.status == GoalStatus.STATUS_CANCELED
        assert result.result.error_code == "CANCELLED" and not result.result.success
        assert 0 < result.result.tokens_generated < 1000
        idle_since = time.time_ns()
        wait_until(lambda: any(stamp_ns(c.header) > idle_since and stamp_ns(c.header) in side_stamps
                               for _, c in scripted.captions), what="a caption of a frame sent after the cancel")


def test_shutdown_answers_requests_in_flight(tmp_path):
    """SIGINT while a goal generates (held) and queue_length requests wait behind it: every one is answered
    SHUTTING_DOWN and the node exits 0."""
    graph = Graph(tmp_path)
    try:
        params = {**SCRIPTED_PARAMS, "queue_length": 3, "caption_rate_hz": 0.0, "max_frame_age_s": 60.0}
        robot = start_robot(graph, params, "/robot9", SCRIPTED_NODE_EXE)
        with robot.streaming_front() as stamps:
            answer_about(robot, stamps, "a first answer")
            feedback = []
            handle = send_goal(graph, robot, HOLD + QUESTION, 1000, feedback)
            wait_until(lambda: feedback, what="generation under way")
            request = AskScene.Request(question=QUESTION, max_new_tokens=8, temperature=-1.0)
            futures = [robot.ask.call_async(request) for _ in range(3)]
            wait_until(lambda: inference_values(robot).get("queue_depth") == "3",
                       what="the three requests queued behind the goal")
            robot.process.proc.send_signal(signal.SIGINT)
            responses = [graph.result(f, 60) for f in futures]
            result = graph.result(handle.get_result_async(), 60)
        assert robot.process.proc.wait(60) == 0, robot.process.log()
    finally:
        graph.close()
    assert result.result.error_code == "SHUTTING_DOWN" and result.status == GoalStatus.STATUS_ABORTED
    assert [r.error_code for r in responses] == ["SHUTTING_DOWN"] * 3


@pytest.mark.parametrize("change,fragments", [
    ({"dtype": "int3"}, ["dtype 'int3'", "float32", "bfloat16", "float16"]),
    ({"cameras": ["front", "front"]}, ["cameras", "distinct"]),
    ({"default_camera": "left"}, ["default_camera 'left' is not in cameras"]),
    ({"camera": {"rear": {"transport": "h264"}}}, ["camera.rear.transport 'h264'"]),
    ({"queue_length": 0}, ["queue_length 0"]),
    ({"cuda_graph_compile": "fast"}, ["cuda_graph_compile 'fast'", "max-autotune-no-cudagraphs"]),
    ({"quantize": "int3"}, ["quantize 'int3'", "int8", "int8-dynamic", "int4"]),
    ({"model_path": "/nonexistent"}, ["model_path '/nonexistent' is not a directory"]),
    ({"monitors": ["m"], "monitor": {"m": {"question": "q", "camera": "left"}}},
     ["monitor.m.camera 'left' is not one of cameras"]),
    # The start-up memory check counts the prefix cache at its bound (after the model is loaded).
    ({"prefix_cache_frames": 10**12}, ["refusing to serve: prefix cache up to 1000000000000 frames x",
                                       "lower prefix_cache_frames"]),
])
def test_bad_parameters_stop_the_node_with_a_clear_message(tmp_path, change, fragments):
    """A bad value stops the node at start-up (exit code 1) with a message naming the parameter, the value and what
    is allowed."""
    env_graph = Graph(tmp_path)
    try:
        process = env_graph.start_node({**PARAMS, **change}, "bad")
        assert process.proc.wait(120) == 1
    finally:
        env_graph.close()
    log = process.log()
    for fragment in fragments:
        assert fragment in log, (fragment, log)


def test_shipped_params_file_starts_the_node(tmp_path):
    """config/vlm.yaml as README starts it: model_path is empty there, so the bundled demo model answers about a
    generated road scene."""
    graph = Graph(tmp_path)
    try:
        config = Path(__file__).resolve().parent.parent / "config" / "vlm.yaml"
        process = NodeProcess(graph.env, config, tmp_path / "vlm.log", ["-r", "__ns:=/cfg"])
        graph.processes.append(process)
        robot = Robot(graph, "/cfg")
        graph.wait_until_serving(robot.ask, process)
        response = robot.question("How many cones are there?", temperature=0.0)
        assert response.error_code == "NO_FRAME" and "'front'" in response.error_message
        scene = next(s for s in (make_scene(20241, i) for i in range(50)) if s.count("cone") >= 2)
        with robot.streaming_front(rgb=scene.image) as stamps:
            response = answer_about(robot, stamps, "an answer about the published scene",
                                    question="How many cones are there?", temperature=0.0)
        assert answer_matches(response.answer, str(scene.count("cone"))), response.answer
    finally:
        graph.close()
