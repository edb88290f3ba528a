"""Visual-encoder engines: ONNX Runtime, TensorRT (the torch backend is the model's own vision tower).

``make_visual_encoder(backend, model)`` returns a callable ``pixel_values [B, 3, S, S] -> visual tokens [B, 144, H]``
for ``MobileVLMPipeline(..., engine=...)``; it reads the model and does not change it. The ONNX export and the built
engines are cached under ``engines_dir`` (see engines/README.md); nothing is re-exported or rebuilt unless the
weights, runtime, GPU or precision change.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..model.cpu_linear import plain_copy
from ..options import ENGINE_BACKENDS
from .cache import EngineCache, EngineKey, EngineRejected, file_sha256, relative_error
from .visual import VisualEncoder, cached_onnx, export_onnx

DEFAULT_ENGINES_DIR = Path("engines")
FP16_TOLERANCE = 2e-2  # relative max error of a float16 engine against float32 PyTorch
FP32_TOLERANCE = 1e-4

__all__ = ["EngineCache", "EngineKey", "EngineRejected", "VisualEncoder", "cached_onnx", "export_onnx",
           "file_sha256", "make_visual_encoder", "reference_validator", "relative_error"]


def random_pixels(batch: int, image_size: int = 336, seed: int = 0) -> Tensor:
    """A normalised random image batch (uniform pixels through the CLIP normalisation)."""
    from ..model.image import CLIP_MEAN, CLIP_STD

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, image_size, image_size, generator=g)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def reference_validator(encoder: torch.nn.Module, batch: int = 2, image_size: int = 336,
                        ref_device: torch.device | str = "cpu") -> Callable[[Callable[[Tensor], Tensor]], float]:
    """A function engine -> relative error of engine(x) against the float32 PyTorch encoder on a random batch.
    The reference runs on a float32 copy of encoder (encoder is left as it is), once, when the first engine is
    validated: loading an engine from the cache validates nothing and pays nothing."""
    x = random_pixels(batch, image_size)
    reference: list[Tensor] = []

    def validate(engine: Callable[[Tensor], Tensor]) -> float:
        with torch.inference_mode():
            if not reference:  # the copy is gone again before the engine runs
                reference.append(plain_copy(encoder).to(ref_device, torch.float32)(x.to(ref_device)).cpu())
            return relative_error(engine(x), reference[0])

    return validate


def make_visual_encoder(backend: str, model: torch.nn.Module, engines_dir: str | Path = DEFAULT_ENGINES_DIR,
                        max_batch: int = 4, precision: str = "fp16",
                        workspace_bytes: int | None = None) -> Callable[[Tensor], Tensor]:
    """The visual encoder of a loaded MobileVLM as an engine of the given backend (options.ENGINE_BACKENDS;
    exported/built and cached on first use). The model is read, not changed.

    Outputs come back in the decoder's dtype on the decoder's device, ready for ``embed_prompt``.
    """
    if backend not in ENGINE_BACKENDS:
        raise ValueError(f"backend {backend!r} has no engine (choose from {', '.join(ENGINE_BACKENDS)})")
    weight = model.llm.embed_tokens.weight
    device, out_dtype = weight.device, weight.dtype
    encoder = VisualEncoder.from_model(model)
    image_size = model.config.vision.image_size
    engines_dir = Path(engines_dir)
    onnx_path = cached_onnx(encoder, engines_dir, image_size=image_size)
    if backend == "onnxruntime":
        from .onnxrt import load_ort_encoder

        return load_ort_encoder(onnx_path, engines_dir, device, out_dtype,
                                validate=reference_validator(encoder, 1, image_size), tolerance=FP32_TOLERANCE)
    from . import tensorrt_backend as trt_backend

    entry = build_tensorrt_engine(onnx_path, engines_dir, encoder, device, max_batch, precision,
                                  workspace_bytes or trt_backend.DEFAULT_WORKSPACE, image_size)
    return trt_backend.TensorRTVisualEncoder(entry.engine, device, out_dtype)


def build_tensorrt_engine(onnx_path: Path, engines_dir: Path, encoder: torch.nn.Module, device: torch.device,
                          max_batch: int, precision: str, workspace_bytes: int, image_size: int = 336):
    """Build (or find in the cache) the TensorRT engine for onnx_path; refuse one that disagrees with PyTorch."""
    from . import tensorrt_backend as trt_backend

    if device.type != "cuda":
        raise ValueError("the tensorrt backend needs --device cuda")
    key = trt_backend.trt_engine_key(onnx_path, device, precision, max_batch)
    validate = reference_validator(encoder, min(2, max_batch), image_size, ref_device=device)
    return EngineCache(engines_dir).get_or_build(
        key,
        lambda tmp: trt_backend.build_engine(onnx_path, tmp, max_batch, precision, workspace_bytes,
                                             engines_dir / "timing.cache", image_size),
        validate=lambda tmp: validate(trt_backend.TensorRTVisualEncoder(tmp, device, torch.float32)),
        tolerance=FP16_TOLERANCE if precision == "fp16" else FP32_TOLERANCE)
