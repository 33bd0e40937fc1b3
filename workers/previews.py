"""The style catalogue's preview grid: one picture per style, made once per model and style
and cached, then laid out in one image for /styles."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from chitrakar.domain import GenerationPlan
from chitrakar.media import MediaStore, png_bytes, write_atomically
from chitrakar.styles import Style, StyleCatalogue
from workers.pipelines import LoadedPipeline, ProgressCallback, text_to_image, use_lora

log = logging.getLogger(__name__)

# One fixed seed, so that previews differ only by style.
PREVIEW_SEED = 1947
THUMBNAIL = 192
COLUMNS = 4
LABEL_HEIGHT = 28


def preview_plan(style: Style, subject: str, size: int) -> GenerationPlan:
    return GenerationPlan(
        prompt=style.render(subject),
        negative_prompt=style.negative,
        width=size,
        height=size,
        steps=style.steps,
        seeds=(PREVIEW_SEED,),
        guidance_scale=style.guidance,
        style=style.key,
        lora=str(style.lora) if style.lora else None,
        lora_scale=style.lora_scale,
    )


def make_preview_grid(
    loaded: LoadedPipeline,
    catalogue: StyleCatalogue,
    media: MediaStore,
    model_label: str,
    size: int,
    on_progress: ProgressCallback | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """The grid for the catalogue as it is now; styles already previewed are not redrawn."""
    grid_path = media.grid_path(model_label, catalogue)
    if grid_path.exists():
        return grid_path
    styles = list(catalogue.styles.values())
    thumbnails = []
    for number, style in enumerate(styles, start=1):
        path = media.preview_path(model_label, style.fingerprint())
        if not path.exists():
            plan = preview_plan(style, catalogue.defaults.avatar_prompt, size)
            use_lora(loaded, plan.lora, plan.lora_scale)
            (image,) = text_to_image(loaded, plan, **(extra or {}))
            write_atomically(path, png_bytes(image))
            log.info("made the preview of style %s", style.key)
        with Image.open(path) as preview:
            thumbnails.append(preview.convert("RGB").resize((THUMBNAIL, THUMBNAIL)))
        if on_progress is not None:
            on_progress(number, len(styles))
    grid = lay_out(thumbnails, [f"{n}. {s.name_in('en')}" for n, s in enumerate(styles, 1)])
    buffer = io.BytesIO()
    grid.save(buffer, format="JPEG", quality=88)
    write_atomically(grid_path, buffer.getvalue())
    return grid_path


def lay_out(thumbnails: list[Image.Image], labels: list[str]) -> Image.Image:
    """Thumbnails in rows of COLUMNS, each with its label underneath."""
    rows = -(-len(thumbnails) // COLUMNS)
    cell_height = THUMBNAIL + LABEL_HEIGHT
    grid = Image.new("RGB", (COLUMNS * THUMBNAIL, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=15)
    for index, (thumbnail, label) in enumerate(zip(thumbnails, labels, strict=True)):
        x, y = (index % COLUMNS) * THUMBNAIL, (index // COLUMNS) * cell_height
        grid.paste(thumbnail, (x, y))
        draw.text((x + 6, y + THUMBNAIL + 6), label, fill="black", font=font)
    return grid
