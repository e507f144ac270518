"""Periodic work: bring deferred cancels back when due, and republish lost or stranded ones."""

from __future__ import annotations

import logging

from celery import Celery

from config.celery import OUTBOX_GRACE, PUMP_INTERVAL, lease_seconds
from worker import app

log = logging.getLogger(__name__)

PUMP_BATCH = 500
"""Most deferred cancels moved back to the queue per pump tick."""

HOLD = 60.0
"""Seconds a taken member stays out of reach while its message is published."""


def publish(app_: Celery, pairs: list[tuple[str, str]]) -> None:
    """Publish one cancel message per (request_id, payment_link_id) on one producer connection."""
    from tasks.cancel import cancel_payment_link

    with app_.producer_or_acquire() as producer:
        for request_id, link_id in pairs:
            cancel_payment_link.apply_async(kwargs={"payment_link_id": link_id, "request_id": request_id},
                                            producer=producer)


def move_due(app_: Celery, zset: str, upto: float, limit: int) -> int:
    """Publish the members of ``zset`` due by ``upto``; returns how many were moved."""
    ledger = app_.runtime.ledger
    hold_until = ledger.clock() + HOLD
    pairs = ledger.take_due(zset, upto=upto, limit=limit, hold_until=hold_until)
    if pairs:
        publish(app_, pairs)
        ledger.release_held(zset, [rid for rid, _ in pairs], hold_until)
    return len(pairs)


def pump_deferred(app_: Celery) -> int:
    """Move deferred cancels whose time has come back to the queue (run by every worker)."""
    ledger = app_.runtime.ledger
    moved = 0
    # Keep going while whole batches come back, so a large backlog is not held to one batch a tick.
    while True:
        n = move_due(app_, ledger.keys.deferred, ledger.clock(), PUMP_BATCH)
        moved += n
        if n < PUMP_BATCH:
            return moved


def reconcile(app_: Celery) -> dict[str, int]:
    """Republish records whose message never left, and those whose lease ran out mid-cancel."""
    ledger = app_.runtime.ledger
    now = ledger.clock()
    unpublished = move_due(app_, ledger.keys.outbox, now - OUTBOX_GRACE, 10_000)
    stranded = move_due(app_, ledger.keys.leases, now, 10_000)
    if unpublished or stranded:
        log.warning("reconciler republished %d unpublished and %d stranded cancels", unpublished, stranded)
    return {"unpublished": unpublished, "stranded": stranded}


@app.task(name="tasks.reconcile", ignore_result=True)
def reconcile_task() -> dict[str, int]:
    """Beat runs this every ``config.celery.RECONCILE_INTERVAL`` seconds."""
    return reconcile(app)


__all__ = ["pump_deferred", "reconcile", "publish", "PUMP_INTERVAL", "lease_seconds"]
