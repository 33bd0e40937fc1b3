"""Selfie checks at the edge: which bytes are refused and why, and finding the one face in a real
photograph (scikit-image's astronaut, Eileen Collins) but none in its cat."""

from __future__ import annotations

import io
import random
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageFile
from skimage import data as samples

from chitrakar import photos
from chitrakar.domain import CommandError
from chitrakar.photos import (
    ALLOWED_FORMATS,
    MAX_DOWNLOAD_BYTES,
    MAX_PIXELS,
    FaceBox,
    PhotoRejected,
    align_face,
    check_declared_size,
    decode_photo,
    eye_angle,
    find_faces,
    find_single_face,
    prepare_selfie,
)

# --- sample images -------------------------------------------------------------------------------


def _sample(load: object) -> npt.NDArray[np.uint8]:
    """A scikit-image sample photograph (its loaders are not annotated)."""
    return np.asarray(cast(Callable[[], object], load)(), dtype=np.uint8)


@cache
def astronaut() -> Image.Image:
    return Image.fromarray(_sample(samples.astronaut))


@cache
def cat() -> Image.Image:
    return Image.fromarray(_sample(samples.chelsea))


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@cache
def astronaut_jpeg() -> bytes:
    return encoded(astronaut(), "JPEG", quality=92)


def plain(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    return encoded(Image.new("RGB", size, (200, 180, 160)), fmt)


def animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (200, 200), colour) for colour in ("red", "blue")]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@cache
def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real 1-bit PNG of width x height black pixels: a few dozen KB on disk, 400 MP (over
    1 GB as RGB) once decoded."""
    row = b"\0" * (1 + (width + 7) // 8)  # the filter byte, then the packed pixels
    squeeze = zlib.compressobj(9)
    rows_at_once = 500
    body = b"".join(squeeze.compress(row * rows_at_once) for _ in range(height // rows_at_once))
    body += squeeze.compress(row * (height % rows_at_once)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )


def corrupt_png() -> bytes:
    """A PNG whose header is fine but whose pixel data is not zlib at all."""
    header = struct.pack(">IIBBBBB", 300, 300, 8, 2, 0, 0, 0)
    junk = random.Random(7).randbytes(4000)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", junk)
        + _chunk(b"IEND", b"")
    )


def rejection(action: Callable[[], object]) -> PhotoRejected:
    with pytest.raises(PhotoRejected) as caught:
        action()
    return caught.value


# --- refusals --------------------------------------------------------------------------------


def _decoding(make: Callable[[], bytes]) -> Callable[[], object]:
    return lambda: decode_photo(make())


BAD_INPUTS: list[tuple[str, Callable[[], object], str, dict[str, int]]] = [
    (
        "over 20 MB",
        _decoding(lambda: astronaut_jpeg() + b"\0" * MAX_DOWNLOAD_BYTES),
        "photo.too_large",
        {"limit_mb": 20},
    ),
    (
        "declared over 20 MB",
        lambda: check_declared_size(25 * 1024 * 1024),
        "photo.too_large",
        {"limit_mb": 20},
    ),
    (
        "decompression bomb",
        _decoding(png_bomb),
        "photo.too_many_pixels",
        {"limit_mp": 40},
    ),
    (
        "48 MP header",
        _decoding(lambda: png_bomb(8000, 6000)),
        "photo.too_many_pixels",
        {"limit_mp": 40},
    ),
    ("random bytes", _decoding(lambda: random.Random(1).randbytes(5000)), "photo.not_an_image", {}),
    ("empty", _decoding(lambda: b""), "photo.not_an_image", {}),
    (
        "pdf",
        _decoding(lambda: b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n"),
        "photo.not_an_image",
        {},
    ),
    (
        "text",
        _decoding(lambda: b"Hello, this is my selfie!\n" * 50),
        "photo.not_an_image",
        {},
    ),
    ("tiff", _decoding(lambda: plain((300, 300), "TIFF")), "photo.not_an_image", {}),
    ("still gif", _decoding(lambda: plain((300, 300), "GIF")), "photo.not_an_image", {}),
    (
        "truncated jpeg",
        _decoding(lambda: astronaut_jpeg()[: len(astronaut_jpeg()) // 2]),
        "photo.damaged",
        {},
    ),
    ("corrupt png", _decoding(corrupt_png), "photo.damaged", {}),
    ("animated gif", _decoding(lambda: animation("GIF")), "photo.animated", {}),
    ("animated webp", _decoding(lambda: animation("WEBP")), "photo.animated", {}),
    ("animated png", _decoding(lambda: animation("PNG")), "photo.animated", {}),
    ("heif sequence", _decoding(lambda: animation("HEIF")), "photo.animated", {}),
    ("2000x300", _decoding(lambda: plain((2000, 300))), "photo.bad_shape", {"ratio": 4}),
    (
        "300x2000 jpeg",
        _decoding(lambda: plain((300, 2000), "JPEG")),
        "photo.bad_shape",
        {"ratio": 4},
    ),
    ("100x100", _decoding(lambda: plain((100, 100))), "photo.too_small", {"min_side": 128}),
    ("500x127", _decoding(lambda: plain((500, 127))), "photo.too_small", {"min_side": 128}),
]


@pytest.mark.parametrize(
    ("action", "key", "params"),
    [row[1:] for row in BAD_INPUTS],
    ids=[row[0] for row in BAD_INPUTS],
)
def test_a_bad_photo_is_refused_with_its_reason(
    action: Callable[[], object], key: str, params: dict[str, int]
) -> None:
    refused = rejection(action)
    assert isinstance(refused, CommandError)
    assert (refused.key, refused.params) == (key, params)


def test_an_unknown_or_allowed_declared_size_passes() -> None:
    check_declared_size(None)
    check_declared_size(MAX_DOWNLOAD_BYTES)
    assert rejection(lambda: check_declared_size(MAX_DOWNLOAD_BYTES + 1)).key == "photo.too_large"


@pytest.mark.parametrize("pillow_guard", ["on", "off"])
def test_a_bomb_is_refused_from_its_header_without_decoding(
    monkeypatch: pytest.MonkeyPatch, pillow_guard: str
) -> None:
    bomb = png_bomb()
    assert len(bomb) < 200_000
    if pillow_guard == "off":  # our own header check holds even without Pillow's
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    started = time.perf_counter()
    refused = rejection(lambda: decode_photo(bomb))
    assert time.perf_counter() - started < 1.0
    assert refused.key == "photo.too_many_pixels"


def test_pillow_guards_are_set() -> None:
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS <= MAX_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- photos that decode --------------------------------------------------------------------


def test_the_allowed_formats_include_iphone_photos() -> None:
    assert {"JPEG", "PNG", "WEBP", "HEIF"} <= set(ALLOWED_FORMATS)


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_a_good_photo_decodes_to_rgb(fmt: str) -> None:
    options: dict[str, Any] = {"quality": 90} if fmt in ("JPEG", "WEBP", "HEIF", "AVIF") else {}
    decoded = decode_photo(encoded(astronaut(), fmt, **options))
    assert decoded.mode == "RGB"
    assert decoded.size == astronaut().size
    difference = np.abs(np.asarray(decoded, dtype=np.int16) - np.asarray(astronaut()))
    assert difference.mean() < 8


def test_a_jpeg_with_more_pictures_is_its_first_picture_not_an_animation() -> None:
    # Cameras add a preview, phones an HDR gain map; Pillow calls such a JPEG "MPO".
    preview = Image.new("RGB", (160, 120), (0, 0, 255))
    stored = encoded(astronaut(), "MPO", save_all=True, append_images=[preview], quality=92)
    assert Image.open(io.BytesIO(stored)).format == "MPO"
    decoded = decode_photo(stored)
    assert decoded.size == astronaut().size
    difference = np.abs(np.asarray(decoded, dtype=np.int16) - np.asarray(astronaut()))
    assert difference.mean() < 8


def test_an_exif_rotated_jpeg_comes_back_upright() -> None:
    upright = astronaut().crop((80, 0, 432, 480))  # 352 wide, 480 tall, her face in it
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # the camera's sensor, on its side
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show
    decoded = decode_photo(encoded(stored, "JPEG", quality=92, exif=exif.tobytes()))
    assert stored.size == (480, 352)
    assert decoded.size == (352, 480)
    difference = np.abs(np.asarray(decoded, dtype=np.int16) - np.asarray(upright, dtype=np.int16))
    assert difference.mean() < 8
    find_single_face(decoded)  # a face on its side is not found


def test_transparency_becomes_white_and_other_modes_become_rgb() -> None:
    clear = Image.new("RGBA", (200, 200), (255, 0, 0, 0))
    assert decode_photo(encoded(clear, "PNG")).getpixel((5, 5)) == (255, 255, 255)

    levels = np.full((200, 200), 40_000, dtype=np.uint16)  # 16-bit greyscale
    grey = decode_photo(encoded(Image.fromarray(levels), "PNG"))
    assert grey.mode == "RGB"
    assert grey.getpixel((5, 5)) == (156, 156, 156)

    cmyk = decode_photo(encoded(Image.new("CMYK", (200, 200), (0, 0, 0, 0)), "JPEG"))
    assert cmyk.mode == "RGB"

    palette = decode_photo(encoded(astronaut().convert("P"), "PNG"))
    assert palette.mode == "RGB"


# --- faces ---------------------------------------------------------------------------------


def test_the_astronaut_has_one_face_where_her_face_is() -> None:
    face = find_single_face(astronaut())
    # Her face (brows to chin) lies about x 180..270, y 75..165 of the 512 x 512 photo.
    cx, cy = face.centre
    assert 200 <= cx <= 250
    assert 95 <= cy <= 145
    assert 70 <= face.width <= 140
    assert face.width == face.height


def test_the_cat_has_no_face() -> None:
    assert rejection(lambda: find_single_face(cat())).key == "photo.no_face"


def _two_astronauts(first_scale: float, second_scale: float) -> Image.Image:
    """Her head (190 x 220, the face about 93 px) pasted twice onto a grey 900 x 500 canvas."""
    head = astronaut().crop((130, 10, 320, 230))
    canvas = Image.new("RGB", (900, 500), (128, 128, 128))
    for scale, left in ((first_scale, 40), (second_scale, 500)):
        size = (round(head.width * scale), round(head.height * scale))
        canvas.paste(head.resize(size, Image.Resampling.LANCZOS), (left, 80))
    return canvas


def test_two_faces_are_too_many() -> None:
    refused = rejection(lambda: find_single_face(_two_astronauts(1.0, 1.0)))
    assert (refused.key, refused.params) == ("photo.many_faces", {"count": 2})


def test_a_much_smaller_face_in_the_background_does_not_count() -> None:
    image = _two_astronauts(1.5, 0.6)  # faces of about 140 and 56 px
    faces = find_faces(image)
    assert len(faces) == 2
    assert find_single_face(image) == faces[0]
    assert faces[0].x < 450  # the large one, on the left


def test_faces_in_a_large_photo_come_back_in_its_own_pixels() -> None:
    big = astronaut().resize((2048, 2048), Image.Resampling.BICUBIC)
    small_face, big_face = find_single_face(astronaut()), find_single_face(big)
    for small_value, big_value in zip(
        (*small_face.centre, small_face.width), (*big_face.centre, big_face.width), strict=True
    ):
        assert big_value == pytest.approx(4 * small_value, rel=0.1)


def test_faces_are_found_from_several_threads_at_once() -> None:
    # Callers run detection in worker threads; one OpenCV cascade must not run twice at once.
    expected = find_faces(astronaut())
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: find_faces(astronaut()), range(8)))
    assert results == [expected] * 8


def test_overlapping_detections_are_one_face() -> None:
    merged = photos._merge_overlapping(
        [FaceBox(10, 10, 50, 50), FaceBox(100, 100, 80, 80), FaceBox(110, 105, 60, 60)]
    )
    assert merged == [FaceBox(100, 100, 80, 80), FaceBox(10, 10, 50, 50)]


# --- alignment -----------------------------------------------------------------------------


def test_prepare_selfie_gives_a_square_around_the_face() -> None:
    square = prepare_selfie(astronaut_jpeg(), 256)
    assert (square.size, square.mode) == ((256, 256), "RGB")
    face = find_single_face(square)
    cx, cy = face.centre
    # The face box is 1 / 1.8 of the square, a little below its centre.
    assert face.width == pytest.approx(256 / 1.8, rel=0.2)
    assert cx == pytest.approx(128, abs=20)
    assert 120 <= cy <= 165


@pytest.mark.parametrize("turn", [-15, 15])
def test_a_tilted_face_is_levelled(turn: int) -> None:
    level = eye_angle(astronaut(), find_single_face(astronaut()))
    assert level is not None
    assert abs(level) < 6  # she holds her head nearly level

    # Pillow turns counter-clockwise: the eye line then turns clockwise by -turn.
    tilted = astronaut().rotate(turn, resample=Image.Resampling.BICUBIC)
    face = find_single_face(tilted)
    tilt = eye_angle(tilted, face)
    assert tilt is not None
    assert tilt == pytest.approx(level - turn, abs=4)

    aligned = align_face(tilted, face, 256)
    left = eye_angle(aligned, find_single_face(aligned))
    assert left is not None
    assert abs(left) < 3  # a no-op would leave about 15 degrees


def test_the_turn_is_clamped_and_skipped_without_eyes(monkeypatch: pytest.MonkeyPatch) -> None:
    image, face = astronaut(), find_single_face(astronaut())

    def aligned_at(angle: float | None) -> Any:
        monkeypatch.setattr(photos, "eye_angle", lambda image, face: angle)
        return np.asarray(align_face(image, face, 64), dtype=np.int16)

    assert np.array_equal(aligned_at(45.0), aligned_at(30.0))
    assert not np.array_equal(aligned_at(30.0), aligned_at(None))
    assert np.array_equal(aligned_at(None), aligned_at(0.0))


def test_a_blank_face_box_has_no_eyes() -> None:
    blank = Image.new("RGB", (400, 400), (120, 110, 100))
    assert eye_angle(blank, FaceBox(100, 100, 150, 150)) is None
    assert align_face(blank, FaceBox(100, 100, 150, 150), 96).size == (96, 96)


def test_a_square_past_the_photo_edge_is_filled_from_the_photo() -> None:
    # Her face near the top-left corner: the square reaches past two edges.
    corner = astronaut().crop((150, 40, 450, 400))
    face = find_single_face(corner)
    assert face.x < 60
    assert face.y < 60
    square = np.asarray(align_face(corner, face, 128), dtype=np.int16)
    assert square.shape == (128, 128, 3)
    # No black band where the photo ends: the edge rows and columns look like the photo.
    assert square[0].mean() > 60
    assert square[:, 0].mean() > 60


def test_align_face_upscales_a_small_face() -> None:
    small = astronaut().resize((256, 256), Image.Resampling.LANCZOS)
    square = align_face(small, find_single_face(small), 300)
    assert (square.size, square.mode) == ((300, 300), "RGB")
