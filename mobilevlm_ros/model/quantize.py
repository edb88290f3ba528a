"""Weight quantisation of the decoder's Linear layers for CPU inference (gpt-fast's quantize.py, trimmed).

Modes (``quantize_llm(llm, mode)``):

- ``int8``: weight-only int8, one symmetric scale per output channel; ``aten._weight_int8pack_mm`` (CPU kernel).
- ``int8-dynamic``: int8 weights and int8 activations quantised per call (fbgemm through
  ``torch.ao.quantization.quantize_dynamic``'s module type); the fastest int8 on x86 CPUs with AVX2.
- ``int4``: weight-only int4 with one scale and zero point per group of ``groupsize`` input channels (asymmetric,
  as gpt-fast's int4); ``aten._weight_int4pack_mm_for_cpu``.

Only the Linear layers of the decoder (attention, MLP, lm_head) are quantised; embeddings, norms, the vision tower
and the projector stay in the model's dtype. Each layer is replaced in place and its float weight released at once,
so quantising never needs a second full copy of the model. Accuracy is measured by :func:`logit_agreement`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("int8", "int8-dynamic", "int4")
BITS = {"int8": 8, "int8-dynamic": 8, "int4": 4}


def int8_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: weight ~= q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        assert linear.bias is None
        q, scale = int8_per_channel(linear.weight)
        m = cls(linear.in_features, linear.out_features, linear.weight.dtype)
        m.weight, m.scales = q, scale.to(linear.weight.dtype)
        return m

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features)
            return torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales  # gpt-fast's form (fused under torch.compile)


def int4_groupwise(weight: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """Asymmetric int4 per group: q in 0..15 [N, K] int32 and scales_and_zeros [K/groupsize, N, 2].

    Dequantised as (q - 8) * scale + zero, the layout ``_weight_int4pack_mm*`` expects (zero = min + 8 * scale).
    """
    w = weight.detach().float()
    n, k = w.shape
    if k % groupsize:
        raise ValueError(f"in_features {k} is not a multiple of groupsize {groupsize}")
    g = w.reshape(n, k // groupsize, groupsize)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / 15
    q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/gs, N, 2]
    return q, scales_and_zeros


class Int4WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, groupsize: int = 32, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // groupsize, out_features, 2, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, groupsize: int = 32) -> Int4WeightOnlyLinear:
        assert linear.bias is None
        q, sz = int4_groupwise(linear.weight, groupsize)
        m = cls(linear.in_features, linear.out_features, groupsize, linear.weight.dtype)
        m.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        m.scales_and_zeros = sz.to(linear.weight.dtype)
        return m

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.groupsize, self.scales_and_zeros)
        return out.view(*x.shape[:-1], -1)


def _dynamic_int8(linear: nn.Linear) -> nn.Module:
    import warnings

    with warnings.catch_warnings():  # torch.ao's eager quantisation is deprecated in favour of torchao, still works
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
        from torch.ao.quantization import default_dynamic_qconfig

        linear.qconfig = default_dynamic_qconfig
        return DynamicQuantizedLinear.from_float(linear.float())


class _FloatIO(nn.Module):
    """Runs a float32-only module (fbgemm) inside a bfloat16/float16 model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.float()).to(x.dtype)


def quantize_linear(linear: nn.Linear, mode: str, groupsize: int = 32) -> nn.Module:
    if mode == "int8":
        return Int8WeightOnlyLinear.from_linear(linear)
    if mode == "int4":
        return Int4WeightOnlyLinear.from_linear(linear, groupsize)
    if mode == "int8-dynamic":
        dtype = linear.weight.dtype
        q = _dynamic_int8(linear)
        return q if dtype == torch.float32 else _FloatIO(q)
    raise ValueError(f"unknown quantisation {mode!r} (choose from {', '.join(MODES)})")


def quantize_llm(llm: nn.Module, mode: str, groupsize: int = 32, include_lm_head: bool = True) -> nn.Module:
    """Replace the decoder's Linear layers in place, one at a time. CPU only (the kernels are CPU kernels)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation {mode!r} (choose from {', '.join(MODES)})")
    targets = [(name, m) for name, m in llm.named_modules() if isinstance(m, nn.Linear)
               and (include_lm_head or not name.endswith("lm_head"))]
    for name, linear in targets:
        if linear.weight.device.type != "cpu":
            raise ValueError("quantize_llm's kernels are CPU kernels; quantise a CPU model")
        parent = llm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else llm
        setattr(parent, name.rsplit(".", 1)[-1], quantize_linear(linear, mode, groupsize))
        linear.weight = None  # release the float weight now, not when the loop ends
    return llm


def weight_bytes(module: nn.Module) -> int:
    """Bytes held in parameters and persistent buffers, plus fbgemm's packed weights."""
    total = sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, Tensor))
    for m in module.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None:
            w, _ = packed._weight_bias()
            total += w.numel() + w.q_per_channel_scales().numel() * 8 if w.qscheme() != torch.per_tensor_affine \
                else w.numel()
    return total


@torch.inference_mode()
def logit_agreement(reference: Tensor, candidate: Tensor) -> dict[str, float]:
    """Compare logits [T, V] of two models fed the same inputs: top-1 agreement, max/mean |diff|, and the
    reference's top-1 token's rank being 0 in the candidate is what matters for greedy decoding."""
    ref, cand = reference.float(), candidate.float()
    diff = (ref - cand).abs()
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float().mean().item()
    top5 = torch.topk(cand, 5, dim=-1).indices.eq(ref.argmax(-1, keepdim=True)).any(-1).float().mean().item()
    return {"top1_agreement": top1, "ref_top1_in_top5": top5, "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(), "ref_logit_std": ref.std().item()}


@torch.inference_mode()
def prompt_logits(llm: nn.Module, embeds: Tensor) -> Tensor:
    """Logits [T, V] at every position of one prompt [1, T, D], fed one token at a time through the KV cache
    (the decode path, where quantisation error matters most); the caller sets up the cache."""
    out = []
    for t in range(embeds.shape[1]):
        out.append(llm(embeds[:, t:t + 1], torch.tensor([t]), t + 1)[0])
    return torch.stack(out)
