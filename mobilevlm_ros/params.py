"""The node's parameters without ROS: every parameter's default, meaning and allowed values in one table, and the
validated :class:`NodeConfig` the serving core is built from.

The ROS side (``ros/parameters.py``) declares each entry of :data:`PARAMETERS` with a descriptor made from it, so
``ros2 param describe`` shows the same text as README's parameter table (a test keeps the two equal), and calls
:func:`read_config` at configure and :func:`check_value` on every ``ros2 param set``.

Two kinds of parameters: most are read at configure (a change applies at the next configure, and is refused while
the node is configured); the ``live`` ones apply to the next request.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .monitors import DEFAULT_CHOICES, DEFAULT_RATE_HZ, MIN_RATE_HZ, Monitor, monitor_problem
from .options import BACKENDS, COMPILE_MODES, DTYPES, FRAME_AGE_SOURCES, QUANTIZE_MODES, RELIABILITIES, TRANSPORTS
from .server import ServerConfig

MAX_QUEUE_LENGTH = 64
MIN_SEQ_LEN = 256  # 144 image tokens plus room for a prompt and an answer
MAX_FRAME_HISTORY = 1000


@dataclass(frozen=True)
class Param:
    """One parameter. ``default`` also fixes its ROS type (bool, int, float, str or a list of str)."""

    name: str
    default: bool | int | float | str | list
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    live: bool = False  # applies to the next request; otherwise read at configure

    def check(self, value) -> str | None:
        """Why value is not allowed for this parameter on its own, or None (cross-checks: read_config)."""
        if self.choices and value not in self.choices:
            empty = "'' or " if "" in self.choices else ""
            return f"{self.name} {value!r}: expected {empty}one of {', '.join(c for c in self.choices if c)}"
        below = self.minimum is not None and value < self.minimum
        above = self.maximum is not None and value > self.maximum
        if (below or above) and self.minimum is not None and self.maximum is not None:
            return f"{self.name} {value}: must be in {self.minimum:g}..{self.maximum:g}"
        if below:
            return f"{self.name} {value}: must be at least {self.minimum:g}"
        if above:
            return f"{self.name} {value}: must be at most {self.maximum:g}"
        return None


PARAMETERS: tuple[Param, ...] = (
    Param("model_path", "", "MobileVLM checkpoint directory; `~` and `$VARS` are expanded; empty: the bundled demo "
          "model (with a warning in the log and on /diagnostics)"),
    Param("vision_tower", "", "CLIP directory overriding config.json's `mm_vision_tower` (V1 checkpoints)"),
    Param("adapter", "", "LoRA adapter directory (`mobilevlm finetune`'s output, or PEFT's from the reference's "
          "training) merged into `model_path`'s weights at load (before `quantize`); `~` and `$VARS` are "
          "expanded; empty: none (docs/FINETUNE.md)"),
    Param("device", "cpu", "`cpu`, `cuda` or `cuda:N`"),
    Param("dtype", "float32", "model dtype (`float16` on CUDA only)", choices=DTYPES),
    Param("backend", "torch", "vision encoder + projector backend; once an engine serves, the torch vision tower "
          "and projector are freed (MobileVLM-1.7B: 0.6 GB in float16)", choices=BACKENDS),
    Param("engines_dir", "engines", "cache of ONNX exports and TensorRT engines (relative: to the working "
          "directory)"),
    Param("build_engines", True, "build a missing engine at configure (under a file lock); otherwise, or when no "
          "engine can be had, the torch vision path serves (logged, `vision_fallback` in /diagnostics)"),
    Param("require_manifest", False, "refuse a model directory without `mobilevlm_manifest.json` (a present "
          "manifest is always checked)"),
    Param("memory_reserve_mb", 0, "memory to leave free: a model that would not fit is refused with the numbers",
          minimum=0),
    Param("max_seq_len", 2048, "KV cache length in positions (144 image tokens + prompt + answer)",
          minimum=MIN_SEQ_LEN),
    Param("quantize", "", "CPU only: weight quantisation of the decoder's Linear layers (`int8-dynamic` was the "
          "fastest in our x86 runs; docs/PERFORMANCE.md); empty: none", choices=("",) + QUANTIZE_MODES),
    Param("onednn", True, "x86 CPUs: float Linear layers on oneDNN and decode steps through kernels torch.compile "
          "builds at load (`false`: torch's default MKL kernels)"),
    Param("cuda_graphs", True, "on CUDA, replay each decode step from a CUDA graph (ignored on the CPU)"),
    Param("cuda_graph_compile", "", "fuse the CUDA-graph step's kernels with torch.compile first (compiles during "
          "the first requests); empty: plain graphs", choices=COMPILE_MODES),
    Param("cameras", ["front"], "camera ids; each has `camera.ID.topic`, `camera.ID.transport` and "
          "`camera.ID.reliability`"),
    Param("default_camera", "", "camera used when a request names none; empty: the first camera"),
    Param("frame_age_from", "stamp", "how a frame's age is judged: `stamp` (its header stamp against the node's "
          "clock, which follows /clock with use_sim_time) or `arrival` (when it was received; for cameras whose "
          "clock does not agree with this machine's); frames stamped zero are always judged by arrival",
          choices=FRAME_AGE_SOURCES),
    Param("max_frame_age_s", 1.0, "a newest frame older than this answers `STALE_FRAME` (a frame named by "
          "`frame_stamp` is answered whatever its age)", minimum=1e-3, live=True),
    Param("frame_history", 8, "frames of each camera held for requests naming one by `frame_stamp`: the last N "
          "received and the last N answered about (by requests, captions or monitors), so an answer's "
          "`image_header` stays good for follow-ups however fast the camera publishes; others answer `FRAME_GONE`",
          minimum=1, maximum=MAX_FRAME_HISTORY),
    Param("prefix_cache_frames", 4, "frames whose prompt prefix (KV cache up to and including the image tokens) is "
          "kept, least recently used out first, so further questions, choices and monitors about a frame skip its "
          "vision pass and prefix prefill; counted by the start-up memory check, shown on /diagnostics; 0: off",
          minimum=0),
    Param("max_new_tokens", 64, "default answer length in tokens", minimum=1, live=True),
    Param("temperature", 0.0, "default sampling temperature (0: greedy)", minimum=0.0, live=True),
    Param("queue_length", 4, "requests that may wait behind the running one; more answer `BUSY`", minimum=1,
          maximum=MAX_QUEUE_LENGTH),
    Param("max_question_chars", 2000, "longer questions answer `BAD_REQUEST`", minimum=1),
    Param("max_batch", 4, "requests (questions to any cameras, the captions of a tick) the worker runs as one "
          "batch when they are ready together, each answered exactly as alone; a lone request never waits for "
          "company. Each row holds its own KV cache (`max_seq_len` positions), allocated when a batch that large "
          "first runs", minimum=1, maximum=MAX_QUEUE_LENGTH),
    Param("caption_rate_hz", 0.5, "caption timer (0: off); a tick is skipped while the worker is busy or the "
          "frame is unchanged", minimum=0.0, live=True),
    Param("caption_prompt", "Describe the scene.", "the caption question", live=True),
    Param("caption_cameras", [""], "cameras to caption (an empty entry: the default camera)"),
    Param("caption_max_new_tokens", 48, "caption length in tokens", minimum=1, live=True),
    Param("monitors", [""], "standing monitor names (letters, digits, _); each has `monitor.NAME.question`, "
          "`monitor.NAME.camera`, `monitor.NAME.rate_hz` and `monitor.NAME.choices`, and is answered on new frames "
          "of its camera and published on `monitors`; empty entries are ignored (the default declares none); "
          "changed at run time through the `set_monitor` service"),
    Param("diagnostics_period_s", 1.0, "/diagnostics period", minimum=1e-3),
    Param("deactivate_timeout_s", 5.0, "on deactivate, how long requests in flight may finish before they are "
          "cancelled (`NOT_ACTIVE`)", minimum=0.0, live=True),
    Param("autostart", False, "configure and activate at start (`mobilevlm_node` always does; "
          "`mobilevlm_lifecycle_node` waits for a lifecycle manager unless this is true)"),
)
BY_NAME = {p.name: p for p in PARAMETERS}
LIVE = frozenset(p.name for p in PARAMETERS if p.live)


def camera_parameters(camera_id: str, transport: str = "raw") -> tuple[Param, ...]:
    """The parameters of one camera (their default topic depends on the transport)."""
    prefix = f"camera.{camera_id}."
    topic = f"{camera_id}/image_raw" + ("/compressed" if transport == "compressed" else "")
    return (
        Param(prefix + "transport", "raw", "`raw` (sensor_msgs/Image) or `compressed` (sensor_msgs/CompressedImage)",
              choices=TRANSPORTS),
        Param(prefix + "topic", topic, "topic of this camera (relative: in the node's namespace)"),
        Param(prefix + "reliability", "auto", "subscription reliability: `auto` matches the publishers' (as "
              "`ros2 bag record` does; reliable when every publisher is), or `best_effort` / `reliable`",
              choices=RELIABILITIES),
    )


def monitor_parameters(name: str) -> tuple[Param, ...]:
    """The parameters of one standing monitor."""
    prefix = f"monitor.{name}."
    return (
        Param(prefix + "question", "", "the monitor's question (required)"),
        Param(prefix + "camera", "", "camera it watches; empty: the default camera"),
        Param(prefix + "rate_hz", DEFAULT_RATE_HZ, "at most this many answers per second, each on a new frame of "
              "its camera", minimum=MIN_RATE_HZ),
        Param(prefix + "choices", list(DEFAULT_CHOICES), "the allowed answers (1 to 16, distinct); the most likely "
              "is published with its probability"),
    )


def expand_path(path: str) -> str:
    """``~`` and ``$VARS`` expanded, as a shell would."""
    return os.path.expanduser(os.path.expandvars(path)) if path else path


@dataclass(frozen=True)
class CameraConfig:
    camera_id: str
    topic: str
    transport: str
    reliability: str


@dataclass(frozen=True)
class NodeConfig:
    model_path: str
    model_is_demo: bool  # model_path was empty: the bundled demo model serves
    vision_tower: str
    adapter: str
    device: str
    dtype: str
    backend: str
    engines_dir: str
    build_engines: bool
    require_manifest: bool
    memory_reserve_mb: int
    max_seq_len: int
    quantize: str
    onednn: bool
    cuda_graphs: bool
    cuda_graph_compile: str
    cameras: tuple[CameraConfig, ...]
    server: ServerConfig
    caption_rate_hz: float
    caption_prompt: str
    caption_cameras: tuple[str, ...]
    caption_max_new_tokens: int
    monitors: tuple[Monitor, ...]
    frame_history: int
    prefix_cache_frames: int
    diagnostics_period_s: float
    deactivate_timeout_s: float


def _default_model_path() -> str:
    from .demo import DEFAULT_MODEL_DIR  # the bundled demo model: the package answers out of the box

    return str(DEFAULT_MODEL_DIR)


def read_config(value: Callable[[str], object], check_files: bool = True) -> NodeConfig:
    """Read every parameter through ``value(name)`` (camera parameters for the ids in ``cameras``), check each
    against its table entry and the cross-checks between them; a problem raises ValueError naming the parameter.
    ``check_files``: also check that model_path is a directory (at configure; not when a process starts, since a
    lifecycle node may be configured once the model has been copied)."""
    def get(param: Param):
        v = value(param.name)
        problem = param.check(v)
        if problem:
            raise ValueError(problem)
        return v

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    v = {p.name: get(p) for p in PARAMETERS}
    model_is_demo = not v["model_path"]
    model_path = _default_model_path() if model_is_demo else expand_path(v["model_path"])
    check(not check_files or os.path.isdir(model_path), f"model_path {model_path!r} is not a directory" + (
        " (the bundled demo model is not installed: set model_path to a MobileVLM checkpoint directory)"
        if model_is_demo else ""))
    adapter = expand_path(v["adapter"])
    check(not check_files or not adapter or os.path.isdir(adapter), f"adapter {adapter!r} is not a directory")
    device = v["device"]
    check(device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()),
          f"device {device!r}: expected cpu, cuda or cuda:N")
    check(not v["quantize"] or device == "cpu",
          f"quantize {v['quantize']!r} needs device cpu (CPU kernels), not {device!r}")
    camera_ids = list(v["cameras"])
    check(bool(camera_ids) and all(camera_ids) and len(set(camera_ids)) == len(camera_ids),
          f"cameras {camera_ids}: need at least one camera id, all non-empty and distinct")
    default_camera = v["default_camera"] or camera_ids[0]
    check(default_camera in camera_ids, f"default_camera {default_camera!r} is not in cameras {camera_ids}")
    caption_cameras = [c or default_camera for c in v["caption_cameras"]]
    check(all(c in camera_ids for c in caption_cameras),
          f"caption_cameras {caption_cameras}: every entry must be one of cameras {camera_ids}")

    monitors = []
    for name in filter(None, v["monitors"]):
        question, camera, rate_hz, choices = (get(p) for p in monitor_parameters(name))
        monitors.append(Monitor(name, question, camera or default_camera, rate_hz, tuple(choices)))
        problem = monitor_problem(name, question, rate_hz, choices)
        check(problem is None, str(problem))
        check(monitors[-1].camera_id in camera_ids,
              f"monitor.{name}.camera {camera!r} is not one of cameras {camera_ids}")
    check(len({m.name for m in monitors}) == len(monitors), f"monitors {list(v['monitors'])}: names must be distinct")

    cameras = []
    for camera_id in camera_ids:
        transport_param = camera_parameters(camera_id)[0]
        transport = get(transport_param)
        _, topic_param, reliability_param = camera_parameters(camera_id, transport)
        topic = get(topic_param)
        check(bool(topic), f"{topic_param.name} is empty")
        cameras.append(CameraConfig(camera_id, topic, transport, get(reliability_param)))

    return NodeConfig(
        model_path=model_path, model_is_demo=model_is_demo, vision_tower=expand_path(v["vision_tower"]),
        adapter=adapter,
        device=device, dtype=v["dtype"], backend=v["backend"], engines_dir=expand_path(v["engines_dir"]),
        build_engines=v["build_engines"], require_manifest=v["require_manifest"],
        memory_reserve_mb=v["memory_reserve_mb"], max_seq_len=v["max_seq_len"], quantize=v["quantize"],
        onednn=v["onednn"], cuda_graphs=v["cuda_graphs"], cuda_graph_compile=v["cuda_graph_compile"],
        cameras=tuple(cameras),
        server=ServerConfig(cameras=tuple(camera_ids), default_camera=default_camera,
                            frame_age_from=v["frame_age_from"], max_frame_age_s=v["max_frame_age_s"],
                            max_new_tokens=v["max_new_tokens"], temperature=v["temperature"],
                            queue_length=v["queue_length"], max_question_chars=v["max_question_chars"],
                            max_batch=v["max_batch"]),
        caption_rate_hz=v["caption_rate_hz"], caption_prompt=v["caption_prompt"],
        caption_cameras=tuple(caption_cameras), caption_max_new_tokens=v["caption_max_new_tokens"],
        monitors=tuple(monitors), frame_history=v["frame_history"], prefix_cache_frames=v["prefix_cache_frames"],
        diagnostics_period_s=v["diagnostics_period_s"], deactivate_timeout_s=v["deactivate_timeout_s"])


_YAML_NOT_STRINGS = {"yes", "no", "true", "false", "on", "off", "null", "~"}


def _text(value) -> str:
    """A default as README and YAML show it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):  # quoted where YAML would read something else (rcl reads yes/no as booleans)
        return "[" + ", ".join(f'"{v}"' if not v or v.lower() in _YAML_NOT_STRINGS else v for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"' if not value or value[0] in "`[{\"" or ":" in value else value
    return str(value)


def markdown_table() -> str:
    """README's parameter table (test_params checks that README holds exactly this)."""
    rows = ["| parameter | default | applies | meaning |", "|---|---|---|---|"]
    for param in (*PARAMETERS, *camera_parameters("ID"), *monitor_parameters("NAME")):
        default = param.default if param.name != "camera.ID.topic" else "ID/image_raw (.../compressed)"
        choices = " One of: " + ", ".join(f"`{_text(c)}`" for c in param.choices) + "." if param.choices else ""
        applies = "next request" if param.live else ("at start" if param.name == "autostart" else "configure")
        rows.append(f"| `{param.name}` | `{_text(default)}` | {applies} | {param.description}.{choices} |")
    return "\n".join(rows)


def yaml_defaults() -> str:
    """config/vlm.yaml: every parameter at its default, described (test_params checks the file equals this)."""
    lines = ["# mobilevlm_node parameters, every one at its default (written by `python -m mobilevlm_ros.params "
             "--yaml`; README's", "# parameter table says the same). Copy it and edit it for your robot. Start with:",
             "#   mobilevlm_node --ros-args --params-file config/vlm.yaml",
             "#   ros2 launch mobilevlm_ros vlm.launch.py params_file:=config/vlm.yaml", "/**:", "  ros__parameters:"]
    for param in PARAMETERS:
        if param.name == "autostart":
            continue  # an argument of how the node is started (launch files), not of a robot's configuration
        lines.append(f"    # {param.description.replace('`', '')}")
        lines.append(f"    {param.name}: {_text(param.default)}")
    lines += ["    camera:", "      front:"]
    for param in camera_parameters("front"):
        lines.append(f"        # {param.description.replace('`', '')}")
        lines.append(f"        {param.name.rsplit('.', 1)[1]}: {_text(param.default)}")
    lines += ["    # A standing monitor, with monitors: [pedestrian] (its defaults; the question is required):",
              "    # monitor:", "    #   pedestrian:"]
    example = {"question": "Is there a pedestrian on the road?"}
    for param in monitor_parameters("pedestrian"):
        key = param.name.rsplit(".", 1)[1]
        lines.append(f"    #     # {param.description.replace('`', '')}")
        lines.append(f"    #     {key}: {_text(example.get(key, param.default))}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    print(yaml_defaults() if sys.argv[1:] == ["--yaml"] else markdown_table(), end="" if sys.argv[1:] else "\n")
