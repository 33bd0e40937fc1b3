"""Image files that bot and workers share: aligned selfies and style previews.

Both processes must see the same folder (`CHITRAKAR_DATA_DIR/media`; on several hosts, a
shared volume), as they see the same database. Jobs refer to files by absolute path.

A selfie is personal data: only its aligned face crop is written, never the photo as sent.
`forget_input` deletes it: at once when no job is made from it or its job fails; when kept for
the Again button, the retention policy decides how long (`forget_input` is its seam).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from chitrakar.styles import StyleCatalogue

log = logging.getLogger(__name__)


# Every result is encoded before it is sent, so this is on the path a user waits for. zlib's
# fastest level: Pillow took 62 ms for a 1024x1024 photograph instead of 300 ms at its default
# (6), for a file 13 % bigger. Through libpng (OpenCV's encoder) with zlib's RLE strategy and
# the "up" filter on every row, instead of Pillow's choice among five filters for each row,
# it takes 24 ms, for the same size (bench figures in BENCHMARKS.md).
PNG_COMPRESS_LEVEL = 1
_PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    PNG_COMPRESS_LEVEL,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_UP,
]
# The conversion to OpenCV's channel order of each mode written as it is; any other mode is
# converted to RGB or RGBA first.
_TO_OPENCV = {"RGB": cv2.COLOR_RGB2BGR, "RGBA": cv2.COLOR_RGBA2BGRA, "L": None, "I;16": None}


def png_bytes(image: Image.Image) -> bytes:
    """An image as PNG, as results, selfie crops and previews are stored (8-bit RGB, RGBA or
    grey, 16-bit grey; other modes as RGB, or RGBA when they carry transparency)."""
    if image.mode not in _TO_OPENCV:
        transparent = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if transparent else "RGB")
    pixels = np.asarray(image)
    conversion = _TO_OPENCV[image.mode]
    if conversion is not None:
        pixels = cv2.cvtColor(pixels, conversion)
    encoded, png = cv2.imencode(".png", pixels, _PNG_PARAMS)
    if not encoded:
        raise ValueError(f"OpenCV could not encode a {image.mode} image of {image.size} as PNG")
    return png.tobytes()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:16]


class MediaStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, *names: str) -> Path:
        folder = self.root.joinpath(*names)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def save_input(self, image: Image.Image) -> str:
        """Write an aligned selfie as PNG; returns its path for the job record."""
        path = self._folder("inputs") / f"{uuid.uuid4().hex}.png"
        write_atomically(path, png_bytes(image))
        return str(path)

    def forget_input(self, path: str | None) -> None:
        """Delete a selfie crop; a file already gone is fine."""
        if path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
            log.info("deleted input image %s", path)

    def preview_path(self, model_label: str, style_fingerprint: str) -> Path:
        """Where one style's preview for one model is cached."""
        return self._folder("previews", _digest(model_label)) / f"{style_fingerprint}.png"

    def grid_path(self, model_label: str, catalogue: StyleCatalogue) -> Path:
        """Where the catalogue's preview grid is cached: it changes with any style in it."""
        key = _digest(model_label, *(s.fingerprint() for s in catalogue.styles.values()))
        return self._folder("previews", _digest(model_label)) / f"grid-{key}.jpg"


def write_atomically(path: Path, data: bytes) -> None:
    """A reader in another process never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)
