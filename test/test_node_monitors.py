"""Issue 20 through the node over real DDS, with the bundled demo model (it knows the demo's road scenes, so answers
can be checked against each frame's truth): standing monitors following a replayed bag, a burst of requests while
monitors run, set_monitor, follow-up questions about a named frame (frame_stamp, FRAME_GONE), and choices over the
service and the action.

One node for the module, /robot9: ``python ros_helpers/scripted_node.py`` (the real node; a question marked
[hold:NAME] stays in flight until the test releases it) on the demo model. Monitors watch ``front`` (bag replays);
named-frame and choice tests use ``side`` (frames this test publishes), which no monitor answers about, so the frames
the node holds there are exactly the ones the test expects.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from requirements import require_module

rclpy = require_module("rclpy")

from action_msgs.msg import GoalStatus  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402

from mobilevlm_ros.action import AskScene as AskSceneAction  # noqa: E402
from mobilevlm_ros.bags import CameraFrame, write_camera_bag  # noqa: E402
from mobilevlm_ros.demo import DEFAULT_MODEL_DIR  # noqa: E402
from mobilevlm_ros.demo.scenes import CAR_COLORS, answer_matches, make_scene  # noqa: E402
from mobilevlm_ros.model import MobileVLMPipeline, SamplingParams  # noqa: E402
from mobilevlm_ros.msg import MonitorSet, SceneMonitor  # noqa: E402
from mobilevlm_ros.srv import AskScene, SetMonitor  # noqa: E402
from ros_helpers.scripted_node import RELEASE_DIR_ENV  # noqa: E402
from rosgraph import SCRIPTED_NODE_EXE, Graph, interrupt, wait_until  # noqa: E402
from test_node import image_msg, inference_values, start_robot, stamp_ns  # noqa: E402
from test_node_params import set_parameter  # noqa: E402

NS = "/robot9"
WALKER = "Is there a pedestrian on the road?"
CAR_COLOR = "What color is the car?"
COLORS = list(CAR_COLORS)
FRAME_HISTORY = 3
PARAMS = {
    "cameras": ["front", "side"],
    # The bag keeps its recorded stamps and is replayed without /clock: judge a frame's age by its arrival.
    "frame_age_from": "arrival",
    "max_frame_age_s": 60.0,
    "max_new_tokens": 8,
    "queue_length": 8,
    "caption_rate_hz": 0.0,
    "frame_history": FRAME_HISTORY,
    "prefix_cache_frames": 4,
    "diagnostics_period_s": 0.5,
    "monitors": ["walker", "car_color"],
    # rate_hz above the bag's frame rate: every frame is due, unless the worker is busy with requests.
    "monitor": {"walker": {"question": WALKER, "rate_hz": 50.0},
                "car_color": {"question": CAR_COLOR, "rate_hz": 50.0, "choices": COLORS}},
}
QUESTIONS = {"walker": (WALKER, ["yes", "no"]), "car_color": (CAR_COLOR, COLORS)}
MONITOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE)
SET_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
BAG_START_NS = 1_700_000_000 * 10**9
FRAMES_PER_SCENE = 2
FRAME_PERIOD_NS = 200_000_000  # 5 Hz


def _scenes(count: int) -> list:
    """Demo scenes of the held-out seed with exactly one car (its colour is a question with one answer), with and
    without pedestrians in turn, so the walker monitor's answer changes from scene to scene."""
    scenes, want_walker = [], True
    for index in range(1000):
        scene = make_scene(20240, index)
        if scene.count("car") == 1 and bool(scene.count("pedestrian")) == want_walker:
            scenes.append(scene)
            want_walker = not want_walker
            if len(scenes) == count:
                return scenes
    raise AssertionError("not enough scenes")


def truth(scene) -> dict[str, str]:
    car = next(o for o in scene.objects if o.cls == "car")
    return {"walker": "yes" if scene.count("pedestrian") else "no", "car_color": car.color}


SCENES = _scenes(6)


@pytest.fixture(scope="module")
def pipeline():
    """The pipeline the node loads (the demo model), for what each frame gets alone."""
    return MobileVLMPipeline.load(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def alone(pipeline):
    """Each scene's choices for each monitor, uncached; the scenes were picked so that these are the truth."""
    out = []
    for scene in SCENES:
        choices = {name: pipeline.choose(scene.image, *QUESTIONS[name]) for name in QUESTIONS}
        assert {name: c.answer for name, c in choices.items()} == truth(scene)
        out.append(choices)
    return out


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    graph = Graph(tmp_path_factory.mktemp("monitors"))
    yield graph
    graph.close()


@pytest.fixture(scope="module")
def release_dir(graph):
    release = graph.tmp_path / "release"
    release.mkdir()
    graph.env[RELEASE_DIR_ENV] = str(release)  # the node process reads it
    return release


@pytest.fixture(scope="module")
def robot(graph, release_dir):
    robot = start_robot(graph, PARAMS, NS, SCRIPTED_NODE_EXE, ("front", "side"))
    node = graph.node
    robot.monitors = []
    robot.monitor_sets = []
    node.create_subscription(SceneMonitor, f"{NS}/monitors", robot.monitors.append, MONITOR_QOS)
    node.create_subscription(MonitorSet, f"{NS}/monitor_set", robot.monitor_sets.append, SET_QOS)
    robot.set_monitor = node.create_client(SetMonitor, f"{NS}/set_monitor")
    robot.set = node.create_client(SetParameters, f"{NS}/mobilevlm_node/set_parameters")
    graph.wait_for_service(robot.set_monitor, robot.process)
    yield robot
    assert robot.process.proc.poll() is None, "the node died during the tests:\n" + robot.process.log()


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    """The scenes on front at 5 Hz, FRAMES_PER_SCENE frames each; stamp -> scene index."""
    frames, scene_of = [], {}
    for k in range(len(SCENES) * FRAMES_PER_SCENE):
        stamp = BAG_START_NS + k * FRAME_PERIOD_NS
        scene_of[stamp] = k // FRAMES_PER_SCENE
        frames.append(CameraFrame(f"{NS}/front/image_raw", stamp, SCENES[k // FRAMES_PER_SCENE].image,
                                  "front_optical_frame"))
    return write_camera_bag(tmp_path_factory.mktemp("bag") / "scenes", frames, "mcap"), scene_of


class Replay:
    """mobilevlm replay-bag --loop in its own process while the block runs."""

    def __init__(self, graph: Graph, bag_path):
        self.proc = subprocess.Popen([sys.executable, "-m", "mobilevlm_ros.bags", str(bag_path), "--loop"],
                                     env=graph.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        assert interrupt(self.proc) == 0


def monitor_set(robot) -> dict:
    """The newest monitor_set received: name -> MonitorSpec."""
    return {m.name: m for m in robot.monitor_sets[-1].monitors} if robot.monitor_sets else {}


def test_monitors_follow_a_replayed_bag(robot, bag, alone):
    """The configured monitors (presence and colour) answer every scene of a replayed bag: each answer is the
    truth of its frame (found by the header stamp) and what pipeline.choose gives for that frame alone, ``changed``
    follows the monitor's previous answer, and both monitors of a frame share its vision pass and prefix
    (/diagnostics: prefix cache hits)."""
    wait_until(lambda: monitor_set(robot).keys() == {"walker", "car_color"}, what="the configured monitor set")
    walker = monitor_set(robot)["walker"]
    assert (walker.question, walker.camera_id, walker.rate_hz, list(walker.choices)) == \
        (WALKER, "front", 50.0, ["yes", "no"])
    bag_path, scene_of = bag
    seen = len(robot.monitors)

    def answered_scenes() -> bool:
        got = {(m.name, scene_of.get(stamp_ns(m.header))) for m in robot.monitors[seen:]}
        return all((name, i) in got for name in QUESTIONS for i in range(len(SCENES)))

    with Replay(robot.graph, bag_path):
        wait_until(answered_scenes, 180, what="both monitors' answers about every scene")
    messages = robot.monitors[seen:]
    for m in messages:
        i = scene_of[stamp_ns(m.header)]
        expected = alone[i][m.name]
        assert m.answer == truth(SCENES[i])[m.name] == expected.answer, (m.name, i)
        assert m.probability == pytest.approx(expected.probabilities[expected.index], abs=1e-4)
        assert m.header.frame_id == "front_optical_frame" and m.camera_id == "front"
        assert m.question == QUESTIONS[m.name][0]
    for name in QUESTIONS:  # each answer after the first received: changed against the one before
        answers = [m for m in messages if m.name == name]
        assert [m.changed for m in answers[1:]] == [b.answer != a.answer for a, b in zip(answers, answers[1:])]
    assert any(m.changed for m in messages if m.name == "walker")  # the scenes alternate
    values = robot.wait_for_status(lambda s: int(s.values["monitor_answers"]) >= len(messages), "monitor counters")
    assert int(values.values["prefix_cache_hits"]) > 0 and int(values.values["prefix_cache_misses"]) > 0
    assert values.values["prefix_cache_max_frames"] == "4" and int(values.values["prefix_cache_bytes"]) > 0
    assert values.values["monitors"] == "2"


def publish_side(robot, scene, stamp: int, truncated: bool = False) -> None:
    publisher = robot.publishers["side"]
    wait_until(lambda: publisher.get_subscription_count() > 0, what="node subscribed to side")
    data = scene.image.tobytes()[:1000] if truncated else None
    publisher.publish(image_msg(scene.image, stamp, data=data, frame_id="side_optical_frame"))


def ask(robot, question: str, **fields) -> AskScene.Response:
    stamp = fields.pop("frame_stamp", 0)
    request = AskScene.Request(question=question, camera_id="side", temperature=0.0, **fields)
    request.frame_stamp.sec, request.frame_stamp.nanosec = divmod(stamp, 10**9)
    return robot.graph.call(robot.ask, request)


def newest_side_answer(robot, stamp: int, question: str = WALKER, **fields) -> AskScene.Response:
    """Ask about the newest side frame until the answer is about the frame stamped ``stamp`` (discovery and
    delivery take a moment)."""
    def attempt():
        response = ask(robot, question, **fields)
        return response.success and stamp_ns(response.image_header) == stamp and response
    return wait_until(attempt, interval=0.1, what=f"an answer about side frame {stamp}")


def test_follow_up_questions_name_their_frame(robot, pipeline):
    """An answer's image_header names its frame; later requests naming it by frame_stamp are answered about exactly
    that frame after newer frames came (free text as the frame gets alone, choices as pipeline.choose), even while
    the newest frame is broken; a frame that was received and never answered, pushed out by frame_history newer
    ones, and a stamp never seen are FRAME_GONE, never another frame.

    The newer frames are broken (truncated data): a request naming one is answered BAD_FRAME, which shows the node
    holds it without answering about it (an answered frame would be held on as a follow-up's)."""
    scene = SCENES[0]
    t0 = BAG_START_NS + 10**12
    publish_side(robot, scene, t0)
    answered = newest_side_answer(robot, t0)
    broken = [t0 + (k + 1) * 10**6 for k in range(FRAME_HISTORY + 1)]
    for stamp in broken:  # one by one, each seen by the node before the next is sent
        publish_side(robot, scene, stamp, truncated=True)
        wait_until(lambda stamp=stamp: ask(robot, WALKER, frame_stamp=stamp).error_code == "BAD_FRAME",
                   what=f"the node holding broken side frame {stamp}")
    assert ask(robot, WALKER).error_code == "BAD_FRAME"  # the newest
    follow_up = ask(robot, "How many cones are there?", frame_stamp=stamp_ns(answered.image_header))
    assert follow_up.success and stamp_ns(follow_up.image_header) == t0
    assert follow_up.answer == pipeline.ask(scene.image, "How many cones are there?",
                                            SamplingParams(max_new_tokens=8)).text
    assert answer_matches(follow_up.answer, str(scene.count("cone")))
    chosen = ask(robot, CAR_COLOR, frame_stamp=t0, choices=COLORS)
    expected = pipeline.choose(scene.image, CAR_COLOR, COLORS)
    assert chosen.success and stamp_ns(chosen.image_header) == t0 and chosen.answer == expected.answer
    assert list(chosen.choice_probabilities) == pytest.approx(expected.probabilities, abs=1e-4)
    for stamp in (broken[0], t0 - 1):
        gone = ask(robot, WALKER, frame_stamp=stamp)
        assert (gone.success, gone.error_code) == (False, "FRAME_GONE")
        assert f"no frame of camera 'side' stamped {stamp // 10**9}.{stamp % 10**9:09d} is held" in \
            gone.error_message and f"frame_history {FRAME_HISTORY}" in gone.error_message


def test_choices_over_the_service_and_the_action(robot, pipeline):
    """Choices: the service's and the action's answer is the choice pipeline.choose gives for the same frame, with
    choice_probabilities in the order given; bad choices are BAD_REQUEST with the reason."""
    scene = SCENES[1]
    stamp = BAG_START_NS + 2 * 10**12
    publish_side(robot, scene, stamp)
    choices = ["no", "yes"]
    response = newest_side_answer(robot, stamp, WALKER, choices=choices)
    expected = pipeline.choose(scene.image, WALKER, choices)
    assert response.answer == expected.answer == truth(scene)["walker"] and response.tokens_generated == 0
    assert list(response.choice_probabilities) == pytest.approx(expected.probabilities, abs=1e-4)

    goal = AskSceneAction.Goal(question=CAR_COLOR, camera_id="side", temperature=-1.0, choices=COLORS)
    goal.frame_stamp.sec, goal.frame_stamp.nanosec = divmod(stamp, 10**9)
    handle = robot.graph.result(robot.action.send_goal_async(goal))
    result = robot.graph.result(handle.get_result_async())
    expected = pipeline.choose(scene.image, CAR_COLOR, COLORS)
    assert result.status == GoalStatus.STATUS_SUCCEEDED and result.result.success
    assert result.result.answer == expected.answer == truth(scene)["car_color"]
    assert list(result.result.choice_probabilities) == pytest.approx(expected.probabilities, abs=1e-4)
    assert stamp_ns(result.result.image_header) == stamp

    for fields, message in (({"choices": ["yes", "yes"]}, "choice 'yes' is given twice"),
                            ({"choices": ["yes", ""]}, "a choice is empty"),
                            ({"choices": [str(i) for i in range(17)]}, "17 choices: at most 16"),
                            ({"choices": ["yes", "no"], "temperature": 0.7}, "temperature 0.7 with choices")):
        request = AskScene.Request(question=WALKER, camera_id="side", **fields)
        refused = robot.graph.call(robot.ask, request)
        assert (refused.success, refused.error_code) == (False, "BAD_REQUEST") and message in refused.error_message


def test_burst_of_requests_while_monitors_run(robot, bag, release_dir):
    """Monitors run on the replayed bag; a request held in flight ([hold]) makes every monitor tick skip (counted on
    /diagnostics); a burst of 8 requests (choices and questions about named side frames) is queued behind it; once
    it is released, every request is answered right, none is lost, and the monitors resume."""
    bag_path, scene_of = bag
    walker, empty = SCENES[0], SCENES[1]  # pedestrians, none
    stamps = {"walker": BAG_START_NS + 3 * 10**12, "empty": BAG_START_NS + 3 * 10**12 + 10**6}
    publish_side(robot, walker, stamps["walker"])
    newest_side_answer(robot, stamps["walker"])  # answered: held for named requests from now on
    publish_side(robot, empty, stamps["empty"])
    newest_side_answer(robot, stamps["empty"])
    with Replay(robot.graph, bag_path):
        seen = len(robot.monitors)
        wait_until(lambda: len(robot.monitors) > seen + 2, 120, what="monitors running on the bag")
        skipped = int(inference_values(robot)["monitors_skipped"])
        held = robot.ask.call_async(AskScene.Request(question="[hold:burst] Describe the scene.", camera_id="side",
                                                     max_new_tokens=4, temperature=0.0))
        robot.wait_for_status(lambda s: int(s.values["monitors_skipped"]) > skipped + 4,
                              "monitor ticks skipped while the request runs")
        burst = []
        for k in range(8):
            name = ("walker", "empty")[k % 2]
            request = AskScene.Request(question=WALKER, camera_id="side", temperature=0.0, max_new_tokens=4)
            request.frame_stamp.sec, request.frame_stamp.nanosec = divmod(stamps[name], 10**9)
            if k < 4:
                request.choices = ["yes", "no"]
            burst.append((name, request, robot.ask.call_async(request)))
        (release_dir / "burst").touch()
        assert robot.graph.result(held, 120).success
        released = len(robot.monitors)
        for name, request, future in burst:
            response = robot.graph.result(future, 120)
            assert response.success, (response.error_code, response.error_message)
            assert stamp_ns(response.image_header) == stamps[name]
            expected = "yes" if name == "walker" else "no"
            assert answer_matches(response.answer, expected) and bool(response.choice_probabilities) == bool(
                request.choices)
        wait_until(lambda: len(robot.monitors) > released + 2, 120, what="the monitors resuming")
    for m in robot.monitors[seen:]:
        assert m.answer == truth(SCENES[scene_of[stamp_ns(m.header)]])[m.name]


def call_set_monitor(robot, name: str, question: str, camera_id: str = "", rate_hz: float = 50.0, choices=()):
    request = SetMonitor.Request(name=name, question=question, camera_id=camera_id, rate_hz=rate_hz,
                                 choices=list(choices))
    return robot.graph.call(robot.set_monitor, request)


def test_set_monitor_adds_changes_and_removes(robot, bag):
    """set_monitor adds a monitor (it answers on the next frames and shows in monitor_set), changes its question
    (the new one is answered), removes it (gone from monitor_set, answers stop while the others go on), and refuses
    bad input with the reason, changing nothing."""
    bag_path, scene_of = bag
    for args, code, message in (
            (("bad name", "q"), "BAD_REQUEST", "use letters, digits and _"),
            (("cone", "q", "", -2.0), "BAD_REQUEST", "rate_hz -2 must be at least 0.001"),
            (("cone", "q", "", 1.0, ["yes", "yes"]), "BAD_REQUEST", "choice 'yes' is given twice"),
            (("cone", "q", "left"), "UNKNOWN_CAMERA", "unknown camera 'left'"),
            (("cone", "Is there a cone? " * 600), "PROMPT_TOO_LONG", "monitor cone"),
            (("nope", ""), "UNKNOWN_MONITOR", "no monitor named 'nope'")):
        response = call_set_monitor(robot, *args)
        assert (response.success, response.error_code) == (False, code) and message in response.error_message
    assert monitor_set(robot).keys() == {"walker", "car_color"}
    refused = set_parameter(robot.graph, robot, "monitor.walker.question", "Is there a cone?")
    assert not refused.successful and "through the set_monitor service" in refused.reason

    cone = "Is there a cone on the road?"
    assert call_set_monitor(robot, "cone", cone).success
    wait_until(lambda: "cone" in monitor_set(robot), what="cone in monitor_set")
    assert monitor_set(robot)["cone"].camera_id == "front" and list(monitor_set(robot)["cone"].choices) == \
        ["yes", "no"]
    changed = "Do you see a cone?"
    with Replay(robot.graph, bag_path):
        seen = len(robot.monitors)
        wait_until(lambda: any(m.name == "cone" for m in robot.monitors[seen:]), 120, what="the cone monitor")
        assert call_set_monitor(robot, "cone", changed).success
        wait_until(lambda: any(m.name == "cone" and m.question == changed for m in robot.monitors[seen:]), 120,
                   what="the changed cone monitor")
        assert call_set_monitor(robot, "cone", "").success
        wait_until(lambda: "cone" not in monitor_set(robot), what="cone gone from monitor_set")
        removed = len(robot.monitors)
        wait_until(lambda: sum(m.name == "walker" for m in robot.monitors[removed:]) >= 3, 120,
                   what="the other monitors going on")
    # Ticks taken before the removal (one running, one waiting for front at most) are the last that can name it.
    assert sum(m.name == "cone" for m in robot.monitors[removed:]) <= 2
    for m in robot.monitors[seen:]:
        scene = SCENES[scene_of[stamp_ns(m.header)]]
        if m.name == "cone":
            assert m.answer == ("yes" if scene.count("cone") else "no")
