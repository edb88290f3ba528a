"""Verified model rollout, without ROS: a manifest of a model directory's files, and a memory check before loading.

A manifest (``mobilevlm_manifest.json``, a name no published checkpoint uses) lists every file of a model directory
with its size and sha256. ``mobilevlm manifest write DIR`` creates it where the model is known to be good (the
build machine, the release bucket); after the directory has been copied to a robot, :func:`check_manifest` (run by
the node at configure, or ``mobilevlm manifest check DIR``) refuses a half-copied or corrupted copy and names the
bad file. Sizes are compared first, so a truncated copy is refused at once, before anything is hashed.

:func:`estimate_model_memory` and :func:`check_memory` refuse, with numbers, a model that would not fit in the
memory that is free right now (``MemAvailable`` of /proc/meminfo for the CPU, ``torch.cuda.mem_get_info`` for a
CUDA device), instead of letting the loader run the robot out of memory.

Importing this module needs only the standard library (torch is imported inside the functions that need it).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .options import DTYPES

MANIFEST_NAME = "mobilevlm_manifest.json"
FORMAT = 1
_BLOCK = 1 << 22

DTYPE_BYTES = dict(zip(DTYPES, (4, 2, 2)))  # bytes per element of each of options.DTYPES, in its order


class ManifestError(Exception):
    """A model directory does not match its manifest (or the manifest itself is unusable); names the file."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MemoryCheckError(Exception):
    """The model would not fit in the free memory; the message has the numbers."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the model directory, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class ManifestSummary:
    directory: str
    files: int
    total_bytes: int
    seconds: float


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _hidden(relative: Path) -> bool:
    """Hidden names (``.git``, ``.cache``, rsync's ``.name.XXXXXX`` partial files) are never part of a model."""
    return any(part.startswith(".") for part in relative.parts)


def model_files(directory: Path | str, manifest_name: str = MANIFEST_NAME) -> list[str]:
    """Relative paths of the regular files under directory (sorted), without the manifest and hidden names."""
    root = Path(directory)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(root)
            if _hidden(relative) or (relative.as_posix() == manifest_name) or not path.is_file():
                continue
            out.append(relative.as_posix())
    return sorted(out)


def write_manifest(directory: Path | str, manifest_name: str = MANIFEST_NAME) -> Path:
    """Hash every file of directory and write the manifest next to them (atomically: temporary name, rename)."""
    root = Path(directory)
    if not root.is_dir():
        raise ManifestError(root, "not a directory")
    entries = []
    for relative in model_files(root, manifest_name):
        path = root / relative
        entries.append({"path": relative, "size": path.stat().st_size, "sha256": sha256_file(path)})
    document = {"format": FORMAT, "tool": "mobilevlm manifest", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "total_bytes": sum(e["size"] for e in entries), "files": entries}
    target = root / manifest_name
    tmp = root / f".{manifest_name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def has_manifest(directory: Path | str, manifest_name: str = MANIFEST_NAME) -> bool:
    return (Path(directory) / manifest_name).is_file()


def read_manifest(directory: Path | str, manifest_name: str = MANIFEST_NAME) -> list[FileEntry]:
    path = Path(directory) / manifest_name
    if not path.is_file():
        raise ManifestError(path, "no manifest (write one with `mobilevlm manifest write DIR` where the model is "
                                  "known to be good)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {FORMAT}")
        entries = [FileEntry(str(e["path"]), int(e["size"]), str(e["sha256"])) for e in document["files"]]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ManifestError(path, f"not a valid manifest: {e}") from None
    for entry in entries:
        relative = Path(entry.path)
        if relative.is_absolute() or ".." in relative.parts or not entry.path:
            raise ManifestError(path, f"invalid file name {entry.path!r} in the manifest")
    return entries


def check_manifest(directory: Path | str, manifest_name: str = MANIFEST_NAME,
                   hash_files: bool = True) -> ManifestSummary:
    """Raise ManifestError naming the first bad file; sizes (and missing or unlisted files) are checked for all
    files before any file is hashed."""
    root = Path(directory)
    started = time.monotonic()
    entries = read_manifest(root, manifest_name)
    problems: list[tuple[Path, str]] = []
    for entry in entries:
        path = root / entry.path
        if not path.is_file():
            problems.append((path, "missing (listed in the manifest)"))
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append((path, f"size {size} bytes, the manifest says {entry.size} (half-copied or "
                                   "truncated?)"))
    listed = {e.path for e in entries}
    for relative in model_files(root, manifest_name):
        if relative not in listed:
            problems.append((root / relative, "not in the manifest (a file that was never verified)"))
    if problems:
        path, problem = problems[0]
        more = f"; {len(problems) - 1} more problem(s): " + ", ".join(
            f"{p.name} ({q.split(' (')[0]})" for p, q in problems[1:4]) if len(problems) > 1 else ""
        raise ManifestError(path, problem + more)
    if hash_files:
        for entry in entries:
            digest = sha256_file(root / entry.path)
            if digest != entry.sha256:
                raise ManifestError(root / entry.path, f"sha256 {digest[:16]}... differs from the manifest's "
                                                       f"{entry.sha256[:16]}... (corrupted copy?)")
    return ManifestSummary(str(root), len(entries), sum(e.size for e in entries), time.monotonic() - started)


# --- memory -------------------------------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int  # in the target dtype
    kv_cache_bytes: int
    overhead_bytes: int  # activations, RoPE tables, allocator slack
    dtype: str
    positions: int
    batch: int = 1  # KV cache rows

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def describe(self) -> str:
        return (f"about {format_bytes(self.total_bytes)} (weights {format_bytes(self.weights_bytes)} as "
                f"{self.dtype}, KV cache {format_bytes(self.kv_cache_bytes)} for {self.positions} positions"
                f"{f' x {self.batch} rows' if self.batch > 1 else ''}, "
                f"overhead {format_bytes(self.overhead_bytes)})")


OVERHEAD_FRACTION = 0.10
OVERHEAD_MIN_BYTES = 64 << 20


def estimate_model_memory(model_dir: Path | str, dtype: str = "float32", max_seq_len: int = 2048,
                          weight_paths: list[Path] | None = None, batch: int = 1) -> MemoryEstimate:
    """What loading model_dir in dtype with a max_seq_len KV cache for ``batch`` rows will take, from the weight
    files' sizes.

    The files' bytes are scaled from the checkpoint's ``torch_dtype`` to dtype; the KV cache is
    ``2 * layers * kv_heads * head_dim * positions * batch`` elements of dtype (the decoder keeps it in its weights'
    dtype, positions capped at max_position_embeddings as the decoder does; a batch of requests gives each row its
    own cache row); 10 % (at least 64 MiB) on top.
    """
    model_dir = Path(model_dir)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ManifestError(model_dir / "config.json", f"cannot be read: {e}") from None
    if weight_paths is None:
        from .model.loader import weight_files

        weight_paths = weight_files(model_dir)
    file_bytes = sum(Path(p).stat().st_size for p in weight_paths)
    target = DTYPE_BYTES[dtype]
    source = DTYPE_BYTES.get(str(config.get("torch_dtype", "")), target)
    weights = file_bytes * target // source
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("hidden_size", 0)) // max(heads, 1)
    positions = min(int(max_seq_len), int(config.get("max_position_embeddings", max_seq_len)))
    kv = 2 * int(config.get("num_hidden_layers", 0)) * int(config.get("num_key_value_heads", heads)) * head_dim \
        * positions * target * batch
    overhead = max(OVERHEAD_MIN_BYTES, int(OVERHEAD_FRACTION * (weights + kv)))
    return MemoryEstimate(weights, kv, overhead, dtype, positions, batch)


def read_mem_available(meminfo: Path | str = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes (Linux), None where it cannot be read."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    value, unit = line.split()[1:3]
                    return int(value) * (1024 if unit.lower() == "kb" else 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: str) -> tuple[int | None, str]:
    """(free bytes, where the number comes from) for device 'cpu', 'cuda' or 'cuda:N'; None when unknown."""
    if device.startswith("cuda"):
        try:
            import torch

            index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
            free, _total = torch.cuda.mem_get_info(index)
            return int(free), f"cuda:{index} free memory"
        except Exception as e:  # noqa: BLE001 - no CUDA: the loader reports that more clearly
            return None, f"cuda free memory unknown ({type(e).__name__}: {e})"
    available = read_mem_available()
    return available, ("MemAvailable of /proc/meminfo" if available is not None else "MemAvailable unknown")


def check_memory(estimate: MemoryEstimate, available_bytes: int | None, reserve_bytes: int = 0,
                 where: str = "") -> str:
    """Raise MemoryCheckError with the numbers when the estimate does not fit; returns a line for the log."""
    if available_bytes is None:
        return f"memory check skipped ({where or 'free memory unknown'}); model needs {estimate.describe()}"
    usable = available_bytes - reserve_bytes
    reserve = f" minus memory_reserve_mb {reserve_bytes >> 20}" if reserve_bytes else ""
    line = (f"model needs {estimate.describe()}; {format_bytes(usable)} usable ({where or 'free'} "
            f"{format_bytes(available_bytes)}{reserve})")
    if estimate.total_bytes > usable:
        raise MemoryCheckError(f"refusing to load: {line}; short by {format_bytes(estimate.total_bytes - usable)}")
    return line
