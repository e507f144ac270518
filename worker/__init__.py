"""The Celery app and the machinery it runs (``celery -A worker worker``): the package
``plural_cancel.worker``."""

if __name__ == "worker":
    # The short name, inside this repository: the namespaced module takes its place.
    from plural_cancel._short_names import install

    install(__name__)
else:
    from plural_cancel.worker.app import app, create_app

    __all__ = ["app", "create_app"]
