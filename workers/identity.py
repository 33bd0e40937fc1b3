"""Keeping the person's likeness in an avatar: a stage chosen once per worker.

The default redraws the aligned face with img2img, so the layout, pose and colouring of the
selfie carry into the style. Where IP-Adapter weights (Plus-Face or FaceID, in the layout of
h94/IP-Adapter) are on disk and named in the settings, the face also conditions every step
through the adapter. Weights that are missing or fail to load are logged, and the default is
used: a worker never fails to start over them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from chitrakar.config import Settings
from chitrakar.domain import GenerationPlan
from workers.pipelines import (
    LoadedPipeline,
    ProgressCallback,
    give_up_fused_qkv,
    image_to_image,
    text_to_image,
)

log = logging.getLogger(__name__)

# The smallest call a Stable Diffusion pipeline makes: checks a loaded adapter works.
_TRIAL = GenerationPlan("trial", 64, 64, 1, (0,), 1.0)


class IdentityStage(Protocol):
    name: str

    def avatars(
        self,
        loaded: LoadedPipeline,
        plan: GenerationPlan,
        face: Image.Image,
        on_progress: ProgressCallback | None,
    ) -> list[Image.Image]: ...

    def without_face(self, loaded: LoadedPipeline) -> dict[str, Any]:
        """Readies the model for a job without a face; returns extra pipeline arguments."""
        ...


class ImageToImageIdentity:
    name = "img2img"

    def avatars(
        self,
        loaded: LoadedPipeline,
        plan: GenerationPlan,
        face: Image.Image,
        on_progress: ProgressCallback | None,
    ) -> list[Image.Image]:
        return image_to_image(loaded, plan, face, on_progress)

    def without_face(self, loaded: LoadedPipeline) -> dict[str, Any]:
        return {}


class IPAdapterIdentity:
    """img2img from the face, with the face also fed through an IP-Adapter."""

    name = "ip-adapter"
    # What the adapter is given on jobs without a face, with its scale at zero.
    _BLANK = Image.new("RGB", (224, 224))

    def __init__(self, loaded: LoadedPipeline, folder: Path, weights: str, scale: float) -> None:
        give_up_fused_qkv(loaded)
        loaded.text2image.load_ip_adapter(
            str(folder), subfolder="models", weight_name=weights, local_files_only=True
        )
        loaded.forget_views()
        self._scale = scale
        try:
            # diffusers does not check that the adapter fits the encoder when loading: one
            # tiny call now finds a mismatch, rather than every job without a face failing.
            text_to_image(loaded, _TRIAL, **self.without_face(loaded))
        except Exception:
            loaded.text2image.unload_ip_adapter()
            loaded.forget_views()
            raise

    def avatars(
        self,
        loaded: LoadedPipeline,
        plan: GenerationPlan,
        face: Image.Image,
        on_progress: ProgressCallback | None,
    ) -> list[Image.Image]:
        loaded.text2image.set_ip_adapter_scale(self._scale)
        return image_to_image(loaded, plan, face, on_progress, ip_adapter_image=face)

    def without_face(self, loaded: LoadedPipeline) -> dict[str, Any]:
        # A loaded adapter expects an image on every call: a blank one, weighted zero.
        loaded.text2image.set_ip_adapter_scale(0.0)
        return {"ip_adapter_image": self._BLANK}


def choose_identity_stage(settings: Settings, loaded: LoadedPipeline) -> IdentityStage:
    folder = settings.identity_adapter
    if folder is None:
        return ImageToImageIdentity()
    weights = folder / "models" / settings.identity_adapter_weights
    if not weights.is_file():
        log.warning(
            "identity adapter weights %s not found: avatars keep the likeness by img2img only",
            weights,
        )
        return ImageToImageIdentity()
    try:
        stage = IPAdapterIdentity(
            loaded, folder, settings.identity_adapter_weights, settings.identity_adapter_scale
        )
    except Exception as exc:  # any failure of third-party loading code means: no adapter
        if getattr(loaded.text2image, "image_encoder", None) is not None:
            # A half-loaded adapter would hold its image encoder (GBs) for nothing.
            with contextlib.suppress(Exception):
                loaded.text2image.unload_ip_adapter()
            loaded.forget_views()
        log.warning(
            "cannot load the identity adapter from %s (%s): avatars keep the likeness by "
            "img2img only",
            folder,
            exc,
        )
        return ImageToImageIdentity()
    log.info("avatars keep the likeness with the IP-Adapter %s", weights)
    return stage
