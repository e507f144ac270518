"""Task functions and the producer API.

    from tasks import enqueue_cancel, enqueue_many, get_status
"""

from tasks.producer import enqueue_cancel, enqueue_many, get_status

__all__ = ["enqueue_cancel", "enqueue_many", "get_status"]
