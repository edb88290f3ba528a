"""Engine provisioning: the build lock (two processes racing for one engine: exactly one builds), the no-build cache
check against this device, and the torch fallback. ONNX Runtime's cached optimised model stands in for a TensorRT
engine (same cache, same key fields), so all of this runs without TensorRT."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from conftest import CHECKPOINTS

try:
    import onnx  # noqa: F401
    import onnxruntime as ort
except ImportError:  # the lock test still runs
    ort = None
from requirements import needs_modules  # noqa: E402

needs_ort = needs_modules("onnx", "onnxruntime", why="onnxruntime and onnx stand in for TensorRT here (test extra)")

from mobilevlm_ros.engines import VisualEncoder, cached_onnx  # noqa: E402
from mobilevlm_ros.engines import provision  # noqa: E402
from mobilevlm_ros.engines.provision import (EngineUnavailable, LockTimeout, check_engines, file_lock,  # noqa: E402
                                             onnx_path_for, provision_visual_encoder)

MODEL = CHECKPOINTS / "MobileVLM_V2-tiny"

RACER = r"""
import json, sys, time
from pathlib import Path
import torch
from mobilevlm_ros.engines import onnxrt
from mobilevlm_ros.engines.provision import provision_visual_encoder
from mobilevlm_ros.model import MobileVLMPipeline

model_dir, engines, work, name = sys.argv[1:5]
pipeline = MobileVLMPipeline.load(model_dir)
builds = []
real_build = onnxrt.build_ort_engine

def wait_for(condition, what):
    deadline = time.monotonic() + 180
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"racer {name}: no {what} within 180 s")
        time.sleep(0.01)

def slow_build(onnx_path, out_path, device):  # a build that lasts until the other racer waits for the lock
    builds.append(time.time())
    wait_for(lambda: any(Path(work).glob("waiting-*")), "other racer waiting for the lock")
    real_build(onnx_path, out_path, device)

def log(line):
    if line.startswith("waiting for another process"):
        Path(work, f"waiting-{name}").touch()

onnxrt.build_ort_engine = slow_build
Path(work, f"ready-{name}").touch()
wait_for(lambda: Path(work, "go").exists(), "go")
encode, info = provision_visual_encoder("onnxruntime", pipeline.model, engines, allow_build=True, fallback=False,
                                        log=log)
x = torch.zeros(1, 3, 336, 336)
ref = pipeline.model.encode_images(x)
print(json.dumps({"built": info.built, "build_calls": len(builds), "waited": info.waited_for_lock,
                  "engine": info.engine, "max_error": float((encode(x) - ref).abs().max())}))
"""


def test_every_engine_backend_has_its_cache_suffix():
    from mobilevlm_ros.options import ENGINE_BACKENDS

    assert sorted(provision.ENGINE_SUFFIX) == sorted(ENGINE_BACKENDS)


def test_file_lock_excludes_other_holders(tmp_path):
    lock = tmp_path / "engines" / "visual.engine.lock"
    holding, release = threading.Event(), threading.Event()

    def holder():
        with file_lock(lock) as waited:
            assert waited is False
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(10)
        waits = []
        with pytest.raises(LockTimeout, match="still locked by another process"):
            with file_lock(lock, timeout_s=0.3, on_wait=waits.append):
                pass
        assert waits == [lock]
    finally:
        release.set()
        thread.join()
    with file_lock(lock, timeout_s=1.0) as waited:
        assert waited is False
    assert lock.exists()  # left in place on purpose


@needs_ort
def test_two_processes_racing_for_one_engine_build_it_once(tmp_path):
    engines = tmp_path / "engines"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(MODEL), str(engines), str(tmp_path), str(i)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline, "racers did not get ready"
            assert all(r.poll() is None for r in racers), [r.communicate() for r in racers]
            time.sleep(0.05)
        (tmp_path / "go").touch()  # both start provisioning at the same moment
        try:
            outputs = [r.communicate(timeout=180) for r in racers]
        except subprocess.TimeoutExpired:
            for r in racers:  # a live racer could wait forever on one that died: stop both, then report
                r.kill()
            pytest.fail(f"racers did not finish: {[r.communicate() for r in racers]}")
    finally:
        for r in racers:
            if r.poll() is None:
                r.kill()
    assert all(r.returncode == 0 for r in racers), [err for _, err in outputs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(r["built"] for r in reports) == [False, True], reports
    assert sum(r["build_calls"] for r in reports) == 1, reports
    loser = next(r for r in reports if not r["built"])
    assert loser["waited"] is True  # it waited on the lock, then loaded the winner's engine
    assert reports[0]["engine"] == reports[1]["engine"]
    assert all(r["max_error"] < 1e-4 for r in reports)
    assert len(list(engines.glob("*.ort.onnx"))) == 1
    assert len(list(engines.glob("*.ort.onnx.lock"))) == 1


@needs_ort
def test_onnx_path_matches_the_export_cache(pipelines, tmp_path):
    model = pipelines["MobileVLM_V2-tiny"].model
    encoder = VisualEncoder.from_model(model)
    expected = onnx_path_for(encoder, tmp_path, model.config.vision.image_size)
    assert not expected.exists()
    assert cached_onnx(encoder, tmp_path, image_size=model.config.vision.image_size) == expected


@needs_ort
def test_check_says_whether_the_cache_matches_this_device(pipelines, tmp_path, monkeypatch, capsys):
    model = pipelines["MobileVLM_V2-tiny"].model
    engines = tmp_path / "engines"
    empty = check_engines("onnxruntime", model, engines)
    assert empty["match"] is False and empty["onnx_present"] is False and "no ONNX export" in empty["reason"]

    with pytest.raises(EngineUnavailable, match="build_engines is false"):
        provision_visual_encoder("onnxruntime", model, engines, allow_build=False, fallback=False)
    _, info = provision_visual_encoder("onnxruntime", model, engines, allow_build=True)
    assert info.active == "onnxruntime" and info.built and not info.fell_back
    report = check_engines("onnxruntime", model, engines)
    assert report["match"] is True and report["reason"] is None and report["engine"] == info.engine
    assert report["key"]["runtime_version"] == ort.__version__ and report["key"]["device_name"] == "cpu"
    assert len(report["key"]["onnx_sha256"]) == 64
    _, again = provision_visual_encoder("onnxruntime", model, engines, allow_build=False)
    assert again.active == "onnxruntime" and not again.built  # from the cache, no build needed

    # A runtime upgrade on the robot: the cache no longer matches, and says what changed.
    monkeypatch.setattr(ort, "__version__", "99.0.0")
    upgraded = check_engines("onnxruntime", model, engines)
    assert upgraded["match"] is False and upgraded["reason"] == "changed: runtime_version"
    _, fallback = provision_visual_encoder("onnxruntime", model, engines, allow_build=False)
    assert fallback.active == "torch" and fallback.fell_back and "changed: runtime_version" in \
        fallback.fallback_reason
    monkeypatch.undo()

    # The command line (mobilevlm build-engines --check runs the same): 0 matches, 1 does not, 2 cannot check here.
    assert provision.main(["--check", "--model", str(MODEL), "--engines", str(engines),
                           "--backend", "onnxruntime"]) == 0
    assert json.loads(capsys.readouterr().out)["match"] is True
    assert provision.main(["--model", str(MODEL), "--engines", str(tmp_path / "other"),
                           "--backend", "onnxruntime"]) == 1
    import torch

    if not torch.cuda.is_available():
        assert provision.main(["--model", str(MODEL), "--engines", str(engines), "--backend", "tensorrt"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@needs_ort
def test_no_engine_to_be_had_falls_back_to_torch(pipelines, tmp_path):
    model = pipelines["MobileVLM_V2-tiny"].model
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU-only fallback is what is tested here")
    encode, info = provision_visual_encoder("tensorrt", model, tmp_path, allow_build=True)
    assert info.active == "torch" and info.requested == "tensorrt" and info.fell_back
    assert "CUDA" in info.fallback_reason or "TensorRT" in info.fallback_reason
    assert encode is None  # no engine: the pipeline keeps its torch vision encoder
    with pytest.raises(Exception):
        provision_visual_encoder("tensorrt", model, tmp_path, allow_build=True, fallback=False)
