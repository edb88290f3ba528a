"""Vision-to-language projectors with the published parameter names (keys under ``model.mm_projector.``).

The module trees mirror the reference (nn.Sequential indices included) so checkpoints load without renaming:
``ldpnet`` (LDP v1: MLP + two MobileNetV3 blocks, the second with stride 2), ``ldpnetv2`` (LDP v2: MLP, 2x2
average pooling, a depthwise-conv positional encoding), ``linear`` and ``mlp{N}x_gelu``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import LDP_V2_GRID, MLP_GELU_PROJECTOR, MobileVLMConfig


def _tokens_to_grid(x: Tensor) -> Tensor:
    """[B, N, C] row-major tokens -> [B, C, h, h]."""
    b, n, c = x.shape
    side = int(n ** 0.5)
    return x.transpose(1, 2).reshape(b, c, side, side)


def _grid_to_tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding, which sized the published squeeze-excite layers."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's LayerNormAct2d without activation)."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 block with expansion 1: depthwise 3x3 -> LN -> Hardswish, SE, pointwise 1x1 -> LN."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.residual = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
                          ChannelLayerNorm(channels), nn.Hardswish()),
            SqueezeExcitation(channels, _make_divisible(channels // 4)),
            nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), ChannelLayerNorm(channels)),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class LDPBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(out_dim, 1), InvertedResidual(out_dim, 2))

    def forward(self, x: Tensor) -> Tensor:
        return _grid_to_tokens(self.mb_block(_tokens_to_grid(self.mlp(x))))


class LDPNetProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.model = LDPBlock(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class FeatureIRLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class PosInjectLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim))


class LDPNetV2Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = FeatureIRLayer(in_dim, out_dim)
        self.peg = PosInjectLayer(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        grid = _tokens_to_grid(self.mlp.mlp(x))
        grid = F.adaptive_avg_pool2d(grid, LDP_V2_GRID)  # 2x2 means on ViT-L/14's 24x24 grid
        return _grid_to_tokens(self.peg.peg(grid) + grid)


def build_projector(config: MobileVLMConfig) -> nn.Module:
    in_dim, out_dim = config.mm_hidden_size, config.llama.hidden_size
    kind = config.projector_type
    if kind == "ldpnet":
        return LDPNetProjector(in_dim, out_dim)
    if kind == "ldpnetv2":
        return LDPNetV2Projector(in_dim, out_dim)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    match = MLP_GELU_PROJECTOR.match(kind)
    if match is None:  # read_mobilevlm_config already refused it; keep the error close to the cause anyway
        raise ValueError(f"unknown projector type {kind!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
