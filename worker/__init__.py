"""The Celery app and the machinery it runs (``celery -A worker worker``)."""

from worker.app import app

__all__ = ["app"]
