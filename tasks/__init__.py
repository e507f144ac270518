"""Task functions and the producer API: the package ``plural_cancel.tasks``.

    from plural_cancel import enqueue_cancel, enqueue_many, get_status, schedule_cancel, unschedule_cancel

(``from tasks import ...``, from the repository root, gives the same functions.)
"""

if __name__ == "tasks":
    # The short name (from the repository root): the namespaced package's names, and no
    # submodules of its own, so nothing loads twice: `import tasks.producer` fails instead.
    __path__ = []

from plural_cancel.tasks.producer import (  # noqa: E402 (after the short name's guard)
    enqueue_cancel,
    enqueue_many,
    get_schedule,
    get_status,
    schedule_cancel,
    unschedule_cancel,
)

__all__ = ["enqueue_cancel", "enqueue_many", "get_status", "schedule_cancel", "unschedule_cancel", "get_schedule"]
