"""mobilevlm dev bench --e2e on shrunken models: the scenarios through our pipeline, the real node over DDS and, where
the bench extra is installed, llama.cpp's multimodal chat handler (speed is reported, never asserted)."""
from __future__ import annotations

import importlib.util
import json

from requirements import require_module

from mobilevlm_ros.bench.cli import main as bench_main

require_module("rclpy")  # the node scenario: its client runs in the benchmark's process


def test_e2e_smoke_on_shrunken_models(tmp_path):
    """--e2e end to end on a real-width 1-layer decoder and 2-layer vision tower: the scenarios through our pipeline
    (with the frame-cache and choice scenarios), through the real node over DDS on a checkpoint written in the
    published layout, and, where installed, through llama.cpp's multimodal chat handler on the same weights; each
    with wall time, time to first token (not over DDS: the service answers whole) and the split; the ratios, the
    table and the plot."""
    configs = ["ours-fp32", "node-bf16"]
    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf"):
        configs.append("llamacpp-F16")
    code = bench_main(["--e2e", "--models", "MobileVLM_V2-1.7B", "--configs", ",".join(configs), "--llm-layers", "1",
                       "--vision-layers", "2", "--repeat", "1", "--out", str(tmp_path / "out"),
                       "--gguf-cache", str(tmp_path / "cache"), "--timeout", "900"])
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0, [r.get("error") for r in data["results"]]
    by = {r["config"]: r for r in data["results"]}
    for config, r in by.items():
        for key in ("a", "b"):
            assert r[key]["wall_ms"] >= r[key]["decode_ms"] > 0 and r[key]["vision_ms"] > 0, (config, key)
        assert len(r["c"]["questions"]) == 3 and r["c"]["wall_ms"] > 0
    ours = by["ours-fp32"]
    assert ours["a"]["tokens"] == 2 and ours["b"]["tokens"] == 32
    # the follow-ups of (c) start from the frame's cached prefix: no vision pass
    assert [q["prefix_cached"] for q in ours["c"]["questions"]] == [False, True, True]
    assert ours["c"]["questions"][1]["vision_ms"] == 0
    assert ours["monitors8"]["wall_ms"] > 0 and ours["choice4"]["wall_ms"] > 0
    assert ours["decoder_read_floor_ms"] > 0  # one read of the decoder's weights at this machine's read rate
    assert by["node-bf16"]["a"]["tokens"] == 2 and by["node-bf16"]["a"]["ros_ms"] > 0
    ratios = data["ratios"]["MobileVLM_V2-1.7B"]
    assert {"ours-fp32_followup_ttft_over_cold", "ours-fp32_followup_floor_over_cold",
            "ours-fp32_monitors8_over_cold_wall", "ours-fp32_choice4_over_cold_ttft"} <= set(ratios)
    if "llamacpp-F16" in by:
        assert by["llamacpp-F16"]["b"]["tokens"] == 32
        assert "node-bf16_a_wall_over_llamacpp-F16" in ratios
    assert "(c) 3 questions" in (tmp_path / "out" / "results.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "e2e.png").stat().st_size > 0
