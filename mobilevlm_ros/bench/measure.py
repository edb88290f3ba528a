"""One benchmark configuration, measured in its own process (so peak memory is that configuration's alone).

``python -m mobilevlm_ros.bench.measure '<json spec>'`` prints one JSON line with the results. Stacks:

- ``ours``: this package (vision tower cut at the selected layer, static KV cache), any dtype / quantisation,
  vision on torch or onnxruntime.
- ``hf``: the reference stack: transformers' CLIPImageProcessor, CLIPVisionModel (all layers, output_hidden_states,
  hidden_states[-2] as the reference reads it), the same projector, and ``LlamaForCausalLM.generate`` fed
  ``inputs_embeds``.
- ``llamacpp``: llama-cpp-python on the same decoder weights as GGUF (decoder only: prefill of the same number of
  positions from token ids, then greedy decode).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np
import torch

IMAGE_TOKENS = 144
REPEAT = 2  # best of REPEAT for one-off timings: other jobs share this machine


def decode_rates(stamps: list[float]) -> dict:
    """tokens/s from per-token timestamps: over the whole run, and from the median step (robust to other jobs
    taking the cores for a while; the ratios use it for every stack alike)."""
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    median = steps[len(steps) // 2]
    return {"decode_tok_s": 1 / median, "decode_tok_s_mean": len(steps) / (stamps[-1] - stamps[0]),
            "decode_steps": len(steps)}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """VmHWM: the peak RSS since the process started or since reset_peak()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


BUILD_PEAK: list[int] = []


def reset_peak() -> None:
    """Record the peak so far (building the random model) and restart peak tracking for inference."""
    BUILD_PEAK.append(peak_rss_bytes())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def test_image(seed: int = 0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")


def _ms(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best, out


def _tensor_bytes(module: torch.nn.Module) -> int:
    from ..model.quantize import weight_bytes

    return weight_bytes(module)


def _question_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run_ours(spec: dict) -> dict:
    from ..model.image import preprocess
    from ..model.pipeline import apply_fast_paths, choose_fast_paths
    from .models import random_mobilevlm, real_config

    config = real_config(spec["model"], spec.get("llm_layers"), spec.get("vision_layers"))
    dtype_name = spec.get("dtype", "float32")
    dtype = getattr(torch, dtype_name)
    # the kernels MobileVLMPipeline.load would choose for these options
    fast_paths = choose_fast_paths("cpu", dtype_name, spec.get("quant"), spec.get("onednn", True))
    rss0 = rss_bytes()
    t = time.perf_counter()
    model = random_mobilevlm(config, dtype, seed=spec.get("seed", 0), quant=spec.get("quant"),
                             groupsize=spec.get("groupsize", 32))
    build_s = time.perf_counter() - t
    weights = _tensor_bytes(model)
    decode_n, question_n = spec["decode_tokens"], spec["question_tokens"]
    engine = None
    if spec.get("vision_backend", "torch") == "onnxruntime":
        import tempfile

        from ..engines.onnxrt import OnnxRuntimeVisualEncoder
        from ..engines.visual import VisualEncoder, export_onnx

        tmpdir = tempfile.mkdtemp(prefix="mobilevlm-bench-")
        onnx_path = export_onnx(VisualEncoder.from_model(model), os.path.join(tmpdir, "visual.onnx"))
        engine = OnnxRuntimeVisualEncoder(onnx_path, "cpu", dtype)
    # as MobileVLMPipeline does: layers laid out, the torch vision tower released where the engine serves
    t = time.perf_counter()
    encode, decode_step = apply_fast_paths(model, fast_paths, IMAGE_TOKENS + question_n + decode_n + 8, engine)
    build_s += time.perf_counter() - t
    reset_peak()  # peak memory while serving, from here on (the ONNX export above is set-up, not serving)
    image = test_image()
    ids = _question_ids(question_n, config.llama.vocab_size)
    with torch.inference_mode():
        preprocess_ms, pixels = _ms(lambda: preprocess(image, 336, pad=True), 3)
        encode(pixels)  # warm-up (oneDNN / ORT kernel selection)
        vision_ms, tokens = _ms(lambda: encode(pixels), REPEAT)
        embeds = torch.cat([tokens.to(dtype), model.llm.embed_tokens(torch.tensor(ids))[None]], dim=1)
        model.prefill(embeds[:, :16])  # warm-up of the prefill shapes' kernels
        prefill_ms, logits = _ms(lambda: model.prefill(embeds), REPEAT)

        def first_token():
            p = preprocess(image, 336, pad=True)
            e = torch.cat([encode(p).to(dtype), model.llm.embed_tokens(torch.tensor(ids))[None]], dim=1)
            return model.prefill(e).argmax(-1)

        ttft_ms, token = _ms(first_token, REPEAT)
        pos = embeds.shape[1]
        decode_step(token, pos)  # warm-up
        stamps = [time.perf_counter()]
        for i in range(decode_n):
            token = decode_step(token, pos + i).argmax(-1)
            stamps.append(time.perf_counter())
    return {"build_s": build_s, "weights_bytes": weights, "rss_before_bytes": rss0,
            "preprocess_ms": preprocess_ms, "vision_ms": vision_ms, "prefill_ms": prefill_ms,
            "prefill_tokens": embeds.shape[1], "prefill_tok_s": embeds.shape[1] / prefill_ms * 1e3,
            "ttft_ms": ttft_ms, **decode_rates(stamps)}


class _Timestamps:
    """A transformers streamer that records when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        if value.numel():
            self.times.append(time.perf_counter())

    def end(self):
        pass


def run_hf(spec: dict) -> dict:
    import transformers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from ..model.image import CLIP_MEAN, CLIP_STD, expand_to_square
    from .models import hf_clip_state, hf_llama_state, random_projector, real_config

    transformers.logging.set_verbosity_error()
    config = real_config(spec["model"], spec.get("llm_layers"), spec.get("vision_layers"))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    seed = spec.get("seed", 0)
    rss0 = rss_bytes()
    t = time.perf_counter()
    lc = config.llama
    hf_config = LlamaConfig(vocab_size=lc.vocab_size, hidden_size=lc.hidden_size,
                            intermediate_size=lc.intermediate_size, num_hidden_layers=lc.num_layers,
                            num_attention_heads=lc.num_heads, num_key_value_heads=lc.num_kv_heads,
                            rms_norm_eps=lc.rms_norm_eps, rope_theta=lc.rope_theta,
                            max_position_embeddings=lc.max_position_embeddings, tie_word_embeddings=False,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        llm = LlamaForCausalLM(hf_config)
    llm.load_state_dict(dict(hf_llama_state(config, seed, dtype)), strict=True, assign=True)
    llm.model.rotary_emb = type(llm.model.rotary_emb)(config=hf_config)  # its inv_freq buffer is not in the state
    llm.eval()
    v = config.vision
    clip_config = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                   num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                                   image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu",
                                   layer_norm_eps=v.layer_norm_eps, projection_dim=768)
    with torch.device("meta"):
        clip = CLIPVisionModel(clip_config)
    wanted = set(clip.state_dict())  # transformers 5 names them without the vision_model. prefix
    state = {(k if k in wanted else k.removeprefix("vision_model.")): t for k, t in hf_clip_state(config, seed, dtype)}
    for k in wanted - set(state):  # position_ids buffers, where a version keeps them in the state dict
        state[k] = torch.arange(v.num_patches + 1)[None]
    clip.load_state_dict(state, strict=True, assign=True)
    for module in clip.modules():  # non-persistent buffers are not in any state dict: rebuild them off meta
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta and name == "position_ids":
                module.register_buffer(name, torch.arange(buf.shape[-1])[None].expand(buf.shape).clone(),
                                       persistent=False)
    clip.eval()
    # The projector is the same module in both stacks: reuse ours with the same seeded weights.
    projector = random_projector(config, dtype, seed)
    build_s = time.perf_counter() - t
    reset_peak()
    weights = sum(p.numel() * p.element_size() for m in (llm, clip, projector) for p in m.parameters())
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                   image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    image = test_image()
    decode_n, question_n = spec["decode_tokens"], spec["question_tokens"]
    ids = torch.tensor([_question_ids(question_n, lc.vocab_size)])

    def pre():
        return processor(expand_to_square(image), return_tensors="pt")["pixel_values"]

    def vision(pixels):
        features = clip(pixels.to(dtype), output_hidden_states=True).hidden_states[-2][:, 1:]
        return projector(features)

    gen_kwargs = dict(do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0, use_cache=True)
    with torch.inference_mode():
        preprocess_ms, pixels = _ms(pre, 3)
        vision(pixels)
        vision_ms, tokens = _ms(lambda: vision(pixels), REPEAT)
        embeds = torch.cat([tokens, llm.model.embed_tokens(ids)], dim=1)
        llm.generate(inputs_embeds=embeds[:, :16], max_new_tokens=2, **gen_kwargs)  # warm-up
        prefill_ms, _ = _ms(lambda: llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1), REPEAT)

        def first_token():
            start = time.perf_counter()
            e = torch.cat([vision(pre()), llm.model.embed_tokens(ids)], dim=1)
            stamps = _Timestamps()
            llm.generate(inputs_embeds=e, max_new_tokens=1, streamer=stamps, **gen_kwargs)
            return (stamps.times[0] - start) * 1e3

        ttft_ms = min(first_token() for _ in range(REPEAT))
        stamps = _Timestamps()  # decode: the same generate call a user makes, timed token by token
        llm.generate(inputs_embeds=embeds, max_new_tokens=decode_n + 1, min_new_tokens=decode_n + 1,
                     streamer=stamps, **gen_kwargs)
    return {"build_s": build_s, "weights_bytes": weights, "rss_before_bytes": rss0,
            "preprocess_ms": preprocess_ms, "vision_ms": vision_ms, "prefill_ms": prefill_ms,
            "prefill_tokens": embeds.shape[1], "prefill_tok_s": embeds.shape[1] / prefill_ms * 1e3,
            "ttft_ms": ttft_ms, **decode_rates(stamps.times), "transformers": transformers.__version__}


def skip_amx_quantised_kernels(qtype: str) -> bool:
    """Load a quantised model as llama.cpp's --no-repack does (no extra buffer types: no AMX, no repacking) on CPUs
    with AMX-INT8, whose AMX kernels for quantised weights crash llama-cpp-python 0.3.36's llama.cpp at the first
    decode (a segmentation fault; Llama() has no such option, so its default model parameters are wrapped).
    Returns whether it did."""
    import llama_cpp

    if qtype == "F16" or "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode():
        return False
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params
    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    return True


def run_llamacpp(spec: dict) -> dict:
    import llama_cpp

    from .models import real_config

    config = real_config(spec["model"], spec.get("llm_layers"), spec.get("vision_layers"))
    decode_n, question_n = spec["decode_tokens"], spec["question_tokens"]
    n_prompt = IMAGE_TOKENS + question_n
    threads = spec.get("threads") or torch.get_num_threads()
    no_repack = skip_amx_quantised_kernels(spec["gguf"])
    rss0 = rss_bytes()
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["gguf_path"], n_ctx=n_prompt + decode_n + 16, n_batch=512,
                          n_ubatch=512, n_threads=threads, n_threads_batch=threads, verbose=False,
                          use_mmap=False)
    build_s = time.perf_counter() - t
    reset_peak()
    ids = _question_ids(n_prompt, config.llama.vocab_size, seed=1)
    llm.eval(ids[:16])  # warm-up
    prefill_ms = float("inf")
    for _ in range(REPEAT):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        prefill_ms = min(prefill_ms, (time.perf_counter() - t) * 1e3)
    stamps = [time.perf_counter()]
    for _ in range(decode_n):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        stamps.append(time.perf_counter())
    return {"build_s": build_s, "weights_bytes": os.path.getsize(spec["gguf_path"]), "rss_before_bytes": rss0,
            "prefill_ms": prefill_ms, "prefill_tokens": n_prompt, "prefill_tok_s": n_prompt / prefill_ms * 1e3,
            "ttft_llm_ms": prefill_ms, **decode_rates(stamps), "no_repack": no_repack,
            "llama_cpp_python": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}


def run(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    stack = spec["stack"]
    result = {"ours": run_ours, "hf": run_hf, "llamacpp": run_llamacpp}[stack](spec)
    result["peak_rss_bytes"] = peak_rss_bytes()  # during inference (after the model was built)
    result["build_peak_rss_bytes"] = BUILD_PEAK[0] if BUILD_PEAK else None
    result["peak_over_weights"] = (result["peak_rss_bytes"] - result["rss_before_bytes"]) / result["weights_bytes"]
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    return {**spec, **result}


def main() -> None:
    spec = json.loads(sys.argv[1])
    print("RESULT " + json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main()
