"""Retention: results are deleted CHITRAKAR_RETENTION_DAYS after their job ended (named on the
job or not: a job that failed between storing its images and naming them keeps them stored;
but one a queued or running variation or upscale starts from stays until that job ends),
selfie crops CHITRAKAR_INPUT_RETENTION_HOURS after the last job that used them (0: as soon
as it ends), and result files of jobs that no longer exist (left by a failed deletion) are
removed; web chat messages go with the results (they hold the prompts), with expired
sign-ins; what a user since forgotten used on a day goes once the day is over
(db.privacy.delete). Run hourly by Celery beat (`retention_sweep`), or by hand with
`chitrakar retention sweep`."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from chitrakar.artifacts import ArtifactStore
from chitrakar.config import Settings
from chitrakar.media import MediaStore
from chitrakar.quota import quota_day
from db import retention, web
from db.session import Store

log = logging.getLogger(__name__)

_RESULT_KEY = re.compile(r"results/(?P<job>[0-9]+)/")
# The web chat's change feed only has to reach pages that are open.
WEB_CHANGES_KEPT = timedelta(days=1)


@dataclass(frozen=True)
class SweepReport:
    results: int = 0  # jobs whose results were deleted (named on the job or not)
    inputs: int = 0  # selfie crops deleted
    orphans: int = 0  # result files of jobs that no longer exist
    web_messages: int = 0  # web chat messages older than the retention period
    carried: int = 0  # what forgotten users used on days now over


def sweep(
    settings: Settings,
    store: Store,
    artifacts: ArtifactStore,
    media: MediaStore,
    now: datetime,
) -> SweepReport:
    """Delete what is due at `now` (an aware datetime), files first, then the references."""
    results_cut_off = now - timedelta(days=settings.retention_days)
    with store.unit_of_work() as uow:
        due = retention.results_due(uow, results_cut_off)
    for job_id in due:
        artifacts.delete_prefix(f"results/{job_id}/")
        with store.unit_of_work() as uow:
            retention.forget_results(uow, job_id)

    cut_off = now - timedelta(hours=settings.input_retention_hours)
    with store.unit_of_work() as uow:
        inputs = retention.inputs_due(uow, cut_off)
    for path in inputs:
        media.forget_input(path)
        with store.unit_of_work() as uow:
            retention.forget_input(uow, path)

    by_job: dict[int, list[str]] = {}
    for key in artifacts.keys("results/"):
        if match := _RESULT_KEY.match(key):
            by_job.setdefault(int(match["job"]), []).append(key)
    with store.unit_of_work() as uow:
        known = retention.existing_job_ids(uow, list(by_job))
        # Files of jobs that ended before the cut-off without naming them (stored before
        # the content check's verdict, then the job failed).
        unnamed = retention.unnamed_results_due(uow, sorted(known - set(due)), results_cut_off)
    orphans = [job_id for job_id in by_job if job_id not in known]
    for job_id in orphans + unnamed:
        artifacts.delete_prefix(f"results/{job_id}/")

    with store.unit_of_work() as uow:
        messages = web.forget_messages_before(uow, now - timedelta(days=settings.retention_days))
        web.end_expired(uow, now)
        web.prune_changes(uow, now - WEB_CHANGES_KEPT)
    with store.unit_of_work() as uow:
        carried = retention.forget_carried_before(uow, quota_day(now, settings.zone))

    report = SweepReport(
        results=len(due) + len(unnamed),
        inputs=len(inputs),
        orphans=len(orphans),
        web_messages=messages,
        carried=carried,
    )
    if report != SweepReport():
        log.info("retention sweep: %s", report)
    return report
