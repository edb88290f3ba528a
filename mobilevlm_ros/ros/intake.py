"""Camera intake: one subscription per configured camera, each message copied into a :class:`~mobilevlm_ros.camera.
Frame` (nothing is decoded in the callback), kept as that camera's newest frame, and announced to ``on_frame`` (the
standing monitors' tick).

Reliability ``auto`` matches the publishers, as ``ros2 bag record`` does: a reliable subscription when every
publisher of the topic is reliable, else best effort (which matches any publisher). The choice is checked again
every second, so a camera driver that starts after the node, or restarts with other QoS, is followed. Reliable
matters for large raw frames: Fast DDS drops a best-effort sample that arrives in fragments as soon as one fragment
is lost, so 4K frames from a reliable driver reach a reliable subscription only.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from ..camera import Frame, FrameError, FrameStore, validate_raw_image
from ..params import CameraConfig

FRAME_ERROR_LOG_PERIOD_S = 10.0  # a frame problem is logged again after this long, per camera and error
AUTO_RECHECK_PERIOD_S = 1.0
_POLICIES = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}


class CameraIntake:
    def __init__(self, node: Node, callback_group):
        self.node = node
        self.callback_group = callback_group
        self.frames = FrameStore()  # the node's, given at start
        self.on_frame: Callable[[str], None] = lambda camera_id: None  # given at start
        self._seq = itertools.count()
        self._cameras: tuple[CameraConfig, ...] = ()
        self._subscriptions: dict[str, tuple[ReliabilityPolicy, object]] = {}
        self._recheck_timer = None

    def start(self, cameras: tuple[CameraConfig, ...], frames: FrameStore,
              on_frame: Callable[[str], None] = lambda camera_id: None) -> None:
        self.frames = frames
        self.on_frame = on_frame
        self._cameras = cameras
        for camera in cameras:
            self._subscribe(camera, self._wanted_reliability(camera) or ReliabilityPolicy.BEST_EFFORT)
        if any(camera.reliability == "auto" for camera in cameras):
            self._recheck_timer = self.node.create_timer(AUTO_RECHECK_PERIOD_S, self._recheck,
                                                         callback_group=self.callback_group)

    def stop(self) -> None:
        if self._recheck_timer is not None:
            self.node.destroy_timer(self._recheck_timer)
            self._recheck_timer = None
        for _, subscription in self._subscriptions.values():
            self.node.destroy_subscription(subscription)
        self._subscriptions = {}

    def topic(self, camera: CameraConfig) -> str:
        return self.node.resolve_topic_name(camera.topic)

    def reliability(self, camera_id: str) -> str:
        """The reliability of the camera's subscription now ('' while none), for /diagnostics."""
        entry = self._subscriptions.get(camera_id)
        return "" if entry is None else ("reliable" if entry[0] == ReliabilityPolicy.RELIABLE else "best_effort")

    def _wanted_reliability(self, camera: CameraConfig) -> ReliabilityPolicy | None:
        """The fixed policy, or for auto the publishers' (None while the topic has no publisher)."""
        if camera.reliability != "auto":
            return _POLICIES[camera.reliability]
        publishers = self.node.get_publishers_info_by_topic(self.topic(camera))
        if not publishers:
            return None
        reliable = all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE for p in publishers)
        return ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT

    def _recheck(self) -> None:
        for camera in self._cameras:
            wanted = self._wanted_reliability(camera)
            current = self._subscriptions.get(camera.camera_id)
            if wanted is not None and current is not None and wanted != current[0]:
                self.node.destroy_subscription(current[1])
                self._subscribe(camera, wanted)

    def _subscribe(self, camera: CameraConfig, reliability: ReliabilityPolicy) -> None:
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=reliability)
        if camera.transport == "raw":
            subscription = self.node.create_subscription(Image, camera.topic, self._raw_callback(camera.camera_id),
                                                         qos, callback_group=self.callback_group)
        else:
            subscription = self.node.create_subscription(CompressedImage, camera.topic,
                                                         self._compressed_callback(camera.camera_id), qos,
                                                         callback_group=self.callback_group)
        self._subscriptions[camera.camera_id] = (reliability, subscription)
        self.node.get_logger().info(
            f"camera {camera.camera_id!r}: {camera.transport} on {self.topic(camera)}, "
            f"{self.reliability(camera.camera_id)}" + (" (auto)" if camera.reliability == "auto" else ""))

    def _raw_callback(self, camera_id: str):
        frames, on_frame = self.frames, self.on_frame

        def callback(msg: Image) -> None:
            try:  # cheap header checks now; pixels are decoded only when a request needs this frame
                validate_raw_image(msg.encoding, msg.width, msg.height, msg.step, len(msg.data))
            except FrameError as e:
                self.report(camera_id, e)
            frames.put(Frame.from_raw(
                camera_id=camera_id, seq=next(self._seq), stamp_sec=msg.header.stamp.sec,
                stamp_nanosec=msg.header.stamp.nanosec, frame_id=msg.header.frame_id, encoding=msg.encoding,
                width=msg.width, height=msg.height, step=msg.step, is_bigendian=msg.is_bigendian, data=msg.data))
            on_frame(camera_id)
        return callback

    def _compressed_callback(self, camera_id: str):
        frames, on_frame = self.frames, self.on_frame

        def callback(msg: CompressedImage) -> None:
            frames.put(Frame.from_compressed(
                camera_id=camera_id, seq=next(self._seq), stamp_sec=msg.header.stamp.sec,
                stamp_nanosec=msg.header.stamp.nanosec, frame_id=msg.header.frame_id, format=msg.format,
                data=msg.data))
            on_frame(camera_id)
        return callback

    def report(self, camera_id: str, error: FrameError) -> None:
        """Log a frame problem, at most once per FRAME_ERROR_LOG_PERIOD_S per camera and error: a fault that comes
        back after a recovery is logged again, a broken stream does not flood the log."""
        if self.frames.report_due(camera_id, error.code, FRAME_ERROR_LOG_PERIOD_S):
            self.node.get_logger().error(
                f"camera {camera_id!r}: {error.message} (requests about this camera answer {error.code}; logged at "
                f"most every {FRAME_ERROR_LOG_PERIOD_S:g} s)")
