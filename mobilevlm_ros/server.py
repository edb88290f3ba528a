"""The serving core without ROS: request validation, one inference worker behind a bounded queue, captions, stats,
and the admission gate that the node's lifecycle opens and closes.

The node (``mobilevlm_ros.node``) turns service calls, action goals and timer ticks into :class:`SceneRequest` s and
hands them to :class:`AdmissionGate` and :class:`SceneServer`; everything that decides *what* happens to a request
lives here, testable without DDS.

Threading: ``submit`` never blocks (a full queue answers BUSY at once); the model runs only on the worker thread;
a job's ``done`` event is set exactly once, on every path (answer, error, cancel, shutdown), so no caller waits
forever. Cancelling a job that still waits in the queue answers it CANCELLED at once.

Batching: the worker takes every job that is waiting when it is free, up to ``max_batch``, and runs them together
(questions and captions through MobileVLMPipeline.ask_batch, a lone one through ask; requests with choices and
monitor ticks through choose_batch): each answer is the one the job gets alone; it never waits for more to come.
Every row names its frame (camera id, frame seq) as its prefix cache key, so questions about one frame share its
vision pass and prompt prefix.

Frames: a request answers about its camera's newest frame when inference starts, or, given ``frame_stamp``, about
exactly that frame while the FrameStore holds it (FRAME_GONE otherwise, never another frame). A named frame is
answered whatever its age: the client chose it, and the store's history bounds how old it can be.

Monitors (monitors.py): on each new frame of a camera, the monitors due on it run as one job of one choose_batch
(one vision pass, one shared prefix); requests take priority: a tick is skipped, not queued, while requests wait or
run, and a queued tick is dropped when a request arrives (both counted as ``monitors_skipped``).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .camera import Frame, FrameAge, FrameError, FrameStore
from .model import PromptTooLongError, SamplingParams
from .model.choices import check_choices
from .monitors import DEFAULT_CHOICES, DEFAULT_RATE_HZ, Monitor, MonitorAnswer, MonitorBoard, monitor_problem


class ErrorCode:
    """The error_code strings of the AskScene service and action (empty on success)."""

    UNKNOWN_CAMERA = "UNKNOWN_CAMERA"
    NO_FRAME = "NO_FRAME"
    STALE_FRAME = "STALE_FRAME"
    UNSUPPORTED_ENCODING = "UNSUPPORTED_ENCODING"
    BAD_FRAME = "BAD_FRAME"
    BAD_REQUEST = "BAD_REQUEST"
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"
    BUSY = "BUSY"
    CANCELLED = "CANCELLED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    NOT_ACTIVE = "NOT_ACTIVE"
    INFERENCE_FAILED = "INFERENCE_FAILED"
    FRAME_GONE = "FRAME_GONE"


UNKNOWN_MONITOR = "UNKNOWN_MONITOR"  # SetMonitor's own error code (the others it shares with AskScene)

@dataclass(frozen=True)
class SceneRequest:
    question: str
    camera_id: str = ""  # empty: the default camera
    max_new_tokens: int = 0  # 0: the server's default
    temperature: float = -1.0  # negative: the server's default; 0: greedy
    frame_stamp: tuple[int, int] = (0, 0)  # (sec, nanosec) of the frame to answer about; zero: the newest
    choices: tuple[str, ...] = ()  # given: the answer is the most likely of them (no sampling, no decoding)


@dataclass
class SceneResult:
    success: bool
    error_code: str = ""
    error_message: str = ""
    answer: str = ""
    camera_id: str = ""
    frame: Frame | None = None  # the frame answered about: its stamp and frame_id go into the response header
    tokens_generated: int = 0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    choice_probabilities: list[float] = field(default_factory=list)  # with choices: each one's, in their order
    monitor_answers: list[MonitorAnswer] = field(default_factory=list)  # a monitor tick's, one per monitor


class Job:
    """One accepted (or immediately answered) request, caption or monitor tick. ``wait`` returns its result;
    ``cancel`` is honoured within one generated token.

    ``frame``: the frame it must answer about (a request's frame_stamp, a monitor tick's frame); None: the camera's
    newest when inference starts. ``monitors``: a monitor tick's monitors (empty for everything else)."""

    def __init__(self, request: SceneRequest, camera_id: str, params: SamplingParams,
                 on_text: Callable[[str, str, int], None] | None = None, is_caption: bool = False,
                 not_before_seq: int = -1, frame: Frame | None = None, monitors: tuple[Monitor, ...] = ()):
        self.request = request
        self.camera_id = camera_id
        self.params = params
        self.on_text = on_text  # (text_delta, partial_answer, tokens_so_far)
        self.is_caption = is_caption
        self.not_before_seq = not_before_seq
        self.frame = frame
        self.monitors = monitors
        self.submitted = time.monotonic()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self.result: SceneResult | None = None
        self._done_callbacks: list[Callable[[Job], None]] = []
        self._lock = threading.Lock()
        self.on_cancel: Callable[[Job], None] | None = None  # the server's: answers a job still queued at once

    def cancel(self) -> None:
        self._cancel.set()
        if self.on_cancel is not None:
            self.on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def finish(self, result: SceneResult) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.result = result
            self._done.set()
            callbacks = list(self._done_callbacks)
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[Job], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._done_callbacks.append(callback)
                return
        callback(self)

    def wait(self, timeout: float | None = None) -> SceneResult | None:
        self._done.wait(timeout)
        return self.result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def is_request(self) -> bool:
        """A client's request (not a caption or monitor tick, which give way to requests)."""
        return not self.is_caption and not self.monitors

    @property
    def scores_choices(self) -> bool:
        """Answered by choose_batch (choices or monitors), not by generation."""
        return bool(self.request.choices) or bool(self.monitors)


def _failure(code: str, message: str, camera_id: str = "", frame: Frame | None = None) -> SceneResult:
    return SceneResult(success=False, error_code=code, error_message=message, camera_id=camera_id, frame=frame)


def answered_job(request: SceneRequest, code: str, message: str) -> Job:
    """A job that is already done with an error, for requests refused before they reach a server."""
    job = Job(request, request.camera_id, SamplingParams())
    job.finish(_failure(code, message, request.camera_id))
    return job


@dataclass(frozen=True)
class ServerConfig:
    cameras: tuple[str, ...]
    default_camera: str
    frame_age_from: str = "stamp"  # options.FRAME_AGE_SOURCES
    max_frame_age_s: float = 1.0
    max_new_tokens: int = 64
    temperature: float = 0.0
    queue_length: int = 4
    max_question_chars: int = 2000
    max_batch: int = 1  # jobs the worker runs together
    latency_window: int = 200  # requests kept for the latency percentiles


@dataclass
class Stats:
    """Counters and recent latencies for /diagnostics."""

    RECENT_RUNS = 10

    answered: int = 0
    rejected_busy: int = 0
    failed: int = 0  # requests answered with any error other than BUSY
    inference_failed: int = 0
    captions: int = 0
    captions_skipped: int = 0
    monitor_answers: int = 0  # monitor answers published (one per monitor per tick)
    monitors_skipped: int = 0  # monitor ticks skipped (per monitor) because requests were waiting or running
    latencies: dict[str, deque] = field(default_factory=dict)
    # Whether each of the last RECENT_RUNS inference runs failed: /diagnostics warns while any of them did, and
    # recovers once the model has answered that many times in a row.
    recent_failures: deque = field(default_factory=lambda: deque(maxlen=Stats.RECENT_RUNS))

    @property
    def recent_inference_failures(self) -> int:
        return sum(self.recent_failures)

    def record(self, result: SceneResult, window: int) -> None:
        for name in ("vision_ms", "prefill_ms", "decode_ms", "total_ms"):
            self.latencies.setdefault(name, deque(maxlen=window)).append(getattr(result, name))

    def percentiles(self) -> dict[str, tuple[float, float, float]]:
        """p50, p90, p99 of each stage over the recent window."""
        out = {}
        for name, values in self.latencies.items():
            ordered = sorted(values)
            pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
            out[name] = (pick(0.5), pick(0.9), pick(0.99))
        return out


SHUTTING_DOWN_MESSAGE = "the node is shutting down"


def _too_long(check: Callable[[], None]) -> str | None:
    """The PromptTooLongError's message that check raises, or None."""
    try:
        check()
    except PromptTooLongError as e:
        return str(e)
    return None


class SceneServer:
    """One model, one worker thread, a bounded queue of jobs in front of it."""

    def __init__(self, pipeline, frames: FrameStore, config: ServerConfig, frame_age: FrameAge | None = None,
                 monitors: MonitorBoard | None = None, monotonic: Callable[[], float] = time.monotonic):
        self.pipeline = pipeline
        self.frames = frames
        self.config = config
        self.frame_age = frame_age or FrameAge(config.frame_age_from)
        self.monitors = monitors or MonitorBoard()
        self._monotonic = monotonic
        self.stats = Stats()
        self._stats_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._work = threading.Condition(self._state_lock)  # the worker waits on it for jobs or the stop
        self._queue: deque[Job] = deque()
        self._current: list[Job] = []  # the batch the worker runs
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="mobilevlm-inference", daemon=True)
        self._worker.start()

    def update(self, **changes) -> None:
        """Change live settings (max_frame_age_s, max_new_tokens, temperature): the next request uses them."""
        self.config = replace(self.config, **changes)

    # --- submission (any thread, never blocks) -------------------------------------------------------------
    def submit(self, request: SceneRequest,
               on_text: Callable[[str, str, int], None] | None = None) -> Job:
        """Validate and enqueue. Problems known up front come back as a job that is already done."""
        config = self.config
        camera_id = request.camera_id or config.default_camera
        params = SamplingParams(
            max_new_tokens=request.max_new_tokens or config.max_new_tokens,
            temperature=config.temperature if request.temperature < 0 else request.temperature)
        job = Job(request, camera_id, params, on_text)
        problem = self._check(request, camera_id, params)
        if problem is None and any(request.frame_stamp):
            job.frame = self.frames.find(camera_id, *request.frame_stamp)
            if job.frame is None:
                problem = self._frame_gone(camera_id, request.frame_stamp)
        if problem is None:
            problem = self._enqueue(job)
        if problem is not None:
            self._finish(job, problem)
        return job

    def _frame_gone(self, camera_id: str, stamp: tuple[int, int]) -> SceneResult:
        held = self.frames.held(camera_id)
        span = (f"it holds {len(held)}, stamped {held[0].stamp_sec}.{held[0].stamp_nanosec:09d} to "
                f"{held[-1].stamp_sec}.{held[-1].stamp_nanosec:09d}" if held else "it holds none")
        return _failure(ErrorCode.FRAME_GONE, f"no frame of camera {camera_id!r} stamped {stamp[0]}.{stamp[1]:09d} "
                        f"is held ({span}; frame_history {self.frames.history})", camera_id)

    def submit_caption(self, camera_id: str, prompt: str, max_new_tokens: int,
                       last_seq: int) -> Job | None:
        """A caption of the newest frame, only if the worker is idle and the frame is newer than last_seq:
        captions never queue behind (or ahead of) questions and never repeat an unchanged frame."""
        return self.submit_captions({camera_id: last_seq}, prompt, max_new_tokens).get(camera_id)

    def submit_captions(self, last_seqs: dict[str, int], prompt: str, max_new_tokens: int) -> dict[str, Job]:
        """submit_caption for several cameras (camera id -> its last captioned seq) at once: the jobs of the
        cameras with a new frame are queued together, so the worker runs them as one batch (up to max_batch)."""
        frames = {}
        for camera_id, last_seq in last_seqs.items():
            frame = self.frames.latest(camera_id)
            if frame is not None and frame.seq > last_seq and self._frame_problem(camera_id, frame) is None:
                frames[camera_id] = frame
        if not frames:
            return {}
        with self._state_lock:
            if self._closed or self._current or self._queue:
                with self._stats_lock:
                    self.stats.captions_skipped += len(frames)
                return {}
            jobs = {camera_id: Job(SceneRequest(prompt, camera_id), camera_id,
                                   SamplingParams(max_new_tokens=max_new_tokens), is_caption=True,
                                   not_before_seq=frame.seq) for camera_id, frame in frames.items()}
            for job in jobs.values():
                self._put(job)
        return jobs

    def prompt_fits(self, prompt: str, max_new_tokens: int) -> str | None:
        """Why a question (or caption prompt) with max_new_tokens cannot run in this model's context, or None."""
        return _too_long(lambda: self.pipeline.check_fits(self.pipeline.prompt_ids(prompt), max_new_tokens))

    def choices_fit(self, question: str, choices) -> str | None:
        """Why a question with these choices cannot be scored in this model's context, or None (the pipeline's
        check_choices_fit)."""
        return _too_long(lambda: self.pipeline.check_choices_fit(self.pipeline.prompt_ids(question),
                                                                 self.pipeline.choice_ids(question, list(choices))))

    def _check(self, request: SceneRequest, camera_id: str, params: SamplingParams) -> SceneResult | None:
        question = request.question.strip()
        if not question:
            return _failure(ErrorCode.BAD_REQUEST, "the question is empty", camera_id)
        limit = self.config.max_question_chars
        if len(request.question) > limit:
            return _failure(ErrorCode.BAD_REQUEST, f"the question has {len(request.question)} characters; "
                            f"the limit is {limit}", camera_id)
        try:
            params.validate()
            if request.choices:
                check_choices(request.choices)
                if request.temperature > 0:
                    raise ValueError(f"temperature {request.temperature:g} with choices: choices are scored, not "
                                     "sampled; give temperature 0 or negative")
        except ValueError as e:
            return _failure(ErrorCode.BAD_REQUEST, str(e), camera_id)
        if camera_id not in self.config.cameras:
            return _failure(ErrorCode.UNKNOWN_CAMERA, f"unknown camera {camera_id!r}; configured: "
                            f"{', '.join(self.config.cameras)}", camera_id)
        too_long = (self.choices_fit(question, request.choices) if request.choices
                    else self.prompt_fits(question, params.max_new_tokens))
        if too_long:
            return _failure(ErrorCode.PROMPT_TOO_LONG, too_long, camera_id)
        if any(request.frame_stamp):
            return None  # a named frame: held or FRAME_GONE (submit), whatever its age
        return self._frame_problem(camera_id, self.frames.latest(camera_id))

    def _frame_problem(self, camera_id: str, frame: Frame | None) -> SceneResult | None:
        if frame is None:
            return _failure(ErrorCode.NO_FRAME, f"no frame received yet from camera {camera_id!r}", camera_id)
        limit = self.config.max_frame_age_s
        age, judged = self.frame_age(frame)
        if age > limit:
            return _failure(ErrorCode.STALE_FRAME, f"the newest frame of camera {camera_id!r} is {age:.2f} s old "
                            f"{judged} (max_frame_age_s {limit:g}, frame_age_from {self.frame_age.source})",
                            camera_id, frame)
        return None

    def _put(self, job: Job) -> None:
        """Append to the queue (the state lock held) and wake the worker."""
        job.on_cancel = self._cancel_queued
        self._queue.append(job)
        self._work.notify()

    def _enqueue(self, job: Job) -> SceneResult | None:
        """Queue a request; monitor ticks still waiting make way for it (requests take priority)."""
        with self._state_lock:
            if self._closed:
                return _failure(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE, job.camera_id)
            ticks = [queued for queued in self._queue if queued.monitors]
            if len(self._queue) - len(ticks) >= self.config.queue_length:
                return _failure(ErrorCode.BUSY, f"{self.config.queue_length} requests are already waiting; "
                                "try again later", job.camera_id)
            for tick in ticks:
                self._queue.remove(tick)
            self._put(job)
        for tick in ticks:
            self._skip(tick)
        return None

    def monitor_problem(self, monitor: Monitor) -> SceneResult | None:
        """Why monitor cannot run on this server (its values, its camera, its fit in the context), or None."""
        problem = monitor_problem(monitor.name, monitor.question, monitor.rate_hz, monitor.choices)
        if problem:
            return _failure(ErrorCode.BAD_REQUEST, problem, monitor.camera_id)
        if monitor.camera_id not in self.config.cameras:
            return _failure(ErrorCode.UNKNOWN_CAMERA, f"monitor {monitor.name}: unknown camera "
                            f"{monitor.camera_id!r}; configured: {', '.join(self.config.cameras)}", monitor.camera_id)
        too_long = self.choices_fit(monitor.question.strip(), monitor.choices)
        if too_long:
            return _failure(ErrorCode.PROMPT_TOO_LONG, f"monitor {monitor.name}: {too_long}", monitor.camera_id)
        return None

    def set_monitor(self, name: str, question: str, camera_id: str = "", rate_hz: float = 0.0,
                    choices: tuple[str, ...] = ()) -> SceneResult | None:
        """Add or change the monitor ``name`` (camera_id empty: the default camera; rate_hz 0: the parameters'
        default; choices empty: yes/no), or with an empty question remove it. None on success, else the failure
        (nothing changed)."""
        if not question.strip():
            if self.monitors.remove(name):
                return None
            return _failure(UNKNOWN_MONITOR, f"no monitor named {name!r} (monitors: "
                            f"{', '.join(m.name for m in self.monitors.all()) or 'none'})")
        monitor = Monitor(name, question, camera_id or self.config.default_camera, rate_hz or DEFAULT_RATE_HZ,
                          tuple(choices) or DEFAULT_CHOICES)
        problem = self.monitor_problem(monitor)
        if problem is None:
            self.monitors.set(monitor)
        return problem

    def _skip(self, tick: Job) -> None:
        with self._stats_lock:
            self.stats.monitors_skipped += len(tick.monitors)
        tick.finish(_failure(ErrorCode.CANCELLED, "monitor tick skipped: requests take priority", tick.camera_id))

    # --- monitors ---------------------------------------------------------------------------------------------
    def submit_monitors(self, camera_id: str) -> Job | None:
        """A tick of the monitors of camera_id that are due on its newest frame (call it when a frame arrives):
        one job answering them all about that frame, or None when none is due, the frame is stale, or requests
        are waiting or running (the tick is then skipped, and counted)."""
        frame = self.frames.latest(camera_id)
        if frame is None or self._frame_problem(camera_id, frame) is not None:
            return None
        due = tuple(self.monitors.take_due(camera_id, frame.seq, self._monotonic()))
        if not due:
            return None
        with self._state_lock:
            # Requests first; and at most one tick per camera waits, so a slow worker never piles them up.
            busy = self._closed or any(job.is_request or (job.monitors and job.camera_id == camera_id)
                                       for job in (*self._current, *self._queue))
            if not busy:
                job = Job(SceneRequest("", camera_id), camera_id, SamplingParams(), frame=frame, monitors=due)
                self._put(job)
        if busy:
            with self._stats_lock:
                self.stats.monitors_skipped += len(due)
            return None
        return job

    def _cancel_queued(self, job: Job) -> None:
        """A cancelled job that has not started leaves the queue and is answered now, not after the running one.
        (A running job sees the cancel itself, within one token.)"""
        with self._state_lock:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # running, finished, or taken by a shutdown
        self._finish(job, _failure(ErrorCode.CANCELLED, "cancelled while waiting in the queue", job.camera_id))

    def _finish(self, job: Job, result: SceneResult) -> None:
        with self._stats_lock:
            if result.success or result.error_code == ErrorCode.INFERENCE_FAILED:
                self.stats.recent_failures.append(not result.success)
            if result.success:
                self.stats.record(result, self.config.latency_window)
                if job.is_caption:
                    self.stats.captions += 1
                elif job.monitors:
                    self.stats.monitor_answers += len(result.monitor_answers)
                else:
                    self.stats.answered += 1
            elif result.error_code == ErrorCode.BUSY:
                self.stats.rejected_busy += 1
            else:
                self.stats.failed += 1
                self.stats.inference_failed += result.error_code == ErrorCode.INFERENCE_FAILED
        job.finish(result)

    # --- the worker -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._work:
                self._work.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed, and shutdown answered everything that was queued
                batch = min(len(self._queue), self.config.max_batch)
                jobs = self._current = [self._queue.popleft() for _ in range(batch)]
            try:
                self._answer(jobs)
            except Exception as e:  # the worker must survive anything the model throws
                for job in jobs:
                    if not job.done:
                        self._finish(job, _failure(ErrorCode.INFERENCE_FAILED, f"{type(e).__name__}: {e}",
                                                   job.camera_id))
            finally:
                with self._state_lock:
                    self._current = []

    def _answer(self, jobs: list[Job]) -> None:
        """Answer jobs: those that cannot run (cancelled, shutting down, frame problems) at once, the others in
        one batch (a model failure fails every job of it: _run)."""
        ready: list[tuple[Job, Frame, object]] = []
        for job in jobs:
            prepared = self._prepare(job)
            if isinstance(prepared, SceneResult):
                self._finish(job, prepared)
            else:
                ready.append((job, *prepared))
        scored = [entry for entry in ready if entry[0].scores_choices]
        generated = [entry for entry in ready if not entry[0].scores_choices]
        if scored:  # first: scoring is one forward, generation many
            for (job, frame, _), choices in zip(scored, self._choose(scored)):
                self._finish(job, self._choice_result(job, frame, choices))
        if generated:
            for (job, frame, _), answer in zip(generated, self._infer(generated)):
                self._finish(job, self._result(job, frame, answer))

    def _prepare(self, job: Job) -> SceneResult | tuple[Frame, object]:
        """The frame a job answers about and its image, or why it does not run."""
        if job.cancelled:
            return _failure(ErrorCode.CANCELLED, "cancelled before inference started", job.camera_id)
        if self._closed:
            return _failure(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE, job.camera_id)
        frame = job.frame
        if frame is None:
            # The newest frame at the moment inference starts, not the one seen at submission: a request that
            # waited in the queue must still answer about the present.
            frame = self.frames.latest(job.camera_id)
            problem = self._frame_problem(job.camera_id, frame)
            if problem is not None:
                return problem
        try:
            image = frame.rgb()
        except FrameError as e:
            return _failure(e.code, e.message, job.camera_id, frame)
        self.frames.keep(frame)  # its answer names it: a follow-up may ask about it (frame_stamp)
        return frame, image

    def _infer(self, ready: list[tuple[Job, Frame, object]]) -> list:
        """The pipeline's answers for the ready jobs: ask for one, ask_batch for several."""
        on_text = [self._streamer(job) for job, _, _ in ready]
        cancelled = [lambda job=job: job.cancelled or self._closed for job, _, _ in ready]
        keys = [(job.camera_id, frame.seq) for job, frame, _ in ready]
        if len(ready) == 1:
            job, _, image = ready[0]
            return [self.pipeline.ask(image, job.request.question.strip(), job.params, on_text=on_text[0],
                                      cancelled=cancelled[0], frame_key=keys[0])]
        return self.pipeline.ask_batch([image for _, _, image in ready],
                                       [job.request.question.strip() for job, _, _ in ready],
                                       [job.params for job, _, _ in ready], on_text=on_text, cancelled=cancelled,
                                       frame_keys=keys)

    def _choose(self, scored: list[tuple[Job, Frame, object]]) -> list[list]:
        """The pipeline's choices for each job, in one choose_batch: a request's one row, a monitor tick's one row
        per monitor (all about its frame, under one key: one vision pass and one shared prefix)."""
        rows = [(job, frame, image, monitor.question.strip(), monitor.choices) for job, frame, image in scored
                for monitor in job.monitors] + \
               [(job, frame, image, job.request.question.strip(), job.request.choices)
                for job, frame, image in scored if not job.monitors]
        choices = self.pipeline.choose_batch([image for _, _, image, _, _ in rows], [q for _, _, _, q, _ in rows],
                                             [list(c) for _, _, _, _, c in rows],
                                             frame_keys=[(job.camera_id, frame.seq) for job, frame, _, _, _ in rows])
        by_job: dict[Job, list] = {}
        for (job, *_), choice in zip(rows, choices):
            by_job.setdefault(job, []).append(choice)
        return [by_job[job] for job, _, _ in scored]

    def _choice_result(self, job: Job, frame: Frame, choices: list) -> SceneResult:
        """A request's answer (its one choice), or a monitor tick's (one per monitor, recorded on the board)."""
        t = choices[0].timings
        result = SceneResult(success=True, camera_id=job.camera_id, frame=frame,
                             vision_ms=t["preprocess_ms"] + t["vision_ms"], prefill_ms=t["prefill_ms"],
                             decode_ms=t["score_ms"], total_ms=(time.monotonic() - job.submitted) * 1e3)
        if job.monitors:
            result.monitor_answers = [self.monitors.record(monitor, choice.answer, choice.probabilities[choice.index])
                                      for monitor, choice in zip(job.monitors, choices)]
        else:
            result.answer, result.choice_probabilities = choices[0].answer, list(choices[0].probabilities)
        return result

    @staticmethod
    def _streamer(job: Job) -> Callable[[str, int], None]:
        """The pipeline's on_text for a job: each piece with the partial answer so far, to the job's on_text."""
        partial: list[str] = []

        def on_text(piece: str, tokens: int) -> None:
            partial.append(piece)
            if job.on_text is not None:
                job.on_text(piece, "".join(partial), tokens)

        return on_text

    def _result(self, job: Job, frame: Frame, answer) -> SceneResult:
        t = answer.timings
        result = SceneResult(success=True, answer=answer.text, camera_id=job.camera_id, frame=frame,
                             tokens_generated=len(answer.generated_ids), vision_ms=t["preprocess_ms"] + t["vision_ms"],
                             prefill_ms=t["prefill_ms"], decode_ms=t["decode_ms"],
                             total_ms=(time.monotonic() - job.submitted) * 1e3)
        if answer.stopped_by == "cancelled":
            code, message = ((ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE) if self._closed
                             else (ErrorCode.CANCELLED, "cancelled during inference"))
            result.success, result.error_code, result.error_message = False, code, message
        return result

    # --- state for diagnostics and shutdown ------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        with self._state_lock:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        with self._state_lock:
            return bool(self._current) or bool(self._queue)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new work, answer every queued job with SHUTTING_DOWN, stop the running one within a token."""
        with self._work:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            self._work.notify_all()
        for job in queued:
            self._finish(job, _failure(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE, job.camera_id))
        self._worker.join(timeout)


class AdmissionGate:
    """Whether requests reach the server now, and what they are answered when they do not: the lifecycle's door.

    Closed (unconfigured, inactive): requests are answered NOT_ACTIVE at once; shutting down: SHUTTING_DOWN. A
    request past the gate is counted until its job is registered, and closing waits for that count to drop to zero,
    so a deactivate sees every job submitted before it closed the gate. (The submission itself runs outside the
    lock: requests validate and tokenize in parallel, as they do without the gate.)
    """

    def __init__(self, state: str = "unconfigured"):
        self._lock = threading.Condition()  # guards everything below
        self._server: SceneServer | None = None
        self._accepting = False
        self._submitting = 0  # requests past the gate whose server.submit has not returned yet
        self._refusal = (ErrorCode.NOT_ACTIVE, "")
        self._jobs: set[Job] = set()  # submitted requests not yet answered
        self._deactivated: set[Job] = set()  # cancelled by a deactivate
        self._deactivate_timeout_s = 0.0
        self.rejected_not_active = 0
        self.state = state
        self.set_state(state)

    def set_state(self, state: str) -> None:
        """The lifecycle label, for messages; while closed for NOT_ACTIVE, the refusal names it."""
        with self._lock:
            self.state = state
            if not self._accepting and self._refusal[0] == ErrorCode.NOT_ACTIVE:
                self._refusal = (ErrorCode.NOT_ACTIVE, f"the node is {state}" + (
                    "; activate it (lifecycle) to serve requests" if state in ("unconfigured", "inactive") else ""))

    def open(self, server: SceneServer) -> None:
        with self._lock:
            self._server = server
            self._accepting = True

    def submit(self, request: SceneRequest, on_text: Callable[[str, str, int], None] | None = None) -> Job:
        """The server's job while the gate is open; otherwise one already answered NOT_ACTIVE / SHUTTING_DOWN."""
        with self._lock:
            server = self._server
            if not (self._accepting and server is not None):
                code, message = self._refusal
                if code == ErrorCode.NOT_ACTIVE:
                    self.rejected_not_active += 1
                return answered_job(request, code, message)
            self._submitting += 1
        job = None
        try:
            job = server.submit(request, on_text)
            return job
        finally:
            with self._lock:
                self._submitting -= 1
                if job is not None and not job.done:
                    self._jobs.add(job)
                self._lock.notify_all()

    def close(self, code: str, message: str) -> list[Job]:
        """Refuse new requests from now on (NOT_ACTIVE or SHUTTING_DOWN, with message); returns every job
        submitted before (none is still being submitted). A SHUTTING_DOWN refusal is final."""
        with self._lock:
            self._accepting = False
            if self._refusal[0] != ErrorCode.SHUTTING_DOWN:
                self._refusal = (code, message)
            self._lock.wait_for(lambda: self._submitting == 0, timeout=30.0)
            return list(self._jobs)

    def deactivate(self, timeout_s: float) -> tuple[int, int]:
        """Close (NOT_ACTIVE), let the requests in flight finish for timeout_s, then cancel the rest: they are
        answered NOT_ACTIVE. Returns (in flight, cancelled)."""
        self._deactivate_timeout_s = timeout_s
        jobs = self.close(ErrorCode.NOT_ACTIVE, "the node is inactive (deactivated)")
        deadline = time.monotonic() + timeout_s
        for job in jobs:
            job.wait(max(0.0, deadline - time.monotonic()))
        late = [job for job in jobs if not job.done]
        with self._lock:
            self._deactivated.update(late)  # before the cancel, so the answer already says NOT_ACTIVE
        for job in late:
            job.cancel()  # the worker stops within one token; queued ones are answered at once
        for job in late:
            job.wait(30.0)
        return len(jobs), len(late)

    def result(self, job: Job) -> SceneResult:
        """The job's result; a cancel caused by a deactivate is reported as NOT_ACTIVE, not as a client cancel."""
        result = job.result
        with self._lock:
            self._jobs.discard(job)
            deactivated = job in self._deactivated
            self._deactivated.discard(job)
        if deactivated and result.error_code == ErrorCode.CANCELLED:
            result = replace(result, error_code=ErrorCode.NOT_ACTIVE, error_message=(
                f"the node was deactivated; this request was cancelled after waiting deactivate_timeout_s "
                f"{self._deactivate_timeout_s:g} ({result.error_message})"))
        return result

    def detach(self) -> SceneServer | None:
        """Forget the server (cleanup); returns it so the caller can shut it down."""
        with self._lock:
            server, self._server = self._server, None
            return server
