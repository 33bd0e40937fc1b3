"""The real `chitrakar worker`, with its pipeline call timed and, with `--generator instant`,
replaced by a fake that answers at once. For the benchmarks only (bench/serving_overhead.py,
bench/ingest.py); nothing in the project imports it.

    PYTHONPATH=. .venv/bin/python bench/instant_worker.py --generator instant \
        --timings worker-timings.jsonl [worker options, e.g. --requeue-unfinished]

Why it exists: the serving path (update in → job row → queue → worker → delivery out) is to be
measured apart from the model. Under 50 concurrent users the tiny model would mostly measure
queueing behind other jobs' denoising, so the benchmarks need a generator that takes no time
but is called exactly as the worker calls diffusers. The fake lives here, not in the project,
so that no deployment can ever run it.

How narrowly it patches: `chitrakar.cli.main(["worker", ...])` runs unchanged (the tiny model is
loaded, Celery, the store, delivery, the NudeNet content check all as deployed). Only after the
model has loaded is `LoadedPipeline.text2image` wrapped: every other attribute (the VAE, LoRA
switches, `components`) still reaches the real diffusers pipeline; with `--generator instant`
its call returns one small PIL image per entry of the `generator` list (one seeded generator
per image, whatever the form of `prompt`: a string, or a list for a batch of several jobs), and
with `--generator model` it calls the real pipeline. With `--generator gpu-like` the call stands
for a pipeline running on a GPU: it sleeps `--gpu-like-ms` an image (a thread waiting on CUDA
holds neither a core nor the GIL) and returns photographs (scikit-image's astronaut, at the
size asked), which cost what generated images cost to check, encode and send; flat colours
would flatter the PNG encoder.

`--timings PATH` appends one JSON line per event, on the system-wide monotonic clock (the
benchmark's `time.monotonic()` and the Bot API emulator's call times are on the same clock):
`pipeline` (each pipeline call: start, end, its prompts, how many images), `classify` (each
content check, of a job's images together, with how many) and `job` (each `run_job`, the
worker's whole handling of a task, with the job id). Writing a line takes microseconds,
outside the pipeline's interval.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chitrakar.cli import main as chitrakar_main  # noqa: E402
from tests.support.stack import process_group  # noqa: E402


class TimingLog:
    """One JSON object a line, flushed at once (the worker is stopped by a signal)."""

    def __init__(self, path: Path | None) -> None:
        self._file: TextIO | None = path.open("a", buffering=1) if path else None
        self._lock = threading.Lock()

    def write(self, what: str, start: float, end: float, **fields: Any) -> None:
        if self._file is None:
            return
        line = json.dumps({"what": what, "start": start, "end": end, **fields})
        with self._lock:
            self._file.write(line + "\n")


@dataclass
class FakeOutput:
    """What a diffusers pipeline call returns, as far as the worker reads it."""

    images: list[Image.Image]


def instant_images(**kwargs: Any) -> FakeOutput:
    """A diffusers text-to-image call that takes no time: one small image per generator."""
    count = _image_count(kwargs)
    width, height = int(kwargs.get("width") or 64), int(kwargs.get("height") or 64)
    return FakeOutput(
        [Image.new("RGB", (width, height), (37 * n % 256, 128, 200)) for n in range(count)]
    )


def gpu_like(ms_per_image: float) -> Callable[..., FakeOutput]:
    """A text-to-image call that takes `ms_per_image` an image without using the CPU."""
    photos: dict[tuple[int, int], Image.Image] = {}

    def call(**kwargs: Any) -> FakeOutput:
        count = _image_count(kwargs)
        time.sleep(ms_per_image * count / 1000)
        size = int(kwargs.get("width") or 64), int(kwargs.get("height") or 64)
        if size not in photos:
            from skimage import data

            photo = Image.fromarray(data.astronaut())
            photos[size] = photo.resize(size, Image.Resampling.BILINEAR)
        return FakeOutput([photos[size].copy() for _ in range(count)])

    return call


def _image_count(kwargs: dict[str, Any]) -> int:
    # One seeded generator per image.
    generators = kwargs.get("generator")
    return len(generators) if isinstance(generators, list) else 1


class TimedPipelineCall:
    """Stands in for the loaded diffusers pipeline: its call (the real one, or `instant`)
    is timed; every attribute is the real pipeline's."""

    def __init__(self, pipeline: Any, call: Callable[..., Any], log: TimingLog) -> None:
        self._pipeline, self._call, self._log = pipeline, call, log

    def __call__(self, **kwargs: Any) -> Any:
        start = time.monotonic()
        output = self._call(**kwargs)
        end = time.monotonic()
        prompt = kwargs.get("prompt")
        prompts = list(prompt) if isinstance(prompt, list | tuple) else [prompt]
        self._log.write("pipeline", start, end, prompts=prompts, images=len(output.images))
        return output

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)


def install(generator: str, log: TimingLog, gpu_like_ms: float = 0.0) -> None:
    """Patch the worker's runtime: the pipeline call once the model is loaded, and timing
    around each content check and each job."""
    from functools import cached_property

    import workers.tasks
    from workers.classifier import OutputClassifier
    from workers.runtime import WorkerRuntime

    load = vars(WorkerRuntime)["pipeline"].func

    def pipeline(self: WorkerRuntime) -> Any:
        loaded = load(self)
        real = loaded.text2image
        calls = {"instant": instant_images, "gpu-like": gpu_like(gpu_like_ms), "model": real}
        call = calls[generator]
        loaded.text2image = TimedPipelineCall(real, call, log)
        return loaded

    patched = cached_property(pipeline)
    patched.__set_name__(WorkerRuntime, "pipeline")
    WorkerRuntime.pipeline = patched  # type: ignore[assignment,method-assign]

    classify_all = OutputClassifier.classify_all

    @functools.wraps(classify_all)
    def timed_classify_all(self: OutputClassifier, images: Sequence[Image.Image]) -> Any:
        start = time.monotonic()
        verdicts = classify_all(self, images)
        log.write("classify", start, time.monotonic(), images=len(images))
        return verdicts

    OutputClassifier.classify_all = timed_classify_all  # type: ignore[method-assign]

    run_job = vars(workers.tasks)["run_job"]

    @functools.wraps(run_job)
    def timed_run_job(runtime: WorkerRuntime, job_id: int) -> None:
        start = time.monotonic()
        try:
            run_job(runtime, job_id)
        finally:
            log.write("job", start, time.monotonic(), job=job_id)

    vars(workers.tasks)["run_job"] = timed_run_job  # what the Celery task calls


def instant_worker_process(
    generator: str,
    timings: Path,
    *,
    env: dict[str, str],
    log_dir: Path,
    name: str,
    gpu_like_ms: float = 0.0,
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """This launcher in a process group of its own until the block ends, then stopped as
    `chitrakar` processes are in the tests (SIGTERM, then SIGKILL)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--generator", generator]
    command += ["--gpu-like-ms", str(gpu_like_ms)]
    return process_group(
        [*command, "--timings", str(timings)],
        env=env,
        log_path=log_dir / f"{name}.log",
        echo_log=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other arguments go to `chitrakar worker`.",
    )
    parser.add_argument(
        "--generator",
        choices=("instant", "gpu-like", "model"),
        default="instant",
        help="instant: a fake pipeline call that returns at once; gpu-like: one that waits "
        "--gpu-like-ms an image without using the CPU; model: the real one, timed",
    )
    parser.add_argument("--gpu-like-ms", type=float, default=200.0)
    parser.add_argument("--timings", type=Path, help="append timing events here (JSON lines)")
    args, worker_args = parser.parse_known_args()
    install(args.generator, TimingLog(args.timings), args.gpu_like_ms)
    return chitrakar_main(["worker", *worker_args])


if __name__ == "__main__":
    sys.exit(main())
