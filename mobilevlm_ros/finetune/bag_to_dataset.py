"""mobilevlm bag-to-dataset: frames sampled from a rosbag (sqlite3 or MCAP) into images and a LLaVA-style JSON.

    mobilevlm bag-to-dataset BAG --topic /front/image_raw --rate 1 --out DIR \\
        --question "Is the road wet?" --question "How many cones are there?" [--labels labels.json]

Frames of one camera topic (sensor_msgs/Image or CompressedImage, decoded by the node's own camera code) are taken
at most ``rate`` per second of bag time: the first frame, then the first one at least 1/rate s after the last taken.
Each becomes ``DIR/images/<frame>.png`` (lossless: what the camera sent) and one record per question in
``DIR/dataset.json``, the format mobilevlm finetune reads. Answers come from the labels file, a JSON object mapping
a frame name to its answers in the order of the questions (``{"frame_00000": ["yes", "2"], ...}``); without one,
or for a frame it does not list, the answers are left empty, to be filled in (mobilevlm finetune refuses an empty
answer and names the record). ``DIR/labels_template.json`` lists every frame with empty answers, ready to copy.
The output is written to a temporary directory and renamed into place: a failure leaves nothing in DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")


def decode_frame(msgtype: str, msg) -> np.ndarray:
    """A deserialised camera message as RGB uint8 [H, W, 3], through the node's decoders."""
    from ..camera import decode_compressed_image, decode_raw_image

    if msgtype == IMAGE_TYPES[1]:
        return decode_compressed_image(msg.format, msg.data)
    return decode_raw_image(msg.encoding, msg.width, msg.height, msg.step, msg.is_bigendian, msg.data)


def sample_frames(bag: str | Path, topic: str, rate: float) -> list[tuple[int, np.ndarray]]:
    """(bag time ns, RGB) of the frames taken from topic at most rate per second."""
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    period_ns = int(1e9 / rate)
    frames: list[tuple[int, np.ndarray]] = []
    with Reader(Path(bag)) as reader:
        connections = [c for c in reader.connections if c.topic == topic]
        if not connections:
            topics = sorted({f"{c.topic} ({c.msgtype})" for c in reader.connections})
            raise ValueError(f"{bag}: no topic {topic!r}; it has {', '.join(topics) or 'no topics'}")
        msgtype = connections[0].msgtype
        if msgtype not in IMAGE_TYPES:
            raise ValueError(f"{bag}: topic {topic!r} carries {msgtype}, not {' or '.join(IMAGE_TYPES)}")
        for connection, stamp, raw in reader.messages(connections=connections):
            if frames and stamp < frames[-1][0] + period_ns:
                continue
            msg = store.deserialize_cdr(raw, connection.msgtype)
            frames.append((stamp, decode_frame(connection.msgtype, msg)))
    return frames


def read_labels(path: str | Path, questions: list[str]) -> dict[str, list[str]]:
    """The labels file: frame name -> answers, one per question."""
    path = Path(path)
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: labels file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(labels, dict):
        raise ValueError(f"{path}: expected an object mapping frame names to lists of answers")
    for frame, answers in labels.items():
        if not (isinstance(answers, list) and len(answers) == len(questions) and all(isinstance(a, str)
                                                                                     for a in answers)):
            raise ValueError(f"{path}: frame {frame!r}: expected {len(questions)} answers (one per --question, in "
                             f"order), got {answers!r}")
    return labels


def bag_to_dataset(bag: str | Path, topic: str, rate: float, out: str | Path, questions: list[str],
                   labels: dict[str, list[str]] | None = None) -> Path:
    """Write the sampled frames and their records; returns the dataset JSON's path."""
    if rate <= 0:
        raise ValueError(f"rate {rate}: must be positive")
    if not questions or any(not q.strip() for q in questions):
        raise ValueError("give at least one non-empty --question")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: output directory exists and is not empty")
    frames = sample_frames(bag, topic, rate)
    if not frames:
        raise ValueError(f"{bag}: no messages on {topic!r}")
    labels = labels or {}
    names = [f"frame_{i:05d}" for i in range(len(frames))]
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise ValueError(f"labels name frames that were not sampled: {', '.join(unknown[:5])}")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    try:
        records = []
        for name, (stamp, rgb) in zip(names, frames):
            image = f"images/{name}.png"
            Image.fromarray(rgb).save(tmp / image)
            answers = labels.get(name, [""] * len(questions))
            for k, (question, answer) in enumerate(zip(questions, answers)):
                records.append({"id": f"{name}-{k}", "image": image, "stamp_ns": stamp, "conversations": [
                    {"from": "human", "value": "<image>\n" + question.strip()}, {"from": "gpt", "value": answer}]})
        (tmp / "dataset.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        (tmp / "labels_template.json").write_text(
            json.dumps({name: [""] * len(questions) for name in names}, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "dataset.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mobilevlm bag-to-dataset",
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("bag", help="bag directory (sqlite3 or MCAP)")
    parser.add_argument("--topic", required=True, help="camera topic (sensor_msgs/Image or CompressedImage)")
    parser.add_argument("--rate", type=float, default=1.0, help="frames per second of bag time to take at most")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--question", action="append", required=True, help="a question to ask of every frame "
                                                                          "(repeatable)")
    parser.add_argument("--labels", help="JSON: frame name -> answers in question order")
    args = parser.parse_args(argv)
    try:
        labels = read_labels(args.labels, args.question) if args.labels else None
        path = bag_to_dataset(args.bag, args.topic, args.rate, args.out, args.question, labels)
    except (ValueError, FileExistsError) as e:
        print(f"mobilevlm bag-to-dataset: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - rosbags raises its own types for every kind of damaged bag
        print(f"mobilevlm bag-to-dataset: cannot read {args.bag}: {e}", file=sys.stderr)
        return 2
    records = json.loads(path.read_text(encoding="utf-8"))
    empty = sum(not r["conversations"][1]["value"] for r in records)
    print(f"{path}: {len(records)} records from {len(records) // len(args.question)} frames"
          + (f"; {empty} answers to fill in" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
