"""Camera bags without ROS 2's rosbag2: write them with ``rosbags`` and replay them through real rclpy publishers.

On a robot, ``ros2 bag play`` does the replay; here (no rosbag2_py, no ros2cli) ``mobilevlm replay-bag`` does the
same job for tests and the demo: it publishes each stored message's CDR bytes unchanged on its topic, at the
recorded rate. Bags are written in metadata version 8, which Humble's rosbag2 can read.
"""
from __future__ import annotations

import argparse
import importlib
import io
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

STORAGES = ("sqlite3", "mcap")


@dataclass(frozen=True)
class CameraFrame:
    """One frame to record: an RGB image, its stamp and where it goes."""

    topic: str
    stamp_ns: int
    rgb: np.ndarray
    frame_id: str = "camera_optical_frame"
    compressed: bool = False  # True: sensor_msgs/CompressedImage JPEG, else sensor_msgs/Image rgb8


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


def _header(types, stamp_ns: int, frame_id: str):
    time_msg = types["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    return types["std_msgs/msg/Header"](stamp=time_msg, frame_id=frame_id)


def write_camera_bag(path: str | Path, frames: Iterable[CameraFrame], storage: str = "sqlite3") -> Path:
    """Write frames (in stamp order) to a new bag directory; the bag time of each message is its stamp."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r}: expected one of {', '.join(STORAGES)}")
    store = _typestore()
    types = store.types
    path = Path(path)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    connections = {}
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        for frame in sorted(frames, key=lambda f: f.stamp_ns):
            header = _header(types, frame.stamp_ns, frame.frame_id)
            if frame.compressed:
                buffer = io.BytesIO()
                PILImage.fromarray(frame.rgb).save(buffer, format="JPEG", quality=90)
                msgtype = "sensor_msgs/msg/CompressedImage"
                msg = types[msgtype](header=header, format="jpeg",
                                     data=np.frombuffer(buffer.getvalue(), dtype=np.uint8))
            else:
                h, w, _ = frame.rgb.shape
                msgtype = "sensor_msgs/msg/Image"
                msg = types[msgtype](header=header, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                                     data=np.ascontiguousarray(frame.rgb).reshape(-1))
            if frame.topic not in connections:
                connections[frame.topic] = writer.add_connection(frame.topic, msgtype, typestore=store)
            writer.write(connections[frame.topic], frame.stamp_ns, store.serialize_cdr(msg, msgtype))
    return path


def read_bag(path: str | Path) -> list[tuple[str, str, int, bytes]]:
    """(topic, msgtype, bag time ns, CDR bytes) of every message, in time order."""
    from rosbags.rosbag2 import Reader

    with Reader(Path(path)) as reader:
        return [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]


def _message_class(msgtype: str):
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


def create_publishers(node, messages: list[tuple[str, str, int, bytes]],
                      remap: dict[str, str] | None = None) -> dict:
    """One publisher per recorded topic (optionally remapped), keyed by the recorded topic."""
    publishers = {}
    for topic, msgtype, _, _ in messages:
        if topic not in publishers:
            publishers[topic] = node.create_publisher(_message_class(msgtype), (remap or {}).get(topic, topic), 10)
    return publishers


def replay(publishers: dict, messages: list[tuple[str, str, int, bytes]], rate: float = 1.0,
           stop: threading.Event | None = None) -> int:
    """Publish messages at their recorded spacing (divided by rate); returns how many were sent."""
    if not messages:
        return 0
    stop = stop or threading.Event()
    start_wall, start_bag = time.monotonic(), messages[0][2]
    sent = 0
    for topic, _, stamp, data in messages:
        delay = start_wall + (stamp - start_bag) / 1e9 / rate - time.monotonic()
        if stop.wait(max(0.0, delay)):
            break
        publishers[topic].publish(data)  # the stored CDR bytes, unchanged
        sent += 1
    return sent


def wait_for_subscribers(node, topics: Iterable[str], timeout_s: float = 30.0) -> bool:
    """Discovery takes time on a loaded machine: wait until every topic has a subscriber before replaying."""
    deadline = time.monotonic() + timeout_s
    topics = list(topics)
    while time.monotonic() < deadline:
        if all(node.count_subscribers(topic) > 0 for topic in topics):
            return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mobilevlm replay-bag", description=__doc__.split("\n\n")[0])
    parser.add_argument("bag", help="bag directory (sqlite3 or MCAP)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    parser.add_argument("--loop", action="store_true", help="play again from the start until interrupted")
    parser.add_argument("--wait-for-subscribers", type=float, default=30.0, metavar="S",
                        help="wait up to S seconds for a subscriber on every topic first (0: don't wait)")
    parser.add_argument("--remap", action="append", default=[], metavar="FROM:=TO", help="publish FROM on TO")
    args = parser.parse_args(argv)
    try:
        messages = read_bag(args.bag)
    except Exception as e:  # noqa: BLE001 - rosbags raises its own types for every kind of damaged bag
        print(f"mobilevlm replay-bag: cannot read {args.bag}: {e}", file=sys.stderr)
        return 2
    remap = dict(item.split(":=", 1) for item in args.remap)

    import rclpy

    rclpy.init(args=None)
    node = rclpy.create_node("mobilevlm_bag_replay")
    try:
        try:
            publishers = create_publishers(node, messages, remap)
            topics = [publisher.topic_name for publisher in publishers.values()]
            if args.wait_for_subscribers and not wait_for_subscribers(node, topics, args.wait_for_subscribers):
                print(f"mobilevlm replay-bag: no subscriber on some of {topics} after {args.wait_for_subscribers} "
                      "s; playing anyway", file=sys.stderr)
            while True:
                sent = replay(publishers, messages, args.rate)
                print(f"mobilevlm replay-bag: published {sent} messages", flush=True)
                if not args.loop:
                    return 0
        except Exception:
            # Ctrl-C: rclpy's signal handler shuts the context down before Python raises KeyboardInterrupt, so a
            # publish under way fails with "publisher's context is invalid" first (the KeyboardInterrupt follows,
            # caught below).
            if rclpy.ok():
                raise
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
