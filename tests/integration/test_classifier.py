"""The output classifier with the real NudeNet detector (its model ships in the package, so this
runs offline): real photographs and a blank image are not flagged; the flagged path, which no
test image here may show, runs against a stand-in detector."""

from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data as photographs

from workers import classifier as classifier_module
from workers.classifier import ImageVerdict, NudeNetDetector, OutputClassifier

NOT_FLAGGED = ImageVerdict(flagged=False, labels=(), score=0.0)


@pytest.fixture(scope="module")
def classifier() -> OutputClassifier:
    return OutputClassifier()


def test_a_portrait_is_not_flagged(classifier: OutputClassifier) -> None:
    astronaut = Image.fromarray(photographs.astronaut())
    assert classifier.classify(astronaut) == NOT_FLAGGED
    # The detector does see her face: a face is found, and is not unsafe.
    detector: Any = classifier._detector
    labels = {found["class"] for found in detector.detect(np.asarray(astronaut)[:, :, ::-1])}
    assert labels & {"FACE_FEMALE", "FACE_MALE"}
    assert not labels & OutputClassifier.UNSAFE_LABELS


def test_a_photo_without_people_is_not_flagged(classifier: OutputClassifier) -> None:
    assert classifier.classify(Image.fromarray(photographs.coffee())) == NOT_FLAGGED


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (512, 512), "white"),
        Image.new("RGB", (64, 96), "black"),
        Image.new("L", (128, 128), 128),
        Image.new("RGBA", (128, 64), (200, 150, 100, 0)),
        Image.fromarray(photographs.camera()),  # greyscale
    ],
    ids=["white", "black-portrait", "grey-L", "transparent-RGBA", "camera-L"],
)
def test_other_images_are_read_and_not_flagged(
    classifier: OutputClassifier, image: Image.Image
) -> None:
    assert classifier.classify(image) == NOT_FLAGGED


def test_the_model_loads_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[object] = []

    class Counted(NudeNetDetector):
        def __init__(self) -> None:
            loads.append(self)
            super().__init__()

    monkeypatch.setattr(classifier_module, "NudeNetDetector", Counted)
    classifier = OutputClassifier()
    assert classifier._detector is None  # nothing loaded until the first image
    image = Image.fromarray(photographs.coffee())
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(classifier.classify, [image] * 8))
    assert verdicts == [NOT_FLAGGED] * 8
    assert len(loads) == 1


@pytest.fixture(scope="module")
def detectors() -> tuple[NudeNetDetector, Any]:
    return NudeNetDetector(), importlib.import_module("nudenet").NudeDetector()


def _bgr(rgb: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.ascontiguousarray(rgb[:, :, ::-1])


@pytest.mark.parametrize(
    "image",
    [
        _bgr(photographs.astronaut()),  # a face
        _bgr(np.tile(photographs.astronaut(), (2, 3, 1))),  # six faces, wide
        _bgr(photographs.astronaut()[:300]),  # cropped: padded below
        _bgr(photographs.coffee()),
        np.random.default_rng(0).integers(0, 256, (97, 301, 3), dtype=np.uint8),
    ],
    ids=["face", "six-faces", "cropped", "no-one", "noise"],
)
def test_the_detector_finds_what_nudenet_finds(
    detectors: tuple[NudeNetDetector, Any], image: np.ndarray[Any, Any]
) -> None:
    ours, nudenets = detectors
    assert ours.detect(image) == nudenets.detect(image)


def test_images_checked_together_find_what_each_finds_alone(
    detectors: tuple[NudeNetDetector, Any],
) -> None:
    """One run of the model over a job's images, of several sizes and modes, gives each the
    detections NudeNet gives it alone (from the file OpenCV would read); and the verdicts
    come back in the images' order."""
    ours, nudenets = detectors
    astronaut = photographs.astronaut()
    images = [
        Image.fromarray(astronaut),
        Image.fromarray(np.tile(astronaut, (2, 3, 1))),  # wide: padded below
        Image.fromarray(astronaut[:, :300]),  # narrow: padded to the right
        Image.fromarray(photographs.coffee()),
        Image.fromarray(photographs.camera()),  # greyscale ("L")
        Image.fromarray(astronaut).convert("RGBA"),
    ]
    rgbs = [np.asarray(image.convert("RGB")) for image in images]
    together = ours.detect_rgb(rgbs)
    alone = [nudenets.detect(_bgr(rgb)) for rgb in rgbs]
    assert together == alone
    assert [len(found) for found in together] == [len(found) for found in alone]
    assert sum(1 for found in together if found) >= 3  # faces, in several of the images
    classifier = OutputClassifier()
    classifier._detector = ours
    assert classifier.classify_all(images) == [NOT_FLAGGED] * len(images)
    assert classifier.classify_all([]) == []


def test_verdicts_follow_their_images() -> None:
    class ByWidth:
        def detect_rgb(self, images: Any) -> list[list[dict[str, Any]]]:
            return [
                [{"class": "BUTTOCKS_EXPOSED", "score": rgb.shape[1] / 100, "box": [0, 0, 1, 1]}]
                for rgb in images
            ]

    classifier = OutputClassifier(threshold=0.5)
    classifier._detector = ByWidth()
    sizes = [(60, 8), (40, 8), (90, 8)]
    verdicts = classifier.classify_all([Image.new("RGB", size) for size in sizes])
    assert [v.flagged for v in verdicts] == [True, False, True]
    assert [v.labels for v in verdicts] == [
        ("BUTTOCKS_EXPOSED:0.60",),
        (),
        ("BUTTOCKS_EXPOSED:0.90",),
    ]


@pytest.mark.parametrize("seed", range(5))
def test_many_candidates_are_filtered_and_suppressed_as_nudenet_does(
    detectors: tuple[NudeNetDetector, Any], seed: int
) -> None:
    """Model outputs no test image could give: hundreds of candidates of every class, many
    overlapping, around the score thresholds; both turn them into the same detections."""
    ours, _ = detectors
    rng = np.random.default_rng(seed)
    candidates = 2100
    output = np.zeros((1, 22, candidates), dtype=np.float32)
    output[0, 0:2] = rng.uniform(0, 320, (2, candidates))  # centres
    output[0, 2:4] = rng.uniform(5, 200, (2, candidates))  # sizes
    scores = rng.uniform(0, 1, (18, candidates)) ** 4  # most under NudeNet's 0.2
    output[0, 4:] = scores
    width, height, x_pad, y_pad = 640, 400, 0, 240
    nudenet_module = vars(importlib.import_module("nudenet.nudenet"))
    expected = nudenet_module["_postprocess"](
        [output], x_pad, y_pad, 1.0, 1.6, width, height, 320, 320
    )
    found = ours._detections(output, width + x_pad, height + y_pad, width, height)
    assert len(expected) > 20
    assert len({d["class"] for d in expected}) > 5
    assert found == expected


class _StandIn:
    """NudeNet's `detect` answer for an image this suite cannot hold."""

    def __init__(self, detections: list[dict[str, Any]]) -> None:
        self.detections = detections
        self.seen: list[Any] = []

    def detect_rgb(self, images: Any) -> list[list[dict[str, Any]]]:
        self.seen.extend(images)
        return [self.detections for _ in images]


def test_exposed_labels_flag_the_image() -> None:
    classifier = OutputClassifier(threshold=0.5)
    stand_in = _StandIn(
        [
            {"class": "FACE_FEMALE", "score": 0.92, "box": [1, 2, 3, 4]},
            {"class": "FEMALE_BREAST_COVERED", "score": 0.88, "box": [1, 2, 3, 4]},
            {"class": "FEMALE_GENITALIA_EXPOSED", "score": 0.81234, "box": [1, 2, 3, 4]},
            {"class": "BUTTOCKS_EXPOSED", "score": 0.64, "box": [1, 2, 3, 4]},
            {"class": "BUTTOCKS_EXPOSED", "score": 0.55, "box": [5, 6, 7, 8]},
            {"class": "ANUS_EXPOSED", "score": 0.3, "box": [1, 2, 3, 4]},  # under the threshold
        ]
    )
    classifier._detector = stand_in
    verdict = classifier.classify(Image.new("RGB", (40, 30), (255, 0, 0)))
    assert verdict.flagged
    assert verdict.labels == ("FEMALE_GENITALIA_EXPOSED:0.81", "BUTTOCKS_EXPOSED:0.64")
    assert verdict.score == pytest.approx(0.81234)
    # It was given the image's pixels: 8-bit RGB, height x width x 3.
    (array,) = stand_in.seen
    assert array.shape == (30, 40, 3)
    assert array.dtype == np.uint8
    assert tuple(array[0, 0]) == (255, 0, 0)


def test_the_threshold_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    detections = [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.45, "box": [0, 0, 1, 1]}]
    strict, lenient = OutputClassifier(threshold=0.4), OutputClassifier(threshold=0.5)
    for classifier in (strict, lenient):
        monkeypatch.setattr(classifier, "_detector", _StandIn(detections))
    image = Image.new("RGB", (8, 8))
    assert strict.classify(image).labels == ("MALE_GENITALIA_EXPOSED:0.45",)
    assert lenient.classify(image) == NOT_FLAGGED
    with pytest.raises(ValueError, match="threshold"):
        OutputClassifier(threshold=0)


def test_the_unsafe_labels_are_nudenet_classes() -> None:
    # The class names, in the order of the model's outputs, from NudeNet's own source.
    classes = set(vars(importlib.import_module("nudenet.nudenet"))["__labels"])
    assert len(classes) == 18
    assert classes >= OutputClassifier.UNSAFE_LABELS
    assert {label for label in classes if label.endswith("_COVERED")}.isdisjoint(
        OutputClassifier.UNSAFE_LABELS
    )
