"""The output check: NudeNet's detector on every generated image before it is sent.

NudeNet 3.4 is a small YOLO model run by onnxruntime (no torch), with its weights inside the
package, so it loads offline. It finds body parts, covered and exposed, and faces; an image is
flagged when an exposed breast, genitals, buttocks or anus is found with at least the
threshold's confidence. What happens to a flagged image is the deployment's choice
(`chitrakar.safety.decide`).

Only workers import this module: the bot process never loads the model.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image


class _Detector(Protocol):
    def detect(self, image: Any) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class ImageVerdict:
    flagged: bool
    # The unsafe labels found, each with its score, for the audit log:
    # ("FEMALE_GENITALIA_EXPOSED:0.81",). Highest score first.
    labels: tuple[str, ...]
    # The highest unsafe score (0.0 when none was found).
    score: float


class OutputClassifier:
    """Flags images showing exposed intimate body parts. Thread-safe; the model loads on the
    first `classify` call."""

    # NudeNet 3.4's class names (nudenet/nudenet.py). Not unsafe: faces, feet, armpits, belly,
    # a man's chest, and every *_COVERED label.
    UNSAFE_LABELS: frozenset[str] = frozenset(
        {
            "FEMALE_GENITALIA_EXPOSED",
            "MALE_GENITALIA_EXPOSED",
            "FEMALE_BREAST_EXPOSED",
            "BUTTOCKS_EXPOSED",
            "ANUS_EXPOSED",
        }
    )

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._detector: _Detector | None = None
        self._lock = threading.Lock()

    def _load(self) -> _Detector:
        detector = self._detector
        if detector is None:
            with self._lock:
                detector = self._detector
                if detector is None:
                    nudenet = importlib.import_module("nudenet")
                    detector = self._detector = nudenet.NudeDetector()
        return detector

    def classify(self, image: Image.Image) -> ImageVerdict:
        detections = self._load().detect(_as_bgr(image))
        found: dict[str, float] = {}
        for detection in detections:
            label, score = str(detection["class"]), float(detection["score"])
            if label in self.UNSAFE_LABELS and score >= self.threshold:
                found[label] = max(score, found.get(label, 0.0))
        ranked = sorted(found.items(), key=lambda item: (-item[1], item[0]))
        return ImageVerdict(
            flagged=bool(ranked),
            labels=tuple(f"{label}:{score:.2f}" for label, score in ranked),
            score=ranked[0][1] if ranked else 0.0,
        )


def _as_bgr(image: Image.Image) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """What NudeNet reads from a file: 8-bit, three channels, in OpenCV's BGR order. It takes a
    path, encoded bytes or such an array; the array needs no temporary file and no encoding."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1])
