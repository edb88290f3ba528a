"""The serving core without ROS: request validation, one inference worker behind a bounded queue, captions, stats,
and the admission gate that the node's lifecycle opens and closes.

The node (``mobilevlm_ros.node``) turns service calls, action goals and timer ticks into :class:`SceneRequest` s and
hands them to :class:`AdmissionGate` and :class:`SceneServer`; everything that decides *what* happens to a request
lives here, testable without DDS.

Threading: ``submit`` never blocks (a full queue answers BUSY at once); the model runs only on the worker thread;
a job's ``done`` event is set exactly once, on every path (answer, error, cancel, shutdown), so no caller waits
forever. Cancelling a job that still waits in the queue answers it CANCELLED at once.

Batching: the worker takes every job that is waiting when it is free, up to ``max_batch``, and runs them as one
batch (MobileVLMPipeline.ask_batch: each answer is the one the job gets alone); it never waits for more to come.
A lone job goes through MobileVLMPipeline.ask.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .camera import Frame, FrameAge, FrameError, FrameStore
from .model import PromptTooLongError, SamplingParams


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


@dataclass(frozen=True)
class SceneRequest:
    question: str
    camera_id: str = ""  # empty: the default camera
    max_new_tokens: int = 0  # 0: the server's default
    temperature: float = -1.0  # negative: the server's default; 0: greedy


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


class Job:
    """One accepted (or immediately answered) request. ``wait`` returns its result; ``cancel`` is honoured within
    one generated token."""

    def __init__(self, request: SceneRequest, camera_id: str, params: SamplingParams,
                 on_text: Callable[[str, str, int], None] | None = None, is_caption: bool = False,
                 not_before_seq: int = -1):
        self.request = request
        self.camera_id = camera_id
        self.params = params
        self.on_text = on_text  # (text_delta, partial_answer, tokens_so_far)
        self.is_caption = is_caption
        self.not_before_seq = not_before_seq
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


class SceneServer:
    """One model, one worker thread, a bounded queue of jobs in front of it."""

    def __init__(self, pipeline, frames: FrameStore, config: ServerConfig, frame_age: FrameAge | None = None):
        self.pipeline = pipeline
        self.frames = frames
        self.config = config
        self.frame_age = frame_age or FrameAge(config.frame_age_from)
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
        if problem is None:
            problem = self._enqueue(job)
        if problem is not None:
            self._finish(job, problem)
        return job

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
        try:
            self.pipeline.check_fits(self.pipeline.prompt_ids(prompt), max_new_tokens)
        except PromptTooLongError as e:
            return str(e)
        return None

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
        except ValueError as e:
            return _failure(ErrorCode.BAD_REQUEST, str(e), camera_id)
        if camera_id not in self.config.cameras:
            return _failure(ErrorCode.UNKNOWN_CAMERA, f"unknown camera {camera_id!r}; configured: "
                            f"{', '.join(self.config.cameras)}", camera_id)
        too_long = self.prompt_fits(question, params.max_new_tokens)
        if too_long:
            return _failure(ErrorCode.PROMPT_TOO_LONG, too_long, camera_id)
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
        with self._state_lock:
            if self._closed:
                return _failure(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE, job.camera_id)
            if len(self._queue) >= self.config.queue_length:
                return _failure(ErrorCode.BUSY, f"{self.config.queue_length} requests are already waiting; "
                                "try again later", job.camera_id)
            self._put(job)
        return None

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
        if not ready:
            return
        for (job, frame, _), answer in zip(ready, self._infer(ready)):
            self._finish(job, self._result(job, frame, answer))

    def _prepare(self, job: Job) -> SceneResult | tuple[Frame, object]:
        """The frame a job answers about and its image, or why it does not run."""
        if job.cancelled:
            return _failure(ErrorCode.CANCELLED, "cancelled before inference started", job.camera_id)
        if self._closed:
            return _failure(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE, job.camera_id)
        # The newest frame at the moment inference starts, not the one seen at submission: a request that waited
        # in the queue must still answer about the present.
        frame = self.frames.latest(job.camera_id)
        problem = self._frame_problem(job.camera_id, frame)
        if problem is not None:
            return problem
        try:
            return frame, frame.rgb()
        except FrameError as e:
            return _failure(e.code, e.message, job.camera_id, frame)

    def _infer(self, ready: list[tuple[Job, Frame, object]]) -> list:
        """The pipeline's answers for the ready jobs: ask for one, ask_batch for several."""
        on_text = [self._streamer(job) for job, _, _ in ready]
        cancelled = [lambda job=job: job.cancelled or self._closed for job, _, _ in ready]
        if len(ready) == 1:
            job, _, image = ready[0]
            return [self.pipeline.ask(image, job.request.question.strip(), job.params, on_text=on_text[0],
                                      cancelled=cancelled[0])]
        return self.pipeline.ask_batch([image for _, _, image in ready],
                                       [job.request.question.strip() for job, _, _ in ready],
                                       [job.params for job, _, _ in ready], on_text=on_text, cancelled=cancelled)

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
