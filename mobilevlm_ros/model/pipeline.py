"""Image + question in, answer out: the one object the CLI and the ROS node hold."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cpu_linear import use_onednn_in_mobilevlm
from .cuda_graph import enable_cuda_graphs
from .errors import PromptTooLongError
from .generate import SamplingParams, generate
from .image import preprocess
from .loader import load_model
from .mobilevlm import MobileVLM
from .prompt import build_prompt, tokenize_with_image
from .quantize import quantize_llm
from .tokenizer import Tokenizer


@dataclass
class Answer:
    text: str
    input_ids: list[int]  # the prompt, with -200 where the image goes
    generated_ids: list[int]
    stopped_by: str
    timings: dict[str, float] = field(default_factory=dict)


class MobileVLMPipeline:
    def __init__(self, model: MobileVLM, tokenizer: Tokenizer, max_seq_len: int = 2048, cuda_graphs: bool = True,
                 compile_mode: str | None = None):
        """cuda_graphs: on a CUDA device, replay each decode step from a CUDA graph (cuda_graph.py), its kernels
        fused by torch.compile first when compile_mode is given; both are ignored on the CPU."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = model.llm.embed_tokens.weight.device  # lm_head may be quantised (quantize.py)
        model.llm.setup_cache(max_seq_len)
        self.max_seq_len = model.llm.max_seq_len
        if cuda_graphs and self.device.type == "cuda":
            enable_cuda_graphs(model, compile_mode=compile_mode)
        if model.llm.layers[0].compiled_one_token_block is not None:
            self.compile_one_token_step()
        # Any callable pixel_values -> visual tokens; the ONNX Runtime and TensorRT engines plug in here.
        self.encode_images: Callable[[torch.Tensor], torch.Tensor] = model.encode_images

    def use_visual_engine(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Encode images with an engine (engines.make_visual_encoder) from now on, and free the torch vision tower
        and projector it replaces (nothing else reads them once the engine is built and validated)."""
        self.encode_images = encode
        self.model.release_vision()

    @torch.inference_mode()
    def compile_one_token_step(self) -> None:
        """Build the compiled kernels of a CPU decode step (cpu_decode.py) now rather than in the first request:
        one step at position 1 (kv_len 2, so the compiled shapes stay dynamic), which the next prefill
        overwrites."""
        self.model.decode_step(torch.zeros(1, dtype=torch.long, device=self.device), 1)

    @classmethod
    def load(cls, model_dir: str | Path, vision_tower: str | Path | None = None, device: str = "cpu",
             dtype: str = "float32", max_seq_len: int = 2048, cuda_graphs: bool = True,
             compile_mode: str | None = None, quantize: str | None = None, onednn: bool = True
             ) -> MobileVLMPipeline:
        """quantize: None, or a CPU weight quantisation of the decoder's Linear layers (quantize.MODES).
        onednn: on an x86 CPU, run the float Linear layers through oneDNN rather than MKL (cpu_linear.py)."""
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        if quantize and device != "cpu":
            raise ValueError(f"quantize {quantize!r}: the int8/int4 kernels are CPU kernels (device is {device!r})")
        model, tokenizer = load_model(model_dir, vision_tower, device, dtype)
        if quantize:
            quantize_llm(model.llm, quantize)
        if onednn:
            use_onednn_in_mobilevlm(model)
        return cls(model, tokenizer, max_seq_len, cuda_graphs, compile_mode)

    def prompt_ids(self, turns: str | Sequence[str]) -> list[int]:
        return tokenize_with_image(build_prompt([turns] if isinstance(turns, str) else list(turns)), self.tokenizer)

    def check_fits(self, input_ids: list[int], max_new_tokens: int) -> None:
        """Raise PromptTooLongError unless the spliced prompt plus the answer fits in the KV cache."""
        images = input_ids.count(-200)
        needed = len(input_ids) - images + images * self.config.image_tokens + max_new_tokens
        if needed > self.max_seq_len:
            raise PromptTooLongError(needed, self.max_seq_len)

    def pixel_values(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        return preprocess(image, self.config.vision.image_size, pad=self.config.image_aspect_ratio == "pad")

    @torch.inference_mode()
    def ask(self, image: Image.Image | np.ndarray, turns: str | Sequence[str],
            params: SamplingParams = SamplingParams(),
            on_text: Callable[[str, int], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> Answer:
        """Answer the last user turn about the image. turns: one question, or user/assistant/.../user texts."""
        params.validate()
        start = time.perf_counter()
        input_ids = self.prompt_ids(turns)
        self.check_fits(input_ids, params.max_new_tokens)
        pixels = self.pixel_values(image)
        preprocessed = time.perf_counter()
        image_tokens = self.encode_images(pixels.to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        encoded = time.perf_counter()
        embeds = self.model.embed_prompt(input_ids, image_tokens)
        embedded = time.perf_counter()
        out = generate(self.model, self.tokenizer, embeds, params, on_text, cancelled)
        total_ms = (time.perf_counter() - start) * 1e3
        decode_tokens = len(out.ids) - 1  # the first token comes out of the prefill
        timings = {
            "preprocess_ms": (preprocessed - start) * 1e3,
            "vision_ms": (encoded - preprocessed) * 1e3,
            "prefill_ms": out.prefill_ms,
            "prefill_tokens": float(embeds.shape[1]),
            "ttft_ms": (embedded - start) * 1e3 + out.prefill_ms,
            "decode_ms": out.decode_ms,
            "decode_tokens_per_s": decode_tokens / (out.decode_ms / 1e3) if decode_tokens and out.decode_ms else 0.0,
            "total_ms": total_ms,
        }
        return Answer(out.text, input_ids, out.ids, out.stopped_by, timings)
