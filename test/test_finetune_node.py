"""mobilevlm_node over real DDS serving the demo model with the proof's LoRA adapter (parameter `adapter`): the new
stop-or-go question answered about camera frames, in a separate process, as a robot would ask it."""
from __future__ import annotations

import numpy as np

from requirements import require_module

rclpy = require_module("rclpy")

from mobilevlm_ros.demo.scenes import answer_matches, make_scene, stop_or_go  # noqa: E402
from mobilevlm_ros.finetune.demo import SHIPPED_ADAPTER  # noqa: E402
from rosgraph import Graph  # noqa: E402
from test_node import Robot, answer_about, image_msg, start_robot  # noqa: E402

PARAMS = {"model_path": "", "adapter": str(SHIPPED_ADAPTER), "cameras": ["front"], "frame_age_from": "arrival",
          "max_frame_age_s": 5.0, "max_new_tokens": 4, "caption_rate_hz": 0.0}


def test_node_with_the_adapter_answers_the_new_question_over_dds(tmp_path):
    """The node, started with model_path empty (the bundled demo model) and adapter set, answers the stop-or-go
    question it was fine-tuned on for held-out scenes sent as camera frames: at least 9 of 10 right, and both
    answers occur."""
    graph = Graph(tmp_path)
    try:
        robot: Robot = start_robot(graph, PARAMS, "/robot23")
        rng = np.random.default_rng(5)
        right, truths = 0, set()
        for index in range(10):
            scene = make_scene(9090, index)
            qa = stop_or_go(scene, rng)
            truths.add(qa.answer)
            with robot.streaming("front", lambda stamp: image_msg(scene.image, stamp)) as stamps:
                response = answer_about(robot, stamps, f"an answer about scene {index}", question=qa.question)
            right += answer_matches(response.answer, qa.answer)
        assert truths == {"stop", "go"}
        assert right >= 9, right
        assert robot.process.proc.poll() is None
        assert "adapter:" in robot.process.log() and "merged" in robot.process.log()
    finally:
        graph.close()
