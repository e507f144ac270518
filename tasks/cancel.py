"""The cancel task: a message in, handed whole to ``worker.delivery`` (one call into the
worker's machinery per delivery). What Redis going away mid-delivery means for the task
is decided here: ending a delivery quietly is Celery's business (``Ignore``).
"""

from __future__ import annotations

import logging

import redis
from celery.exceptions import Ignore

from plural_cancel.config.celery import CANCEL_TASK
from plural_cancel.errors import REDIS_AWAY, refusal_code, write_refused
from plural_cancel.worker import app
from plural_cancel.worker.delivery import deliver
from plural_cancel.worker.malformed import usable_ids

log = logging.getLogger(__name__)


@app.task(name=CANCEL_TASK, bind=True, typing=False)
def cancel_payment_link(self, *args, **kwargs) -> str:
    """Cancel one Plural payment link: ``payment_link_id``, and ``request_id``, the idempotency
    key of this cancel (by keyword, or in that order).

    Sent by name (``send_task("tasks.cancel_payment_link", kwargs=...)``) from any
    service; creates the status record when the sender did not. Celery's own argument
    check is off (``typing=False``) so that a malformed message reaches ``deliver``, which
    refuses it, instead of failing in Celery and vanishing.
    """
    try:
        return deliver(self.app.runtime, args, kwargs)
    except REDIS_AWAY as exc:
        # Redis went away mid-delivery (a restart, a failover): not this cancel's failure, and
        # nothing is lost, since the ledger's due index sends it again once Redis is back. One
        # line per delivery instead of a traceback and a Sentry event each (every cancel in
        # flight hits it at once); Ignore is control flow, which Sentry's Celery integration
        # never reports.
        log.warning("cancel interrupted: Redis unreachable (%s); the ledger sends it again", type(exc).__name__,
                    extra=_ids(args, kwargs))
        raise Ignore() from None
    except redis.ResponseError as exc:
        if not write_refused(exc):
            raise
        # Redis refuses writes for a while (no replica for min-replicas-to-write, maxmemory,
        # a failing disk): as for Redis away, above, the ledger sends the cancel again.
        log.warning("cancel interrupted: Redis refuses writes (%s); the ledger sends it again", refusal_code(exc),
                    extra=_ids(args, kwargs))
        raise Ignore() from None


def _ids(args: tuple, kwargs: dict) -> dict:
    """The message's ids for a log line, only those that are valid ids (``usable_ids``)."""
    request_id, payment_link_id = usable_ids(args, kwargs)
    return {"request_id": request_id, "payment_link_id": payment_link_id}
