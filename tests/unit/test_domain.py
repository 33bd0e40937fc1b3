from __future__ import annotations

import pytest

from chitrakar.domain import (
    ASPECT_RATIOS,
    UNANSWERED_ABANDONED_AFTER_S,
    InvalidTransition,
    JobStatus,
    ProgressThrottle,
    check_transition,
    image_size,
    was_abandoned,
)


@pytest.mark.parametrize("ratio", list(ASPECT_RATIOS))
@pytest.mark.parametrize("base", [64, 512, 1024])
def test_sizes_keep_the_ratio_and_area_in_multiples_of_8(ratio: str, base: int) -> None:
    width, height = image_size(ratio, base)
    w, h = ASPECT_RATIOS[ratio]
    assert width % 8 == 0 and height % 8 == 0
    assert abs(width / height - w / h) < 0.2
    assert 0.8 < width * height / base**2 < 1.2


def test_known_sizes() -> None:
    assert image_size("1:1", 512) == (512, 512)
    assert image_size("16:9", 512) == (680, 384)
    assert image_size("9:16", 1024) == (768, 1368)


def test_job_transitions() -> None:
    check_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    check_transition(JobStatus.RUNNING, JobStatus.RUNNING)  # a redelivered task
    check_transition(JobStatus.RUNNING, JobStatus.DONE)
    for ended in (JobStatus.DONE, JobStatus.FAILED):
        for status in JobStatus:
            with pytest.raises(InvalidTransition):
                check_transition(ended, status)
    with pytest.raises(InvalidTransition):
        check_transition(JobStatus.QUEUED, JobStatus.DONE)


def test_progress_throttle_drops_updates_inside_the_interval() -> None:
    throttle = ProgressThrottle(interval=3.0)
    allowed = [t for t in (0.0, 1.0, 2.9, 3.0, 3.5, 7.0) if throttle.allow(t)]
    assert allowed == [0.0, 3.0, 7.0]


def test_only_an_old_unanswered_queued_job_counts_as_abandoned() -> None:
    old = UNANSWERED_ABANDONED_AFTER_S + 1
    assert was_abandoned(JobStatus.QUEUED, answered=False, age_seconds=old)
    assert not was_abandoned(JobStatus.QUEUED, answered=False, age_seconds=1)
    assert not was_abandoned(JobStatus.QUEUED, answered=True, age_seconds=old)
    assert not was_abandoned(JobStatus.RUNNING, answered=False, age_seconds=old)


def test_a_request_asked_again_by_its_own_bot_answers_its_new_unanswered_job() -> None:
    """The bot asks again when its intake failed after writing the job: nobody else will
    answer that job, however new it is; one answered or started is still somebody's."""
    assert was_abandoned(JobStatus.QUEUED, answered=False, age_seconds=0, asked_before=True)
    assert not was_abandoned(JobStatus.QUEUED, answered=True, age_seconds=0, asked_before=True)
    assert not was_abandoned(JobStatus.RUNNING, answered=False, age_seconds=0, asked_before=True)
    assert not was_abandoned(JobStatus.DONE, answered=False, age_seconds=0, asked_before=True)
