"""Periodic work: bring deferred cancels back when due, and republish lost or stranded ones."""

from __future__ import annotations

import logging
import math

from celery import Celery

from config.celery import OUTBOX_GRACE, PUMP_INTERVAL, lease_seconds
from worker import app

log = logging.getLogger(__name__)

PUMP_BATCH = 500
"""Most deferred cancels moved back to the queue per pump tick."""

PUMP_MIN_BATCH = 4
"""Fewest deferred cancels a pump tick may move, however low the rate."""

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
    """Move deferred cancels whose time has come back to the queue (run by every worker).

    At most about two ticks' worth of the current rate limit per tick: a backlog that
    comes due at once (the breaker reopening) then reaches the queue at roughly the
    pace the limiter will let it through, instead of bouncing off it in a burst.
    """
    rt = app_.runtime
    rate = rt.limiter.effective_rate()
    limit = max(PUMP_MIN_BATCH, math.ceil(min(PUMP_BATCH, rate * PUMP_INTERVAL * 2)))
    return move_due(app_, rt.ledger.keys.deferred, rt.ledger.clock(), limit)


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
