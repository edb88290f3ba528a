"""TensorRT 10 backend for the visual encoder: build an engine from the exported ONNX, and run it.

Written against the TensorRT 10 Python API that JetPack 6 ships (name-based I/O tensors, ``execute_async_v3``,
``build_serialized_network``; none of the 8.x binding-index calls). Bindings are torch CUDA tensors and the
engine runs on torch's current CUDA stream, so no extra copies are made and no pycuda is needed.

Importing this module never fails: without TensorRT, :func:`available` is False and the functions raise.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .cache import EngineKey, file_sha256
from .visual import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:
    import tensorrt as trt
else:
    try:
        import tensorrt as trt
    except ImportError:  # the common case off Jetson
        trt = None

DEFAULT_WORKSPACE = 1 << 30  # 1 GiB: ViT-L at batch 4 needs far less; Orin shares it with the decoder


def available() -> bool:
    """True when a real TensorRT is importable (type stubs alone install an empty ``tensorrt`` namespace)."""
    return trt is not None and hasattr(trt, "Builder")


def _require() -> None:
    if not available():
        raise RuntimeError("the tensorrt backend needs NVIDIA TensorRT 10 (on Jetson: JetPack 6's python3-libnvinfer)")


def device_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') as used in engine keys."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def trt_engine_key(onnx_path: Path, device: torch.device, precision: str, max_batch: int,
                   name: str = "visual") -> EngineKey:
    _require()
    gpu, capability = device_identity(device)
    return EngineKey(name=name, onnx_sha256=file_sha256(onnx_path), runtime="tensorrt",
                     runtime_version=trt.__version__, device_name=gpu, compute_capability=capability,
                     precision=precision, max_batch=max_batch)


def build_engine(onnx_path: Path, engine_path: Path, max_batch: int, precision: str = "fp16",
                 workspace_bytes: int = DEFAULT_WORKSPACE, timing_cache: Path | None = None,
                 image_size: int = 336, opt_batch: int = 1) -> None:
    """Parse the ONNX, build a plan for batch 1..max_batch and write it to engine_path.

    The timing cache is read before and written back after the build, so rebuilding after an ONNX change (new
    weights) skips most kernel timing. Normalisation layers stay float32 (TensorRT 10's default for
    INormalizationLayer, which the opset-17 LayerNormalization maps to).
    """
    _require()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision != "fp32":
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    profile.set_shape(INPUT_NAME, trt.Dims([1, *shape]), trt.Dims([min(opt_batch, max_batch), *shape]),
                      trt.Dims([max_batch, *shape]))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.write_bytes(bytes(memoryview(plan)))
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))


def _torch_dtype(dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32}
    return table[dtype]


class TensorRTVisualEncoder:
    """pixel_values [B, 3, S, S] -> visual tokens [B, N, H], run on the current CUDA stream."""

    def __init__(self, engine_path: str | Path, device: str | torch.device = "cuda",
                 out_dtype: torch.dtype = torch.float16):
        _require()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError("the tensorrt backend runs on CUDA devices only")
        self.out_dtype = out_dtype
        self.path = Path(engine_path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"{engine_path} is not a TensorRT engine for this TensorRT version and GPU")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted([INPUT_NAME, OUTPUT_NAME]):
            raise RuntimeError(f"{engine_path}: unexpected I/O tensors {names}")
        if self.engine.get_tensor_mode(INPUT_NAME) != trt.TensorIOMode.INPUT:
            raise RuntimeError(f"{engine_path}: {INPUT_NAME} is not an input")
        self.in_dtype = _torch_dtype(self.engine.get_tensor_dtype(INPUT_NAME))
        self.engine_out_dtype = _torch_dtype(self.engine.get_tensor_dtype(OUTPUT_NAME))
        self.max_batch = int(self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])

    def __call__(self, pixel_values: Tensor) -> Tensor:
        outs = [self._run(chunk) for chunk in pixel_values.split(self.max_batch)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.to(self.device, self.in_dtype).contiguous()
        if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise ValueError(f"input shape {list(x.shape)} is outside the engine's profile")
        dims = self.context.get_tensor_shape(OUTPUT_NAME)
        out = torch.empty([dims[i] for i in range(len(dims))], dtype=self.engine_out_dtype, device=self.device)
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        # x and out are allocated on the current stream, so the caching allocator will not hand their memory
        # to later work before this enqueue has finished.
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out.to(self.out_dtype)


def self_test(max_batch: int = 2) -> str:
    """Build, load and run a tiny engine (a CLIP-shaped conv + LayerNorm network through our own exporter),
    checking it against PyTorch. Runs wherever TensorRT and a GPU exist; returns a one-line summary."""
    import tempfile

    from torch import nn

    from .cache import relative_error
    from .visual import export_onnx

    _require()
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT is installed but torch sees no CUDA device")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 32, 14, 14, bias=False)
            self.norm = nn.LayerNorm(32)
            self.fc = nn.Linear(32, 48)

        def forward(self, x):
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            return self.fc(self.norm(tokens))[:, ::4]

    torch.manual_seed(0)
    module = Tiny().eval()
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(module, Path(tmp) / "tiny.onnx", image_size=56)
        engine_path = Path(tmp) / "tiny.engine"
        build_engine(onnx_path, engine_path, max_batch, "fp16", 1 << 26, Path(tmp) / "timing.cache", image_size=56)
        encoder = TensorRTVisualEncoder(engine_path, device, torch.float32)
        x = torch.randn(max_batch, 3, 56, 56, device=device)
        with torch.no_grad():
            ref = module.to(device)(x)
        error = relative_error(encoder(x), ref)
    if not error < 1e-2:
        raise RuntimeError(f"TensorRT self-test: engine output differs from PyTorch (relative error {error:.3g})")
    return f"TensorRT {trt.__version__} on {device_identity(device)[0]}: self-test passed (relative error {error:.2e})"
