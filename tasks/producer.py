"""The producer API: enqueue cancels, read their status.

Each cancel is first written to the ledger (atomically, keyed by its Request-ID),
then published as one Celery message. A repeat of a Request-ID publishes nothing.
If the process dies between the two, the reconciler publishes the message later.
"""

from __future__ import annotations

import uuid
from typing import Iterable

from celery import Celery

from tasks.periodic import publish
from worker import app as default_app
from worker.ledger import RequestIdConflict
from worker.validation import validate_payment_link_id, validate_request_id


def enqueue_cancel(payment_link_id: str, request_id: str | None = None, *, app: Celery | None = None) -> str:
    """Enqueue one cancel; returns its Request-ID (a new UUID4 unless given).

    Raises ValueError naming the field on bad input, and :class:`RequestIdConflict`
    (a ValueError) when ``request_id`` already belongs to a cancel of another link.
    """
    validate_payment_link_id(payment_link_id)
    request_id = str(uuid.uuid4()) if request_id is None else validate_request_id(request_id)
    _enqueue(app or default_app, [(request_id, payment_link_id)])
    return request_id


def enqueue_many(payment_link_ids: Iterable[str], *, app: Celery | None = None) -> list[str]:
    """Enqueue one cancel per link id, pipelined; returns their new Request-IDs in order.

    Every id is validated first: one bad id raises ValueError (naming it and its
    position) and nothing is written or sent.
    """
    links = list(payment_link_ids)
    for position, link_id in enumerate(links):
        try:
            validate_payment_link_id(link_id)
        except ValueError as exc:
            raise ValueError(f"{exc} at position {position}") from None
    pairs = [(str(uuid.uuid4()), link_id) for link_id in links]
    _enqueue(app or default_app, pairs)
    return [request_id for request_id, _ in pairs]


def get_status(request_id: str, *, app: Celery | None = None) -> dict | None:
    """The status record of a cancel (see CONTRACT.md), or None when unknown or expired."""
    validate_request_id(request_id)
    return (app or default_app).runtime.ledger.status(request_id)


def _enqueue(app_: Celery, pairs: list[tuple[str, str]]) -> None:
    ledger = app_.runtime.ledger
    codes = ledger.create_many(pairs)
    for (request_id, link_id), code in zip(pairs, codes):
        if code < 0:
            raise RequestIdConflict(
                f"request_id: {request_id!r} is already used for a cancel of another payment link")
    fresh = [pair for pair, code in zip(pairs, codes) if code == 1]
    if fresh:
        publish(app_, fresh)
        ledger.mark_published([request_id for request_id, _ in fresh])
