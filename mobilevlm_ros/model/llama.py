"""MobileLLaMA (a plain LLaMA) with a preallocated static KV cache, in the spirit of gpt-fast's model.py.

Parameter names are the Hugging Face LlamaForCausalLM ones (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
...) so the published weights load as they are. The cache is allocated once for ``max_seq_len`` positions:
prefill writes the whole prompt, then each decode step writes one position and attends over the filled prefix.

Batches are the first dimension, as in gpt-fast. Every row of a batch sits in its own cache row at its own
positions, from 0, exactly where it would sit alone: each prompt is prefilled alone into its row (``first_row``),
and each decode step gives each row its own position and a mask over its own filled prefix (positions past it may
hold another request's leftovers). A row's cache entries and RoPE angles are then those it has alone, bit for bit
after the prefill; its decode steps differ only in summation order. Left padding, the other common layout, shifts
every row's positions by its padding; and a padded prefill changes what a layer that quantises its input per call
(int8-dynamic) sees, while prefilling alone costs nothing on the CPU, where a prompt's products are already
compute-bound.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LlamaConfig

AttendOneQuery = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q [B, H, 1, D], k, v [B, H, S, D]) -> [B, H, 1, D]


@dataclass(frozen=True)
class TokenTree:
    """Where a forward's tokens sit when they are not one plain continuation (MobileLlama.forward_tree): slots
    [B, T] are the cache positions their keys and values are written to (their RoPE positions are input_pos), mask
    [B, 1, T, kv_len] the cache positions each one attends to."""

    slots: Tensor
    mask: Tensor


@dataclass(frozen=True)
class TreeRow:
    """One cache row's part of MobileLlama.forward_tree: its positions before start are filled already (a prompt,
    or a frame's prefix); main [T, D] (T may be 0) continues from start; each branch [n, D] continues after main
    as if it alone followed it, seeing neither other branch."""

    start: int
    main: Tensor
    branches: Sequence[Tensor]


TreeLogits = tuple[Tensor | None, list[Tensor]]  # main's last logits [V] (None: main is empty), each branch's [n, V]


class KVCache(nn.Module):
    def __init__(self, batch: int, max_seq_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, first_row: int = 0) -> tuple[Tensor, Tensor]:
        """k, v [B, H, T, D] into B cache rows from first_row (which are returned) at input_pos: [T] for every
        row at the same positions, [B, T] for each row at its own."""
        b = k.shape[0]
        rows = torch.arange(first_row, first_row + b, device=k.device)[:, None]
        # Written into the whole buffer, not into a slice of it: torch.compile (cpu_decode.py) turns a write into a
        # slice of a graph input into a copy of the whole buffer every step (all rows, all positions).
        self.k_cache[rows, :, input_pos] = k.transpose(1, 2)  # indexed as [B, T, H, D]
        self.v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return self.k_cache[first_row:first_row + b], self.v_cache[first_row:first_row + b]

    def read(self, row: int, length: int) -> Tensor:
        """A copy of row's first length positions: [2, H, length, D] (keys, values)."""
        return torch.stack([self.k_cache[row, :, :length], self.v_cache[row, :, :length]])

    def write(self, row: int, kv: Tensor) -> None:
        """kv [2, H, P, D] (from read) into row's first P positions."""
        length = kv.shape[2]
        self.k_cache[row, :, :length] = kv[0]
        self.v_cache[row, :, :length] = kv[1]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and cast back before the gain, as the reference does for half precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(max_seq_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin [max_seq_len, head_dim] for rotate-half RoPE, computed in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D]; cos/sin [T, D] (every row at the same positions) or [B, 1, T, D], in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        d, kv = config.hidden_size, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v from one product (quantize.fuse_shared_inputs)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, kv_len: int,
                mask_cache: bool = False, attend_one_query: AttendOneQuery = F.scaled_dot_product_attention,
                first_row: int = 0, tree: TokenTree | None = None) -> Tensor:
        """x's rows use the cache's rows from first_row. input_pos: [T] (every row at these positions) or [B, T]
        (each row at its own). attend_one_query(q, k, v): one new token per row over the filled cache when every
        row is at the same position, unmasked (cpu_decode.py passes a compiled kernel for its decode steps). tree:
        the tokens' cache slots and mask, when they are not input_pos and the positions up to it."""
        b, t, d = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split([d] + [self.num_kv_heads * self.head_dim] * 2, dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos if tree is None else tree.slots, k, v, first_row)
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if self.kv_cache is None:  # training: the sequence attends causally to itself, nothing is kept
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1 and not mask_cache and input_pos.dim() == 1:  # sees the whole filled prefix: no mask needed
            y = attend_one_query(q, k, v)
        elif tree is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=tree.mask)
        else:
            mask = torch.arange(kv_len, device=x.device) <= input_pos[..., None]  # [T, S] or [B, T, S]
            if mask.dim() == 3:
                mask = mask[:, None]  # each row's own, for all heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # both from one product (quantize.fuse_shared_inputs)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = FeedForward(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, kv_len: int,
                mask_cache: bool = False, attend_one_query: AttendOneQuery = F.scaled_dot_product_attention,
                first_row: int = 0, tree: TokenTree | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, kv_len, mask_cache, attend_one_query,
                               first_row, tree)
        return x + self.mlp(self.post_attention_layernorm(x))


RunLayer = Callable[..., Tensor]  # (layer, x, cos, sin, input_pos, kv_len, mask_cache) -> x


class MobileLlama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.max_seq_len = 0
        self.max_batch = 0  # rows the KV cache holds

    def setup_cache(self, max_seq_len: int, batch: int = 1) -> None:
        """Allocate the KV cache and RoPE tables once; later requests reuse them. A larger batch than the cache
        holds allocates it anew for that many rows (what it held is gone: call it between requests)."""
        max_seq_len = min(max_seq_len, self.config.max_position_embeddings)
        if max_seq_len == self.max_seq_len and batch <= self.max_batch:
            return
        weight = self.embed_tokens.weight  # not lm_head's: that may be quantised (quantize.py)
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch, max_seq_len, self.config.num_kv_heads, self.config.head_dim,
                                               weight.dtype, weight.device)
        cos, sin = rope_tables(max_seq_len, self.config.head_dim, self.config.rope_theta)
        self.register_buffer("rope_cos", cos.to(weight.device, weight.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(weight.device, weight.dtype), persistent=False)
        self.max_seq_len, self.max_batch = max_seq_len, batch

    def read_cache(self, row: int, length: int) -> Tensor:
        """A copy of every layer's keys and values of the cache row's first length positions: [layers, 2, H, length,
        D]. Positions depend only on those before them, so these are what a prompt starting with the same length
        positions puts there (prefix_cache.py)."""
        return torch.stack([layer.self_attn.kv_cache.read(row, length) for layer in self.layers])

    def write_cache(self, row: int, kv: Tensor) -> None:
        """read_cache's copy into a cache row's first positions: the row then continues from there."""
        for layer, layer_kv in zip(self.layers, kv):
            layer.self_attn.kv_cache.write(row, layer_kv)

    def forward(self, embeds: Tensor, input_pos: Tensor, kv_len: int, mask_cache: bool = False,
                run_layer: RunLayer | None = None, first_row: int = 0, logits_at: Tensor | None = None,
                tree: TokenTree | None = None) -> Tensor:
        """embeds [B, T, D] at positions input_pos, [T] for every row or [B, T] for each row its own, in the KV
        cache's rows first_row..first_row + B; kv_len = positions filled after this call (in the row that has the
        most).

        Returns the logits of the last position only [B, V]: generation never needs the others; logits_at [B, K]:
        those of each row's positions at these indices along T [B, K, V] (scoring a choice's tokens needs each
        one's, choices.py). tree: see forward_tree.
        mask_cache=True attends over the first kv_len cache positions with a mask (cache position <= input_pos)
        instead of relying on kv_len being exact, so kv_len may be any fixed bound: the shapes then no longer
        change from step to step, which a CUDA graph needs (see cuda_graph.py).
        run_layer(layer, x, cos, sin, input_pos, kv_len, mask_cache), when given, runs each decoder layer instead
        of calling it (cpu_decode.py passes a compiled one for its decode steps).
        """
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        if input_pos.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]: each row's angles, for all heads
        x = embeds
        for layer in self.layers:
            if run_layer is None:
                x = layer(x, cos, sin, input_pos, kv_len, mask_cache, first_row=first_row, tree=tree)
            else:
                x = run_layer(layer, x, cos, sin, input_pos, kv_len, mask_cache)
        x = x[:, -1] if logits_at is None else x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(self.norm(x))

    def forward_tree(self, rows: Sequence[TreeRow], first_row: int = 0) -> list[TreeLogits]:
        """Each TreeRow into its cache row (first_row on) in one forward: main at positions start.., then each
        branch at the positions after main (RoPE angles as if it alone followed main), its keys and values in the
        cache slots after main's and the earlier branches', where the mask hides them from every other branch. A
        prompt and the continuations to score after it (choices.py) thus cost one pass over the weights.

        Rows are right-padded to the longest: padding repeats the row's last token's position and mask and is
        written to the slots after the row's (to the cache's last slot once those run out: the row must leave it
        free), which no token of the row sees. Afterwards the slots after main hold branch entries: a row that
        goes on from main overwrites them as it goes. Returns, per row, main's last logits and each branch's."""
        dev = self.embed_tokens.weight.device
        used = [row.main.shape[0] + sum(branch.shape[0] for branch in row.branches) for row in rows]
        width = max(used)
        kv_len = min(max(row.start for row in rows) + width, self.max_seq_len)
        embeds = torch.zeros(len(rows), width, self.config.hidden_size, dtype=self.embed_tokens.weight.dtype,
                             device=dev)
        positions = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
        slots = torch.zeros_like(positions)
        mask = torch.zeros(len(rows), 1, width, kv_len, dtype=torch.bool, device=dev)
        picked: list[list[int]] = []  # per row: the indices along T whose logits come back
        for b, (row, n) in enumerate(zip(rows, used)):
            assert 0 < n and row.start + n + (n < width) <= self.max_seq_len, "the row (and its padding) must fit"
            pieces = [row.main, *row.branches]
            embeds[b, :n] = torch.cat(pieces)
            segment = torch.cat([torch.full((len(p),), i, device=dev) for i, p in enumerate(pieces)])
            piece_start = torch.tensor([0] + [len(p) for p in pieces], device=dev).cumsum(0)
            local = torch.arange(n, device=dev)
            in_piece = local - piece_start[segment]
            t = len(row.main)
            positions[b, :n] = row.start + torch.where(segment == 0, local, t + in_piece)
            slots[b, :n] = row.start + local
            slots[b, n:] = (row.start + torch.arange(n, width, device=dev)).clamp(max=self.max_seq_len - 1)
            sees = (local[None] <= local[:, None]) & ((segment[None] == 0) | (segment[None] == segment[:, None]))
            mask[b, 0, :n, :row.start] = True
            mask[b, 0, :n, row.start:row.start + n] = sees
            positions[b, n:], mask[b, 0, n:] = positions[b, n - 1], mask[b, 0, n - 1]
            picked.append(([t - 1] if t else []) + list(range(t, n)))
        logits_at = torch.tensor([p + [0] * (max(map(len, picked)) - len(p)) for p in picked], device=dev)
        logits = self(embeds, positions, kv_len, first_row=first_row, logits_at=logits_at,
                      tree=TokenTree(slots, mask))
        out: list[TreeLogits] = []
        for b, row in enumerate(rows):
            last = logits[b, 0] if len(row.main) else None
            at = int(last is not None)
            lengths = [len(branch) for branch in row.branches]
            out.append((last, list(logits[b, at:at + sum(lengths)].split(lengths)) if lengths else []))
        return out

    def forward_all(self, embeds: Tensor) -> Tensor:
        """Causal forward over whole sequences from position 0 without the cache (training): logits [B, T, V]."""
        assert self.max_seq_len == 0, "forward_all is for models without a KV cache (training)"
        t = embeds.shape[1]
        cos, sin = rope_tables(t, self.config.head_dim, self.config.rope_theta)
        cos, sin = cos.to(embeds), sin.to(embeds)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, None, t)
        return self.lm_head(self.norm(x))
