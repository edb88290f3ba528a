"""The batching scenario of mobilevlm dev bench (``--batch-curve 1,2,4,8``): per batch size B, B captions (one prompt,
B different random images, greedy, a fixed number of new tokens) through ``ask_batch`` against the same B through
``ask`` one after another, in one process on one real-shaped random-weight model; and one lone request (``ask``).

Run by path, not with -m (``python .../bench/batching.py '<json spec>'``), so that PYTHONPATH can point the model
code at an older checkout (``--code-before``): the lone-request row of the code before batching then runs this
same measurement, and only ask() (which every version has) is called there.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

PROMPT = "Describe the image briefly."
LONE_REPEAT = 3  # lone-request timings: the median of these many asks (other jobs share the machine)


class _NoStopTokenizer:
    """The demo model's tokenizer with no end-of-sequence id: random weights would end answers at random, and
    every configuration must decode the same number of tokens to be compared."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_id = -1

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def build_pipeline(spec: dict):
    """A MobileVLMPipeline on the real-shaped random model of spec, with the kernels MobileVLMPipeline.load would
    choose for its dtype / quantisation (and spec's prefix_cache_frames and max_batch, where given)."""
    from pathlib import Path

    import torch

    import mobilevlm_ros
    from mobilevlm_ros.bench.models import random_mobilevlm, real_config
    from mobilevlm_ros.model.pipeline import MobileVLMPipeline, choose_fast_paths
    from mobilevlm_ros.model.tokenizer import Tokenizer

    config = real_config(spec["model"], spec.get("llm_layers"), spec.get("vision_layers"))
    dtype_name = spec.get("dtype", "float32")
    model = random_mobilevlm(config, getattr(torch, dtype_name), seed=spec.get("seed", 0), quant=spec.get("quant"))
    tokenizer = _NoStopTokenizer(Tokenizer(Path(mobilevlm_ros.__file__).parent / "demo_model" / "tokenizer.model"))
    fast_paths = choose_fast_paths("cpu", dtype_name, spec.get("quant"))
    # passed only when asked for: the code before the prefix cache (--code-before) takes neither
    options = {name: spec[name] for name in ("prefix_cache_frames", "max_batch") if spec.get(name)}
    return MobileVLMPipeline(model, tokenizer, 512, fast_paths, **options)


def _images(n: int):
    import numpy as np
    from PIL import Image

    return [Image.fromarray(np.random.RandomState(seed).randint(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")
            for seed in range(n)]


def _params(tokens: int):
    from mobilevlm_ros.model.generate import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=tokens)


def _rates(answers: list, wall_s: float, decode_s: float) -> dict:
    """Decode tokens/s (the tokens after each answer's first, which comes out of the prefill, over the decode
    time) and end-to-end tokens/s (every generated token over the wall time, vision and prefill included)."""
    generated = sum(len(a.generated_ids) for a in answers)
    decoded = sum(max(len(a.generated_ids) - 1, 0) for a in answers)
    return {"decode_tok_s": decoded / decode_s, "e2e_tok_s": generated / wall_s, "wall_s": wall_s,
            "tokens": generated}


def sequential(pipeline, images: list, tokens: int) -> dict:
    start = time.perf_counter()
    answers = [pipeline.ask(image, PROMPT, _params(tokens)) for image in images]
    wall_s = time.perf_counter() - start
    return _rates(answers, wall_s, sum(a.timings["decode_ms"] for a in answers) / 1e3)


def batched(pipeline, images: list, tokens: int) -> dict:
    start = time.perf_counter()
    answers = pipeline.ask_batch(images, [PROMPT] * len(images), _params(tokens))
    wall_s = time.perf_counter() - start
    # the rows decode together: the batch's decode time is its longest row's
    return _rates(answers, wall_s, max(a.timings["decode_ms"] for a in answers) / 1e3)


def lone_request(pipeline, tokens: int) -> dict:
    """One ask() on one image, the median of LONE_REPEAT: its whole time, time to first token, decode tokens/s."""
    image = _images(1)[0]
    runs = [pipeline.ask(image, PROMPT, _params(tokens)).timings for _ in range(LONE_REPEAT)]
    return {"lone_total_ms": statistics.median(t["total_ms"] for t in runs),
            "lone_ttft_ms": statistics.median(t["ttft_ms"] for t in runs),
            "lone_decode_tok_s": statistics.median(t["decode_tokens_per_s"] for t in runs)}


def run(spec: dict) -> dict:
    import torch

    import mobilevlm_ros

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    pipeline = build_pipeline(spec)
    tokens = spec["decode_tokens"]
    sizes = spec.get("batch_sizes") or []
    # warm-up of the one-row and multi-row kernels (oneDNN picks them at first use)
    pipeline.ask(_images(1)[0], PROMPT, _params(2))
    if sizes:
        pipeline.ask_batch(_images(max(sizes)), [PROMPT] * max(sizes), _params(2))
    result = {"build_s": time.perf_counter() - t, "code": str(mobilevlm_ros.__file__), **lone_request(pipeline, tokens)}
    curve = []
    for i, size in enumerate(sizes):
        images = _images(size)
        # alternate which goes first, so a machine slowing down over the pair favours neither
        if i % 2 == 0:
            one_by_one, together = sequential(pipeline, images, tokens), batched(pipeline, images, tokens)
        else:
            together, one_by_one = batched(pipeline, images, tokens), sequential(pipeline, images, tokens)
        curve.append({"batch": size, "sequential": one_by_one, "batched": together,
                      "decode_ratio": together["decode_tok_s"] / one_by_one["decode_tok_s"],
                      "e2e_ratio": together["e2e_tok_s"] / one_by_one["e2e_tok_s"]})
    result["curve"] = curve
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    return {**spec, **result}


# ---- the command line's side (mobilevlm dev bench --batch-curve): specs, ratios, table, plot ----

def code_before_of(results: list[dict], r: dict) -> dict | None:
    """The result of the code before (--code-before) on r's model and configuration, if one is in results."""
    return next((b for b in results if b.get("code_before") and b["model"] == r["model"]
                 and b["config"] == r["config"]), None)


def batch_ratios(results: list[dict]) -> dict:
    """Per model, per configuration and batch size: batched over sequential tokens/s (decode and end to end), and
    the lone request's time now over the code before batching's where that was measured (<= 1.05 is the target)."""
    out: dict[str, dict] = {}
    ok = [r for r in results if "error" not in r]
    for r in ok:
        m = out.setdefault(r["model"], {})
        if r.get("code_before"):
            continue
        for point in r.get("curve", []):
            m[f"{r['config']}_batch{point['batch']}_decode_batched_over_sequential"] = point["decode_ratio"]
            m[f"{r['config']}_batch{point['batch']}_e2e_batched_over_sequential"] = point["e2e_ratio"]
        before = code_before_of(ok, r)
        if before:
            m[f"{r['config']}_lone_time_now_over_before"] = r["lone_total_ms"] / before["lone_total_ms"]
            m[f"{r['config']}_lone_decode_now_over_before"] = r["lone_decode_tok_s"] / before["lone_decode_tok_s"]
    return out


def batch_table(results: list[dict]) -> str:
    """One row per configuration and batch size (median results, see median_curves), then the lone requests."""
    lines = ["| model | config | B | sequential decode tok/s | batched decode tok/s | batched / sequential | "
             "sequential e2e tok/s | batched e2e tok/s | batched / sequential (e2e) |", "|" + "---|" * 9]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | error: {r['error'][:80]} |||||||")
            continue
        for p in r.get("curve", []):
            lines.append(f"| {r['model']} | {r['config']} | {p['batch']} | {p['sequential']['decode_tok_s']:.2f} | "
                         f"{p['batched']['decode_tok_s']:.2f} | {p['decode_ratio']:.2f}x | "
                         f"{p['sequential']['e2e_tok_s']:.2f} | {p['batched']['e2e_tok_s']:.2f} | "
                         f"{p['e2e_ratio']:.2f}x |")
    lines += ["", "| model | config | code | lone ask ms | TTFT ms | decode tok/s |", "|" + "---|" * 6]
    for r in results:
        if "error" not in r:
            code = "before batching" if r.get("code_before") else "now"
            lines.append(f"| {r['model']} | {r['config']} | {code} | {r['lone_total_ms']:.0f} | "
                         f"{r['lone_ttft_ms']:.0f} | {r['lone_decode_tok_s']:.2f} |")
    return "\n".join(lines)


def median_curves(results: list[dict]) -> list[dict]:
    """One row per (model, configuration, code): every number the median over its rounds (each ratio the median
    of the rounds' ratios, not a ratio of medians)."""
    from .cli import rows_over_rounds  # the parent process only: this file also runs alone as the measuring child

    def median_row(ok: list[dict]) -> dict:
        row = dict(ok[0])
        for key in ("lone_total_ms", "lone_ttft_ms", "lone_decode_tok_s"):
            row[key] = statistics.median(r[key] for r in ok)
        row["curve"] = []
        for i, point in enumerate(ok[0].get("curve", [])):
            points = [r["curve"][i] for r in ok]
            row["curve"].append({
                "batch": point["batch"],
                **{ratio: statistics.median(p[ratio] for p in points) for ratio in ("decode_ratio", "e2e_ratio")},
                **{side: {k: statistics.median(p[side][k] for p in points) for k in point[side]}
                   for side in ("sequential", "batched")}})
        return row
    return rows_over_rounds(results, lambda r: (r["model"], r["config"], bool(r.get("code_before"))), median_row)


def plot_curves(rows: list[dict], hw: dict, path):
    """Decode tokens/s against batch size (batched and one after another) and the ratio, per configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if "error" not in r and r.get("curve")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(rows):
        sizes = [p["batch"] for p in r["curve"]]
        label = f"{r['model']} {r['config']}"
        axes[0].plot(sizes, [p["batched"]["decode_tok_s"] for p in r["curve"]], "o-", color=f"C{i}",
                     label=f"{label}, ask_batch")
        axes[0].plot(sizes, [p["sequential"]["decode_tok_s"] for p in r["curve"]], "s--", color=f"C{i}",
                     label=f"{label}, ask one after another")
        axes[1].plot(sizes, [p["decode_ratio"] for p in r["curve"]], "o-", color=f"C{i}", label=f"{label}, decode")
        axes[1].plot(sizes, [p["e2e_ratio"] for p in r["curve"]], "s:", color=f"C{i}",
                     label=f"{label}, end to end")
    for ax, title in ((axes[0], "decode tokens/s, all rows together (higher is better)"),
                      (axes[1], "batched / one after another (same run, median of rounds)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (captions)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    fig.suptitle(f"mobilevlm dev bench --batch-curve, {hw['cpu']} ({', '.join(hw.get('cpu_features', []))}), "
                 f"{hw['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    spec = json.loads(sys.argv[1])
    print("RESULT " + json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main()
