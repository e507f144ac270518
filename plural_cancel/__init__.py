"""The product under one namespaced name, for a merchant's application::

    from plural_cancel import enqueue_cancel, enqueue_many, get_status, schedule_cancel, unschedule_cancel

The code lives in the design card's folders, ``config/``, ``tasks/``, ``worker/`` and
``sandbox/``, which are the subpackages ``plural_cancel.config``, ``plural_cancel.tasks``,
``plural_cancel.worker`` and ``plural_cancel.sandbox``: installed, by pyproject's
``package-dir``; in this repository (and an editable install of it), through this
package's ``__path__``, which takes in the repository root. Every module of the product
imports the others by their ``plural_cancel.`` names only, so a host project whose own
``config``, ``tasks`` or ``worker`` package comes first on ``sys.path`` (a Django project
built on cookiecutter-django has ``config/``) never shadows ours, and ours never shadow
its. Inside this repository the short names (``celery -A worker``, ``from tasks import
...``) stay the same modules (``plural_cancel._short_names``). The command line,
``plural-cancel``, lives here, in ``plural_cancel.cli``; every error the product raises,
in ``plural_cancel.errors``.
"""

from __future__ import annotations

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "worker", "app.py")):
    # This repository's checkout (not an installed copy): the folders sit beside this one.
    __path__.append(_ROOT)  # noqa: F821 (a package's __path__)

__all__ = ["enqueue_cancel", "enqueue_many", "get_status", "schedule_cancel", "unschedule_cancel",
           "get_schedule"]


def __getattr__(name: str):
    # The producer API is loaded on first use (PEP 562), not with the package: it brings in
    # Celery, which ``plural-cancel health`` (every container's healthcheck) does without.
    if name in __all__:
        from plural_cancel.tasks import producer

        return getattr(producer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
