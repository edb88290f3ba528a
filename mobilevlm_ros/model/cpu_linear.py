"""Linear layers through oneDNN on x86 CPUs.

torch runs ``nn.Linear`` on the CPU through MKL. On the AMD EPYC (Zen 4) machine of docs/PERFORMANCE.md, MKL's
batch-1 products (every decode step) read float32 weights at about 15 GB/s of the machine's 30 and its
prompt-sized products reach about 105 GFLOP/s; oneDNN, which ships inside the same torch build and picks its
kernels by instruction set, reaches about 27-30 GB/s and 190-200 GFLOP/s with the weight reordered once into its
blocked layout (bfloat16: 22-28 against 15 GB/s). The model code keeps ``nn.Linear`` (training, the ONNX export and
the reference comparison see the plain model); the pipeline swaps the layers after loading, and the export swaps
them back (the reorder is lossless both ways). Decoder layers keep their plain weight and run decode steps
through the compiled product of cpu_decode.py (faster than oneDNN's bfloat16 kernel, as fast as its float32 one,
and fused with the rest of the step); their prompt-sized products run on the plain weight as fast as on a
reordered one.
"""
from __future__ import annotations

import platform
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .quantize import replace_modules

DTYPES = (torch.float32, torch.bfloat16)


def available(dtype: torch.dtype) -> bool:
    """oneDNN is in this torch build, the machine is x86 (the only place it was measured against MKL), and it
    has a bfloat16 kernel when the weights are bfloat16."""
    if dtype not in DTYPES or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class OneDNNLinear(nn.Module):
    """Inference-only ``nn.Linear`` (no autograd) on ``torch.ops.mkldnn._linear_pointwise``.

    rows: the number of input rows the weight's layout is tuned for (1 for decode steps, a few hundred for an
    image's patches); any number of rows works with any layout. A layer tuned for one row keeps the plain weight
    and sends one-row inputs through one_row_linear (cpu_decode.one_row_linear where torch.compile works)."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.one_row_linear: Callable[[Tensor, Tensor, Tensor | None], Tensor] | None = None
        if rows == 1:
            # Imported here, not at the top: torch.compile's import (dynamo, inductor) adds about 3 s to every
            # start, which models without a CPU decoder (the GPU, the exported vision side) should not pay.
            from . import cpu_decode

            if cpu_decode.available():
                self.one_row_linear = cpu_decode.one_row_linear
        if self.one_row_linear is None:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        if self.one_row_linear is not None and x.numel() == self.in_features:
            return self.one_row_linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def to_linear(self) -> nn.Linear:
        """The plain layer back, bit for bit."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        linear.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias, requires_grad=False)
        return linear


def use_onednn(module: nn.Module, rows: int = 1) -> int:
    """Swap every CPU float32/bfloat16 ``nn.Linear`` under module for a OneDNNLinear, in place, where oneDNN is
    available for its dtype. Returns how many were swapped."""
    def match(m: nn.Module) -> bool:
        return type(m) is nn.Linear and m.weight.device.type == "cpu" and available(m.weight.dtype)

    return replace_modules(module, match, lambda m: OneDNNLinear(m, rows))


def use_onednn_in_mobilevlm(model: nn.Module) -> None:
    """A MobileVLM's float layers on oneDNN: the decoder's laid out for decode steps (one row), the vision tower's
    and projector's for one image's patches. The decoder's one-token steps also run through cpu_decode's compiled
    block and attention (MobileVLMPipeline compiles them at load)."""
    use_onednn(model.llm)
    if any(isinstance(m, OneDNNLinear) and m.one_row_linear is not None for m in model.llm.modules()):
        from . import cpu_decode  # already imported by those layers

        for layer in model.llm.layers:
            layer.self_attn.attend_one_query = cpu_decode.one_query_attention
            layer.compiled_one_token_block = cpu_decode.one_token_block
    patches = model.config.vision.num_patches + 1
    use_onednn(model.vision_tower, patches)
    use_onednn(model.mm_projector, patches)


def use_plain_linears(module: nn.Module) -> int:
    """Undo use_onednn under module, in place (for the ONNX export, which reads plain layers)."""
    return replace_modules(module, lambda m: isinstance(m, OneDNNLinear), lambda m: m.to_linear())
