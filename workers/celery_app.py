"""The worker's Celery app: the shared queue configuration plus this package's tasks."""

from __future__ import annotations

from chitrakar.config import load_settings
from chitrakar.queue import make_celery

settings = load_settings()
app = make_celery(settings, name="chitrakar.workers")
app.conf.include = ["workers.tasks"]
