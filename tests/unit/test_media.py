"""How images are written as PNG: losslessly, at zlib's fastest level (it is on the path a user
waits for; BENCHMARKS.md has the figures)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from chitrakar.media import png_bytes


def _zlib_header(png: bytes) -> bytes:
    """The first two bytes of the image data's zlib stream (its first IDAT chunk)."""
    at = 8  # past the signature
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind = png[at + 4 : at + 8]
        if kind == b"IDAT":
            return png[at + 8 : at + 10]
        at += 12 + length
    raise AssertionError("no IDAT chunk")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_an_image_comes_back_pixel_for_pixel(mode: str) -> None:
    rng = np.random.default_rng(7)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (48, 80, channels), dtype=np.uint8).squeeze()
    image = Image.fromarray(pixels, mode)
    with Image.open(io.BytesIO(png_bytes(image))) as decoded:
        assert decoded.format == "PNG"
        assert decoded.mode == mode
        assert np.array_equal(np.asarray(decoded), pixels)


def test_it_is_compressed_at_the_fastest_level() -> None:
    # zlib records the level class in its header (FLEVEL: 0 is the fastest levels, 2 the
    # default); Pillow's default would give 2.
    image = Image.effect_noise((64, 64), 40).convert("RGB")
    header = _zlib_header(png_bytes(image))
    assert header[0] & 0x0F == 8  # deflate
    assert header[1] >> 6 == 0
    default = io.BytesIO()
    image.save(default, format="PNG")
    assert _zlib_header(default.getvalue())[1] >> 6 == 2


def _image_data(png: bytes) -> bytes:
    """The decompressed image data: each row is its filter type's byte, then its bytes."""
    at, data = 8, b""
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        if png[at + 4 : at + 8] == b"IDAT":
            data += png[at + 8 : at + 8 + length]
        at += 12 + length
    return zlib.decompress(data)


def test_every_row_is_filtered_up() -> None:
    # One filter for every row, not a choice among five for each (Pillow's way, which made a
    # 1024x1024 result take 59 ms instead of 24).
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    data = _image_data(png_bytes(image))
    row = 1 + 80 * 3
    assert len(data) == 48 * row
    assert {data[i * row] for i in range(48)} == {2}  # PNG's "Up" filter


@pytest.mark.parametrize(
    ("mode", "stored_as"),
    [("P", "RGB"), ("LA", "RGBA"), ("CMYK", "RGB")],
)
def test_other_modes_are_stored_as_rgb_or_rgba(mode: str, stored_as: str) -> None:
    image = Image.new("RGB", (24, 16), (200, 120, 40)).convert(mode)
    with Image.open(io.BytesIO(png_bytes(image))) as decoded:
        assert (decoded.format, decoded.mode, decoded.size) == ("PNG", stored_as, (24, 16))


def test_a_16_bit_grey_image_comes_back_exactly() -> None:
    pixels = (np.arange(16 * 24, dtype=np.uint16).reshape(16, 24) * 170).astype(np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    with Image.open(io.BytesIO(png_bytes(image))) as decoded:
        assert decoded.mode == "I;16"
        assert np.array_equal(np.asarray(decoded), pixels)
