"""A user's selfie, checked at the edge: is it a photo we can read, and is there one face in it.

Pure functions on bytes and images, CPU only (Pillow, pillow-heif, numpy, OpenCV). All of them
block; callers run them in a thread. Every refusal is a `PhotoRejected` with a text key, so the
channel can tell the user what to change in their own language.
"""

from __future__ import annotations

import functools
import io
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import cv2.data
import numpy as np
import numpy.typing as npt
import pillow_heif
from PIL import Image, ImageOps, features

from chitrakar.domain import CommandError

pillow_heif.register_heif_opener()

# Telegram's getFile serves files up to 20 MB; a bigger one cannot be downloaded at all.
MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024
# A 48 MP phone camera shoots about 8000x6000; anything bigger is a mistake or an attack.
MAX_PIXELS = 40_000_000
MAX_ASPECT_RATIO = 4
MIN_SIDE = 128

# Pillow's format names. pillow-heif registers "HEIF" (it opens .heic and .heif); AVIF comes with
# Pillow's own plugin where Pillow was built with libavif (its wheels are, from 11.2 on).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "HEIF") + (
    ("AVIF",) if features.check_module("avif") else ()
)
# Pillow opens a JPEG that carries more pictures after the photo (a camera's large preview, a
# stereo pair, some phones' HDR gain map) as "MPO". The first picture is the photo; the rest are
# not frames of an animation. (Pillow's JPEG opener makes it: "MPO" is no opener of its own.)
_JPEG_WITH_EXTRAS = "MPO"
# GIF is opened only to tell an animation ("photo.animated") from a still ("photo.not_an_image").
_RECOGNISED_FORMATS = (*ALLOWED_FORMATS, "GIF")

# Pillow's own guard, in `Image.open`: it warns over MAX_IMAGE_PIXELS and refuses over twice
# that. Lowered to ours (never raised), so that even code that skips our header check cannot
# decode a bomb. (ImageFile.LOAD_TRUNCATED_IMAGES must stay False: a truncated file has to fail
# to load, not come back half grey. Nothing here or elsewhere sets it.)
if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# Face detection runs on a copy whose long side is at most this.
DETECTION_SIDE = 1024
# A face smaller than this share of the photo's short side is not a selfie's face (and most of
# the Haar cascade's false positives are small).
MIN_FACE_SHARE = 0.08
# The cascade's false positives (a mottled wall, a coin) score far below a real face in the
# same photo: a detection scoring under this share of the best one is dropped.
MIN_FACE_CONFIDENCE_SHARE = 0.5
# The Haar frontal-face cascade's own window.
_CASCADE_WINDOW = 24
# A face less than this share of the largest face's side is someone in the background.
BACKGROUND_FACE_SHARE = 0.5
# Eyes are looked for in the face box resized to this width.
_EYE_SEARCH_WIDTH = 200
MAX_TILT_DEGREES = 30.0
# The aligned square: its side as a multiple of the face box's, and how far its centre sits
# above the box's centre (a share of the box's side), so that hair and chin both fit.
CROP_SCALE = 1.8
CROP_LIFT = 0.1

_GrayArray = npt.NDArray[np.uint8]


class PhotoRejected(CommandError):
    """A photo we will not use, with the reason as a text key."""


@dataclass(frozen=True)
class FaceBox:
    x: int
    y: int
    width: int
    height: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.width / 2, self.y + self.height / 2

    @property
    def area(self) -> int:
        return self.width * self.height


def check_declared_size(size_bytes: int | None) -> None:
    """Refuse before downloading when Telegram says the file is too big (None: it did not say)."""
    if size_bytes is not None and size_bytes > MAX_DOWNLOAD_BYTES:
        raise PhotoRejected("photo.too_large", limit_mb=MAX_DOWNLOAD_BYTES // (1024 * 1024))


def decode_photo(data: bytes) -> Image.Image:
    """Check a photo's bytes and header, then decode it: upright (EXIF orientation) and RGB.

    Everything that can be told from the header is checked before a pixel is decoded.
    """
    check_declared_size(len(data))
    try:
        image = Image.open(io.BytesIO(data), formats=_RECOGNISED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives as an exception only where warnings are errors; elsewhere it is
        # printed and the pixel check below refuses the image.
        raise _too_many_pixels() from exc
    except Exception as exc:  # a parser of untrusted bytes can fail in any way
        raise PhotoRejected("photo.not_an_image") from exc
    with image:
        _check_header(image)
        try:
            image.load()
        except Exception as exc:  # truncated or corrupt data, whatever the decoder says
            raise PhotoRejected("photo.damaged") from exc
        return _to_rgb(_upright(image))


def _too_many_pixels() -> PhotoRejected:
    return PhotoRejected("photo.too_many_pixels", limit_mp=MAX_PIXELS // 1_000_000)


def _check_header(image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _too_many_pixels()
    if image.format != _JPEG_WITH_EXTRAS:
        try:
            animated = bool(getattr(image, "is_animated", False)) or (
                int(getattr(image, "n_frames", 1)) > 1
            )
        except Exception as exc:  # counting frames reads on through the file
            raise PhotoRejected("photo.damaged") from exc
        if animated:
            raise PhotoRejected("photo.animated")
    if image.format not in ALLOWED_FORMATS and image.format != _JPEG_WITH_EXTRAS:
        raise PhotoRejected("photo.not_an_image")
    short, long = sorted((width, height))
    if long > MAX_ASPECT_RATIO * short:
        raise PhotoRejected("photo.bad_shape", ratio=MAX_ASPECT_RATIO)
    if short < MIN_SIDE:
        raise PhotoRejected("photo.too_small", min_side=MIN_SIDE)


def _upright(image: Image.Image) -> Image.Image:
    """The photo as it is meant to be seen: always a new image, apart from the file."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF: the pixels are fine, show them as stored
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16-bit greyscale (PNG): Pillow's own conversion would clip it, not scale it.
        levels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(levels / 257.0, 0, 255).round().astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    # Transparent areas become white, not whatever colour happens to sit under them.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


class _Cascade:
    """An OpenCV Haar cascade. OpenCV objects must not be shared between threads at once, so
    detection holds a lock (it takes tens of milliseconds)."""

    def __init__(self, filename: str) -> None:
        self._classifier = cv2.CascadeClassifier(cv2.data.haarcascades + filename)
        if self._classifier.empty():
            raise RuntimeError(f"OpenCV could not load its cascade {filename}")
        self._lock = threading.Lock()

    def detect(
        self,
        gray: _GrayArray,
        *,
        min_neighbors: int,
        min_size: int,
        max_size: int = 0,
    ) -> list[tuple[tuple[int, int, int, int], float]]:
        """Boxes (x, y, width, height), each with how sure the cascade's last stage is."""
        with self._lock:
            boxes, _, weights = self._classifier.detectMultiScale3(
                gray,
                scaleFactor=1.1,
                minNeighbors=min_neighbors,
                minSize=(min_size, min_size),
                maxSize=(max_size, max_size),
                outputRejectLevels=True,
            )
        return [
            ((int(x), int(y), int(w), int(h)), float(weight))
            for (x, y, w, h), weight in zip(boxes, weights, strict=True)
        ]


@functools.cache
def _cascade(filename: str) -> _Cascade:
    return _Cascade(filename)


def _gray(image: Image.Image) -> _GrayArray:
    return np.asarray(image.convert("L"), dtype=np.uint8)


def find_faces(image: Image.Image) -> list[FaceBox]:
    """Frontal faces in an image, largest first, in the image's own pixel coordinates."""
    width, height = image.size
    scale = min(1.0, DETECTION_SIDE / max(width, height))
    small = image.convert("L")
    if scale < 1.0:
        small = small.resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX
        )
    # No histogram equalisation: on whole photos it costs more faces than it finds.
    gray = _gray(small)
    min_size = max(_CASCADE_WINDOW, round(MIN_FACE_SHARE * min(gray.shape)))
    if min_size > min(gray.shape):
        return []
    found = _cascade("haarcascade_frontalface_default.xml").detect(
        gray, min_neighbors=5, min_size=min_size
    )
    if not found:
        return []
    surest = max(weight for _, weight in found)
    faces = []
    for (x, y, w, h), weight in found:
        if weight < MIN_FACE_CONFIDENCE_SHARE * surest:
            continue
        left, top = max(0, round(x / scale)), max(0, round(y / scale))
        right, bottom = min(width, round((x + w) / scale)), min(height, round((y + h) / scale))
        faces.append(FaceBox(left, top, right - left, bottom - top))
    return _merge_overlapping(faces)


def _merge_overlapping(faces: Sequence[FaceBox]) -> list[FaceBox]:
    """One box per face: a box mostly inside a larger one is the same face found twice."""
    kept: list[FaceBox] = []
    for face in sorted(faces, key=lambda box: box.area, reverse=True):
        if all(_overlap(face, other) <= 0.5 for other in kept):
            kept.append(face)
    return kept


def _overlap(a: FaceBox, b: FaceBox) -> float:
    """The share of the smaller box that lies inside the other."""
    width = min(a.x + a.width, b.x + b.width) - max(a.x, b.x)
    height = min(a.y + a.height, b.y + b.height) - max(a.y, b.y)
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / max(1, min(a.area, b.area))


def find_single_face(image: Image.Image) -> FaceBox:
    """The one face in a selfie. Faces under half the size of the largest are people in the
    background and do not count."""
    faces = find_faces(image)
    if not faces:
        raise PhotoRejected("photo.no_face")
    largest = max(faces, key=lambda box: box.area)
    side = max(largest.width, largest.height)
    near = [f for f in faces if max(f.width, f.height) >= BACKGROUND_FACE_SHARE * side]
    if len(near) > 1:
        raise PhotoRejected("photo.many_faces", count=len(near))
    return largest


def eye_angle(image: Image.Image, face: FaceBox) -> float | None:
    """How far the line from the left eye to the right eye (as seen) turns clockwise from level,
    in degrees, or None where two eyes are not found. Positive: the right-hand eye is lower."""
    if face.width < 2 or face.height < 2:
        return None
    band = image.crop((face.x, face.y, face.x + face.width, face.y + round(face.height * 0.6)))
    zoom = _EYE_SEARCH_WIDTH / face.width
    band = band.resize(
        (_EYE_SEARCH_WIDTH, max(1, round(band.height * zoom))), Image.Resampling.BILINEAR
    )
    gray = np.asarray(cv2.equalizeHist(_gray(band)), dtype=np.uint8)
    eyes = _cascade("haarcascade_eye.xml").detect(
        gray,
        min_neighbors=3,
        min_size=round(0.1 * _EYE_SEARCH_WIDTH),
        max_size=round(0.45 * _EYE_SEARCH_WIDTH),
    )
    pair = _best_eye_pair([box for box, _ in eyes], _EYE_SEARCH_WIDTH)
    if pair is None:
        return None
    (lx, ly), (rx, ry) = pair
    return math.degrees(math.atan2(ry - ly, rx - lx))


def _best_eye_pair(
    eyes: Sequence[tuple[int, int, int, int]], face_width: int
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The two detections that look most like a pair of eyes: one each side of the face's
    middle, a plausible distance apart, alike in size, and not steeper than 45 degrees."""
    best: tuple[float, tuple[tuple[float, float], tuple[float, float]]] | None = None
    middle = face_width / 2
    for i, (x1, y1, w1, h1) in enumerate(eyes):
        for x2, y2, w2, h2 in eyes[i + 1 :]:
            a = (x1 + w1 / 2, y1 + h1 / 2)
            b = (x2 + w2 / 2, y2 + h2 / 2)
            left, right = (a, b) if a[0] <= b[0] else (b, a)
            dx, dy = right[0] - left[0], right[1] - left[1]
            distance = math.hypot(dx, dy)
            if not (left[0] < middle < right[0]) or abs(dy) > dx:
                continue
            if not 0.2 * face_width <= distance <= 0.7 * face_width:
                continue
            cost = (
                abs((left[0] + right[0]) / 2 - middle)
                + abs(w1 - w2)
                + abs(distance - 0.45 * face_width)
            ) / face_width
            if best is None or cost < best[0]:
                best = (cost, (left, right))
    return None if best is None else best[1]


def align_face(image: Image.Image, face: FaceBox, size: int) -> Image.Image:
    """A size x size RGB square around the face, eyes levelled, with room for hair and chin.

    Where the square reaches past the photo's edges, the photo is mirrored into the gap.
    """
    if size < 1:
        raise ValueError(f"size must be positive, not {size}")
    angle = eye_angle(image, face)
    angle = 0.0 if angle is None else max(-MAX_TILT_DEGREES, min(MAX_TILT_DEGREES, angle))
    side = max(face.width, face.height)
    crop = CROP_SCALE * side
    cx, cy = face.centre
    # The square's centre, in the levelled photo (turned about the face's centre).
    qx, qy = cx, cy - CROP_LIFT * side

    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))

    def to_photo(u: float, v: float) -> tuple[float, float]:
        """A point of the levelled photo, in the photo as it is."""
        du, dv = u - cx, v - cy
        return cx + cos * du - sin * dv, cy + sin * du + cos * dv

    # The part of the photo the turned square covers (plus a few pixels for the filter).
    corners = [to_photo(qx + sx * crop / 2, qy + sy * crop / 2) for sx in (-1, 1) for sy in (-1, 1)]
    pad = 3
    left = max(0, math.floor(min(x for x, _ in corners)) - pad)
    top = max(0, math.floor(min(y for _, y in corners)) - pad)
    right = min(image.width, math.ceil(max(x for x, _ in corners)) + pad)
    bottom = min(image.height, math.ceil(max(y for _, y in corners)) + pad)
    if right <= left or bottom <= top:  # the face box lies outside the photo
        left, top, right, bottom = 0, 0, image.width, image.height

    # Shrink that part first (Lanczos, without aliasing) so the turn works near 1:1, at most at
    # twice the output's resolution.
    shrink = min(1.0, 2 * size / crop)
    region = image.crop((left, top, right, bottom)).convert("RGB")
    if shrink < 1.0:
        region = region.resize(
            (max(1, round(region.width * shrink)), max(1, round(region.height * shrink))),
            Image.Resampling.LANCZOS,
        )
    sx_region = region.width / (right - left)
    sy_region = region.height / (bottom - top)
    n = max(1, round(crop * shrink))

    # Output pixel (i, j) -> point of the levelled photo -> point of the photo -> of the region.
    step = crop / n
    u0, v0 = qx - crop / 2 + step / 2, qy - crop / 2 + step / 2
    x0, y0 = to_photo(u0, v0)
    # Pixel centres: Pillow's resize puts pixel k's centre at k + 0.5, OpenCV's at k.
    matrix = np.array(
        [
            [
                sx_region * cos * step,
                -sx_region * sin * step,
                sx_region * (x0 - left) - 0.5,
            ],
            [
                sy_region * sin * step,
                sy_region * cos * step,
                sy_region * (y0 - top) - 0.5,
            ],
        ],
        dtype=np.float64,
    )
    pixels = np.asarray(region, dtype=np.uint8)
    warped = cv2.warpAffine(
        pixels,
        matrix,
        (n, n),
        flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    square = Image.fromarray(np.ascontiguousarray(warped))
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.LANCZOS)
    return square


def prepare_selfie(data: bytes, size: int) -> Image.Image:
    """A user's photo as the size x size face square the portrait models take."""
    image = decode_photo(data)
    return align_face(image, find_single_face(image), size)
