"""The prepared GPU check (scripts/gpu_check.sh; ``mobilevlm dev bench --gpu-check``). Needs CUDA; runs in a few
minutes on one GPU. Writes one JSON report to stdout (and to --out).

1. Correctness: on both reference checkpoints, float16 greedy decoding with CUDA graphs gives the same ids as the
   eager float16 path, bit-identical logits to the same static-shape step run eagerly, and how many golden
   (float32) ids it reproduces; MobileVLMPipeline.ask (the node's path, CUDA graphs on by default) answers as with
   them off; batches (graphs per batch size) answer as each row alone, a follow-up on a cached frame and choices
   (branches in the prompt's forward) as uncached (float32); the bundled demo model's held-out accuracy on CUDA
   (float16, graphs) against the CPU (float32); the ONNX Runtime (CUDA provider) and TensorRT visual encoders where
   installed.
2. Speed, real-shaped MobileVLM-1.7B decoder with random weights in float16: batch-1 decode tokens/s eager vs
   CUDA graphs vs torch.compile + CUDA graphs, against the memory-bandwidth floor (weight bytes read per token /
   the card's bandwidth, both the nominal figure for known cards and a measured device-to-device copy rate).
3. Vision ms: ViT-L/14 + LDP in float16, batch 1 and 4, eager torch and TensorRT (when installed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

NOMINAL_GB_S = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039,
                "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935, "L4": 300, "L40S": 864,
                "A10G": 600, "RTX 4090": 1008, "Orin": 204.8}


def nominal_bandwidth(name: str) -> float | None:
    for key, value in NOMINAL_GB_S.items():
        if key in name:
            return value
    return None


def measured_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * nbytes * 10 / (time.perf_counter() - t) / 1e9


@torch.inference_mode()
def check_cuda_graph_greedy(max_new_tokens: int = 16) -> list[dict]:
    from safetensors.torch import load_file

    from ..model import MobileVLMPipeline
    from ..model.cuda_graph import CUDAGraphDecoder, eager_masked_step

    root = Path(__file__).resolve().parents[2] / "test" / "data" / "reference"
    out = []
    for name in ("MobileVLM-tiny-v1", "MobileVLM_V2-tiny"):
        # without graphs: vlm.decode_step is the eager step; the graph decoders below are built over its model
        vlm = MobileVLMPipeline.load(root / "checkpoints" / name, device="cuda", dtype="float16", max_seq_len=512,
                                     cuda_graphs=False)
        model = vlm.model
        cases = json.loads((root / "goldens" / name / "cases.json").read_text())
        for case in cases:
            golden = load_file(root / "goldens" / name / f"{case['case']}.safetensors")
            stem = Path(case["image"]).stem
            pixels = load_file(root / "goldens" / "pixel_values" / f"{stem}.safetensors")["pixel_values"].cuda()
            embeds = model.embed_prompt(golden["input_ids"][0].tolist(), model.encode_images(pixels))
            n = golden["generated_ids"].shape[1]

            def run(step):
                token = model.prefill(embeds).argmax(-1)
                ids, logits = [int(token)], []
                for i in range(n - 1):
                    step_logits = step(token, embeds.shape[1] + i)
                    logits.append(step_logits)
                    token = step_logits.argmax(-1)
                    ids.append(int(token))
                return ids, torch.cat(logits) if logits else torch.zeros(0)

            eager_ids, _ = run(vlm.decode_step)
            graph = CUDAGraphDecoder(model)
            graph_ids, graph_logits = run(graph)
            bucket = graph.buckets[0]
            static_ids, static_logits = run(lambda t, p: eager_masked_step(model, t, p, bucket))
            try:  # Inductor's fused kernels round differently: compare ids, not bits
                compiled_ids: list[int] | str = run(CUDAGraphDecoder(model, compile_mode="default"))[0]
            except Exception as e:  # report, do not stop the check
                compiled_ids = f"error: {e!r}"[:300]
            golden_ids = golden["generated_ids"][0].tolist()
            out.append({"checkpoint": name, "case": case["case"], "eager_ids": eager_ids, "graph_ids": graph_ids,
                        "static_eager_ids": static_ids, "compiled_graph_ids": compiled_ids,
                        "max_logit_diff_graph_vs_static_eager": (graph_logits - static_logits).abs().max().item()
                        if graph_logits.numel() else 0.0,
                        "golden_prefix_matched": next((i for i, (a, b) in enumerate(zip(graph_ids, golden_ids))
                                                       if a != b), len(golden_ids))})
    return out


@torch.inference_mode()
def check_pipeline_cuda_graphs() -> list[dict]:
    """The node's path: MobileVLMPipeline.ask on CUDA in float16 with CUDA graphs (the default) and without."""
    from PIL import Image

    from ..model import MobileVLMPipeline, SamplingParams
    from ..model.cuda_graph import CUDAGraphDecoder

    root = Path(__file__).resolve().parents[2] / "test" / "data" / "reference"
    image = Image.open(next(iter(sorted((root / "images").glob("*.png")))))
    out = []
    for name in ("MobileVLM-tiny-v1", "MobileVLM_V2-tiny"):
        answers, enabled = {}, {}
        for graphs in (True, False):
            vlm = MobileVLMPipeline.load(root / "checkpoints" / name, device="cuda", dtype="float16",
                                         cuda_graphs=graphs)
            answers[graphs] = vlm.ask(image, "What is in the image?", SamplingParams(max_new_tokens=24)).generated_ids
            enabled[graphs] = isinstance(vlm.decode_step, CUDAGraphDecoder)
        out.append({"checkpoint": name, "graph_ids": answers[True], "eager_ids": answers[False],
                    "graphs_enabled": enabled[True] and not enabled[False]})
    return out


@torch.inference_mode()
def check_batches_and_prefix_cache(device: str = "cuda", dtype: str = "float32") -> list[dict]:
    """Issues 19 and 20 on the node's path (on CUDA: decode steps replayed from CUDA graphs, one per batch size and
    bucket), in float32 so that greedy ids compare exactly: three questions in one ask_batch give each question's
    ids alone; a follow-up on a cached frame (prefix loaded, only its tail prefilled) the uncached path's ids; a
    question with choices (several-token ones scored as branches inside the prompt's forward) the log-likelihoods
    of the eager CPU pipeline (which the test suite holds to a brute-force forward) within 1e-3, cached and
    uncached. Runs on the CPU too (the test suite runs it there)."""
    from PIL import Image

    from ..model import MobileVLMPipeline, SamplingParams

    root = Path(__file__).resolve().parents[2] / "test" / "data" / "reference"
    images = [Image.open(path).convert("RGB") for path in sorted((root / "images").glob("*"))[:3]]
    questions = ["What is in the image?", "What colour is the car?", "Is there a person on the road?"]
    choices = ["yes", "no", "a red car", "a red car on the left"]
    params = SamplingParams(max_new_tokens=16)
    out = []
    for name in ("MobileVLM-tiny-v1", "MobileVLM_V2-tiny"):
        vlm = MobileVLMPipeline.load(root / "checkpoints" / name, device=device, dtype=dtype, max_seq_len=512,
                                     prefix_cache_frames=4, max_batch=4)
        alone = [vlm.ask(image, q, params).generated_ids for image, q in zip(images, questions)]
        batch = [a.generated_ids for a in vlm.ask_batch(images, questions, params)]
        follow_up_uncached = vlm.ask(images[0], questions[1], params).generated_ids
        vlm.ask(images[0], questions[0], params, frame_key="frame")
        follow_up = vlm.ask(images[0], questions[1], params, frame_key="frame")
        uncached = vlm.choose(images[0], questions[2], choices)
        cached = vlm.choose(images[0], questions[2], choices, frame_key="frame")
        reference = MobileVLMPipeline.load(root / "checkpoints" / name, onednn=False).choose(images[0], questions[2],
                                                                                            choices)
        out.append({"checkpoint": name, "decode_step": type(vlm.decode_step).__name__,
                    "batch_ids": batch, "alone_ids": alone, "batch_as_alone": batch == alone,
                    "follow_up_cached": follow_up.prefix_cached,
                    "follow_up_as_uncached": follow_up.generated_ids == follow_up_uncached,
                    "choice_cached": cached.prefix_cached,
                    "choice_answers": [reference.answer, uncached.answer, cached.answer],
                    "choice_max_log_likelihood_diff": max(abs(a - b) for got in (uncached, cached)
                                                          for a, b in zip(got.log_likelihoods,
                                                                          reference.log_likelihoods))})
    return out


def batches_and_prefix_cache_ok(results: list[dict]) -> bool:
    return all(r["batch_as_alone"] and r["follow_up_cached"] and r["follow_up_as_uncached"]
               and r["choice_cached"] and len(set(r["choice_answers"])) == 1
               and r["choice_max_log_likelihood_diff"] <= 1e-3 for r in results)


@torch.inference_mode()
def check_visual_backends() -> dict:
    from ..engines import make_visual_encoder, tensorrt_backend
    from ..model import MobileVLMPipeline
    from ..options import ENGINE_BACKENDS

    root = Path(__file__).resolve().parents[2] / "test" / "data" / "reference"
    vlm = MobileVLMPipeline.load(root / "checkpoints" / "MobileVLM-tiny-v1", device="cuda", dtype="float16")
    x = torch.randn(2, 3, 336, 336, device="cuda")
    ref = vlm.model.encode_images(x).float()
    out: dict = {}
    import tempfile

    for backend in ENGINE_BACKENDS:
        if backend == "tensorrt" and not tensorrt_backend.available():
            out[backend] = "not installed"
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                enc = make_visual_encoder(backend, vlm.model, tmp, max_batch=2)
                y = enc(x).float()
                out[backend] = {"max_abs_diff_vs_torch_fp16": (y - ref).abs().max().item(),
                                "ref_max": ref.abs().max().item()}
        except Exception as e:  # report, do not stop the check
            out[backend] = f"error: {e!r}"[:300]
    if tensorrt_backend.available():
        try:
            out["tensorrt_self_test"] = tensorrt_backend.self_test()
        except Exception as e:
            out["tensorrt_self_test"] = f"error: {e!r}"[:300]
    return out


def check_demo_model(scenes: int = 200) -> dict:
    """The bundled demo model through MobileVLMPipeline (the node's path) on the CPU in float32 and on CUDA in
    float16 with CUDA graphs, plain and compiled: accuracy per question type on its test's held-out scenes."""
    from .accuracy import demo_report

    return {"cpu_float32": demo_report(scenes),
            "cuda_float16_graphs": demo_report(scenes, device="cuda", dtype="float16"),
            "cuda_float16_graphs_compiled": demo_report(scenes, device="cuda", dtype="float16",
                                                        compile_mode="default")}


def _cuda_ms(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat * 1e3


@torch.inference_mode()
def decode_speed(model_name: str = "MobileVLM-1.7B", tokens: int = 128, max_seq_len: int = 512) -> dict:
    from ..model.cuda_graph import CUDAGraphDecoder
    from ..model.quantize import weight_bytes
    from .models import random_mobilevlm, real_config

    config = real_config(model_name)
    vlm = random_mobilevlm(config, torch.float16, vision=True).to("cuda")
    model = vlm
    model.llm.setup_cache(max_seq_len)
    llm_bytes = weight_bytes(model.llm)
    read_per_token = llm_bytes - model.llm.embed_tokens.weight.numel() * 2  # one embedding row, not the table
    prompt = torch.randn(1, 176, config.llama.hidden_size, device="cuda", dtype=torch.float16) * 0.02
    prefill_ms = _cuda_ms(lambda: model.prefill(prompt), 3)

    def warm(step) -> float:
        """Seconds to capture (and compile) the graphs of every bucket the timed steps use."""
        token = model.prefill(prompt).argmax(-1)
        t = time.perf_counter()
        for pos in (176, 176 + tokens):  # each call rewrites that position's K/V; the timed run overwrites it
            step(token, pos)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def decode(step) -> float:
        token = model.prefill(prompt).argmax(-1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(tokens):
            token = step(token, 176 + i).argmax(-1)
            int(token)  # the host reads each token, as generate() does
        return tokens / (time.perf_counter() - t)

    def replay_only(decoder) -> float:
        """Steps/s of the graph alone: replays queued back to back, no host read between them."""
        bucket = decoder.bucket_for(176)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(tokens):
            decoder.graphs[bucket].replay()
        torch.cuda.synchronize()
        return tokens / (time.perf_counter() - t)

    warm(model.decode_step)
    speed: dict = {"decode_tok_s_eager": decode(model.decode_step)}
    print("eager", speed, flush=True)
    variants = {"cuda_graphs": None, "compiled_cuda_graphs": "default",
                "autotuned_cuda_graphs": "max-autotune-no-cudagraphs"}
    for label, mode in variants.items():
        try:
            decoder = CUDAGraphDecoder(model, compile_mode=mode)
            speed[f"{label}_build_s"] = warm(decoder)
            speed[f"decode_tok_s_{label}"] = decode(decoder)
            speed[f"replay_only_tok_s_{label}"] = replay_only(decoder)
        except Exception as e:  # report, do not stop the check
            speed[f"decode_tok_s_{label}"] = f"error: {e!r}"[:300]
        print(label, {k: v for k, v in speed.items() if label in k}, flush=True)
    best = max(v for k, v in speed.items() if k.startswith("decode_tok_s_") and isinstance(v, float))
    name = torch.cuda.get_device_name()
    nominal = nominal_bandwidth(name)
    measured = measured_bandwidth(torch.device("cuda"))
    floor_nominal = nominal * 1e9 / read_per_token if nominal else None
    floor_measured = measured * 1e9 / read_per_token
    pixels1 = torch.randn(1, 3, 336, 336, device="cuda", dtype=torch.float16)
    pixels4 = torch.randn(4, 3, 336, 336, device="cuda", dtype=torch.float16)
    vision = {"torch_fp16_b1_ms": _cuda_ms(lambda: model.encode_images(pixels1), 10),
              "torch_fp16_b4_ms": _cuda_ms(lambda: model.encode_images(pixels4), 5)}
    from ..engines import tensorrt_backend

    if tensorrt_backend.available():
        import tempfile

        from ..engines import make_visual_encoder

        try:
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                enc = make_visual_encoder("tensorrt", model, tmp, max_batch=4)
                vision["tensorrt_build_s"] = time.perf_counter() - t
                vision["tensorrt_fp16_b1_ms"] = _cuda_ms(lambda: enc(pixels1), 10)
                vision["tensorrt_fp16_b4_ms"] = _cuda_ms(lambda: enc(pixels4), 5)
        except Exception as e:
            vision["tensorrt"] = f"error: {e!r}"[:300]
    return {"model": model_name, "gpu": name, "decode_tokens": tokens,
            "weights_read_per_token_bytes": read_per_token, "prefill_176_ms": prefill_ms,
            **speed, "decode_tok_s_best": best,
            "bandwidth_nominal_gb_s": nominal, "bandwidth_measured_copy_gb_s": measured,
            "floor_tok_s_nominal": floor_nominal, "floor_tok_s_measured": floor_measured,
            "best_fraction_of_nominal_floor": best / floor_nominal if floor_nominal else None,
            "best_fraction_of_measured_floor": best / floor_measured, "vision": vision}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    start = time.time()
    greedy = check_cuda_graph_greedy()
    report["cuda_graph_greedy"] = greedy
    ok = all(r["graph_ids"] == r["eager_ids"] and r["max_logit_diff_graph_vs_static_eager"] == 0 for r in greedy)
    pipeline = check_pipeline_cuda_graphs()
    report["pipeline_cuda_graphs"] = pipeline
    ok = ok and all(r["graph_ids"] == r["eager_ids"] and r["graphs_enabled"] for r in pipeline)
    report["cuda_graph_identical_to_eager"] = ok
    batches = check_batches_and_prefix_cache()
    report["batches_and_prefix_cache"] = batches
    report["batches_and_prefix_cache_ok"] = batches_and_prefix_cache_ok(batches)
    ok = ok and report["batches_and_prefix_cache_ok"]
    report["visual_backends"] = check_visual_backends()
    report["demo_model"] = check_demo_model()
    print(json.dumps({k: v for k, v in report.items() if k != "cuda_graph_greedy"}, indent=1), flush=True)
    if not args.skip_speed:
        report["speed"] = decode_speed()
        report["target_50pct_of_floor_met"] = (report["speed"]["best_fraction_of_nominal_floor"] or
                                               report["speed"]["best_fraction_of_measured_floor"]) >= 0.5
    report["wall_s"] = time.time() - start
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
