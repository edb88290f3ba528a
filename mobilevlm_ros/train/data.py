"""Training examples from generated scenes: pixels exactly as the inference pipeline sees them, dense per-patch
targets for the vision pretraining, and the scenes' question/answer pairs for the language phases.

Nothing here imports torch at module level, so scene generation can run in worker processes cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..demo.scenes import BOX_COLORS, CAR_COLORS, CLASSES, LIGHT_STATES, QA, Scene, make_scene, questions_for
from ..model.image import CLIP_MEAN, CLIP_STD, RESCALE, expand_to_square, resize_and_crop, to_rgb

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24
NUM_CLASSES = len(CLASSES) + 1  # background + classes
COLOR_NAMES = tuple(dict.fromkeys(list(CAR_COLORS) + list(BOX_COLORS)))  # red blue green yellow white black brown
ATTRS = ("none",) + COLOR_NAMES + tuple(f"light_{s}" for s in LIGHT_STATES)


@dataclass
class Example:
    pixels: np.ndarray  # [336, 336, 3] uint8: the pipeline's padded, resized frame
    patch_class: np.ndarray | None  # [24, 24, NUM_CLASSES] float16: fraction of each patch covered by each class
    patch_attr: np.ndarray | None  # [24, 24, len(ATTRS)] float16
    patch_center: np.ndarray | None  # [24, 24] int8: class + 1 of an object centred in the patch, else 0
    scene: Scene  # image and labels dropped (kept small for pickling)


def square_pixels(image: np.ndarray | Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """The frame as MobileVLMPipeline.pixel_values sees it, before normalisation: [size, size, 3] uint8."""
    return np.asarray(resize_and_crop(expand_to_square(to_rgb(image)), size), dtype=np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """[B, S, S, 3] uint8 -> [B, 3, S, S] float32, bit-identical to model.image.preprocess."""
    x = (pixels * RESCALE).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _square_labels(labels: np.ndarray, size: int) -> tuple[np.ndarray, float, int, int]:
    h, w = labels.shape
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2
    canvas = np.zeros((side, side), dtype=np.uint8)
    canvas[oy:oy + h, ox:ox + w] = labels
    resized = np.asarray(Image.fromarray(canvas).resize((size, size), Image.NEAREST))
    return resized, size / side, ox, oy


def make_example(seed: int, index: int, dense: bool = True) -> Example:
    """Scene (seed, index) as a training example; dense=False skips the per-patch targets."""
    scene = make_scene(seed, index, labels=dense)
    pixels = square_pixels(scene.image)
    patch_class = patch_attr = patch_center = None
    if dense:
        labels, scale, ox, oy = _square_labels(scene.labels, IMAGE_SIZE)
        class_lut = np.zeros(256, dtype=np.int64)
        attr_lut = np.zeros(256, dtype=np.int64)
        patch_center = np.zeros((GRID, GRID), dtype=np.int8)
        for i, obj in enumerate(scene.objects):
            class_lut[i + 1] = CLASSES.index(obj.cls) + 1
            if obj.color:
                attr_lut[i + 1] = ATTRS.index(obj.color)
            elif obj.state:
                attr_lut[i + 1] = ATTRS.index(f"light_{obj.state}")
            cx = ((obj.box[0] + obj.box[2]) / 2 + ox) * scale
            cy = ((obj.box[1] + obj.box[3]) / 2 + oy) * scale
            patch_center[min(int(cy // PATCH), GRID - 1), min(int(cx // PATCH), GRID - 1)] = CLASSES.index(obj.cls) + 1
        patch_id = (np.arange(IMAGE_SIZE) // PATCH)[:, None] * GRID + (np.arange(IMAGE_SIZE) // PATCH)[None, :]
        patch_class = _patch_fractions(patch_id, class_lut[labels], NUM_CLASSES)
        patch_attr = _patch_fractions(patch_id, attr_lut[labels], len(ATTRS))
    small = Scene(image=np.zeros((0, 0, 3), np.uint8), objects=scene.objects, caption=scene.caption, qa=scene.qa,
                  seed=seed, index=index, meta=scene.meta)
    return Example(pixels, patch_class, patch_attr, patch_center, small)


def _patch_fractions(patch_id: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount((patch_id * n + values).ravel(), minlength=GRID * GRID * n)
    return (counts.reshape(GRID, GRID, n) / (PATCH * PATCH)).astype(np.float16)


def _example_worker(args: tuple[int, int, bool]) -> Example:
    return make_example(*args)


def make_examples(seed: int, indices: range | list[int], dense: bool, workers: int = 1) -> list[Example]:
    """Examples for the given scene indices, in order; workers > 1 renders in a process pool (same result)."""
    jobs = [(seed, i, dense) for i in indices]
    if workers <= 1:
        return [make_example(*job) for job in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(_example_worker, jobs, chunksize=32)


def conversation(scene: Scene, rng: np.random.Generator, max_turns: int | None = None) -> list[QA]:
    """All of a scene's questions (fresh templates from rng) and its caption request, in random order."""
    qa = questions_for(scene.objects, scene.meta["width"], rng)
    order = rng.permutation(len(qa))
    turns = [qa[i] for i in order]
    return turns[:max_turns] if max_turns else turns
