"""The ROS-free serving core with the real tiny checkpoint: validation, queueing, cancel, failures, shutdown."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import CHECKPOINTS, REFERENCE, golden_cases
from mobilevlm_ros.camera import Frame, FrameStore
from mobilevlm_ros.model import MobileVLMPipeline
from mobilevlm_ros.server import ErrorCode, SceneRequest, SceneServer, ServerConfig

RGB = np.asarray(Image.open(REFERENCE / "images" / "img0_street_500x300_rgb.png").convert("RGB"))


@pytest.fixture(scope="module")
def pipeline():
    return MobileVLMPipeline.load(CHECKPOINTS / "MobileVLM_V2-tiny", max_seq_len=512)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def raw_frame(camera_id="front", seq=0, received=1000.0, encoding="rgb8", data=None, width=500):
    return Frame.from_raw(camera_id=camera_id, seq=seq, stamp_sec=42, stamp_nanosec=7, frame_id="cam_optical",
                          encoding=encoding, width=width, height=300, step=width * 3,
                          is_bigendian=False, data=RGB.tobytes() if data is None else data,
                          received_monotonic=received)


def make_server(pipeline, clock=None, **overrides):
    config = ServerConfig(cameras=("front", "rear"), default_camera="front", max_frame_age_s=1.0,
                          max_new_tokens=8, queue_length=2, **overrides)
    frames = FrameStore()
    server = SceneServer(pipeline, frames, config, clock=clock or Clock())
    return server, frames


def test_answer_carries_the_frame_and_timings(pipeline):
    server, frames = make_server(pipeline)
    frames.put(raw_frame())
    result = server.submit(SceneRequest("What is the robot doing on the street?")).wait(60)
    assert result.success and result.error_code == ""
    golden = golden_cases("MobileVLM_V2-tiny")[0]["generated_ids"][:8]  # the reference's greedy answer, 8 tokens
    assert result.answer == pipeline.tokenizer.decode(golden).strip()
    assert (result.frame.stamp_sec, result.frame.stamp_nanosec, result.frame.frame_id) == (42, 7, "cam_optical")
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
])
def test_requests_refused_up_front(pipeline, request_, code, message):
    server, frames = make_server(pipeline)
    frames.put(raw_frame())
    job = server.submit(request_)
    assert job.done  # answered at once, without the worker
    assert (job.result.success, job.result.error_code) == (False, code)
    assert message in job.result.error_message
    server.shutdown()


def test_stale_frame_is_refused_with_its_age(pipeline):
    clock = Clock()
    server, frames = make_server(pipeline, clock)
    frames.put(raw_frame(received=clock.now))
    clock.now += 1.5
    result = server.submit(SceneRequest("q")).wait(5)
    assert result.error_code == ErrorCode.STALE_FRAME and "1.50 s ago (max_frame_age_s 1.0)" in result.error_message
    assert result.frame is not None
    server.shutdown()


@pytest.mark.parametrize("frame,code,message", [
    (raw_frame(encoding="32FC1"), ErrorCode.UNSUPPORTED_ENCODING, "32FC1"),
    (raw_frame(data=RGB.tobytes()[:1000]), ErrorCode.BAD_FRAME, "wrong data length"),
    (Frame.from_compressed(camera_id="front", seq=0, stamp_sec=1, stamp_nanosec=0, frame_id="f", format="jpeg",
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
    server, frames = make_server(pipeline)
    frames.put(raw_frame())
    real_encoder = pipeline.encode_images

    def failing_encoder(pixels):  # what a CUDA out-of-memory in the vision encoder looks like to the worker
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    pipeline.encode_images = failing_encoder
    try:
        result = server.submit(SceneRequest("q")).wait(30)
    finally:
        pipeline.encode_images = real_encoder
    assert result.error_code == ErrorCode.INFERENCE_FAILED and "CUDA out of memory" in result.error_message
    assert server.submit(SceneRequest("q")).wait(60).success
    assert server.stats.inference_failed == 1
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
    assert 1 <= codes.count("") <= 20 and codes.count(ErrorCode.BUSY) >= 20 - 3 - 8  # at most 2 queued + 1 running
    assert server.stats.rejected_busy == codes.count(ErrorCode.BUSY)
    server.shutdown()


def test_cancel_mid_generation_and_shutdown_answer_everyone(pipeline):
    server, frames = make_server(pipeline)
    frames.put(raw_frame())
    started = threading.Event()
    running = server.submit(SceneRequest("q", max_new_tokens=300), on_text=lambda *_: started.set())
    queued = server.submit(SceneRequest("q", max_new_tokens=300))
    assert started.wait(60)
    running.cancel()
    result = running.wait(30)
    assert result.error_code == ErrorCode.CANCELLED and result.tokens_generated < 300
    while not server.busy:  # the queued job has started
        time.sleep(0.01)
    waiting = server.submit(SceneRequest("q", max_new_tokens=300))
    server.shutdown()
    for job in (queued, waiting):
        assert job.wait(30).error_code == ErrorCode.SHUTTING_DOWN
    assert server.submit(SceneRequest("q")).result.error_code == ErrorCode.SHUTTING_DOWN


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
