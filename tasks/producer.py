"""The producer API: enqueue cancels now or schedule them for later, read their status.

Each cancel is first written to the ledger (atomically, keyed by its Request-ID),
then published as one Celery message: at once for :func:`enqueue_cancel`; for a batch,
as far as the fleet can run it in the next ``BACKLOG_AHEAD`` seconds, the rest waiting
in the ledger's backlog for the workers' pump (a million-link clean-up then costs Redis
a compact record per link, not a Celery message). A repeat of a Request-ID publishes
nothing, and neither does a second cancel of a link whose cancel is live: it follows
that one and ends with it (one Request-ID per link at Plural). If the process dies between the two
writes, or the message is lost later, the ledger's due index sends it again after the
stall timeout (``CANCEL_STALL_TIMEOUT``).
A scheduled cancel waits in Redis (``worker.schedule``) until beat's
``tasks.fire_schedules`` sends it down that same path.

Every cancel is of one Plural account (``account``, the default one unless named): the
name is checked against the accounts the workers publish (``worker.accounts``) before
anything is written, and the account travels with the cancel's record and message.

A cancel may name a callback: a task of the producer's own Celery app (``callback``)
and a queue its workers consume (``callback_queue``). When the cancel ends, that task is
sent one message with the status record as its one argument, ``status``
(``worker.publisher.send_callbacks``).
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime
from typing import Iterable

from celery import Celery

from plural_cancel.config.celery import BACKLOG_AHEAD
from plural_cancel.errors import RequestIdConflict
from plural_cancel.worker import app as default_app
from plural_cancel.worker.accounts import check_account
from plural_cancel.worker.keys import DEFAULT_ACCOUNT
from plural_cancel.worker.ledger import Callback, Created
from plural_cancel.worker.publisher import publish
from plural_cancel.worker.runtime import PACING
from plural_cancel.worker.schedule import Schedule
from plural_cancel.worker.validation import validate_callback, validate_payment_link_id, validate_request_id


def enqueue_cancel(payment_link_id: str, request_id: str | None = None, *, account: str | None = None,
                   callback: str | None = None, callback_queue: str | None = None, app: Celery | None = None) -> str:
    """Enqueue one cancel of ``account``'s link (the default account unless named); returns
    its Request-ID (a new UUID4 unless given).

    ``callback`` and ``callback_queue`` (both or neither): a task of your Celery app, by
    name, and the queue your workers consume; when the cancel ends it is sent one message,
    ``callback(status=<status record>)``, with a task id that is the same for every copy
    (a receiver dedupes by it). A Request-ID enqueued again keeps the callback it was
    first enqueued with.

    Raises ValueError naming the field on bad input (``account``: one the workers do not
    know), and :class:`RequestIdConflict` (a ValueError) when ``request_id`` already belongs
    to a cancel of another link or account.
    """
    app_ = app or default_app
    validate_payment_link_id(payment_link_id)
    request_id = str(uuid.uuid4()) if request_id is None else validate_request_id(request_id)
    on_end = _callback(app_, callback, callback_queue)
    _enqueue(app_, [(request_id, payment_link_id)], on_end, account=check_account(app_.runtime, account))
    return request_id


def enqueue_many(payment_link_ids: Iterable[str], *, account: str | None = None, callback: str | None = None,
                 callback_queue: str | None = None, app: Celery | None = None) -> list[str]:
    """Enqueue one cancel per link id, all of ``account`` (the default account unless named),
    pipelined; returns their new Request-IDs in order.

    What the workers can run in the next ``BACKLOG_AHEAD`` seconds at the account's rate
    limit is published at once; the rest waits in the account's backlog in the ledger
    (``queued``) and is sent oldest first as the workers make room. An
    :func:`enqueue_cancel` does not wait behind it, and neither does another account's
    bulk: each account's backlog has its own turn.

    Every id is validated first: one bad id raises ValueError (naming it and its
    position) and nothing is written or sent. A link named twice gets two Request-IDs,
    the second following the first (one call to Plural). A single string raises
    TypeError: it is not a list of ids. ``callback`` and ``callback_queue``: as for
    :func:`enqueue_cancel`, one message per cancel.
    """
    if isinstance(payment_link_ids, (str, bytes)):
        raise TypeError("payment_link_ids: must be an iterable of link ids, not a single string "
                        "(use enqueue_cancel for one link)")
    app_ = app or default_app
    links = list(payment_link_ids)
    for position, link_id in enumerate(links):
        try:
            validate_payment_link_id(link_id)
        except ValueError as exc:
            raise ValueError(f"{exc} at position {position}") from None
    on_end = _callback(app_, callback, callback_queue)
    account = check_account(app_.runtime, account)
    pairs = list(zip(new_request_ids(len(links)), links))
    _enqueue(app_, pairs, on_end, hold=True, account=account)
    return [request_id for request_id, _ in pairs]


def get_status(request_id: str, *, app: Celery | None = None) -> dict | None:
    """The status record of a cancel (its fields: docs/using.md, "Status by key"), or None when
    unknown or expired."""
    validate_request_id(request_id)
    return (app or default_app).runtime.ledger.status(request_id)


def schedule_cancel(payment_link_id: str, at: datetime, request_id: str | None = None, *, account: str | None = None,
                    callback: str | None = None, callback_queue: str | None = None, app: Celery | None = None) -> str:
    """Cancel ``account``'s link (the default account unless named) at ``at`` (a
    timezone-aware datetime); returns the Request-ID it will carry.

    Kept in Redis until it fires (no expiry); beat fires it within about a second of
    ``at`` (``FIRE_INTERVAL``), at once when ``at`` is past. A link has at most one
    scheduled cancel: scheduling it again moves its time and keeps its Request-ID,
    unless ``request_id`` names a new one; once it has fired, scheduling the link again
    starts a new one. Fired, it goes the way of :func:`enqueue_cancel`:
    a Request-ID that already carried a cancel of this link makes it a no-op.
    ``callback`` and ``callback_queue``: as for :func:`enqueue_cancel`; each call sets
    the link's (scheduling it again without them drops the callback).

    Raises ValueError naming the field on bad input (a naive ``at`` included), and
    :class:`RequestIdConflict` (a ValueError) when ``request_id`` belongs to another link or account.
    """
    app_ = app or default_app
    validate_payment_link_id(payment_link_id)
    if request_id is not None:
        validate_request_id(request_id)
    if not isinstance(at, datetime) or at.utcoffset() is None:
        raise ValueError(f"at: must be a timezone-aware datetime, e.g. datetime.now(timezone.utc) "
                         f"(got {at!r:.60})")
    on_end = _callback(app_, callback, callback_queue)
    account = check_account(app_.runtime, account)
    _, kept = schedule_store(app_).put(payment_link_id, at.timestamp(), request_id or str(uuid.uuid4()),
                                       replace=request_id is not None, callback=on_end, account=account)
    return kept


def unschedule_cancel(payment_link_id: str, *, account: str | None = None, app: Celery | None = None) -> bool:
    """Take back the scheduled cancel of ``account``'s link (the default account unless named;
    the order was paid); True if it will now never fire.

    False when nothing is scheduled for the link, or when it is too late: the cancel
    has fired (firing and unscheduling are one atomic step each, so False means it was
    or will be sent). :func:`get_schedule` then tells which (``"fired"``,
    with the Request-ID to pass to :func:`get_status`, for ``RESULT_TTL`` seconds).
    Raises ValueError naming ``payment_link_id`` when it is malformed, ``account`` when the
    workers do not know it.
    """
    app_ = app or default_app
    validate_payment_link_id(payment_link_id)
    verdict, _ = schedule_store(app_).remove(payment_link_id, check_account(app_.runtime, account))
    return verdict == "removed"


def get_schedule(payment_link_id: str, *, account: str | None = None, app: Celery | None = None) -> dict | None:
    """The scheduled cancel of ``account``'s link (the default account unless named), or None
    when nothing is scheduled and none fired lately.

    ``{"payment_link_id", "account", "state": "scheduled" | "fired", "request_id", "at",
    "fired_at", "result"}``; times ISO 8601 (UTC). ``fired_at`` and ``result`` are
    None until it fires; then ``result`` is ``enqueued``, ``following`` (its link had a
    live cancel: it ends with that one), ``already_enqueued`` (its
    Request-ID had a record already: one cancel) or ``conflict`` (the Request-ID had
    been taken by another link meanwhile: not sent, logged as an error).
    """
    app_ = app or default_app
    validate_payment_link_id(payment_link_id)
    return schedule_store(app_).get(payment_link_id, check_account(app_.runtime, account))


def get_statuses(request_ids: list[str], *, app: Celery | None = None) -> list[dict | None]:
    """The status records of many cancels, in order (None: unknown), one round trip per 1,000."""
    return (app or default_app).runtime.ledger.statuses(request_ids)


def schedule_store(app_: Celery) -> Schedule:
    """The scheduled-cancel store on this process's Redis connection and keys."""
    rt = app_.runtime
    return Schedule(rt.redis, fired_ttl=rt.settings.result_ttl, keys=rt.keys, replicas=rt.replicas)


def submit(app_: Celery, pairs: list[tuple[str, str]], callback: Callback | None = None, *,
           hold: bool = False, account: str = DEFAULT_ACCOUNT) -> list[Created]:
    """Create ledger records for (request_id, payment_link_id) pairs of ``account`` (a name the
    caller has checked), each with ``callback``, and publish the new ones; ``hold``: only as
    many as the workers have room for (``BACKLOG_AHEAD``), the rest held in the account's
    backlog for their pump.

    Returns what became of each pair (``Created``): only a ``CREATED`` one is sent (or held).
    """
    ledger = app_.runtime.ledger
    codes = ledger.create_many(pairs, callback, hold=hold, account=account)
    if hold:
        publish(app_, ledger.take_due(0, ahead=BACKLOG_AHEAD, pacing=PACING))
    else:
        publish(app_, [(*pair, account) for pair, code in zip(pairs, codes) if code.publish])
    return codes


def new_request_ids(count: int) -> list[str]:
    """``count`` new random Request-IDs: UUID4 strings, as ``str(uuid.uuid4())`` makes them.

    Written out here because ``uuid.uuid4()`` reads the system's randomness once per id, a
    system call that costs more than the rest of a bulk enqueue's Python per link; one
    read for the whole batch does not (``bench/README.md``, backlog).
    """
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # the RFC 4122 variant
    h = raw.hex()
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, 32 * count, 32)]


def _callback(app_: Celery, task: str | None, queue: str | None) -> Callback | None:
    return validate_callback(task, queue, cancel_queue=app_.conf.task_default_queue)


def _enqueue(app_: Celery, pairs: list[tuple[str, str]], callback: Callback | None = None, *,
             hold: bool = False, account: str = DEFAULT_ACCOUNT) -> None:
    codes = submit(app_, pairs, callback, hold=hold, account=account)
    for (request_id, _), code in zip(pairs, codes):
        if code is Created.CONFLICT:
            raise RequestIdConflict(
                f"request_id: {request_id!r} is already used for a cancel of another payment link or account")
