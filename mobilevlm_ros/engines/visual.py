"""The vision tower (cut at the selected layer) fused with the projector, and its ONNX export.

``pixel_values [B, 3, S, S] -> visual tokens [B, 144, H]`` is the one piece of MobileVLM whose shape never
depends on the prompt, so it is the piece that goes to ONNX Runtime and TensorRT. The batch axis is dynamic so
several cameras can share one call.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..model.cpu_linear import plain_copy

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "visual_tokens"
OPSET = 17
EXPORT_FORMAT = 1  # bump when the export itself changes, so cached files are re-exported


class VisualEncoder(nn.Module):
    """vision_tower -> mm_projector as one module (float32 for export; the decoder casts afterwards)."""

    def __init__(self, vision_tower: nn.Module, mm_projector: nn.Module):
        super().__init__()
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector

    @classmethod
    def from_model(cls, model: nn.Module) -> VisualEncoder:
        """The model's own vision tower and projector, shared, not copied: whatever reads this encoder (the
        digest, the export, a validator) reads the model, and none of them changes it. Layers the pipeline laid
        out for oneDNN (model/cpu_linear.py) stay so; the digest and the export read their plain weights."""
        if model.vision_tower is None:
            raise ValueError("this model's vision tower was released: nothing left to export")
        return cls(model.vision_tower, model.mm_projector)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.mm_projector(self.vision_tower(pixel_values))


def weights_digest(module: nn.Module, extra: dict | None = None) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes (float32 view), plus JSON-able extras.

    This names an export: the same weights and export settings give the same ONNX file name.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"format": EXPORT_FORMAT, "opset": OPSET, **(extra or {})}, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        # a oneDNN layer's reordered weight (model/cpu_linear.py) is read as its plain layout, one tensor at a time
        t = (tensor.to_dense() if tensor.is_mkldnn else tensor).detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def export_onnx(encoder: nn.Module, path: str | Path, image_size: int = 336, opset: int = OPSET) -> Path:
    """Export to ONNX (float32, dynamic batch). Written to a temporary name and renamed, so a crash mid-export
    never leaves a half file that looks valid. Models over 2 GB keep their weights in ``<path>.data``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = plain_copy(encoder).to("cpu", torch.float32).eval()  # a copy: the encoder itself is left as it is
    dummy = torch.zeros(1, 3, image_size, image_size)
    big = sum(p.numel() for p in module.parameters()) * 4 > 1.8e9
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent, prefix=".export-")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the token grid side: fixed at 24 by design
            torch.onnx.export(
                module, (dummy,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset, do_constant_folding=True, dynamo=False)
        if big:  # re-save with external data under the final name
            import onnx

            proto = onnx.load(tmp)
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data")
            os.replace(Path(tmp).parent / (path.name + ".data"), str(path) + ".data")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cached_onnx(encoder: nn.Module, directory: str | Path, name: str = "visual", image_size: int = 336) -> Path:
    """``<directory>/<name>-<weights digest>.onnx``, exported only when no file of that name exists yet."""
    digest = weights_digest(encoder, {"image_size": image_size})[:16]
    path = Path(directory) / f"{name}-{digest}.onnx"
    if not path.is_file():
        export_onnx(encoder, path, image_size)
    return path
