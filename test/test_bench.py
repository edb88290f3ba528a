"""mobilevlm dev bench plumbing on shrunken models (no timing thresholds: speed is reported, never asserted), the
seeded random weights shared by every stack, and the GGUF export against llama.cpp when installed."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

from mobilevlm_ros.bench.cli import main as bench_main
from mobilevlm_ros.bench.cli import cpu_features, cpu_name, median_ratios, median_results, ratios, table
from mobilevlm_ros.bench.models import hf_llama_state, init_tensor, random_mobilevlm, real_config
from mobilevlm_ros.model.config import LlamaConfig


def test_real_configs_have_published_dims():
    c = real_config("MobileVLM-1.7B")
    assert (c.llama.hidden_size, c.llama.intermediate_size, c.llama.num_layers, c.llama.num_heads) == (2048, 5632, 24, 16)
    assert c.vision_layers_needed == 23 and c.image_tokens == 144 and c.projector_type == "ldpnet"
    assert real_config("MobileVLM_V2-1.7B").projector_type == "ldpnetv2"
    c3 = real_config("MobileVLM-3B")
    assert (c3.llama.hidden_size, c3.llama.intermediate_size, c3.llama.num_layers, c3.llama.num_heads) == (2560, 6912, 32, 32)


def test_seeded_weights_are_reproducible_and_shared():
    a = init_tensor("llm.layers.0.mlp.up_proj.weight", (64, 32), seed=3)
    assert torch.equal(a, init_tensor("llm.layers.0.mlp.up_proj.weight", (64, 32), seed=3))
    assert not torch.equal(a, init_tensor("llm.layers.0.mlp.up_proj.weight", (64, 32), seed=4))
    assert abs(a.std().item() - 32 ** -0.5) < 0.03
    config = real_config("MobileVLM-1.7B", llm_layers=1)
    config = replace(config, llama=replace(config.llama, vocab_size=64))
    ours = random_mobilevlm(config, vision=False).llm.state_dict()
    hf = dict(hf_llama_state(config))
    assert set(hf) == {("model." + k if k != "lm_head.weight" else k) for k in ours}
    for k, v in ours.items():
        assert torch.equal(hf["model." + k if k != "lm_head.weight" else k], v)


def test_ratios_and_table_from_results():
    rows = [{"model": "M", "config": "ours-fp32", "decode_tok_s": 6.0, "ttft_ms": 900, "vision_ms": 400,
             "weights_bytes": 1e9, "peak_rss_bytes": 1.3e9, "peak_over_weights": 1.05},
            {"model": "M", "config": "hf-fp32", "decode_tok_s": 3.0, "ttft_ms": 1000, "vision_ms": 500,
             "weights_bytes": 1e9, "peak_rss_bytes": 1.5e9},
            {"model": "M", "config": "ours-int8", "decode_tok_s": 8.0, "prefill_tok_s": 50,
             "weights_bytes": 3e8, "peak_rss_bytes": 6e8},
            {"model": "M", "config": "llamacpp-Q8_0", "decode_tok_s": 10.0, "prefill_tok_s": 100,
             "weights_bytes": 3e8, "peak_rss_bytes": 5e8},
            {"model": "M", "config": "ours-int4", "error": "boom"}]
    r = ratios(rows)["M"]
    assert r["decode_vs_hf_fp32"] == 2.0 and r["ttft_speedup_vs_hf_fp32"] == pytest.approx(1000 / 900)
    assert r["decode_vs_llamacpp_8bit"] == 0.8 and r["decode_vs_llamacpp_8bit_config"] == "ours-int8"
    assert r["prefill_vs_llamacpp_8bit"] == 0.5 and "decode_vs_llamacpp_4bit" not in r
    md = table(rows)
    assert "ours-fp32" in md and "error: boom" in md


def test_rounds_combine_into_medians():
    """Each round's ratios pair runs made minutes apart; the rounds' ratios are combined by their median, and the
    table shows each configuration's median numbers."""
    def run(config, decode, round_index):
        return {"model": "M", "config": config, "decode_tok_s": decode, "ttft_ms": 1000.0, "round": round_index,
                "weights_bytes": 1e9, "peak_rss_bytes": 1.2e9}
    rounds = [[run("ours-bf16", d, i), run("hf-bf16", h, i)]
              for i, (d, h) in enumerate([(10.0, 4.0), (6.0, 3.0), (9.0, 3.0)])]  # ratios 2.5, 2.0, 3.0
    combined = median_ratios([ratios(r) for r in rounds])
    assert combined["M"]["decode_vs_hf_bf16"] == 2.5  # the ratio of the medians (9 / 3) would say 3.0
    assert combined["M"]["ttft_speedup_vs_hf_bf16"] == 1.0
    rows = median_results([r for rnd in rounds for r in rnd] + [{"model": "M", "config": "ours-int4",
                                                               "error": "boom", "round": 0}])
    assert [(r["config"], r.get("decode_tok_s"), r.get("rounds")) for r in rows] == \
        [("ours-bf16", 9.0, 3), ("hf-bf16", 3.0, 3), ("ours-int4", None, None)]
    assert "round" not in rows[0] and rows[2]["error"] == "boom"
    assert median_ratios([{"M": {"decode_vs_llamacpp_16bit_config": c}} for c in ("a", "b", "b")]) == \
        {"M": {"decode_vs_llamacpp_16bit_config": "b"}}


def test_cpu_name_and_features_from_cpuinfo(tmp_path):
    """The benchmark names the instruction sets, not only the CPU's (often generic) name: the ones in CPU_FEATURES,
    from the x86 flags line or the Arm Features line, in CPU_FEATURES' order."""
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512_bf16 sse avx2 avx512f\n\n"
                   "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512_bf16 sse avx2 avx512f\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm asimddp sve\n")
    assert cpu_name(str(x86)) == "AMD EPYC"
    assert cpu_features(str(x86)) == ["avx2", "avx512f", "avx512_bf16"]
    assert cpu_features(str(arm)) == ["asimd", "asimddp", "sve"]
    assert cpu_features(str(tmp_path / "absent")) == []
    assert cpu_name(str(tmp_path / "absent"))  # falls back to platform's name for the machine


def test_bench_smoke_on_shrunken_models(tmp_path):
    """The whole pipeline of the benchmark (subprocess per configuration, results, ratios, plot) on a real-width
    but 1-layer decoder and 2-layer vision tower."""
    configs = ["ours-fp32", "ours-int8"]  # ours-fp32: the same-dtype ratio against hf-fp32 below
    if importlib.util.find_spec("transformers"):
        configs.append("hf-fp32")
    code = bench_main(["--models", "MobileVLM_V2-1.7B", "--configs", ",".join(configs), "--llm-layers", "1",
                       "--vision-layers", "2", "--decode-tokens", "3", "--question-tokens", "4",
                       "--out", str(tmp_path), "--timeout", "600", "--rounds", "2"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert code == 0, [r.get("error") for r in data["results"]]
    # two rounds, the second in reverse order; one median row per configuration
    assert [(r["config"], r["round"]) for r in data["results"]] == \
        [(c, 0) for c in configs] + [(c, 1) for c in reversed(configs)]
    assert [(r["config"], r["rounds"]) for r in data["medians"]] == [(c, 2) for c in configs]
    for r in data["results"]:
        for field in ("preprocess_ms", "vision_ms", "prefill_tok_s", "ttft_ms", "decode_tok_s", "peak_rss_bytes"):
            assert r[field] > 0, (r["config"], field)
        assert r["prefill_tokens"] == 148
    assert "decode_vs_hf_fp32" in data["ratios"]["MobileVLM_V2-1.7B"] or "hf-fp32" not in configs
    assert data["hardware"]["cpu_features"] == cpu_features()
    assert (tmp_path / "results.md").is_file()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.skipif(not (importlib.util.find_spec("gguf") and importlib.util.find_spec("llama_cpp")),
                    reason="needs the bench extra (gguf, llama-cpp-python)")
def test_gguf_export_computes_our_function_in_llama_cpp(tmp_path):
    """The same seeded decoder in llama.cpp (F16 GGUF, q/k permuted for GGML's RoPE) and here give the same
    logits, so the llama.cpp baseline really runs the same weights."""
    import llama_cpp
    import numpy as np

    from mobilevlm_ros.bench.gguf_export import write_gguf
    from mobilevlm_ros.model.quantize import prompt_logits

    config = real_config("MobileVLM-1.7B", llm_layers=2)
    config = replace(config, llama=LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                                               num_heads=4, num_kv_heads=4))
    path = write_gguf(config, tmp_path / "m.gguf", "F16", seed=5)
    ids = list(range(10, 30))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    ours_llm = random_mobilevlm(config, seed=5, vision=False).llm
    ours_llm.setup_cache(64)
    ours = prompt_logits(ours_llm, ours_llm.embed_tokens(torch.tensor(ids))[None])
    assert (theirs - ours).abs().max().item() < 0.05 * ours.abs().max().item()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() >= 0.9


def test_batch_curve_smoke_on_shrunken_models(tmp_path):
    """--batch-curve end to end on a 1-layer decoder: per batch size the same captions through ask_batch and
    through ask one after another (same token counts), the lone request of the code now and of an older checkout
    (here the same tree, passed as --code-before), the ratios, the table and the plot."""
    from pathlib import Path

    import mobilevlm_ros

    checkout = str(Path(mobilevlm_ros.__file__).parent.parent)
    code = bench_main(["--models", "MobileVLM_V2-1.7B", "--configs", "ours-fp32", "--llm-layers", "1",
                       "--vision-layers", "2", "--decode-tokens", "3", "--batch-curve", "1,2",
                       "--code-before", checkout, "--out", str(tmp_path), "--timeout", "600"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert code == 0, [r.get("error") for r in data["results"]]
    now, before = data["results"]
    assert not now["code_before"] and before["code_before"] == checkout and before["curve"] == []
    assert [p["batch"] for p in now["curve"]] == [1, 2]
    for p in now["curve"]:
        # every caption runs to max_new_tokens in both ways, so the tokens/s compare the same work
        assert p["sequential"]["tokens"] == p["batched"]["tokens"] == 3 * p["batch"]
        assert p["decode_ratio"] > 0 and p["e2e_ratio"] > 0
    assert now["lone_total_ms"] > 0 and before["lone_decode_tok_s"] > 0
    ratios_now = data["ratios"]["MobileVLM_V2-1.7B"]
    assert {"ours-fp32_batch2_decode_batched_over_sequential", "ours-fp32_lone_time_now_over_before"} <= set(ratios_now)
    assert "| 2 |" in (tmp_path / "results.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "batch_curve.png").stat().st_size > 0
