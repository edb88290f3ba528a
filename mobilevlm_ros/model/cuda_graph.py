"""Decode steps replayed from CUDA graphs over the static KV cache.

A batch-1 decode step launches a few hundred small kernels; on a GPU (and most of all on Jetson's slower CPU)
launching them costs more than running them. The step's shapes are fixed once the cache is, except for how much of
the cache it attends over, so the step is captured once per *bucket* of attended length (256, 512, ... up to the
cache size) with ``mask_cache=True`` (attend over the whole bucket, masking positions after the current one) and
replayed. Inputs (token, position) live in static device buffers; nothing is copied to the host but the sampled
token, as in the eager loop.

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
    """A decode step with ``MobileVLM.decode_step``'s signature: ``(token [1], pos) -> logits [1, V]``."""

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
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Tensor] = {}
        self.pool = None
        self.token: Tensor | None = None
        self.pos: Tensor | None = None

    def _step(self, bucket: int) -> Tensor:
        assert self.token is not None and self.pos is not None
        return self.forward(self.llm.embed_tokens(self.token)[None], self.pos, bucket, mask_cache=True)

    def _capture(self, bucket: int) -> None:
        # Warm-up runs (on a side stream, as torch.cuda.graph requires) write this step's own K/V at this step's
        # position: the same values the replay writes next, so the cache is unaffected.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._step(bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the node captures on its inference thread while other threads may use CUDA
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.outputs[bucket] = self._step(bucket)
        self.pool = graph.pool()  # buckets share one memory pool: they are never replayed concurrently
        self.graphs[bucket] = graph

    def bucket_for(self, pos: int) -> int:
        for b in self.buckets:
            if pos < b:
                return b
        raise ValueError(f"position {pos} is beyond the KV cache ({self.llm.max_seq_len} positions)")

    def __call__(self, token: Tensor, pos: int) -> Tensor:
        if self.token is None:  # created here so that they are inference tensors when generate() runs
            self.token = torch.zeros(1, dtype=torch.long, device=self.device)
            self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        assert self.pos is not None
        self.token.copy_(token.view(1))
        self.pos.fill_(pos)
        bucket = self.bucket_for(pos)
        if bucket not in self.graphs:
            self._capture(bucket)
        self.graphs[bucket].replay()
        return self.outputs[bucket].clone()  # the static output is overwritten by the next replay


@torch.inference_mode()
def eager_masked_step(model: MobileVLM, token: Tensor, pos: int, bucket: int) -> Tensor:
    """The captured computation run eagerly (same kernels), for checking a replay bit for bit."""
    input_pos = torch.tensor([pos], device=token.device)
    return model.llm(model.llm.embed_tokens(token.view(1))[None], input_pos, bucket, mask_cache=True)
