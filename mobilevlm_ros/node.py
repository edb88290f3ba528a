"""mobilevlm_node: the thin ROS 2 layer over :mod:`mobilevlm_ros.server` (llama_ros's split: the core has no ROS).

Interfaces (all names relative, so ``__ns:=/robot7`` gives ``/robot7/ask_scene``):
- subscribes to each configured camera (``sensor_msgs/Image`` or ``CompressedImage``), keeping only its newest frame;
- service ``ask_scene`` and action ``ask_scene`` (mobilevlm_ros/AskScene), topic ``caption``
  (mobilevlm_ros/SceneCaption), and ``/diagnostics`` (diagnostic_msgs/DiagnosticArray).

Two executables share everything ROS-facing through :class:`SceneInterface`:
- ``mobilevlm_node`` (:class:`MobileVLMNode`, this module): a plain node that loads the model and serves at once;
- ``mobilevlm_lifecycle_node`` (:mod:`mobilevlm_ros.lifecycle_node`): a managed node driven through configure,
  activate, deactivate, cleanup and shutdown.

Threading: inference runs on the server's single worker thread. Service and action callbacks only validate, enqueue
and wait for their own job; the queue bounds how many can wait (queue_length + the running one), and the executor
gets that many threads plus spares, so camera intake, timers and immediate answers (BUSY, errors) always find a
free thread.
"""
from __future__ import annotations

import gc
import itertools
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
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
from .loading import LoadedModel, load_pipeline
from .params import CameraConfig, NodeConfig
from .server import ErrorCode, Job, SceneRequest, SceneResult, SceneServer, ServerConfig
from .srv import AskScene as AskSceneService

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DTYPES = ("float32", "bfloat16", "float16")
# "" = the CUDA graphs replay the eager kernels; else the torch.compile mode that fuses them first (cuda_graph.py)
COMPILE_MODES = ("", "default", "max-autotune-no-cudagraphs")
QUANTIZE_MODES = ("int8", "int8-dynamic", "int4")  # model.quantize.MODES (not imported: it pulls in torch)
TRANSPORTS = ("raw", "compressed")
MAX_QUEUE_LENGTH = 64
RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}
# The default service QoS keeps 10 requests: a burst beyond that would be dropped by DDS before the node could
# answer BUSY, and those clients would wait forever. Every request must get an answer, so keep them all.
REQUEST_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE)
# Action feedback carries text deltas that a client concatenates. With the default depth of 10, a client that falls
# behind (a busy 2-core machine) loses the first deltas of a longer answer; keep them all, as for requests.
FEEDBACK_QOS = REQUEST_QOS


def _default_model_path() -> str:
    from .demo import DEFAULT_MODEL_DIR  # the bundled demo model: the package answers out of the box

    return str(DEFAULT_MODEL_DIR)


def _param(node: Node, name: str, default):
    """The parameter's value, declaring it (with its default) the first time: a lifecycle node reads its
    parameters again at every configure, so changes made while unconfigured take effect."""
    if node.has_parameter(name):
        return node.get_parameter(name).value
    return node.declare_parameter(name, default).value


def declare_and_read_config(node: Node) -> NodeConfig:
    """Declare every parameter with its default (once), then read and validate: a bad value raises ValueError
    naming it."""
    def p(name, default):
        return _param(node, name, default)

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    model_path = p("model_path", "")
    if not model_path:
        model_path = _default_model_path()
        check(Path(model_path, "config.json").is_file(),
              f"model_path is empty and the bundled demo model ({model_path}) is not installed: set model_path to "
              "a MobileVLM checkpoint directory")
    vision_tower = p("vision_tower", "")
    device = p("device", "cpu")
    dtype = p("dtype", "float32")
    backend = p("backend", "torch")
    engines_dir = p("engines_dir", "engines")
    build_engines = bool(p("build_engines", True))
    cuda_graphs = bool(p("cuda_graphs", True))
    cuda_graph_compile = p("cuda_graph_compile", "")
    quantize = p("quantize", "")
    onednn = bool(p("onednn", True))
    require_manifest = bool(p("require_manifest", False))
    memory_reserve_mb = p("memory_reserve_mb", 0)
    max_seq_len = p("max_seq_len", 2048)
    camera_ids = list(p("cameras", ["front"]))
    default_camera = p("default_camera", "")
    max_frame_age_s = float(p("max_frame_age_s", 1.0))
    max_new_tokens = p("max_new_tokens", 64)
    temperature = float(p("temperature", 0.0))
    queue_length = p("queue_length", 4)
    max_question_chars = p("max_question_chars", 2000)
    caption_rate_hz = float(p("caption_rate_hz", 0.0))
    caption_prompt = p("caption_prompt", "Describe the scene.")
    caption_cameras = list(p("caption_cameras", [""]))
    caption_max_new_tokens = p("caption_max_new_tokens", 48)
    diagnostics_period_s = float(p("diagnostics_period_s", 1.0))
    deactivate_timeout_s = float(p("deactivate_timeout_s", 5.0))

    check(Path(model_path).is_dir(), f"model_path {model_path!r} is not a directory")
    check(device == "cpu" or device.startswith("cuda"), f"device {device!r}: expected cpu, cuda or cuda:N")
    check(dtype in DTYPES, f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check(backend in BACKENDS, f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    check(quantize in ("",) + QUANTIZE_MODES,
          f"quantize {quantize!r}: expected '' or one of {', '.join(QUANTIZE_MODES)}")
    check(not quantize or device == "cpu", f"quantize {quantize!r} needs device cpu (CPU kernels), not {device!r}")
    check(cuda_graph_compile in COMPILE_MODES,
          f"cuda_graph_compile {cuda_graph_compile!r}: expected one of {', '.join(map(repr, COMPILE_MODES))}")
    check(memory_reserve_mb >= 0, f"memory_reserve_mb {memory_reserve_mb}: must be >= 0")
    check(max_seq_len >= 256, f"max_seq_len {max_seq_len}: must be at least 256 (144 image tokens + text)")
    check(bool(camera_ids) and all(camera_ids) and len(set(camera_ids)) == len(camera_ids),
          f"cameras {camera_ids}: need at least one camera id, all non-empty and distinct")
    default_camera = default_camera or camera_ids[0]
    check(default_camera in camera_ids, f"default_camera {default_camera!r} is not in cameras {camera_ids}")
    check(max_frame_age_s > 0, f"max_frame_age_s {max_frame_age_s}: must be positive")
    check(max_new_tokens >= 1, f"max_new_tokens {max_new_tokens}: must be at least 1")
    check(temperature >= 0, f"temperature {temperature}: must be >= 0")
    check(1 <= queue_length <= MAX_QUEUE_LENGTH, f"queue_length {queue_length}: must be in 1..{MAX_QUEUE_LENGTH}")
    check(max_question_chars >= 1, f"max_question_chars {max_question_chars}: must be at least 1")
    check(caption_rate_hz >= 0, f"caption_rate_hz {caption_rate_hz}: must be >= 0 (0 turns captions off)")
    caption_cameras = [c or default_camera for c in caption_cameras]
    check(all(c in camera_ids for c in caption_cameras),
          f"caption_cameras {caption_cameras}: every entry must be one of cameras {camera_ids}")
    check(caption_max_new_tokens >= 1, f"caption_max_new_tokens {caption_max_new_tokens}: must be at least 1")
    check(diagnostics_period_s > 0, f"diagnostics_period_s {diagnostics_period_s}: must be positive")
    check(deactivate_timeout_s >= 0, f"deactivate_timeout_s {deactivate_timeout_s}: must be >= 0")

    cameras = []
    for camera_id in camera_ids:
        transport = p(f"camera.{camera_id}.transport", "raw")
        check(transport in TRANSPORTS, f"camera.{camera_id}.transport {transport!r}: expected raw or compressed")
        default_topic = f"{camera_id}/image_raw" + ("/compressed" if transport == "compressed" else "")
        topic = p(f"camera.{camera_id}.topic", default_topic)
        check(bool(topic), f"camera.{camera_id}.topic is empty")
        reliability = p(f"camera.{camera_id}.reliability", "best_effort")
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
        caption_max_new_tokens=caption_max_new_tokens, diagnostics_period_s=diagnostics_period_s,
        build_engines=build_engines, cuda_graphs=cuda_graphs, cuda_graph_compile=cuda_graph_compile,
        quantize=quantize, onednn=onednn, require_manifest=require_manifest, memory_reserve_mb=memory_reserve_mb,
        deactivate_timeout_s=deactivate_timeout_s)


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


def _answered_job(request: SceneRequest, code: str, message: str) -> Job:
    """A job that is already done with an error, for requests the gate refuses before they reach a server."""
    from .model import SamplingParams

    job = Job(request, request.camera_id, SamplingParams())
    job.finish(SceneResult(success=False, error_code=code, error_message=message, camera_id=request.camera_id))
    return job


class SceneInterface:
    """Everything ROS-facing, attached to a given node: the ask_scene service and action, camera intake, captions
    and /diagnostics. Shared by the plain node and the lifecycle node.

    Life cycle of the pieces:
    - created with the node (``__init__``): the service and the action server, which exist as long as the node
      does, so no request is ever lost to a service being destroyed under it; they answer NOT_ACTIVE (or
      SHUTTING_DOWN) whenever the gate is closed; the caption publisher (given); the /diagnostics timer.
    - ``bind`` (configure): the loaded model, its SceneServer and the configuration. ``unbind`` (cleanup) drops
      them and frees the model's memory.
    - ``start`` (activate): camera subscriptions, the caption timer, and the gate opens. ``stop`` (deactivate):
      the gate closes (new requests: NOT_ACTIVE), intake stops, requests in flight get deactivate_timeout_s to
      finish and are then cancelled and answered NOT_ACTIVE; none is dropped.
    - ``shutdown_requests`` (shutdown): the gate answers SHUTTING_DOWN and the server answers everything queued or
      running with SHUTTING_DOWN.
    """

    def __init__(self, node: Node, caption_publisher, diagnostics_period_s: float = 1.0,
                 state: str = "unconfigured"):
        self.node = node
        self.caption_publisher = caption_publisher
        self.state = state  # lifecycle label, for messages and /diagnostics
        self.problem = ""  # why the last configure failed, for /diagnostics
        self.config: NodeConfig | None = None
        self.server: SceneServer | None = None
        self.frames = FrameStore()
        self.loaded: LoadedModel | None = None
        self._seq = itertools.count()
        self._gate = threading.Condition()  # guards _accepting, _refusal, _jobs, _submitting
        self._accepting = False
        self._submitting = 0  # requests past the gate whose server.submit has not returned yet
        self._refusal = (ErrorCode.NOT_ACTIVE, f"the node is {state}")
        self._jobs: set[Job] = set()  # submitted requests not yet answered
        self._deactivated: set[Job] = set()  # cancelled by a deactivate
        self._in_flight = 0  # request callbacks running (for shutdown's final flush)
        self._in_flight_lock = threading.Lock()
        self._action_jobs: dict[bytes, Job] = {}
        self._subscriptions: list = []
        self._caption_timer = None
        self._caption_seq: dict[str, int] = {}
        self.rejected_not_active = 0
        self._deactivate_timeout_s = 0.0

        requests = ReentrantCallbackGroup()
        self.service = node.create_service(AskSceneService, "ask_scene", self._on_ask_service,
                                           qos_profile=REQUEST_QOS, callback_group=requests)
        self.action_server = ActionServer(node, AskSceneAction, "ask_scene", self._on_goal_execute,
                                          goal_callback=lambda _: GoalResponse.ACCEPT,
                                          cancel_callback=self._on_goal_cancel, callback_group=requests,
                                          goal_service_qos_profile=REQUEST_QOS,
                                          result_service_qos_profile=REQUEST_QOS,
                                          cancel_service_qos_profile=REQUEST_QOS,
                                          feedback_pub_qos_profile=FEEDBACK_QOS)
        self._timers = MutuallyExclusiveCallbackGroup()
        self._intake = MutuallyExclusiveCallbackGroup()
        self.diagnostics_publisher = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diagnostics_period_s = diagnostics_period_s
        self._diagnostics_timer = node.create_timer(diagnostics_period_s, self._publish_diagnostics,
                                                    callback_group=self._timers)

    @property
    def logger(self):
        return self.node.get_logger()

    # --- configure / cleanup -----------------------------------------------------------------------------------
    def bind(self, config: NodeConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.loaded = loaded
        self.frames = FrameStore()
        self.server = SceneServer(loaded.pipeline, self.frames, config.server)
        self._caption_seq = dict.fromkeys(config.caption_cameras, -1)
        self.problem = ""
        self.set_state("inactive")
        if config.diagnostics_period_s != self._diagnostics_period_s:
            self.node.destroy_timer(self._diagnostics_timer)
            self._diagnostics_period_s = config.diagnostics_period_s
            self._diagnostics_timer = self.node.create_timer(config.diagnostics_period_s, self._publish_diagnostics,
                                                             callback_group=self._timers)

    def unbind(self) -> bool:
        """Stop the server and drop the model. True when the model's memory was released (nothing else holds
        the pipeline); CUDA's cached blocks go back to the driver too."""
        if self._refusal[0] != ErrorCode.SHUTTING_DOWN:
            self._close_gate(ErrorCode.NOT_ACTIVE, "the node is unconfigured")
        if self.server is None:
            return True
        self.server.shutdown()
        device = self.config.device if self.config is not None else "cpu"
        pipeline_ref = weakref.ref(self.loaded.pipeline)
        self.server = None
        self.loaded = None
        self.frames = FrameStore()
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        self.set_state("unconfigured")
        return pipeline_ref() is None

    # --- activate / deactivate ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Camera intake and captions on, requests accepted."""
        config = self.config
        for camera in config.cameras:
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=RELIABILITY[camera.reliability])
            if camera.transport == "raw":
                sub = self.node.create_subscription(Image, camera.topic, self._raw_callback(camera.camera_id), qos,
                                                    callback_group=self._intake)
            else:
                sub = self.node.create_subscription(CompressedImage, camera.topic,
                                                    self._compressed_callback(camera.camera_id), qos,
                                                    callback_group=self._intake)
            self._subscriptions.append(sub)
            self.logger.info(f"camera {camera.camera_id!r}: {camera.transport} on "
                             f"{self.node.resolve_topic_name(camera.topic)}")
        if config.caption_rate_hz > 0:
            self._caption_timer = self.node.create_timer(1.0 / config.caption_rate_hz, self._on_caption_tick,
                                                         callback_group=self._timers)
        with self._gate:
            self._accepting = True
        self.set_state("active")

    def stop(self, timeout_s: float | None = None) -> tuple[int, int]:
        """Close the gate (new requests: NOT_ACTIVE), stop intake and captions, let requests in flight finish for
        timeout_s, then cancel the rest (answered NOT_ACTIVE). Returns (in flight, cancelled)."""
        timeout_s = self.config.deactivate_timeout_s if timeout_s is None else timeout_s
        self._deactivate_timeout_s = timeout_s
        jobs = self._close_gate(ErrorCode.NOT_ACTIVE, "the node is inactive (deactivated)")
        self._stop_intake()
        deadline = time.monotonic() + timeout_s
        for job in jobs:
            job.wait(max(0.0, deadline - time.monotonic()))
        late = [job for job in jobs if not job.done]
        with self._gate:
            self._deactivated.update(late)  # before the cancel, so the answer already says NOT_ACTIVE
        for job in late:
            job.cancel()  # the worker stops within one token; queued ones never start
        for job in late:
            job.wait(30.0)
        self.set_state("inactive")
        return len(jobs), len(late)

    def _close_gate(self, code: str, message: str) -> list[Job]:
        """Refuse new requests from now on; returns every job submitted before (none is still being submitted)."""
        with self._gate:
            self._accepting = False
            self._refusal = (code, message)
            self._gate.wait_for(lambda: self._submitting == 0, timeout=30.0)
            return list(self._jobs)

    def _stop_intake(self) -> None:
        for sub in self._subscriptions:
            self.node.destroy_subscription(sub)
        self._subscriptions = []
        if self._caption_timer is not None:
            self.node.destroy_timer(self._caption_timer)
            self._caption_timer = None

    def set_state(self, state: str) -> None:
        self.state = state
        if not self._accepting and self._refusal[0] == ErrorCode.NOT_ACTIVE:
            self._refusal = (ErrorCode.NOT_ACTIVE, f"the node is {state}" + (
                "; activate it (lifecycle) to serve requests" if state in ("unconfigured", "inactive") else ""))

    # --- shutdown ----------------------------------------------------------------------------------------------
    def shutdown_requests(self) -> None:
        """Refuse new requests with SHUTTING_DOWN and answer everything queued or running (SHUTTING_DOWN)."""
        self._close_gate(ErrorCode.SHUTTING_DOWN, "the node is shutting down")
        self._stop_intake()
        if self.server is not None:
            self.server.shutdown()

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

    # --- camera intake -----------------------------------------------------------------------------------------
    def _raw_callback(self, camera_id: str):
        frames = self.frames

        def callback(msg: Image) -> None:
            try:  # cheap header checks now; pixels are decoded only when a request needs this frame
                validate_raw_image(msg.encoding, msg.width, msg.height, msg.step, len(msg.data))
            except FrameError as e:
                self._warn_frame_once(camera_id, e)
            frames.put(Frame.from_raw(
                camera_id=camera_id, seq=next(self._seq), stamp_sec=msg.header.stamp.sec,
                stamp_nanosec=msg.header.stamp.nanosec, frame_id=msg.header.frame_id, encoding=msg.encoding,
                width=msg.width, height=msg.height, step=msg.step, is_bigendian=msg.is_bigendian, data=msg.data))
        return callback

    def _compressed_callback(self, camera_id: str):
        frames = self.frames

        def callback(msg: CompressedImage) -> None:
            frames.put(Frame.from_compressed(
                camera_id=camera_id, seq=next(self._seq), stamp_sec=msg.header.stamp.sec,
                stamp_nanosec=msg.header.stamp.nanosec, frame_id=msg.header.frame_id, format=msg.format,
                data=msg.data))
        return callback

    def _warn_frame_once(self, camera_id: str, error: FrameError) -> None:
        if self.frames.first_failure(camera_id, error.code):
            self.logger.error(f"camera {camera_id!r}: {error.message} (logged once per camera; requests "
                              f"about this camera answer {error.code})")

    def _log_result(self, result: SceneResult) -> None:
        if result.error_code in (ErrorCode.BAD_FRAME, ErrorCode.UNSUPPORTED_ENCODING):
            self._warn_frame_once(result.camera_id, FrameError(result.error_code, result.error_message))
        elif result.error_code == ErrorCode.INFERENCE_FAILED:
            self.logger.error(f"inference failed: {result.error_message}")

    # --- requests ----------------------------------------------------------------------------------------------
    def _track(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta

    @property
    def in_flight(self) -> int:
        with self._in_flight_lock:
            return self._in_flight

    def _submit(self, request: SceneRequest, on_text=None) -> Job:
        """The server's job while the gate is open; otherwise one already answered NOT_ACTIVE / SHUTTING_DOWN.
        A request past the gate is counted until it is registered, and closing the gate waits for that count to
        drop to zero, so a deactivate sees every job submitted before it closed the gate. (The submission itself
        runs outside the lock: requests validate and tokenize in parallel, as they do without the gate.)"""
        with self._gate:
            server = self.server
            if not (self._accepting and server is not None):
                code, message = self._refusal
                if code == ErrorCode.NOT_ACTIVE:
                    self.rejected_not_active += 1
                return _answered_job(request, code, message)
            self._submitting += 1
        job = None
        try:
            job = server.submit(request, on_text)
            return job
        finally:
            with self._gate:
                self._submitting -= 1
                if job is not None and not job.done:
                    self._jobs.add(job)
                self._gate.notify_all()

    def _result(self, job: Job) -> SceneResult:
        """The job's result; a cancel caused by a deactivate is reported as NOT_ACTIVE, not as a client cancel."""
        result = job.result
        with self._gate:
            self._jobs.discard(job)
            deactivated = job in self._deactivated
            self._deactivated.discard(job)
        if deactivated and result.error_code == ErrorCode.CANCELLED:
            result = replace(result, error_code=ErrorCode.NOT_ACTIVE, error_message=(
                f"the node was deactivated; this request was cancelled after waiting deactivate_timeout_s "
                f"{self._deactivate_timeout_s:g} ({result.error_message})"))
        self._log_result(result)
        return result

    def _on_ask_service(self, request, response):
        self._track(+1)
        try:
            job = self._submit(SceneRequest(request.question, request.camera_id, request.max_new_tokens,
                                            request.temperature))
            job.wait()  # always set: answered, failed, cancelled or shut down
            _fill_result(response, self._result(job))
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
        job = self._submit(SceneRequest(goal.question, goal.camera_id, goal.max_new_tokens, goal.temperature),
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
        result = self._result(job)
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
        server, config = self.server, self.config
        if server is None or not self._accepting:
            return
        for camera_id in config.caption_cameras:
            job = server.submit_caption(camera_id, config.caption_prompt, config.caption_max_new_tokens,
                                        self._caption_seq[camera_id])
            if job is not None:
                self._caption_seq[camera_id] = job.not_before_seq
                job.add_done_callback(self._publish_caption)

    def _publish_caption(self, job: Job) -> None:
        result = job.result
        if not result.success:
            self._log_result(result)
            return
        if not self._accepting:  # finished after a deactivate: intake and captions are off
            return
        self.caption_publisher.publish(SceneCaption(
            header=frame_header(result.frame), camera_id=result.camera_id, caption=result.answer,
            prompt=job.request.question, latency_ms=float(result.total_ms)))

    # --- health ------------------------------------------------------------------------------------------------
    def diagnostic_status(self) -> list[DiagnosticStatus]:
        name = self.node.get_fully_qualified_name()
        server, config, loaded = self.server, self.config, self.loaded
        if server is None or config is None or loaded is None:
            level, message = ((DiagnosticStatus.ERROR, f"configure failed: {self.problem}") if self.problem
                              else (DiagnosticStatus.WARN if self.state != "finalized" else DiagnosticStatus.OK,
                                    self.state))
            return [DiagnosticStatus(level=level, name=f"{name}: inference", message=message, values=[
                KeyValue(key="lifecycle_state", value=self.state),
                KeyValue(key="rejected_not_active", value=str(self.rejected_not_active))])]
        stats = server.stats
        vision = loaded.vision
        values = {"lifecycle_state": self.state, "model": config.model_path, "backend": vision.active,
                  "backend_requested": config.backend, "engine": vision.engine,
                  "vision_fallback": vision.fallback_reason, "manifest": loaded.manifest,
                  "device": config.device, "dtype": config.dtype, "queue_depth": server.queue_depth,
                  "queue_length": config.server.queue_length, "answered": stats.answered,
                  "rejected_busy": stats.rejected_busy, "rejected_not_active": self.rejected_not_active,
                  "failed": stats.failed, "inference_failed": stats.inference_failed, "captions": stats.captions,
                  "captions_skipped": stats.captions_skipped}
        for stage, (p50, p90, p99) in sorted(stats.percentiles().items()):
            values.update({f"{stage}_p50": f"{p50:.1f}", f"{stage}_p90": f"{p90:.1f}", f"{stage}_p99": f"{p99:.1f}"})
        main = DiagnosticStatus(level=DiagnosticStatus.OK, name=f"{name}: inference", hardware_id=config.device,
                                message="serving" if self.state == "active" else self.state,
                                values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        if vision.fell_back:
            main.level = DiagnosticStatus.WARN
            main.message = f"{main.message}; vision on torch, {vision.requested} unavailable: {vision.fallback_reason}"
        if stats.recent_inference_failures:
            main.level = DiagnosticStatus.WARN
            main.message = (f"{stats.recent_inference_failures} of the last {len(stats.recent_failures)} "
                            f"inference runs failed ({stats.inference_failed} since start)")
        statuses = [main]
        if self.state != "active":
            return statuses
        for camera in config.cameras:
            age = self.frames.age_s(camera.camera_id)
            stale = age is None or age > config.server.max_frame_age_s
            statuses.append(DiagnosticStatus(
                level=DiagnosticStatus.WARN if stale else DiagnosticStatus.OK,
                name=f"{name}: camera {camera.camera_id}", hardware_id=camera.topic,
                message="no frame yet" if age is None else ("stale" if stale else "ok"),
                values=[KeyValue(key="topic", value=self.node.resolve_topic_name(camera.topic)),
                        KeyValue(key="frame_age_s", value="" if age is None else f"{age:.3f}")]))
        return statuses

    def _publish_diagnostics(self) -> None:
        msg = DiagnosticArray(status=self.diagnostic_status())
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.diagnostics_publisher.publish(msg)

    def destroy(self) -> None:
        """Destroy everything this created on the node (before the node itself is destroyed)."""
        self._stop_intake()
        self.action_server.destroy()
        self.node.destroy_service(self.service)
        self.node.destroy_timer(self._diagnostics_timer)


class MobileVLMNode(Node):
    """The plain node: parameters, model and every interface at construction; serving until shut down."""

    def __init__(self, node_name: str = "mobilevlm_node", **kwargs):
        super().__init__(node_name, **kwargs)
        self.config = declare_and_read_config(self)
        self.get_logger().info(f"loading {self.config.model_path} ({self.config.backend}, {self.config.device}, "
                               f"{self.config.dtype})")
        started = time.monotonic()
        loaded = load_pipeline(self.config, self.get_logger())
        self.get_logger().info(f"model ready in {time.monotonic() - started:.1f} s")
        # Interfaces only once the model is loaded: a client that sees the service can be answered.
        self.scene = SceneInterface(self, self.create_publisher(SceneCaption, "caption", 10),
                                    self.config.diagnostics_period_s)
        self.scene.bind(self.config, loaded)
        self.scene.start()

    @property
    def executor_threads(self) -> int:
        return self.config.server.queue_length + 4

    @property
    def server(self) -> SceneServer:
        return self.scene.server

    @property
    def in_flight(self) -> int:
        return self.scene.in_flight

    def diagnostic_status(self) -> list[DiagnosticStatus]:
        return self.scene.diagnostic_status()

    def shutdown_gracefully(self, executor, timeout_s: float = 10.0) -> None:
        """Answer everything in flight (SHUTTING_DOWN or the finished answer) before the node goes away."""
        self.scene.shutdown_requests()
        self.scene.wait_idle(timeout_s, spin=lambda t: executor.spin_once(timeout_sec=t))
        # An action's result reaches its client through a get_result task that resumes only after the goal has
        # finished; keep the executor turning briefly so those responses go out too.
        flush_until = time.monotonic() + 1.0
        while time.monotonic() < flush_until:
            executor.spin_once(timeout_sec=0.05)


def run_node(args: list[str] | None, name: str, make_node: Callable[[], Node],
             serve: Callable[[Node, MultiThreadedExecutor, threading.Event], int]) -> int:
    """Process lifetime shared by the plain and the lifecycle node: rclpy with our own signal handling (rclpy's
    default SIGINT handler shuts the context down at once, and responses to requests in flight could no longer be
    sent), the node on a multi-threaded executor, ``serve`` until it returns the exit code, then teardown."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = None
    executor = None
    try:
        try:
            node = make_node()
        except Exception as e:  # noqa: BLE001 - any configuration or model problem stops the node with its reason
            print(f"[{name}] error: {e}", file=sys.stderr, flush=True)
            return 1
        executor = MultiThreadedExecutor(num_threads=node.executor_threads)
        executor.add_node(node)
        return serve(node, executor, stop)
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    finally:
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


def _serve(node: MobileVLMNode, executor: MultiThreadedExecutor, stop: threading.Event) -> int:
    node.get_logger().info(f"ready: {node.resolve_service_name('ask_scene')}")
    while not stop.is_set() and rclpy.ok():
        executor.spin_once(timeout_sec=0.1)
    node.shutdown_gracefully(executor)
    return 0


def main(args: list[str] | None = None) -> int:
    return run_node(args, "mobilevlm_node", MobileVLMNode, _serve)


if __name__ == "__main__":
    sys.exit(main())
