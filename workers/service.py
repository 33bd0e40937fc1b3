"""Running one job: the body of the generate task, free of Celery."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import TypeVar

import torch
from PIL import Image
from sqlalchemy.exc import OperationalError

from chitrakar.artifacts import ArtifactMissing, StoredArtifact
from chitrakar.domain import ACTIVE_STATUSES, MAX_ATTEMPTS, JobKind, JobStatus, batch_key
from chitrakar.media import png_bytes
from chitrakar.presets import adjust_plan
from chitrakar.safety import ContentPolicy, ImageAction, decide
from chitrakar.services import hand_over_all_held, hand_over_held
from db import audit, heartbeats, jobs, retention
from db.audit import ChatSettingsView
from db.jobs import JobView
from db.models import utcnow
from workers.classifier import ImageVerdict
from workers.outbound import Delivered
from workers.pipelines import (
    ProgressCallback,
    image_to_image,
    text_to_image,
    upscale,
    use_lora,
)
from workers.previews import make_preview_grid
from workers.runtime import ClaimsToHandBack, WorkerRuntime

log = logging.getLogger(__name__)


class InputMissing(RuntimeError):
    """The image a job starts from is no longer on disk."""


class JobCancelled(Exception):
    """The user cancelled the job while it ran (raised from the progress callback)."""


class JobHandedBack(JobCancelled):
    """The reconciler took this worker for dead and gave the job to another: stop quietly."""


# Seconds between looks at the database for a cancellation while a job runs.
CANCEL_CHECK_INTERVAL_S = 1.0
# Jobs of one batch finished (checked, stored, sent) at once.
FINISHING_THREADS = 4


class CancelWatch:
    """Raises JobCancelled from a progress callback once the job is cancelled, looking at
    the database at most once per interval. Each look also reads the job's status message,
    which the bot may record after the job started."""

    def __init__(self, runtime: WorkerRuntime, job_id: int) -> None:
        self._runtime, self._job_id = runtime, job_id
        self._next_look = 0.0
        self.status_message_id: int | None = None

    def check(self, force: bool = False) -> None:
        now = perf_counter()
        if not force and now < self._next_look:
            return
        self._next_look = now + CANCEL_CHECK_INTERVAL_S
        try:
            with self._runtime.store.unit_of_work() as uow:
                state = jobs.running_state(uow, self._job_id)
        except OperationalError:
            # The database away for a moment: the job goes on; the next look asks again.
            log.warning("could not look whether job %s was cancelled", self._job_id)
            return
        # Gone (its user had everything deleted) or cancelled: stop.
        if state is None or state.status == JobStatus.CANCELLED:
            raise JobCancelled(self._job_id)
        if (state.status, state.worker) != (JobStatus.RUNNING, self._runtime.name):
            raise JobHandedBack(self._job_id)
        self.status_message_id = state.status_message_id


def run_job(runtime: WorkerRuntime, job_id: int) -> None:
    """Make a job's images and deliver them; on any failure, record it and apologise.
    A job that has already ended is left alone, so a redelivered task does no harm. Queued
    jobs that can share its pipeline call are taken along (dynamic batching). The batch is
    finished (checked, stored, sent) by the runtime's finishing lane, on a GPU while the next
    pipeline call runs. When each job ends, its user's next held job (if any) is handed to
    the broker."""
    if runtime.finishing.holds(job_id):
        # A batch mate's own message, while the batch is being finished here. Running on this
        # worker, which start_job would take for an attempt that died with its task, it is
        # the lane's. Handed back meanwhile, it is this message's once the lane has let go of
        # it. Ended, or running elsewhere, start_job finds nothing to do.
        try:
            with runtime.store.unit_of_work() as uow:
                state = jobs.running_state(uow, job_id)
        except OperationalError:
            # The database away for a moment: once the lane has let go of the job, start_job
            # finds whether there is anything left to do (dropping the message would leave
            # a job handed back meanwhile to the reconciler's next republish, minutes away).
            log.warning("could not look at job %s; waiting for its batch to be finished", job_id)
            runtime.finishing.wait()
            state = None
        status, worker = (state.status, state.worker) if state is not None else (None, None)
        if (status, worker) == (JobStatus.RUNNING, runtime.name):
            log.info("job %s is being finished by this worker; nothing to do", job_id)
            return
        if status == JobStatus.QUEUED:
            runtime.finishing.wait()
    if runtime.claims_to_hand_back:
        _hand_back_claims_left(runtime)
    # Ends of earlier jobs a database outage kept from being recorded (the heartbeat tries
    # too, for a worker left idle).
    runtime.record_ends_left()

    def start() -> JobView | None:
        alive_since = datetime.now(UTC) - timedelta(seconds=runtime.settings.worker_stale_after)
        with runtime.store.unit_of_work() as uow:
            return jobs.start_job(uow, job_id, runtime.name, alive_since)

    try:
        # A database away for a moment (a failover) costs a wait, not the message; away for
        # longer, the OperationalError escapes, and the task's base sends the message again
        # later (workers.tasks.JobTask).
        job = _with_retries(start, f"job {job_id} started")
    except jobs.JobNotFound:
        _forgotten(runtime, job_id)
        return
    if job is None:
        log.info("job %s has ended or runs on a live worker; nothing to do", job_id)
        return
    batch = [job, *_companions(runtime, job)]
    try:
        finishes = _run_batch(runtime, batch)
    except BaseException:
        _end_batch(runtime, batch)
        raise
    runtime.finishing.run(
        partial(_finish_batch, runtime, batch, finishes), [one.id for one in batch]
    )


def _finish_batch(
    runtime: WorkerRuntime, batch: list[JobView], finishes: list[Callable[[], object]]
) -> None:
    try:
        if len(finishes) == 1:
            finishes[0]()
        elif finishes:
            # A batch's jobs are checked, stored and sent side by side: the content check,
            # the PNG encoding and the waits on the Bot API let go of the GIL, so that the
            # later jobs of a batch do not wait for every earlier one.
            with ThreadPoolExecutor(min(len(finishes), FINISHING_THREADS), "finish") as pool:
                for done in [pool.submit(finish) for finish in finishes]:
                    done.result()
    finally:
        _end_batch(runtime, batch)


def _end_batch(runtime: WorkerRuntime, batch: list[JobView]) -> None:
    """What follows a batch however it went: each job's selfie and its user's held jobs,
    then the delivered jobs whose end could not be recorded."""
    try:
        _after_each(runtime, batch)
    finally:
        _hand_back_delivered(runtime, batch)


def _hand_back_delivered(runtime: WorkerRuntime, batch: list[JobView]) -> None:
    """A job delivered whose end could not be recorded is handed back and published: its
    own message may have been taken while the batch was finished. Another try records the
    end and sends nothing. (One not delivered is left running, as before: whether its
    photo went out is not known, and a second one must not.)"""
    job_ids = [one.id for one in batch]
    try:
        _hand_back_delivered_now(runtime, job_ids)
    except OperationalError:
        # The database still away: tried again once it answers (`record_ends_left`).
        log.exception("jobs %s: ends left unrecorded are looked for again later", job_ids)
        runtime.ends_to_record.append(partial(_hand_back_delivered_now, runtime, job_ids))
    except Exception:
        log.exception("jobs %s: could not look for ends left unrecorded", job_ids)


def _hand_back_delivered_now(runtime: WorkerRuntime, job_ids: list[int]) -> None:
    with runtime.store.unit_of_work() as uow:
        handed = jobs.hand_back_delivered(uow, job_ids, runtime.name)
    for job_id in handed:
        log.warning("job %s was delivered but its end not recorded; published again", job_id)
        try:
            runtime.publish(job_id)
        except Exception:  # it is queued: the reconciler publishes it again
            log.exception("job %s could not be published; left to the reconciler", job_id)


def _after_each(runtime: WorkerRuntime, batch: list[JobView]) -> None:
    for one in batch:
        try:
            _drop_selfie_if_not_kept(runtime, one)
            limit = runtime.settings.max_jobs_in_flight
            hand_over_held(runtime.store, runtime.publish, one.id, limit)
        except jobs.JobNotFound:
            _forgotten(runtime, one.id)
        except Exception:
            # The rest of the batch still gets its turn; the reconciler hands over what this
            # one's user has held.
            log.exception("job %s: handing over its user's held jobs failed", one.id)


def _forgotten(runtime: WorkerRuntime, job_id: int) -> None:
    # Its user had everything about them deleted (/forget) meanwhile: so are its images.
    log.info("job %s no longer exists; its results are deleted", job_id)
    runtime.artifacts.delete_prefix(f"results/{job_id}/")


def _companions(runtime: WorkerRuntime, leader: JobView) -> list[JobView]:
    """Queued jobs to draw in one call with the leader. Those already waiting are taken at
    once; when other jobs wait too (the worker is busy), it waits `batch_window_ms` once
    more for companions still arriving. A lone user's job never waits. When the database
    goes away meanwhile, the batch goes on with the claims known to be committed; the others
    are handed back (`_hand_back_unseen_claims`)."""
    # Only first attempts batch: a job that killed a worker runs alone next time.
    if leader.delivered or leader.attempts != 1:
        return []
    if batch_key(leader.kind, leader.plan) is None:
        return []
    found: list[JobView] = []
    try:
        _claim_companions(runtime, leader, found)
    except Exception:
        log.exception("job %s: could not look for jobs to batch with it", leader.id)
        _hand_back_unseen_claims(runtime, leader, found)
    if found:
        log.info("job %s batched with %s", leader.id, [job.id for job in found])
    return found


def _claim_companions(runtime: WorkerRuntime, leader: JobView, found: list[JobView]) -> None:
    """Adds to `found` the companions of each claim as soon as it is committed."""
    settings = runtime.settings
    limit = settings.max_batch_images
    with runtime.store.unit_of_work() as uow:
        # A lone user's job (nothing else handed over and waiting) claims nothing: one
        # read instead of a claim's transaction.
        if not jobs.queued_elsewhere(uow, [leader.id]):
            return
        found += jobs.claim_batch(uow, leader, runtime.name, limit)
        room = limit // len(leader.plan.seeds) - 1 - len(found)
        # In the same session: whether the worker is busy, so worth waiting for more.
        busy = (
            room > 0
            and settings.batch_window_ms > 0
            and jobs.queued_elsewhere(uow, [leader.id, *(job.id for job in found)])
        )
    if busy:
        time.sleep(settings.batch_window_ms / 1000)
        with runtime.store.unit_of_work() as uow:
            found += jobs.claim_batch(uow, leader, runtime.name, limit, [job.id for job in found])


def _hand_back_unseen_claims(runtime: WorkerRuntime, leader: JobView, found: list[JobView]) -> None:
    """A claim whose commit failed may have been written all the same: its jobs run on this
    worker, which does not make them, and their own messages, on another worker, would find
    them running on a live one and do nothing. They go back to the queue and are published
    again (a copy that finds its job started or ended does nothing). When even that fails
    (a long outage), the next tasks try again."""
    assert leader.started_at is not None  # start_job set it
    claims = ClaimsToHandBack(
        leader.id, leader.started_at, utcnow(), (leader.id, *(job.id for job in found))
    )
    try:
        _with_retries(partial(_hand_back, runtime, claims), f"job {leader.id}'s claims")
    except Exception:
        log.exception(
            "job %s: claims of its batch left unmade; the next task tries again", leader.id
        )
        runtime.claims_to_hand_back.append(claims)


def _hand_back_claims_left(runtime: WorkerRuntime) -> None:
    for claims in list(runtime.claims_to_hand_back):
        try:
            _hand_back(runtime, claims)
        except Exception:
            log.warning("job %s: claims of its batch still not handed back", claims.leader_id)
            return
        runtime.claims_to_hand_back.remove(claims)


def _hand_back(runtime: WorkerRuntime, claims: ClaimsToHandBack) -> None:
    with runtime.store.unit_of_work() as uow:
        handed = jobs.hand_back_unseen_claims(
            uow, runtime.name, claims.since, claims.until, claims.kept
        )
    for job_id in handed:
        log.warning(
            "job %s, claimed for job %s's batch unseen, published again", job_id, claims.leader_id
        )
        try:
            runtime.publish(job_id)
        except Exception:  # it is queued: the reconciler publishes it again
            log.exception("job %s could not be published; left to the reconciler", job_id)


class _AllStopped(JobCancelled):
    """Every job of a batch was cancelled or handed back: the pipeline call ends."""


def _run_batch(runtime: WorkerRuntime, batch: list[JobView]) -> list[Callable[[], object]]:
    """The batch's pipeline call; what is left to do for each job it made images for (check,
    store, send, record) is returned, for the finishing lane."""
    leader = batch[0]
    if leader.delivered:
        # Its worker stopped between sending the result and recording the end.
        log.warning("job %s was delivered already; recording its end only", leader.id)
        _record_end(runtime, leader, leader.result_paths, leader.result_checksums, None)
        return []
    if leader.attempts > MAX_ATTEMPTS:
        _give_up(runtime, leader.id, f"gave up after {MAX_ATTEMPTS} attempts")
        return []
    delivery = runtime.delivery
    live: list[JobView] = []
    for job in batch:
        log.info("job %s (%s) started (attempt %s)", job.id, job.kind, job.attempts)
        if _each(runtime, job, partial(delivery.started, job)):
            live.append(job)
    if not live:
        return []
    watches = {job.id: CancelWatch(runtime, job.id) for job in batch}

    def on_progress(done: int, total: int) -> None:
        for index, job in reversed(list(enumerate(live))):
            watch = watches[job.id]
            try:
                watch.check()
            except JobCancelled as stop:
                del live[index]
                _stopped(runtime, job, stop)
                continue
            if job.status_message_id is None and watch.status_message_id is not None:
                # Recorded by the bot after the job started: it shows progress from now on.
                live[index] = replace(job, status_message_id=watch.status_message_id)
                delivery.started(live[index])
        if not live:
            raise _AllStopped(leader.id)
        for job in live:
            delivery.progress(job, done, total)

    started = perf_counter()
    grid: Path | None = None
    images: dict[int, list[Image.Image]] = {}
    try:
        if leader.kind == JobKind.PREVIEWS:
            grid = _previews(runtime, on_progress)
        else:
            images = make_batch_images(runtime, live, on_progress)
    except _AllStopped:
        return []
    except JobCancelled as stop:
        _stopped(runtime, leader, stop)
        return []
    except Exception as exc:
        log.exception("job(s) %s failed", [job.id for job in live])
        reason = f"{type(exc).__name__}: {exc}"
        for job in live:
            _each(runtime, job, partial(_give_up, runtime, job.id, reason), give_up=False)
        return []
    seconds = perf_counter() - started
    # _finish fails its job itself up to the delivery; what escapes it is a record after.
    return [
        partial(
            _each,
            runtime,
            job,
            partial(_finish, runtime, job, seconds, watches[job.id], images.get(job.id), grid),
            give_up=False,
        )
        for job in live
    ]


def _each(
    runtime: WorkerRuntime, job: JobView, step: Callable[[], None], give_up: bool = True
) -> bool:
    """Run one job's step of a batch so that whatever escapes it (its user deleted
    everything meanwhile, a database away for longer than the retries) stays with that job
    and the others go on. The job is then failed, unless `give_up` is False (its result may
    have reached the chat: it is not apologised for). False if it raised."""
    try:
        step()
        return True
    except jobs.JobNotFound:
        _forgotten(runtime, job.id)
    except Exception:
        log.exception("job %s: a step failed", job.id)
        if give_up:
            try:
                _give_up(runtime, job.id, "the worker could not start it")
            except Exception:
                log.exception("job %s could not be recorded as failed either", job.id)
    return False


def _stopped(runtime: WorkerRuntime, job: JobView, stop: JobCancelled) -> None:
    if isinstance(stop, JobHandedBack):
        log.warning("job %s was handed to another worker meanwhile; stopped", job.id)
    else:
        log.info("job %s was cancelled while it ran; stopped", job.id)
    # No progress edit still on its way may overwrite the bot's "Cancelled."
    runtime.delivery.stop_progress(job)


def _finish(
    runtime: WorkerRuntime,
    job: JobView,
    seconds: float,
    watch: CancelWatch,
    images: list[Image.Image] | None = None,
    grid: Path | None = None,
) -> None:
    """Check, store and send one job's images (or its preview grid), then record that it
    was delivered and ended. A failure here fails this job alone, not its batch."""
    job_id, delivery = job.id, runtime.delivery
    stored: list[StoredArtifact] = []
    try:
        if grid is not None:
            # No results to name, but the status message to remove is the one recorded now.
            status_message_id = _with_retries(
                lambda: _record_results(runtime, job_id, []), f"job {job_id} results"
            )
            job = replace(job, status_message_id=status_message_id)
            sent = Delivered(file_ids=delivery.deliver_previews(job, grid), message_ids=[])
        else:
            assert images is not None
            # The content check runs while the rest that does not need its verdict is done
            # (onnxruntime, zlib and the database let go of the GIL): the last look for a
            # cancellation, the chat told a photo is coming, the images encoded and stored,
            # the chat's policy read. A user waits for the longer of the two only.
            with ThreadPoolExecutor(1, thread_name_prefix=f"check-{job_id}") as checker:
                checking = checker.submit(runtime.classifier.classify_all, images)
                watch.check(force=True)
                delivery.uploading(job)
                stored = _save(runtime, job, images)
                with runtime.store.unit_of_work() as uow:
                    chat = audit.chat_settings(uow, job.channel, job.chat_id)
                verdicts = checking.result()
            action = moderate(runtime, job, chat, verdicts, stored, seconds)
            if action == ImageAction.BLOCK:
                return
            status_message_id = _with_retries(
                lambda: _record_results(runtime, job_id, stored), f"job {job_id} results"
            )
            # The caption tells the steps and guidance that ran: a few-step preset fixes them.
            # The status message to remove is the one recorded by now (the bot removes one it
            # records later).
            ran = replace(
                job,
                plan=adjust_plan(runtime.pipeline.preset, job.plan),
                status_message_id=status_message_id,
            )
            sent = delivery.deliver(ran, images, seconds, spoiler=action == ImageAction.SPOILER)
    except JobCancelled as stop:
        _stopped(runtime, job, stop)
        return
    except jobs.JobNotFound:
        raise  # its user's data deleted meanwhile: its caller deletes what was stored
    except Exception as exc:
        log.exception("job %s failed", job_id)
        _give_up(runtime, job_id, f"{type(exc).__name__}: {exc}")
        return
    finally:
        # Whatever ended it (sent, blocked, failed, or its user's data gone meanwhile), the
        # channel keeps nothing about the job's progress or upload.
        delivery.stop_progress(job)
    keys, checksums = [a.key for a in stored], [a.sha256 for a in stored]
    try:
        try:
            # Recorded at once: a task delivered again after this sends nothing twice.
            _with_retries(lambda: _mark_delivered(runtime, job, sent), f"job {job_id} delivered")
        except OperationalError:
            # The database away past the retries: the job would stay running on this live
            # worker, holding its user's place, until the worker stopped and it was sent
            # again. Recorded once the database answers, as a failure is (`record_ends_left`).
            log.exception("job %s: its delivery is recorded once the database answers", job_id)
            runtime.ends_to_record.append(
                partial(_record_delivery_later, runtime, job, sent, keys, checksums, seconds)
            )
            return
        # An end that cannot be recorded now is handed back, delivered (`_end_batch`).
        _record_delivered_end(runtime, job, sent, keys, checksums, seconds)
    finally:
        # The images are in the chat however the records went: an album's buttons go too.
        sent.follow_up()
    log.info("job %s done: %d image(s) in %.2f s", job_id, len(sent.file_ids), seconds)


def _record_results(
    runtime: WorkerRuntime, job_id: int, stored: list[StoredArtifact]
) -> int | None:
    keys, checksums = [a.key for a in stored], [a.sha256 for a in stored]
    try:
        with runtime.store.unit_of_work() as uow:
            return jobs.record_results(uow, job_id, runtime.name, keys, checksums)
    except jobs.HandedBack:
        # Between the last look and now: the worker that has it sends it, not this one.
        raise JobHandedBack(job_id) from None
    except jobs.Cancelled:
        # Between the last look and now, and nothing sent yet: stopped, as at a look.
        raise JobCancelled(job_id) from None


def _record_delivery_later(
    runtime: WorkerRuntime,
    job: JobView,
    sent: Delivered,
    keys: Sequence[str],
    checksums: Sequence[str],
    seconds: float,
) -> None:
    """What `_finish` could not record after the chat took the result: raises while the
    database is still away."""
    try:
        with runtime.store.unit_of_work() as uow:
            delivered = jobs.get_job(uow, job.id)
        if delivered is not None and not delivered.delivered:
            _mark_delivered(runtime, job, sent)
        _record_delivered_end(runtime, job, sent, keys, checksums, seconds)
    except jobs.JobNotFound:
        _forgotten(runtime, job.id)
        return
    log.warning("job %s: its delivery recorded at last", job.id)


def _record_delivered_end(
    runtime: WorkerRuntime,
    job: JobView,
    sent: Delivered,
    keys: Sequence[str],
    checksums: Sequence[str],
    seconds: float,
) -> None:
    delivered = replace(job, result_file_ids=tuple(sent.file_ids))
    _record_end(runtime, delivered, keys, checksums, seconds)


def _mark_delivered(runtime: WorkerRuntime, job: JobView, sent: Delivered) -> None:
    chat_id = job.chat_id if sent.chat_id is None else sent.chat_id
    with runtime.store.unit_of_work() as uow:
        jobs.mark_delivered(uow, job.id, chat_id, sent.file_ids, sent.message_ids)


def _record_end(
    runtime: WorkerRuntime,
    job: JobView,
    keys: Sequence[str],
    checksums: Sequence[str],
    seconds: float | None,
) -> None:
    def complete() -> None:
        with runtime.store.unit_of_work() as uow:
            jobs.complete_job(
                uow,
                job.id,
                result_paths=list(keys),
                result_checksums=list(checksums),
                result_file_ids=list(job.result_file_ids),
                generation_seconds=seconds,
            )

    _with_retries(complete, f"job {job.id} done")


# After the user has their result, its record must not be lost to a database that is away
# for a moment: tries, and the waits between them.
RECORD_RETRY_WAITS_S = (0.5, 2.0, 5.0)
T = TypeVar("T")


def _with_retries(write: Callable[[], T], what: str) -> T:
    for wait in (*RECORD_RETRY_WAITS_S, None):
        try:
            return write()
        except OperationalError:
            if wait is None:
                raise
            log.warning("could not record that %s; trying again in %.1f s", what, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def moderate(
    runtime: WorkerRuntime,
    job: JobView,
    chat: ChatSettingsView,
    verdicts: list[ImageVerdict],
    stored: list[StoredArtifact],
    seconds: float,
) -> ImageAction:
    """What the content check's verdicts on a job's images mean for it. A flagged image,
    under the chat's policy (or the deployment's), blocks the job (its credits come back, the
    images stay for review), goes under a spoiler, or is sent. A group may also want every
    result under a spoiler."""
    flagged = [v for v in verdicts if v.flagged]
    policy = ContentPolicy(chat.content_policy or runtime.settings.content_policy)
    action = decide(bool(flagged), policy)
    if flagged:
        labels = sorted({label for v in flagged for label in v.labels})
        with runtime.store.unit_of_work() as uow:
            audit.record(
                uow,
                channel=job.channel,
                actor="system",
                actor_role="system",
                action=f"output_{action}",
                target=f"job:{job.id}",
                chat_id=job.chat_id,
                reason=f"content check under policy {policy}",
                detail={"labels": labels, "requester": job.requester},
            )
    if action == ImageAction.BLOCK:
        with runtime.store.unit_of_work() as uow:
            blocked = jobs.block_job(
                uow,
                job.id,
                "blocked by the content check",
                result_paths=[artifact.key for artifact in stored],
                result_checksums=[artifact.sha256 for artifact in stored],
                generation_seconds=seconds,
            )
        if blocked is not None:
            runtime.delivery.blocked(blocked)
        log.warning("job %s blocked by the content check", job.id)
        return action
    return ImageAction.SPOILER if chat.spoilers else action


class GpuOutOfMemory(RuntimeError):
    """The job does not fit the GPU even one image at a time."""


def make_images_within_memory(
    runtime: WorkerRuntime, job: JobView, on_progress: ProgressCallback
) -> list[Image.Image]:
    """The job's images; when they do not fit the GPU's memory together, once more one image
    at a time with the VAE decoding in slices and tiles (each image keeps its seed), and then
    a clear failure."""
    try:
        return make_images(runtime, job, on_progress)
    except torch.OutOfMemoryError:
        log.warning("job %s ran out of GPU memory; trying one image at a time", job.id)
    _free_gpu_memory()
    images: list[Image.Image] = []
    try:
        with _vae_in_tiles(runtime):
            for seed in job.plan.seeds:
                single = replace(job, plan=replace(job.plan, seeds=(seed,)))
                images += make_images(runtime, single, on_progress)
    except torch.OutOfMemoryError as exc:
        _free_gpu_memory()
        raise GpuOutOfMemory(
            f"out of GPU memory even one image at a time ({job.plan.width}×{job.plan.height}, "
            f"{job.plan.steps} steps)"
        ) from exc
    return images


def _free_gpu_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def _vae_in_tiles(runtime: WorkerRuntime) -> Iterator[None]:
    """The VAE decoding in slices and tiles, which needs far less memory, for a retry only:
    tiles change the pixels of an image larger than a tile (a seam may show), so the jobs
    after it decode whole again, unless the preset itself slices and tiles. Every view of
    the model shares this VAE."""
    vae = getattr(runtime.pipeline.text2image, "vae", None)
    switches = [
        name for name in ("slicing", "tiling") if getattr(vae, f"use_{name}", True) is False
    ]
    for name in switches:
        getattr(vae, f"enable_{name}")()
    try:
        yield
    finally:
        for name in switches:
            getattr(vae, f"disable_{name}")()


def make_batch_images(
    runtime: WorkerRuntime, batch: list[JobView], on_progress: ProgressCallback
) -> dict[int, list[Image.Image]]:
    """Each job's images, by job id: a batch of text-to-image jobs in one pipeline call
    (each image keeps its own seed's noise), or a lone job by `make_images_within_memory`.
    A batch that does not fit the GPU's memory is made job by job (those still wanted:
    `batch` is the live list, which cancellations shorten)."""
    if len(batch) == 1:
        return {batch[0].id: make_images_within_memory(runtime, batch[0], on_progress)}
    # The images come back in this order, whatever cancellations do to `batch` meanwhile.
    members = list(batch)
    loaded, plan = runtime.pipeline, members[0].plan
    use_lora(loaded, plan.lora, plan.lora_scale)
    try:
        extra = runtime.identity.without_face(loaded)
        images = text_to_image(loaded, [job.plan for job in members], on_progress, **extra)
    except torch.OutOfMemoryError:
        log.warning("a batch of %d jobs ran out of GPU memory; making them one by one", len(batch))
        images = None
    if images is None:
        # Outside the except block: its traceback would keep the failed call's tensors alive.
        _free_gpu_memory()
        return {job.id: make_images_within_memory(runtime, job, on_progress) for job in list(batch)}
    made, start = {}, 0
    for job in members:
        made[job.id] = images[start : start + len(job.plan.seeds)]
        start += len(job.plan.seeds)
    return made


def make_images(
    runtime: WorkerRuntime, job: JobView, on_progress: ProgressCallback
) -> list[Image.Image]:
    """The one place that picks the pipeline call for a kind of job."""
    loaded, plan = runtime.pipeline, job.plan
    use_lora(loaded, plan.lora, plan.lora_scale)
    if job.kind == JobKind.AVATAR:
        return runtime.identity.avatars(loaded, plan, _selfie(job), on_progress)
    extra = runtime.identity.without_face(loaded)
    if job.kind == JobKind.PORTRAIT:
        return text_to_image(loaded, plan, on_progress, **extra)
    if job.kind == JobKind.VARIATION:
        return image_to_image(loaded, plan, _parent_result(runtime, job), on_progress, **extra)
    if job.kind == JobKind.UPSCALE:
        tile = runtime.settings.image_size
        start = _parent_result(runtime, job)
        return upscale(loaded, plan, start, tile, on_progress, **extra)
    raise ValueError(f"job {job.id} is of a kind no pipeline makes: {job.kind}")


def _selfie(job: JobView) -> Image.Image:
    if job.input_path is None or not Path(job.input_path).is_file():
        raise InputMissing(f"the selfie of job {job.id} is gone: {job.input_path}")
    with Image.open(job.input_path) as image:
        return image.convert("RGB")


def _parent_result(runtime: WorkerRuntime, job: JobView) -> Image.Image:
    """The earlier result a variation or upscale starts from, checked against its checksum."""
    with runtime.store.unit_of_work() as uow:
        parent = jobs.get_job(uow, job.parent_job_id) if job.parent_job_id else None
    index = job.parent_index
    if parent is None or index is None or index >= len(parent.result_paths):
        raise InputMissing(f"job {job.id} starts from a result that is gone")
    checksum = parent.result_checksums[index] if index < len(parent.result_checksums) else None
    try:
        data = runtime.artifacts.get(parent.result_paths[index], checksum)
    except ArtifactMissing:
        raise InputMissing(f"job {job.id} starts from a result that is gone") from None
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _save(runtime: WorkerRuntime, job: JobView, images: list[Image.Image]) -> list[StoredArtifact]:
    """Store each image as PNG under results/<job>/; the job row keeps keys and checksums."""
    return [
        runtime.artifacts.put(f"results/{job.id}/{index}-{seed}.png", png_bytes(image))
        for index, (image, seed) in enumerate(zip(images, job.plan.seeds, strict=True))
    ]


def _previews(runtime: WorkerRuntime, on_progress: ProgressCallback) -> Path:
    return make_preview_grid(
        runtime.pipeline,
        runtime.catalogue,
        runtime.media,
        runtime.settings.model_label,
        runtime.settings.image_size,
        on_progress,
        extra=runtime.identity.without_face(runtime.pipeline),
    )


def _drop_selfie_if_not_kept(runtime: WorkerRuntime, job: JobView) -> None:
    """With CHITRAKAR_INPUT_RETENTION_HOURS=0 a selfie crop goes as soon as its job ends;
    otherwise the hourly retention sweep removes it when due. A job still queued or running
    (handed back to another worker meanwhile, or left running) keeps it for that attempt."""
    if job.kind != JobKind.AVATAR or job.input_path is None:
        return
    if runtime.settings.input_retention_hours > 0:
        return
    with runtime.store.unit_of_work() as uow:
        state = jobs.running_state(uow, job.id)
    if state is not None and state.status in ACTIVE_STATUSES:
        return
    runtime.media.forget_input(job.input_path)
    with runtime.store.unit_of_work() as uow:
        retention.forget_input(uow, job.input_path)


def _give_up(runtime: WorkerRuntime, job_id: int, reason: str) -> None:
    """Fail the job (refunded) and apologise. A database away for longer than the retries
    would leave it running on this live worker, which nothing else ends: the failure is
    recorded, and the apology sent, once the database answers (`record_ends_left`)."""
    try:
        failed = _with_retries(partial(_fail, runtime, job_id, reason), f"job {job_id} failed")
    except OperationalError:
        log.exception("job %s: its failure is recorded once the database answers", job_id)
        runtime.ends_to_record.append(partial(_give_up_later, runtime, job_id, reason))
        return
    _apologise(runtime, failed)


def _fail(runtime: WorkerRuntime, job_id: int, reason: str) -> JobView | None:
    with runtime.store.unit_of_work() as uow:
        return jobs.fail_job(uow, job_id, reason, runtime.name)


def _give_up_later(runtime: WorkerRuntime, job_id: int, reason: str) -> None:
    """A failure `_give_up` could not record: raises while the database is still away."""
    try:
        failed = _fail(runtime, job_id, reason)
    except jobs.JobNotFound:
        _forgotten(runtime, job_id)
        return
    log.warning("job %s: its failure recorded at last", job_id)
    try:
        _apologise(runtime, failed)
    except Exception:  # recorded: the apology is not tried again
        log.exception("job %s: could not apologise", job_id)


def _apologise(runtime: WorkerRuntime, failed: JobView | None) -> None:
    if failed is None:
        return
    if failed.kind == JobKind.AVATAR and failed.parent_job_id is None:
        # Only a done avatar's selfie is kept (for Again); a failed one's is of no further use.
        runtime.media.forget_input(failed.input_path)
    runtime.delivery.apologise(failed)


def requeue_unfinished(runtime: WorkerRuntime, publish: Callable[[int], None]) -> int:
    """Publish again every job the database says was handed to the broker and is still
    queued or running. Only for a sole worker that has just started (as in `chitrakar run`):
    then no other process can hold those jobs, and a message the embedded broker lost with a
    stopped worker is replaced. A job that turns out to be done already is skipped by
    `run_job`; held jobs stay held until one of their user's jobs ends."""
    with runtime.store.unit_of_work() as uow:
        # Their running jobs are this worker's to take up, at once.
        heartbeats.forget_all_but(uow, runtime.name)
    with runtime.store.unit_of_work() as uow:
        job_ids = jobs.handed_over_active_job_ids(uow)
    for job_id in job_ids:
        publish(job_id)
    if job_ids:
        log.warning("re-queued %d unfinished job(s): %s", len(job_ids), job_ids)
    # Held jobs whose user has places free (their hand-over was lost with a stop).
    limit = runtime.settings.max_jobs_in_flight
    return len(job_ids) + len(hand_over_all_held(runtime.store, publish, limit))
