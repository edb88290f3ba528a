"""MobileVLM: CLIP vision tower -> projector -> MobileLLaMA, with the image spliced into the prompt."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .clip import CLIPVisionTower
from .config import MobileVLMConfig
from .llama import MobileLlama, RunLayer
from .projector import build_projector
from .swap import return_freed_memory

IMAGE_TOKEN_INDEX = -200  # the reference's sentinel id for "the image goes here"


class MobileVLM(nn.Module):
    def __init__(self, config: MobileVLMConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision, config.vision_layers_needed,
                                            keep_cls=config.vision_select_feature == "cls_patch")
        self.mm_projector = build_projector(config)
        self.llm = MobileLlama(config.llama)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, 336, 336] -> visual tokens [B, 144, H] in the decoder's dtype."""
        if self.vision_tower is None:
            raise RuntimeError("this model's vision tower was released: an engine encodes its images")
        features = self.vision_tower(pixel_values)
        return self.mm_projector(features.to(self.llm.embed_tokens.weight.dtype))

    def release_vision(self) -> None:
        """Drop the vision tower and projector, weights and all, once an engine (ONNX Runtime, TensorRT) encodes
        the images instead, and hand their memory back (MobileVLM-1.7B's are 0.6 GB in float16, 1.2 GB in
        float32): to the OS on the CPU, to the GPU's free memory on CUDA."""
        self.vision_tower = self.mm_projector = None
        if self.llm.embed_tokens.weight.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            return_freed_memory()

    def embed_prompt(self, input_ids: list[int], image_tokens: Tensor | None) -> Tensor:
        """Token embeddings with each IMAGE_TOKEN_INDEX slot replaced by the visual tokens: [1, L', H]."""
        embed = self.llm.embed_tokens
        device = embed.weight.device
        pieces: list[Tensor] = []
        text: list[int] = []
        images_used = 0
        for token in input_ids:
            if token != IMAGE_TOKEN_INDEX:
                text.append(token)
                continue
            if image_tokens is None or images_used >= image_tokens.shape[0]:
                raise ValueError("the prompt has more <image> slots than images were given")
            if text:
                pieces.append(embed(torch.tensor(text, device=device)))
                text = []
            pieces.append(image_tokens[images_used])
            images_used += 1
        if text:
            pieces.append(embed(torch.tensor(text, device=device)))
        return torch.cat(pieces)[None]

    def prefill(self, embeds: Tensor, row: int = 0, start: int = 0) -> Tensor:
        """Run the prompt [1, T, H] into the KV cache's row at positions start..start + T - 1 (those before start
        must be filled already: a cached prefix, prefix_cache.py); returns the last position's logits [1, V]."""
        t = embeds.shape[1]
        return self.llm(embeds, torch.arange(start, start + t, device=embeds.device), start + t, first_row=row)

    def decode_step(self, token: Tensor, pos: int | list[int], run_layer: RunLayer | None = None) -> Tensor:
        """One new token per row, token [B], attending over the cache; returns logits [B, V]. pos: the position
        of every row (an int) or of each row (a list). run_layer: see MobileLlama.forward."""
        if isinstance(pos, int):
            input_pos, kv_len = torch.tensor([pos], device=token.device), pos + 1
        else:
            input_pos, kv_len = torch.tensor(pos, device=token.device)[:, None], max(pos) + 1
        return self.llm(self.llm.embed_tokens(token)[:, None], input_pos, kv_len, run_layer=run_layer)
