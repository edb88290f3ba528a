"""Image preprocessing exactly as MobileVLM's process_images + transformers 4.33's CLIPImageProcessor."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104): truncated, as the reference does
RESCALE = 0.00392156862745098  # 1/255 as the processor's config stores it


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image: alpha dropped without compositing, grey replicated (PIL's convert('RGB'))."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 array [H, W, 3], got {image.dtype} {list(image.shape)}")
        return Image.fromarray(image, "RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), PAD_COLOR)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shortest edge to `size` with PIL bicubic (antialiased), then centre crop `size` x `size`."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (left, top) != (0, 0) or (new_w, new_h) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return image


def preprocess(image: Image.Image | np.ndarray, image_size: int = 336, pad: bool = True) -> torch.Tensor:
    """-> float32 pixel values [1, 3, S, S]. pad=True is image_aspect_ratio 'pad'; False is resize + centre crop."""
    image = to_rgb(image)
    if pad:
        image = expand_to_square(image)
    image = resize_and_crop(image, image_size)
    # Rescale in float64 then cast, normalise in float32: the processor's order, which keeps pixels bit-exact.
    x = (np.asarray(image, dtype=np.uint8) * RESCALE).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
