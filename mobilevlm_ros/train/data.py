"""Training examples from generated scenes: pixels exactly as the inference pipeline sees them, dense per-patch
targets for the vision pretraining, and the scenes' question/answer pairs for the language phases.

Nothing here imports torch at module level, so scene generation can run in worker processes cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..demo.scenes import (BOX_COLORS, CAR_COLORS, CLASSES, COUNTED_CLASSES, LIGHT_STATES, QA, Scene, make_scene,
                           questions_for, side_of)
from ..model.image import CLIP_MEAN, CLIP_STD, RESCALE, expand_to_square, resize_and_crop, to_rgb

IMAGE_SIZE = 336
PATCH = 28  # the demo tower's patches: a 12 x 12 grid, which LDP v2 passes on as its 144 tokens unpooled
GRID = IMAGE_SIZE // PATCH
NUM_CLASSES = len(CLASSES) + 1  # background + classes
COLOR_NAMES = tuple(dict.fromkeys(list(CAR_COLORS) + list(BOX_COLORS)))  # red blue green yellow white black brown
ATTRS = ("none",) + COLOR_NAMES + tuple(f"light_{s}" for s in LIGHT_STATES)
SIDES = ("none", "left", "right")  # which half of the frame the covering object stands in (scenes.side_of)
MAX_COUNT = 5
# Scene-level facts a head on every output token of the vision tower learns (name -> classes).
SCENE_FACTS = {**{f"count_{c}": MAX_COUNT + 1 for c in COUNTED_CLASSES},
               **{f"present_{c}": 2 for c in CLASSES},
               "color_car": len(CAR_COLORS) + 1, "color_box": len(BOX_COLORS) + 1, "light": len(LIGHT_STATES) + 1}
IGNORE = -100  # no target (cross-entropy's ignore_index)


@dataclass
class Example:
    pixels: np.ndarray | None  # [336, 336, 3] uint8: the pipeline's padded, resized frame
    # pixels and the per-patch targets are dropped (None) once the vision tower no longer needs them
    patch_class: np.ndarray | None  # [GRID, GRID, NUM_CLASSES] float16: fraction of each patch covered by each class
    patch_attr: np.ndarray | None  # [GRID, GRID, len(ATTRS)] float16
    patch_side: np.ndarray | None  # [GRID, GRID, len(SIDES)] float16
    patch_density: np.ndarray | None  # [GRID, GRID, len(CLASSES)] float16: each object's share of its pixels per
    # patch (an object sums to 1 over the grid, so a class's sum is its count)
    scene_facts: np.ndarray  # [len(SCENE_FACTS)] int16
    scene: Scene  # image and labels dropped (kept small for pickling)


def square_pixels(image: np.ndarray | Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """The frame as MobileVLMPipeline.pixel_values sees it, before normalisation: [size, size, 3] uint8."""
    return np.asarray(resize_and_crop(expand_to_square(to_rgb(image)), size), dtype=np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """[B, S, S, 3] uint8 -> [B, 3, S, S] float32, bit-identical to model.image.preprocess."""
    x = (pixels * RESCALE).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _square_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """The instance-label map padded and resized as square_pixels does the frame (nearest neighbour)."""
    h, w = labels.shape
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2
    canvas = np.zeros((side, side), dtype=np.uint8)
    canvas[oy:oy + h, ox:ox + w] = labels
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.NEAREST))


def scene_facts(scene: Scene) -> np.ndarray:
    """Counts, presence, the single car's and box's colour and the single traffic light's state (0: not one)."""
    by_class = {c: [o for o in scene.objects if o.cls == c] for c in CLASSES}
    facts = {f"count_{c}": min(len(by_class[c]), MAX_COUNT) for c in COUNTED_CLASSES}
    facts |= {f"present_{c}": int(bool(by_class[c])) for c in CLASSES}
    single = {c: by_class[c][0] if len(by_class[c]) == 1 else None for c in ("car", "box", "traffic light")}
    facts["color_car"] = list(CAR_COLORS).index(single["car"].color) + 1 if single["car"] else 0
    facts["color_box"] = list(BOX_COLORS).index(single["box"].color) + 1 if single["box"] else 0
    facts["light"] = LIGHT_STATES.index(single["traffic light"].state) + 1 if single["traffic light"] else 0
    return np.array([facts[name] for name in SCENE_FACTS], dtype=np.int16)


SUBJECT_ATTRS = COLOR_NAMES  # colours, and the light states (red, green) among them


def subject_facts(scene: Scene, subject: str) -> tuple[int, int, int, int]:
    """What the decoder must know about the class a question names: the class, how many, the side of a single
    one (0 left, 1 right) and its colour or light state (index into SUBJECT_ATTRS); IGNORE where undefined."""
    if not subject:
        return IGNORE, IGNORE, IGNORE, IGNORE
    found = [o for o in scene.objects if o.cls == subject]
    side = attr = IGNORE
    if len(found) == 1:
        where = side_of(found[0], scene.meta["width"])
        if where:
            side = int(where == "right")
        if found[0].color or found[0].state:
            attr = SUBJECT_ATTRS.index(found[0].color or found[0].state)
    return CLASSES.index(subject), min(len(found), MAX_COUNT), side, attr


def make_example(seed: int, index: int) -> Example:
    """Scene (seed, index) as a training example with its per-patch targets."""
    scene = make_scene(seed, index, labels=True)
    pixels = square_pixels(scene.image)
    labels = _square_labels(scene.labels, IMAGE_SIZE)
    class_lut = np.zeros(256, dtype=np.int64)
    attr_lut = np.zeros(256, dtype=np.int64)
    side_lut = np.zeros(256, dtype=np.int64)
    for i, obj in enumerate(scene.objects):
        class_lut[i + 1] = CLASSES.index(obj.cls) + 1
        side_lut[i + 1] = SIDES.index(side_of(obj, scene.meta["width"]) or "none")
        if obj.color:
            attr_lut[i + 1] = ATTRS.index(obj.color)
        elif obj.state:
            attr_lut[i + 1] = ATTRS.index(f"light_{obj.state}")
    patch_id = (np.arange(IMAGE_SIZE) // PATCH)[:, None] * GRID + (np.arange(IMAGE_SIZE) // PATCH)[None, :]
    patch_class = _patch_fractions(patch_id, class_lut[labels], NUM_CLASSES)
    patch_attr = _patch_fractions(patch_id, attr_lut[labels], len(ATTRS))
    patch_side = _patch_fractions(patch_id, side_lut[labels], len(SIDES))
    n = len(scene.objects) + 1
    pixels_of = np.bincount((patch_id * n + labels).ravel(), minlength=GRID * GRID * n).reshape(GRID * GRID, n)
    share = pixels_of[:, 1:] / np.maximum(pixels_of[:, 1:].sum(0), 1)  # [patches, objects]
    patch_density = np.zeros((GRID * GRID, len(CLASSES)))
    for i, obj in enumerate(scene.objects):
        patch_density[:, CLASSES.index(obj.cls)] += share[:, i]
    patch_density = patch_density.reshape(GRID, GRID, len(CLASSES)).astype(np.float16)
    small = Scene(image=np.zeros((0, 0, 3), np.uint8), objects=scene.objects, caption=scene.caption, qa=scene.qa,
                  seed=seed, index=index, meta=scene.meta)
    return Example(pixels, patch_class, patch_attr, patch_side, patch_density, scene_facts(small), small)


def _patch_fractions(patch_id: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount((patch_id * n + values).ravel(), minlength=GRID * GRID * n)
    return (counts.reshape(GRID, GRID, n) / (PATCH * PATCH)).astype(np.float16)


def _example_worker(args: tuple[int, int]) -> Example:
    return make_example(*args)


def make_examples(seed: int, indices: range | list[int], workers: int = 1) -> list[Example]:
    """Examples for the given scene indices, in order; workers > 1 renders in a process pool (same result)."""
    jobs = [(seed, i) for i in indices]
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
