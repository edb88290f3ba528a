"""Procedurally generated road scenes with exact ground truth: questions, short answers and a caption.

A scene is a camera frame of a road seen from a robot: sky, horizon, a perspective road with lane markings and
roadside verge, and the objects a robot meets (cars, pedestrians, traffic cones, boxes, stop signs, traffic
lights) in varying colours, counts, sizes and positions, under changing light, with sensor noise, blur and
sometimes JPEG artefacts. Everything is drawn with Pillow's ImageDraw and numpy, so nothing beyond the package's
runtime needs is required.

Every scene is a pure function of ``(seed, index)`` (numpy's SeedSequence), so a training set, a held-out set
and a demo bag are reproducible on any machine. The ground truth is kept unambiguous by construction: objects
never overlap and lie fully inside the frame (counts are exact), colour and traffic-light questions are asked
only when exactly one object of the class is present, and left/right questions only for a single object whose
centre is clearly off the middle of the frame.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("car", "pedestrian", "cone", "box", "stop sign", "traffic light")
PLURAL = {"car": "cars", "pedestrian": "pedestrians", "cone": "cones", "box": "boxes", "stop sign": "stop signs",
          "traffic light": "traffic lights"}
GROUND_CLASSES = ("car", "pedestrian", "cone", "box")  # stand on the road
COUNTED_CLASSES = GROUND_CLASSES
CAR_COLORS = {"red": (196, 32, 34), "blue": (36, 72, 204), "green": (34, 148, 58), "yellow": (238, 202, 40),
              "white": (236, 236, 232), "black": (30, 30, 34)}
BOX_COLORS = {"brown": (150, 102, 56), "red": (190, 40, 40), "blue": (40, 80, 190), "green": (44, 140, 60),
              "yellow": (226, 196, 52)}
COLORED_CLASSES = {"car": CAR_COLORS, "box": BOX_COLORS}
LIGHT_STATES = ("red", "green")
# How many of each class a scene asks for (uniform choice; placement may drop an object that does not fit).
COUNT_CHOICES = {"car": (0, 1, 1, 2), "pedestrian": (0, 1, 1, 2, 3), "cone": (0, 1, 2, 3, 4, 5),
                 "box": (0, 1, 1, 2), "stop sign": (0, 0, 1), "traffic light": (0, 1)}
FRAME_SIZES = ((640, 480), (448, 336), (320, 240), (512, 384))  # 4:3 camera frames
QUESTION_TYPES = ("color", "count", "light", "presence", "position")
CAPTION_QUESTIONS = ("Describe the scene.", "Describe the image.", "What do you see?", "Describe this image briefly.",
                     "Give a short caption of the scene.")
TEMPLATES = {
    "color": ("What color is the {c}?", "What is the color of the {c}?", "Which color is the {c}?"),
    "count": ("How many {p} are there?", "How many {p} are in the image?", "How many {p} can you see?",
              "Count the {p}."),
    "light": ("Is the traffic light red or green?", "What color is the traffic light?",
              "Is the light red or green?"),
    "presence": ("Is there a {c} on the road?", "Is there a {c} in the image?", "Do you see a {c}?",
                 "Are there any {p}?"),
    "position": ("Is the {c} on the left or the right?", "Is the {c} on the left or right side?",
                 "Where is the {c}, left or right?"),
}
POSITION_MARGIN = 0.1  # left/right asked only for a centre outside [0.5 - m, 0.5 + m] of the frame width


@dataclass(frozen=True)
class SceneObject:
    cls: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)
    color: str | None = None  # car and box colour name
    state: str | None = None  # traffic light: "red" or "green"

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class QA:
    kind: str  # one of QUESTION_TYPES, or "caption"
    question: str
    answer: str
    subject: str = ""  # the object class asked about


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8 RGB
    objects: list[SceneObject]
    caption: str
    qa: list[QA]
    labels: np.ndarray | None = None  # [H, W] uint8: 0 background, i + 1 where objects[i] is drawn
    seed: int = 0
    index: int = 0
    meta: dict = field(default_factory=dict)

    def count(self, cls: str) -> int:
        return sum(o.cls == cls for o in self.objects)

    def questions(self, kind: str) -> list[QA]:
        return [qa for qa in self.qa if qa.kind == kind]


# ---------------------------------------------------------------------------------------------------------------
# drawing


class _Canvas:
    """An RGB image and, optionally, an instance-label map drawn with the same shapes."""

    def __init__(self, width: int, height: int, labels: bool):
        self.image = Image.new("RGB", (width, height))
        self.draw = ImageDraw.Draw(self.image)
        self.label_image = Image.new("L", (width, height)) if labels else None
        self.ldraw = ImageDraw.Draw(self.label_image) if labels else None
        self.inst = 0  # label written by shapes drawn now (0: background, not an object)

    def polygon(self, pts, fill) -> None:
        pts = [(float(x), float(y)) for x, y in pts]
        self.draw.polygon(pts, fill=fill)
        if self.ldraw is not None and self.inst:
            self.ldraw.polygon(pts, fill=self.inst)

    def rect(self, box, fill) -> None:
        x0, y0, x1, y1 = (float(v) for v in box)
        self.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill)

    def ellipse(self, box, fill) -> None:
        box = [float(v) for v in box]
        if box[2] <= box[0] or box[3] <= box[1]:
            return
        self.draw.ellipse(box, fill=fill)
        if self.ldraw is not None and self.inst:
            self.ldraw.ellipse(box, fill=self.inst)

    def line(self, pts, fill, width: float) -> None:
        pts = [(float(x), float(y)) for x, y in pts]
        w = max(1, int(round(width)))
        self.draw.line(pts, fill=fill, width=w)
        if self.ldraw is not None and self.inst:
            self.ldraw.line(pts, fill=self.inst, width=w)


def _shade(color, factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * factor)))) for c in color)


def _jitter(rng: np.random.Generator, color, amount: int) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c + rng.integers(-amount, amount + 1)))) for c in color)


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


SKIES = (((90, 150, 230), (190, 220, 245)),  # clear day
         ((150, 160, 175), (205, 210, 215)),  # overcast
         ((70, 80, 140), (240, 160, 110)),  # dusk
         ((120, 180, 240), (230, 240, 250)))  # bright haze
VERGES = ((70, 140, 60), (110, 150, 70), (150, 150, 145), (175, 160, 120))  # grass, dry grass, pavement, sand
ASPHALT = ((70, 70, 74), (95, 95, 98), (55, 56, 60), (110, 108, 104))
SKIN = ((255, 220, 185), (230, 180, 140), (190, 140, 100), (140, 95, 60), (95, 65, 45))
CLOTHES = ((200, 40, 40), (40, 70, 180), (40, 140, 70), (230, 200, 60), (240, 240, 240), (30, 30, 30),
           (120, 60, 150), (240, 130, 40), (100, 100, 100), (60, 160, 190))


def _draw_background(c: _Canvas, rng: np.random.Generator, w: int, h: int) -> dict:
    horizon = h * rng.uniform(0.30, 0.45)
    top, bottom = SKIES[rng.integers(len(SKIES))]
    top, bottom = _jitter(rng, top, 12), _jitter(rng, bottom, 12)
    steps = 24
    for i in range(steps):
        y0, y1 = horizon * i / steps, horizon * (i + 1) / steps + 1
        c.rect((0, y0, w, y1), _mix(top, bottom, i / (steps - 1)))
    for _ in range(rng.integers(0, 4)):  # clouds
        cx, cy = rng.uniform(0, w), rng.uniform(0.05, 0.8) * horizon
        rw, rh = rng.uniform(0.05, 0.14) * w, rng.uniform(0.03, 0.06) * h
        shade = _jitter(rng, (235, 238, 242), 10)
        for _ in range(3):
            dx, dy = rng.uniform(-0.6, 0.6) * rw, rng.uniform(-0.4, 0.4) * rh
            c.ellipse((cx + dx - rw, cy + dy - rh, cx + dx + rw, cy + dy + rh), shade)
    # distant skyline: buildings and trees standing on the horizon
    x = rng.uniform(-0.1, 0.1) * w
    while x < w and rng.random() < 0.9:
        bw = rng.uniform(0.04, 0.12) * w
        if rng.random() < 0.5:
            bh = rng.uniform(0.04, 0.16) * h
            c.rect((x, horizon - bh, x + bw, horizon + 1), _jitter(rng, (140, 138, 150), 25))
        else:
            r = bw / 2
            c.ellipse((x, horizon - 2.2 * r, x + 2 * r, horizon), _jitter(rng, (60, 110, 60), 20))
        x += bw + rng.uniform(0, 0.15) * w
    verge = _jitter(rng, VERGES[rng.integers(len(VERGES))], 10)
    c.rect((0, horizon, w, h), verge)
    vx = w * rng.uniform(0.35, 0.65)
    half_top = w * rng.uniform(0.015, 0.04)
    left_bottom, right_bottom = w * rng.uniform(-0.45, 0.05), w * rng.uniform(0.95, 1.45)
    asphalt = _jitter(rng, ASPHALT[rng.integers(len(ASPHALT))], 8)
    c.polygon([(vx - half_top, horizon), (vx + half_top, horizon), (right_bottom, h), (left_bottom, h)], asphalt)

    def edge(y: float, side: int) -> float:  # road edge x at height y (side -1 left, +1 right)
        t = (y - horizon) / (h - horizon)
        return (vx + side * half_top) + t * ((right_bottom if side > 0 else left_bottom) - (vx + side * half_top))

    line_color = (235, 235, 225) if rng.random() < 0.6 else (235, 200, 60)
    for side in (-1, 1):  # edge lines
        c.polygon([(edge(horizon, side) - side * 1, horizon), (edge(horizon, side), horizon),
                   (edge(h, side), h), (edge(h, side) - side * 0.012 * w, h)], (225, 225, 220))
    n_dash = 8
    mid_bottom = (left_bottom + right_bottom) / 2
    for i in range(n_dash):  # dashed centre line, dashes growing with perspective
        t0, t1 = (i / n_dash) ** 1.6, ((i + 0.5) / n_dash) ** 1.6
        y0, y1 = horizon + t0 * (h - horizon), horizon + t1 * (h - horizon)
        x0, x1 = vx + t0 * (mid_bottom - vx), vx + t1 * (mid_bottom - vx)
        hw0, hw1 = 0.5 + t0 * 0.008 * w, 0.5 + t1 * 0.008 * w
        c.polygon([(x0 - hw0, y0), (x0 + hw0, y0), (x1 + hw1, y1), (x1 - hw1, y1)], line_color)
    return {"horizon": horizon, "edge": edge}


def _draw_car(c: _Canvas, rng, box, color) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    flip = rng.random() < 0.5
    fx = (lambda x: x1 - (x - x0)) if flip else (lambda x: x)
    body = _jitter(rng, color, 10)
    cab_l, cab_r = x0 + w * rng.uniform(0.18, 0.28), x1 - w * rng.uniform(0.2, 0.32)
    cabin = [(cab_l - 0.06 * w, y0 + 0.45 * h), (cab_l + 0.08 * w, y0), (cab_r - 0.05 * w, y0),
             (cab_r + 0.08 * w, y0 + 0.45 * h)]
    c.polygon([(fx(x), y) for x, y in cabin], _shade(body, 0.92))
    glass = _jitter(rng, (150, 185, 210), 15)
    mid = (cab_l + cab_r) / 2
    for a, b in ((cab_l + 0.02 * w, mid - 0.015 * w), (mid + 0.015 * w, cab_r + 0.02 * w)):
        win = [(a - 0.03 * w, y0 + 0.4 * h), (a + 0.06 * w, y0 + 0.08 * h), (b - 0.04 * w, y0 + 0.08 * h),
               (b + 0.03 * w, y0 + 0.4 * h)]
        win = [(min(max(x, cab_l), cab_r + 0.05 * w), y) for x, y in win]
        c.polygon([(fx(x), y) for x, y in win], glass)
    c.rect((x0, y0 + 0.42 * h, x1, y1 - 0.14 * h), body)
    c.rect((x0, y1 - 0.3 * h, x1, y1 - 0.14 * h), _shade(body, 0.75))
    lx = fx(x0 + 0.01 * w) if not flip else fx(x0 + 0.05 * w)
    c.rect((min(lx, fx(x0 + 0.05 * w)), y0 + 0.5 * h, max(lx, fx(x0 + 0.05 * w)), y0 + 0.6 * h), (250, 240, 180))
    r = 0.19 * h
    for cx in (x0 + 0.22 * w, x1 - 0.22 * w):
        c.ellipse((cx - r, y1 - 2 * r, cx + r, y1), (20, 20, 22))
        c.ellipse((cx - 0.45 * r, y1 - 1.45 * r, cx + 0.45 * r, y1 - 0.55 * r), (150, 150, 155))


def _draw_pedestrian(c: _Canvas, rng, box) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    skin = SKIN[rng.integers(len(SKIN))]
    shirt = _jitter(rng, CLOTHES[rng.integers(len(CLOTHES))], 15)
    pants = _jitter(rng, CLOTHES[rng.integers(len(CLOTHES))], 15)
    head = 0.14 * h
    c.ellipse((cx - head / 2 * 1.0, y0, cx + head / 2 * 1.0, y0 + head), skin)
    if rng.random() < 0.5:  # hair or cap
        c.ellipse((cx - head / 2, y0, cx + head / 2, y0 + head * 0.45), _jitter(rng, (50, 35, 25), 20))
    torso_top, torso_bot = y0 + head * 1.05, y0 + 0.55 * h
    c.rect((cx - 0.3 * w, torso_top, cx + 0.3 * w, torso_bot), shirt)
    swing = rng.uniform(-0.06, 0.06) * w
    arm_w = 0.1 * w
    c.line([(cx - 0.3 * w, torso_top + 0.02 * h), (cx - 0.36 * w - swing, torso_bot)], shirt, arm_w)
    c.line([(cx + 0.3 * w, torso_top + 0.02 * h), (cx + 0.36 * w + swing, torso_bot)], shirt, arm_w)
    stride = rng.uniform(0.0, 0.16) * w
    leg_w = 0.18 * w
    c.line([(cx - 0.14 * w, torso_bot), (cx - 0.14 * w - stride, y1 - 0.02 * h)], pants, leg_w)
    c.line([(cx + 0.14 * w, torso_bot), (cx + 0.14 * w + stride, y1 - 0.02 * h)], pants, leg_w)
    c.rect((cx - 0.14 * w - stride - 0.13 * w, y1 - 0.04 * h, cx - 0.14 * w - stride + 0.13 * w, y1), (25, 25, 25))
    c.rect((cx + 0.14 * w + stride - 0.13 * w, y1 - 0.04 * h, cx + 0.14 * w + stride + 0.13 * w, y1), (25, 25, 25))


def _draw_cone(c: _Canvas, rng, box) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    orange = _jitter(rng, (250, 115, 20), 15)
    base_h = 0.12 * h
    c.rect((x0, y1 - base_h, x1, y1), _shade(orange, 0.55))
    top_w, bot_w = 0.12 * w, 0.8 * w
    c.polygon([(cx - top_w / 2, y0), (cx + top_w / 2, y0), (cx + bot_w / 2, y1 - base_h),
               (cx - bot_w / 2, y1 - base_h)], orange)
    for a, b in ((0.35, 0.48), (0.6, 0.72)):  # reflective bands
        wa, wb = top_w + (bot_w - top_w) * a, top_w + (bot_w - top_w) * b
        ya, yb = y0 + (y1 - base_h - y0) * a, y0 + (y1 - base_h - y0) * b
        c.polygon([(cx - wa / 2, ya), (cx + wa / 2, ya), (cx + wb / 2, yb), (cx - wb / 2, yb)], (240, 240, 240))


def _draw_box(c: _Canvas, rng, box, color) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    face = _jitter(rng, color, 10)
    depth = 0.25 * h
    side = rng.random() < 0.5
    fx0, fx1 = (x0, x1 - 0.3 * depth) if side else (x0 + 0.3 * depth, x1)
    c.rect((fx0, y0 + depth, fx1, y1), face)
    if side:
        c.polygon([(fx0, y0 + depth), (fx0 + 0.3 * depth, y0), (x1, y0), (fx1, y0 + depth)], _shade(face, 1.2))
        c.polygon([(fx1, y0 + depth), (x1, y0), (x1, y1 - depth), (fx1, y1)], _shade(face, 0.7))
    else:
        c.polygon([(fx0, y0 + depth), (x0, y0), (fx1 - 0.3 * depth, y0), (fx1, y0 + depth)], _shade(face, 1.2))
        c.polygon([(fx0, y0 + depth), (x0, y0), (x0, y1 - depth), (fx0, y1)], _shade(face, 0.7))
    tape = _shade(face, 0.8) if rng.random() < 0.6 else (215, 200, 160)
    mid = (fx0 + fx1) / 2
    c.rect((mid - 0.05 * w, y0 + depth, mid + 0.05 * w, y0 + depth + 0.35 * (h - depth)), tape)


def _draw_stop_sign(c: _Canvas, rng, box) -> None:
    x0, y0, x1, y1 = box
    w = x1 - x0
    cx = (x0 + x1) / 2
    r = w / 2
    pole = _jitter(rng, (150, 150, 155), 15)
    c.rect((cx - 0.07 * w, y0 + r, cx + 0.07 * w, y1), pole)
    cy = y0 + r
    ang = np.pi / 8 + np.arange(8) * np.pi / 4
    c.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in ang], (240, 240, 240))
    c.polygon([(cx + 0.86 * r * np.cos(a), cy + 0.86 * r * np.sin(a)) for a in ang], _jitter(rng, (200, 20, 30), 10))
    c.rect((cx - 0.55 * r, cy - 0.14 * r, cx + 0.55 * r, cy + 0.14 * r), (245, 245, 245))  # the word STOP


def _draw_traffic_light(c: _Canvas, rng, box, state: str) -> None:
    x0, y0, x1, y1 = box
    w = x1 - x0
    cx = (x0 + x1) / 2
    housing_h = 2.4 * w
    c.rect((cx - 0.09 * w, y0 + housing_h, cx + 0.09 * w, y1), _jitter(rng, (90, 90, 95), 15))
    housing = (30, 30, 32) if rng.random() < 0.75 else (200, 170, 40)
    c.rect((x0, y0, x1, y0 + housing_h), _jitter(rng, housing, 8))
    r = 0.32 * w
    lamps = (("red", (255, 40, 30), (80, 25, 25)), ("yellow", (255, 190, 30), (80, 65, 20)),
             ("green", (40, 240, 110), (20, 70, 35)))
    for i, (name, on, off) in enumerate(lamps):
        cy = y0 + housing_h * (i + 0.5) / 3
        if name == state:
            c.ellipse((cx - 1.25 * r, cy - 1.25 * r, cx + 1.25 * r, cy + 1.25 * r), _mix(on, housing, 0.55))
        c.ellipse((cx - r, cy - r, cx + r, cy + r), on if name == state else off)


# ---------------------------------------------------------------------------------------------------------------
# layout

# (height as a fraction of the frame height at the nearest row, width / height range)
SHAPES = {"car": (0.28, (1.6, 1.9)), "pedestrian": (0.38, (0.36, 0.42)), "cone": (0.2, (0.55, 0.7)),
          "box": (0.17, (1.1, 1.5)), "stop sign": (0.44, (0.28, 0.34)), "traffic light": (0.52, (0.17, 0.2))}


def _place(rng, cls: str, w: int, h: int, bg: dict, taken: list) -> tuple[float, float, float, float] | None:
    horizon, edge = bg["horizon"], bg["edge"]
    frac, (ar_lo, ar_hi) = SHAPES[cls]
    margin = 0.012 * w
    for _ in range(40):
        y_b = horizon + rng.uniform(0.35, 0.98) * (h - horizon)
        depth = (y_b - horizon) / (h - horizon)
        oh = frac * h * (0.5 + 0.5 * depth) * rng.uniform(0.9, 1.1)
        ow = oh * rng.uniform(ar_lo, ar_hi)
        if cls in GROUND_CLASSES:
            lo, hi = edge(y_b, -1) + 0.5 * ow, edge(y_b, 1) - 0.5 * ow
        else:  # roadside: just off the road edge, on either side
            side = -1 if rng.random() < 0.5 else 1
            x_edge = edge(y_b, side)
            lo = hi = x_edge + side * (0.6 * ow + rng.uniform(0.0, 0.05) * w)
        lo, hi = max(lo, 0.5 * ow + margin), min(hi, w - 0.5 * ow - margin)
        if hi < lo or y_b - oh < margin:
            continue
        cx = rng.uniform(lo, hi)
        box = (cx - ow / 2, y_b - oh, cx + ow / 2, y_b)
        if all(box[2] + margin < t[0] or t[2] + margin < box[0] or box[3] + margin < t[1] or t[3] + margin < box[1]
               for t in taken):
            return box
    return None


def _article_list(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_for(objects: list[SceneObject]) -> str:
    parts = []
    for cls in CLASSES:
        found = [o for o in objects if o.cls == cls]
        if not found:
            continue
        if len(found) > 1:
            parts.append(f"{len(found)} {PLURAL[cls]}")
        elif found[0].color:
            parts.append(f"a {found[0].color} {cls}")
        elif found[0].state:
            parts.append(f"a {found[0].state} {cls}")
        else:
            parts.append(f"a {cls}")
    return "A road scene with " + _article_list(parts) + "." if parts else "An empty road."


def side_of(obj: SceneObject, width: int) -> str | None:
    """"left" or "right" for an object whose centre is clearly off the middle of the frame, else None."""
    x = obj.center_x / width
    if abs(x - 0.5) <= POSITION_MARGIN:
        return None
    return "left" if x < 0.5 else "right"


def questions_for(objects: list[SceneObject], width: int, rng: np.random.Generator) -> list[QA]:
    """Every unambiguous question about the scene (one template each, drawn by rng), plus the caption request."""

    def pick(kind: str, cls: str = "") -> str:
        options = TEMPLATES[kind]
        if kind == "presence" and cls not in GROUND_CLASSES:  # signs and lights stand beside the road
            options = [t for t in options if "on the road" not in t]
        return options[rng.integers(len(options))].format(c=cls, p=PLURAL.get(cls, ""))

    by_class = {cls: [o for o in objects if o.cls == cls] for cls in CLASSES}
    qa = []
    for cls in COLORED_CLASSES:
        if len(by_class[cls]) == 1:
            qa.append(QA("color", pick("color", cls), by_class[cls][0].color, cls))
    for cls in COUNTED_CLASSES:
        qa.append(QA("count", pick("count", cls), str(len(by_class[cls])), cls))
    if len(by_class["traffic light"]) == 1:
        qa.append(QA("light", pick("light"), by_class["traffic light"][0].state, "traffic light"))
    for cls in CLASSES:
        qa.append(QA("presence", pick("presence", cls), "yes" if by_class[cls] else "no", cls))
    for cls in CLASSES:
        if len(by_class[cls]) == 1:
            side = side_of(by_class[cls][0], width)
            if side:
                qa.append(QA("position", pick("position", cls), side, cls))
    qa.append(QA("caption", CAPTION_QUESTIONS[rng.integers(len(CAPTION_QUESTIONS))], caption_for(objects)))
    return qa


def _finish(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Camera effects: light level and tint, blur, sensor noise and sometimes JPEG compression."""
    blur = rng.uniform(0.0, 1.3)
    if blur > 0.4:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    x = np.asarray(image, dtype=np.float32)
    gain = rng.uniform(0.7, 1.25) * rng.uniform(0.94, 1.06, size=3)
    x *= gain.astype(np.float32)
    x += np.float32(rng.uniform(-12, 12) + 0.5)  # + 0.5: the truncating cast below then rounds
    if rng.random() < 0.5:  # light falling off towards one side (a shadow or the low sun)
        ramp = np.linspace(rng.uniform(0.75, 1.0), rng.uniform(0.95, 1.1), x.shape[1], dtype=np.float32)
        x *= (ramp[::-1] if rng.random() < 0.5 else ramp)[None, :, None]
    sigma = rng.uniform(0.0, 7.0)
    noise_rng = np.random.default_rng(rng.integers(2**63))
    # sensor noise, mostly in brightness (one draw shared by the channels) and a little in colour
    x += noise_rng.standard_normal((x.shape[0], x.shape[1], 1), dtype=np.float32) * np.float32(sigma)
    np.clip(x, 0, 255, out=x)
    out = x.astype(np.uint8)
    if rng.random() < 0.3:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(40, 91)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def make_scene(seed: int, index: int, size: tuple[int, int] | None = None, labels: bool = False) -> Scene:
    """Scene number ``index`` of the stream ``seed``; size (width, height) defaults to one of FRAME_SIZES."""
    rng = np.random.default_rng([seed, index])
    w, h = size if size is not None else FRAME_SIZES[rng.integers(len(FRAME_SIZES))]
    c = _Canvas(w, h, labels)
    bg = _draw_background(c, rng, w, h)
    wanted = [cls for cls in CLASSES for _ in range(COUNT_CHOICES[cls][rng.integers(len(COUNT_CHOICES[cls]))])]
    rng.shuffle(wanted)
    placed: list[tuple[str, tuple[float, float, float, float]]] = []
    for cls in wanted:
        box = _place(rng, cls, w, h, bg, [b for _, b in placed])
        if box is not None:
            placed.append((cls, box))
    placed.sort(key=lambda p: p[1][3])  # far (higher up) first
    objects: list[SceneObject] = []
    for cls, box in placed:
        c.inst = 0
        if cls in GROUND_CLASSES:  # contact shadow, not part of the object
            x0, _, x1, y1 = box
            c.ellipse((x0 - 0.03 * (x1 - x0), y1 - 0.03 * h * 0.3, x1 + 0.03 * (x1 - x0), y1 + 0.02 * h * 0.3),
                      (35, 35, 38))
        c.inst = len(objects) + 1
        color = state = None
        if cls == "car":
            color = list(CAR_COLORS)[rng.integers(len(CAR_COLORS))]
            _draw_car(c, rng, box, CAR_COLORS[color])
        elif cls == "box":
            color = list(BOX_COLORS)[rng.integers(len(BOX_COLORS))]
            _draw_box(c, rng, box, BOX_COLORS[color])
        elif cls == "pedestrian":
            _draw_pedestrian(c, rng, box)
        elif cls == "cone":
            _draw_cone(c, rng, box)
        elif cls == "stop sign":
            _draw_stop_sign(c, rng, box)
        else:
            state = LIGHT_STATES[rng.integers(len(LIGHT_STATES))]
            _draw_traffic_light(c, rng, box, state)
        ibox = (int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3])))
        objects.append(SceneObject(cls, ibox, color, state))
    image = _finish(c.image, rng)
    label_map = np.asarray(c.label_image) if c.label_image is not None else None
    return Scene(image=image, objects=objects, caption=caption_for(objects), qa=questions_for(objects, w, rng),
                 labels=label_map, seed=seed, index=index, meta={"width": w, "height": h})


def answer_matches(predicted: str, expected: str) -> bool:
    """Exact match after trimming whitespace, a final full stop and case."""
    norm = lambda s: s.strip().rstrip(".").strip().lower()  # noqa: E731
    return norm(predicted) == norm(expected)


def caption_classes(caption: str) -> set[str]:
    """The object classes a caption mentions (singular or plural)."""
    text = caption.lower()
    return {cls for cls in CLASSES if cls in text}


# ---------------------------------------------------------------------------------------------------------------
# A skill the bundled demo model was never taught, for the fine-tuning proof (docs/FINETUNE.md). It is asked only
# through stop_or_go, never by questions_for or make_scene, so every seed's scenes and questions stay as they were.

STOP_OR_GO = "stop_or_go"
STOP_OR_GO_QUESTIONS = ("Should the robot stop or go?", "Can the robot go, or must it stop?",
                        "Stop or go?", "Must the robot stop here, or may it go?")


def must_stop(objects: list[SceneObject]) -> bool:
    """The rule the skill teaches: stop at a stop sign or a red traffic light, otherwise go."""
    return any(o.cls == "stop sign" or (o.cls == "traffic light" and o.state == "red") for o in objects)


def stop_or_go(scene: Scene, rng: np.random.Generator) -> QA:
    """The stop-or-go question about a scene (a template drawn by rng) and its answer, "stop" or "go"."""
    question = STOP_OR_GO_QUESTIONS[rng.integers(len(STOP_OR_GO_QUESTIONS))]
    return QA(STOP_OR_GO, question, "stop" if must_stop(scene.objects) else "go")
