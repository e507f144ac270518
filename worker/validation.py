"""The two identifiers every cancel carries, and its optional callback, checked in one place
before anything is written or sent."""

from __future__ import annotations

import re

from plural_cancel.config.accounts import ACCOUNT_NAME
from plural_cancel.config.settings import QUEUE_NAME
from plural_cancel.worker.ledger import Callback

_LINK_ID = re.compile(r"[A-Za-z0-9_-]{1,50}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,50}")
_TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,199}")


def validate_payment_link_id(value: object) -> str:
    """Return ``value`` if it is a Plural payment link id (1-50 of ``A-Za-z0-9_-``); else ValueError."""
    if not isinstance(value, str) or not _LINK_ID.fullmatch(value):
        raise ValueError(f"payment_link_id: must be 1-50 characters of A-Z a-z 0-9 _ - (got {_shown(value)})")
    return value


def validate_request_id(value: object) -> str:
    """Return ``value`` if it is a usable Request-ID (1-50 of ``A-Za-z0-9._:-``); else ValueError."""
    if not isinstance(value, str) or not _REQUEST_ID.fullmatch(value):
        raise ValueError(f"request_id: must be 1-50 characters of A-Z a-z 0-9 . _ : - (got {_shown(value)})")
    return value


def validate_account_name(value: object) -> str:
    """Return ``value`` if it is an account's name (1-50 of ``A-Za-z0-9_-``); else ValueError.
    Whether the workers know it is :func:`worker.accounts.check_account`'s question."""
    if not isinstance(value, str) or not ACCOUNT_NAME.fullmatch(value):
        raise ValueError(f"account: must be 1-50 characters of A-Z a-z 0-9 _ - (got {_shown(value)})")
    return value


def validate_callback(task: object, queue: object, *, cancel_queue: str) -> Callback | None:
    """The :class:`Callback` named by ``task`` and ``queue`` (both or neither; None for neither);
    else ValueError naming the field. ``task``: a Celery task name, 1-200 of ``A-Za-z0-9._:-``
    starting with a letter or ``_``; ``queue``: 1-100 of ``A-Za-z0-9._:-``, not
    ``cancel_queue`` (our workers would take the message and discard it as an unknown task)."""
    if task is None and queue is None:
        return None
    if task is None:
        raise ValueError("callback: required with callback_queue (the name of the task to send)")
    if queue is None:
        raise ValueError("callback_queue: required with callback (a queue your app's workers consume)")
    if not isinstance(task, str) or not _TASK_NAME.fullmatch(task):
        raise ValueError(f"callback: must be a Celery task name, 1-200 characters of A-Z a-z 0-9 . _ : - "
                         f"starting with a letter or _ (got {_shown(task)})")
    if not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue):
        raise ValueError(f"callback_queue: must be a queue name, 1-100 characters of A-Z a-z 0-9 . _ : - "
                         f"(got {_shown(queue)})")
    if queue == cancel_queue:
        raise ValueError(f"callback_queue: must be a queue of your app's, not the cancel queue {cancel_queue!r}")
    return Callback(task, queue)


def _shown(value: object) -> str:
    # Bad input is echoed (it helps the caller) but cut short and with control characters escaped.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
