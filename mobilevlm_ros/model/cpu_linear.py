"""Linear layers through oneDNN on x86 CPUs.

torch runs ``nn.Linear`` on the CPU through MKL. On the AMD EPYC (Zen 4) machine of docs/PERFORMANCE.md, MKL's
batch-1 products (every decode step) read float32 weights at about 15 GB/s of the machine's 30 and its
prompt-sized products reach about 105 GFLOP/s; oneDNN, which ships inside the same torch build and picks its
kernels by instruction set, reaches about 27-30 GB/s and 190-200 GFLOP/s with the weight reordered once into its
blocked layout (bfloat16: 22-28 against 15 GB/s). The model code keeps ``nn.Linear`` (training sees the plain
model); the pipeline swaps the layers when it is built (pipeline.apply_fast_paths), and whatever must read plain
layers (the ONNX export) reads :func:`plain_copy` (the reorder is lossless both ways). Decoder layers given
cpu_decode.py's one-row product keep their plain weight and run decode steps through it (faster than oneDNN's
bfloat16 kernel, as fast as its float32 one, and fused with the rest of the step); their prompt-sized products run
on the plain weight as fast as on a reordered one.
"""
from __future__ import annotations

import copy
import platform
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .swap import replace_modules

ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
OneRowProduct = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (x, weight, bias) -> F.linear(x, weight, bias)


def available(dtype: torch.dtype) -> bool:
    """oneDNN is in this torch build, the machine is x86 (the only place it was measured against MKL), and it
    has a bfloat16 kernel when the weights are bfloat16."""
    if dtype not in ONEDNN_DTYPES or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class OneDNNLinear(nn.Module):
    """Inference-only ``nn.Linear`` (no autograd) on ``torch.ops.mkldnn._linear_pointwise``.

    rows: the number of input rows the weight's layout is tuned for (1 for decode steps, a few hundred for an
    image's patches); any number of rows works with any layout. one_row_product: a kernel for one-row inputs
    (cpu_decode.one_row_linear); the layer then keeps the plain weight and sends one-row inputs through it."""

    def __init__(self, linear: nn.Linear, rows: int, one_row_product: OneRowProduct | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.one_row_product = one_row_product
        weight = linear.weight.detach()
        if one_row_product is None:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        if self.one_row_product is not None and x.numel() == self.in_features:
            return self.one_row_product(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def to_linear(self) -> nn.Linear:
        """The plain layer, bit for bit, in a new weight tensor."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        weight = self.weight.to_dense() if self.weight.is_mkldnn else self.weight.clone()
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.clone(), requires_grad=False)
        return linear


def use_onednn(module: nn.Module, rows: int = 1, one_row_product: OneRowProduct | None = None) -> int:
    """Swap every CPU float32/bfloat16 ``nn.Linear`` under module for a OneDNNLinear, in place, where oneDNN is
    available for its dtype. Returns how many were swapped."""
    def match(m: nn.Module) -> bool:
        return type(m) is nn.Linear and m.weight.device.type == "cpu" and available(m.weight.dtype)

    return replace_modules(module, match, lambda m: OneDNNLinear(m, rows, one_row_product))


def use_onednn_in_mobilevlm(model: nn.Module, one_row_product: OneRowProduct | None = None) -> None:
    """A MobileVLM's float layers on oneDNN: the decoder's laid out for decode steps (one row; with
    one_row_product, kept plain for it), the vision tower's and projector's for one image's patches (unless they
    were released: an engine encodes the images)."""
    use_onednn(model.llm, 1, one_row_product)
    patches = model.config.vision.num_patches + 1
    for vision_part in (model.vision_tower, model.mm_projector):
        if vision_part is not None:
            use_onednn(vision_part, patches)


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of module with every OneDNNLinear turned back into ``nn.Linear`` (bit for bit), for code that
    reads plain layers (the ONNX export); module itself is left as it is."""
    plain = {id(m): m.to_linear() for m in module.modules() if isinstance(m, OneDNNLinear)}
    return copy.deepcopy(module, memo=plain)
