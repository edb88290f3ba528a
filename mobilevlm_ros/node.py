"""mobilevlm_node: the ROS 2 node over :mod:`mobilevlm_ros.server` (llama_ros's split: the core has no ROS).

Interfaces (all names relative, so ``__ns:=/robot7`` gives ``/robot7/ask_scene``):
- subscribes to each configured camera (``sensor_msgs/Image`` or ``CompressedImage``), keeping its newest frame and,
  for requests that name a frame by ``frame_stamp``, the last ``frame_history`` frames received and answered about;
- service ``ask_scene`` and action ``ask_scene`` (mobilevlm_ros/AskScene), topic ``caption``
  (mobilevlm_ros/SceneCaption), and ``/diagnostics`` (diagnostic_msgs/DiagnosticArray);
- standing monitors: topic ``monitors`` (mobilevlm_ros/SceneMonitor), service ``set_monitor``
  (mobilevlm_ros/SetMonitor) and topic ``monitor_set`` (mobilevlm_ros/MonitorSet, transient local);
- the standard lifecycle services (``<node>/change_state``, ``<node>/get_state``, ...).

One node class, a managed (lifecycle) node; two executables differ only in how it starts:
- ``mobilevlm_node`` (:func:`main`) configures and activates at once and exits 1 if that fails;
- ``mobilevlm_lifecycle_node`` (:mod:`mobilevlm_ros.lifecycle_node`) waits for a lifecycle manager, or with
  ``autostart: true`` configures and activates itself and, if that fails, stays unconfigured reporting why (a fleet
  unit must not restart in a loop over a model that is still being copied).

Transitions:
- unconfigured: ``ask_scene`` (service and action) exists and answers NOT_ACTIVE; nothing is loaded.
- configure: parameters are read and validated, the model directory is checked against its manifest (when it has
  one, or always with ``require_manifest``), free memory against the model's needs, then the model and the vision
  engines are loaded. Any failure leaves the node unconfigured with the reason in the log and on /diagnostics.
- activate: camera intake, captions, monitors and request serving start.
- deactivate: new requests answer NOT_ACTIVE at once; intake and captions stop; requests in flight get
  ``deactivate_timeout_s`` to finish and are then cancelled and answered NOT_ACTIVE. None is dropped.
- cleanup: the model, its server and (on CUDA) the cached GPU memory are released.
- shutdown (from any state, also on SIGINT/SIGTERM): everything queued or running is answered SHUTTING_DOWN, then
  the process exits 0.

Threading: inference runs on the server's single worker thread. Service and action callbacks only validate,
enqueue and wait for their own job; the executor has enough threads for every request that may wait plus spares,
so camera intake, timers and immediate answers (BUSY, errors) always find a free thread.
"""
from __future__ import annotations

import gc
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from rclpy.signals import SignalHandlerOptions

from .camera import FrameAge, FrameError, FrameStore
from .loading import LoadedModel, load_pipeline
from .msg import SceneCaption
from .params import MAX_QUEUE_LENGTH, NodeConfig
from .ros.captions import Captions
from .ros.diagnostics import CameraHealth, NodeHealth, diagnostic_status
from .ros.endpoints import AskSceneEndpoints
from .ros.intake import CameraIntake
from .ros.monitors import MonitorEndpoints
from .ros.parameters import NodeParameters
from .monitors import MonitorBoard
from .server import SHUTTING_DOWN_MESSAGE, AdmissionGate, ErrorCode, SceneResult, SceneServer

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
SHUTDOWN_TIMEOUT_S = 10.0
# Enough executor threads for the largest queue a configure may bring (each waiting request holds one), plus the
# lifecycle services, timers, intake and immediate answers; idle pool threads cost nothing until used.
EXECUTOR_THREADS = MAX_QUEUE_LENGTH + 6


def _reason(error: Exception) -> str:
    from .manifest import ManifestError, MemoryCheckError
    from .model import CheckpointError

    if isinstance(error, (ValueError, CheckpointError, ManifestError, MemoryCheckError)) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"


class MobileVLMNode(LifecycleNode):
    def __init__(self, node_name: str = "mobilevlm_node", **kwargs):
        super().__init__(node_name, **kwargs)
        self.config: NodeConfig | None = None
        self.loaded: LoadedModel | None = None
        self.server: SceneServer | None = None
        self.frames = FrameStore()  # recent frames per camera, filled by the intake while active
        self.problem = ""  # why the last configure failed, for /diagnostics
        self.finalized = threading.Event()
        self.gate = AdmissionGate()
        self.parameters = NodeParameters(self, configured=lambda: self.server is not None,
                                         check_live=self._check_live, apply_live=self._apply_live)
        self.parameters.read(check_files=False)  # every value and cross-check now: a bad one stops the process
        self.autostart = bool(self.get_parameter("autostart").value)
        timers = MutuallyExclusiveCallbackGroup()
        self.intake = CameraIntake(self, MutuallyExclusiveCallbackGroup())
        self.endpoints = AskSceneEndpoints(self, self.gate, self._log_result)
        self.captions = Captions(self, self.create_lifecycle_publisher(SceneCaption, "caption", 10), timers,
                                 self._log_result)
        self.monitors = MonitorEndpoints(self, self._log_result)
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._timer_group = timers
        self._diagnostics_period_s = float(self.get_parameter("diagnostics_period_s").value)
        self._diagnostics_timer = self.create_timer(self._diagnostics_period_s, self._publish_diagnostics,
                                                    callback_group=timers)

    # --- transitions -------------------------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        log = self.get_logger()
        try:
            config = self.parameters.read()
            if config.model_is_demo:
                log.warning(f"model_path is empty: loading the bundled demo model ({config.model_path}), which knows "
                            "only generated road scenes; set model_path to a MobileVLM checkpoint for real use")
            log.info(f"configuring: loading {config.model_path} ({config.backend}, {config.device}, {config.dtype})")
            started = time.monotonic()
            loaded = load_pipeline(config, log)
            frames = FrameStore(config.frame_history)
            server = SceneServer(loaded.pipeline, frames, config.server,
                                 FrameAge(config.server.frame_age_from, now_ns=self._now_ns),
                                 MonitorBoard(config.monitors))
            problem = config.caption_rate_hz > 0 and server.prompt_fits(config.caption_prompt,
                                                                        config.caption_max_new_tokens)
            if problem:
                server.shutdown()
                raise ValueError(f"caption_prompt does not fit: {problem}")
            monitor_problem = next(filter(None, map(server.monitor_problem, config.monitors)), None)
            if monitor_problem is not None:
                server.shutdown()
                raise ValueError(monitor_problem.error_message)
        except Exception as e:  # noqa: BLE001 - every problem leaves the node unconfigured with its reason
            self.problem = _reason(e)
            log.error(f"configure failed: {self.problem}")
            return FAILURE
        self.config, self.loaded, self.server, self.frames, self.problem = config, loaded, server, frames, ""
        self.monitors.configure(server)
        self._set_diagnostics_period(config.diagnostics_period_s)
        self.gate.set_state("inactive")
        log.info(f"configured in {time.monotonic() - started:.1f} s (vision: {loaded.vision.active}"
                 + (f", fallback from {config.backend}: {loaded.vision.fallback_reason}" if loaded.vision.fell_back
                    else "") + ")")
        return super().on_configure(state)

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # activates the lifecycle (caption) publisher
        if result != SUCCESS:
            return result
        config = self.config
        self.monitors.start()
        self.intake.start(config.cameras, self.frames, self.monitors.on_frame)
        self.captions.start(self.server, config.caption_cameras, config.caption_prompt,
                            config.caption_max_new_tokens, config.caption_rate_hz)
        self.gate.open(self.server)
        self.gate.set_state("active")
        self.get_logger().info(f"active: serving {self.resolve_service_name('ask_scene')}")
        return SUCCESS

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self.captions.stop()
        self.intake.stop()
        self.monitors.stop()
        timeout = self.config.deactivate_timeout_s
        in_flight, cancelled = self.gate.deactivate(timeout)
        self.gate.set_state("inactive")
        self.get_logger().info(f"deactivated: {in_flight} request(s) were in flight, {in_flight - cancelled} "
                               f"finished, {cancelled} cancelled after deactivate_timeout_s (NOT_ACTIVE)")
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        if self._release_model():
            self.get_logger().info("cleaned up: model released")
        else:
            self.get_logger().warning("cleaned up, but the model is still referenced somewhere: its memory was "
                                      "not freed")
        self.gate.set_state("unconfigured")
        return super().on_cleanup(state)

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().info(f"shutting down from {state.label}")
        self.gate.close(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE)
        self.captions.stop()
        self.intake.stop()
        self.monitors.stop()
        if self.server is not None:
            self.server.shutdown()  # queued requests answered SHUTTING_DOWN, the running one stops within a token
        if not self.endpoints.wait_idle(SHUTDOWN_TIMEOUT_S):  # the executor keeps turning on other threads
            self.get_logger().warning(f"{self.endpoints.in_flight} request(s) still in flight after "
                                      f"{SHUTDOWN_TIMEOUT_S} s")
        self._release_model()
        self.gate.set_state("finalized")
        result = super().on_shutdown(state)
        self.finalized.set()
        return result

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().error(f"error during a transition from {state.label}; releasing the model")
        try:
            self.captions.stop()
            self.intake.stop()
            self.monitors.stop()
            self.gate.deactivate(0.0)
            self._release_model()
        except Exception as e:  # noqa: BLE001 - recovering: report, then go back to unconfigured
            self.get_logger().error(f"while recovering: {_reason(e)}")
        self.gate.set_state("unconfigured")
        return SUCCESS

    def _release_model(self) -> bool:
        """Stop the server and drop the model. True when its memory was released (nothing else holds the
        pipeline); CUDA's cached blocks go back to the driver too."""
        server = self.gate.detach() or self.server
        if server is None:
            return True
        server.shutdown()
        self.monitors.configure(None)
        device = self.config.device
        pipeline_ref = weakref.ref(self.loaded.pipeline)
        self.server = self.loaded = None
        self.frames = FrameStore()
        server = None  # the last reference but the pipeline's own, so gc can free the model
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        return pipeline_ref() is None

    # --- live parameters ---------------------------------------------------------------------------------------
    def _check_live(self, name: str, value) -> str | None:
        config, server = self.config, self.server
        if name in ("caption_prompt", "caption_max_new_tokens"):
            prompt = value if name == "caption_prompt" else config.caption_prompt
            tokens = value if name == "caption_max_new_tokens" else config.caption_max_new_tokens
            problem = server.prompt_fits(prompt, tokens)
            return f"{name} {value!r}: the caption would not fit: {problem}" if problem else None
        if name == "max_new_tokens":
            problem = server.prompt_fits("?", value)  # the shortest question
            return f"max_new_tokens {value}: no question would fit: {problem}" if problem else None
        return None

    def _apply_live(self, name: str, value) -> None:
        """Takes effect for the next request (the running one keeps its settings)."""
        if name in ("max_frame_age_s", "max_new_tokens", "temperature"):
            self.server.update(**{name: value})
            self.config = replace(self.config, server=self.server.config)
            return
        self.config = replace(self.config, **{name: value})
        if name == "caption_prompt":
            self.captions.prompt = value
        elif name == "caption_max_new_tokens":
            self.captions.max_new_tokens = value
        elif name == "caption_rate_hz" and self.gate.state == "active":
            self.captions.set_rate(value)

    # --- logging and health ------------------------------------------------------------------------------------
    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _log_result(self, result: SceneResult) -> None:
        if result.error_code in (ErrorCode.BAD_FRAME, ErrorCode.UNSUPPORTED_ENCODING):
            self.intake.report(result.camera_id, FrameError(result.error_code, result.error_message))
        elif result.error_code == ErrorCode.INFERENCE_FAILED:
            self.get_logger().error(f"inference failed: {result.error_message}")

    def health(self) -> NodeHealth:
        config, server = self.config, self.server
        cameras = ()
        if self.gate.state == "active" and config is not None and server is not None:
            cameras = []
            for camera in config.cameras:
                frame = self.frames.latest(camera.camera_id)
                age, judged = server.frame_age(frame) if frame is not None else (None, "")
                cameras.append(CameraHealth(camera.camera_id, self.intake.topic(camera),
                                            self.intake.reliability(camera.camera_id), age, judged))
        return NodeHealth(self.get_fully_qualified_name(), self.gate.state, self.problem,
                          self.gate.rejected_not_active, config, self.loaded, server, tuple(cameras))

    def _publish_diagnostics(self) -> None:
        msg = DiagnosticArray(status=diagnostic_status(self.health()))
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_publisher.publish(msg)

    def _set_diagnostics_period(self, period_s: float) -> None:
        if period_s != self._diagnostics_period_s:
            self.destroy_timer(self._diagnostics_timer)
            self._diagnostics_period_s = period_s
            self._diagnostics_timer = self.create_timer(period_s, self._publish_diagnostics,
                                                        callback_group=self._timer_group)

    # --- from outside the executor ------------------------------------------------------------------------------
    def _once(self, action: Callable[[], None]) -> None:
        """Run action once on the executor, in the default callback group: serialised with the lifecycle
        services, so it never races a transition requested through change_state."""
        timer = None

        def fire():
            timer.cancel()
            action()
        timer = self.create_timer(0.001, fire)

    def start_serving(self) -> bool:
        """Configure, then activate; False (the reason logged) when either fails."""
        return self.trigger_configure() == SUCCESS and self.trigger_activate() == SUCCESS

    def request_autostart(self) -> None:
        def autostart():
            if not self.start_serving():
                self.get_logger().error("autostart: configure failed; staying unconfigured (fix the cause, then "
                                        "configure through the lifecycle services, or restart)")
        self._once(autostart)

    def request_shutdown(self) -> None:
        def shutdown():
            if not self.finalized.is_set():
                self.trigger_shutdown()
        self._once(shutdown)


class DrainingExecutor(MultiThreadedExecutor):
    """A MultiThreadedExecutor whose shutdown lets the callbacks already running finish first. rclpy's own
    (Kilted's 9.1 among others) destroys its guard condition before it joins the pool's threads, so a callback still
    running from the last spin_once raised "cannot use Destroyable because destruction was requested" at exit."""

    def shutdown(self, timeout_sec: float | None = None, **kwargs) -> bool:
        self._executor.shutdown(wait=True)  # the pool every MultiThreadedExecutor (Humble to Kilted) runs callbacks in
        return super().shutdown(timeout_sec, **kwargs)


def serve(node: MobileVLMNode, executor: MultiThreadedExecutor, stop: threading.Event) -> int:
    """Turn the executor until the node is finalized; SIGINT/SIGTERM run the shutdown transition, so every request
    in flight is answered before the context goes away."""
    code = 0
    stop_deadline = None
    while rclpy.ok() and not node.finalized.is_set():
        if stop.is_set() and stop_deadline is None:
            node.request_shutdown()
            stop_deadline = time.monotonic() + 120.0  # a configure in progress finishes first
        if stop_deadline is not None and time.monotonic() > stop_deadline:
            node.get_logger().error("shutdown did not complete in 120 s; exiting")
            code = 1
            break
        executor.spin_once(timeout_sec=0.1)
    # The shutdown transition's own response, and action results whose get_result task resumes only after
    # the goal finished, go out while the executor keeps turning a little longer.
    flush_until = time.monotonic() + 1.0
    while rclpy.ok() and time.monotonic() < flush_until:
        executor.spin_once(timeout_sec=0.05)
    return code


def run_node(args: list[str] | None, name: str, start: Callable[[MobileVLMNode], bool]) -> int:
    """The process: rclpy with our own signal handling (rclpy's default SIGINT handler shuts the context down at
    once, and responses to requests in flight could no longer be sent), the node, ``start`` (False: exit 1), then
    :func:`serve` on a multi-threaded executor until shutdown, then teardown. Start-up errors go to the ROS logger
    (console, log file) with the reason, and the exit code is 1."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = None
    executor = None
    try:
        try:
            node = MobileVLMNode()
        except Exception as e:  # noqa: BLE001 - any configuration problem stops the process with its reason
            rclpy.logging.get_logger(name).fatal(f"error: {_reason(e)}")
            return 1
        if not start(node):
            node.get_logger().fatal(f"error: could not start serving: {node.problem or 'activate failed'}")
            return 1
        executor = DrainingExecutor(num_threads=EXECUTOR_THREADS)
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


def _start_now(node: MobileVLMNode) -> bool:
    node.get_logger().info(f"loading, then serving {node.resolve_service_name('ask_scene')}")
    if node.start_serving():
        node.get_logger().info(f"ready: {node.resolve_service_name('ask_scene')}")
        return True
    return False


def main(args: list[str] | None = None) -> int:
    """mobilevlm_node: configure and activate at once (before the executor turns, so the first request it
    answers is served by the loaded model); exit 1 if that fails."""
    return run_node(args, "mobilevlm_node", _start_now)


if __name__ == "__main__":
    sys.exit(main())
