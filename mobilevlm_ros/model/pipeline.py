"""Image + question in, answer out: the one object the CLI and the ROS node hold.

What runs is decided once, when the pipeline is built, and nothing is patched in afterwards. choose_fast_paths
turns the load options (device, dtype, quantize, onednn, cuda_graphs, compile_mode) into FastPaths; the pipeline
applies them: the layout of the float Linear layers and the one decode step it calls (``self.decode_step``). Its one
vision encoder (``self.encode_images``) is the model's torch vision tower and projector, or the engine it was built
with (engines.provision_visual_encoder picks one for a backend, reading the model without changing it).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..options import COMPILE_MODES, DTYPES, QUANTIZE_MODES
from .cpu_linear import available as onednn_available, use_onednn_in_mobilevlm
from .cuda_graph import CUDAGraphDecoder
from .errors import PromptTooLongError
from .generate import DecodeStep, Generation, SamplingParams, generate_batch
from .image import preprocess
from .loader import TORCH_DTYPES, load_model
from .mobilevlm import MobileVLM
from .prompt import build_prompt, tokenize_with_image
from .quantize import quantize_llm
from .tokenizer import Tokenizer

# eager: MobileVLM.decode_step as written; cuda_graphs: replayed from CUDA graphs (cuda_graph.py); cpu_compiled:
# through the kernels torch.compile builds for x86 CPUs (cpu_decode.py).
DECODE_STEPS = ("eager", "cuda_graphs", "cpu_compiled")


@dataclass(frozen=True)
class FastPaths:
    """The kernels a pipeline runs, chosen by choose_fast_paths."""

    onednn_layers: bool  # the float Linear layers on oneDNN (cpu_linear.py)
    decode_step: str  # one of DECODE_STEPS
    compile_mode: str | None = None  # cuda_graphs: the torch.compile mode that fuses the step first

    def __post_init__(self) -> None:
        if self.decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step {self.decode_step!r}: expected one of {', '.join(DECODE_STEPS)}")
        if self.decode_step == "cpu_compiled" and not self.onednn_layers:
            raise ValueError("the compiled CPU decode step runs on oneDNN layers (cpu_decode.py)")


EAGER = FastPaths(onednn_layers=False, decode_step="eager")


def choose_fast_paths(device: str = "cpu", dtype: str = "float32", quantize: str | None = None, onednn: bool = True,
                      cuda_graphs: bool = True, compile_mode: str | None = None) -> FastPaths:
    """The kernels a pipeline loaded with these options runs; ValueError for options that cannot run here.

    - CUDA: decode steps replayed from CUDA graphs when cuda_graphs (fused by torch.compile first when compile_mode
      is given), else eager.
    - CPU with onednn, on x86 where oneDNN has a kernel for dtype: the float Linear layers on oneDNN; decode steps
      through the kernels torch.compile builds unless the decoder is quantised (its layers are not float) or
      torch.compile cannot build CPU kernels here.
    - Otherwise torch's own kernels, eagerly.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if quantize and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize {quantize!r}: expected one of {', '.join(QUANTIZE_MODES)}")
    if (compile_mode or "") not in COMPILE_MODES:
        raise ValueError(f"compile_mode {compile_mode!r}: expected one of {', '.join(map(repr, COMPILE_MODES))}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if quantize and device != "cpu":
        raise ValueError(f"quantize {quantize!r}: the int8/int4 kernels are CPU kernels (device is {device!r})")
    if device.startswith("cuda"):
        return FastPaths(False, "cuda_graphs", compile_mode or None) if cuda_graphs else EAGER
    if not (onednn and device == "cpu" and onednn_available(TORCH_DTYPES[dtype])):
        return EAGER
    if quantize:
        return FastPaths(True, "eager")
    # Imported only here: torch.compile's import (dynamo, inductor) adds about 3 s to every start, which
    # pipelines that do not compile (the GPU, --no-onednn, quantised decoders) should not pay.
    from . import cpu_decode

    return FastPaths(True, "cpu_compiled" if cpu_decode.available() else "eager")


VisionEncoder = Callable[[Tensor], Tensor]  # pixel_values [B, 3, S, S] -> visual tokens [B, 144, H]


def apply_fast_paths(model: MobileVLM, fast_paths: FastPaths, max_seq_len: int,
                     engine: VisionEncoder | None = None) -> tuple[VisionEncoder, DecodeStep]:
    """Lay model out for fast_paths and return the one vision encoder and the one decode step that run it.

    engine: encodes the images instead of the torch vision tower and projector, which are then freed (nothing
    else reads them). The float Linear layers go to oneDNN when fast_paths say so (the decoder's keep their plain
    weights for the compiled one-row product when decode steps are compiled); the KV cache is allocated for
    max_seq_len positions (the decoder's limit caps it). Model is taken over: run it through what this returns.
    """
    if engine is not None:
        model.release_vision()
    model.llm.setup_cache(max_seq_len)
    if fast_paths.decode_step == "cpu_compiled":
        from . import cpu_decode  # imported late: see choose_fast_paths

        use_onednn_in_mobilevlm(model, one_row_product=cpu_decode.one_row_linear)
        decode_step: DecodeStep = cpu_decode.compiled_decode_step(model)
    else:
        if fast_paths.onednn_layers:
            use_onednn_in_mobilevlm(model)
        decode_step = model.decode_step
        if fast_paths.decode_step == "cuda_graphs":
            decode_step = CUDAGraphDecoder(model, compile_mode=fast_paths.compile_mode)
    return (model.encode_images if engine is None else engine), decode_step


def load_checkpoint(model_dir: str | Path, vision_tower: str | Path | None = None, device: str = "cpu",
                    dtype: str = "float32", quantize: str | None = None) -> tuple[MobileVLM, Tokenizer]:
    """The checkpoint read (loader.load_model) with its decoder quantised when asked: what a pipeline is built
    from. Engines are provisioned from this model, before the pipeline lays its layers out."""
    model, tokenizer = load_model(model_dir, vision_tower, device, dtype)
    if quantize:
        quantize_llm(model.llm, quantize)
    return model, tokenizer


@dataclass
class Answer:
    text: str
    input_ids: list[int]  # the prompt, with -200 where the image goes
    generated_ids: list[int]
    stopped_by: str
    timings: dict[str, float] = field(default_factory=dict)


class MobileVLMPipeline:
    def __init__(self, model: MobileVLM, tokenizer: Tokenizer, max_seq_len: int = 2048,
                 fast_paths: FastPaths = EAGER, engine: VisionEncoder | None = None):
        """Takes the model over (apply_fast_paths): from here on images are encoded by ``self.encode_images`` and
        tokens decoded by ``self.decode_step``, both fixed now."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.fast_paths = fast_paths
        self.device = model.llm.embed_tokens.weight.device  # lm_head may be quantised (quantize.py)
        self.encode_images, self.decode_step = apply_fast_paths(model, fast_paths, max_seq_len, engine)
        self.max_seq_len = model.llm.max_seq_len
        if fast_paths.decode_step == "cpu_compiled":
            self.compile_one_token_step()

    @torch.inference_mode()
    def compile_one_token_step(self) -> None:
        """Build the compiled kernels of a CPU decode step (cpu_decode.py) now rather than in the first request:
        one step at position 1 (kv_len 2, so the compiled shapes stay dynamic), which the next prefill
        overwrites."""
        self.decode_step(torch.zeros(1, dtype=torch.long, device=self.device), 1)

    @classmethod
    def load(cls, model_dir: str | Path, vision_tower: str | Path | None = None, device: str = "cpu",
             dtype: str = "float32", max_seq_len: int = 2048, cuda_graphs: bool = True,
             compile_mode: str | None = None, quantize: str | None = None, onednn: bool = True
             ) -> MobileVLMPipeline:
        """A pipeline on the torch vision encoder (loading.load_pipeline adds engines). model_dir, vision_tower:
        ``~`` and ``$VARS`` are expanded. quantize: None or a CPU weight quantisation of the decoder's Linear
        layers (options.QUANTIZE_MODES). onednn, cuda_graphs, compile_mode: see choose_fast_paths."""
        fast_paths = choose_fast_paths(device, dtype, quantize, onednn, cuda_graphs, compile_mode)
        model, tokenizer = load_checkpoint(model_dir, vision_tower, device, dtype, quantize)
        return cls(model, tokenizer, max_seq_len, fast_paths)

    def prompt_ids(self, turns: str | Sequence[str]) -> list[int]:
        return tokenize_with_image(build_prompt([turns] if isinstance(turns, str) else list(turns)), self.tokenizer)

    def check_fits(self, input_ids: list[int], max_new_tokens: int) -> None:
        """Raise PromptTooLongError unless the spliced prompt plus the answer fits in the KV cache."""
        images = input_ids.count(-200)
        needed = len(input_ids) - images + images * self.config.image_tokens + max_new_tokens
        if needed > self.max_seq_len:
            raise PromptTooLongError(needed, self.max_seq_len)

    def pixel_values(self, image: Image.Image | np.ndarray) -> Tensor:
        return preprocess(image, self.config.vision.image_size, pad=self.config.image_aspect_ratio == "pad")

    @torch.inference_mode()
    def ask(self, image: Image.Image | np.ndarray, turns: str | Sequence[str],
            params: SamplingParams = SamplingParams(),
            on_text: Callable[[str, int], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> Answer:
        """Answer the last user turn about the image. turns: one question, or user/assistant/.../user texts.
        cancelled is polled after the vision encode, after the prefill and between tokens: a cancel during the
        encode or the prefill returns no tokens, a later one stops within one token (stopped_by "cancelled")."""
        return self.ask_batch([image], [turns], params, [on_text], [cancelled])[0]

    @torch.inference_mode()
    def ask_batch(self, images: Sequence[Image.Image | np.ndarray], turns: Sequence[str | Sequence[str]],
                  params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                  on_text: Sequence[Callable[[str, int], None] | None] | None = None,
                  cancelled: Sequence[Callable[[], bool] | None] | None = None) -> list[Answer]:
        """ask() for several images at once, each with its own turns (and, given a list, its own params,
        on_text and cancelled): one batched vision encode, prefill and decode (generate.generate_batch), and
        each answer the one ask() gives for that image alone (greedy: the same ids; float32 logits within
        summation order). Every row is checked (check_fits, params) before any work. A row cancelled during the
        encode skips the prefill; the others go on."""
        n = len(images)
        if len(turns) != n:
            raise ValueError(f"{n} images but {len(turns)} questions: give one question (or turn list) per image")
        row_params = [params] * n if isinstance(params, SamplingParams) else list(params)
        row_on_text = list(on_text) if on_text is not None else [None] * n
        row_cancelled = list(cancelled) if cancelled is not None else [None] * n
        if not n == len(row_params) == len(row_on_text) == len(row_cancelled):
            raise ValueError("params, on_text and cancelled need one entry per image")
        for p in row_params:
            p.validate()
        start = time.perf_counter()
        input_ids = [self.prompt_ids(t) for t in turns]
        for ids, p in zip(input_ids, row_params):
            self.check_fits(ids, p.max_new_tokens)
        pixels = torch.cat([self.pixel_values(image) for image in images])
        preprocessed = time.perf_counter()
        image_tokens = self.encode_images(pixels.to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        encoded = time.perf_counter()
        embeds = [self.model.embed_prompt(ids, image_tokens[b:b + 1]) for b, ids in enumerate(input_ids)]
        embedded = time.perf_counter()
        outs: list[Generation | None] = [None] * n
        go = []
        for b in range(n):
            if row_cancelled[b] is not None and row_cancelled[b]():
                outs[b] = Generation(ids=[], text="", stopped_by="cancelled", prefill_ms=0.0, decode_ms=0.0)
            else:
                go.append(b)
        if go:
            self.model.llm.setup_cache(self.max_seq_len, len(go))
            generated = generate_batch(self.model, self.decode_step, self.tokenizer, [embeds[b] for b in go],
                                       [row_params[b] for b in go], [row_on_text[b] for b in go],
                                       [row_cancelled[b] for b in go])
            for b, out in zip(go, generated):
                outs[b] = out
        total_ms = (time.perf_counter() - start) * 1e3
        answers = []
        for b, out in enumerate(outs):
            assert out is not None
            decode_tokens = max(len(out.ids) - 1, 0)  # the first token comes out of the prefill
            timings = {
                "preprocess_ms": (preprocessed - start) * 1e3,
                "vision_ms": (encoded - preprocessed) * 1e3,
                "prefill_ms": out.prefill_ms,
                "prefill_tokens": float(embeds[b].shape[1]),
                "ttft_ms": (embedded - start) * 1e3 + out.prefill_ms,
                "decode_ms": out.decode_ms,
                "decode_tokens_per_s": (decode_tokens / (out.decode_ms / 1e3)
                                        if decode_tokens and out.decode_ms else 0.0),
                "total_ms": total_ms,
            }
            answers.append(Answer(out.text, input_ids[b], out.ids, out.stopped_by, timings))
        return answers
