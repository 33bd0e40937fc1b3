"""The output check: NudeNet's detector on every generated image before it is sent.

NudeNet 3.4 is a small YOLO model run by onnxruntime (no torch), with its weights inside the
package, so it loads offline. It finds body parts, covered and exposed, and faces; an image is
flagged when an exposed breast, genitals, buttocks or anus is found with at least the
threshold's confidence. What happens to a flagged image is the deployment's choice
(`chitrakar.safety.decide`).

Only workers import this module: the bot process never loads the model.

The detector here is NudeNet's, run faster: the same model file, the same image preparation
(NudeNet's own) and the same filtering and non-maximum suppression, so the same detections
(a test compares them), with two changes measured on 2 cores (BENCHMARKS.md). onnxruntime's
threads do not spin while waiting: on a worker whose cores are busy with other processes a
spinning pool took 21 ms an image instead of 10. And NudeNet's Python loop over the model's
2,100 candidate boxes (3.6 ms) is done by numpy.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
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
                    detector = self._detector = NudeNetDetector()
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


class NudeNetDetector:
    """NudeNet 3.4's `NudeDetector.detect`, with a session that does not spin and numpy in
    place of its per-candidate loop. Returns the same list of
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
        self.resolution = 320

    def detect(self, image: np.ndarray[Any, np.dtype[np.uint8]]) -> list[dict[str, Any]]:
        blob, _, _, x_pad, y_pad, width, height = self._nudenet["_read_image"](
            image, self.resolution
        )
        (output,) = self._session.run(None, {self._input: blob})
        return self._detections(output, width + x_pad, height + y_pad, width, height)

    def _detections(
        self, output: Any, padded_width: int, padded_height: int, width: int, height: int
    ) -> list[dict[str, Any]]:
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
        cv2 = importlib.import_module("cv2")
        kept = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), self.NMS_SCORE, self.NMS_OVERLAP)
        return [
            {
                "class": self.labels[int(classes[i])],
                "score": float(scores[i]),
                "box": [int(value) for value in boxes[i]],
            }
            for i in kept
        ]
