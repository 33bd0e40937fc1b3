"""GPU workers: the Celery app, its tasks, diffusers pipelines and result delivery."""
