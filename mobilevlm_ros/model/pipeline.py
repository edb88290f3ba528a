"""Image + question in, answer out: the one object the CLI and the ROS node hold.

What runs is decided once, when the pipeline is built, and nothing is patched in afterwards. choose_fast_paths
turns the load options (device, dtype, quantize, onednn, cuda_graphs, compile_mode) into FastPaths; the pipeline
applies them: the layout of the float Linear layers and the one decode step it calls (``self.decode_step``). Its one
vision encoder (``self.encode_images``) is the model's torch vision tower and projector, or the engine it was built
with (engines.provision_visual_encoder picks one for a backend, reading the model without changing it).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
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
from .choices import Choice, branches, check_choices, choice_of, continuation_ids, score
from .generate import DecodeStep, Generation, Prompt, SamplingParams, generate_batch
from .image import preprocess
from .llama import TreeLogits, TreeRow
from .loader import TORCH_DTYPES, load_model
from .mobilevlm import IMAGE_TOKEN_INDEX, MobileVLM
from .prefix_cache import FramePrefix, PrefixCache
from .prompt import build_prompt, tokenize_with_image
from .quantize import DynamicInt8Linear, quantize_llm
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
    prefix_cached: bool = False  # the frame's prefix came from the prefix cache (prefix_cache.py)


@dataclass
class _Rows:
    """A batch's rows made ready for generate_batch (or _score): those not cancelled before their prefill,
    each one's Prompt and whether it starts from an already computed prefix, and the shared timings."""

    go: list[int]
    prompts: list[Prompt]
    from_prefix: list[bool]
    encoded: list[bool]  # per row of the batch: its frame went through preprocessing and the vision encoder here
    preprocess_ms: float
    vision_ms: float
    embed_ms: float

    def vision_timings(self, b: int) -> dict[str, float]:
        """Row b's share of the batch's preprocessing and vision: all of it when its frame went through them
        here, none when its prefix was computed before."""
        return {"preprocess_ms": self.preprocess_ms if self.encoded[b] else 0.0,
                "vision_ms": self.vision_ms if self.encoded[b] else 0.0}


@dataclass(frozen=True)
class _Whole(Prompt):
    """A prompt prefilled whole from position 0: embeds [1, T, H]; keep(row) runs once its row holds it (keeps
    its frame's prefix for later prompts, when the frame has a key)."""

    embeds: Tensor
    keep: Callable[[int], None]


@dataclass(frozen=True)
class _FromPrefix(Prompt):
    """A prompt that starts from its frame's prefix: prefix() is that prefix (computed by then; each call counts a
    cache hit), tail [1, T, H] what follows it."""

    frame: Hashable
    prefix: Callable[[], FramePrefix]
    tail: Tensor


def _split_shared_logits(prompts: list[_FromPrefix], fed: list[list[Tensor]], logits: TreeLogits
                         ) -> list[TreeLogits]:
    """Each prompt's TreeLogits (its tail's last logits, its choice branches' logits) out of the logits of the row
    it shares (MobileVLMPipeline._shared_tree_row's layout)."""
    if len(prompts) == 1:
        return [logits]
    branch_logits = iter(logits[1])
    out: list[TreeLogits] = []
    for prompt, prompt_fed in zip(prompts, fed):
        tail = prompt.tail.shape[1]
        mine = [next(branch_logits) for _ in range(max(len(prompt_fed), 1))]
        out.append((mine[0][tail - 1], [m[tail:] for m in mine] if prompt_fed else []))
    return out


class _OwnFrame:
    """The frame of a row that names none: its own (each instance equal only to itself), never cached."""


class MobileVLMPipeline:
    def __init__(self, model: MobileVLM, tokenizer: Tokenizer, max_seq_len: int = 2048,
                 fast_paths: FastPaths = EAGER, engine: VisionEncoder | None = None, prefix_cache_frames: int = 0,
                 max_batch: int = 1):
        """Takes the model over (apply_fast_paths): from here on images are encoded by ``self.encode_images`` and
        tokens decoded by ``self.decode_step``, both fixed now. prefix_cache_frames: how many frames' prompt
        prefixes to keep for follow-up questions (prefix_cache.py; 0: none). max_batch: KV cache rows allocated
        now (a server's batch size, which its memory check counts: allocated at start, not at its first batch;
        choose_batch scores that many rows at a time); a larger ask_batch still grows the cache."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.fast_paths = fast_paths
        self.device = model.llm.embed_tokens.weight.device  # lm_head may be quantised (quantize.py)
        self.encode_images, self.decode_step = apply_fast_paths(model, fast_paths, max_seq_len, engine)
        self.max_seq_len = model.llm.max_seq_len
        model.llm.setup_cache(self.max_seq_len, max_batch)
        self.prefix_cache = PrefixCache(prefix_cache_frames)
        # A decoder that quantises its activations with one range per call (int8-dynamic) computes a prompt
        # prefilled in one call differently from its prefix and its tail prefilled in two: a frame's first keyed
        # prompt is then prefilled in the same two calls as its later ones, so cached answers equal uncached.
        self.prefill_prefix_apart = any(isinstance(m, DynamicInt8Linear) for m in model.llm.modules())
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
             compile_mode: str | None = None, quantize: str | None = None, onednn: bool = True,
             prefix_cache_frames: int = 0, max_batch: int = 1) -> MobileVLMPipeline:
        """A pipeline on the torch vision encoder (loading.load_pipeline adds engines). model_dir, vision_tower:
        ``~`` and ``$VARS`` are expanded. quantize: None or a CPU weight quantisation of the decoder's Linear
        layers (options.QUANTIZE_MODES). onednn, cuda_graphs, compile_mode: see choose_fast_paths."""
        fast_paths = choose_fast_paths(device, dtype, quantize, onednn, cuda_graphs, compile_mode)
        model, tokenizer = load_checkpoint(model_dir, vision_tower, device, dtype, quantize)
        return cls(model, tokenizer, max_seq_len, fast_paths, prefix_cache_frames=prefix_cache_frames,
                   max_batch=max_batch)

    def prompt_ids(self, turns: str | Sequence[str]) -> list[int]:
        return tokenize_with_image(build_prompt([turns] if isinstance(turns, str) else list(turns)), self.tokenizer)

    def choice_ids(self, turns: str | Sequence[str], choices: Sequence[str]) -> list[list[int]]:
        """The tokens each choice adds after the prompt of turns (choices.continuation_ids)."""
        ids = self.prompt_ids(turns)
        prompt = build_prompt([turns] if isinstance(turns, str) else list(turns))
        return [continuation_ids(ids, tokenize_with_image(prompt + " " + c.strip(), self.tokenizer), c)
                for c in choices]

    def check_choices_fit(self, input_ids: list[int], choice_ids: list[list[int]]) -> None:
        """Raise PromptTooLongError unless the prompt, its choices' branches after it (choices.branches) and the
        free slot that MobileLlama.forward_tree may pad into fit in the KV cache."""
        self.check_fits(input_ids, sum(len(b) for b in branches(choice_ids)) + 1)

    def prefix_nbytes(self) -> int:
        """The bytes one frame's prefix takes in the prefix cache: keys and values of every layer at each
        position up to and including the image tokens."""
        llama = self.config.llama
        positions = self.prompt_ids("").index(IMAGE_TOKEN_INDEX) + self.config.image_tokens
        element = self.model.llm.embed_tokens.weight.element_size()
        return 2 * llama.num_layers * llama.num_kv_heads * llama.head_dim * positions * element

    def check_fits(self, input_ids: list[int], max_new_tokens: int) -> None:
        """Raise PromptTooLongError unless the spliced prompt plus the answer fits in the KV cache."""
        images = input_ids.count(-200)
        needed = len(input_ids) - images + images * self.config.image_tokens + max_new_tokens
        if needed > self.max_seq_len:
            raise PromptTooLongError(needed, self.max_seq_len)

    def pixel_values(self, image: Image.Image | np.ndarray) -> Tensor:
        return preprocess(image, self.config.vision.image_size, pad=self.config.image_aspect_ratio == "pad")

    def _rows(self, images: Sequence[Image.Image | np.ndarray], input_ids: Sequence[list[int]],
              frame_keys: Sequence[Hashable | None], cancelled: Sequence[Callable[[], bool] | None]) -> _Rows:
        """Encode the frames that need it, poll cancelled, and make each remaining row's Prompt.

        A row without a frame key (or with the cache off) is encoded and prefilled whole, as ever. A row whose
        frame is cached loads the prefix and prefills only the text after the image. Of an uncached frame's rows,
        the first that goes on is prefilled whole and leaves the prefix behind (in the cache, and for this batch:
        the cache may hold fewer frames than the batch names), the others start from it: one vision pass per
        frame."""
        start = time.perf_counter()
        caching = self.prefix_cache.max_frames > 0
        frames = [key if caching and key is not None else _OwnFrame() for key in frame_keys]
        prefixes: dict[Hashable, FramePrefix | None] = {}  # this batch's frames: None until a row computes it
        for frame, ids in zip(frames, input_ids):
            if frame not in prefixes:
                cached = None if isinstance(frame, _OwnFrame) else self.prefix_cache.get(frame)
                usable = cached is not None and list(cached.ids) == ids[:ids.index(IMAGE_TOKEN_INDEX)]
                prefixes[frame] = cached if usable else None
        to_encode = [f for f, prefix in prefixes.items() if prefix is None]
        first_row = {f: frames.index(f) for f in to_encode}
        pixels = [self.pixel_values(images[first_row[f]]) for f in to_encode]
        preprocessed = time.perf_counter()
        image_tokens = dict(zip(to_encode, self.encode_images(torch.cat(pixels).to(self.device)))) if pixels else {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        encoded = time.perf_counter()
        go = [b for b in range(len(images)) if cancelled[b] is None or not cancelled[b]()]
        prompts, from_prefix = [], []
        computing: set = set()  # the encoded frames whose first row (that goes on) has its prompt
        for b in go:
            frame, ids = frames[b], input_ids[b]
            if frame in image_tokens and frame not in computing:
                computing.add(frame)
                embeds = self.model.embed_prompt(ids, image_tokens[frame][None])
                prompts.append(self._whole_prompt(embeds, frame, ids, prefixes))
                from_prefix.append(False)
            else:
                prompts.append(self._prompt_from_prefix(ids, frame, prefixes))
                from_prefix.append(True)
        embedded = time.perf_counter()
        return _Rows(go, prompts, from_prefix, [frames[b] in image_tokens for b in range(len(images))],
                     (preprocessed - start) * 1e3, (encoded - preprocessed) * 1e3, (embedded - encoded) * 1e3)

    def _whole_prompt(self, embeds: Tensor, frame: Hashable, ids: list[int],
                      prefixes: dict[Hashable, FramePrefix | None]) -> _Whole:
        """The whole prompt prefilled; a keyed frame's prefix is then kept for the frame's later prompts."""
        before_image = ids[:ids.index(IMAGE_TOKEN_INDEX)]
        length = len(before_image) + self.config.image_tokens
        keyed = not isinstance(frame, _OwnFrame)

        def keep(row: int) -> None:
            if keyed:
                prefix = FramePrefix(tuple(before_image), self.model.llm.read_cache(row, length))
                prefixes[frame] = prefix
                self.prefix_cache.put(frame, prefix)
                self.prefix_cache.count(hit=False)

        def fill(row: int) -> Tensor:
            if self.prefill_prefix_apart and keyed:
                self.model.prefill(embeds[:, :length], row)
                logits = self.model.prefill(embeds[:, length:], row, start=length)
            else:
                logits = self.model.prefill(embeds, row)
            keep(row)
            return logits

        return _Whole(embeds.shape[1], fill, embeds, keep)

    def _prompt_from_prefix(self, ids: list[int], frame: Hashable, prefixes: dict[Hashable, FramePrefix | None]
                            ) -> Prompt:
        """The frame's prefix loaded into the row, then the text after the image prefilled on top of it."""
        tail = self.model.embed_prompt(ids[ids.index(IMAGE_TOKEN_INDEX) + 1:], None)

        def frame_prefix() -> FramePrefix:
            prefix = prefixes[frame]
            assert prefix is not None, "rows are filled in order: the frame's first row computed its prefix"
            self.prefix_cache.count(hit=True)
            return prefix

        def fill(row: int) -> Tensor:
            prefix = frame_prefix()
            self.model.llm.write_cache(row, prefix.kv)
            return self.model.prefill(tail, row, start=prefix.length)

        return _FromPrefix(len(ids) - 1 + self.config.image_tokens, fill, frame, frame_prefix, tail)

    def _score(self, prompts: Sequence[Prompt], choice_ids: Sequence[list[list[int]]]
               ) -> tuple[list[list[float]], float]:
        """Each prompt's choices' log-likelihoods (choices.py) and the seconds spent in forwards that only score
        (none but with int8-dynamic).

        A whole prompt is prefilled alone in its cache row with its choices' branches after it (forward_tree).
        The prompts that start from a prefix (the questions after a frame's first, monitors) share a row per
        frame (_shared_rows): the prefix is loaded once and each prompt's tail, with its choices' branches after
        the tail, is a branch of it (eight monitors on one new frame: the first one's prefill, then one forward
        for the other seven); those rows go in one forward, after the whole prompts' (which compute the
        prefixes), as many rows at a time as the KV cache holds already (max_batch, or the largest batch asked
        since), never more: the cache is not grown to score. A decoder that quantises each call's activations
        (int8-dynamic) would compute a prompt differently with other tokens in its call: there each prompt is
        filled as generation fills it and its branches run in a forward of their own."""
        llm = self.model.llm
        fed = [[llm.embed_tokens(torch.tensor(ids, device=self.device)) for ids in branches(row)]
               for row in choice_ids]
        out: dict[int, TreeLogits] = {}
        scoring_s = 0.0
        if self.prefill_prefix_apart:
            no_main = llm.embed_tokens.weight[:0]  # the prompt is filled: its row's tree is its branches alone
            for i, prompt in enumerate(prompts):  # one after another, each in row 0
                last = prompt.fill(0)[0]
                fed_logits: list[Tensor] = []
                if fed[i]:
                    started = time.perf_counter()
                    (_, fed_logits), = llm.forward_tree([TreeRow(prompt.length, no_main, fed[i])])
                    scoring_s += time.perf_counter() - started
                out[i] = (last, fed_logits)
        else:
            rows = self._shared_rows(prompts, fed)
            for first in range(0, len(rows), llm.max_batch):
                chunk = rows[first:first + llm.max_batch]
                whole = [r for r in chunk if isinstance(prompts[r[0]], _Whole)]
                shared = [r for r in chunk if not isinstance(prompts[r[0]], _Whole)]
                for row, (i,) in enumerate(whole):
                    prompt = prompts[i]
                    assert isinstance(prompt, _Whole)
                    out[i], = llm.forward_tree([TreeRow(0, prompt.embeds[0], fed[i])], row)
                    prompt.keep(row)
                groups = [[p for i in r if isinstance(p := prompts[i], _FromPrefix)] for r in shared]
                feds = [[fed[i] for i in r] for r in shared]
                trees = [self._shared_tree_row(row, group, group_fed)
                         for row, (group, group_fed) in enumerate(zip(groups, feds), len(whole))]
                if trees:
                    logits = llm.forward_tree(trees, len(whole))
                    for r, group, group_fed, row_logits in zip(shared, groups, feds, logits):
                        out.update(zip(r, _split_shared_logits(group, group_fed, row_logits)))
        scores = []
        for i in range(len(prompts)):
            last, fed_logits = out[i]
            assert last is not None
            scores.append(score(last, fed_logits, choice_ids[i]))
        return scores, scoring_s

    def _shared_rows(self, prompts: Sequence[Prompt], fed: Sequence[list[Tensor]]) -> list[list[int]]:
        """The cache rows _score fills, in order, each a list of prompt indices: a whole prompt alone; the prompts
        on one frame's prefix together, until the next one's tail and branches would not fit the frame's row
        (forward_tree's free slot counted): then a new row for the frame."""
        rows: list[list[int]] = []
        frame_rows: dict[Hashable, tuple[int, int]] = {}  # frame: its latest row, the slots that row has used
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, _FromPrefix):
                rows.append([i])
                continue
            tail = prompt.tail.shape[1]
            needed = tail * max(len(fed[i]), 1) + sum(len(f) for f in fed[i])  # a tail per branch
            row, used = frame_rows.get(prompt.frame, (-1, 0))
            if row < 0 or used + needed + 1 > self.max_seq_len:
                rows.append([])
                row, used = len(rows) - 1, prompt.length - tail
            rows[row].append(i)
            frame_rows[prompt.frame] = (row, used + needed)
        return rows

    def _shared_tree_row(self, row: int, prompts: list[_FromPrefix], fed: list[list[Tensor]]) -> TreeRow:
        """The prompts' frame's prefix loaded into row, and the TreeRow of the prompts (with their choices'
        branches) on top of it: a lone prompt's tail as main; else each prompt's tail as a branch, once per
        choice branch (the tail, then the choice's tokens) or once when it has none (_split_shared_logits)."""
        prefix = [prompt.prefix() for prompt in prompts][0]  # every prompt counts its cache hit
        self.model.llm.write_cache(row, prefix.kv)
        if len(prompts) == 1:
            return TreeRow(prefix.length, prompts[0].tail[0], fed[0])
        tails: list[Tensor] = []
        for prompt, prompt_fed in zip(prompts, fed):
            tail = prompt.tail[0]
            tails += [torch.cat([tail, f]) for f in prompt_fed] if prompt_fed else [tail]
        return TreeRow(prefix.length, self.model.llm.embed_tokens.weight[:0], tails)

    @torch.inference_mode()
    def ask(self, image: Image.Image | np.ndarray, turns: str | Sequence[str],
            params: SamplingParams = SamplingParams(),
            on_text: Callable[[str, int], None] | None = None,
            cancelled: Callable[[], bool] | None = None, frame_key: Hashable | None = None) -> Answer:
        """Answer the last user turn about the image. turns: one question, or user/assistant/.../user texts.
        cancelled is polled after the vision encode, after the prefill and between tokens: a cancel during the
        encode or the prefill returns no tokens, a later one stops within one token (stopped_by "cancelled").
        frame_key: names the frame for the prefix cache (see ask_batch)."""
        return self.ask_batch([image], [turns], params, [on_text], [cancelled], [frame_key])[0]

    @torch.inference_mode()
    def ask_batch(self, images: Sequence[Image.Image | np.ndarray], turns: Sequence[str | Sequence[str]],
                  params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                  on_text: Sequence[Callable[[str, int], None] | None] | None = None,
                  cancelled: Sequence[Callable[[], bool] | None] | None = None,
                  frame_keys: Sequence[Hashable | None] | None = None) -> list[Answer]:
        """ask() for several images at once, each with its own turns (and, given a list, its own params,
        on_text and cancelled): one batched vision encode, prefill and decode (generate.generate_batch), and
        each answer the one ask() gives for that image alone (greedy: the same ids; float32 logits within
        summation order). Every row is checked (check_fits, params) before any work. A row cancelled during the
        encode skips the prefill; the others go on.

        frame_keys[b] names row b's frame (any hashable; None: not cached). With a prefix cache, a frame asked
        about before skips preprocessing, the vision encoder and most of the prefill (prefix_cache.py); the
        answer is the same (float32 logits within summation order)."""
        n = len(images)
        if len(turns) != n:
            raise ValueError(f"{n} images but {len(turns)} questions: give one question (or turn list) per image")
        row_params = [params] * n if isinstance(params, SamplingParams) else list(params)
        row_on_text = list(on_text) if on_text is not None else [None] * n
        row_cancelled = list(cancelled) if cancelled is not None else [None] * n
        row_keys = list(frame_keys) if frame_keys is not None else [None] * n
        if not n == len(row_params) == len(row_on_text) == len(row_cancelled) == len(row_keys):
            raise ValueError("params, on_text, cancelled and frame_keys need one entry per image")
        for p in row_params:
            p.validate()
        start = time.perf_counter()
        input_ids = [self.prompt_ids(t) for t in turns]
        for ids, p in zip(input_ids, row_params):
            self.check_fits(ids, p.max_new_tokens)
        rows = self._rows(images, input_ids, row_keys, row_cancelled)  # a row cancelled by now gets no prefill
        outs: dict[int, Generation] = {}
        if rows.go:
            self.model.llm.setup_cache(self.max_seq_len, len(rows.go))
            generated = generate_batch(self.model, self.decode_step, self.tokenizer, rows.prompts,
                                       [row_params[b] for b in rows.go], [row_on_text[b] for b in rows.go],
                                       [row_cancelled[b] for b in rows.go])
            outs = dict(zip(rows.go, generated))
        cached = dict(zip(rows.go, rows.from_prefix))
        total_ms = (time.perf_counter() - start) * 1e3
        answers = []
        for b in range(n):
            out = outs.get(b) or Generation(ids=[], text="", stopped_by="cancelled", prefill_ms=0.0, decode_ms=0.0)
            decode_tokens = max(len(out.ids) - 1, 0)  # the first token comes out of the prefill
            timings = {
                **rows.vision_timings(b),
                "prefill_ms": out.prefill_ms,
                "ttft_ms": rows.preprocess_ms + rows.vision_ms + rows.embed_ms + out.prefill_ms,
                "decode_ms": out.decode_ms,
                "decode_tokens_per_s": (decode_tokens / (out.decode_ms / 1e3)
                                        if decode_tokens and out.decode_ms else 0.0),
                "total_ms": total_ms,
            }
            answers.append(Answer(out.text, input_ids[b], out.ids, out.stopped_by, timings, cached.get(b, False)))
        return answers

    @torch.inference_mode()
    def choose(self, image: Image.Image | np.ndarray, turns: str | Sequence[str], choices: Sequence[str],
               frame_key: Hashable | None = None) -> Choice:
        """The one of choices the model finds most likely as the answer to the last user turn (choices.py)."""
        return self.choose_batch([image], [turns], [choices], [frame_key])[0]

    @torch.inference_mode()
    def choose_batch(self, images: Sequence[Image.Image | np.ndarray], turns: Sequence[str | Sequence[str]],
                     choices: Sequence[Sequence[str]], frame_keys: Sequence[Hashable | None] | None = None
                     ) -> list[Choice]:
        """choose() for several images (or several questions about one frame key: one vision pass and one
        prefix), with no sampling and no decode loop: each prompt prefilled (its frame's prefix from the cache
        when there) with its choices' later tokens as branches after it, then every choice scored (choices.py;
        _score). timings: prefill_ms is the forwards' time, score_ms the part in forwards that only score (0 but
        with int8-dynamic). ValueError for choices that check_choices refuses; every row is checked before any
        work."""
        n = len(images)
        row_keys = list(frame_keys) if frame_keys is not None else [None] * n
        if not n == len(turns) == len(choices) == len(row_keys):
            raise ValueError("turns, choices and frame_keys need one entry per image")
        for row_choices in choices:
            check_choices(row_choices)
        start = time.perf_counter()
        input_ids = [self.prompt_ids(t) for t in turns]
        choice_ids = [self.choice_ids(t, row_choices) for t, row_choices in zip(turns, choices)]
        for ids, row in zip(input_ids, choice_ids):
            self.check_choices_fit(ids, row)
        rows = self._rows(images, input_ids, row_keys, [None] * n)
        started = time.perf_counter()
        log_likelihoods, score_s = self._score(rows.prompts, choice_ids)
        done = time.perf_counter()
        prefill_s = done - started - score_s
        return [choice_of(choices[b], log_likelihoods[b], input_ids[b], rows.from_prefix[b], {
            **rows.vision_timings(b),
            "prefill_ms": prefill_s * 1e3,
            "score_ms": score_s * 1e3,
            "total_ms": (done - start) * 1e3}) for b in range(n)]
