"""The queue contract between bot and workers: one Celery configuration, task names by string.

The bot publishes by task name, so it never imports the worker's code (or torch). With no
broker configured, the broker is kombu's filesystem transport in the data dir (made safe for a
reader and a writer at once: chitrakar.filesystem_broker): a real transport that persists to
disk and works across processes, with no server to install.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery

from chitrakar.config import Settings
from chitrakar.filesystem_broker import TRANSPORT as FILESYSTEM_TRANSPORT
from chitrakar.filesystem_broker import WAIT_CAP_OPTION

QUEUE = "chitrakar.generate"
GENERATE_TASK = "chitrakar.generate_images"
RETENTION_TASK = "chitrakar.retention_sweep"
HAND_OVER_TASK = "chitrakar.hand_over_held"
# How often beat looks for held jobs whose hand-over was lost.
HAND_OVER_EVERY_S = 300
# How often beat runs the retention sweep.
RETENTION_SWEEP_EVERY_S = 3600
# A redelivered message must not arrive while the job is still running: longer than any job.
VISIBILITY_TIMEOUT_S = 3 * 3600
# The longest a worker waits for a message on the embedded broker before it looks again:
# how long a stop request may wait (Celery's loop would wait 2 s).
WORKER_WAIT_CAP_S = 0.25


def celery_config(settings: Settings, *, worker: bool = False) -> dict[str, Any]:
    """Celery's configuration for these settings; `worker` for a worker's app (its waits for
    a message on the embedded broker are capped, so that a stop request is seen at once)."""
    config: dict[str, Any] = {
        "broker_url": settings.resolved_broker_url,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": QUEUE,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Acknowledge after the job, and hand it back if the worker dies: the database
        # decides whether a redelivered job still needs doing.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "retention-sweep": {
                "task": RETENTION_TASK,
                "schedule": RETENTION_SWEEP_EVERY_S,
                "options": {"queue": QUEUE},
            },
            "hand-over-held": {
                "task": HAND_OVER_TASK,
                "schedule": HAND_OVER_EVERY_S,
                "options": {"queue": QUEUE},
            },
        },
        "beat_schedule_filename": str(settings.resolved_data_dir / "beat-schedule"),
    }
    if settings.resolved_broker_url.startswith("filesystem://"):
        queue_dir = settings.broker_dir / "queue"
        control_dir = settings.broker_dir / "control"
        for folder in (queue_dir, control_dir):
            folder.mkdir(parents=True, exist_ok=True)
        config["broker_transport"] = FILESYSTEM_TRANSPORT
        config["broker_transport_options"] = {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            # Exchange bindings; kombu's default is ./control in the working directory.
            "control_folder": str(control_dir),
            # Seconds between looks at the folder when it is empty.
            "polling_interval": 0.1,
        }
        if worker:
            config["broker_transport_options"][WAIT_CAP_OPTION] = WORKER_WAIT_CAP_S
        # Remote control would leave a broadcast queue folder entry per worker start on disk;
        # the database, not remote control, says what is running.
        config["worker_enable_remote_control"] = False
    else:
        config["broker_transport_options"] = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    return config


def make_celery(settings: Settings, name: str = "chitrakar", *, worker: bool = False) -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings, worker=worker))
    return app


def publish_generate(app: Celery, job_id: int) -> None:
    app.send_task(GENERATE_TASK, args=[job_id], queue=QUEUE, **_shown_as(job_id))


def publish_generate_many(app: Celery, job_ids: Sequence[int]) -> None:
    """Publish several jobs in one round trip to the broker (kombu's publish batch: one Redis
    pipeline; the filesystem transport writes each at once). Sent once, with no retry: when
    it raises, any of the jobs may or may not have been published."""
    with app.producer_or_acquire() as producer, producer.batch():
        for job_id in job_ids:
            app.send_task(
                GENERATE_TASK, args=[job_id], queue=QUEUE, producer=producer, **_shown_as(job_id)
            )


def prepare_to_publish(app: Celery, timeout: float) -> None:
    """Do at start what the first publish would do at its command's cost: import the broker's
    transport (redis-py alone takes 100 ms or more to import), connect, and load the result
    backend Celery looks at on each send. Raises when the broker cannot be reached within
    `timeout` seconds."""
    app.backend  # noqa: B018 (loaded on first access)
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)


def _shown_as(job_id: int) -> dict[str, str]:
    """How a task's arguments are shown (the worker's log, monitoring tools): what Celery
    would write, without its safe repr of them, a tenth of the CPU each publish costs."""
    return {"argsrepr": f"[{job_id}]", "kwargsrepr": "{}"}
