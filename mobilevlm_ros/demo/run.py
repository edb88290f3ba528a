"""mobilevlm demo: the whole robot loop on generated road scenes, with nothing but this package.

1. draws a few road scenes (mobilevlm_ros.demo.scenes) and records them as a camera stream into a real ROS 2 bag;
2. starts the real node (bundled demo model by default) in its own process, in namespace /demo;
3. replays the bag at its recorded rate from a third process;
4. asks each scene's questions through the ``ask_scene`` service and the streaming action while the bag plays,
   and scores every answer against the ground truth of the frame the node actually answered about (the
   response's image_header identifies it);
5. prints questions, answers, truth and latencies, and the captions the node published, and saves the frames it
   asked about with the answers drawn on them (PNG).

All DDS traffic stays on this machine (mobilevlm_ros.rosenv).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..bags import CameraFrame, write_camera_bag
from ..rosenv import isolated_ros_env
from . import DEFAULT_MODEL_DIR
from .scenes import QA, Scene, answer_matches, make_scene

NAMESPACE = "/demo"
TOPIC = f"{NAMESPACE}/front/image_raw"
FPS = 10
FRAME_SIZE = (448, 336)


@dataclass
class Asked:
    qa: QA
    via: str  # service or action
    answer: str
    scene: Scene | None  # the scene of the frame the node answered about
    error: str
    latency: dict

    @property
    def truth(self) -> str | None:
        """The ground truth for the frame actually used (None when that scene has no such question)."""
        if self.scene is None:
            return None
        matching = [qa.answer for qa in self.scene.qa if qa.question == self.qa.question]
        return matching[0] if matching else None

    @property
    def correct(self) -> bool:
        return self.truth is not None and answer_matches(self.answer, self.truth)


def _params_file(path: Path, model: Path) -> Path:
    path.write_text("\n".join([
        "/**:", "  ros__parameters:", f'    model_path: "{model}"', "    cameras: [front]",
        # The bag is replayed with the stamps it was recorded with (seconds before the replay starts) and no
        # /clock, so frames are judged by when they arrive.
        "    frame_age_from: arrival", "    max_frame_age_s: 2.0", "    max_new_tokens: 24", "    caption_rate_hz: 0.5",
        "    caption_prompt: \"Describe the scene.\"", "    caption_max_new_tokens: 32"]) + "\n")
    return path


def _record(scenes: list[Scene], seconds_per_scene: float, bag: Path, start_ns: int) -> dict[int, int]:
    """A 10 Hz stream, each scene held for seconds_per_scene; returns stamp -> scene number."""
    frames, by_stamp = [], {}
    per_scene = int(seconds_per_scene * FPS)
    for k, scene in enumerate(scenes):
        for i in range(per_scene):
            stamp = start_ns + (k * per_scene + i) * 10**9 // FPS
            frames.append(CameraFrame(TOPIC, stamp, scene.image, "front_camera_optical_frame"))
            by_stamp[stamp] = k
    shutil.rmtree(bag, ignore_errors=True)  # a re-run replaces the previous demo's bag
    write_camera_bag(bag, frames, "mcap")
    return by_stamp


def _annotate(scene: Scene, asked: list[Asked], path: Path) -> None:
    image = Image.fromarray(scene.image).convert("RGB")
    panel = Image.new("RGB", (image.width, 18 * (len(asked) + 1) + 8), (20, 20, 24))
    draw = ImageDraw.Draw(panel)
    for i, a in enumerate(asked):
        mark = "OK " if a.correct else "XX "
        draw.text((6, 4 + 18 * i), f"{mark}{a.qa.question} -> {a.answer!r} (truth {a.truth!r})",
                  fill=(120, 230, 120) if a.correct else (240, 110, 110))
    draw.text((6, 4 + 18 * len(asked)), f"caption truth: {scene.caption}", fill=(200, 200, 200))
    out = Image.new("RGB", (image.width, image.height + panel.height))
    out.paste(image, (0, 0))
    out.paste(panel, (0, image.height))
    out.save(path)


def run(model: Path, out: Path, num_scenes: int, seed: int, seconds_per_scene: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = isolated_ros_env(tmp_dir=out / "ros")
    os.environ.update(env)  # this process is the client: same isolated domain

    import rclpy
    from rclpy.action import ActionClient
    from rclpy.executors import MultiThreadedExecutor

    from ..action import AskScene as AskSceneAction
    from ..msg import SceneCaption
    from ..srv import AskScene

    scenes = [make_scene(seed, i, size=FRAME_SIZE) for i in range(num_scenes)]
    start_ns = time.time_ns()
    by_stamp = _record(scenes, seconds_per_scene, out / "demo_bag", start_ns)
    print(f"recorded {len(by_stamp)} frames of {num_scenes} scenes into {out / 'demo_bag'} (MCAP)")

    log = open(out / "node.log", "w")
    node_proc = subprocess.Popen([sys.executable, "-m", "mobilevlm_ros.node", "--ros-args", "--params-file",
                                  str(_params_file(out / "demo.yaml", model)), "-r", f"__ns:={NAMESPACE}"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    rclpy.init()
    client = rclpy.create_node("mobilevlm_demo_client")
    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(client)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    captions: list[SceneCaption] = []
    client.create_subscription(SceneCaption, f"{NAMESPACE}/caption", captions.append, 10)
    ask = client.create_client(AskScene, f"{NAMESPACE}/ask_scene")
    action = ActionClient(client, AskSceneAction, f"{NAMESPACE}/ask_scene")
    replay = None
    try:
        print(f"starting mobilevlm_node with {model} ...")
        deadline = time.monotonic() + 180
        while not ask.service_is_ready():
            if node_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node did not come up:\n{(out / 'node.log').read_text()}")
            time.sleep(0.1)
        action.wait_for_server(timeout_sec=60)
        replay = subprocess.Popen([sys.executable, "-m", "mobilevlm_ros.bags", str(out / "demo_bag")], env=env,
                                  stdout=subprocess.DEVNULL)

        def wait(future, timeout=120.0):
            done = threading.Event()
            future.add_done_callback(lambda _: done.set())
            if not done.wait(timeout):
                raise RuntimeError("no answer within 120 s")
            return future.result()

        def scene_of(header) -> Scene | None:
            k = by_stamp.get(header.stamp.sec * 10**9 + header.stamp.nanosec)
            return None if k is None else scenes[k]

        asked: list[Asked] = []
        for k, scene in enumerate(scenes):
            # Wait until the node's newest frame shows scene k (the replay runs on its own clock).
            probe_until = time.monotonic() + seconds_per_scene * (num_scenes + 2) + 30
            while True:
                probe = wait(ask.call_async(AskScene.Request(question="Describe the scene.", max_new_tokens=1,
                                                             temperature=-1.0)))
                shown = by_stamp.get(probe.image_header.stamp.sec * 10**9 + probe.image_header.stamp.nanosec)
                if probe.success and shown is not None and shown >= k:
                    break
                if time.monotonic() > probe_until:
                    raise RuntimeError(f"the node never saw scene {k}: {probe.error_code} {probe.error_message}")
                time.sleep(0.05)
            questions = scene.qa[:3]
            for i, qa in enumerate(questions):
                if i < len(questions) - 1:
                    r = wait(ask.call_async(AskScene.Request(question=qa.question, temperature=-1.0)))
                    via, pieces = "service", None
                else:  # the last question of each scene streams through the action
                    pieces = []
                    goal = AskSceneAction.Goal(question=qa.question, temperature=-1.0)
                    handle = wait(action.send_goal_async(goal, feedback_callback=lambda f: pieces.append(
                        f.feedback.text_delta)))
                    r = wait(handle.get_result_async()).result
                    via = f"action, {len(pieces)} feedback msgs"
                entry = Asked(qa, via, r.answer, scene_of(r.image_header), r.error_code,
                              {"vision": r.vision_ms, "prefill": r.prefill_ms, "decode": r.decode_ms,
                               "total": r.total_ms})
                asked.append(entry)
                status = ("OK " if entry.correct else "XX ") if not r.error_code else f"{r.error_code} "
                print(f"[scene {k}] {status}Q: {qa.question}\n           A: {r.answer!r}   truth: {entry.truth!r}"
                      f"   ({via}; vision {r.vision_ms:.0f} ms, prefill {r.prefill_ms:.0f} ms, "
                      f"decode {r.decode_ms:.0f} ms, total {r.total_ms:.0f} ms)")
            _annotate(scene, [a for a in asked if a.scene is scene], out / f"scene_{k}.png")
        replay.wait(timeout=seconds_per_scene * num_scenes + 60)
        print("\ncaptions published on /demo/caption:")
        for caption in captions[:5]:
            scene = scene_of(caption.header)
            print(f"  [{caption.header.stamp.sec}.{caption.header.stamp.nanosec:09d}] {caption.caption!r}"
                  f"   truth: {scene.caption if scene else '?'!r}   ({caption.latency_ms:.0f} ms)")
        correct = sum(a.correct for a in asked)
        print(f"\n{correct}/{len(asked)} answers match the ground truth; annotated frames in {out}/scene_*.png")
        return 0
    finally:
        if replay is not None and replay.poll() is None:
            replay.kill()
        node_proc.send_signal(2)
        try:
            node_proc.wait(30)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        log.close()
        executor.shutdown()
        spinner.join(5)  # a spin thread still inside rclpy at interpreter exit aborts the process
        client.destroy_node()
        rclpy.try_shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mobilevlm demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="default: the bundled demo model")
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--seconds-per-scene", type=float, default=4.0)
    args = parser.parse_args(argv)
    try:
        return run(args.model, args.out, args.scenes, args.seed, args.seconds_per_scene)
    except RuntimeError as e:
        print(f"mobilevlm demo: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
