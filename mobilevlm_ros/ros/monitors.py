"""Standing monitors on ROS: each camera frame that arrives gives the server a monitor tick (it answers the monitors
due on that frame in one job), every answer is published on ``monitors`` (mobilevlm_ros/SceneMonitor) with the
frame's header, the ``set_monitor`` service changes the set at run time, and ``monitor_set`` (transient local, so a
late subscriber gets it too) shows the current set whenever it changes.

The set comes from the parameters at each configure; set_monitor changes last until the next cleanup.
"""
from __future__ import annotations

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from ..msg import MonitorSet, MonitorSpec, SceneMonitor
from ..server import ErrorCode, Job, SceneServer
from ..srv import SetMonitor
from .endpoints import frame_header

# The current set: the last one kept for subscribers that join later.
MONITOR_SET_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Every answer matters to a planner watching for a change: reliable, and deep enough for a burst of them.
MONITORS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)


class MonitorEndpoints:
    def __init__(self, node: Node, log_result):
        self.node = node
        self._log_result = log_result  # (SceneResult) -> None
        self._server: SceneServer | None = None  # the configured one (set_monitor works from configure on)
        self._serving = False  # active: frames give ticks
        self.publisher = node.create_lifecycle_publisher(SceneMonitor, "monitors", MONITORS_QOS)
        self.set_publisher = node.create_publisher(MonitorSet, "monitor_set", MONITOR_SET_QOS)
        self.service = node.create_service(SetMonitor, "set_monitor", self._on_set_monitor,
                                           callback_group=MutuallyExclusiveCallbackGroup())
        self._publish_set()

    def configure(self, server: SceneServer | None) -> None:
        """The server whose monitors these are (None: unconfigured, no monitors)."""
        self._server = server
        self._publish_set()

    def start(self) -> None:
        self._serving = True

    def stop(self) -> None:
        self._serving = False

    def on_frame(self, camera_id: str) -> None:
        """A frame of camera_id arrived (intake thread): a tick of its monitors, if any is due."""
        server = self._server
        if not self._serving or server is None:
            return
        job = server.submit_monitors(camera_id)
        if job is not None:
            job.add_done_callback(self._publish)

    def _publish(self, job: Job) -> None:
        result = job.result
        if not result.success:
            if result.error_code != ErrorCode.CANCELLED:  # a skipped tick is counted, not logged
                self._log_result(result)
            return
        if not self._serving:  # finished after a deactivate
            return
        header = frame_header(result.frame)
        for answer in result.monitor_answers:
            monitor = answer.monitor
            self.publisher.publish(SceneMonitor(
                header=header, name=monitor.name, camera_id=monitor.camera_id, question=monitor.question,
                answer=answer.answer, probability=float(answer.probability), changed=answer.changed))

    def _publish_set(self) -> None:
        monitors = self._server.monitors.all() if self._server is not None else []
        self.set_publisher.publish(MonitorSet(monitors=[
            MonitorSpec(name=m.name, question=m.question, camera_id=m.camera_id, rate_hz=float(m.rate_hz),
                        choices=list(m.choices)) for m in monitors]))

    def _on_set_monitor(self, request, response):
        server = self._server
        if server is None:
            response.success, response.error_code = False, ErrorCode.NOT_ACTIVE
            response.error_message = "the node is not configured: monitors come with the model (configure it)"
            return response
        problem = server.set_monitor(request.name, request.question, request.camera_id, request.rate_hz,
                                     tuple(request.choices))
        response.success = problem is None
        if problem is not None:
            response.error_code, response.error_message = problem.error_code, problem.error_message
            return response
        self._publish_set()
        self.node.get_logger().info(f"monitor {request.name}: " + (
            "removed" if not request.question.strip() else f"{request.question!r} set"))
        return response
