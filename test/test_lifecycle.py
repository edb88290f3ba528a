"""mobilevlm_lifecycle_node over real DDS: every transition driven from this process through the node's lifecycle
services (lifecycle_msgs ChangeState / GetState), parameters changed through set_parameters, requests through the
real ask_scene service and action.

Requests in flight during a deactivate or a shutdown are held there by the scripted model
(ros_helpers/scripted_node.py --lifecycle: the same node; a question marked [hold] stays in flight until cancelled,
[hold:NAME] until the test releases it), so each transition meets exactly the requests the test means it to.
"""
from __future__ import annotations

import shutil
import signal

import pytest

from requirements import require_module

rclpy = require_module("rclpy")
require_module("lifecycle_msgs")

from action_msgs.msg import GoalStatus  # noqa: E402
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from conftest import CHECKPOINTS  # noqa: E402
from mobilevlm_ros.action import AskScene as AskSceneAction  # noqa: E402
from mobilevlm_ros.manifest import write_manifest  # noqa: E402
from mobilevlm_ros.srv import AskScene  # noqa: E402
from rosgraph import LIFECYCLE_EXE, SCRIPTED_LIFECYCLE_EXE, Graph, NodeProcess, wait_until, write_params  # noqa: E402
from ros_helpers.scripted_node import RELEASE_DIR_ENV  # noqa: E402
from test_node import QUESTION, Robot  # noqa: E402

HOLD = "[hold] "  # scripted_node.py: stays in flight until cancelled
PARAMS = {
    "model_path": "/nonexistent/model",
    "cameras": ["front"],
    "max_frame_age_s": 60.0,
    "max_new_tokens": 8,
    "queue_length": 3,
    "caption_rate_hz": 0.0,
    "diagnostics_period_s": 0.3,
    "deactivate_timeout_s": 5.0,
}


class LifecycleProcess(NodeProcess):
    """mobilevlm_lifecycle_node (or ``command``) in its own process, with params files (later files win)."""

    def __init__(self, env: dict, params_files: list, log_path, ros_args=(), command=LIFECYCLE_EXE):
        super().__init__(env, list(params_files), log_path, list(ros_args), command)


def start_lifecycle_node(graph: Graph, params: dict, name: str, ns: str, command=LIFECYCLE_EXE) -> LifecycleProcess:
    params_file = write_params(graph.tmp_path / f"{name}.yaml", params)
    process = LifecycleProcess(graph.env, [params_file], graph.tmp_path / f"{name}.log", ["-r", f"__ns:={ns}"],
                               command)
    graph.processes.append(process)
    return process


class Lifecycle:
    """The fleet tooling's side: lifecycle and parameter services of one node."""

    def __init__(self, graph: Graph, node: str, process: NodeProcess):
        self.graph = graph
        self.process = process
        self.change = graph.node.create_client(ChangeState, f"{node}/change_state")
        self.get = graph.node.create_client(GetState, f"{node}/get_state")
        self.params = graph.node.create_client(SetParameters, f"{node}/set_parameters")
        for client in (self.change, self.get, self.params):
            graph.wait_for_service(client, process)
        # A service is "ready" once the client's requests reach the server; the server's responses find the
        # client only when it has discovered the client's response reader too (on a loaded machine that can lag,
        # and a response sent before is lost). One get_state round trip (idempotent, retried) settles discovery
        # before the first transition is requested.
        def answered():
            if process.proc.poll() is not None:
                raise RuntimeError(f"node exited with {process.proc.returncode}:\n{process.log()}")
            try:
                return graph.result(self.get.call_async(GetState.Request()), 5.0)
            except TimeoutError:
                return None
        wait_until(answered, 120, what=f"a get_state round trip with {node}")

    def state(self) -> str:
        return self.graph.call(self.get, GetState.Request()).current_state.label

    def transition(self, transition_id: int, timeout: float = 180.0) -> bool:
        request = ChangeState.Request()
        request.transition.id = transition_id
        return self.graph.call(self.change, request, timeout).success

    def transition_async(self, transition_id: int):
        request = ChangeState.Request()
        request.transition.id = transition_id
        return self.change.call_async(request)

    def set(self, **values) -> None:
        request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg()
                                                    for k, v in values.items()])
        results = self.graph.call(self.params, request).results
        assert all(r.successful for r in results), [r.reason for r in results]


def inference_status(robot: Robot, ns: str, since: float = 0.0):
    """The newest '<ns>/mobilevlm_node: inference' status received after `since` (index into robot.diagnostics)."""
    for array in reversed(robot.diagnostics[int(since):]):
        for status in array.status:
            if status.name.endswith(f"{ns}/mobilevlm_node: inference"):
                return status
    return None


def status_values(status) -> dict:
    return {kv.key: kv.value for kv in status.values}


def answer_about_a_fresh_frame(robot: Robot, what: str):
    """Publish a frame and ask until answered: a best-effort subscription that matched just now may miss the very
    first frame, so each attempt publishes a new one. Returns the answer and the stamps published."""
    stamps = set()

    def attempt():
        stamps.add(robot.publish_front())
        response = robot.question()
        assert response.error_code in ("", "NO_FRAME"), response.error_message
        return response.success and response
    return wait_until(attempt, interval=0.2, what=what), stamps


def goal(graph: Graph, robot: Robot, max_new_tokens: int, feedback: list, question: str = QUESTION):
    handle = graph.result(robot.action.send_goal_async(
        AskSceneAction.Goal(question=question, max_new_tokens=max_new_tokens, temperature=0.0),
        feedback_callback=feedback.append))
    assert handle.accepted
    return handle


@pytest.fixture()
def models(tmp_path):
    """A copy of the tiny V2 checkpoint (and the CLIP directory its config names, found next to it), with a
    manifest: the model as a rollout would deliver it."""
    root = tmp_path / "models"
    root.mkdir()
    for name in ("MobileVLM_V2-tiny", "tiny-clip-vit-patch14-336"):
        shutil.copytree(CHECKPOINTS / name, root / name)
    write_manifest(root / "MobileVLM_V2-tiny")
    return root


def test_every_transition_through_the_lifecycle_services(tmp_path, models):
    model = models / "MobileVLM_V2-tiny"
    weights = model / "pytorch_model.bin"
    good = weights.read_bytes()
    ns = "/lc1"
    graph = Graph(tmp_path)
    release = tmp_path / "release"
    release.mkdir()
    graph.env[RELEASE_DIR_ENV] = str(release)
    try:
        process = start_lifecycle_node(graph, PARAMS, "lc1", ns, SCRIPTED_LIFECYCLE_EXE)
        lc = Lifecycle(graph, f"{ns}/mobilevlm_node", process)
        robot = Robot(graph, ns)
        graph.wait_for_service(robot.ask, process)
        assert lc.state() == "unconfigured"
        refused = robot.question()
        assert (refused.success, refused.error_code) == (False, "NOT_ACTIVE") and "unconfigured" in \
            refused.error_message

        # configure fails: bad model path; the node stays unconfigured, the reason in the log and /diagnostics
        assert lc.transition(Transition.TRANSITION_CONFIGURE) is False
        assert lc.state() == "unconfigured"
        assert "configure failed: model_path '/nonexistent/model' is not a directory" in process.log()
        mark = len(robot.diagnostics)
        status = wait_until(lambda: (s := inference_status(robot, ns, mark)) and "configure failed" in s.message
                            and s, what="the configure failure on /diagnostics")
        assert status.level == DiagnosticStatus.ERROR and "/nonexistent/model" in status.message

        # configure fails: a corrupted weights file (same size, one byte changed) caught by the manifest
        corrupted = bytearray(good)
        corrupted[len(corrupted) // 2] ^= 0xFF
        weights.write_bytes(bytes(corrupted))
        lc.set(model_path=str(model))
        assert lc.transition(Transition.TRANSITION_CONFIGURE) is False
        assert lc.state() == "unconfigured"
        log = process.log()
        assert "configure failed:" in log and "pytorch_model.bin: sha256" in log and "differs from the manifest" \
            in log

        # configure fails: not enough memory for the model once memory_reserve_mb is kept free
        weights.write_bytes(good)
        lc.set(memory_reserve_mb=10**9)
        assert lc.transition(Transition.TRANSITION_CONFIGURE) is False
        assert "configure failed: refusing to load: model needs about" in process.log()
        assert "minus memory_reserve_mb 1000000000" in process.log()

        # configure succeeds once the copy is repaired and the reserve reasonable
        lc.set(memory_reserve_mb=0)
        assert lc.transition(Transition.TRANSITION_CONFIGURE) is True
        assert lc.state() == "inactive"
        assert f"manifest: verified 6 files in {model}" in process.log()
        inactive = robot.question()
        assert inactive.error_code == "NOT_ACTIVE" and "inactive" in inactive.error_message

        # activate: intake, service and action serve
        assert lc.transition(Transition.TRANSITION_ACTIVATE) is True
        assert lc.state() == "active"
        answer, stamps = answer_about_a_fresh_frame(robot, "an answer once active")
        assert answer.image_header.stamp.sec * 10**9 + answer.image_header.stamp.nanosec in stamps
        values = status_values(wait_until(lambda: (s := inference_status(robot, ns, len(robot.diagnostics) - 1))
                                          and s.message == "serving" and s, what="serving on /diagnostics"))
        assert values["lifecycle_state"] == "active" and values["manifest"].startswith("verified 6 files")

        # deactivate with a request in flight that finishes within deactivate_timeout_s: answered normally. The
        # request is held until the deactivate has closed the door to new requests, then released.
        lc.set(deactivate_timeout_s=120.0)
        feedback = []
        handle = goal(graph, robot, 300, feedback, "[hold:finish] " + QUESTION)
        wait_until(lambda: feedback, what="generation under way")
        deactivating = lc.transition_async(Transition.TRANSITION_DEACTIVATE)
        wait_until(lambda: robot.question().error_code == "NOT_ACTIVE", what="new requests refused while deactivating")
        assert not deactivating.done()  # still waiting for the request in flight
        (release / "finish").touch()
        assert graph.result(deactivating, 180).success is True
        finished = graph.result(handle.get_result_async())
        assert finished.status == GoalStatus.STATUS_SUCCEEDED and finished.result.tokens_generated == 300
        assert lc.state() == "inactive"
        assert "deactivated: 1 request(s) were in flight, 1 finished, 0 cancelled" in process.log()
        # ... and new requests are refused at once, by the service and the action
        assert robot.question().error_code == "NOT_ACTIVE"
        refused_goal = graph.result(goal(graph, robot, 8, []).get_result_async())
        assert refused_goal.status == GoalStatus.STATUS_ABORTED and refused_goal.result.error_code == "NOT_ACTIVE"

        # deactivate with requests in flight that take longer (held until cancelled): cancelled after the timeout,
        # answered NOT_ACTIVE
        assert lc.transition(Transition.TRANSITION_ACTIVATE) is True
        answer_about_a_fresh_frame(robot, "an answer after re-activation")
        lc.set(deactivate_timeout_s=0.5)
        feedback = []
        handle = goal(graph, robot, 1700, feedback, HOLD + QUESTION)
        wait_until(lambda: feedback, what="a long generation under way (held)")
        request = AskScene.Request(question=QUESTION, max_new_tokens=4, temperature=-1.0)
        queued = [robot.ask.call_async(request) for _ in range(2)]
        mark = len(robot.diagnostics)
        wait_until(lambda: (s := inference_status(robot, ns, mark)) and status_values(s)["queue_depth"] == "2",
                   what="two requests queued behind the long one")
        assert lc.transition(Transition.TRANSITION_DEACTIVATE) is True
        long_result = graph.result(handle.get_result_async())
        assert long_result.status == GoalStatus.STATUS_ABORTED
        assert long_result.result.error_code == "NOT_ACTIVE" and not long_result.result.success
        assert "deactivate_timeout_s 0.5" in long_result.result.error_message
        assert 0 < long_result.result.tokens_generated < 1700
        for response in [graph.result(f) for f in queued]:
            assert response.error_code == "NOT_ACTIVE" and "deactivated" in response.error_message
        assert "3 request(s) were in flight, 0 finished, 3 cancelled" in process.log()

        # cleanup frees the model
        assert lc.transition(Transition.TRANSITION_CLEANUP) is True
        assert lc.state() == "unconfigured"
        assert "cleaned up: model released" in process.log() and "still referenced" not in process.log()
        assert robot.question().error_code == "NOT_ACTIVE"

        # configure again, activate, then shut down from active with requests in flight: all answered
        assert lc.transition(Transition.TRANSITION_CONFIGURE) is True
        assert lc.transition(Transition.TRANSITION_ACTIVATE) is True
        answer_about_a_fresh_frame(robot, "an answer after reconfiguring")
        feedback = []
        handle = goal(graph, robot, 1700, feedback, HOLD + QUESTION)
        wait_until(lambda: feedback, what="generation under way before shutdown (held)")
        queued = robot.ask.call_async(request)
        mark = len(robot.diagnostics)
        wait_until(lambda: (s := inference_status(robot, ns, mark)) and status_values(s)["queue_depth"] == "1",
                   what="a request queued before shutdown")
        assert lc.transition(Transition.TRANSITION_ACTIVE_SHUTDOWN) is True
        shut = graph.result(handle.get_result_async())
        assert shut.status == GoalStatus.STATUS_ABORTED and shut.result.error_code == "SHUTTING_DOWN"
        assert graph.result(queued).error_code == "SHUTTING_DOWN"
        assert process.proc.wait(60) == 0, process.log()
    finally:
        weights.write_bytes(good)
        graph.close()


def test_shutdown_from_unconfigured_and_inactive(tmp_path, models):
    """Shutdown through the service from unconfigured, SIGTERM from inactive: both answer, both exit 0."""
    graph = Graph(tmp_path)
    try:
        first = start_lifecycle_node(graph, PARAMS, "lc2", "/lc2")
        second = start_lifecycle_node(graph, {**PARAMS, "model_path": str(models / "MobileVLM_V2-tiny")}, "lc3",
                                      "/lc3")
        lc2 = Lifecycle(graph, "/lc2/mobilevlm_node", first)
        lc3 = Lifecycle(graph, "/lc3/mobilevlm_node", second)
        robot3 = Robot(graph, "/lc3")
        assert lc2.transition(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN) is True
        assert first.proc.wait(60) == 0, first.log()

        assert lc3.transition(Transition.TRANSITION_CONFIGURE) is True
        assert lc3.state() == "inactive"
        graph.wait_for_service(robot3.ask, second)
        assert robot3.question().error_code == "NOT_ACTIVE"
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(60) == 0, second.log()
        assert "shutting down from inactive" in second.log()
    finally:
        graph.close()


@pytest.mark.parametrize("build_engines", [False, True], ids=["torch-fallback", "engine-built"])
def test_autostart_with_an_engine_backend(tmp_path, models, build_engines):
    """autostart configures and activates by itself, asked for the onnxruntime backend. With build_engines the
    engine is built at configure and serves the answers, and the torch vision tower it replaces is released
    (logged); without it (and nothing in the cache) the torch vision path serves, logged and on /diagnostics."""
    if build_engines:
        require_module("onnxruntime", "the engine backend of this case")
        require_module("onnx", "the engine backend of this case")
    graph = Graph(tmp_path)
    ns = f"/lc{4 + build_engines}"
    try:
        process = start_lifecycle_node(graph, {**PARAMS, "model_path": str(models / "MobileVLM_V2-tiny"),
                                               "autostart": True, "backend": "onnxruntime",
                                               "build_engines": build_engines,
                                               "engines_dir": str(tmp_path / "engines")}, ns[1:], ns)
        robot = Robot(graph, ns)
        graph.wait_until_serving(robot.ask, process)  # the service exists before autostart has configured
        answer, _ = answer_about_a_fresh_frame(robot, "an answer after autostart")
        assert answer.tokens_generated == 8
        status = wait_until(lambda: (s := inference_status(robot, ns, len(robot.diagnostics) - 1))
                            and "serving" in s.message and s, what="diagnostics")
        values = status_values(status)
        assert values["backend_requested"] == "onnxruntime"
        if build_engines:
            assert values["backend"] == "onnxruntime"
            assert "torch vision tower released" in process.log()
        else:
            assert values["backend"] == "torch" and "build_engines is false" in values["vision_fallback"]
            assert status.level == DiagnosticStatus.WARN and "vision on torch" in status.message
            assert "falling back to torch" in process.log()
    finally:
        graph.close()
    assert process.proc.returncode == 0, process.log()
