"""What the worker uploads with sendPhoto: a JPEG of the result (Telegram recompresses every
photo; the PNG stays in the store for the file button), small enough for the 10 MB limit."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as photographs

from workers import delivery
from workers.delivery import _as_photo


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_a_result_is_uploaded_as_a_jpeg_of_itself_and_far_smaller_than_its_png() -> None:
    result = Image.fromarray(photographs.astronaut())
    photo = _decoded(_as_photo(result))
    assert (photo.format, photo.size, photo.mode) == ("JPEG", result.size, "RGB")
    error = np.abs(np.asarray(photo, dtype=np.int16) - np.asarray(result, dtype=np.int16))
    assert error.mean() < 3  # quality 95: the same picture, channels in their order
    png = io.BytesIO()
    result.save(png, format="PNG", compress_level=1)
    assert len(_as_photo(result)) * 3 < png.tell()


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16"])
def test_other_modes_are_uploaded_too(mode: str) -> None:
    image = Image.fromarray(photographs.astronaut()).convert("RGB").convert(mode)
    photo = _decoded(_as_photo(image))
    assert photo.format == "JPEG" and photo.size == image.size


def test_a_photo_over_the_limit_is_sent_at_a_lower_quality(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = Image.fromarray(photographs.astronaut())
    sizes = {q: len(_jpeg(image, q)) for q in delivery.PHOTO_QUALITIES}
    assert sizes[95] > sizes[85] > sizes[75]
    monkeypatch.setattr(delivery, "PHOTO_UPLOAD_LIMIT", sizes[85])
    assert len(_as_photo(image)) == sizes[85]
    monkeypatch.setattr(delivery, "PHOTO_UPLOAD_LIMIT", sizes[75] - 1)
    assert len(_as_photo(image)) == sizes[75]  # the last quality, as a last resort


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
