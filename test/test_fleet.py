"""Many robots on one graph: three mobilevlm_lifecycle_node processes in one DDS domain, namespaced /robot1..3,
each started the way deploy/mobilevlm@.service starts it (config/fleet/common.yaml, then the robot's own file), and
interleaved requests to all three answered by the right robot."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from requirements import require_module

rclpy = require_module("rclpy")

from action_msgs.msg import GoalStatus  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from conftest import CHECKPOINTS  # noqa: E402
from mobilevlm_ros.action import AskScene as AskSceneAction  # noqa: E402
from mobilevlm_ros.manifest import write_manifest  # noqa: E402
from mobilevlm_ros.srv import AskScene  # noqa: E402
from rosgraph import Graph, _yaml, wait_until  # noqa: E402
from test_lifecycle import LifecycleProcess  # noqa: E402
from test_node import QUESTION, STREET, image_msg  # noqa: E402

FLEET = Path(__file__).resolve().parent.parent / "config" / "fleet"
ROBOTS = {1: "front/image_raw", 2: "front/image_raw", 3: "camera/color/image_raw"}  # each robot's front topic


def robot_overrides(path: Path, robot: int, params: dict) -> Path:
    """What a test machine changes on top of the fleet files: the tiny model, CPU, torch."""
    path.write_text("\n".join([f"/robot{robot}/mobilevlm_node:", "  ros__parameters:", *_yaml(params, 4)]) + "\n")
    return path


def test_three_robots_in_one_domain_answer_interleaved_requests(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("MobileVLM_V2-tiny", "tiny-clip-vit-patch14-336"):
        shutil.copytree(CHECKPOINTS / name, models / name)
    write_manifest(models / "MobileVLM_V2-tiny")  # the fleet config requires one
    graph = Graph(tmp_path)
    stop = threading.Event()
    publisher_thread = None
    try:
        processes = {}
        for robot in ROBOTS:
            override = robot_overrides(tmp_path / f"robot{robot}_test.yaml", robot, {
                "model_path": str(models / "MobileVLM_V2-tiny"), "device": "cpu", "dtype": "float32",
                "backend": "torch", "engines_dir": str(tmp_path / "engines"), "memory_reserve_mb": 0,
                "max_frame_age_s": 5.0, "max_new_tokens": 8, "caption_rate_hz": 0.0,
                "diagnostics_period_s": 0.5})
            processes[robot] = LifecycleProcess(
                graph.env, [FLEET / "common.yaml", FLEET / f"robot{robot}.yaml", override],
                tmp_path / f"robot{robot}.log", ["-r", f"__ns:=/robot{robot}"])
            graph.processes.append(processes[robot])

        node = graph.node
        asks = {r: node.create_client(AskScene, f"/robot{r}/ask_scene", qos_profile=QoSProfile(depth=100))
                for r in ROBOTS}
        actions = {r: ActionClient(node, AskSceneAction, f"/robot{r}/ask_scene") for r in ROBOTS}
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        cameras = {r: node.create_publisher(Image, f"/robot{r}/{topic}", qos) for r, topic in ROBOTS.items()}
        diagnostics: list[DiagnosticArray] = []
        node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 50)
        for robot in ROBOTS:
            graph.wait_for_service(asks[robot], processes[robot], timeout=240)
            assert actions[robot].wait_for_server(timeout_sec=120)
            wait_until(lambda r=robot: cameras[r].get_subscription_count() > 0, 120, what=f"robot{robot} camera")

        # Each robot sees its own camera: frame_id robotN_front, stamps whose last digit is N.
        stamps: dict[int, set[int]] = defaultdict(set)

        def publish():
            while not stop.wait(0.2):
                for robot, publisher in cameras.items():
                    stamp = time.time_ns() // 10 * 10 + robot
                    stamps[robot].add(stamp)
                    msg = image_msg(STREET, stamp)
                    msg.header.frame_id = f"robot{robot}_front"
                    publisher.publish(msg)

        publisher_thread = threading.Thread(target=publish, daemon=True)
        publisher_thread.start()
        request = AskScene.Request(question=QUESTION, max_new_tokens=8, temperature=-1.0)
        outcomes: dict[int, list[str]] = defaultdict(list)  # what each probe got: told apart if it never serves

        def serving(robot: int) -> bool:
            try:  # short timeouts, retried: a response sent before discovery has fully settled can be lost
                response = graph.call(asks[robot], request, 20)
            except TimeoutError:
                outcomes[robot].append("no response in 20 s")
                return False
            outcomes[robot].append(response.error_code or "answered")
            return response.success
        for robot in ROBOTS:  # autostart done and a frame received
            wait_until(lambda r=robot: serving(r), 240, interval=0.2, what=f"robot{robot} serving",
                       details=lambda r=robot: f"its answers: {outcomes[r]}; frames published: {len(stamps[r])}; "
                                               f"its log:\n{processes[r].log()[-3000:]}")

        # Interleaved: three rounds over the robots, plus one streamed action goal each in the middle.
        calls = []
        goals = {}
        for round_ in range(3):
            for robot in ROBOTS:
                calls.append((robot, asks[robot].call_async(request)))
                if round_ == 1:
                    goals[robot] = actions[robot].send_goal_async(AskSceneAction.Goal(
                        question=QUESTION, max_new_tokens=6, temperature=0.0))
        for robot, future in calls:
            response = graph.result(future, 180)
            assert response.success, (robot, response.error_code, response.error_message)
            header = response.image_header
            assert header.frame_id == f"robot{robot}_front", (robot, header.frame_id)
            stamp = header.stamp.sec * 10**9 + header.stamp.nanosec
            assert stamp % 10 == robot and stamp in stamps[robot]
            assert response.tokens_generated == 8
        for robot, future in goals.items():
            handle = graph.result(future, 60)
            assert handle.accepted
            result = graph.result(handle.get_result_async(), 180)
            assert result.status == GoalStatus.STATUS_SUCCEEDED
            assert result.result.image_header.frame_id == f"robot{robot}_front"
            assert result.result.tokens_generated == 6

        # Each robot's own parameter file applied: robot2 alone has a rear camera, robot3 a 1024-position context.
        assert graph.call(asks[1], AskScene.Request(question="?", camera_id="rear")).error_code == "UNKNOWN_CAMERA"
        assert graph.call(asks[2], AskScene.Request(question="?", camera_id="rear")).error_code == "NO_FRAME"
        long_question = AskScene.Request(question="1234567890" * 190, max_new_tokens=8)  # ~1940 tokens
        assert "context holds 1024" in graph.call(asks[3], long_question).error_message
        assert "context holds 2048" in graph.call(asks[1], long_question).error_message

        def inference_states():
            states = {}
            for array in diagnostics[-30:]:
                for status in array.status:
                    if status.name.endswith("mobilevlm_node: inference"):
                        values = {kv.key: kv.value for kv in status.values}
                        states[status.name.split(":")[0]] = values.get("lifecycle_state")
            return states
        wait_until(lambda: inference_states() == {f"/robot{r}/mobilevlm_node": "active" for r in ROBOTS},
                   what="three distinct robots on /diagnostics")
    finally:
        stop.set()
        if publisher_thread is not None:
            publisher_thread.join(30)
        graph.close()
    for robot, process in processes.items():
        assert process.proc.returncode == 0, process.log()
        assert "shutting down from active" in process.log()


def test_unit_files_start_what_the_build_installs(tmp_path):
    """deploy/*.service: valid for systemd, and they exec the launcher CMake installs with the fleet files."""
    root = FLEET.parent.parent
    assert "install(PROGRAMS deploy/mobilevlm_lifecycle_node DESTINATION lib/${PROJECT_NAME})" in \
        (root / "CMakeLists.txt").read_text()
    template = (root / "deploy" / "mobilevlm@.service").read_text()
    assert "install/mobilevlm_ros/lib/mobilevlm_ros/mobilevlm_lifecycle_node" in template
    assert '__ns:=/%i --params-file "$MOBILEVLM_CONFIG/common.yaml" --params-file "$MOBILEVLM_CONFIG/%i.yaml"' \
        in template
    assert "Restart=on-failure" in template and "KillSignal=SIGINT" in template
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(root / "deploy" / "mobilevlm.service", units / "mobilevlm.service")
    shutil.copy(root / "deploy" / "mobilevlm@.service", units / "mobilevlm@robot1.service")  # an instance
    for unit in sorted(units.iterdir()):
        out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "bad unit file setting" not in out.stderr, out.stderr
