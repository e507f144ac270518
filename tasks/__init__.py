"""Task functions and the producer API.

    from tasks import enqueue_cancel, enqueue_many, get_status, schedule_cancel, unschedule_cancel
"""

from tasks.producer import (enqueue_cancel, enqueue_many, get_schedule, get_status, schedule_cancel,
                            unschedule_cancel)

__all__ = ["enqueue_cancel", "enqueue_many", "get_status", "schedule_cancel", "unschedule_cancel",
           "get_schedule"]
