"""Camera intake without ROS: decode ``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` payloads to RGB, and
keep the recent frames of each camera for the inference worker.

The ROS node copies the message fields into :meth:`Frame.from_raw` / :meth:`Frame.from_compressed` in its
subscription callback (cheap: nothing is decoded there) and :meth:`FrameStore.put` s the frame. A request that needs
an image takes :meth:`FrameStore.latest` (or :meth:`FrameStore.find` for a named frame) and calls :meth:`Frame.rgb`,
which decodes once and caches the result. Every problem with a frame is a :class:`FrameError` whose ``code`` is
:data:`UNSUPPORTED_ENCODING` or :data:`BAD_FRAME`.
"""
from __future__ import annotations

import io
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
from PIL import Image

UNSUPPORTED_ENCODING = "UNSUPPORTED_ENCODING"
BAD_FRAME = "BAD_FRAME"

# Compressed images wider or taller than this are refused before their pixels are decoded.
MAX_COMPRESSED_SIDE = 8192

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]  # also anything else with the buffer protocol (array.array)


class FrameError(Exception):
    """A frame cannot be turned into an RGB image; ``code`` says whether it is the encoding or this frame."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


# Encoding names as in ROS 2 sensor_msgs/image_encodings.hpp, with bytes per pixel. "yuv422" is UYVY byte order and
# "yuv422_yuy2" is YUYV; "uyvy" and "yuyv" are the newer names for the same layouts.
_BYTES_PER_PIXEL = {
    "rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2,
    "yuv422": 2, "uyvy": 2, "yuv422_yuy2": 2, "yuyv": 2,
}
_UYVY_ENCODINGS = ("yuv422", "uyvy")
_YUYV_ENCODINGS = ("yuv422_yuy2", "yuyv")

# BT.601 limited ("studio") range YCbCr -> RGB: Y in [16, 235], Cb/Cr in [16, 240] centred on 128.
# R = 1.164383 (Y-16) + 1.596027 (V-128)
# G = 1.164383 (Y-16) - 0.391762 (U-128) - 0.812968 (V-128)
# B = 1.164383 (Y-16) + 2.017232 (U-128)
# (Kr = 0.299, Kb = 0.114; luma scaled by 255/219, chroma by 255/224.)
BT601_Y_SCALE = 255.0 / 219.0
BT601_V_TO_R = 1.402 * 255.0 / 224.0
BT601_U_TO_G = -0.114 * 1.772 / 0.587 * 255.0 / 224.0
BT601_V_TO_G = -0.299 * 1.402 / 0.587 * 255.0 / 224.0
BT601_U_TO_B = 1.772 * 255.0 / 224.0


def validate_raw_image(encoding: str, width: int, height: int, step: int, data_len: int) -> int:
    """Check a ``sensor_msgs/Image`` header against its data length without touching pixels.

    Returns the bytes per pixel; raises :class:`FrameError` for an unsupported encoding or inconsistent sizes.
    """
    bytes_per_pixel = _BYTES_PER_PIXEL.get(encoding)
    if bytes_per_pixel is None:
        raise FrameError(UNSUPPORTED_ENCODING,
                         f"image encoding {encoding!r} is not supported (supported: {', '.join(_BYTES_PER_PIXEL)})")
    if width <= 0 or height <= 0:
        raise FrameError(BAD_FRAME, f"image size {width}x{height} is empty or negative")
    if bytes_per_pixel == 2 and encoding != "mono16" and width % 2:
        raise FrameError(BAD_FRAME, f"{encoding} packs 2 pixels per chroma sample, so width must be even, got {width}")
    row_bytes = width * bytes_per_pixel
    if step < row_bytes:
        raise FrameError(BAD_FRAME, f"step {step} is smaller than width {width} x {bytes_per_pixel} bytes per pixel "
                                    f"= {row_bytes} for {encoding}")
    if data_len < step * height:
        raise FrameError(BAD_FRAME, f"wrong data length: expected at least step {step} x height {height} = "
                                    f"{step * height} bytes for {width}x{height} {encoding}, got {data_len}")
    return bytes_per_pixel


def decode_raw_image(encoding: str, width: int, height: int, step: int, is_bigendian: bool | int,
                     data: Buffer) -> np.ndarray:
    """Decode the fields of a ``sensor_msgs/Image`` to a new C-contiguous RGB uint8 array of shape [H, W, 3].

    Rows may be padded (``step`` > width x bytes per pixel): the padding is skipped. ``mono16`` keeps the high
    byte of each sample (value >> 8) in the byte order ``is_bigendian`` names. YUV 4:2:2 is converted with BT.601
    limited-range coefficients, each chroma pair shared by the two pixels it covers.
    """
    if isinstance(data, np.ndarray):
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        flat = np.frombuffer(data, dtype=np.uint8)
    bytes_per_pixel = validate_raw_image(encoding, width, height, step, flat.size)
    rows = flat[:step * height].reshape(height, step)[:, :width * bytes_per_pixel]
    pixels = rows.reshape(height, width, bytes_per_pixel)

    if encoding == "rgb8":
        rgb = pixels
    elif encoding == "bgr8":
        rgb = pixels[:, :, ::-1]
    elif encoding == "rgba8":
        rgb = pixels[:, :, :3]
    elif encoding == "bgra8":
        rgb = pixels[:, :, 2::-1]
    elif encoding == "mono8":
        rgb = np.repeat(pixels, 3, axis=2)
    elif encoding == "mono16":
        # The high byte of a 16-bit sample is its value >> 8: byte 0 when big-endian, byte 1 when little-endian.
        high_byte = pixels[:, :, 0 if is_bigendian else 1]
        rgb = np.repeat(high_byte[:, :, None], 3, axis=2)
    else:
        rgb = _yuv422_to_rgb(rows, width, height, uyvy=encoding in _UYVY_ENCODINGS)
    # Always a fresh array: the result must not alias (or keep alive) the message buffer.
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)


def _yuv422_to_rgb(rows: np.ndarray, width: int, height: int, uyvy: bool) -> np.ndarray:
    """Convert packed 4:2:2 rows (``width * 2`` bytes each, 4 bytes per pixel pair) to RGB."""
    quads = rows.reshape(height, width // 2, 4).astype(np.float32)
    if uyvy:  # U0 Y0 V0 Y1
        u, y0, v, y1 = quads[..., 0], quads[..., 1], quads[..., 2], quads[..., 3]
    else:  # YUYV: Y0 U0 Y1 V0
        y0, u, y1, v = quads[..., 0], quads[..., 1], quads[..., 2], quads[..., 3]
    luma = np.stack([y0, y1], axis=-1).reshape(height, width)
    luma = (luma - 16.0) * BT601_Y_SCALE
    # Each chroma sample covers the pixel pair it was packed with.
    u = np.repeat(u - 128.0, 2, axis=1)
    v = np.repeat(v - 128.0, 2, axis=1)
    rgb = np.stack([luma + BT601_V_TO_R * v,
                    luma + BT601_U_TO_G * u + BT601_V_TO_G * v,
                    luma + BT601_U_TO_B * u], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Formats recognised only to say "unsupported" instead of "corrupt".
_OTHER_IMAGE_MAGICS = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"qoif", "QOI"),
)


def decode_compressed_image(format: str, data: Buffer) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` payload (JPEG or PNG) to a C-contiguous RGB uint8 [H, W, 3] array.

    The codec is sniffed from the data; ``format`` is free text in ROS and only named in error messages (and
    "compressedDepth" payloads, which are depth maps, are refused by it). Modes are converted as
    ``Image.convert('RGB')`` does (alpha dropped, palette expanded), except 16-bit grey, which keeps value >> 8
    where Pillow would clip at 255. Truncated or corrupt data is :data:`BAD_FRAME`.
    """
    payload = data if isinstance(data, bytes) else bytes(data)
    if "compresseddepth" in format.lower():
        raise FrameError(UNSUPPORTED_ENCODING, f"compressed format {format!r} is a depth image, not a camera image")
    if not payload:
        raise FrameError(BAD_FRAME, f"compressed image ({format!r}) has no data")
    if payload.startswith(_JPEG_MAGIC):
        codec = "JPEG"
    elif payload.startswith(_PNG_MAGIC):
        codec = "PNG"
    else:
        for magic, other_codec in _OTHER_IMAGE_MAGICS:
            if payload.startswith(magic):
                raise FrameError(UNSUPPORTED_ENCODING,
                                 f"compressed image ({format!r}) is {other_codec}; only JPEG and PNG are supported")
        if payload.startswith(b"RIFF") and payload[8:12] == b"WEBP":
            raise FrameError(UNSUPPORTED_ENCODING,
                             f"compressed image ({format!r}) is WebP; only JPEG and PNG are supported")
        raise FrameError(BAD_FRAME, f"compressed image ({format!r}, {len(payload)} bytes) is neither JPEG nor PNG: "
                                    f"it starts with {payload[:8].hex(' ')}")

    # Pillow's plugins report damaged data with an open-ended set of exceptions (OSError for truncation,
    # SyntaxError for a bad PNG chunk, ValueError, EOFError, struct.error, zlib.error, ...), so all are caught.
    # ImageFile.LOAD_TRUNCATED_IMAGES is left at its default (False), which makes truncation an error.
    try:
        image = Image.open(io.BytesIO(payload), formats=[codec])
    except Image.DecompressionBombError as error:
        raise FrameError(BAD_FRAME, f"{codec} image ({format!r}) is too large: {error}") from error
    except Exception as error:
        raise FrameError(BAD_FRAME, f"{codec} image ({format!r}, {len(payload)} bytes) has a corrupt header: "
                                    f"{error}") from error
    with image:
        width, height = image.size
        # Checked from the header, before any pixel is decoded, so a small file cannot allocate a huge image.
        if width > MAX_COMPRESSED_SIDE or height > MAX_COMPRESSED_SIDE:
            raise FrameError(BAD_FRAME, f"{codec} image ({format!r}) is {width}x{height}; the limit is "
                                        f"{MAX_COMPRESSED_SIDE}x{MAX_COMPRESSED_SIDE}")
        if width <= 0 or height <= 0:
            raise FrameError(BAD_FRAME, f"{codec} image ({format!r}) has empty size {width}x{height}")
        try:
            image.load()
            return _pil_to_rgb(image)
        except Exception as error:
            raise FrameError(BAD_FRAME, f"{codec} image ({format!r}, {width}x{height}, {len(payload)} bytes) is "
                                        f"truncated or corrupt: {error}") from error


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey ("I;16" in current Pillow, "I" in older releases): Pillow's convert('RGB') clips values above
        # 255, so scale to 8 bits like mono16 instead.
        grey = (np.clip(np.asarray(image), 0, 0xFFFF).astype(np.uint32) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)


@dataclass(frozen=True, eq=False)
class Frame:
    """One received frame, not yet decoded. ``rgb()`` runs ``decoder`` on first use and caches the result.

    ``encoding`` is the raw image encoding or the compressed ``format`` text, for log messages.
    ``received_monotonic`` is ``time.monotonic()`` when the message arrived; ``seq`` counts received frames.
    """

    camera_id: str
    seq: int
    stamp_sec: int
    stamp_nanosec: int
    frame_id: str
    encoding: str
    received_monotonic: float
    decoder: Callable[[], np.ndarray] = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _rgb: np.ndarray | None = field(default=None, init=False, repr=False)
    _error: FrameError | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_raw(cls, *, camera_id: str, seq: int, stamp_sec: int, stamp_nanosec: int, frame_id: str,
                 encoding: str, width: int, height: int, step: int, is_bigendian: bool | int, data: Buffer,
                 received_monotonic: float | None = None) -> Frame:
        """A frame from ``sensor_msgs/Image`` fields. ``data`` is kept by reference until decoded: don't mutate it."""
        return cls(camera_id=camera_id, seq=seq, stamp_sec=stamp_sec, stamp_nanosec=stamp_nanosec,
                   frame_id=frame_id, encoding=encoding, received_monotonic=_now(received_monotonic),
                   decoder=lambda: decode_raw_image(encoding, width, height, step, is_bigendian, data))

    @classmethod
    def from_compressed(cls, *, camera_id: str, seq: int, stamp_sec: int, stamp_nanosec: int, frame_id: str,
                        format: str, data: Buffer, received_monotonic: float | None = None) -> Frame:
        """A frame from ``sensor_msgs/CompressedImage`` fields. ``data`` is kept by reference: don't mutate it."""
        return cls(camera_id=camera_id, seq=seq, stamp_sec=stamp_sec, stamp_nanosec=stamp_nanosec,
                   frame_id=frame_id, encoding=format, received_monotonic=_now(received_monotonic),
                   decoder=lambda: decode_compressed_image(format, data))

    def rgb(self) -> np.ndarray:
        """The decoded RGB uint8 [H, W, 3] image, read-only because every caller shares it.

        Decodes at most once, even when several threads ask at the same time; a :class:`FrameError` is cached
        and raised again, since the same bytes would fail the same way.
        """
        with self._lock:
            if self._rgb is None and self._error is None:
                try:
                    rgb = self.decoder()
                except FrameError as error:
                    object.__setattr__(self, "_error", error)
                else:
                    rgb.flags.writeable = False
                    object.__setattr__(self, "_rgb", rgb)
            if self._error is not None:
                raise self._error
            return self._rgb


def _now(received_monotonic: float | None) -> float:
    return time.monotonic() if received_monotonic is None else received_monotonic


class FrameAge:
    """How old a frame is: by its header stamp against a clock (``stamp``), or since it arrived (``arrival``).

    ``now_ns`` is the node's ROS clock, which follows ``/clock`` when use_sim_time is set, so frames replayed from a
    bag with their recorded stamps are judged against the bag's time. A frame stamped zero (drivers that do not
    stamp) is judged by its arrival whatever the source.
    """

    def __init__(self, source: str = "stamp", now_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic):
        self.source = source
        self.now_ns = now_ns
        self.monotonic = monotonic

    def __call__(self, frame: Frame) -> tuple[float, str]:
        """(age in seconds, how it was judged, for messages)."""
        if self.source == "stamp" and (frame.stamp_sec or frame.stamp_nanosec):
            stamp_ns = frame.stamp_sec * 10**9 + frame.stamp_nanosec
            # A stamp slightly ahead of this clock (another machine's clock) is a fresh frame, not a negative age.
            return max(0.0, (self.now_ns() - stamp_ns) / 1e9), "by its header stamp"
        return self.monotonic() - frame.received_monotonic, "since it arrived"


class FrameStore:
    """Thread-safe recent frames per camera: the newest, and for ``frame_stamp`` follow-ups the last ``history``
    frames received and the last ``history`` frames answered about (:meth:`keep`). A follow-up names a frame an
    answer's image_header named, so those stay available for as many further answers of their camera, however fast
    the camera publishes; the received ones let a client name a frame it saw on the camera topic itself."""

    def __init__(self, history: int = 1) -> None:
        self.history = history
        self._lock = threading.Lock()
        self._received: dict[str, deque[Frame]] = {}
        self._kept: dict[str, deque[Frame]] = {}
        self._last_reported: dict[tuple[str, str], float] = {}

    def put(self, frame: Frame) -> None:
        with self._lock:
            self._received.setdefault(frame.camera_id, deque(maxlen=self.history)).append(frame)

    def latest(self, camera_id: str) -> Frame | None:
        with self._lock:
            frames = self._received.get(camera_id)
            return frames[-1] if frames else None

    def keep(self, frame: Frame) -> None:
        """Hold ``frame`` (answered about) for follow-ups after newer frames have pushed it out of the received
        ones."""
        with self._lock:
            kept = self._kept.setdefault(frame.camera_id, deque(maxlen=self.history))
            if frame not in kept:
                kept.append(frame)

    def find(self, camera_id: str, stamp_sec: int, stamp_nanosec: int) -> Frame | None:
        """The held frame of camera_id with this header stamp (the newest of them, should a driver repeat a stamp),
        or None when none is held."""
        with self._lock:
            held = [*self._kept.get(camera_id, ()), *self._received.get(camera_id, ())]
        matches = [f for f in held if (f.stamp_sec, f.stamp_nanosec) == (stamp_sec, stamp_nanosec)]
        return max(matches, key=lambda f: f.seq) if matches else None

    def held(self, camera_id: str) -> list[Frame]:
        """Every frame of camera_id held now, oldest first (for messages and tests)."""
        with self._lock:
            frames = {f.seq: f for f in (*self._kept.get(camera_id, ()), *self._received.get(camera_id, ()))}
        return [frames[seq] for seq in sorted(frames)]

    def cameras(self) -> list[str]:
        """Cameras that have delivered a frame, in order of their first frame."""
        with self._lock:
            return list(self._received)

    def report_due(self, camera_id: str, code: str, period_s: float, now: float | None = None) -> bool:
        """True when ``code`` was not reported for ``camera_id`` in the last ``period_s`` seconds (and records
        this report): a frame problem is logged again after a quiet period, never once per frame."""
        now = time.monotonic() if now is None else now
        key = (camera_id, code)
        with self._lock:
            last = self._last_reported.get(key)
            if last is not None and now - last < period_s:
                return False
            self._last_reported[key] = now
            return True
