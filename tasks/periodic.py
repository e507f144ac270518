"""Beat's periodic work: fire scheduled cancels whose time has come.

(The pump and the callbacks run on every worker's own timer: ``worker.publisher``.)
"""

from __future__ import annotations

import logging

from celery import Celery

from plural_cancel.config.celery import BACKLOG_AHEAD
from plural_cancel.tasks.producer import schedule_store
from plural_cancel.worker import app
from plural_cancel.worker.ledger import Created
from plural_cancel.worker.publisher import publish
from plural_cancel.worker.runtime import PACING

log = logging.getLogger(__name__)

FIRE_BATCH = 1000
"""Most scheduled cancels fired per script call (a call holds Redis while it runs)."""

FIRE_ROUNDS = 10
"""Most rounds per run: a run fires up to ``FIRE_BATCH * FIRE_ROUNDS`` cancels, the rest next second."""


def fire_schedules(app_: Celery) -> int:
    """Move scheduled cancels whose time has come into the ledger; returns how many fired.

    Each round is one atomic step (``worker.schedule.FIRE``): the entries leave the schedule
    and their records appear together, so an unschedule either stopped a cancel or is told
    it fired. The records wait in the ledger's backlog, like a bulk enqueue's: a million
    cancels scheduled for one midnight reach the broker as the workers make room. Several
    runs at once are safe: each entry is taken once.
    """
    rt = app_.runtime
    store = schedule_store(app_)
    fired = 0
    for _ in range(FIRE_ROUNDS):
        results = store.fire(rt.ledger, limit=FIRE_BATCH)
        for entry in results:
            if entry.created is Created.CONFLICT:
                log.error("scheduled cancel of %s (account %s) not fired: request_id %s is used for another link or "
                          "account", entry.payment_link_id, entry.account, entry.request_id)
        if results:
            publish(app_, rt.ledger.take_due(0, ahead=BACKLOG_AHEAD, pacing=PACING))
        fired += len(results)
        if len(results) < FIRE_BATCH:
            break
    if fired:
        log.info("fired %d scheduled cancels", fired)
    return fired


@app.task(name="tasks.fire_schedules", ignore_result=True)
def fire_schedules_task() -> int:
    """Beat runs this every ``config.celery.FIRE_INTERVAL`` seconds."""
    return fire_schedules(app)


__all__ = ["fire_schedules"]
