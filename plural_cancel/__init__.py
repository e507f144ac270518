"""The product under one namespaced name, for a merchant's application::

    from plural_cancel import enqueue_cancel, enqueue_many, get_status, schedule_cancel, unschedule_cancel

The code lives in the design card's folders, ``config/``, ``tasks/``, ``worker/`` and
``sandbox/``, which pyproject's ``package-dir`` makes the subpackages
``plural_cancel.config``, ``plural_cancel.tasks``, ``plural_cancel.worker`` and
``plural_cancel.sandbox``, installed and in an editable install alike (``make setup``).
Every module of the product, and every test, benchmark and script, imports the others by
their ``plural_cancel.`` names only, so a host project whose own ``config``, ``tasks`` or
``worker`` package comes first on ``sys.path`` (a Django project built on
cookiecutter-django has ``config/``) never shadows ours, and ours never shadow its.

From the repository root the folders' short names are what the contract names
(``celery -A worker``, ``python -m sandbox``, ``from tasks import ...``): each folder's
``__init__`` then only re-exports the namespaced package's names and has no submodules
(``import worker.ledger`` fails), so no module is ever loaded twice under two names. The
command line, ``plural-cancel``, lives here, in ``plural_cancel.cli``; every error the
product raises, in ``plural_cancel.errors``.
"""

from __future__ import annotations

__all__ = ["enqueue_cancel", "enqueue_many", "get_status", "schedule_cancel", "unschedule_cancel",
           "get_schedule"]


def __getattr__(name: str):
    # The producer API is loaded on first use (PEP 562), not with the package: it brings in
    # Celery, which ``plural-cancel health`` (every container's healthcheck) does without.
    if name in __all__:
        from plural_cancel.tasks import producer

        return getattr(producer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
