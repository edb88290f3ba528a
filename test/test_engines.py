"""Visual engines: ONNX export + ONNX Runtime against PyTorch and the reference goldens, the engine cache (with
ONNX Runtime standing in for TensorRT), the CLIs' backend options, and TensorRT where it exists."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CHECKPOINT_NAMES, CHECKPOINTS, REFERENCE
from requirements import require_module

ort = require_module("onnxruntime")
require_module("onnx")

from mobilevlm_ros.engines import (EngineCache, EngineKey, EngineRejected, VisualEncoder, export_onnx,  # noqa: E402
                                   file_sha256, make_visual_encoder, reference_validator)
from mobilevlm_ros.engines import tensorrt_backend  # noqa: E402
from mobilevlm_ros.engines.onnxrt import OnnxRuntimeVisualEncoder, build_ort_engine, ort_engine_key  # noqa: E402
from mobilevlm_ros.model import MobileVLMPipeline  # noqa: E402

STEMS = sorted(p.stem for p in (REFERENCE / "images").iterdir())
TRT_MODULE = Path(tensorrt_backend.__file__)


def pixels(stem: str) -> torch.Tensor:
    return load_file(REFERENCE / "goldens" / "pixel_values" / f"{stem}.safetensors")["pixel_values"]


@pytest.fixture(scope="module")
def tiny_onnx(pipelines, tmp_path_factory):
    out = {}
    for name in CHECKPOINT_NAMES:
        path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
        out[name] = export_onnx(VisualEncoder.from_model(pipelines[name].model), path)
    return out


@pytest.mark.parametrize("checkpoint", CHECKPOINT_NAMES)
def test_onnxruntime_matches_goldens_and_torch(pipelines, tiny_onnx, checkpoint):
    model = pipelines[checkpoint].model
    encoder = OnnxRuntimeVisualEncoder(tiny_onnx[checkpoint])
    batch = torch.cat([pixels(s) for s in STEMS])  # one call for all images: the batch axis is dynamic
    out = encoder(batch)
    with torch.inference_mode():
        ref = model.encode_images(batch)
    assert out.shape == (len(STEMS), 144, model.config.llama.hidden_size)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    for i, stem in enumerate(STEMS):
        golden = load_file(REFERENCE / "goldens" / checkpoint / f"vision_{stem}.safetensors")["projector_output"]
        torch.testing.assert_close(out[i:i + 1], golden, atol=1e-4, rtol=0)


def test_onnx_graph_is_opset17_with_dynamic_batch(tiny_onnx):
    import onnx

    proto = onnx.load(str(tiny_onnx[CHECKPOINT_NAMES[0]]))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 336, 336]
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param


@pytest.fixture(scope="module")
def full_vision():
    """The full-size MobileVLM-1.7B vision tower (ViT-L/14 @336, 23 of 24 layers) and LDP projector,
    seeded random weights, built once; ~320 M parameters."""
    from mobilevlm_ros.bench.models import random_mobilevlm, real_config

    model = random_mobilevlm(real_config("MobileVLM-1.7B"), torch.float32, seed=0, llm=False)
    return VisualEncoder.from_model(model)  # the decoder stays on the meta device: no memory


def test_full_size_vision_tower_onnxruntime(full_vision, tmp_path):
    assert len(full_vision.vision_tower.encoder.layers) == 23
    onnx_path = export_onnx(full_vision, tmp_path / "visual.onnx")
    encoder = OnnxRuntimeVisualEncoder(onnx_path)
    from mobilevlm_ros.engines import random_pixels

    x = random_pixels(1, seed=3)
    with torch.inference_mode():
        ref = full_vision(x)
    out = encoder(x)
    assert out.shape == (1, 144, 2048)
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, scale), (out - ref).abs().max().item()


# ---------------------------------------------------------------------------------------------- engine cache


def _ort_build(onnx_path: Path):
    return lambda tmp: build_ort_engine(onnx_path, tmp, torch.device("cpu"))


def test_engine_cache_builds_once_and_rebuilds_on_any_key_change(pipelines, tiny_onnx, tmp_path):
    onnx_path = tiny_onnx[CHECKPOINT_NAMES[0]]
    model = pipelines[CHECKPOINT_NAMES[0]].model
    validate = reference_validator(VisualEncoder.from_model(model), batch=1)
    check = lambda p: validate(OnnxRuntimeVisualEncoder(p))  # noqa: E731
    cache = EngineCache(tmp_path / "engines", suffix=".ort.onnx")
    key = ort_engine_key(onnx_path, torch.device("cpu"))
    assert key.onnx_sha256 == file_sha256(onnx_path)
    assert cache.reason_to_build(key) == "no engine built yet"

    first = cache.get_or_build(key, _ort_build(onnx_path), check, tolerance=1e-4)
    assert first.built and first.engine.is_file() and first.meta["validation_error"] <= 1e-4
    again = cache.get_or_build(key, lambda tmp: pytest.fail("must not rebuild"), check, tolerance=1e-4)
    assert not again.built and again.engine == first.engine

    from dataclasses import replace

    for field, value in [("runtime_version", "0.0.0"), ("device_name", "Orin"), ("compute_capability", "8.7"),
                         ("precision", "fp16"), ("onnx_sha256", "0" * 64)]:
        changed = replace(key, **{field: value})
        assert cache.lookup(changed) is None
        assert field in cache.reason_to_build(changed)
    # a different ONNX file (other weights) is a different key, and the build prunes the stale engine
    other_onnx = tiny_onnx[CHECKPOINT_NAMES[1]]
    other = ort_engine_key(other_onnx, torch.device("cpu"))
    assert other.digest() != key.digest()
    built = cache.get_or_build(other, _ort_build(other_onnx))
    assert built.built and not first.engine.exists() and cache.lookup(key) is None


def test_engine_cache_rejects_altered_files_and_disagreeing_engines(tiny_onnx, tmp_path):
    onnx_path = tiny_onnx[CHECKPOINT_NAMES[0]]
    cache = EngineCache(tmp_path, suffix=".ort.onnx")
    key = ort_engine_key(onnx_path, torch.device("cpu"))
    entry = cache.get_or_build(key, _ort_build(onnx_path))
    with open(entry.engine, "ab") as f:  # a truncated copy or bit rot: the recorded hash no longer matches
        f.write(b"\0")
    assert cache.lookup(key) is None
    assert "altered" in cache.reason_to_build(key)
    assert cache.get_or_build(key, _ort_build(onnx_path)).built

    key2 = EngineKey("visual", file_sha256(onnx_path), "onnxruntime", "x", "cpu", "", "fp32")
    with pytest.raises(EngineRejected):
        cache.get_or_build(key2, _ort_build(onnx_path), validate=lambda p: 0.5, tolerance=1e-2)
    with pytest.raises(EngineRejected):  # NaN never passes
        cache.get_or_build(key2, _ort_build(onnx_path), validate=lambda p: float("nan"), tolerance=1e-2)
    assert not cache.engine_path(key2).exists() and not cache.meta_path(key2).exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_pipeline_with_onnxruntime_backend_generates_the_same_answer(pipelines, tmp_path):
    """An engine read off a pipeline's model (its layers on oneDNN) leaves that model as it was, and a pipeline
    built with it answers as the torch encoder does."""
    from PIL import Image

    from mobilevlm_ros.model import SamplingParams
    from mobilevlm_ros.model.pipeline import load_checkpoint

    vlm = pipelines["MobileVLM_V2-tiny"]
    layers = [(name, type(m)) for name, m in vlm.model.named_modules()]
    image = Image.open(REFERENCE / "images" / "demo.jpg")
    params = SamplingParams(max_new_tokens=8)
    expected = vlm.ask(image, "What is this?", params)
    engine = make_visual_encoder("onnxruntime", vlm.model, tmp_path)
    assert [(name, type(m)) for name, m in vlm.model.named_modules()] == layers
    again = make_visual_encoder("onnxruntime", vlm.model, tmp_path)  # second start: everything cached
    assert len(list(tmp_path.glob("*.onnx"))) == 2  # the export and ONNX Runtime's optimised model
    assert again.path == engine.path
    model, tokenizer = load_checkpoint(CHECKPOINTS / "MobileVLM_V2-tiny")
    with_engine = MobileVLMPipeline(model, tokenizer, vlm.max_seq_len, vlm.fast_paths, engine)
    assert with_engine.encode_images is engine
    assert with_engine.ask(image, "What is this?", params).generated_ids == expected.generated_ids
    for backend in ("torch", "openvino"):  # torch has no engine: the pipeline's own encoder is the torch one
        with pytest.raises(ValueError):
            make_visual_encoder(backend, vlm.model, tmp_path)


def test_an_engine_releases_the_torch_vision_tower(tmp_path):
    """Once an engine encodes the images (as the node and mobilevlm ask do), the torch vision tower and projector
    are freed (nothing else holds them), the answers stay the same, and the model says why it cannot encode."""
    import gc
    import weakref

    from PIL import Image

    from mobilevlm_ros.model import SamplingParams
    from mobilevlm_ros.model.pipeline import choose_fast_paths, load_checkpoint
    from mobilevlm_ros.model.quantize import weight_bytes

    image = Image.open(REFERENCE / "images" / "demo.jpg")
    params = SamplingParams(max_new_tokens=8)
    expected = MobileVLMPipeline.load(CHECKPOINTS / "MobileVLM_V2-tiny").ask(image, "What is this?", params)
    model, tokenizer = load_checkpoint(CHECKPOINTS / "MobileVLM_V2-tiny")
    tower, projector = weakref.ref(model.vision_tower), weakref.ref(model.mm_projector)
    vision_bytes = weight_bytes(model.vision_tower) + weight_bytes(model.mm_projector)
    before = weight_bytes(model)
    engine = make_visual_encoder("onnxruntime", model, tmp_path)
    vlm = MobileVLMPipeline(model, tokenizer, 2048, choose_fast_paths(), engine)
    gc.collect()
    assert tower() is None and projector() is None
    assert weight_bytes(vlm.model) == before - vision_bytes
    assert vlm.ask(image, "What is this?", params).generated_ids == expected.generated_ids
    with pytest.raises(RuntimeError, match="released"):
        vlm.model.encode_images(vlm.pixel_values(image))


def _run_cli(module: str, *args: str, cwd: Path | None = None, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=None if env is None else {**os.environ, **env})


def test_build_engines_cli_onnxruntime_and_ask_backend(pipelines, tmp_path):
    """Both CLIs with their paths given as `~/...` and `$VARS` (quoted, so no shell expanded them): HOME is a temp
    directory holding a link to the reference checkpoints, the engines go under $ENGINES_ROOT."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "checkpoints").symlink_to(CHECKPOINTS, target_is_directory=True)
    env = {"HOME": str(home), "ENGINES_ROOT": str(tmp_path), "REFERENCE": str(REFERENCE)}
    ckpt, engines = "~/checkpoints/MobileVLM-tiny-v1", "$ENGINES_ROOT/engines"
    first = _run_cli("mobilevlm_ros.cli.build_engines", "--model", ckpt, "--backend", "onnxruntime",
                     "--engines", engines, env=env)
    assert first.returncode == 0, first.stderr
    built = sorted(p.name for p in (tmp_path / "engines").iterdir())
    assert json.loads(first.stdout)["engines_dir"] == str(tmp_path / "engines")
    second = _run_cli("mobilevlm_ros.cli.build_engines", "--model", ckpt, "--backend", "onnxruntime",
                      "--engines", engines, env=env)
    assert second.returncode == 0 and sorted(p.name for p in (tmp_path / "engines").iterdir()) == built
    check = _run_cli("mobilevlm_ros.cli.build_engines", "--check", "--model", ckpt, "--backend", "onnxruntime",
                     "--engines", engines, env=env)
    assert check.returncode == 0 and json.loads(check.stdout)["match"] is True, check.stderr
    elsewhere = _run_cli("mobilevlm_ros.cli.build_engines", "--check", "--model", ckpt, "--backend", "onnxruntime",
                         "--engines", str(tmp_path / "empty"), env=env)
    assert elsewhere.returncode == 1 and json.loads(elsewhere.stdout)["match"] is False
    run = _run_cli("mobilevlm_ros.cli.ask", "--model", ckpt, "--image", "$REFERENCE/images/demo.jpg",
                   "--max-new-tokens", "6", "--json", "--backend", "onnxruntime", "--engines", engines,
                   "What is this?", env=env)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == built  # the CLI found the engine built above
    assert not (home / "$ENGINES_ROOT").exists() and not list(tmp_path.glob("~*"))
    from PIL import Image

    from mobilevlm_ros.model import SamplingParams

    expected = pipelines["MobileVLM-tiny-v1"].ask(Image.open(REFERENCE / "images" / "demo.jpg"), "What is this?",
                                                  SamplingParams(max_new_tokens=6))
    assert json.loads(run.stdout)["generated_ids"] == expected.generated_ids


@pytest.mark.skipif(tensorrt_backend.available(), reason="TensorRT is installed here")
def test_tensorrt_absent_is_reported_cleanly():
    run = _run_cli("mobilevlm_ros.cli.build_engines", "--self-test")
    assert run.returncode == 2 and "TensorRT is not installed" in run.stderr
    with pytest.raises(RuntimeError, match="TensorRT"):
        tensorrt_backend.TensorRTVisualEncoder("missing.engine")


needs_trt = pytest.mark.skipif(not (tensorrt_backend.available() and torch.cuda.is_available()),
                               reason="needs TensorRT 10 and a CUDA GPU")


@needs_trt
def test_tensorrt_self_test():
    assert "self-test passed" in tensorrt_backend.self_test()


@needs_trt
def test_tensorrt_engine_matches_torch_and_is_cached(tmp_path):
    from mobilevlm_ros.model import load_model

    model, _ = load_model(CHECKPOINTS / "MobileVLM-tiny-v1", device="cuda")
    encoder = make_visual_encoder("tensorrt", model, tmp_path, max_batch=2)
    x = torch.cat([pixels(s) for s in STEMS[:2]]).cuda()
    with torch.inference_mode():
        ref = model.encode_images(x)
    out = encoder(x)
    assert (out.float() - ref).abs().max().item() < 2e-2 * max(1.0, ref.abs().max().item())
    assert len(list(tmp_path.glob("*.engine"))) == 1
    meta = json.loads(next(tmp_path.glob("visual-tensorrt-*.json")).read_text())
    assert meta["key"]["device_name"] == torch.cuda.get_device_name()


def _pyright_and_stubs():
    """pyright as scripts/setup.sh installs it (npm, into build/tools), else one on PATH; and the version of the
    TensorRT stubs in this venv (None for either that is missing)."""
    from importlib import metadata

    local = Path(__file__).resolve().parent.parent / "build" / "tools" / "node_modules" / ".bin" / "pyright"
    pyright = str(local) if local.is_file() else shutil.which("pyright")
    try:
        stubs = metadata.version("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        stubs = None
    return pyright, stubs


def test_tensorrt_module_type_checks_against_tensorrt10_stubs(tmp_path):
    """pyright with the TensorRT 10 stubs flags calls TensorRT 10 removed (Builder.build_engine, bindings...).
    Both come from scripts/setup.sh: missing, the test skips, and fails under CI (test/requirements.py)."""
    from requirements import missing

    pyright, stubs = _pyright_and_stubs()
    if pyright is None:
        missing("pyright is not installed (npm, into build/tools)")
    if stubs is None:
        missing("the TensorRT stubs are not installed (pip install --no-deps tensorrt-stubs)")
    assert stubs.startswith("10."), f"tensorrt-stubs {stubs}: the check is against TensorRT 10"
    cmd = [pyright, "--pythonpath", sys.executable, "--outputjson", str(TRT_MODULE)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report = json.loads(run.stdout)
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    assert not errors, json.dumps(errors, indent=1)
    # and the check has teeth: a TensorRT 8 call is an error
    bad = tmp_path / "trt8.py"
    bad.write_text("import tensorrt as trt\nb = trt.Builder(trt.Logger())\n"
                   "e = b.build_engine(b.create_network(0), b.create_builder_config())\n")
    run = subprocess.run([pyright, "--pythonpath", sys.executable, "--outputjson", str(bad)], capture_output=True,
                         text=True, timeout=300)
    errors = [d["message"] for d in json.loads(run.stdout)["generalDiagnostics"] if d["severity"] == "error"]
    assert any("build_engine" in message for message in errors), errors
