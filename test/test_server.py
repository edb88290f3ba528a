"""The ROS-free serving core with the real tiny checkpoint: validation, queueing, cancel, failures, shutdown, frame
age, the admission gate the lifecycle opens and closes, named frames (frame_stamp), choices and standing
monitors."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import CHECKPOINTS, REFERENCE, golden_cases
from mobilevlm_ros.camera import Frame, FrameAge, FrameStore
from mobilevlm_ros.model import MobileVLMPipeline, SamplingParams
from mobilevlm_ros.monitors import Monitor, MonitorBoard
from mobilevlm_ros.server import AdmissionGate, ErrorCode, SceneRequest, SceneServer, ServerConfig, Stats

RGB = np.asarray(Image.open(REFERENCE / "images" / "img0_street_500x300_rgb.png").convert("RGB"))


@pytest.fixture(scope="module")
def pipeline():
    return MobileVLMPipeline.load(CHECKPOINTS / "MobileVLM_V2-tiny", max_seq_len=512)


class Clock:
    """One clock for both ages: ``now`` seconds is the node's ROS time and the monotonic arrival clock."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def ns(self) -> int:
        return round(self.now * 1e9)


def raw_frame(camera_id="front", seq=0, received=1000.0, encoding="rgb8", data=None, width=500, stamp=(1000, 7)):
    return Frame.from_raw(camera_id=camera_id, seq=seq, stamp_sec=stamp[0], stamp_nanosec=stamp[1],
                          frame_id="cam_optical", encoding=encoding, width=width, height=300, step=width * 3,
                          is_bigendian=False, data=RGB.tobytes() if data is None else data,
                          received_monotonic=received)


def make_server(pipeline, clock=None, frame_age_from="stamp", history=1, monitors=(), **overrides):
    """A server on two cameras; ``clock`` (a Clock) is the frame-age clocks' and the monitors' time."""
    config = ServerConfig(**{"cameras": ("front", "rear"), "default_camera": "front", "max_frame_age_s": 1.0,
                             "max_new_tokens": 8, "queue_length": 2, "frame_age_from": frame_age_from, **overrides})
    frames = FrameStore(history)
    clock = clock or Clock()
    server = SceneServer(pipeline, frames, config, FrameAge(frame_age_from, now_ns=clock.ns, monotonic=clock),
                         MonitorBoard(monitors), monotonic=clock)
    return server, frames


class FailingPipeline:
    """The real pipeline, except that ask raises what a CUDA out-of-memory looks like to the worker (a wrapper:
    the shared pipeline itself is left unchanged)."""

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self.fail = True

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def ask(self, *args, **kwargs):
        if self.fail:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._pipeline.ask(*args, **kwargs)


def test_answer_carries_the_frame_and_timings(pipeline):
    server, frames = make_server(pipeline)
    frames.put(raw_frame())
    result = server.submit(SceneRequest("What is the robot doing on the street?")).wait(60)
    assert result.success and result.error_code == ""
    golden = golden_cases("MobileVLM_V2-tiny")[0]["generated_ids"][:8]  # the reference's greedy answer, 8 tokens
    assert result.answer == pipeline.tokenizer.decode(golden).strip()
    assert (result.frame.stamp_sec, result.frame.stamp_nanosec, result.frame.frame_id) == (1000, 7, "cam_optical")
    assert result.camera_id == "front" and result.tokens_generated == 8
    assert result.total_ms >= result.decode_ms > 0 and result.vision_ms > 0
    server.shutdown()


@pytest.mark.parametrize("request_,code,message", [
    (SceneRequest(""), ErrorCode.BAD_REQUEST, "empty"),
    (SceneRequest("   "), ErrorCode.BAD_REQUEST, "empty"),
    (SceneRequest("x" * 2001), ErrorCode.BAD_REQUEST, "2001 characters; the limit is 2000"),
    (SceneRequest("q", temperature=float("nan")), ErrorCode.BAD_REQUEST, "temperature"),
    (SceneRequest("q", camera_id="left"), ErrorCode.UNKNOWN_CAMERA, "unknown camera 'left'; configured: front, rear"),
    (SceneRequest("q", camera_id="rear"), ErrorCode.NO_FRAME, "no frame received yet from camera 'rear'"),
    (SceneRequest("word " * 300), ErrorCode.PROMPT_TOO_LONG, "context holds 512"),
    (SceneRequest("q", max_new_tokens=400), ErrorCode.PROMPT_TOO_LONG, "context holds 512"),
    (SceneRequest("q", choices=("yes", " ")), ErrorCode.BAD_REQUEST, "a choice is empty"),
    (SceneRequest("q", choices=("yes", "no", "yes")), ErrorCode.BAD_REQUEST, "choice 'yes' is given twice"),
    (SceneRequest("q", choices=tuple(f"c{i}" for i in range(17))), ErrorCode.BAD_REQUEST,
     "17 choices: at most 16 are allowed"),
    (SceneRequest("q", choices=("yes", "no"), temperature=0.5), ErrorCode.BAD_REQUEST,
     "temperature 0.5 with choices: choices are scored, not sampled"),
    (SceneRequest("q", choices=("yes", "word " * 400)), ErrorCode.PROMPT_TOO_LONG, "context holds 512"),
    (SceneRequest("q", frame_stamp=(999, 5)), ErrorCode.FRAME_GONE,
     "no frame of camera 'front' stamped 999.000000005 is held (it holds 1, stamped 1000.000000007 to "
     "1000.000000007; frame_history 1)"),
    (SceneRequest("q", camera_id="rear", frame_stamp=(1000, 7)), ErrorCode.FRAME_GONE, "it holds none"),
])
def test_requests_refused_up_front(pipeline, request_, code, message):
    server, frames = make_server(pipeline)
    frames.put(raw_frame())
    job = server.submit(request_)
    assert job.done  # answered at once, without the worker
    assert (job.result.success, job.result.error_code) == (False, code)
    assert message in job.result.error_message
    server.shutdown()


def test_stale_frame_is_judged_by_its_header_stamp(pipeline):
    """A frame that arrived just now but was stamped 1.5 s ago is stale (a late delivery is not a fresh frame)."""
    clock = Clock()
    server, frames = make_server(pipeline, clock)
    frames.put(raw_frame(received=clock.now + 1.5, stamp=(1000, 0)))
    clock.now += 1.5
    result = server.submit(SceneRequest("q")).wait(5)
    assert result.error_code == ErrorCode.STALE_FRAME
    assert "is 1.50 s old by its header stamp (max_frame_age_s 1, frame_age_from stamp)" in result.error_message
    assert result.frame is not None
    server.shutdown()


def test_frame_age_from_arrival_and_for_unstamped_frames(pipeline):
    """frame_age_from arrival ignores the stamp (cameras whose clock disagrees); a zero stamp is judged by arrival
    whatever the setting."""
    clock = Clock()
    server, frames = make_server(pipeline, clock, frame_age_from="arrival")
    frames.put(raw_frame(received=clock.now, stamp=(1, 0)))  # stamped long ago, arrived now: fresh
    assert server.submit(SceneRequest("q")).wait(60).success
    clock.now += 1.5
    result = server.submit(SceneRequest("q")).wait(5)
    assert result.error_code == ErrorCode.STALE_FRAME and "1.50 s old since it arrived" in result.error_message
    server.shutdown()
    server, frames = make_server(pipeline, clock)
    frames.put(raw_frame(received=clock.now, stamp=(0, 0)))
    assert server.submit(SceneRequest("q")).wait(60).success
    clock.now += 1.5
    assert "since it arrived" in server.submit(SceneRequest("q")).wait(5).error_message
    server.shutdown()


@pytest.mark.parametrize("frame,code,message", [
    (raw_frame(encoding="32FC1"), ErrorCode.UNSUPPORTED_ENCODING, "32FC1"),
    (raw_frame(data=RGB.tobytes()[:1000]), ErrorCode.BAD_FRAME, "wrong data length"),
    (Frame.from_compressed(camera_id="front", seq=0, stamp_sec=1000, stamp_nanosec=0, frame_id="f", format="jpeg",
                           data=(REFERENCE / "images" / "demo.jpg").read_bytes()[:5000],
                           received_monotonic=1000.0), ErrorCode.BAD_FRAME, "truncated"),
])
def test_bad_frames_fail_in_the_worker_and_it_keeps_serving(pipeline, frame, code, message):
    server, frames = make_server(pipeline)
    frames.put(frame)
    result = server.submit(SceneRequest("q")).wait(30)
    assert result.error_code == code and message in result.error_message
    frames.put(raw_frame(seq=1))
    assert server.submit(SceneRequest("q")).wait(60).success
    server.shutdown()


def test_model_failure_is_reported_and_the_worker_survives(pipeline):
    failing = FailingPipeline(pipeline)
    server = SceneServer(failing, FrameStore(), make_server(pipeline)[0].config, FrameAge("arrival"))
    server.frames.put(raw_frame(received=time.monotonic() + 60))
    result = server.submit(SceneRequest("q")).wait(30)
    assert result.error_code == ErrorCode.INFERENCE_FAILED and "CUDA out of memory" in result.error_message
    assert server.stats.inference_failed == 1 and server.stats.recent_inference_failures == 1
    failing.fail = False
    assert server.submit(SceneRequest("q")).wait(60).success  # the worker survived
    for _ in range(Stats.RECENT_RUNS - 1):
        assert server.stats.recent_inference_failures == 1  # /diagnostics still warns
        assert server.submit(SceneRequest("q", max_new_tokens=1)).wait(60).success
    assert server.stats.recent_inference_failures == 0 and server.stats.inference_failed == 1  # recovered
    server.shutdown()


def test_burst_gets_answers_or_busy_and_none_is_lost(pipeline):
    server, frames = make_server(pipeline)
    frames.put(raw_frame())
    jobs = []
    threads = [threading.Thread(target=lambda: jobs.append(server.submit(SceneRequest("q", max_new_tokens=4))))
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [job.wait(120) for job in jobs]
    assert all(r is not None for r in results)
    codes = [r.error_code for r in results]
    assert set(codes) <= {"", ErrorCode.BUSY}
    # Each success held the worker or a queue slot (2) when it was submitted; at most 3 at once, but the worker may
    # finish some while the burst is still arriving, so only "at least one answered" is certain.
    assert codes.count("") >= 1 and codes.count("") + codes.count(ErrorCode.BUSY) == 20
    assert server.stats.rejected_busy == codes.count(ErrorCode.BUSY)
    server.shutdown()


def test_cancel_mid_generation_and_shutdown_answer_everyone(pipeline):
    server, frames = make_server(pipeline, frame_age_from="arrival")
    frames.put(raw_frame(received=time.monotonic() + 600))
    started = threading.Event()
    running = server.submit(SceneRequest("q", max_new_tokens=300), on_text=lambda *_: started.set())
    queued = server.submit(SceneRequest("q", max_new_tokens=300))
    assert started.wait(60)
    running.cancel()
    result = running.wait(30)
    assert result.error_code == ErrorCode.CANCELLED and result.tokens_generated < 300
    wait_for(lambda: server.queue_depth == 0, "the queued job to start")
    waiting = server.submit(SceneRequest("q", max_new_tokens=300))
    server.shutdown()
    for job in (queued, waiting):
        assert job.wait(30).error_code == ErrorCode.SHUTTING_DOWN
    assert server.submit(SceneRequest("q")).result.error_code == ErrorCode.SHUTTING_DOWN


def test_cancelled_queued_job_is_answered_at_once(pipeline):
    """A job cancelled while it waits leaves the queue and is answered CANCELLED right away, while the running one
    goes on undisturbed; the freed slot takes a new request."""
    server, frames = make_server(pipeline, frame_age_from="arrival")
    frames.put(raw_frame(received=time.monotonic() + 600))
    started = threading.Event()
    running = server.submit(SceneRequest("q", max_new_tokens=300), on_text=lambda *_: started.set())
    assert started.wait(60)
    queued = [server.submit(SceneRequest("q", max_new_tokens=8)) for _ in range(2)]
    assert server.submit(SceneRequest("q")).result.error_code == ErrorCode.BUSY  # the queue is full
    queued[0].cancel()
    assert queued[0].done and queued[0].result.error_code == ErrorCode.CANCELLED  # no wait for the running job
    assert "while waiting in the queue" in queued[0].result.error_message
    assert not running.done
    replacement = server.submit(SceneRequest("q", max_new_tokens=8))
    assert not replacement.done  # took the freed slot
    running.cancel()
    assert running.wait(60).error_code == ErrorCode.CANCELLED
    assert queued[1].wait(60).success and replacement.wait(60).success
    server.shutdown()


def test_admission_gate_follows_the_lifecycle(pipeline):
    """Closed: NOT_ACTIVE naming the state; open: the server answers; deactivate: requests in flight finish or are
    cancelled after the timeout and answered NOT_ACTIVE; shutting down: SHUTTING_DOWN, also after a later close."""
    gate = AdmissionGate()
    refused = gate.submit(SceneRequest("q"))
    assert refused.result.error_code == ErrorCode.NOT_ACTIVE and "unconfigured" in refused.result.error_message
    gate.set_state("inactive")
    assert "inactive; activate it" in gate.submit(SceneRequest("q")).result.error_message
    assert gate.rejected_not_active == 2
    server, frames = make_server(pipeline, frame_age_from="arrival")
    frames.put(raw_frame(received=time.monotonic() + 600))
    gate.open(server)
    job = gate.submit(SceneRequest("q"))
    assert job.wait(60).success and gate.result(job).success
    started = threading.Event()
    long_job = gate.submit(SceneRequest("q", max_new_tokens=300), on_text=lambda *_: started.set())
    queued = gate.submit(SceneRequest("q", max_new_tokens=300))
    assert started.wait(60)
    in_flight, cancelled = gate.deactivate(0.0)
    assert (in_flight, cancelled) >= (2, 2)
    for j in (long_job, queued):
        result = gate.result(j)
        assert result.error_code == ErrorCode.NOT_ACTIVE and "deactivate_timeout_s 0" in result.error_message
    assert gate.submit(SceneRequest("q")).result.error_code == ErrorCode.NOT_ACTIVE
    gate.close(ErrorCode.SHUTTING_DOWN, "the node is shutting down")
    gate.close(ErrorCode.NOT_ACTIVE, "the node is unconfigured")  # a later cleanup does not reopen the door
    assert gate.submit(SceneRequest("q")).result.error_code == ErrorCode.SHUTTING_DOWN
    assert gate.detach() is server
    server.shutdown()


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def test_captions_only_when_idle_and_frame_is_new(pipeline):
    server, frames = make_server(pipeline)
    assert server.submit_caption("front", "Describe the scene.", 4, last_seq=-1) is None  # no frame yet
    frames.put(raw_frame(seq=5))
    job = server.submit_caption("front", "Describe the scene.", 4, last_seq=-1)
    assert job is not None and job.not_before_seq == 5
    assert server.submit_caption("front", "Describe the scene.", 4, last_seq=-1) is None  # busy: skipped
    assert job.wait(60).success
    assert server.submit_caption("front", "Describe the scene.", 4, last_seq=5) is None  # same frame
    assert server.stats.captions == 1 and server.stats.captions_skipped == 1
    server.shutdown()


class RecordingPipeline:
    """The real pipeline, recording how many rows each call of the worker runs together (ask: one) in ``batches``,
    and each call's method and frame keys in ``calls``."""

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self.batches: list[int] = []
        self.calls: list[tuple[str, list]] = []

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def ask(self, *args, frame_key=None, **kwargs):
        self.batches.append(1)
        self.calls.append(("ask", [frame_key]))
        return self._pipeline.ask(*args, frame_key=frame_key, **kwargs)

    def ask_batch(self, images, *args, frame_keys=None, **kwargs):
        self.batches.append(len(images))
        self.calls.append(("ask_batch", list(frame_keys)))
        return self._pipeline.ask_batch(images, *args, frame_keys=frame_keys, **kwargs)

    def choose_batch(self, images, *args, frame_keys=None, **kwargs):
        self.batches.append(len(images))
        self.calls.append(("choose_batch", list(frame_keys)))
        return self._pipeline.choose_batch(images, *args, frame_keys=frame_keys, **kwargs)


REAR = np.asarray(Image.open(REFERENCE / "images" / "img1_robot_240x420_rgba.png").convert("RGB").resize((500, 300)))


def _two_cameras(frames):
    frames.put(raw_frame("front", received=time.monotonic() + 600))
    frames.put(raw_frame("rear", received=time.monotonic() + 600, data=REAR.tobytes()))


def _alone(pipeline, result, question, max_new_tokens):
    return pipeline.ask(result.frame.rgb(), question, SamplingParams(max_new_tokens=max_new_tokens))


@pytest.mark.parametrize("max_batch,batches", [(4, [1, 4]), (3, [1, 3, 1])])
def test_jobs_ready_together_run_as_one_batch_and_answer_as_alone(pipeline, max_batch, batches):
    """While the worker runs a lone job (at once: it does not wait for company), four questions to two cameras
    queue up; the worker then takes up to max_batch of them as one batch, and each answer is the one the same
    question about the same frame gets alone."""
    recording = RecordingPipeline(pipeline)
    server, frames = make_server(recording, frame_age_from="arrival", queue_length=4, max_batch=max_batch)
    _two_cameras(frames)
    started, release = threading.Event(), threading.Event()

    def hold(*_):
        started.set()
        release.wait(60)

    first = server.submit(SceneRequest("q", max_new_tokens=300), on_text=hold)
    assert started.wait(60)
    questions = [case["turns"][0] for case in golden_cases("MobileVLM_V2-tiny")[:3]]
    asked = [("front", questions[0], 8), ("rear", questions[1], 4), ("front", questions[2], 6),
             ("rear", questions[0], 8)]
    streamed: list[list[str]] = [[] for _ in asked]
    jobs = [server.submit(SceneRequest(question, camera, max_new_tokens=tokens),
                          on_text=lambda delta, partial, n, row=row: row.append(delta))
            for (camera, question, tokens), row in zip(asked, streamed)]
    first.cancel()
    release.set()
    assert first.wait(60).error_code == ErrorCode.CANCELLED
    results = [job.wait(120) for job in jobs]
    assert recording.batches == batches
    for (camera, question, tokens), result, pieces in zip(asked, results, streamed):
        assert result.success and result.camera_id == camera, result
        alone = _alone(pipeline, result, question, tokens)
        assert result.answer == alone.text == "".join(pieces)
        assert result.tokens_generated == len(alone.generated_ids)
    assert server.stats.answered == 4
    server.shutdown()


def test_captions_of_all_cameras_in_one_batch(pipeline):
    recording = RecordingPipeline(pipeline)
    server, frames = make_server(recording, frame_age_from="arrival", max_batch=4)
    assert server.submit_captions({"front": -1, "rear": -1}, "Describe the scene.", 6) == {}  # no frames yet
    _two_cameras(frames)
    jobs = server.submit_captions({"front": -1, "rear": -1}, "Describe the scene.", 6)
    assert set(jobs) == {"front", "rear"}
    assert server.submit_captions({"front": -1, "rear": -1}, "Describe the scene.", 6) == {}  # busy: skipped
    results = {camera: job.wait(60) for camera, job in jobs.items()}
    assert recording.batches == [2]
    for camera, result in results.items():
        assert result.success and result.camera_id == camera and result.frame.camera_id == camera
        assert result.answer == _alone(pipeline, result, "Describe the scene.", 6).text
    assert server.stats.captions == 2 and server.stats.captions_skipped == 2
    server.shutdown()


@pytest.fixture(scope="module")
def cached():
    """The tiny checkpoint with a prefix cache of 4 frames."""
    return MobileVLMPipeline.load(CHECKPOINTS / "MobileVLM_V2-tiny", max_seq_len=512, prefix_cache_frames=4)


def test_frame_stamp_answers_that_frame_while_held_then_frame_gone(pipeline):
    """A request naming a frame by its stamp is answered about exactly that frame, however many newer ones came and
    however old it is; a frame answered about stays held for follow-ups after newer frames pushed it out of the
    received ones; a frame no longer held is FRAME_GONE at once, never another frame."""
    clock = Clock()
    server, frames = make_server(pipeline, clock, history=2)
    frames.put(raw_frame(seq=0, stamp=(1000, 1), received=clock.now))
    frames.put(raw_frame(seq=1, stamp=(1000, 2), received=clock.now, data=REAR.tobytes()))
    named = server.submit(SceneRequest("q", frame_stamp=(1000, 1))).wait(60)
    assert named.success and named.frame.seq == 0
    assert named.answer == pipeline.ask(RGB, "q", SamplingParams(max_new_tokens=8)).text
    newest = server.submit(SceneRequest("q")).wait(60)
    assert newest.success and newest.frame.seq == 1
    assert newest.answer == pipeline.ask(REAR, "q", SamplingParams(max_new_tokens=8)).text
    for seq in (2, 3):  # the received ones now: 2 and 3; the answered ones: 0 and 1
        frames.put(raw_frame(seq=seq, stamp=(1000, 1 + seq), received=clock.now))
    clock.now += 5.0  # every frame is now older than max_frame_age_s
    assert server.submit(SceneRequest("q")).wait(60).error_code == ErrorCode.STALE_FRAME
    follow_up = server.submit(SceneRequest("q", frame_stamp=(1000, 2))).wait(60)
    assert follow_up.success and follow_up.frame.seq == 1 and follow_up.answer == newest.answer
    assert [f.seq for f in frames.held("front")] == [0, 1, 2, 3]
    for seq in (4, 5):  # frame 2 was received, never answered: pushed out now
        frames.put(raw_frame(seq=seq, stamp=(1000, 1 + seq), received=clock.now))
    gone = server.submit(SceneRequest("q", frame_stamp=(1000, 3)))
    assert gone.done and gone.result.error_code == ErrorCode.FRAME_GONE
    assert "no frame of camera 'front' stamped 1000.000000003 is held (it holds 4" in gone.result.error_message
    assert server.submit(SceneRequest("q", frame_stamp=(1000, 1))).wait(60).frame.seq == 0
    server.shutdown()


def test_choices_answer_as_pipeline_choose_and_share_the_frame_prefix(cached):
    """A request with choices is answered by choose_batch on its frame, under the frame's key: a question and then
    choices about one frame take one vision pass (the second a prefix cache hit); the answer is the choice
    pipeline.choose gives, with every choice's probability in order."""
    recording = RecordingPipeline(cached)
    server, frames = make_server(recording, frame_age_from="arrival")
    frames.put(raw_frame(seq=7, received=time.monotonic() + 600))
    before = cached.prefix_cache.stats()
    assert server.submit(SceneRequest("What is the robot doing on the street?")).wait(60).success
    choices = ("yes", "no", "a red car")
    result = server.submit(SceneRequest("Is there a car?", choices=choices, temperature=0.0)).wait(60)
    after = cached.prefix_cache.stats()
    assert recording.calls == [("ask", [("front", 7)]), ("choose_batch", [("front", 7)])]
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 1)
    alone = cached.choose(RGB, "Is there a car?", list(choices))
    assert result.success and result.answer == alone.answer and result.tokens_generated == 0
    assert result.choice_probabilities == pytest.approx(alone.probabilities, abs=1e-4)
    assert len(result.choice_probabilities) == 3 and sum(result.choice_probabilities) == pytest.approx(1.0)
    assert result.frame.seq == 7 and result.vision_ms >= 0 and result.prefill_ms > 0 and result.decode_ms >= 0
    server.shutdown()


def test_choice_jobs_batch_together_and_questions_through_ask_batch(pipeline):
    """Jobs ready together: the choice requests run as one choose_batch, the questions as one ask_batch, each row
    under its frame's key, each answered as alone."""
    recording = RecordingPipeline(pipeline)
    server, frames = make_server(recording, frame_age_from="arrival", queue_length=4, max_batch=4)
    _two_cameras(frames)
    started, release = threading.Event(), threading.Event()

    def hold(*_):
        started.set()
        release.wait(60)

    first = server.submit(SceneRequest("q", max_new_tokens=300), on_text=hold)
    assert started.wait(60)
    jobs = [server.submit(SceneRequest("Is it red?", "front", choices=("yes", "no"))),
            server.submit(SceneRequest("q", "rear", max_new_tokens=4)),
            server.submit(SceneRequest("Which side?", "rear", choices=("left", "right", "middle"))),
            server.submit(SceneRequest("q", "front", max_new_tokens=4))]
    first.cancel()
    release.set()
    results = [job.wait(120) for job in jobs]
    keys = {"front": ("front", 0), "rear": ("rear", 0)}
    assert recording.calls[1:] == [("choose_batch", [keys["front"], keys["rear"]]),
                                   ("ask_batch", [keys["rear"], keys["front"]])]
    for job, result in zip(jobs, results):
        image = result.frame.rgb()
        if job.request.choices:
            alone = pipeline.choose(image, job.request.question, list(job.request.choices))
            assert result.answer == alone.answer
            assert result.choice_probabilities == pytest.approx(alone.probabilities, abs=1e-4)
        else:
            assert result.answer == _alone(pipeline, result, "q", 4).text and not result.choice_probabilities
    server.shutdown()


def test_monitor_board_due_on_new_frames_at_their_rate():
    """A monitor is due on a new frame of its camera once its period has passed: never twice on one frame, never on
    another camera's frames; a changed monitor is due at once and has no previous answer."""
    fast, slow = Monitor("fast", "q", "front", 10.0), Monitor("slow", "q", "front", 0.5)
    other = Monitor("other", "q", "rear", 10.0)
    board = MonitorBoard([fast, slow, other])
    assert board.take_due("front", 0, 100.0) == [fast, slow]
    assert board.take_due("front", 0, 200.0) == []  # the same frame
    assert board.take_due("front", 1, 100.05) == []  # new frame, too soon for both
    assert board.take_due("front", 2, 100.1) == [fast]
    assert board.take_due("front", 3, 102.0) == [fast, slow]
    assert board.take_due("rear", 3, 102.0) == [other]
    assert [board.record(fast, a, 0.9).changed for a in ("yes", "yes", "no", "no", "yes")] == \
        [False, False, True, False, True]
    changed = Monitor("fast", "another question", "front", 10.0)
    board.set(changed)
    assert board.take_due("front", 4, 102.0) == [changed]
    assert board.record(changed, "no", 0.8).changed is False  # no previous answer of the changed monitor
    assert board.record(fast, "yes", 0.8).changed is False  # the old monitor's late answer is not recorded
    assert board.remove("slow") and not board.remove("slow")
    assert [m.name for m in board.all()] == ["fast", "other"]


MONITORS = (Monitor("car", "Is there a car?", "front", 5.0), Monitor("sky", "Is the sky blue?", "front", 5.0),
            Monitor("side", "Which side is the robot on?", "front", 5.0, ("left", "right", "middle")),
            Monitor("rear_car", "Is there a car?", "rear", 5.0))


def test_monitor_tick_answers_all_due_monitors_in_one_choose_batch(cached):
    """A camera's new frame gives one tick: every due monitor of that camera in one choose_batch under the frame's
    key (one vision pass, one shared prefix), each answer the one pipeline.choose gives; the same frame never twice;
    ``changed`` against the monitor's previous answer."""
    clock = Clock()
    recording = RecordingPipeline(cached)
    server, frames = make_server(recording, clock, frame_age_from="arrival", monitors=MONITORS)
    assert server.submit_monitors("front") is None  # no frame yet
    frames.put(raw_frame(seq=3, received=clock.now))
    before = cached.prefix_cache.stats()
    tick = server.submit_monitors("front")
    result = tick.wait(60)
    after = cached.prefix_cache.stats()
    assert result.success and result.frame.seq == 3
    assert recording.calls == [("choose_batch", [("front", 3)] * 3)]
    assert (after.hits - before.hits, after.misses - before.misses) == (2, 1)
    first = {}
    for monitor, answer in zip(MONITORS, result.monitor_answers):
        alone = cached.choose(RGB, monitor.question, list(monitor.choices))
        assert answer.monitor == monitor and answer.answer == alone.answer and not answer.changed
        assert answer.probability == pytest.approx(alone.probabilities[alone.index], abs=1e-4)
        first[monitor.name] = answer.answer
    assert server.submit_monitors("front") is None  # the same frame: never twice
    clock.now += 0.1  # a new frame, too soon for a 5 Hz monitor
    frames.put(raw_frame(seq=4, received=clock.now, data=REAR.tobytes()))
    assert server.submit_monitors("front") is None
    clock.now += 0.2
    result = server.submit_monitors("front").wait(60)
    assert recording.calls[-1] == ("choose_batch", [("front", 4)] * 3)
    for answer in result.monitor_answers:
        alone = cached.choose(REAR, answer.monitor.question, list(answer.monitor.choices))
        assert answer.answer == alone.answer and answer.changed == (alone.answer != first[answer.monitor.name])
    assert server.stats.monitor_answers == 6 and server.stats.monitors_skipped == 0
    server.shutdown()


class HoldingPipeline(RecordingPipeline):
    """RecordingPipeline whose first choose_batch waits for ``release``: a monitor tick that stays running."""

    def __init__(self, pipeline):
        super().__init__(pipeline)
        self.holding, self.release = threading.Event(), threading.Event()

    def choose_batch(self, *args, **kwargs):
        if not self.holding.is_set():
            self.holding.set()
            self.release.wait(60)
        return super().choose_batch(*args, **kwargs)


def test_requests_take_priority_over_monitor_ticks(pipeline):
    """A tick is skipped while a request waits or runs, and a tick still queued is dropped when a request arrives
    (each monitor of a skipped tick counted); at most one tick per camera waits; ticks never make a request BUSY;
    the monitors resume on the next frame."""
    clock = Clock()
    holding = HoldingPipeline(pipeline)
    server, frames = make_server(holding, clock, frame_age_from="arrival", monitors=MONITORS, queue_length=1)
    _two_cameras(frames)
    running = server.submit_monitors("front")  # runs, held
    assert holding.holding.wait(60)
    queued = server.submit_monitors("rear")  # waits: no request is waiting
    assert queued is not None and not queued.done
    frames.put(raw_frame("rear", seq=5, received=clock.now))
    clock.now += 1.0
    assert server.submit_monitors("rear") is None  # one rear tick waits already
    assert server.stats.monitors_skipped == 1
    request = server.submit(SceneRequest("q", "rear", max_new_tokens=4))  # queue_length 1: the tick is no request
    assert queued.done and queued.result.error_code == ErrorCode.CANCELLED  # dropped for the request
    assert server.stats.monitors_skipped == 2
    frames.put(raw_frame(seq=6, received=clock.now))
    assert server.submit_monitors("front") is None  # a request waits
    assert server.stats.monitors_skipped == 5
    holding.release.set()
    assert running.wait(60).success and request.wait(60).success
    wait_for(lambda: not server.busy, "the worker to be idle")
    frames.put(raw_frame(seq=7, received=clock.now))
    clock.now += 1.0
    assert server.submit_monitors("front").wait(60).success  # resumed
    assert server.stats.monitor_answers == 6 and server.stats.answered == 1
    server.shutdown()


@pytest.mark.parametrize("args,code,message", [
    (("bad name", "q"), ErrorCode.BAD_REQUEST, "monitor name 'bad name': use letters, digits and _"),
    (("m", "q", "", -1.0), ErrorCode.BAD_REQUEST, "monitor m: rate_hz -1 must be at least 0.001"),
    (("m", "q", "", 1e-4), ErrorCode.BAD_REQUEST, "monitor m: rate_hz 0.0001 must be at least 0.001"),
    (("m", "q", "", 1.0, ("yes", "yes")), ErrorCode.BAD_REQUEST, "monitor m: choice 'yes' is given twice"),
    (("m", "q", "", 1.0, ("yes", "")), ErrorCode.BAD_REQUEST, "monitor m: a choice is empty"),
    (("m", "q", "left"), ErrorCode.UNKNOWN_CAMERA, "monitor m: unknown camera 'left'; configured: front, rear"),
    (("m", "word " * 600), ErrorCode.PROMPT_TOO_LONG, "monitor m: "),
    (("m", ""), "UNKNOWN_MONITOR", "no monitor named 'm' (monitors: car, sky, side, rear_car)"),
])
def test_set_monitor_refuses_what_the_parameters_refuse(pipeline, args, code, message):
    server, _ = make_server(pipeline, monitors=MONITORS)
    problem = server.set_monitor(*args)
    assert problem.error_code == code and message in problem.error_message
    assert server.monitors.all() == list(MONITORS)  # nothing changed
    server.shutdown()


def test_set_monitor_adds_changes_and_removes(pipeline):
    server, _ = make_server(pipeline, monitors=MONITORS[:1])
    assert server.set_monitor("cone", "Is there a cone?") is None  # default camera, rate, yes/no
    assert server.set_monitor("car", "What color is the car?", "rear", 2.0, ("red", "blue")) is None
    assert server.monitors.all() == [Monitor("car", "What color is the car?", "rear", 2.0, ("red", "blue")),
                                     Monitor("cone", "Is there a cone?", "front", 1.0, ("yes", "no"))]
    assert server.set_monitor("car", "") is None
    assert [m.name for m in server.monitors.all()] == ["cone"]
    server.shutdown()
