"""mobilevlm_node: the thin ROS 2 layer over :mod:`mobilevlm_ros.server` (llama_ros's split: the core has no ROS).

Interfaces (all names relative, so ``__ns:=/robot7`` gives ``/robot7/ask_scene``):
- subscribes to each configured camera (``sensor_msgs/Image`` or ``CompressedImage``), keeping only its newest frame;
- service ``ask_scene`` and action ``ask_scene`` (mobilevlm_ros/AskScene), topic ``caption``
  (mobilevlm_ros/SceneCaption), and ``/diagnostics`` (diagnostic_msgs/DiagnosticArray).

Threading: inference runs on the server's single worker thread. Service and action callbacks only validate, enqueue
and wait for their own job; the queue bounds how many can wait (queue_length + the running one), and the executor
gets that many threads plus spares, so camera intake, timers and immediate answers (BUSY, errors) always find a
free thread.
"""
from __future__ import annotations

import itertools
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from .action import AskScene as AskSceneAction
from .camera import Frame, FrameStore, validate_raw_image, FrameError
from .msg import SceneCaption
from .server import ErrorCode, Job, SceneRequest, SceneResult, SceneServer, ServerConfig
from .srv import AskScene as AskSceneService

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DTYPES = ("float32", "bfloat16", "float16")
TRANSPORTS = ("raw", "compressed")
RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}
# The default service QoS keeps 10 requests: a burst beyond that would be dropped by DDS before the node could
# answer BUSY, and those clients would wait forever. Every request must get an answer, so keep them all.
REQUEST_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE)


@dataclass(frozen=True)
class CameraConfig:
    camera_id: str
    topic: str
    transport: str
    reliability: str


@dataclass(frozen=True)
class NodeConfig:
    model_path: str
    vision_tower: str
    device: str
    dtype: str
    backend: str
    engines_dir: str
    max_seq_len: int
    cameras: tuple[CameraConfig, ...]
    server: ServerConfig
    caption_rate_hz: float
    caption_prompt: str
    caption_cameras: tuple[str, ...]
    caption_max_new_tokens: int
    diagnostics_period_s: float


def _default_model_path() -> str:
    from .demo import DEFAULT_MODEL_DIR  # the bundled demo model: the package answers out of the box

    return str(DEFAULT_MODEL_DIR)


def declare_and_read_config(node: Node) -> NodeConfig:
    """Declare every parameter with its default, then validate: a bad value raises ValueError naming it."""
    p = node.declare_parameter
    model_path = p("model_path", "").value or _default_model_path()
    vision_tower = p("vision_tower", "").value
    device = p("device", "cpu").value
    dtype = p("dtype", "float32").value
    backend = p("backend", "torch").value
    engines_dir = p("engines_dir", "engines").value
    max_seq_len = p("max_seq_len", 2048).value
    camera_ids = list(p("cameras", ["front"]).value)
    default_camera = p("default_camera", "").value
    max_frame_age_s = float(p("max_frame_age_s", 1.0).value)
    max_new_tokens = p("max_new_tokens", 64).value
    temperature = float(p("temperature", 0.0).value)
    queue_length = p("queue_length", 4).value
    max_question_chars = p("max_question_chars", 2000).value
    caption_rate_hz = float(p("caption_rate_hz", 0.0).value)
    caption_prompt = p("caption_prompt", "Describe the scene.").value
    caption_cameras = list(p("caption_cameras", [""]).value)
    caption_max_new_tokens = p("caption_max_new_tokens", 48).value
    diagnostics_period_s = float(p("diagnostics_period_s", 1.0).value)

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    check(Path(model_path).is_dir(), f"model_path {model_path!r} is not a directory")
    check(device == "cpu" or device.startswith("cuda"), f"device {device!r}: expected cpu, cuda or cuda:N")
    check(dtype in DTYPES, f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check(backend in BACKENDS, f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    check(max_seq_len >= 256, f"max_seq_len {max_seq_len}: must be at least 256 (144 image tokens + text)")
    check(bool(camera_ids) and all(camera_ids) and len(set(camera_ids)) == len(camera_ids),
          f"cameras {camera_ids}: need at least one camera id, all non-empty and distinct")
    default_camera = default_camera or camera_ids[0]
    check(default_camera in camera_ids, f"default_camera {default_camera!r} is not in cameras {camera_ids}")
    check(max_frame_age_s > 0, f"max_frame_age_s {max_frame_age_s}: must be positive")
    check(max_new_tokens >= 1, f"max_new_tokens {max_new_tokens}: must be at least 1")
    check(temperature >= 0, f"temperature {temperature}: must be >= 0")
    check(1 <= queue_length <= 64, f"queue_length {queue_length}: must be in 1..64")
    check(max_question_chars >= 1, f"max_question_chars {max_question_chars}: must be at least 1")
    check(caption_rate_hz >= 0, f"caption_rate_hz {caption_rate_hz}: must be >= 0 (0 turns captions off)")
    caption_cameras = [c or default_camera for c in caption_cameras]
    check(all(c in camera_ids for c in caption_cameras),
          f"caption_cameras {caption_cameras}: every entry must be one of cameras {camera_ids}")
    check(caption_max_new_tokens >= 1, f"caption_max_new_tokens {caption_max_new_tokens}: must be at least 1")
    check(diagnostics_period_s > 0, f"diagnostics_period_s {diagnostics_period_s}: must be positive")

    cameras = []
    for camera_id in camera_ids:
        transport = p(f"camera.{camera_id}.transport", "raw").value
        check(transport in TRANSPORTS, f"camera.{camera_id}.transport {transport!r}: expected raw or compressed")
        default_topic = f"{camera_id}/image_raw" + ("/compressed" if transport == "compressed" else "")
        topic = p(f"camera.{camera_id}.topic", default_topic).value
        check(bool(topic), f"camera.{camera_id}.topic is empty")
        reliability = p(f"camera.{camera_id}.reliability", "best_effort").value
        check(reliability in RELIABILITY, f"camera.{camera_id}.reliability {reliability!r}: "
                                          "expected best_effort or reliable")
        cameras.append(CameraConfig(camera_id, topic, transport, reliability))

    return NodeConfig(
        model_path=model_path, vision_tower=vision_tower, device=device, dtype=dtype, backend=backend,
        engines_dir=engines_dir, max_seq_len=max_seq_len, cameras=tuple(cameras),
        server=ServerConfig(cameras=tuple(camera_ids), default_camera=default_camera,
                            max_frame_age_s=max_frame_age_s, max_new_tokens=max_new_tokens,
                            temperature=temperature, queue_length=queue_length,
                            max_question_chars=max_question_chars),
        caption_rate_hz=caption_rate_hz, caption_prompt=caption_prompt, caption_cameras=tuple(caption_cameras),
        caption_max_new_tokens=caption_max_new_tokens, diagnostics_period_s=diagnostics_period_s)


def load_pipeline(config: NodeConfig):
    """The model, with its vision encoder on the configured backend (engines built or reused on first load)."""
    from .model import MobileVLMPipeline

    pipeline = MobileVLMPipeline.load(config.model_path, config.vision_tower or None, config.device, config.dtype,
                                      config.max_seq_len)
    if config.backend != "torch":
        from .engines import make_visual_encoder

        pipeline.encode_images = make_visual_encoder(config.backend, pipeline.model, config.engines_dir)
    return pipeline


def _fill_result(target, result: SceneResult) -> None:
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
    if result.frame is not None:
        target.image_header = frame_header(result.frame)


def frame_header(frame: Frame) -> Header:
    header = Header()
    header.stamp.sec = frame.stamp_sec
    header.stamp.nanosec = frame.stamp_nanosec
    header.frame_id = frame.frame_id
    return header


class MobileVLMNode(Node):
    def __init__(self, node_name: str = "mobilevlm_node", **kwargs):
        super().__init__(node_name, **kwargs)
        self.config = declare_and_read_config(self)
        self.get_logger().info(f"loading {self.config.model_path} ({self.config.backend}, {self.config.device}, "
                               f"{self.config.dtype})")
        started = time.monotonic()
        pipeline = load_pipeline(self.config)
        self.get_logger().info(f"model ready in {time.monotonic() - started:.1f} s")
        self.frames = FrameStore()
        self.server = SceneServer(pipeline, self.frames, self.config.server)
        self._seq = itertools.count()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._action_jobs: dict[bytes, Job] = {}

        intake = MutuallyExclusiveCallbackGroup()
        for camera in self.config.cameras:
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                             reliability=RELIABILITY[camera.reliability])
            if camera.transport == "raw":
                self.create_subscription(Image, camera.topic, self._raw_callback(camera.camera_id), qos,
                                         callback_group=intake)
            else:
                self.create_subscription(CompressedImage, camera.topic,
                                         self._compressed_callback(camera.camera_id), qos, callback_group=intake)
            self.get_logger().info(f"camera {camera.camera_id!r}: {camera.transport} on "
                                   f"{self.resolve_topic_name(camera.topic)}")
        requests = ReentrantCallbackGroup()
        self.create_service(AskSceneService, "ask_scene", self._on_ask_service, qos_profile=REQUEST_QOS,
                            callback_group=requests)
        self._action_server = ActionServer(self, AskSceneAction, "ask_scene", self._on_goal_execute,
                                           goal_callback=lambda _: GoalResponse.ACCEPT,
                                           cancel_callback=self._on_goal_cancel, callback_group=requests,
                                           goal_service_qos_profile=REQUEST_QOS,
                                           result_service_qos_profile=REQUEST_QOS,
                                           cancel_service_qos_profile=REQUEST_QOS)
        self.caption_publisher = self.create_publisher(SceneCaption, "caption", 10)
        self._caption_seq = dict.fromkeys(self.config.caption_cameras, -1)
        timers = MutuallyExclusiveCallbackGroup()
        if self.config.caption_rate_hz > 0:
            self.create_timer(1.0 / self.config.caption_rate_hz, self._on_caption_tick, callback_group=timers)
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(self.config.diagnostics_period_s, self._publish_diagnostics, callback_group=timers)

    @property
    def executor_threads(self) -> int:
        return self.config.server.queue_length + 4

    # --- camera intake -----------------------------------------------------------------------------------------
    def _raw_callback(self, camera_id: str):
        def callback(msg: Image) -> None:
            try:  # cheap header checks now; pixels are decoded only when a request needs this frame
                validate_raw_image(msg.encoding, msg.width, msg.height, msg.step, len(msg.data))
            except FrameError as e:
                self._warn_frame_once(camera_id, e)
            self.frames.put(Frame.from_raw(
                camera_id=camera_id, seq=next(self._seq), stamp_sec=msg.header.stamp.sec,
                stamp_nanosec=msg.header.stamp.nanosec, frame_id=msg.header.frame_id, encoding=msg.encoding,
                width=msg.width, height=msg.height, step=msg.step, is_bigendian=msg.is_bigendian, data=msg.data))
        return callback

    def _compressed_callback(self, camera_id: str):
        def callback(msg: CompressedImage) -> None:
            self.frames.put(Frame.from_compressed(
                camera_id=camera_id, seq=next(self._seq), stamp_sec=msg.header.stamp.sec,
                stamp_nanosec=msg.header.stamp.nanosec, frame_id=msg.header.frame_id, format=msg.format,
                data=msg.data))
        return callback

    def _warn_frame_once(self, camera_id: str, error: FrameError) -> None:
        if self.frames.first_failure(camera_id, error.code):
            self.get_logger().error(f"camera {camera_id!r}: {error.message} (logged once per camera; requests "
                                    f"about this camera answer {error.code})")

    def _log_result(self, result: SceneResult) -> None:
        if result.error_code in (ErrorCode.BAD_FRAME, ErrorCode.UNSUPPORTED_ENCODING):
            self._warn_frame_once(result.camera_id, FrameError(result.error_code, result.error_message))
        elif result.error_code == ErrorCode.INFERENCE_FAILED:
            self.get_logger().error(f"inference failed: {result.error_message}")

    # --- requests ----------------------------------------------------------------------------------------------
    def _track(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta

    @property
    def in_flight(self) -> int:
        with self._in_flight_lock:
            return self._in_flight

    def _on_ask_service(self, request, response):
        self._track(+1)
        try:
            job = self.server.submit(SceneRequest(request.question, request.camera_id, request.max_new_tokens,
                                                  request.temperature))
            result = job.wait()  # always set: answered, failed, cancelled or shut down
            self._log_result(result)
            _fill_result(response, result)
            return response
        finally:
            self._track(-1)

    def _on_goal_cancel(self, goal_handle) -> CancelResponse:
        job = self._action_jobs.get(bytes(goal_handle.goal_id.uuid))
        if job is not None:
            job.cancel()  # the worker stops within one token
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
        job = self.server.submit(SceneRequest(goal.question, goal.camera_id, goal.max_new_tokens, goal.temperature),
                                 on_text)
        job.add_done_callback(lambda _: wake.set())
        self._action_jobs[key] = job
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
                    feedback = AskSceneAction.Feedback(text_delta=delta, partial_answer=partial,
                                                       tokens_generated=tokens)
                    goal_handle.publish_feedback(feedback)
                if job.done and sent == len(pieces):
                    break
        finally:
            self._action_jobs.pop(key, None)
        result = job.result
        self._log_result(result)
        msg = AskSceneAction.Result()
        _fill_result(msg, result)
        if result.error_code == ErrorCode.CANCELLED and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return msg

    # --- captions ----------------------------------------------------------------------------------------------
    def _on_caption_tick(self) -> None:
        for camera_id in self.config.caption_cameras:
            job = self.server.submit_caption(camera_id, self.config.caption_prompt,
                                             self.config.caption_max_new_tokens, self._caption_seq[camera_id])
            if job is not None:
                self._caption_seq[camera_id] = job.not_before_seq
                job.add_done_callback(self._publish_caption)

    def _publish_caption(self, job: Job) -> None:
        result = job.result
        if not result.success:
            self._log_result(result)
            return
        self.caption_publisher.publish(SceneCaption(
            header=frame_header(result.frame), camera_id=result.camera_id, caption=result.answer,
            prompt=job.request.question, latency_ms=float(result.total_ms)))

    # --- health ------------------------------------------------------------------------------------------------
    def diagnostic_status(self) -> list[DiagnosticStatus]:
        stats = self.server.stats
        values = {"model": self.config.model_path, "backend": self.config.backend, "device": self.config.device,
                  "dtype": self.config.dtype, "queue_depth": self.server.queue_depth,
                  "queue_length": self.config.server.queue_length, "answered": stats.answered,
                  "rejected_busy": stats.rejected_busy, "failed": stats.failed,
                  "inference_failed": stats.inference_failed, "captions": stats.captions,
                  "captions_skipped": stats.captions_skipped}
        for stage, (p50, p90, p99) in sorted(stats.percentiles().items()):
            values.update({f"{stage}_p50": f"{p50:.1f}", f"{stage}_p90": f"{p90:.1f}", f"{stage}_p99": f"{p99:.1f}"})
        name = self.get_fully_qualified_name()
        main = DiagnosticStatus(level=DiagnosticStatus.OK, name=f"{name}: inference", hardware_id=self.config.device,
                                message="serving", values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        if stats.inference_failed:
            main.level, main.message = DiagnosticStatus.WARN, f"{stats.inference_failed} inference failures"
        statuses = [main]
        for camera in self.config.cameras:
            age = self.frames.age_s(camera.camera_id)
            stale = age is None or age > self.config.server.max_frame_age_s
            statuses.append(DiagnosticStatus(
                level=DiagnosticStatus.WARN if stale else DiagnosticStatus.OK,
                name=f"{name}: camera {camera.camera_id}", hardware_id=camera.topic,
                message="no frame yet" if age is None else ("stale" if stale else "ok"),
                values=[KeyValue(key="topic", value=self.resolve_topic_name(camera.topic)),
                        KeyValue(key="frame_age_s", value="" if age is None else f"{age:.3f}")]))
        return statuses

    def _publish_diagnostics(self) -> None:
        msg = DiagnosticArray(status=self.diagnostic_status())
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_publisher.publish(msg)

    # --- shutdown ----------------------------------------------------------------------------------------------
    def shutdown_gracefully(self, executor, timeout_s: float = 10.0) -> None:
        """Answer everything in flight (SHUTTING_DOWN or the finished answer) before the node goes away."""
        self.server.shutdown()
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        # An action's result reaches its client through a get_result task that resumes only after the goal has
        # finished; keep the executor turning briefly so those responses go out too.
        flush_until = min(deadline, time.monotonic() + 1.0)
        while time.monotonic() < flush_until:
            executor.spin_once(timeout_sec=0.05)


def main(args: list[str] | None = None) -> int:
    # Our own signal handling: rclpy's default SIGINT handler shuts the context down at once, and responses to
    # requests in flight could no longer be sent.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = None
    executor = None
    try:
        try:
            node = MobileVLMNode()
        except Exception as e:  # noqa: BLE001 - any configuration or model problem stops the node with its reason
            print(f"[mobilevlm_node] error: {e}", file=sys.stderr, flush=True)
            return 1
        executor = MultiThreadedExecutor(num_threads=node.executor_threads)
        executor.add_node(node)
        node.get_logger().info(f"ready: {node.resolve_service_name('ask_scene')}")
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
        node.shutdown_gracefully(executor)
        return 0
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    finally:
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
