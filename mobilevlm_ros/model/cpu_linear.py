"""The decoder's Linear layers through oneDNN on x86 CPUs.

torch runs ``nn.Linear`` on the CPU through MKL. On the AMD EPYC (Zen 4) machine of docs/PERFORMANCE.md, MKL's
batch-1 products (every decode step) read float32 weights at about 15 GB/s of the machine's 30 and its
prefill-sized products reach about 105 GFLOP/s; oneDNN, which ships inside the same torch build and picks its
kernels by instruction set, reaches about 27 GB/s and 190 GFLOP/s. For bfloat16 it needs the weight in its own
blocked layout to be fast (22 against 15 GB/s), so bfloat16 weights are reordered once; float32 weights run as fast
in their plain layout and stay ordinary tensors. The model code keeps ``nn.Linear`` (training, export and the
reference comparison see the plain model); the pipeline swaps the decoder's layers after loading.
"""
from __future__ import annotations

import platform

import torch
from torch import Tensor, nn

from .quantize import return_freed_memory

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
    """Inference-only ``nn.Linear`` (no autograd) on ``torch.ops.mkldnn._linear_pointwise``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        if weight.dtype == torch.bfloat16:  # blocked for batch 1: decode steps are where the time goes
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def use_onednn(module: nn.Module) -> int:
    """Swap every CPU float32/bfloat16 ``nn.Linear`` under module for a OneDNNLinear, in place, where oneDNN is
    available for its dtype. Returns how many were swapped."""
    targets = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear
               and m.weight.device.type == "cpu" and available(m.weight.dtype)]
    for name, linear in targets:
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        setattr(parent, name.rsplit(".", 1)[-1], OneDNNLinear(linear))
        linear.weight = None  # a reordered (bfloat16) weight is a copy: free the plain one now, not after the loop
    return_freed_memory()
    return len(targets)
