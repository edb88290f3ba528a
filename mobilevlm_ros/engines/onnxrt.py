"""ONNX Runtime backend for the visual encoder.

The "engine" ONNX Runtime builds is its optimised model (``SessionOptions.optimized_model_filepath``): it is
specific to the runtime version and execution provider, so it goes through the same :class:`EngineCache` as a
TensorRT plan, keyed the same way. That also lets the cache logic be tested on machines without TensorRT.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .cache import EngineCache, EngineKey, file_sha256
from .visual import INPUT_NAME, OUTPUT_NAME


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeError("the onnxruntime backend needs `pip install onnxruntime` "
                           "(or onnxruntime-gpu for CUDA)") from e
    return onnxruntime


def providers_for(device: torch.device) -> list:
    ort = _ort()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("device is CUDA but this onnxruntime has no CUDAExecutionProvider "
                               "(install onnxruntime-gpu, or use the tensorrt backend)")
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _options(threads: int | None, optimized_path: Path | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def ort_engine_key(onnx_path: Path, device: torch.device, name: str = "visual") -> EngineKey:
    ort = _ort()
    return EngineKey(name=name, onnx_sha256=file_sha256(onnx_path), runtime="onnxruntime",
                     runtime_version=ort.__version__,
                     device_name="cuda" if device.type == "cuda" else "cpu", compute_capability="",
                     precision="fp32", max_batch=0)


def build_ort_engine(onnx_path: Path, out_path: Path, device: torch.device) -> None:
    """Optimise the model for this runtime and provider and save the result as the 'engine'."""
    ort = _ort()
    ort.InferenceSession(str(onnx_path), _options(None, out_path), providers=providers_for(device))


class OnnxRuntimeVisualEncoder:
    """pixel_values [B, 3, S, S] (torch) -> visual tokens [B, N, H] (torch, out_dtype on out_device)."""

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu",
                 out_dtype: torch.dtype = torch.float32, threads: int | None = None):
        ort = _ort()
        self.device = torch.device(device)
        self.out_dtype = out_dtype
        self.session = ort.InferenceSession(str(model_path), _options(threads), providers=providers_for(self.device))
        self.path = Path(model_path)

    def __call__(self, pixel_values: Tensor) -> Tensor:
        if self.device.type == "cuda":
            return self._run_cuda(pixel_values)
        x = pixel_values.detach().to("cpu", torch.float32).contiguous()
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        return torch.from_numpy(out).to(self.out_dtype)

    def _run_cuda(self, pixel_values: Tensor) -> Tensor:
        """IO binding on torch CUDA tensors: no host round trip."""
        import numpy as np

        x = pixel_values.detach().to(self.device, torch.float32).contiguous()
        binding = self.session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", self.device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
        out_shape = (x.shape[0],) + tuple(self.session.get_outputs()[0].shape[1:])
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        binding.bind_output(OUTPUT_NAME, "cuda", self.device.index or 0, np.float32, out_shape, out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out.to(self.out_dtype)


def load_ort_encoder(onnx_path: Path, engines_dir: Path, device: torch.device, out_dtype: torch.dtype,
                     validate=None, tolerance: float = 1e-4) -> OnnxRuntimeVisualEncoder:
    """The cached optimised model for onnx_path (built, validated and stored on first use), loaded."""
    key = ort_engine_key(onnx_path, device)
    entry = EngineCache(engines_dir, suffix=".ort.onnx").get_or_build(
        key, lambda tmp: build_ort_engine(onnx_path, tmp, device),
        validate=None if validate is None else (lambda tmp: validate(OnnxRuntimeVisualEncoder(tmp, device))),
        tolerance=tolerance)
    return OnnxRuntimeVisualEncoder(entry.engine, device, out_dtype)
