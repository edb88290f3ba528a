"""Camera intake: raw and compressed decoding, lazy frames and the newest-frame store."""
from __future__ import annotations

import array
import contextlib
import io
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mobilevlm_ros import camera
from mobilevlm_ros.camera import (BAD_FRAME, UNSUPPORTED_ENCODING, Frame, FrameAge, FrameError, FrameStore,
                                  decode_compressed_image, decode_raw_image)

REFERENCE_IMAGES = Path(__file__).parent / "data" / "reference" / "images"
HEIGHT, WIDTH = 6, 10


@pytest.fixture
def rgb_image() -> np.ndarray:
    """A small image with every channel varying, so a swapped or dropped channel shows."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def pack_rows(pixels: np.ndarray, padding: int) -> tuple[bytes, int]:
    """Raw message data for [H, W, C] uint8 pixels with ``padding`` junk bytes after each row; returns (data, step)."""
    height = pixels.shape[0]
    rows = pixels.reshape(height, -1)
    junk = np.full((height, padding), 0xAB, dtype=np.uint8)
    return np.concatenate([rows, junk], axis=1).tobytes(), rows.shape[1] + padding


@contextlib.contextmanager
def expect_frame_error(code: str, *fragments: str):
    """Expect a FrameError with ``code`` whose message contains every fragment."""
    with pytest.raises(FrameError) as info:
        yield info
    assert info.value.code == code, info.value
    for fragment in fragments:
        assert fragment in info.value.message, (fragment, info.value.message)


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.001)


# --- raw sensor_msgs/Image -------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [0, 7])
@pytest.mark.parametrize("encoding, to_wire", [
    ("rgb8", lambda rgb: rgb),
    ("bgr8", lambda rgb: rgb[:, :, ::-1]),
    ("rgba8", lambda rgb: np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])),
    ("bgra8", lambda rgb: np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 9, np.uint8)])),
])
def test_colour_encodings_decode_exactly(rgb_image, encoding, to_wire, padding):
    data, step = pack_rows(to_wire(rgb_image), padding)
    decoded = decode_raw_image(encoding, WIDTH, HEIGHT, step, False, data)
    assert decoded.dtype == np.uint8 and decoded.shape == (HEIGHT, WIDTH, 3)
    assert decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, rgb_image)


@pytest.mark.parametrize("as_buffer", [bytes, bytearray, memoryview, lambda b: array.array("B", b),
                                       lambda b: np.frombuffer(b, np.uint8)])
def test_raw_data_accepts_every_buffer_type(rgb_image, as_buffer):
    data, step = pack_rows(rgb_image, 3)
    decoded = decode_raw_image("rgb8", WIDTH, HEIGHT, step, 0, as_buffer(data))
    np.testing.assert_array_equal(decoded, rgb_image)


def test_raw_decode_does_not_alias_message_data(rgb_image):
    data = bytearray(rgb_image.tobytes())
    decoded = decode_raw_image("rgb8", WIDTH, HEIGHT, WIDTH * 3, False, data)
    assert decoded.flags.writeable and decoded.flags.owndata
    data[:] = bytes(len(data))
    np.testing.assert_array_equal(decoded, rgb_image)


def test_data_longer_than_needed_is_accepted(rgb_image):
    decoded = decode_raw_image("rgb8", WIDTH, HEIGHT, WIDTH * 3, False, rgb_image.tobytes() + b"\x00" * 5)
    np.testing.assert_array_equal(decoded, rgb_image)


@pytest.mark.parametrize("padding", [0, 7])
def test_mono8_is_grey(rgb_image, padding):
    grey = rgb_image[:, :, 1]
    data, step = pack_rows(grey[:, :, None], padding)
    decoded = decode_raw_image("mono8", WIDTH, HEIGHT, step, False, data)
    np.testing.assert_array_equal(decoded, np.dstack([grey] * 3))


@pytest.mark.parametrize("padding", [0, 7])
@pytest.mark.parametrize("is_bigendian, dtype", [(False, "<u2"), (True, ">u2"), (0, "<u2"), (1, ">u2")])
def test_mono16_keeps_high_byte_in_declared_byte_order(padding, is_bigendian, dtype):
    values = np.random.default_rng(3).integers(0, 65536, size=(HEIGHT, WIDTH), dtype=np.uint16)
    values[0, :4] = [0x00FF, 0x0100, 0xFF00, 0xFFFF]  # high/low bytes that differ, so a byte swap shows
    wire = values.astype(dtype).view(np.uint8).reshape(HEIGHT, WIDTH, 2)
    data, step = pack_rows(wire, padding)
    decoded = decode_raw_image("mono16", WIDTH, HEIGHT, step, is_bigendian, data)
    expected = (values >> 8).astype(np.uint8)
    np.testing.assert_array_equal(decoded, np.dstack([expected] * 3))
    assert list(decoded[0, :4, 0]) == [0x00, 0x01, 0xFF, 0xFF]


def rgb_to_yuv601(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT.601 limited range, the inverse of the decoder's formulas: per-pixel Y, U (Cb), V (Cr) as floats."""
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    y = 16 + 219 / 255 * luma
    u = 128 + 224 / 255 * (b - luma) / 1.772
    v = 128 + 224 / 255 * (r - luma) / 1.402
    return y, u, v


def pack_yuv422(rgb: np.ndarray, uyvy: bool, padding: int = 0) -> tuple[bytes, int]:
    """Packed 4:2:2 data for an RGB image; chroma is the mean of each horizontal pixel pair."""
    y, u, v = rgb_to_yuv601(rgb)
    y = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    u = np.clip(np.rint((u[:, 0::2] + u[:, 1::2]) / 2), 0, 255).astype(np.uint8)
    v = np.clip(np.rint((v[:, 0::2] + v[:, 1::2]) / 2), 0, 255).astype(np.uint8)
    y0, y1 = y[:, 0::2], y[:, 1::2]
    quads = np.stack([u, y0, v, y1] if uyvy else [y0, u, y1, v], axis=-1)
    return pack_rows(quads.reshape(rgb.shape[0], rgb.shape[1], 2), padding)


@pytest.mark.parametrize("padding", [0, 7])
@pytest.mark.parametrize("encoding, uyvy", [("yuv422", True), ("uyvy", True), ("yuv422_yuy2", False),
                                            ("yuyv", False)])
def test_yuv422_round_trip(rgb_image, encoding, uyvy, padding):
    # Pixel pairs share their chroma, so give each pair one colour but keep distinct luma across pairs.
    paired = np.repeat(rgb_image[:, ::2], 2, axis=1)
    data, step = pack_yuv422(paired, uyvy, padding)
    decoded = decode_raw_image(encoding, WIDTH, HEIGHT, step, False, data)
    assert decoded.shape == (HEIGHT, WIDTH, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - paired.astype(int)).max() <= 3


@pytest.mark.parametrize("encoding, uyvy", [("uyvy", True), ("yuyv", False)])
def test_yuv422_keeps_each_pixels_own_luma(encoding, uyvy):
    grey_ramp = np.repeat(np.linspace(0, 255, WIDTH, dtype=np.uint8)[None, :, None], 3, axis=2)
    grey_ramp = np.ascontiguousarray(np.repeat(grey_ramp, 2, axis=0))
    data, step = pack_yuv422(grey_ramp, uyvy)
    decoded = decode_raw_image(encoding, WIDTH, 2, step, False, data)
    assert np.abs(decoded.astype(int) - grey_ramp.astype(int)).max() <= 2


@pytest.mark.parametrize("y, u, v, expected_rgb", [
    (16, 128, 128, (0, 0, 0)),          # limited-range black
    (235, 128, 128, (255, 255, 255)),   # limited-range white
    (126, 128, 128, (128, 128, 128)),   # mid grey: 1.164383 * 110 = 128.08
    (82, 90, 240, (255, 0, 0)),         # BT.601 studio-range red
    (145, 54, 34, (0, 255, 0)),         # green
    (41, 240, 110, (0, 0, 255)),        # blue
])
def test_yuv422_uses_bt601_limited_range(y, u, v, expected_rgb):
    decoded = decode_raw_image("uyvy", 2, 1, 4, False, bytes([u, y, v, y]))
    assert np.abs(decoded.astype(int) - np.array(expected_rgb)).max() <= 2, decoded[0, 0]


@pytest.mark.parametrize("encoding", ["32FC1", "16UC1", "bayer_rggb8", "rgb16", "nv21", "RGB8", ""])
def test_unsupported_raw_encodings(encoding):
    with expect_frame_error(UNSUPPORTED_ENCODING, repr(encoding), "rgb8"):
        decode_raw_image(encoding, 2, 2, 8, False, bytes(16))


@pytest.mark.parametrize("width, height", [(0, 4), (4, 0), (-2, 4), (4, -1)])
def test_empty_or_negative_size_is_bad_frame(width, height):
    with expect_frame_error(BAD_FRAME, f"{width}x{height}"):
        decode_raw_image("rgb8", width, height, 12, False, bytes(48))


def test_step_smaller_than_row_is_bad_frame():
    with expect_frame_error(BAD_FRAME, "step 29", "width 10", "3 bytes per pixel", "30"):
        decode_raw_image("rgb8", 10, 2, 29, False, bytes(60))


def test_short_data_is_bad_frame_naming_expected_and_got():
    with expect_frame_error(BAD_FRAME, "wrong data length", "37", "height 4", "148", "147"):
        decode_raw_image("rgb8", 12, 4, 37, False, bytes(147))


@pytest.mark.parametrize("encoding", ["yuv422", "uyvy", "yuv422_yuy2", "yuyv"])
def test_odd_width_yuv422_is_bad_frame(encoding):
    with expect_frame_error(BAD_FRAME, encoding, "even", "got 5"):
        decode_raw_image(encoding, 5, 2, 10, False, bytes(20))


def test_odd_width_mono16_is_fine():
    decoded = decode_raw_image("mono16", 3, 1, 6, True, bytes([1, 0, 2, 0, 3, 0]))
    assert list(decoded[0, :, 0]) == [1, 2, 3]


# --- sensor_msgs/CompressedImage ---------------------------------------------------------------------------------


def encode(image: Image.Image, codec: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, codec, **options)
    return buffer.getvalue()


@pytest.fixture
def photo_like() -> np.ndarray:
    """A smooth image (JPEG handles it well) large enough for JPEG's 8x8 blocks and a multi-chunk decode."""
    yy, xx = np.mgrid[0:96, 0:128]
    return np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1).clip(0, 255).astype(np.uint8)


@pytest.fixture
def jpeg_bytes(photo_like) -> bytes:
    return encode(Image.fromarray(photo_like), "JPEG", quality=90)


def test_png_rgb_round_trip_is_exact(rgb_image):
    decoded = decode_compressed_image("png", encode(Image.fromarray(rgb_image), "PNG"))
    assert decoded.dtype == np.uint8 and decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, rgb_image)


def test_jpeg_round_trip_is_close(photo_like, jpeg_bytes):
    decoded = decode_compressed_image("jpeg", jpeg_bytes)
    assert decoded.shape == photo_like.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - photo_like.astype(int)).mean() < 2.0


def test_codec_is_sniffed_not_taken_from_format(rgb_image):
    png = encode(Image.fromarray(rgb_image), "PNG")
    np.testing.assert_array_equal(decode_compressed_image("rgb8; jpeg compressed bgr8", png), rgb_image)


@pytest.mark.parametrize("as_buffer", [bytearray, memoryview, lambda b: array.array("B", b),
                                       lambda b: np.frombuffer(b, np.uint8)])
def test_compressed_data_accepts_every_buffer_type(rgb_image, as_buffer):
    png = encode(Image.fromarray(rgb_image), "PNG")
    np.testing.assert_array_equal(decode_compressed_image("png", as_buffer(png)), rgb_image)


def test_png_grey_l(rgb_image):
    grey = rgb_image[:, :, 0]
    decoded = decode_compressed_image("png", encode(Image.fromarray(grey, "L"), "PNG"))
    np.testing.assert_array_equal(decoded, np.dstack([grey] * 3))


def test_png_rgba_drops_alpha(rgb_image):
    rgba = np.dstack([rgb_image, np.arange(HEIGHT * WIDTH, dtype=np.uint8).reshape(HEIGHT, WIDTH)])
    decoded = decode_compressed_image("png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(decoded, rgb_image)


def test_png_grey_with_alpha_la(rgb_image):
    la = np.dstack([rgb_image[:, :, 2], rgb_image[:, :, 0]])
    decoded = decode_compressed_image("png", encode(Image.fromarray(la, "LA"), "PNG"))
    np.testing.assert_array_equal(decoded, np.dstack([la[:, :, 0]] * 3))


def test_png_palette_is_expanded(rgb_image):
    palette_image = Image.fromarray(rgb_image).quantize(colors=16)
    assert palette_image.mode == "P"
    decoded = decode_compressed_image("png", encode(palette_image, "PNG"))
    np.testing.assert_array_equal(decoded, np.asarray(palette_image.convert("RGB")))


def test_png_16_bit_grey_is_scaled_not_clipped():
    values = np.random.default_rng(5).integers(0, 65536, size=(HEIGHT, WIDTH), dtype=np.uint16)
    values[0, :3] = [255, 256, 65535]
    png = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    decoded = decode_compressed_image("png", png)
    np.testing.assert_array_equal(decoded, np.dstack([(values >> 8).astype(np.uint8)] * 3))
    assert list(decoded[0, :3, 0]) == [0, 1, 255]


@pytest.mark.parametrize("name", ["img0_street_500x300_rgb.png", "img1_robot_240x420_rgba.png",
                                  "img2_sign_237x151_gray.png", "demo.jpg"])
def test_reference_images_match_pillow(name):
    data = (REFERENCE_IMAGES / name).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(decode_compressed_image(name.rsplit(".", 1)[1], data), expected)


def test_truncated_jpeg_is_bad_frame(jpeg_bytes):
    with expect_frame_error(BAD_FRAME, "JPEG", "'jpeg'", "truncated", str(len(jpeg_bytes) // 2)):
        decode_compressed_image("jpeg", jpeg_bytes[:len(jpeg_bytes) // 2])


def test_jpeg_missing_only_its_end_is_bad_frame(jpeg_bytes):
    with expect_frame_error(BAD_FRAME, "truncated"):
        decode_compressed_image("jpeg", jpeg_bytes[:-2])


def test_jpeg_with_garbage_in_the_middle_is_bad_frame(jpeg_bytes):
    middle = len(jpeg_bytes) // 2
    garbage = np.random.default_rng(11).integers(0, 256, 200, dtype=np.uint8).tobytes()
    corrupt = jpeg_bytes[:middle] + garbage + jpeg_bytes[middle + 200:]
    with expect_frame_error(BAD_FRAME, "JPEG"):
        decode_compressed_image("jpeg", corrupt)


def test_jpeg_with_destroyed_header_is_bad_frame(jpeg_bytes):
    with expect_frame_error(BAD_FRAME, "JPEG", "corrupt header"):
        decode_compressed_image("jpeg", jpeg_bytes[:20] + bytes(200) + jpeg_bytes[220:])


def test_truncated_png_is_bad_frame(photo_like):
    png = encode(Image.fromarray(photo_like), "PNG")
    with expect_frame_error(BAD_FRAME, "PNG", "128x96"):
        decode_compressed_image("png", png[:len(png) // 2])


def test_png_with_bad_checksum_is_bad_frame(photo_like):
    png = bytearray(encode(Image.fromarray(photo_like), "PNG"))
    idat = png.index(b"IDAT")
    png[idat + 10] ^= 0xFF
    with expect_frame_error(BAD_FRAME, "PNG"):
        decode_compressed_image("png", bytes(png))


def test_random_bytes_are_bad_frame():
    noise = np.random.default_rng(2).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    noise = b"\x13" + noise[1:]  # make sure no magic number matches by chance
    with expect_frame_error(BAD_FRAME, "neither JPEG nor PNG", "1000 bytes", "13"):
        decode_compressed_image("jpeg", noise)


def test_empty_compressed_data_is_bad_frame():
    with expect_frame_error(BAD_FRAME, "no data", "'jpeg'"):
        decode_compressed_image("jpeg", b"")


@pytest.mark.parametrize("codec, name", [("TIFF", "TIFF"), ("GIF", "GIF"), ("BMP", "BMP"), ("WEBP", "WebP")])
def test_other_image_formats_are_unsupported(rgb_image, codec, name):
    try:
        data = encode(Image.fromarray(rgb_image), codec)
    except (KeyError, OSError):
        pytest.skip(f"this Pillow cannot write {codec}")
    with expect_frame_error(UNSUPPORTED_ENCODING, name, "JPEG and PNG"):
        decode_compressed_image(codec.lower(), data)


def test_compressed_depth_is_unsupported(rgb_image):
    # compressed_depth_image_transport: a 12-byte depth header followed by a 16-bit PNG.
    data = bytes(12) + encode(Image.fromarray(rgb_image), "PNG")
    with expect_frame_error(UNSUPPORTED_ENCODING, "16UC1; compressedDepth png", "depth"):
        decode_compressed_image("16UC1; compressedDepth png", data)


def test_image_over_size_limit_is_refused_before_decoding():
    wide = encode(Image.new("L", (camera.MAX_COMPRESSED_SIDE + 1, 2)), "PNG")
    with expect_frame_error(BAD_FRAME, f"{camera.MAX_COMPRESSED_SIDE + 1}x2", "8192x8192"):
        decode_compressed_image("png", wide)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_decompression_bomb_header_is_bad_frame():
    # A tiny file whose header claims 100000 x 100000 pixels: refused from the header, globals untouched.
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    with expect_frame_error(BAD_FRAME, "too large"):
        decode_compressed_image("png", bomb)
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- Frame: lazy, decoded once --------------------------------------------------------------------------------


def make_frame(decoder, camera_id: str = "front", seq: int = 0, received: float = 100.0,
               stamp: tuple[int, int] = (1, 500_000_000)) -> Frame:
    return Frame(camera_id=camera_id, seq=seq, stamp_sec=stamp[0], stamp_nanosec=stamp[1], frame_id="cam_link",
                 encoding="rgb8", received_monotonic=received, decoder=decoder)


class CountingDecoder:
    def __init__(self, result: np.ndarray | None = None, error: FrameError | None = None):
        self.calls = 0
        self._result = result
        self._error = error

    def __call__(self) -> np.ndarray:
        self.calls += 1
        if self._error is not None:
            raise self._error
        return self._result.copy()


def test_frame_decodes_lazily_and_once(rgb_image):
    decoder = CountingDecoder(rgb_image)
    frame = make_frame(decoder)
    assert decoder.calls == 0
    first = frame.rgb()
    second = frame.rgb()
    assert decoder.calls == 1 and first is second
    np.testing.assert_array_equal(first, rgb_image)
    assert not first.flags.writeable  # shared by every request: nobody may modify it


def _inside(thread: threading.Thread, code) -> bool:
    """Whether ``thread`` is running ``code`` now (anywhere in its stack, e.g. blocked on a lock inside it)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None


def test_frame_decodes_once_under_concurrent_requests(rgb_image):
    """Four threads ask one frame for its pixels at once. The decoder holds the first caller until the other three
    are inside Frame.rgb as well (waiting for the decode, or decoding themselves: the mistake this test catches), so
    every request overlaps the decode whatever the scheduling: one decode, one shared array."""
    threads: list[threading.Thread] = []
    returned: set[threading.Thread] = set()
    calls = []

    def holding_decoder() -> np.ndarray:
        calls.append(threading.current_thread())
        others = [t for t in threads if t is not threading.current_thread()]
        wait_for(lambda: all(t in returned or _inside(t, Frame.rgb.__code__) for t in others),
                 "the other requests inside Frame.rgb")
        return rgb_image.copy()

    frame = make_frame(holding_decoder)
    start = threading.Barrier(4)
    results = []

    def request():
        start.wait(60)
        try:
            results.append(frame.rgb())
        finally:
            returned.add(threading.current_thread())

    threads.extend(threading.Thread(target=request) for _ in range(4))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert len(calls) == 1
    assert len(results) == 4 and all(result is results[0] for result in results)


def test_frame_decode_error_is_cached():
    decoder = CountingDecoder(error=FrameError(BAD_FRAME, "broken"))
    frame = make_frame(decoder)
    for _ in range(2):
        with expect_frame_error(BAD_FRAME, "broken"):
            frame.rgb()
    assert decoder.calls == 1


def test_frame_is_immutable(rgb_image):
    frame = make_frame(CountingDecoder(rgb_image))
    with pytest.raises(AttributeError):
        frame.seq = 5


def test_frame_from_raw_keeps_header_and_decodes_on_demand(rgb_image):
    data, step = pack_rows(rgb_image[:, :, ::-1], 7)
    before = time.monotonic()
    frame = Frame.from_raw(camera_id="left", seq=3, stamp_sec=1700000000, stamp_nanosec=5, frame_id="left_optical",
                           encoding="bgr8", width=WIDTH, height=HEIGHT, step=step, is_bigendian=0,
                           data=array.array("B", data))
    assert before <= frame.received_monotonic <= time.monotonic()
    assert (frame.camera_id, frame.seq, frame.stamp_sec, frame.stamp_nanosec, frame.frame_id, frame.encoding) == \
        ("left", 3, 1700000000, 5, "left_optical", "bgr8")
    np.testing.assert_array_equal(frame.rgb(), rgb_image)


def test_frame_from_raw_reports_errors_only_when_decoded():
    frame = Frame.from_raw(camera_id="depth", seq=0, stamp_sec=0, stamp_nanosec=0, frame_id="", encoding="32FC1",
                           width=2, height=2, step=8, is_bigendian=False, data=bytes(16), received_monotonic=5.0)
    assert frame.received_monotonic == 5.0
    with expect_frame_error(UNSUPPORTED_ENCODING, "32FC1"):
        frame.rgb()


def test_frame_from_compressed(rgb_image):
    png = encode(Image.fromarray(rgb_image), "PNG")
    frame = Frame.from_compressed(camera_id="front", seq=1, stamp_sec=2, stamp_nanosec=3, frame_id="f",
                                  format="png", data=png, received_monotonic=7.5)
    assert frame.encoding == "png" and frame.received_monotonic == 7.5
    np.testing.assert_array_equal(frame.rgb(), rgb_image)


# --- FrameStore --------------------------------------------------------------------------------------------------


def test_store_keeps_only_the_newest_frame_per_camera(rgb_image):
    store = FrameStore()
    assert store.latest("front") is None and store.cameras() == []
    first, second = make_frame(CountingDecoder(rgb_image), seq=1), make_frame(CountingDecoder(rgb_image), seq=2)
    other = make_frame(CountingDecoder(rgb_image), camera_id="rear", seq=1)
    store.put(first)
    store.put(other)
    store.put(second)
    assert store.latest("front") is second
    assert store.latest("rear") is other
    assert store.cameras() == ["front", "rear"]


def test_store_holds_recent_and_answered_frames_for_named_requests(rgb_image):
    """With a history of 2: the last 2 received frames of each camera and the last 2 kept (answered about) ones are
    found by their stamp; a kept frame outlives newer frames; a repeated stamp finds the newest of its frames."""
    store = FrameStore(history=2)
    frames = [make_frame(CountingDecoder(rgb_image), seq=seq, stamp=(10, seq)) for seq in range(5)]
    for frame in frames[:3]:
        store.put(frame)
    assert store.find("front", 10, 0) is None and store.find("front", 10, 1) is frames[1]
    assert store.find("rear", 10, 1) is None
    store.keep(frames[1])
    store.keep(frames[1])  # kept once
    for frame in frames[3:]:
        store.put(frame)
    assert store.latest("front") is frames[4]
    assert store.find("front", 10, 1) is frames[1] and store.find("front", 10, 2) is None
    assert [f.seq for f in store.held("front")] == [1, 3, 4]
    for frame in frames[2:4]:
        store.keep(frame)  # 1 falls out of the kept ones
    assert store.find("front", 10, 1) is None and [f.seq for f in store.held("front")] == [2, 3, 4]
    repeated = make_frame(CountingDecoder(rgb_image), seq=9, stamp=(10, 3))
    store.put(repeated)
    assert store.find("front", 10, 3) is repeated


def test_store_put_does_not_decode(rgb_image):
    decoder = CountingDecoder(rgb_image)
    store = FrameStore()
    store.put(make_frame(decoder))
    assert decoder.calls == 0


def test_frame_age_by_stamp_or_arrival(rgb_image):
    """By its header stamp against the clock (a late delivery is old); by arrival when asked, or when the frame
    carries no stamp (drivers that do not stamp)."""
    frame = make_frame(CountingDecoder(rgb_image), received=100.0)  # stamped 1.5 s (see make_frame)
    stamped = FrameAge("stamp", now_ns=lambda: 4 * 10**9, monotonic=lambda: 100.25)
    assert stamped(frame) == (pytest.approx(2.5), "by its header stamp")
    assert FrameAge("arrival", now_ns=lambda: 4 * 10**9, monotonic=lambda: 100.25)(frame) == (
        pytest.approx(0.25), "since it arrived")
    unstamped = make_frame(CountingDecoder(rgb_image), received=100.0, stamp=(0, 0))
    assert stamped(unstamped) == (pytest.approx(0.25), "since it arrived")
    ahead = FrameAge("stamp", now_ns=lambda: 10**9, monotonic=lambda: 100.25)  # the camera's clock runs ahead
    assert ahead(frame) == (0.0, "by its header stamp")


def test_frame_errors_are_reported_again_after_a_quiet_period():
    """Per camera and error: once per period, so a fault that comes back after a recovery is logged again."""
    store = FrameStore()
    assert store.report_due("front", UNSUPPORTED_ENCODING, 10.0, now=0.0) is True
    assert store.report_due("front", UNSUPPORTED_ENCODING, 10.0, now=9.9) is False
    assert store.report_due("front", BAD_FRAME, 10.0, now=9.9) is True
    assert store.report_due("rear", UNSUPPORTED_ENCODING, 10.0, now=9.9) is True
    assert store.report_due("front", UNSUPPORTED_ENCODING, 10.0, now=10.0) is True


def test_concurrent_put_and_latest(rgb_image):
    store = FrameStore()
    cameras = ["front", "rear"]
    frames_per_camera = 2000
    decoder = CountingDecoder(rgb_image)
    problems = []
    done = threading.Event()

    def publish(camera_id):
        for seq in range(frames_per_camera):
            store.put(make_frame(decoder, camera_id=camera_id, seq=seq))

    def read():
        last_seen = {camera_id: -1 for camera_id in cameras}
        while not done.is_set():
            for camera_id in cameras:
                frame = store.latest(camera_id)
                if frame is None:
                    continue
                if frame.camera_id != camera_id or frame.seq < last_seen[camera_id]:
                    problems.append((camera_id, frame.camera_id, frame.seq, last_seen[camera_id]))
                last_seen[camera_id] = frame.seq

    readers = [threading.Thread(target=read) for _ in range(2)]
    publishers = [threading.Thread(target=publish, args=(camera_id,)) for camera_id in cameras]
    try:
        for thread in readers + publishers:
            thread.start()
        for thread in publishers:
            thread.join(60)
    finally:
        done.set()  # the readers' loop ends whatever happened to the publishers
    for thread in readers:
        thread.join(60)
    assert not any(thread.is_alive() for thread in readers + publishers)
    assert problems == []
    assert sorted(store.cameras()) == cameras
    assert all(store.latest(camera_id).seq == frames_per_camera - 1 for camera_id in cameras)
    assert decoder.calls == 0
