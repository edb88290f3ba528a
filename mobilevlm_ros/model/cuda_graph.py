"""Decode steps replayed from CUDA graphs over the static KV cache.

A batch-1 decode step launches a few hundred small kernels; on a GPU (and most of all on Jetson's slower CPU)
launching them costs more than running them. The step's shapes are fixed once the cache is, except for how much of
the cache it attends over, so the step is captured once per *bucket* of attended length (256, 512, ... up to the
cache size) with ``mask_cache=True`` (attend over the whole bucket, masking positions after the current one) and
replayed. Inputs (token, position) live in static device buffers; nothing is copied to the host but the sampled
token, as in the eager loop. A batch of B rows (each at its own position, llama.py) is captured per batch size and
bucket; the bucket is the one of the row furthest on. A KV cache allocated anew for a larger batch
(MobileLlama.setup_cache) voids the graphs captured over the old one: they are captured again.

``compile_mode`` (a ``torch.compile`` mode, e.g. "default" or "max-autotune-no-cudagraphs") first runs the step
through ``torch.compile``, as gpt-fast does: Inductor fuses the many small elementwise kernels (RMSNorm, RoPE,
SiLU x up, residual adds) into a few Triton kernels (and with max-autotune picks the matmul kernels by timing them),
and the graph replays those. It costs a compilation per bucket at the first request.

Use: ``CUDAGraphDecoder(model)`` after ``model.llm.setup_cache(...)`` is a decode step like ``model.decode_step``;
MobileVLMPipeline runs it (pipeline.choose_fast_paths). Prefill stays eager (its length varies per prompt).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .mobilevlm import MobileVLM


def buckets_for(max_seq_len: int, smallest: int = 256) -> list[int]:
    out, b = [], smallest
    while b < max_seq_len:
        out.append(b)
        b *= 2
    return out + [max_seq_len]


class CUDAGraphDecoder:
    """A decode step with ``MobileVLM.decode_step``'s signature: ``(token [B], pos) -> logits [B, V]``."""

    def __init__(self, model: MobileVLM, warmup: int = 2, smallest_bucket: int = 256,
                 compile_mode: str | None = None):
        llm = model.llm
        if llm.max_seq_len == 0:
            raise ValueError("call model.llm.setup_cache(...) before building a CUDAGraphDecoder")
        self.device = llm.lm_head.weight.device
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.llm = llm
        self.forward = llm if compile_mode is None else torch.compile(llm, mode=compile_mode, fullgraph=True,
                                                                      dynamic=False)
        self.warmup = warmup
        self.buckets = buckets_for(llm.max_seq_len, smallest_bucket)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # by (batch size, bucket)
        self.outputs: dict[tuple[int, int], Tensor] = {}
        # per batch size: token [B] and position buffers ([1] for one row, as MobileVLM.decode_step; [B, 1] else)
        self.inputs: dict[int, tuple[Tensor, Tensor]] = {}
        self.pool = None
        self.cache_shape = (llm.max_seq_len, llm.max_batch)  # the cache the graphs were captured over

    def _step(self, key: tuple[int, int]) -> Tensor:
        rows, bucket = key
        token, pos = self.inputs[rows]
        return self.forward(self.llm.embed_tokens(token)[:, None], pos, bucket, mask_cache=True)

    def _capture(self, key: tuple[int, int]) -> None:
        # Warm-up runs (on a side stream, as torch.cuda.graph requires) write this step's own K/V at this step's
        # position: the same values the replay writes next, so the cache is unaffected.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._step(key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the node captures on its inference thread while other threads may use CUDA
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.outputs[key] = self._step(key)
        self.pool = graph.pool()  # graphs share one memory pool: they are never replayed concurrently
        self.graphs[key] = graph

    def bucket_for(self, pos: int) -> int:
        for b in self.buckets:
            if pos < b:
                return b
        raise ValueError(f"position {pos} is beyond the KV cache ({self.llm.max_seq_len} positions)")

    def __call__(self, token: Tensor, pos: int | list[int]) -> Tensor:
        cache_shape = (self.llm.max_seq_len, self.llm.max_batch)
        if cache_shape != self.cache_shape:  # a new cache: the graphs read and write the old one's memory
            self.graphs.clear()
            self.outputs.clear()
            self.pool = None
            self.cache_shape = cache_shape
        rows = token.shape[0]
        if rows not in self.inputs:  # created here so that they are inference tensors when generate() runs
            positions_shape = (1,) if rows == 1 else (rows, 1)
            self.inputs[rows] = (torch.zeros(rows, dtype=torch.long, device=self.device),
                                 torch.zeros(positions_shape, dtype=torch.long, device=self.device))
        token_buffer, pos_buffer = self.inputs[rows]
        token_buffer.copy_(token.view(rows))
        if isinstance(pos, int):
            pos_buffer.fill_(pos)
            furthest = pos
        else:
            pos_buffer.copy_(torch.tensor(pos).view(pos_buffer.shape))
            furthest = max(pos)
        key = (rows, self.bucket_for(furthest))
        if key not in self.graphs:
            self._capture(key)
        self.graphs[key].replay()
        return self.outputs[key].clone()  # the static output is overwritten by the next replay


@torch.inference_mode()
def eager_masked_step(model: MobileVLM, token: Tensor, pos: int | list[int], bucket: int) -> Tensor:
    """The captured computation run eagerly (same kernels), for checking a replay bit for bit."""
    if isinstance(pos, int):
        input_pos = torch.tensor([pos], device=token.device)
    else:
        input_pos = torch.tensor(pos, device=token.device)[:, None]
    return model.llm(model.llm.embed_tokens(token.view(-1))[:, None], input_pos, bucket, mask_cache=True)
