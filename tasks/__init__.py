"""Task functions and the producer API: the package ``plural_cancel.tasks``.

    from plural_cancel import enqueue_cancel, enqueue_many, get_status, schedule_cancel, unschedule_cancel

(``from tasks import ...`` is the same, inside this repository.)
"""

if __name__ == "tasks":
    # The short name, inside this repository: the namespaced module takes its place.
    from plural_cancel._short_names import install

    install(__name__)
else:
    from plural_cancel.tasks.producer import (enqueue_cancel, enqueue_many, get_schedule, get_status, schedule_cancel,
                                              unschedule_cancel)

    __all__ = ["enqueue_cancel", "enqueue_many", "get_status", "schedule_cancel", "unschedule_cancel",
               "get_schedule"]
