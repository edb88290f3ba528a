"""mobilevlm_lifecycle_node: the managed (lifecycle) variant of mobilevlm_node, for fleet tooling.

Same parameters and interfaces as ``mobilevlm_node`` (both are built on :class:`~mobilevlm_ros.node.SceneInterface`),
driven through the standard lifecycle services (``<node>/change_state``, ``<node>/get_state``, ...):

- unconfigured: ``ask_scene`` (service and action) exists and answers NOT_ACTIVE; nothing is loaded.
- configure: parameters are read again and validated, the model directory is checked against its manifest (when
  it has one, or always with ``require_manifest``), free memory against the model's needs, then the model and the
  vision engines are loaded (engines built under a lock when ``build_engines`` allows, else the torch vision path,
  logged and in /diagnostics). Any failure leaves the node unconfigured: the transition answers success=false,
  the reason is logged and published on /diagnostics (ERROR, "configure failed: ...").
- activate: camera intake, captions and request serving start.
- deactivate: new requests answer NOT_ACTIVE at once; intake and captions stop; requests in flight get
  ``deactivate_timeout_s`` to finish and are then cancelled and answered NOT_ACTIVE. None is dropped.
- cleanup: the model, its server and (on CUDA) the cached GPU memory are released.
- shutdown (from any state): everything queued or running is answered SHUTTING_DOWN, then the process exits 0.
  SIGINT and SIGTERM do the same.

``autostart: true`` configures and activates at start (for robots without a lifecycle manager); a failed
autostart leaves the node unconfigured and reporting why, rather than exiting into a restart loop.
"""
from __future__ import annotations

import sys
import threading
import time

import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn

from .manifest import ManifestError, MemoryCheckError
from .msg import SceneCaption
from .loading import load_pipeline
from .node import MAX_QUEUE_LENGTH, SceneInterface, _param, declare_and_read_config, run_node

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
SHUTDOWN_TIMEOUT_S = 10.0


def _reason(error: Exception) -> str:
    from .model import CheckpointError

    if isinstance(error, (ValueError, CheckpointError, ManifestError, MemoryCheckError)) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"


class MobileVLMLifecycleNode(LifecycleNode):
    def __init__(self, node_name: str = "mobilevlm_node", **kwargs):
        super().__init__(node_name, **kwargs)
        self.autostart = bool(_param(self, "autostart", False))
        period = float(_param(self, "diagnostics_period_s", 1.0))  # validated with the rest at configure
        self.scene = SceneInterface(self, self.create_lifecycle_publisher(SceneCaption, "caption", 10),
                                    period if period > 0 else 1.0, state="unconfigured")
        self.config = None
        self.finalized = threading.Event()

    # Enough executor threads for the largest queue_length a configure may bring, plus the lifecycle services,
    # timers and immediate answers (idle pool threads are only started when needed).
    executor_threads = MAX_QUEUE_LENGTH + 6

    # --- transitions -------------------------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        log = self.get_logger()
        try:
            config = declare_and_read_config(self)
            log.info(f"configuring: loading {config.model_path} ({config.backend}, {config.device}, {config.dtype})")
            started = time.monotonic()
            loaded = load_pipeline(config, log)
        except Exception as e:  # noqa: BLE001 - every problem leaves the node unconfigured with its reason
            self.scene.problem = _reason(e)
            log.error(f"configure failed: {self.scene.problem}")
            return FAILURE
        self.config = config
        self.scene.bind(config, loaded)
        log.info(f"configured in {time.monotonic() - started:.1f} s (vision: {loaded.vision.active}"
                 + (f", fallback from {config.backend}: {loaded.vision.fallback_reason}" if loaded.vision.fell_back
                    else "") + ")")
        return super().on_configure(state)

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # activates the lifecycle (caption) publisher
        if result != SUCCESS:
            return result
        self.scene.start()
        self.get_logger().info(f"active: serving {self.resolve_service_name('ask_scene')}")
        return SUCCESS

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        # Read live: deactivate_timeout_s can be changed (set_parameters) without a reconfigure.
        timeout = float(self.get_parameter("deactivate_timeout_s").value)
        in_flight, cancelled = self.scene.stop(timeout if timeout >= 0 else None)
        self.get_logger().info(f"deactivated: {in_flight} request(s) were in flight, {in_flight - cancelled} "
                               f"finished, {cancelled} cancelled after deactivate_timeout_s (NOT_ACTIVE)")
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        if self.scene.unbind():
            self.get_logger().info("cleaned up: model released")
        else:
            self.get_logger().warning("cleaned up, but the model is still referenced somewhere: its memory was "
                                      "not freed")
        self.config = None
        return super().on_cleanup(state)

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().info(f"shutting down from {state.label}")
        self.scene.shutdown_requests()
        if not self.scene.wait_idle(SHUTDOWN_TIMEOUT_S):  # the executor keeps turning on other threads
            self.get_logger().warning(f"{self.scene.in_flight} request(s) still in flight after "
                                      f"{SHUTDOWN_TIMEOUT_S} s")
        self.scene.unbind()
        self.scene.set_state("finalized")
        result = super().on_shutdown(state)
        self.finalized.set()
        return result

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().error(f"error during a transition from {state.label}; releasing the model")
        try:
            if self.scene.state == "active":
                self.scene.stop(0.0)
            self.scene.unbind()
        except Exception as e:  # noqa: BLE001 - recovering: report, then go back to unconfigured
            self.get_logger().error(f"while recovering: {_reason(e)}")
        return SUCCESS

    # --- from outside the executor ------------------------------------------------------------------------------
    def _once(self, action) -> None:
        """Run action once on the executor, in the default callback group: serialised with the lifecycle
        services, so it never races a transition requested through change_state."""
        timer = None

        def fire():
            timer.cancel()
            action()
        timer = self.create_timer(0.001, fire)

    def request_autostart(self) -> None:
        def autostart():
            if self.trigger_configure() == SUCCESS:
                self.trigger_activate()
            else:
                self.get_logger().error("autostart: configure failed; staying unconfigured (fix the cause, then "
                                        "configure through the lifecycle services, or restart)")
        self._once(autostart)

    def request_shutdown(self) -> None:
        def shutdown():
            if not self.finalized.is_set():
                self.trigger_shutdown()
        self._once(shutdown)


def _serve(node: MobileVLMLifecycleNode, executor: MultiThreadedExecutor, stop: threading.Event) -> int:
    """Turn the executor until the node is finalized; SIGINT/SIGTERM run the shutdown transition, so every request
    in flight is answered before the context goes away."""
    node.get_logger().info(f"lifecycle node up (unconfigured): {node.get_fully_qualified_name()}/change_state"
                           + ("; autostart" if node.autostart else ""))
    if node.autostart:
        node.request_autostart()
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


def main(args: list[str] | None = None) -> int:
    return run_node(args, "mobilevlm_lifecycle_node", MobileVLMLifecycleNode, _serve)


if __name__ == "__main__":
    sys.exit(main())
