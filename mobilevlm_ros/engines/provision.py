"""Engine provisioning for a fleet: locked builds, a check that builds nothing, and the torch fallback.

Built on the engine cache (engines/cache.py: key = ONNX sha256 + runtime version + GPU + precision + batch limit)
and :func:`make_visual_encoder`; nothing here changes how an engine is exported, built or validated.

- :func:`file_lock`: an exclusive ``fcntl.flock`` on ``<engine file>.lock`` next to the engine, so two processes
  (two nodes, or a node and ``mobilevlm build-engines``) never build the same engine at once: the second waits,
  then finds the first one's engine in the cache and only loads it. The lock file is left in place (removing it
  would let a third process lock a different inode).
- :func:`provision_visual_encoder`: what the node (loading.load_pipeline) and ``mobilevlm ask --backend`` call
  before building the pipeline. Reuses a cached engine, builds a missing one when allowed (under the lock), and
  otherwise falls back to the torch vision path, saying why. It reads the model and never changes it.
- :func:`check_engines` / ``mobilevlm build-engines --check``: does the cache hold an engine for this model on this
  device (runtime version, GPU, precision, ONNX hash)? Exports and builds nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..options import ENGINE_BACKENDS, ENGINE_PRECISIONS

LOCK_SUFFIX = ".lock"
# The file suffix each of options.ENGINE_BACKENDS gives EngineCache (engines/onnxrt.py: ".ort.onnx"; TensorRT: the
# default ".engine").
ENGINE_SUFFIX = {"onnxruntime": ".ort.onnx", "tensorrt": ".engine"}


class EngineUnavailable(RuntimeError):
    """No engine for this model and device in the cache, and building one is not allowed (or failed)."""


class LockTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def file_lock(path: Path | str, timeout_s: float | None = None,
              on_wait: Callable[[Path], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive flock on path (created if needed). Yields True when it had to wait for another holder.

    on_wait(path) is called once when the lock is busy (for a log line); timeout_s None waits forever.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    waited = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            waited = True
            if on_wait is not None:
                on_wait(path)
            if timeout_s is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + timeout_s
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise LockTimeout(f"{path}: still locked by another process after {timeout_s} s") \
                                from None
                        time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield waited
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def lock_path_for(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + LOCK_SUFFIX)


def onnx_path_for(encoder, engines_dir: Path | str, image_size: int, name: str = "visual") -> Path:
    """Where :func:`cached_onnx` puts (or finds) the export of these weights, computed without exporting."""
    from .visual import weights_digest

    digest = weights_digest(encoder, {"image_size": image_size})[:16]
    return Path(engines_dir) / f"{name}-{digest}.onnx"


def engine_key_for(backend: str, onnx_path: Path, device, precision: str = "fp16", max_batch: int = 4):
    """The cache key this device gives the engine of onnx_path (raises RuntimeError without the runtime)."""
    import torch

    device = torch.device(device)
    if backend == "onnxruntime":
        from .onnxrt import ort_engine_key

        return ort_engine_key(onnx_path, device)
    if backend == "tensorrt":
        from .tensorrt_backend import trt_engine_key

        if device.type != "cuda":
            raise RuntimeError("the tensorrt backend needs a CUDA device")
        return trt_engine_key(onnx_path, device, precision, max_batch)
    raise ValueError(f"backend {backend!r} has no engine (expected one of {', '.join(ENGINE_BACKENDS)})")


@dataclass
class VisionBackend:
    """Which vision path a loaded pipeline uses, for the log and /diagnostics."""

    requested: str
    active: str
    engine: str = ""  # the engine file in use
    built: bool = False  # this process built it
    waited_for_lock: bool = False
    fallback_reason: str = ""  # why active is torch although requested is not

    @property
    def fell_back(self) -> bool:
        return self.active != self.requested


def provision_visual_encoder(backend: str, model, engines_dir: Path | str, *, allow_build: bool,
                             max_batch: int = 4, precision: str = "fp16", fallback: bool = True,
                             lock_timeout_s: float | None = 1800.0, workspace_bytes: int | None = None,
                             log: Callable[[str], None] = lambda _: None):
    """(engine, VisionBackend) for model on backend, with engines from engines_dir: the engine to build the
    pipeline with (``MobileVLMPipeline(..., engine=engine)``), or None where the torch vision path serves.

    An engine in the cache for this exact key is loaded. A missing one is exported and built only when
    allow_build, under the engine's lock. When no engine can be had (not allowed, runtime missing, build failed
    or refused) None is returned with the reason, or the error raised when fallback is False. The model is read,
    never changed.
    """
    if backend == "torch":
        return None, VisionBackend("torch", "torch")
    try:
        return _provision(backend, model, Path(engines_dir), allow_build, max_batch, precision, lock_timeout_s,
                          workspace_bytes, log)
    except Exception as e:  # noqa: BLE001 - any reason at all to have no engine means the torch path
        if not fallback:
            raise
        reason = str(e) if isinstance(e, EngineUnavailable) else f"{type(e).__name__}: {e}"
        log(f"vision backend {backend} unavailable, falling back to torch: {reason}")
        return None, VisionBackend(backend, "torch", fallback_reason=reason)


def _provision(backend, model, engines_dir: Path, allow_build, max_batch, precision, lock_timeout_s,
               workspace_bytes, log):
    from . import make_visual_encoder
    from .cache import EngineCache
    from .visual import VisualEncoder, cached_onnx

    if backend not in ENGINE_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    device = model.llm.embed_tokens.weight.device
    if backend == "tensorrt":  # say so before spending time on an export
        from . import tensorrt_backend

        if device.type != "cuda":
            raise EngineUnavailable(f"the tensorrt backend needs a CUDA device (the model is on {device})")
        if not tensorrt_backend.available():
            raise EngineUnavailable("TensorRT is not installed (on Jetson: JetPack 6's python3-libnvinfer)")
    encoder = VisualEncoder.from_model(model)
    image_size = model.config.vision.image_size
    onnx_path = onnx_path_for(encoder, engines_dir, image_size)
    waited = False
    if not onnx_path.is_file():
        if not allow_build:
            raise EngineUnavailable(f"no ONNX export of these weights in {engines_dir} ({onnx_path.name}) and "
                                    "build_engines is false; run mobilevlm build-engines")
        with file_lock(lock_path_for(onnx_path), lock_timeout_s,
                       lambda p: log(f"waiting for another process exporting {onnx_path.name}")) as w:
            waited |= w
            cached_onnx(encoder, engines_dir, image_size=image_size)  # exports only if still absent
    key = engine_key_for(backend, onnx_path, device, precision, max_batch)
    cache = EngineCache(engines_dir, suffix=ENGINE_SUFFIX[backend])
    engine_path = cache.engine_path(key)
    with file_lock(lock_path_for(engine_path), lock_timeout_s,
                   lambda p: log(f"waiting for another process building {engine_path.name}")) as w:
        waited |= w
        present = cache.lookup(key) is not None
        if not present:
            reason = cache.reason_to_build(key)
            if not allow_build:
                raise EngineUnavailable(f"no usable {backend} engine in {engines_dir} for this device ({reason}) "
                                        "and build_engines is false; run mobilevlm build-engines")
            log(f"building {backend} engine {engine_path.name} ({reason})")
        encode = make_visual_encoder(backend, model, engines_dir, max_batch, precision, workspace_bytes)
    return encode, VisionBackend(backend, backend, str(engine_path), built=not present, waited_for_lock=waited)


def check_engines(backend: str, model, engines_dir: Path | str, precision: str = "fp16",
                  max_batch: int = 4) -> dict:
    """Whether engines_dir holds a valid engine of model for this device; exports and builds nothing.

    The report's ``reason`` says what differs when it does not (e.g. "changed: runtime_version, device_name").
    """
    from .cache import EngineCache
    from .visual import VisualEncoder

    engines_dir = Path(engines_dir)
    device = model.llm.embed_tokens.weight.device
    onnx_path = onnx_path_for(VisualEncoder.from_model(model), engines_dir, model.config.vision.image_size)
    report = {"backend": backend, "engines_dir": str(engines_dir), "onnx": str(onnx_path),
              "onnx_present": onnx_path.is_file(), "match": False, "engine": None, "key": None, "reason": None}
    if not onnx_path.is_file():
        report["reason"] = "no ONNX export of these weights (the model changed, or nothing was built here yet)"
        return report
    key = engine_key_for(backend, onnx_path, device, precision, max_batch)
    cache = EngineCache(engines_dir, suffix=ENGINE_SUFFIX[backend])
    report["key"] = asdict(key)
    report["engine"] = str(cache.engine_path(key))
    report["reason"] = cache.reason_to_build(key)
    report["match"] = report["reason"] is None
    return report


def check_command(args: argparse.Namespace) -> int:
    """``mobilevlm build-engines --check``: print the report as JSON; exit 0 when the cache matches, 1 when it
    does not, 2 when the check cannot run here (no TensorRT, no CUDA, unreadable model)."""
    import torch

    from ..model import CheckpointError, load_model

    device = args.device or ("cuda" if args.backend == "tensorrt" else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("mobilevlm build-engines --check: CUDA is not available on this machine", file=sys.stderr)
        return 2
    try:
        # Loaded exactly as the build loads it, so the export digest (and with it the ONNX hash) is the same.
        model, _ = load_model(args.model, args.vision_tower, device,
                              "float16" if device.startswith("cuda") else "float32")
        report = check_engines(args.backend, model, args.engines, args.precision, args.max_batch)
    except (CheckpointError, RuntimeError, ValueError) as e:
        print(f"mobilevlm build-engines --check: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0 if report["match"] else 1


def _parser() -> argparse.ArgumentParser:
    from ..model.loader import expand_path

    p = argparse.ArgumentParser(prog="python -m mobilevlm_ros.engines.provision",
                                description="Check the engine cache against this device without building "
                                            "(the same as mobilevlm build-engines --check).")
    p.add_argument("--check", action="store_true", help="accepted for symmetry with mobilevlm build-engines")
    p.add_argument("--model", type=expand_path, required=True)
    p.add_argument("--vision-tower", type=expand_path)
    p.add_argument("--engines", type=expand_path, default="engines")
    p.add_argument("--backend", default="tensorrt", choices=ENGINE_BACKENDS)
    p.add_argument("--precision", default="fp16", choices=ENGINE_PRECISIONS)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--device", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    return check_command(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
