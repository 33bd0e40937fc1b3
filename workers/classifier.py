"""The output check: NudeNet's detector on every generated image before it is sent.

NudeNet 3.4 is a small YOLO model run by onnxruntime (no torch), with its weights inside the
package, so it loads offline. It finds body parts, covered and exposed, and faces; an image is
flagged when an exposed breast, genitals, buttocks or anus is found with at least the
threshold's confidence. What happens to a flagged image is the deployment's choice
(`chitrakar.safety.decide`).

Only workers import this module: the bot process never loads the model.

The detector here is NudeNet's, run faster: the same model file, the same image preparation
(NudeNet's own) and the same filtering and non-maximum suppression, so the same detections
(a test compares them), with changes measured on 2 cores (BENCHMARKS.md). onnxruntime's
threads do not spin while waiting: on a worker whose cores are busy with other processes a
spinning pool took 21 ms an image instead of 10. NudeNet's Python loop over the model's 2,100
candidate boxes (3.6 ms) is done by numpy. A generated image goes to the model from its RGB
pixels: NudeNet expects OpenCV's BGR and swaps it back to RGB first, two copies of the image
(3.3 ms at 1024×1024). And a job's images go through the model in one run.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

Detections = list[dict[str, Any]]
RgbArray = np.ndarray[Any, np.dtype[np.uint8]]


class _Detector(Protocol):
    def detect_rgb(self, images: Sequence[RgbArray]) -> list[Detections]: ...


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
                    detector = self._detector = NudeNetDetector()
        return detector

    def classify(self, image: Image.Image) -> ImageVerdict:
        (verdict,) = self.classify_all([image])
        return verdict

    def classify_all(self, images: Sequence[Image.Image]) -> list[ImageVerdict]:
        """A verdict for each image, in order; the model runs once over them all."""
        found = self._load().detect_rgb([_as_rgb(image) for image in images])
        return [self._verdict(detections) for detections in found]

    def _verdict(self, detections: Detections) -> ImageVerdict:
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


def _as_rgb(image: Image.Image) -> RgbArray:
    # One copy of the pixels: converting an image that is RGB already would make another.
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


class NudeNetDetector:
    """NudeNet 3.4's `NudeDetector.detect`, with a session that does not spin, numpy in place
    of its per-candidate loop, and several images to a run. Returns the same list of
    `{"class", "score", "box": [x, y, w, h]}` for the same image."""

    # A 320-pixel model gains little from more threads; spinning ones take CPU from the rest.
    MAX_THREADS = 4
    CANDIDATE_SCORE = 0.2  # NudeNet's: a candidate box's best class score
    NMS_SCORE, NMS_OVERLAP = 0.25, 0.45  # NudeNet's non-maximum suppression

    def __init__(self) -> None:
        onnxruntime = importlib.import_module("onnxruntime")
        self._nudenet = vars(importlib.import_module("nudenet.nudenet"))
        self.labels: list[str] = list(self._nudenet["__labels"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = min(self.MAX_THREADS, os.cpu_count() or 1)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = Path(self._nudenet["__file__"]).with_name("320n.onnx")
        self._session = onnxruntime.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self._cv2: Any = importlib.import_module("cv2")
        self.resolution = 320

    def detect(self, image: np.ndarray[Any, np.dtype[np.uint8]]) -> Detections:
        """NudeNet's `detect` for an array as OpenCV reads a file (BGR, or BGRA)."""
        # NudeNet's first step, which turns a file's BGR into RGB (the model is fed BGR
        # again by the blob's channel swap below).
        (detections,) = self.detect_rgb([self._cv2.cvtColor(image, self._cv2.COLOR_RGBA2BGR)])
        return detections

    def detect_rgb(self, images: Sequence[RgbArray]) -> list[Detections]:
        """What `detect` finds in each image, given as 8-bit RGB (height × width × 3): each is
        padded to a square and scaled to the model's input as NudeNet does, then all of them
        go through the model in one run (about 15% less time an image at four)."""
        if not images:
            return []
        cv2 = self._cv2
        squares = []
        for rgb in images:
            height, width = rgb.shape[:2]
            side = max(width, height)
            if side != width or side != height:  # black below or to the right
                rgb = cv2.copyMakeBorder(
                    rgb, 0, side - height, 0, side - width, cv2.BORDER_CONSTANT
                )
            squares.append(rgb)
        size = (self.resolution, self.resolution)
        blob = cv2.dnn.blobFromImages(squares, 1 / 255.0, size, (0, 0, 0), swapRB=True, crop=False)
        (outputs,) = self._session.run(None, {self._input: blob})
        return [
            self._detections(output, square.shape[1], square.shape[0], *rgb.shape[1::-1])
            for output, square, rgb in zip(outputs, squares, images, strict=True)
        ]

    def _detections(
        self, output: Any, padded_width: int, padded_height: int, width: int, height: int
    ) -> Detections:
        rows = np.transpose(np.squeeze(output))  # one row per candidate: cx, cy, w, h, scores…
        class_scores = rows[:, 4:]
        best = class_scores.max(axis=1)
        keep = best >= self.CANDIDATE_SCORE
        rows, scores = rows[keep], best[keep]
        classes = class_scores[keep].argmax(axis=1)
        # Centre to corner, model pixels to the padded image's, clipped to the image (float32
        # throughout, in NudeNet's order of operations, so the boxes come out the same).
        x = (rows[:, 0] - rows[:, 2] / 2) * padded_width / self.resolution
        y = (rows[:, 1] - rows[:, 3] / 2) * padded_height / self.resolution
        w = rows[:, 2] * padded_width / self.resolution
        h = rows[:, 3] * padded_height / self.resolution
        x = np.maximum(0, np.minimum(x, width))
        y = np.maximum(0, np.minimum(y, height))
        w = np.minimum(w, width - x)
        h = np.minimum(h, height - y)
        boxes = np.stack([x, y, w, h], axis=1)
        kept = self._cv2.dnn.NMSBoxes(
            boxes.tolist(), scores.tolist(), self.NMS_SCORE, self.NMS_OVERLAP
        )
        return [
            {
                "class": self.labels[int(classes[i])],
                "score": float(scores[i]),
                "box": [int(value) for value in boxes[i]],
            }
            for i in kept
        ]
