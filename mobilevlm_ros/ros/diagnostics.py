"""/diagnostics as a function of the node's state: one status for inference (model, backend, counters, monitors, the
prefix cache, latency percentiles) and one per camera (frame age) while active."""
from __future__ import annotations

from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from ..loading import LoadedModel
from ..params import NodeConfig
from ..server import SceneServer


@dataclass(frozen=True)
class CameraHealth:
    camera_id: str
    topic: str  # resolved
    reliability: str  # of the subscription now
    age_s: float | None  # None: no frame yet
    judged: str  # how the age was judged ("by its header stamp", "since it arrived")


@dataclass(frozen=True)
class NodeHealth:
    name: str  # the node's fully qualified name
    state: str  # lifecycle label
    problem: str  # why the last configure failed ("" if it did not)
    rejected_not_active: int
    config: NodeConfig | None = None
    loaded: LoadedModel | None = None
    server: SceneServer | None = None
    cameras: tuple[CameraHealth, ...] = ()


def _status(level, name: str, message: str, values: dict, hardware_id: str = "") -> DiagnosticStatus:
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])


def diagnostic_status(health: NodeHealth) -> list[DiagnosticStatus]:
    name = f"{health.name}: inference"
    config, loaded, server = health.config, health.loaded, health.server
    if config is None or loaded is None or server is None:
        if health.problem:
            level, message = DiagnosticStatus.ERROR, f"configure failed: {health.problem}"
        else:
            level = DiagnosticStatus.OK if health.state == "finalized" else DiagnosticStatus.WARN
            message = health.state
        return [_status(level, name, message, {"lifecycle_state": health.state,
                                               "rejected_not_active": health.rejected_not_active})]
    stats, vision = server.stats, loaded.vision
    values = {"lifecycle_state": health.state, "model": config.model_path, "backend": vision.active,
              "backend_requested": config.backend, "engine": vision.engine, "vision_fallback": vision.fallback_reason,
              "manifest": loaded.manifest, "device": config.device, "dtype": config.dtype,
              "queue_depth": server.queue_depth, "queue_length": server.config.queue_length,
              "answered": stats.answered, "rejected_busy": stats.rejected_busy,
              "rejected_not_active": health.rejected_not_active, "failed": stats.failed,
              "inference_failed": stats.inference_failed, "captions": stats.captions,
              "captions_skipped": stats.captions_skipped, "monitors": len(server.monitors.all()),
              "monitor_answers": stats.monitor_answers, "monitors_skipped": stats.monitors_skipped}
    cache = loaded.pipeline.prefix_cache.stats()
    values.update({"prefix_cache_hits": cache.hits, "prefix_cache_misses": cache.misses,
                   "prefix_cache_frames": cache.frames, "prefix_cache_max_frames": cache.max_frames,
                   "prefix_cache_bytes": cache.nbytes})
    for stage, (p50, p90, p99) in sorted(stats.percentiles().items()):
        values.update({f"{stage}_p50": f"{p50:.1f}", f"{stage}_p90": f"{p90:.1f}", f"{stage}_p99": f"{p99:.1f}"})
    level, messages = DiagnosticStatus.OK, ["serving" if health.state == "active" else health.state]
    if config.model_is_demo:
        level = DiagnosticStatus.WARN
        messages.append(f"model_path is empty: serving the bundled demo model ({config.model_path}), which knows "
                        "only generated road scenes")
    if vision.fell_back:
        level = DiagnosticStatus.WARN
        messages.append(f"vision on torch, {vision.requested} unavailable: {vision.fallback_reason}")
    if stats.recent_inference_failures:
        level = DiagnosticStatus.WARN
        messages.append(f"{stats.recent_inference_failures} of the last {len(stats.recent_failures)} inference runs "
                        f"failed ({stats.inference_failed} since start)")
    statuses = [_status(level, name, "; ".join(messages), values, config.device)]
    max_age = server.config.max_frame_age_s
    for camera in health.cameras:
        stale = camera.age_s is None or camera.age_s > max_age
        statuses.append(_status(
            DiagnosticStatus.WARN if stale else DiagnosticStatus.OK, f"{health.name}: camera {camera.camera_id}",
            "no frame yet" if camera.age_s is None else ("stale" if stale else "ok"),
            {"topic": camera.topic, "reliability": camera.reliability,
             "frame_age_s": "" if camera.age_s is None else f"{camera.age_s:.3f}", "frame_age": camera.judged},
            camera.topic))
    return statuses
