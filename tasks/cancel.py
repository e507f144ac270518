"""The cancel task: a message in, one delivery of one cancel run (``worker.delivery``).

The task only reads the message (``worker.malformed``) and hands the cancel to the
worker's machinery; what Redis going away mid-delivery means for it is decided here,
because it is the task's to end quietly.
"""

from __future__ import annotations

import logging

import redis
from celery.exceptions import Ignore

from plural_cancel.config.celery import CANCEL_TASK
from plural_cancel.errors import REDIS_AWAY, MalformedMessage, refusal_code, write_refused
from plural_cancel.worker import app
from plural_cancel.worker.delivery import execute
from plural_cancel.worker.malformed import parse_arguments, refuse

log = logging.getLogger(__name__)


@app.task(name=CANCEL_TASK, bind=True, typing=False)
def cancel_payment_link(self, *args, **kwargs) -> str:
    """Cancel one Plural payment link: ``payment_link_id``, and ``request_id``, the idempotency
    key of this cancel (by keyword, or in that order).

    Sent by name (``send_task("tasks.cancel_payment_link", kwargs=...)``) from any
    service; creates the status record when the sender did not. Celery's own argument
    check is off (``typing=False``) so that a malformed message reaches ``refuse``
    instead of failing in Celery and vanishing.
    """
    try:
        payment_link_id, request_id = parse_arguments(args, kwargs)
    except MalformedMessage as problem:
        return refuse(self.app.runtime, args, kwargs, problem)
    try:
        return execute(self.app.runtime, payment_link_id, request_id)
    except REDIS_AWAY as exc:
        # Redis went away mid-delivery (a restart, a failover): not this cancel's failure, and
        # nothing is lost, since the ledger's due index sends it again once Redis is back. One
        # line per delivery instead of a traceback and a Sentry event each (every cancel in
        # flight hits it at once); Ignore is control flow, which Sentry's Celery integration
        # never reports.
        log.warning("cancel interrupted: Redis unreachable (%s); the ledger sends it again", type(exc).__name__,
                    extra={"request_id": request_id, "payment_link_id": payment_link_id})
        raise Ignore() from None
    except redis.ResponseError as exc:
        if not write_refused(exc):
            raise
        # Redis refuses writes for a while (no replica for min-replicas-to-write, maxmemory,
        # a failing disk): as for Redis away, above, the ledger sends the cancel again.
        log.warning("cancel interrupted: Redis refuses writes (%s); the ledger sends it again", refusal_code(exc),
                    extra={"request_id": request_id, "payment_link_id": payment_link_id})
        raise Ignore() from None
