"""Batching through the node over real DDS: two and four cameras replayed from one bag, the captions of all caption
cameras of a tick run as one batch and each carries its own frame's header and the caption its image gets alone,
and questions sent at once to different cameras are answered as alone."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image as PILImage

from requirements import require_module

rclpy = require_module("rclpy")

from conftest import CHECKPOINTS, REFERENCE  # noqa: E402
from mobilevlm_ros.bags import CameraFrame, write_camera_bag  # noqa: E402
from mobilevlm_ros.model import MobileVLMPipeline, SamplingParams  # noqa: E402
from mobilevlm_ros.srv import AskScene  # noqa: E402
from rosgraph import Graph, interrupt, wait_until  # noqa: E402
from test_node import QUESTION, stamp_ns, start_robot  # noqa: E402

MODEL = CHECKPOINTS / "MobileVLM_V2-tiny"
IMAGES = [np.asarray(PILImage.open(REFERENCE / "images" / name).convert("RGB")) for name in
          ("img0_street_500x300_rgb.png", "img1_robot_240x420_rgba.png", "img2_sign_237x151_gray.png", "demo.jpg")]
CAPTION_PROMPT = "Describe the scene."
CAPTION_TOKENS = 6
ANSWER_TOKENS = 8


@pytest.fixture(scope="module")
def alone():
    """What each camera's image gets asked alone, through the same pipeline the node loads."""
    pipeline = MobileVLMPipeline.load(MODEL)
    captions = [pipeline.ask(image, CAPTION_PROMPT, SamplingParams(max_new_tokens=CAPTION_TOKENS)).text
                for image in IMAGES]
    answers = [pipeline.ask(image, QUESTION, SamplingParams(max_new_tokens=ANSWER_TOKENS)).text for image in IMAGES]
    return captions, answers


@pytest.mark.parametrize("cameras", [2, 4])
def test_cameras_from_one_bag_are_captioned_and_answered_in_batches(tmp_path, alone, cameras):
    ids = [f"cam{i}" for i in range(cameras)]
    ns = f"/batch{cameras}"
    start = 1_700_000_000 * 10**9
    frames = [CameraFrame(f"{ns}/{camera}/image_raw", start + k * 100_000_000 + i, IMAGES[i], f"{camera}_optical")
              for k in range(20) for i, camera in enumerate(ids)]
    bag = write_camera_bag(tmp_path / "cameras", frames, "mcap")
    stamps = {f.stamp_ns for f in frames}
    graph = Graph(tmp_path)
    replay = None
    try:
        robot = start_robot(graph, {
            "model_path": str(MODEL), "cameras": ids, "caption_cameras": ids, "max_batch": 4,
            "frame_age_from": "arrival",  # the bag keeps its recorded stamps and is replayed without /clock
            "max_frame_age_s": 5.0, "max_new_tokens": ANSWER_TOKENS, "caption_rate_hz": 1.0,
            "caption_prompt": CAPTION_PROMPT, "caption_max_new_tokens": CAPTION_TOKENS,
            "diagnostics_period_s": 0.5}, ns)
        replay = subprocess.Popen([sys.executable, "-m", "mobilevlm_ros.bags", str(bag), "--loop"], env=graph.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        # Captions: every camera's, each about one of its own frames and equal to its image's caption alone.
        def captioned() -> bool:
            seen = {c.camera_id for _, c in list(robot.captions)}
            return seen == set(ids)
        wait_until(captioned, 120, what="a caption of every camera")
        for _, caption in list(robot.captions):
            i = ids.index(caption.camera_id)
            assert caption.header.frame_id == f"{caption.camera_id}_optical" and stamp_ns(caption.header) in stamps
            assert caption.caption == alone[0][i] and caption.prompt == CAPTION_PROMPT
        # One batch per tick: each tick's captions ran together, so none of them was skipped for a busy worker.
        status = robot.wait_for_status(lambda s: int(s.values["captions"]) >= cameras, "the captions counted")
        assert status.values["captions_skipped"] == "0"

        # Questions to every camera at once: each answered about its own camera as alone.
        requests = [AskScene.Request(question=QUESTION, camera_id=camera, max_new_tokens=ANSWER_TOKENS,
                                     temperature=0.0) for camera in ids]

        def all_answered():
            futures = [robot.ask.call_async(r) for r in requests]
            responses = [graph.result(f) for f in futures]
            return responses if all(r.success for r in responses) else None
        responses = wait_until(all_answered, 120, interval=0.2, what="answers from every camera at once")
        for i, response in enumerate(responses):
            assert response.camera_id == ids[i] and response.image_header.frame_id == f"{ids[i]}_optical"
            assert response.answer == alone[1][i] and response.tokens_generated == ANSWER_TOKENS
    finally:
        if replay is not None:
            interrupt(replay)
        graph.close()
