"""mobilevlm dev bench: speed and memory of real-shaped MobileVLM models (random weights, no download) against the
stacks a user would pick instead, measured in the same run on the same weights, each configuration in its own
process. Prints a table and the ratios; writes results.json, results.md and a plot to --out.

    mobilevlm dev bench                                   # everything installed, all three models
    mobilevlm dev bench --models MobileVLM-1.7B --configs ours-fp32,hf-fp32,llamacpp-Q4_0
    mobilevlm dev bench --models MobileVLM-1.7B --configs ours-bf16,llamacpp-F16 --rounds 3   # medians of 3 rounds
    mobilevlm dev bench --gpu-check                       # the prepared GPU check (scripts/gpu_check.sh)
    mobilevlm dev bench --models MobileVLM_V2-1.7B --configs ours-bf16 --batch-curve 1,2,4,8 --rounds 3 \
        --code-before /tmp/before   # ask_batch vs ask one after another; lone ask() against an older checkout
    mobilevlm dev bench --e2e --models MobileVLM_V2-1.7B \
        --configs ours-bf16,node-bf16,llamacpp-F16,ours-int8-dynamic,llamacpp-Q8_0 --rounds 3 \
        --code-before /tmp/before   # image in, answer out, against llama.cpp's MobileVLM path (e2e.py)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .models import REAL_MODELS

OURS = {"ours-fp32": {"dtype": "float32"}, "ours-bf16": {"dtype": "bfloat16"},
        "ours-int8": {"dtype": "float32", "quant": "int8"},
        "ours-int8-dynamic": {"dtype": "float32", "quant": "int8-dynamic"},
        "ours-int4": {"dtype": "float32", "quant": "int4"},
        "ours-fp32-vision-onnxruntime": {"dtype": "float32", "vision_backend": "onnxruntime"},
        # Every Linear layer on torch's default (MKL) kernels: shows what the oneDNN swap (model/cpu_linear.py) adds.
        "ours-fp32-mkl": {"dtype": "float32", "onednn": False}}
HF = {"hf-fp32": {"dtype": "float32"}, "hf-bf16": {"dtype": "bfloat16"}}
LLAMACPP = {"llamacpp-F16": "F16", "llamacpp-Q8_0": "Q8_0", "llamacpp-Q4_0": "Q4_0"}
# --e2e only: our configurations served by the real node over DDS (e2e.py)
NODE = {"node-bf16": {"dtype": "bfloat16"}, "node-int8-dynamic": {"dtype": "float32", "quant": "int8-dynamic"}}
BITS = {"ours-fp32": 32, "ours-fp32-mkl": 32, "ours-bf16": 16, "ours-int8": 8, "ours-int8-dynamic": 8,
        "ours-int4": 4, "llamacpp-F16": 16, "llamacpp-Q8_0": 8, "llamacpp-Q4_0": 4}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_configs() -> list[str]:
    names = list(OURS)
    if not _has("onnxruntime"):
        names.remove("ours-fp32-vision-onnxruntime")
    if _has("transformers"):
        names += list(HF)
    if _has("llama_cpp") and _has("gguf"):
        names += list(LLAMACPP)
    return names


CPUINFO = "/proc/cpuinfo"


def cpuinfo_value(keys: tuple[str, ...], cpuinfo: str = CPUINFO) -> str | None:
    """The value of the first line of cpuinfo that starts with one of keys; None where there is no such file."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name(cpuinfo: str = CPUINFO) -> str:
    return cpuinfo_value(("model name",), cpuinfo) or platform.processor() or platform.machine()


# The instruction sets the CPU kernels depend on: a virtual machine's CPU is often named only "AMD EPYC", and a
# Zen 3 (AVX2) and a Zen 4 (AVX-512, VNNI, bfloat16) under that name differ about 2x in every number here.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd",
                "asimddp", "sve")


def cpu_features(cpuinfo: str = CPUINFO) -> list[str]:
    """CPU_FEATURES present in the flags line (x86) or Features line (Arm) of cpuinfo, in CPU_FEATURES' order."""
    present = set((cpuinfo_value(("flags", "Features"), cpuinfo) or "").split())
    return [flag for flag in CPU_FEATURES if flag in present]


def hardware() -> dict:
    import torch

    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {"cpu": cpu_name(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
            "memory_gib": round(mem / 2**30, 1), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


def run_spec(spec: dict, timeout: float, script: list[str] | None = None, env: dict | None = None) -> dict:
    """Run one configuration in a fresh interpreter (script: the command after the interpreter, by default the
    measure module); returns its result or {'error': ...}."""
    cmd = [sys.executable, *(script or ["-m", "mobilevlm_ros.bench.measure"]), json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**spec, "error": " | ".join(tail) or f"exit code {proc.returncode}"}


def gguf_file(model: str, qtype: str, cache: Path, seed: int, llm_layers: int | None, timeout: float,
              demo_vocabulary: bool = False) -> Path:
    """The GGUF for (model, qtype, seed), written once by a subprocess (so its memory is not counted).
    demo_vocabulary: with the bundled demo model's tokenizer (text prompts tokenise as in our pipeline)."""
    name = f"{model}-L{llm_layers or 'all'}-seed{seed}-{qtype}{'-demo-vocab' if demo_vocabulary else ''}.gguf"
    return _written_once(cache / name, "write_gguf(config, path, a['qtype'], a['seed'], tokenizer_model=a['vocab'])",
                         {"model": model, "layers": llm_layers, "qtype": qtype, "seed": seed,
                          "vocab": str(DEMO_TOKENIZER) if demo_vocabulary else None}, timeout)


DEMO_TOKENIZER = Path(__file__).resolve().parent.parent / "demo_model" / "tokenizer.model"


def _written_once(path: Path, call: str, arg: dict, timeout: float) -> Path:
    """path, made by `call` (gguf_export's or models' writer of config, path) in a subprocess unless it exists."""
    if not path.exists():
        code = ("import sys, json; from pathlib import Path;"
                "from mobilevlm_ros.bench.gguf_export import write_gguf, write_projector_gguf;"
                "from mobilevlm_ros.bench.models import real_config, write_checkpoint; a = json.loads(sys.argv[1]);"
                "config = real_config(a['model'], a.get('layers'), a.get('vision_layers')); path = Path(a['path']);"
                + call)
        subprocess.run([sys.executable, "-c", code, json.dumps({**arg, "path": str(path)})], check=True,
                       timeout=timeout)
    return path


def projector_gguf_file(model: str, cache: Path, seed: int, vision_layers: int | None, timeout: float) -> Path:
    """The vision tower + projector GGUF (F16, as llama.cpp's converter writes by default) for (model, seed)."""
    return _written_once(cache / f"{model}-V{vision_layers or 'all'}-seed{seed}-mmproj-f16.gguf",
                         "write_projector_gguf(config, path, a['seed'])",
                         {"model": model, "vision_layers": vision_layers, "seed": seed}, timeout)


def checkpoint_dir(model: str, cache: Path, seed: int, llm_layers: int | None, vision_layers: int | None,
                   timeout: float) -> Path:
    """The seeded model written in the published layout (bfloat16 weights), for the node."""
    return _written_once(cache / f"{model}-L{llm_layers or 'all'}-V{vision_layers or 'all'}-seed{seed}-checkpoint",
                         "write_checkpoint(config, path, a['seed'])",
                         {"model": model, "layers": llm_layers, "vision_layers": vision_layers, "seed": seed},
                         timeout)


def measure_config(model: str, config: str, args: argparse.Namespace) -> dict:
    """One configuration of one model, measured in its own process (args: the command line's)."""
    spec = {"model": model, "config": config, "decode_tokens": args.decode_tokens,
            "question_tokens": args.question_tokens, "threads": args.threads or None, "seed": args.seed,
            "llm_layers": args.llm_layers, "vision_layers": args.vision_layers}
    if config in OURS:
        spec.update(stack="ours", **OURS[config])
    elif config in HF:
        spec.update(stack="hf", **HF[config])
    else:
        spec.update(stack="llamacpp", gguf=LLAMACPP[config])
        try:
            spec["gguf_path"] = str(gguf_file(model, LLAMACPP[config], Path(args.gguf_cache), args.seed,
                                              args.llm_layers, args.timeout))
        except (subprocess.SubprocessError, OSError) as e:
            return {**spec, "error": f"GGUF conversion failed: {e}"}
    start = time.time()
    r = run_spec(spec, args.timeout)
    r["wall_s"] = round(time.time() - start, 1)
    return r


def measure_batch_curve(model: str, config: str, args: argparse.Namespace, code_before: str | None = None) -> dict:
    """The batching scenario (batching.py) of one of our configurations in its own process; code_before: a
    directory holding an older checkout's mobilevlm_ros, whose ask() then runs the lone request alone."""
    spec = {"model": model, "config": config, "decode_tokens": args.decode_tokens, "threads": args.threads or None,
            "seed": args.seed, "llm_layers": args.llm_layers, "vision_layers": args.vision_layers,
            "batch_sizes": [] if code_before else args.batch_sizes, "code_before": code_before, **OURS[config]}
    env = None
    if code_before:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_before,
                                                                         os.environ.get("PYTHONPATH")]))}
    start = time.time()
    r = run_spec(spec, args.timeout, [str(Path(__file__).with_name("batching.py"))], env)
    r["wall_s"] = round(time.time() - start, 1)
    return r


def measure_e2e(model: str, config: str, args: argparse.Namespace, code_before: str | None = None) -> dict:
    """The end-to-end scenarios (e2e.py) of one configuration in its own process; code_before: a directory holding
    an older checkout's mobilevlm_ros, whose ask() then answers (without the frame prefix cache)."""
    spec = {"model": model, "config": config, "threads": args.threads or None, "seed": args.seed,
            "llm_layers": args.llm_layers, "vision_layers": args.vision_layers, "repeat": args.repeat,
            "code_before": code_before}
    cache = Path(args.gguf_cache)
    try:
        if config in OURS:
            spec.update(stack="ours", **OURS[config])
        elif config in NODE:
            spec.update(stack="node", **NODE[config])
            spec["checkpoint"] = str(checkpoint_dir(model, cache, args.seed, args.llm_layers, args.vision_layers,
                                                    args.timeout))
        else:
            spec.update(stack="llamacpp", gguf=LLAMACPP[config])
            spec["gguf_path"] = str(gguf_file(model, LLAMACPP[config], cache, args.seed, args.llm_layers,
                                              args.timeout, demo_vocabulary=True))
            spec["mmproj_path"] = str(projector_gguf_file(model, cache, args.seed, args.vision_layers, args.timeout))
    except (subprocess.SubprocessError, OSError, ValueError) as e:
        return {**spec, "error": f"writing the model files failed: {e}"}
    env = None
    if code_before:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_before,
                                                                         os.environ.get("PYTHONPATH")]))}
    start = time.time()
    r = run_spec(spec, args.timeout, [str(Path(__file__).with_name("e2e.py"))], env)
    r["wall_s"] = round(time.time() - start, 1)
    return r


def rounds_in_turns(models: list[str], runs: list[tuple[str, str | None]], rounds: int, out: Path, hw: dict,
                    measure, status, round_ratios) -> tuple[list[dict], list[dict]]:
    """Every (configuration, code before) of runs on every model, once per round, in turns (the order reversed
    every other round), results.json rewritten after each; returns every result and each round's
    round_ratios(its results)."""
    results: list[dict] = []
    per_round: list[dict] = []
    for round_index in range(rounds):
        this_round = []
        for model in models:
            for config, code_before in (runs if round_index % 2 == 0 else runs[::-1]):
                r = measure(model, config, code_before)
                r["round"] = round_index
                this_round.append(r)
                results.append(r)
                label = config + (" (code before)" if code_before else "")
                print(f"{model:18s} {label:34s} {r.get('error') or status(r)}", flush=True)
                (out / "results.json").write_text(json.dumps({"hardware": hw, "results": results}, indent=1))
        per_round.append(round_ratios(this_round))
    return results, per_round


def e2e_main(models: list[str], configs: list[str], args: argparse.Namespace, out: Path, hw: dict) -> int:
    """--e2e: per round, per model and configuration, the scenarios (and with --code-before, our configurations
    on the older code), in turns; the ratios are per round, then medians."""
    from .e2e import e2e_ratios, e2e_table, median_rows, plot_e2e

    runs = [(c, None) for c in configs] + [(c, args.code_before) for c in configs if args.code_before and c in OURS]
    results, per_round = rounds_in_turns(
        models, runs, args.rounds, out, hw, lambda model, config, before: measure_e2e(model, config, args, before),
        lambda r: (f"(a) {r['a']['wall_ms']:.0f} ms (TTFT {_fmt(r['a'].get('ttft_ms'), 0)}), "
                   f"(b) {r['b']['wall_ms']:.0f} ms, (c) {r['c']['wall_ms']:.0f} ms"), e2e_ratios)
    medians = median_rows(results)
    return write_report(out, hw, results, medians, median_ratios(per_round), e2e_table(medians),
                        "Ratios (medians of the rounds' ratios):", lambda: plot_e2e(medians, hw, out / "e2e.png"))


def batch_curve_main(models: list[str], configs: list[str], args: argparse.Namespace, out: Path, hw: dict) -> int:
    """--batch-curve: per round, per model and configuration, the curve (and lone request) now and, with
    --code-before, the lone request of the older code, in turns."""
    from .batching import batch_ratios, batch_table, median_curves, plot_curves

    def status(r: dict) -> str:
        curve = ", ".join(f"B={p['batch']} {p['decode_ratio']:.2f}x" for p in r.get("curve", []))
        return f"lone ask {r['lone_total_ms']:.0f} ms; batched/sequential decode: {curve or '-'}"

    runs = [(c, None) for c in configs] + ([(c, args.code_before) for c in configs] if args.code_before else [])
    results, per_round = rounds_in_turns(
        models, runs, args.rounds, out, hw,
        lambda model, config, before: measure_batch_curve(model, config, args, before), status, batch_ratios)
    medians = median_curves(results)
    return write_report(out, hw, results, medians, median_ratios(per_round), batch_table(medians),
                        "Ratios (medians of the rounds' ratios):", lambda: plot_curves(medians, hw,
                                                                                      out / "batch_curve.png"))


def write_report(out: Path, hw: dict, results: list[dict], medians: list[dict], summary: dict, table_md: str,
                 caption: str, draw_plot) -> int:
    """results.md (the table and the ratios), results.json (everything), the plot; exit code 1 if any run failed."""
    md = table_md + f"\n\n{caption}\n\n```\n" + json.dumps(summary, indent=1) + "\n```\n"
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"hardware": hw, "results": results, "medians": medians,
                                                  "ratios": summary}, indent=1))
    draw_plot()
    print(md)
    return 0 if all("error" not in r for r in results) else 1


def ratios(results: list[dict]) -> dict:
    """Per model: the target ratios (ours over the baseline, >1 is better for us in every entry)."""
    out: dict[str, dict] = {}
    by = {(r["model"], r["config"]): r for r in results if "error" not in r}
    for model in sorted({r["model"] for r in results}):
        def get(config, field):
            r = by.get((model, config))
            return None if r is None else r.get(field)

        m: dict[str, float] = {}
        for config, baseline, tag in (("ours-fp32", "hf-fp32", "fp32"), ("ours-bf16", "hf-bf16", "bf16"),
                                      ("ours-fp32-vision-onnxruntime", "hf-fp32", "fp32_vision_onnxruntime"),
                                      ("ours-fp32-mkl", "hf-fp32", "fp32_mkl")):
            ours, hf = get(config, "decode_tok_s"), get(baseline, "decode_tok_s")
            if ours and hf:
                m[f"decode_vs_hf_{tag}"] = ours / hf
            ours, hf = get(config, "ttft_ms"), get(baseline, "ttft_ms")
            if ours and hf:
                m[f"ttft_speedup_vs_hf_{tag}"] = hf / ours
            ours, hf = get(config, "vision_ms"), get(baseline, "vision_ms")
            if ours and hf:
                m[f"vision_speedup_vs_hf_{tag}"] = hf / ours
        for bits, ref in ((16, "llamacpp-F16"), (8, "llamacpp-Q8_0"), (4, "llamacpp-Q4_0")):
            theirs = get(ref, "decode_tok_s")
            candidates = [(get(c, "decode_tok_s"), c) for c, b in BITS.items() if b == bits and c.startswith("ours")]
            candidates = [c for c in candidates if c[0]]
            if theirs and candidates:
                best, name = max(candidates)
                m[f"decode_vs_llamacpp_{bits}bit"] = best / theirs
                m[f"decode_vs_llamacpp_{bits}bit_config"] = name  # type: ignore[assignment]
                prefill_ours, prefill_theirs = get(name, "prefill_tok_s"), get(ref, "prefill_tok_s")
                if prefill_ours and prefill_theirs:
                    m[f"prefill_vs_llamacpp_{bits}bit"] = prefill_ours / prefill_theirs
        for config in OURS:
            v = get(config, "peak_over_weights")
            if v:
                m[f"peak_over_weights_{config}"] = v
        out[model] = m
    return out


def median_ratios(per_round: list[dict]) -> dict:
    """ratios() of each round combined: per model and entry the median over the rounds that have it (for a
    configuration name, the one most rounds name). Each round's ratio compares runs made minutes apart, so the
    slow swings of a shared machine cancel in it, which they do not in a ratio of medians."""
    out: dict[str, dict] = {}
    for model in dict.fromkeys(m for r in per_round for m in r):
        entries = [r[model] for r in per_round if model in r]
        keys = dict.fromkeys(k for e in entries for k in e)
        out[model] = {}
        for key in keys:
            values = [e[key] for e in entries if key in e]
            if isinstance(values[0], str):
                out[model][key] = max(set(values), key=values.count)
            else:
                out[model][key] = statistics.median(values)
    return out


def rows_over_rounds(results: list[dict], key, median_row) -> list[dict]:
    """One row per key(result): median_row(the rounds that measured it), with "rounds" their number. A
    configuration that failed in every round keeps its first error."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(key(r), []).append(r)
    rows = []
    for runs in groups.values():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append(runs[0])
            continue
        row = median_row(ok)
        row.pop("round", None)
        row["rounds"] = len(ok)
        rows.append(row)
    return rows


def median_results(results: list[dict]) -> list[dict]:
    """One row per (model, configuration): the median of each number over its rounds."""
    def median_row(ok: list[dict]) -> dict:
        row = dict(ok[0])
        for key, value in ok[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key] = statistics.median(r[key] for r in ok if r.get(key) is not None)
        return row
    return rows_over_rounds(results, lambda r: (r["model"], r["config"]), median_row)


def _fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def table(results: list[dict]) -> str:
    head = ("| model | config | preprocess ms | vision+projector ms | prefill tok/s | TTFT ms | decode tok/s | "
            "weights GB | peak RSS GB | (peak - start) / weights |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | error: {r['error'][:80]} |||||||| ")
            continue
        ttft = r.get("ttft_ms")
        ttft_s = _fmt(ttft, 0) if ttft else f"{_fmt(r.get('ttft_llm_ms'), 0)} (decoder only)"
        lines.append(
            f"| {r['model']} | {r['config']} | {_fmt(r.get('preprocess_ms'))} | {_fmt(r.get('vision_ms'), 0)} | "
            f"{_fmt(r.get('prefill_tok_s'))} | {ttft_s} | {_fmt(r.get('decode_tok_s'), 2)} | "
            f"{_fmt(r['weights_bytes'] / 1e9, 2)} | {_fmt(r['peak_rss_bytes'] / 1e9, 2)} | "
            f"{_fmt(r.get('peak_over_weights'), 2)} |")
    return "\n".join(lines)


def plot(results: list[dict], hw: dict, path: Path) -> Path | None:
    """Decode tokens/s and time to first token per model and configuration; hw: the machine the results came
    from (hardware()'s record, also for results read back from a results.json)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in results if "error" not in r]
    models = sorted({r["model"] for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    order = list(dict.fromkeys(r["config"] for r in ok))
    # one colour per configuration in both panels (llama.cpp has no time to first token: it runs no vision)
    colour = {c: f"C{i}" for i, c in enumerate(order)}
    for ax, field, label in ((axes[0], "decode_tok_s", "decode tokens/s (higher is better)"),
                             (axes[1], "ttft_ms", "time to first token, ms (lower is better)")):
        configs = [c for c in order if any(r["config"] == c and r.get(field) for r in ok)]
        width = 0.8 / max(1, len(configs))
        for i, config in enumerate(configs):
            values = [next((r.get(field) or 0 for r in ok if r["model"] == m and r["config"] == config), 0)
                      for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=config, color=colour[config])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
        ax.set_title(label)
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"MobileVLM random-weight benchmark, {hw['cpu']} ({', '.join(hw.get('cpu_features', []))}), "
                 f"{hw['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mobilevlm dev bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(REAL_MODELS), help="comma-separated, from: " + ", ".join(REAL_MODELS))
    p.add_argument("--configs", help="comma-separated subset of: " + ", ".join([*OURS, *HF, *LLAMACPP])
                   + "; with --e2e also " + ", ".join(NODE))
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="threads per configuration (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-layers", type=int, help="shrink the decoder depth (smoke tests only)")
    p.add_argument("--vision-layers", type=int, help="shrink the vision tower depth (smoke tests only)")
    p.add_argument("--out", default="bench-results", help="directory for results.json, results.md, plot")
    p.add_argument("--gguf-cache", default=os.path.expanduser("~/.cache/mobilevlm-bench"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every configuration this many times, in turns (the order reversed every other "
                        "round); the table shows medians and each ratio is the median of the rounds' ratios")
    p.add_argument("--batch-curve", metavar="SIZES",
                   help="comma-separated batch sizes: B captions through ask_batch against the same B through ask "
                        "one after another, and a lone ask(), for our --configs (decode tokens: --decode-tokens)")
    p.add_argument("--e2e", action="store_true",
                   help="end-to-end scenarios against llama.cpp's MobileVLM path (e2e.py): (a) a cold question, "
                        "(b) a caption, (c) three questions about one frame, and our frame-cache and choice "
                        "scenarios; configurations: ours-*, node-*, llamacpp-*")
    p.add_argument("--repeat", type=int, default=3, help="with --e2e: new frames per scenario in a round (median)")
    p.add_argument("--code-before", metavar="DIR",
                   help="with --batch-curve or --e2e: a directory with an older checkout's mobilevlm_ros package "
                        "(e.g. git archive c9942bb mobilevlm_ros | tar -x -C DIR); its ask() runs the lone "
                        "request (--batch-curve) or the scenarios (--e2e) too")
    p.add_argument("--gpu-check", action="store_true", help="run the GPU check instead (needs CUDA)")
    args = p.parse_args(argv)
    if args.gpu_check:
        from .gpu_check import main as gpu_main

        return gpu_main([])
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in REAL_MODELS:
            p.error(f"unknown model {m!r}")
    have = available_configs()
    configs = have if not args.configs else [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in {*OURS, *HF, *LLAMACPP, *NODE} or (c in NODE and not args.e2e):
            p.error(f"unknown config {c!r}")
    if args.e2e:
        if args.batch_curve:
            p.error("--e2e and --batch-curve are separate runs")
        if args.repeat < 1:
            p.error("--repeat must be at least 1")
        if not args.configs:
            configs = ["ours-bf16", "ours-int8-dynamic", "llamacpp-F16", "llamacpp-Q8_0"]
        if [c for c in configs if c in HF]:
            p.error("--e2e measures ours (ours-*, node-*) and llama.cpp (llamacpp-*)")
        have = have + list(NODE)
    elif args.batch_curve:
        try:
            args.batch_sizes = [int(b) for b in args.batch_curve.split(",") if b.strip()]
        except ValueError:
            p.error(f"--batch-curve {args.batch_curve!r}: expected comma-separated batch sizes")
        if not args.batch_sizes or min(args.batch_sizes) < 1:
            p.error("--batch-curve: batch sizes must be at least 1")
        if not args.configs:
            configs = ["ours-bf16"]
        if [c for c in configs if c not in OURS]:
            p.error("--batch-curve measures our configurations only")
    elif args.code_before and not args.e2e:
        p.error("--code-before goes with --batch-curve or --e2e")
    skipped = [c for c in configs if c not in have]
    configs = [c for c in configs if c in have]
    if skipped:
        print(f"skipping (optional extra not installed: pip install '.[bench]'): {', '.join(skipped)}",
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    print(f"# {hw['cpu']} ({' '.join(hw['cpu_features']) or 'no feature flags read'}), {hw['cores']} cores, "
          f"{hw['memory_gib']} GiB, torch {hw['torch']}", flush=True)
    if args.batch_curve:
        return batch_curve_main(models, configs, args, out, hw)
    if args.e2e:
        return e2e_main(models, configs, args, out, hw)
    results: list[dict] = []
    per_round: list[list[dict]] = []
    for round_index in range(args.rounds):
        # every other round runs the configurations in reverse, so a machine slowing down or speeding up over a
        # round does not favour whichever configuration runs first
        order = configs if round_index % 2 == 0 else configs[::-1]
        per_round.append([])
        for model in models:
            for config in order:
                r = measure_config(model, config, args)
                r["round"] = round_index
                per_round[-1].append(r)
                results.append(r)
                status = r.get("error") or (f"decode {_fmt(r.get('decode_tok_s'), 2)} tok/s, "
                                            f"TTFT {_fmt(r.get('ttft_ms') or r.get('ttft_llm_ms'), 0)} ms, "
                                            f"vision {_fmt(r.get('vision_ms'), 0)} ms")
                print(f"{model:18s} {config:24s} {status}", flush=True)
                (out / "results.json").write_text(json.dumps({"hardware": hw, "results": results}, indent=1))
    medians = median_results(results)
    return write_report(out, hw, results, medians, median_ratios([ratios(r) for r in per_round]), table(medians),
                        "Ratios (ours / baseline, >1 is better for ours):",
                        lambda: plot(medians, hw, out / "bench.png"))


if __name__ == "__main__":
    sys.exit(main())
