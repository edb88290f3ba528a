"""Engine cache: which built engine belongs to which ONNX file, runtime, GPU and precision. Pure Python.

An engine (a TensorRT plan, or an ONNX Runtime optimised model standing in for one in tests) is only valid for the
exact ONNX bytes, runtime version, device and precision it was built for. All of those go into an
:class:`EngineKey`; its digest names the file, and a JSON sidecar repeats the fields so a mismatch is seen even
if a file is renamed. Building goes to a temporary name, is checked by a caller-supplied validator and only then
renamed into place, so a failed or refused build never leaves a file that later loads as valid.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

META_SUFFIX = ".json"


def file_sha256(path: str | Path) -> str:
    """sha256 of an ONNX file, followed by its external-data file ``<path>.data`` when there is one."""
    h = hashlib.sha256()
    for p in (Path(path), Path(str(path) + ".data")):
        if not p.is_file():
            continue
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    name: str  # what the engine computes, e.g. "visual"
    onnx_sha256: str
    runtime: str  # "tensorrt", "onnxruntime"
    runtime_version: str
    device_name: str  # e.g. "Orin", "NVIDIA H100 80GB HBM3", "cpu"
    compute_capability: str  # e.g. "8.7"; "" for CPU
    precision: str  # one of options.ENGINE_PRECISIONS
    max_batch: int = 1

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    @property
    def stem(self) -> str:
        return f"{self.name}-{self.runtime}-{self.precision}-{self.digest()[:16]}"


class EngineRejected(RuntimeError):
    """A freshly built engine disagreed with PyTorch; it was deleted."""


@dataclass
class CacheEntry:
    engine: Path
    meta: dict
    built: bool  # True when this call built it, False when it came from the cache


class EngineCache:
    def __init__(self, root: str | Path, suffix: str = ".engine"):
        self.root = Path(root)
        self.suffix = suffix

    def engine_path(self, key: EngineKey) -> Path:
        return self.root / (key.stem + self.suffix)

    def meta_path(self, key: EngineKey) -> Path:
        return self.root / (key.stem + META_SUFFIX)

    def lookup(self, key: EngineKey) -> Path | None:
        """The cached engine for key, or None when it is absent, its metadata disagrees or it was altered."""
        engine, meta_file = self.engine_path(key), self.meta_path(key)
        if not engine.is_file() or not meta_file.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if meta.get("key") != asdict(key) or meta.get("engine_sha256") != file_sha256(engine):
            return None
        return engine

    def reason_to_build(self, key: EngineKey) -> str | None:
        """Why key needs a build (for logs), or None when the cached engine is usable."""
        if self.lookup(key) is not None:
            return None
        others = [m for m in self._metas() if m.get("key", {}).get("name") == key.name
                  and m.get("key", {}).get("runtime") == key.runtime]
        if not others:
            return "no engine built yet"
        old = others[-1]["key"]
        changed = [f for f, v in asdict(key).items() if old.get(f) != v]
        return "changed: " + ", ".join(changed) if changed else "cached engine missing or altered"

    def get_or_build(self, key: EngineKey, build: Callable[[Path], None],
                     validate: Callable[[Path], float] | None = None, tolerance: float = 0.0,
                     prune: bool = True) -> CacheEntry:
        """Return the cached engine for key, or build it with ``build(tmp_path)``.

        validate(tmp_path) returns an error measure; above tolerance the engine is deleted and EngineRejected
        raised. prune removes engines of the same name and runtime built for other keys (an ONNX or TensorRT
        upgrade would otherwise leave stale plans behind on a robot's disk).
        """
        cached = self.lookup(key)
        if cached is not None:
            return CacheEntry(cached, json.loads(self.meta_path(key).read_text(encoding="utf-8")), built=False)
        reason = self.reason_to_build(key)
        self.root.mkdir(parents=True, exist_ok=True)
        engine = self.engine_path(key)
        tmp = engine.with_name(f".{engine.name}.{os.getpid()}.tmp")
        start = time.time()
        try:
            build(tmp)
            if not tmp.is_file():
                raise RuntimeError(f"engine build for {key.stem} produced no file")
            error = validate(tmp) if validate is not None else None
            if error is not None and not error <= tolerance:  # also refuses NaN
                raise EngineRejected(f"engine {key.stem} disagrees with PyTorch: error {error:.3g} > "
                                     f"tolerance {tolerance:.3g}; not kept")
            meta = {"key": asdict(key), "engine_sha256": file_sha256(tmp), "validation_error": error,
                    "tolerance": tolerance, "build_seconds": round(time.time() - start, 2),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reason": reason}
            os.replace(tmp, engine)
        finally:
            if tmp.exists():
                tmp.unlink()
        self.meta_path(key).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if prune:
            self.prune(key)
        return CacheEntry(engine, meta, built=True)

    def prune(self, keep: EngineKey) -> list[Path]:
        removed = []
        for meta_file in sorted(self.root.glob(f"{keep.name}-{keep.runtime}-*{META_SUFFIX}")):
            if meta_file == self.meta_path(keep):
                continue
            for p in (meta_file, meta_file.with_suffix(self.suffix)):
                if p.exists():
                    p.unlink()
                    removed.append(p)
        return removed

    def _metas(self) -> list[dict]:
        out = []
        for meta_file in sorted(self.root.glob(f"*{META_SUFFIX}"), key=lambda p: p.stat().st_mtime):
            try:
                out.append(json.loads(meta_file.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return out


def relative_error(out, ref) -> float:
    """max |out - ref| / max(|ref|, 1e-6) over tensors (torch or numpy): the validators' measure."""
    import torch

    out = torch.as_tensor(out).float().cpu()
    ref = torch.as_tensor(ref).float().cpu()
    if out.shape != ref.shape:
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
