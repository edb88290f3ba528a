"""The parameter table is the one home of every default: config/vlm.yaml and README's table are what it generates,
and read_config's cross-checks refuse what no single value shows (run without ROS)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mobilevlm_ros.monitors import Monitor
from mobilevlm_ros.params import (BY_NAME, PARAMETERS, camera_parameters, markdown_table, monitor_parameters,
                                  read_config, yaml_defaults)

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_params_file_is_the_defaults():
    assert (ROOT / "config" / "vlm.yaml").read_text() == yaml_defaults(), \
        "regenerate it: python -m mobilevlm_ros.params --yaml > config/vlm.yaml"


def test_readme_parameter_table_is_the_code_s():
    assert markdown_table() in (ROOT / "README.md").read_text(), \
        "regenerate README's table: python -m mobilevlm_ros.params"


def _values(**changes):
    """value(name) as the node reads it: the defaults (camera and monitor ones included) with changes applied."""
    values = {p.name: p.default for p in PARAMETERS}
    values.update(changes)
    for camera_id in values["cameras"]:
        values.update({p.name: p.default for p in camera_parameters(camera_id) if p.name not in values})
    for name in filter(None, values["monitors"]):
        values.update({p.name: p.default for p in monitor_parameters(name) if p.name not in values})
    return values.__getitem__


def test_defaults_give_the_demo_model_and_expanded_paths(monkeypatch, tmp_path):
    config = read_config(_values())
    assert config.model_is_demo and Path(config.model_path, "config.json").is_file()
    assert config.server.max_new_tokens == BY_NAME["max_new_tokens"].default
    assert config.caption_cameras == ("front",) and config.cameras[0].reliability == "auto"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MODELS", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert read_config(_values(model_path="~/m")).model_path == str(tmp_path / "m")
    assert read_config(_values(model_path="$MODELS/m", engines_dir="~/engines")).engines_dir == \
        str(tmp_path / "engines")


def test_monitors_from_parameters():
    """Each name in monitors is a monitor from its monitor.NAME.* parameters: the default camera and yes/no unless
    given; empty entries declare none."""
    assert read_config(_values()).monitors == ()
    config = read_config(_values(**{
        "cameras": ["front", "rear"], "monitors": ["", "walker", "light"],
        "monitor.walker.question": "Is there a pedestrian on the road?",
        "monitor.light.question": "Is the traffic light red or green?", "monitor.light.camera": "rear",
        "monitor.light.rate_hz": 5.0, "monitor.light.choices": ["red", "green"]}))
    assert config.monitors == (Monitor("walker", "Is there a pedestrian on the road?", "front", 1.0, ("yes", "no")),
                               Monitor("light", "Is the traffic light red or green?", "rear", 5.0, ("red", "green")))


MONITOR = {"monitors": ["m"], "monitor.m.question": "q"}


@pytest.mark.parametrize("changes,message", [
    ({"monitors": ["m"]}, "monitor m: the question is empty"),
    ({**MONITOR, "monitor.m.camera": "rear"}, "monitor.m.camera 'rear' is not one of cameras ['front']"),
    ({**MONITOR, "monitor.m.choices": ["a", "a"]}, "monitor m: choice 'a' is given twice"),
    ({**MONITOR, "monitor.m.choices": [f"c{i}" for i in range(17)]}, "monitor m: 17 choices: at most 16"),
    ({**MONITOR, "monitor.m.rate_hz": 0.0}, "monitor.m.rate_hz 0.0: must be at least 0.001"),
    ({**MONITOR, "monitors": ["m", "m"]}, "names must be distinct"),
    ({"monitors": ["a-b"], "monitor.a-b.question": "q"}, "monitor name 'a-b': use letters, digits and _"),
    ({"cameras": ["front", "front"]}, "all non-empty and distinct"),
    ({"default_camera": "left"}, "default_camera 'left' is not in cameras"),
    ({"caption_cameras": ["rear"]}, "caption_cameras ['rear']: every entry must be one of cameras"),
    ({"quantize": "int8", "device": "cuda"}, "quantize 'int8' needs device cpu"),
    ({"device": "gpu"}, "device 'gpu': expected cpu, cuda or cuda:N"),
    ({"model_path": "/nonexistent"}, "model_path '/nonexistent' is not a directory"),
    ({"frame_age_from": "header"}, "frame_age_from 'header': expected one of stamp, arrival"),
    ({"max_seq_len": 100}, "max_seq_len 100: must be at least 256"),
])
def test_cross_checks_name_the_parameter(changes, message):
    with pytest.raises(ValueError, match=None) as error:
        read_config(_values(**changes))
    assert message in str(error.value)
