"""Weight quantisation of the decoder's Linear layers for CPU inference (gpt-fast's quantize.py, trimmed).

Modes (``quantize_llm(llm, mode)``):

- ``int8``: weight-only int8, one symmetric scale per output channel; ``aten._weight_int8pack_mm`` (CPU kernel).
- ``int8-dynamic``: int8 weights and int8 activations quantised per call (fbgemm through
  ``torch.ao.quantization.quantize_dynamic``'s module type), one range per batch row; the fastest int8 on x86
  CPUs with AVX2.
- ``int4``: weight-only int4 with one scale and zero point per group of ``groupsize`` input channels (asymmetric,
  as gpt-fast's int4); ``aten._weight_int4pack_mm_for_cpu``.

Only the Linear layers of the decoder (attention, MLP, lm_head) are quantised; embeddings, norms, the vision tower
and the projector stay in the model's dtype. Each layer is replaced in place and its float weight released at once,
so quantising never needs a second full copy of the model. Accuracy is measured by :func:`logit_agreement`.
"""
from __future__ import annotations

import functools
import math
from array import array

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..options import QUANTIZE_MODES
from .swap import replace_modules, return_freed_memory


CHUNK_ROWS = 2048  # quantise this many output rows at a time: temporaries stay small next to the weight
# The CPU kernels below are vectorised for bfloat16 activations and fall back to a scalar loop for float32 ones
# (about 6x slower on an AVX2 EPYC), so activations go through them in bfloat16 and come back in x's dtype.
CPU_ACT_DTYPE = torch.bfloat16


def int8_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: weight ~= q * scale[:, None]."""
    qs, scales = [], []
    for w in weight.detach().split(CHUNK_ROWS):
        w = w.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        qs.append(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        scales.append(scale)
    return torch.cat(qs), torch.cat(scales)


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=CPU_ACT_DTYPE))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        assert linear.bias is None
        q, scale = int8_per_channel(linear.weight)
        m = cls(linear.in_features, linear.out_features)
        m.weight, m.scales = q, scale.to(CPU_ACT_DTYPE)
        return m

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(CPU_ACT_DTYPE)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
            return out.to(x.dtype).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)  # gpt-fast's form


def int4_groupwise(weight: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """Asymmetric int4 per group: q in 0..15 [N, K] int32 and scales_and_zeros [K/groupsize, N, 2].

    Dequantised as (q - 8) * scale + zero, the layout ``_weight_int4pack_mm*`` expects (zero = min + 8 * scale).
    """
    n, k = weight.shape
    if k % groupsize:
        raise ValueError(f"in_features {k} is not a multiple of groupsize {groupsize}")
    qs, szs = [], []
    for w in weight.detach().split(CHUNK_ROWS):
        g = w.float().reshape(w.shape[0], k // groupsize, groupsize)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-6) / 15
        qs.append(torch.round((g - lo) / scale).clamp_(0, 15).to(torch.int32).reshape(w.shape[0], k))
        szs.append(torch.cat([scale, lo + 8 * scale], dim=-1))  # [rows, K/gs, 2]
    return torch.cat(qs), torch.cat(szs).transpose(0, 1).contiguous()


class Int4WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, groupsize: int = 32):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // groupsize, out_features, 2, dtype=CPU_ACT_DTYPE))

    @classmethod
    def from_linear(cls, linear: nn.Linear, groupsize: int = 32) -> Int4WeightOnlyLinear:
        assert linear.bias is None
        m = cls(linear.in_features, linear.out_features, groupsize)
        packed, szs = [], []
        for rows in linear.weight.detach().split(CHUNK_ROWS):  # pack chunk by chunk: the int32 codes are 4x big
            q, sz = int4_groupwise(rows, groupsize)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            szs.append(sz)
        m.weight = torch.cat(packed)
        m.scales_and_zeros = torch.cat(szs, dim=1).to(CPU_ACT_DTYPE)
        return m

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(CPU_ACT_DTYPE)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.groupsize, self.scales_and_zeros)
        return out.to(x.dtype).view(*x.shape[:-1], -1)


def _dynamic_int8(linear: nn.Linear) -> nn.Module:
    import warnings

    with warnings.catch_warnings():  # torch.ao's eager quantisation is deprecated in favour of torchao, still works
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        linear.qconfig = per_channel_dynamic_qconfig
        return DynamicQuantizedLinear.from_float(linear.float())


def _f32(value: float) -> float:
    """value rounded to float32 (inf where float32 overflows), as C++'s float conversions round it."""
    return array("f", [value])[0]


_SMALL_SCALE = _f32(6.1e-5)  # fbgemm's SMALL_SCALE_THRESHOLD


def fbgemm_activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """The scale and zero point fbgemm's dynamic Linear quantises an input whose values span [lo, hi] with: aten's
    quant_utils::ChooseQuantizationParams(lo, hi, 0, 255, reduce_range=True), step by step (uint8 activations
    limited to 0..127, so AVX2's 16-bit pair sums cannot saturate)."""
    qmin, qmax = 0, 127
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin)  # double, as in C++
    if _f32(scale) == 0.0 or _f32(1.0 / _f32(scale)) == math.inf:
        scale = 0.1
    if scale < _SMALL_SCALE:
        original = _f32(scale)
        scale = _SMALL_SCALE
        if lo == 0.0:
            hi = _f32(_SMALL_SCALE * (qmax - qmin))
        elif hi == 0.0:
            lo = _f32(-_SMALL_SCALE * (qmax - qmin))
        else:
            amplifier = _f32(_SMALL_SCALE / original)
            lo, hi = _f32(lo * amplifier), _f32(hi * amplifier)
    from_min_error = abs(qmin) - abs(lo / scale)
    from_max_error = abs(qmax) - abs(hi / scale)
    zero_point = qmin - lo / scale if from_min_error < from_max_error else qmax - hi / scale
    return _f32(scale), int(min(max(round(zero_point), qmin), qmax))  # round: half to even, as nearbyint


def quantise_rows(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row of rows [B, L] (float32) ready to be quantised on its own range, exactly as fbgemm's dynamic
    Linear quantises an input holding that row alone: (fma(x, 1 / scale, zero_point) [B, L] in float32, which
    fbgemm rounds half to even and clamps to 0..255 (told scale 1 and zero point 0, it does just that: see
    _fbgemm_product), scales [B, 1], zero points [B, 1]). A float32 product is exact in float64, so the float64
    sum rounded once to float32 is the fma."""
    qparams = [fbgemm_activation_qparams(lo, hi) for lo, hi in zip(rows.amin(1).tolist(), rows.amax(1).tolist())]
    # one small tensor, not three: at a decode step's sizes each torch call costs as much as the arithmetic
    scales, inverses, zero_points = torch.tensor([[scale, _f32(1.0 / scale), zero_point]
                                                  for scale, zero_point in qparams], dtype=torch.float64).T[:, :, None]
    return torch.addcmul(zero_points, rows, inverses).float(), scales.float(), zero_points.float()


@functools.cache
def fbgemm_takes_quantised_rows() -> bool:
    """fbgemm's integer kernel is reachable with caller-quantised activations (x86 builds with fbgemm; an ARM
    build has qnnpack only, where a batch's rows run through the dynamic kernel one at a time)."""
    try:
        layer = _dynamic_int8(nn.Linear(16, 8, bias=False))
        _fbgemm_product(layer, torch.ones(2, 16))
    except RuntimeError:
        return False
    return True


def _fbgemm_product(layer: nn.Module, x: Tensor) -> Tensor:
    """q @ W_q^T * w_scale for q = x rounded half to even and clamped to 0..255 (x [M, K] float32, from
    quantise_rows), times the layer's int8 weight, dequantised by the weight's scales only: fbgemm's kernel
    quantising x with scale 1 and zero point 0."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 1.0, 0,
                                                                            layer._packed_params._packed_params)


class DynamicInt8Linear(nn.Module):
    """fbgemm's dynamically quantised Linear (float32 only) in a model of any float dtype, each batch row
    quantised on its own range: fbgemm's dynamic kernel quantises its whole input with one range, and a batch must
    answer each row as it is answered alone. One row goes to that kernel as it is; several are quantised here as
    it would quantise each alone (quantise_rows) and multiplied in one call of its integer kernel, which reads
    the weight once for all rows (the row-by-row loop read it once per row). A row's integers are the ones it
    gets alone; only the float rounding of the rescaling differs (about 1e-7 of the output, measured)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        weight = inner.weight()
        assert inner.bias() is None and not weight.q_per_channel_zero_points().any()  # symmetric, bias-free
        # Rows quantised with zero point z: fbgemm's product of q (z = 0 assumed) carries z * sum_k W_q[n, k] *
        # w_scale[n] too much. A plain attribute, not a buffer: the model's .to(dtype) must not round it.
        self.zero_point_term = weight.int_repr().sum(1).float() * weight.q_per_channel_scales().float()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 1:
            return self.inner(x.float()).to(x.dtype)
        if not fbgemm_takes_quantised_rows():
            return torch.cat([self.inner(row.float()) for row in x.split(1)]).to(x.dtype)
        batch, k = x.shape[0], x.shape[-1]
        unrounded, scales, zero_points = quantise_rows(x.float().reshape(batch, -1))
        out = _fbgemm_product(self.inner, unrounded.view(-1, k)).view(batch, -1, self.zero_point_term.shape[0])
        out = torch.addcmul(out, zero_points[:, :, None], self.zero_point_term, value=-1).mul_(scales[:, :, None])
        return out.view(*x.shape[:-1], -1).to(x.dtype)


def fuse_dynamic_int8(parts: list[DynamicInt8Linear]) -> DynamicInt8Linear:
    """One DynamicInt8Linear computing several that read the same input, their outputs side by side. Each output
    channel is computed as in its own layer (the input quantised on the same range, its own int8 row and scale),
    so the outputs are the parts' to the bit; the input is quantised once and fbgemm called once instead of once
    per part, which at a decode step's sizes costs about what the product does."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    weights = [part.inner.weight() for part in parts]
    q = torch.cat([w.int_repr() for w in weights])
    scales = torch.cat([w.q_per_channel_scales() for w in weights])
    weight = torch._make_per_channel_quantized_tensor(q, scales, torch.zeros(len(scales), dtype=torch.long), 0)
    linear = DynamicQuantizedLinear(q.shape[1], q.shape[0], dtype=torch.qint8)
    linear.set_weight_bias(weight, None)
    return DynamicInt8Linear(linear)


# Per decoder layer: a module, the layers of it that read the same input, and the fused layer that replaces them.
SHARED_INPUTS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                 ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


def fuse_shared_inputs(llm: nn.Module) -> None:
    """int8-dynamic: each decoder layer's q, k and v projections, and its gate and up projections, fused into one
    layer each (fuse_dynamic_int8; llama.py splits the outputs): four fbgemm calls per layer instead of seven."""
    fused = False
    for layer in llm.layers:
        for module_name, part_names, fused_name in SHARED_INPUTS:
            module = getattr(layer, module_name)
            parts = [getattr(module, name) for name in part_names]
            if all(isinstance(part, DynamicInt8Linear) for part in parts):
                setattr(module, fused_name, fuse_dynamic_int8(parts))
                for name in part_names:
                    setattr(module, name, None)
                fused = True
    if fused:
        return_freed_memory()


def quantize_linear(linear: nn.Linear, mode: str, groupsize: int = 32) -> nn.Module:
    if mode == "int8":
        return Int8WeightOnlyLinear.from_linear(linear)
    if mode == "int4":
        return Int4WeightOnlyLinear.from_linear(linear, groupsize)
    if mode == "int8-dynamic":
        return DynamicInt8Linear(_dynamic_int8(linear))
    raise ValueError(f"unknown quantisation {mode!r} (choose from {', '.join(QUANTIZE_MODES)})")


def kernel_takes(linear: nn.Linear, mode: str, groupsize: int = 32) -> bool:
    """The int4 CPU kernel packs 16 output rows together and needs whole groups of input channels."""
    return mode != "int4" or (linear.out_features % 16 == 0 and linear.in_features % groupsize == 0)


def quantize_llm(llm: nn.Module, mode: str, groupsize: int = 32, include_lm_head: bool = True) -> nn.Module:
    """Replace the decoder's Linear layers in place, one at a time. CPU only (the kernels are CPU kernels). A layer
    whose shape the kernel cannot take (kernel_takes) stays in float; every published MobileLLaMA shape fits."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantisation {mode!r} (choose from {', '.join(QUANTIZE_MODES)})")
    if any(isinstance(m, nn.Linear) and m.weight.device.type != "cpu" for m in llm.modules()):
        raise ValueError("quantize_llm's kernels are CPU kernels; quantise a CPU model")
    lm_head = getattr(llm, "lm_head", None)

    def match(m: nn.Module) -> bool:
        return isinstance(m, nn.Linear) and (include_lm_head or m is not lm_head) and kernel_takes(m, mode, groupsize)

    replace_modules(llm, match, lambda m: quantize_linear(m, mode, groupsize))
    fuse_shared_inputs(llm)
    return llm


def weight_bytes(module: nn.Module) -> int:
    """Bytes held in parameters and persistent buffers (a checkpoint's tensors: not the KV cache or the RoPE
    tables, which are non-persistent buffers), plus fbgemm's packed int8 weights (which live outside both)."""
    tensors = {id(t): t for t in module.parameters()}
    for m in module.modules():
        tensors.update((id(t), t) for name, t in m._buffers.items()
                       if t is not None and name not in m._non_persistent_buffers_set)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    for m in module.modules():
        if isinstance(m, DynamicQuantizedLinear):
            w = m.weight()
            total += w.numel() + 8 * w.shape[0]  # int8 values + a float scale and an int zero point per row
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
