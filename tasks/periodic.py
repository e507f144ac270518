"""Beat's periodic work: fire scheduled cancels whose time has come.

(The pump and the callbacks run on every worker's own timer: ``worker.publisher``.)
"""

from __future__ import annotations

import logging

from celery import Celery

from plural_cancel.tasks.producer import schedule_store, submit
from plural_cancel.worker import app

log = logging.getLogger(__name__)

HOLD = 60.0
"""Seconds a scheduled cancel taken for firing stays out of reach while it is fired."""


FIRE_BATCH = 1000
"""Most scheduled cancels taken per round of :func:`fire_schedules`."""

FIRE_ROUNDS = 10
"""Most rounds per run: a run fires up to ``FIRE_BATCH * FIRE_ROUNDS`` cancels, the rest next second."""


def fire_schedules(app_: Celery) -> int:
    """Move scheduled cancels whose time has come into the pipeline; returns how many fired.

    Each goes the way of any enqueue (ledger record by its Request-ID, then one
    message), so a cancel fired twice (a firer that died mid-way) is still one cancel.
    Several runs at once are safe: each entry is taken atomically.
    """
    store = schedule_store(app_)
    fired = 0
    for _ in range(FIRE_ROUNDS):
        due = store.take_due(limit=FIRE_BATCH, hold=HOLD)
        if not due:
            break
        verdicts = {1: "enqueued", 2: "following", 0: "already_enqueued", -1: "conflict"}
        by_callback: dict = {}
        for d in due:
            by_callback.setdefault(d.callback, []).append(d)
        results = []
        for callback, group in by_callback.items():  # one submit per callback (most: one, None)
            # Held: a million cancels scheduled for one midnight reach the broker as the
            # workers make room, like a bulk enqueue.
            codes = submit(app_, [(d.request_id, d.payment_link_id) for d in group], callback, hold=True)
            results += [(d, verdicts[code]) for d, code in zip(group, codes)]
        for d, result in results:
            if result == "conflict":
                log.error("scheduled cancel of %s not fired: request_id %s is used for another link",
                          d.payment_link_id, d.request_id)
        store.mark_fired(results)
        fired += len(due)
        if len(due) < FIRE_BATCH:
            break
    if fired:
        log.info("fired %d scheduled cancels", fired)
    return fired


@app.task(name="tasks.fire_schedules", ignore_result=True)
def fire_schedules_task() -> int:
    """Beat runs this every ``config.celery.FIRE_INTERVAL`` seconds."""
    return fire_schedules(app)


__all__ = ["fire_schedules"]
