"""The Celery app and the machinery it runs (``celery -A worker worker``): the package
``plural_cancel.worker``."""

if __name__ == "worker":
    # The short name (celery -A worker, from the repository root): the namespaced package's
    # names, and no submodules of its own, so nothing loads twice (a second Celery app,
    # second metrics): `import worker.ledger` fails instead.
    __path__ = []

from plural_cancel.worker.app import app, create_app  # noqa: E402 (after the short name's guard)

__all__ = ["app", "create_app"]
