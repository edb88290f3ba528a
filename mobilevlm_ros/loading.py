"""Verify and load a model for serving, without ROS: the manifest, the memory check, the pipeline and its vision
encoder on the configured backend. The node calls :func:`load_pipeline` at configure; anything else that serves
(a benchmark, a test) can call it the same way."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .params import NodeConfig


@dataclass
class LoadedModel:
    pipeline: object  # MobileVLMPipeline
    vision: object  # engines.provision.VisionBackend
    manifest: str  # "verified N files" or "absent"
    memory: str  # the memory check's log line (the model's, then the prefix cache's)


def _info(logger):
    return (lambda line: logger.info(line)) if logger is not None else (lambda line: None)


def check_prefix_cache(frames: int, frame_bytes: int, available_bytes: int | None, where: str,
                       reserve_bytes: int = 0) -> str:
    """The prefix cache full (frames x frame_bytes) against the memory left once the model is loaded: raises
    MemoryCheckError with the numbers when it would not fit; returns a line for the log. (The cache grows as frames
    are asked about, so it is checked at its bound, not at what it holds at start.)"""
    from .manifest import MemoryCheckError, format_bytes

    line = f"prefix cache up to {frames} frames x {format_bytes(frame_bytes)} = {format_bytes(frames * frame_bytes)}"
    if available_bytes is None:
        return f"{line} (not checked: {where})"
    usable = available_bytes - reserve_bytes
    if frames * frame_bytes > usable:
        raise MemoryCheckError(f"refusing to serve: {line}, but only {format_bytes(usable)} is usable after loading "
                               f"the model ({where}{' minus memory_reserve_mb' if reserve_bytes else ''}); lower "
                               "prefix_cache_frames")
    return f"{line}; {format_bytes(usable)} usable"


def load_pipeline(config: NodeConfig, logger=None) -> LoadedModel:
    """Verify, then load: the manifest (when present, or required), free memory against the model's needs, the
    model, and the vision encoder on the configured backend (engines reused, built under a lock when
    build_engines allows it, or the torch path as a logged fallback), then the prefix cache's full size
    (prefix_cache_frames x one frame's prefix) against the memory left. Raises with the reason on any problem."""
    from .engines.provision import provision_visual_encoder
    from .manifest import (ManifestError, available_memory, check_manifest, check_memory, estimate_model_memory,
                           has_manifest)
    from .model import MobileVLMPipeline
    from .model.pipeline import choose_fast_paths, load_checkpoint

    info = _info(logger)
    manifests = []
    for directory in filter(None, (config.model_path, config.vision_tower)):
        if has_manifest(directory):
            summary = check_manifest(directory)
            manifests.append(f"verified {summary.files} files in {directory}")
            info(f"manifest: {manifests[-1]} ({summary.total_bytes >> 20} MiB, {summary.seconds:.1f} s)")
        elif config.require_manifest:
            raise ManifestError(directory, "no mobilevlm_manifest.json and require_manifest is true")
    estimate = estimate_model_memory(config.model_path, config.dtype, config.max_seq_len,
                                     batch=config.server.max_batch)
    available, where = available_memory(config.device)
    memory = check_memory(estimate, available, config.memory_reserve_mb << 20, where)
    info(f"memory: {memory}")
    # What runs is chosen here, once: the kernels from the load options, the vision encoder from the backend
    # (an engine read off the freshly loaded model, or None for its torch vision tower).
    fast_paths = choose_fast_paths(config.device, config.dtype, config.quantize or None, config.onednn,
                                   config.cuda_graphs, config.cuda_graph_compile or None)
    # An adapter is merged into the float weights, so it is applied before the decoder is quantised.
    model, tokenizer = load_checkpoint(config.model_path, config.vision_tower or None, config.device, config.dtype,
                                       None if config.adapter else config.quantize or None)
    if config.adapter:
        from .finetune.lora import merge_adapter
        from .model.quantize import quantize_llm

        merged = merge_adapter(model, config.adapter)
        info(f"adapter: {config.adapter} merged ({len(merged)} weights)")
        if config.quantize:
            quantize_llm(model.llm, config.quantize)
    warn = (lambda line: logger.warning(line)) if logger is not None else (lambda line: None)
    engine, vision = provision_visual_encoder(config.backend, model, config.engines_dir,
                                              allow_build=config.build_engines, log=warn)
    pipeline = MobileVLMPipeline(model, tokenizer, config.max_seq_len, fast_paths, engine,
                                 prefix_cache_frames=config.prefix_cache_frames, max_batch=config.server.max_batch)
    if config.prefix_cache_frames:
        cache = check_prefix_cache(config.prefix_cache_frames, pipeline.prefix_nbytes(),
                                   *available_memory(config.device), config.memory_reserve_mb << 20)
        info(f"memory: {cache}")
        memory += f"; {cache}"
    info(f"kernels: {'oneDNN' if fast_paths.onednn_layers else 'torch'} Linear layers, {fast_paths.decode_step} "
         "decode step")
    if engine is not None:
        info(f"vision: {vision.active} engine {vision.engine} ({'built now' if vision.built else 'from the cache'}); "
             "torch vision tower released")
    return LoadedModel(pipeline, vision, "; ".join(manifests) or "absent", memory)
