"""The commands users meet the package through, run for real (issue 18): `ros2 launch mobilevlm_ros ...`,
`ros2 service call`, `ros2 action send_goal`, `ros2 topic pub` / `echo`, `ros2 lifecycle get` / `set`, `ros2 run`,
against the package as the ament index finds it (scripts/setup_ros.sh lays build/ros/install out like a colcon
build; on a ROS 2 install, the sourced colcon workspace).

Every command is a real process in its own process group (as a terminal runs a foreground job), stopped where it
does not end by itself with SIGINT to that group (Ctrl-C), in an isolated DDS environment (mobilevlm_ros.rosenv:
localhost discovery, a domain of its own per launch, logs in a temp dir). Output is unbuffered and waited on with
generous timeouts, never fixed sleeps. One launch serves all the checks it can; the ros2 daemon that the CLI verbs
start is stopped at the end of each launch's checks.

Without a ros2 toolset (no `ros2`, or the package not in the ament index) the tests skip with the reason; under
CI=true that is a failure (test/requirements.py).
"""
from __future__ import annotations

import ast
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHECKPOINTS
from mobilevlm_ros.demo import DEFAULT_MODEL_DIR
from mobilevlm_ros.demo.scenes import answer_matches, caption_classes, make_scene
from mobilevlm_ros.rosenv import isolated_ros_env
from requirements import missing, require_module

yaml = require_module("yaml", "what the ros2 tools print is YAML")
require_module("rclpy", "the ros2 tools run on it")

from rosgraph import wait_until  # noqa: E402 - imports rclpy

TINY_MODEL = CHECKPOINTS / "MobileVLM_V2-tiny"  # a second model: which one answered shows on /diagnostics
CAMERA_TOPIC = "/cam/image_raw"
# A demo scene at one of the demo model's camera sizes, small enough for `ros2 topic pub --stdin` to parse quickly.
SCENE = make_scene(20241, 3, size=(320, 240))
CALL_TIMEOUT_S = 120.0  # a CLI call on a loaded 2-core machine: process start, discovery, the answer
START_TIMEOUT_S = 180.0  # a launch until the node serves: model loading (and kernel compilation) included
LIFECYCLE_STATE_IDS = {"unconfigured": 1, "inactive": 2, "active": 3}  # as `ros2 lifecycle get` prints them


# --- the toolset -------------------------------------------------------------------------------------------------
def ros2_executable() -> str:
    """The ros2 command these tests run: the venv's (scripts/setup_ros.sh installs it next to this Python), else a
    sourced ROS 2 install's; the package must be in the ament index either way. Skips (fails under CI) without."""
    venv_ros2 = Path(sys.executable).with_name("ros2")
    ros2 = str(venv_ros2) if venv_ros2.is_file() else shutil.which("ros2")
    if ros2 is None:
        missing("no ros2 command: neither this venv's (launch and ros2cli from third_party/ros2extra) nor a sourced "
                "ROS 2 install's", "bash scripts/setup.sh installs it")
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    if not any((Path(p) / "share" / "ament_index" / "resource_index" / "packages" / "mobilevlm_ros").is_file()
               for p in prefixes):
        missing(f"mobilevlm_ros is not in the ament index (AMENT_PREFIX_PATH={':'.join(prefixes) or 'unset'})",
                "bash scripts/setup.sh lays build/ros/install out for it; on a ROS 2 install, colcon build and "
                "source install/setup.bash")
    return ros2


@pytest.fixture(scope="module")
def ros2() -> str:
    return ros2_executable()


# --- processes ---------------------------------------------------------------------------------------------------
class Command:
    """One command in its own process group (as a terminal runs a foreground job), output in a log file."""

    def __init__(self, args: list[str], env: dict, log_path: Path, stdin_path: Path | None = None):
        self.args = args
        self.log_path = log_path
        with open(log_path, "wb") as log, open(stdin_path or os.devnull, "rb") as stdin:
            self.proc = subprocess.Popen(args, env=env, stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout: float = CALL_TIMEOUT_S) -> re.Match:
        """The first match of the regular expression in the output; fails early if the command ended without."""
        def found():
            match = re.search(pattern, self.output(), re.MULTILINE)
            if match is None and self.proc.poll() is not None:
                match = re.search(pattern, self.output(), re.MULTILINE)  # written just before it ended
                if match is None:
                    raise AssertionError(f"{self} ended ({self.proc.returncode}) without {pattern!r}:\n"
                                         f"{self.output()[-4000:]}")
            return match
        return wait_until(found, timeout, interval=0.1, what=f"{pattern!r} from {self}")

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the whole process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float = CALL_TIMEOUT_S, while_running: Command | None = None) -> int:
        """The exit code; fails at once if ``while_running`` (the launch this command talks to) ends first."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if while_running is not None and while_running.proc.poll() is not None:
                raise AssertionError(f"{while_running} ended ({while_running.proc.returncode}) while {self} ran:\n"
                                     f"{while_running.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self} still running after {timeout} s:\n{self.output()[-4000:]}")
            time.sleep(0.1)
        return self.proc.returncode

    def stop(self) -> None:
        """Clean-up whatever happened: Ctrl-C, then SIGKILL to the group if it is still there after 30 s."""
        if self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)

    def __str__(self) -> str:
        return " ".join(self.args[1:4] if Path(self.args[0]).name == "ros2" else self.args[:3])


class Graph:
    """An isolated DDS domain and the commands run in it."""

    def __init__(self, ros2: str, tmp_path: Path):
        self.ros2 = ros2
        self.tmp_path = tmp_path
        # PYTHONUNBUFFERED: the CLI's prints reach the log (and the waits on them) as they happen.
        self.env = {**isolated_ros_env(tmp_dir=tmp_path), "PYTHONUNBUFFERED": "1"}
        self.commands: list[Command] = []
        self.launch: Command | None = None  # the `ros2 launch` the other commands talk to

    def start_launch(self, *args: str) -> Command:
        self.launch = self.start("launch", "mobilevlm_ros", *args, name="launch")
        return self.launch

    def start(self, *args: str, stdin_path: Path | None = None, name: str = "") -> Command:
        name = name or f"{len(self.commands):02d}_{'_'.join(args[:2])}"
        command = Command([self.ros2, *args], self.env, self.tmp_path / f"{name}.log", stdin_path)
        self.commands.append(command)
        return command

    def run(self, *args: str, timeout: float = CALL_TIMEOUT_S, launch_may_end: bool = False) -> tuple[int, str]:
        """Run a ros2 command to its end: (exit code, output). Fails at once if the launch ends meanwhile, unless
        the command may end it."""
        command = self.start(*args)
        return command.wait(timeout, None if launch_may_end else self.launch), command.output()

    def camera(self, topic: str = CAMERA_TOPIC, rate_hz: float = 10.0) -> Command:
        """A camera: `ros2 topic pub` of the demo scene as sensor_msgs/Image, stamped now at every publish
        (header: auto), the YAML on stdin (the pixels are too long for an argument)."""
        h, w, _ = SCENE.image.shape
        frame = self.tmp_path / "frame.yaml"
        frame.write_text(f"{{header: auto, height: {h}, width: {w}, encoding: rgb8, is_bigendian: 0, step: {3 * w}, "
                         f"data: [{','.join(map(str, SCENE.image.reshape(-1).tolist()))}]}}")
        return self.start("topic", "pub", "--rate", str(rate_hz), "--print", "0", "--stdin", topic,
                          "sensor_msgs/msg/Image", stdin_path=frame, name="camera")

    def close(self) -> None:
        for command in reversed(self.commands):
            command.stop()
        # The verbs that look at the graph (lifecycle, topic echo) started this domain's ros2 daemon.
        subprocess.run([self.ros2, "daemon", "stop"], env=self.env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT, timeout=60, start_new_session=True)


def launch_log_problems(output: str) -> list[str]:
    """Lines of a `ros2 launch` output that show a node stopped the hard way or an error logged."""
    return [line for line in output.splitlines()
            if "SIGTERM" in line or "SIGKILL" in line or "[ERROR]" in line or "[FATAL]" in line
            or "Destroyable" in line or "Traceback" in line]


# --- parsing what the CLI prints -----------------------------------------------------------------------------------
def service_response(output: str) -> dict:
    """The top-level scalar fields of the AskScene_Response that `ros2 service call` printed."""
    text = output.split("response:", 1)[1]
    fields = {}
    for name, value in re.findall(r"\b(\w+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|True|False|[-+\d.e]+)", text):
        fields.setdefault(name, ast.literal_eval(value))
    return fields


def yaml_blocks(output: str, heading: str) -> list[dict]:
    """The messages printed after each `heading:` line by `ros2 action send_goal` (first line indented, the rest
    not), as dicts."""
    blocks = re.findall(rf"^{heading}:\n(.*?)(?=\n\n|\Z)", output, re.MULTILINE | re.DOTALL)
    return [yaml.safe_load(block.strip()) for block in blocks]


def echoed_message(output: str) -> dict:
    """The first message that `ros2 topic echo --once` printed."""
    return yaml.safe_load(output.split("\n---", 1)[0])


def inference_status(diagnostics: dict, node: str) -> dict:
    """The values of '<node>: inference' in a /diagnostics message."""
    for status in diagnostics["status"]:
        if status["name"] == f"{node}: inference":
            return {kv["key"]: kv["value"] for kv in status["values"]}
    raise AssertionError(f"no '{node}: inference' status in {diagnostics}")


# --- the checks ----------------------------------------------------------------------------------------------------
def ask(graph: Graph, ns: str, question: str, max_new_tokens: int = 0) -> Command:
    """`ros2 service call NS/ask_scene mobilevlm_ros/srv/AskScene "{question: '...'}"`, started."""
    request = f"{{question: '{question}'" + (f", max_new_tokens: {max_new_tokens}}}" if max_new_tokens else "}")
    return graph.start("service", "call", f"{ns}/ask_scene", "mobilevlm_ros/srv/AskScene", request)


def answer(graph: Graph, ns: str, question: str) -> dict:
    """Ask until the node has a frame from the camera (the first frames take discovery): the response's fields."""
    def answered():
        command = ask(graph, ns, question)
        assert command.wait(while_running=graph.launch) == 0, command.output()
        response = service_response(command.output())
        if response["error_code"] in ("NO_FRAME", "STALE_FRAME"):
            return None
        return response
    return wait_until(answered, START_TIMEOUT_S, interval=0.5, what=f"an answer from {ns}/ask_scene")


def echo_once(graph: Graph, topic: str, msg_type: str, *qos: str) -> dict:
    """The next message on topic. qos: `ros2 topic echo`'s QoS options; without them it picks its QoS from the
    publishers it has discovered when it starts (none yet: best effort and volatile)."""
    code, output = graph.run("topic", "echo", "--once", *qos, topic, msg_type)
    assert code == 0, output
    return echoed_message(output)


def goal_succeeded(graph: Graph, ns: str, goal: str) -> tuple[dict, list[dict]]:
    """`ros2 action send_goal --feedback NS/ask_scene mobilevlm_ros/action/AskScene GOAL` run to its end, which must
    be SUCCEEDED with success: the result and the feedback it printed."""
    command = graph.start("action", "send_goal", "--feedback", f"{ns}/ask_scene", "mobilevlm_ros/action/AskScene",
                          goal)
    assert command.wait(while_running=graph.launch) == 0, command.output()
    output = command.output()
    assert "Goal finished with status: SUCCEEDED" in output, output
    result = yaml_blocks(output, "Result")[0]
    assert result["success"], result
    return result, yaml_blocks(output, "Feedback")


def assert_pieces_of(feedback: list[dict], answer: str) -> None:
    """The feedback `ros2 action send_goal --feedback` printed is pieces of the answer, in order. The node publishes
    every piece (tokens_generated 1, 2, ...; its feedback QoS keeps them all), but the CLI may print only some: its
    subscription keeps the default 10 messages and may match the node's publisher only after the first pieces,
    and rclpy's ActionClient drops the goal's feedback callback once the result is in (README: take the answer
    from the result). So: each piece carries the text so far, which grows, and the result the whole answer."""
    for before, piece in zip(feedback, feedback[1:]):
        assert piece["tokens_generated"] > before["tokens_generated"], (before, piece)
        assert piece["partial_answer"].startswith(before["partial_answer"]), (before, piece)
    for piece in feedback:
        assert piece["partial_answer"].endswith(piece["text_delta"]), piece
        assert answer.startswith(piece["partial_answer"]), (piece, answer)


def wait_for_lifecycle_state(graph: Graph, node: str, state: str) -> None:
    """`ros2 lifecycle get NODE` until it says `state`: the first calls start the ros2 daemon, which needs a moment
    to discover the node ("Node not found")."""
    def reached():
        code, output = graph.run("lifecycle", "get", node)
        return code == 0 and output.split()[:1] == [state]
    wait_until(reached, START_TIMEOUT_S, interval=0.5, what=f"ros2 lifecycle get {node}: {state}")


@pytest.fixture(scope="module")
def robot7(ros2, tmp_path_factory):
    """README's command: the demo model (config/vlm.yaml as installed, no model_path:=), /robot7, a camera
    publishing the demo scene on /cam/image_raw."""
    graph = Graph(ros2, tmp_path_factory.mktemp("robot7"))
    try:
        graph.start_launch("vlm.launch.py", "namespace:=/robot7", f"camera_topic:={CAMERA_TOPIC}")
        graph.camera()
        yield graph
        assert graph.launch.proc.poll() is None, "ros2 launch ended during the tests:\n" + graph.launch.output()
    finally:
        graph.close()


def test_launch_and_service_call_answer_about_the_scene(robot7):
    """Item 1: ros2 launch ... namespace:=/robot7 camera_topic:=/cam/image_raw, a camera on /cam/image_raw (ros2
    topic pub), ros2 service call /robot7/ask_scene answering about the demo scene as its truth says."""
    qa = next(qa for qa in SCENE.qa if qa.kind == "count" and qa.subject == "cone")
    response = answer(robot7, "/robot7", qa.question)
    assert response["success"], response
    assert answer_matches(response["answer"], qa.answer), (qa.question, response["answer"], qa.answer)
    assert response["camera_id"] == "front" and response["tokens_generated"] >= 1


def test_action_on_the_demo_model_succeeds_and_topics_show_data(robot7):
    """Item 3 on the demo model: send_goal --feedback ends SUCCEEDED with the demo scene's caption, and whatever
    feedback the CLI printed is pieces of that answer (the streaming itself: the next test, on a longer answer); the
    caption and /diagnostics topics echo data; /diagnostics names the model that answers: the bundled demo model, as
    the installed config/vlm.yaml (model_path empty) and no model_path:= say (item 2)."""
    answer(robot7, "/robot7", "Describe the scene.")  # served, with a frame
    result, feedback = goal_succeeded(robot7, "/robot7", "{question: 'Describe the scene.'}")
    assert result["error_code"] == "", result
    # The demo model's caption is ~20 tokens streamed in ~0.1 s: the CLI may miss most of its pieces (assert_pieces_of
    # says why).
    assert_pieces_of(feedback, result["answer"])
    assert caption_classes(result["answer"]) == caption_classes(SCENE.caption), (result["answer"], SCENE.caption)

    caption = echo_once(robot7, "/robot7/caption", "mobilevlm_ros/msg/SceneCaption")
    assert caption["camera_id"] == "front" and caption["prompt"] == "Describe the scene.", caption
    assert caption_classes(caption["caption"]) == caption_classes(SCENE.caption), caption
    diagnostics = echo_once(robot7, "/diagnostics", "diagnostic_msgs/msg/DiagnosticArray")
    values = inference_status(diagnostics, "/robot7/mobilevlm_node")
    assert Path(values["model"]) == DEFAULT_MODEL_DIR, values


@pytest.fixture(scope="module")
def robot8(ros2, tmp_path_factory):
    """The tiny reference checkpoint by model_path:= (its answers are long: something to cancel and to interrupt),
    /robot8, a camera publishing."""
    graph = Graph(ros2, tmp_path_factory.mktemp("robot8"))
    try:
        graph.start_launch("vlm.launch.py", "namespace:=/robot8", f"camera_topic:={CAMERA_TOPIC}",
                           f"model_path:={TINY_MODEL}")
        graph.camera()
        answer(graph, "/robot8", "Describe the scene.")
        yield graph
    finally:
        graph.close()


def test_model_path_argument_loads_that_model_and_cancel_from_the_client(robot8):
    """Item 2 (model_path:= given: that model answers) and item 3's cancel: Ctrl-C on `ros2 action send_goal` while
    the answer streams cancels the goal, which ends CANCELED on the node's status topic."""
    values = inference_status(echo_once(robot8, "/diagnostics", "diagnostic_msgs/msg/DiagnosticArray"),
                              "/robot8/mobilevlm_node")
    assert Path(values["model"]) == TINY_MODEL, values

    goal = robot8.start("action", "send_goal", "--feedback", "/robot8/ask_scene", "mobilevlm_ros/action/AskScene",
                        "{question: 'Describe the scene.', max_new_tokens: 1800}")
    goal_id = goal.wait_for_output(r"^Goal accepted with ID: ([0-9a-f]{32})$").group(1)
    goal.wait_for_output(r"^Feedback:")
    goal.interrupt()
    goal.wait()
    # ros2action sends the cancel after rclpy's SIGINT handler has shut its context down, so it cannot wait for
    # the reply ("Exception while canceling goal: None"); the node's status topic says what became of the goal.
    assert "Canceling goal..." in goal.output(), goal.output()

    def goal_status():
        # The status is published once, when the goal ends, on a reliable transient-local topic (rclpy's action
        # server): asked for explicitly, so an echo that starts before it discovers the server still gets it.
        statuses = echo_once(robot8, "/robot8/ask_scene/_action/status", "action_msgs/msg/GoalStatusArray",
                             "--qos-reliability", "reliable", "--qos-durability", "transient_local")
        for status in statuses["status_list"]:
            if bytes(status["goal_info"]["goal_id"]["uuid"]).hex() == goal_id:
                return status["status"] if status["status"] >= 4 else None  # 4..6: terminal
        return None
    assert wait_until(goal_status, CALL_TIMEOUT_S, interval=0.5, what="the goal's final status") == 5  # CANCELED


def test_action_feedback_streams_the_answer(robot8):
    """Item 3's streaming: send_goal --feedback on a 300-token answer (the tiny checkpoint stops only at the limit)
    prints the answer in pieces, each the text so far, growing, ending SUCCEEDED with the whole answer."""
    result, feedback = goal_succeeded(robot8, "/robot8", "{question: 'Describe the scene.', max_new_tokens: 300}")
    assert result["tokens_generated"] == 300, result
    assert len(feedback) >= 2, (len(feedback), result)
    assert_pieces_of(feedback, result["answer"])


def test_sigint_to_launch_while_answering_answers_clients_and_exits_cleanly(robot8):
    """Item 5: Ctrl-C on `ros2 launch` while the camera publishes and questions are being answered: every waiting
    client gets its answer or SHUTTING_DOWN, and the node exits by itself within launch's SIGTERM timeout (no
    escalation to SIGTERM or SIGKILL, nothing logged as an error)."""
    goal = robot8.start("action", "send_goal", "--feedback", "/robot8/ask_scene", "mobilevlm_ros/action/AskScene",
                        "{question: 'Describe the scene.', max_new_tokens: 1800}")
    goal.wait_for_output(r"^Feedback:")
    call = ask(robot8, "/robot8", "Describe the scene.", max_new_tokens=1800)
    call.wait_for_output(r"^requester: making request")
    interrupted = time.monotonic()
    robot8.launch.interrupt()
    code = robot8.launch.wait(60)
    stopped_s = time.monotonic() - interrupted
    output = robot8.launch.output()
    assert code == 0, output
    assert not launch_log_problems(output), launch_log_problems(output)
    assert "process has finished cleanly" in output, output

    assert goal.wait() == 0 and call.wait() == 0, (goal.output(), call.output())
    result = yaml_blocks(goal.output(), "Result")[0]
    status = re.search(r"^Goal finished with status: (\w+)$", goal.output(), re.MULTILINE).group(1)
    assert (status, result["error_code"]) in (("SUCCEEDED", ""), ("ABORTED", "SHUTTING_DOWN")), goal.output()
    response = service_response(call.output())
    assert response["success"] or response["error_code"] == "SHUTTING_DOWN", response
    assert "SHUTTING_DOWN" in (result["error_code"], response["error_code"]), "nothing was in flight at SIGINT"
    print(f"ros2 launch exited {stopped_s:.1f} s after SIGINT")


def test_lifecycle_set_and_get_through_every_transition(ros2, tmp_path):
    """Item 4 with vlm_lifecycle_managed.launch.py (for a lifecycle manager: it starts unconfigured), driven by
    `ros2 lifecycle set` through configure, activate, deactivate, cleanup and shutdown, `ros2 lifecycle get`
    agreeing at each step; the params file alone sets model_path (item 2: no model_path:=), and the node configures
    that model. After shutdown the node exits and launch with it, cleanly."""
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"model_path": str(TINY_MODEL)}}}))
    graph = Graph(ros2, tmp_path)
    node = "/robot9/mobilevlm_node"
    try:
        launch = graph.start_launch("vlm_lifecycle_managed.launch.py", "namespace:=/robot9", f"params_file:={params}")
        wait_for_lifecycle_state(graph, node, "unconfigured")
        for transition, state in (("configure", "inactive"), ("activate", "active"), ("deactivate", "inactive"),
                                  ("cleanup", "unconfigured")):
            code, output = graph.run("lifecycle", "set", node, transition, timeout=START_TIMEOUT_S)
            assert code == 0 and "Transitioning successful" in output, (transition, output)
            code, output = graph.run("lifecycle", "get", node)
            assert code == 0 and output.split()[:2] == [state, f"[{LIFECYCLE_STATE_IDS[state]}]"], (transition, output)
            if transition == "configure":
                values = inference_status(echo_once(graph, "/diagnostics", "diagnostic_msgs/msg/DiagnosticArray"),
                                          node)
                assert Path(values["model"]) == TINY_MODEL, values
        code, output = graph.run("lifecycle", "set", node, "shutdown", timeout=START_TIMEOUT_S, launch_may_end=True)
        assert code == 0 and "Transitioning successful" in output, output
        assert launch.wait(60) == 0, launch.output()
        assert "process has finished cleanly" in launch.output() and not launch_log_problems(launch.output()), \
            launch.output()
    finally:
        graph.close()



def test_lifecycle_launch_with_autostart_serves(ros2, tmp_path):
    """Item 4's autostart launch file: vlm_lifecycle.launch.py configures and activates the node by itself (the
    name README gives: `ros2 lifecycle get /robot10/mobilevlm_node` says active), and it answers; Ctrl-C stops it
    cleanly."""
    graph = Graph(ros2, tmp_path)
    try:
        launch = graph.start_launch("vlm_lifecycle.launch.py", "namespace:=/robot10", f"camera_topic:={CAMERA_TOPIC}")
        graph.camera()
        wait_for_lifecycle_state(graph, "/robot10/mobilevlm_node", "active")
        qa = next(qa for qa in SCENE.qa if qa.kind == "color" and qa.subject == "box")
        response = answer(graph, "/robot10", qa.question)
        assert response["success"] and answer_matches(response["answer"], qa.answer), (response, qa.answer)
        launch.interrupt()
        assert launch.wait(60) == 0, launch.output()
        assert not launch_log_problems(launch.output()), launch.output()
    finally:
        graph.close()


def test_bad_parameter_fails_every_way_of_starting_the_node(ros2, tmp_path):
    """Item 7: a bad parameter makes `mobilevlm_node` (the console script), `ros2 run mobilevlm_ros mobilevlm_node`
    (the launcher a colcon build installs) and `ros2 launch mobilevlm_ros vlm.launch.py` exit non-zero, with the
    message in their output."""
    message = "dtype 'int3': expected one of float32, bfloat16, float16"
    params = tmp_path / "bad.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"dtype": "int3"}}}))
    graph = Graph(ros2, tmp_path)
    try:
        starts = {
            "ros2 run": graph.start("run", "mobilevlm_ros", "mobilevlm_node", "--ros-args", "-p", "dtype:=int3"),
            "ros2 launch": graph.start("launch", "mobilevlm_ros", "vlm.launch.py", f"params_file:={params}"),
        }
        console_script = Path(sys.executable).with_name("mobilevlm_node")  # pip's (setup.py), where installed
        if console_script.is_file():
            starts["console script"] = Command([str(console_script), "--ros-args", "-p", "dtype:=int3"], graph.env,
                                               tmp_path / "console_script.log")
            graph.commands.append(starts["console script"])
        for way, command in starts.items():
            code = command.wait(START_TIMEOUT_S)
            assert code != 0 and message in command.output(), (way, code, command.output())
    finally:
        graph.close()
