"""Every message this product puts on the broker, in one place: a batch of cancels
(:func:`publish`), live cancels sent again or for the first time from the ledger
(:func:`pump`: due ones, lost ones, held ones as the fleet has room), and the
callbacks of ended cancels (:func:`send_callbacks`).

Nothing here imports the tasks: a cancel message is built from the task's name
(``CANCEL_TASK``), so the producer API, the periodic tasks and the worker's pump
bootstep (``worker.app.DuePump``) all call in without a cycle.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import uuid

from celery import Celery
from kombu import Exchange, Queue, serialization
from kombu.entity import maybe_delivery_mode
from kombu.transport.redis import Channel as RedisChannel

from plural_cancel.config.celery import BACKLOG_AHEAD, CALLBACK_LEASE, CANCEL_TASK, PUMP_INTERVAL
from plural_cancel.worker.keys import DEFAULT_ACCOUNT
from plural_cancel.worker.runtime import PACING

log = logging.getLogger(__name__)

PUMP_BATCH = 500
"""Most due cancels moved back to the queue per pump tick."""

PUMP_MIN_BATCH = 4
"""Fewest due cancels a pump tick may move, however low the rate."""

CALLBACK_BATCH = 200
"""Most callbacks sent per pump tick."""

PUBLISH_CHUNK = 1000
"""Messages sent to Redis per round trip when a batch is published."""

def publish(app_: Celery, pairs: list[tuple[str, ...]]) -> None:
    """Publish one cancel message per (request_id, payment_link_id) or (request_id,
    payment_link_id, account), ``PUBLISH_CHUNK`` per round trip. A message names its account
    (the task's ``account``) unless it is the default one: a single account's messages are
    as they were before accounts.

    Why not ``apply_async`` in a loop: Celery has no batch publish. Each ``apply_async``
    (``group`` too) routes, builds, reprs and signals its message on its own, then waits
    for Redis: one round trip and a message's worth of Python per cancel.
    Here Celery and kombu build one message per batch, exactly as ``apply_async`` would
    have it stored (see :func:`_stored_template`); per cancel only the ids change, and
    the LPUSHes go out in one Redis pipeline. (kombu 5.7's ``Producer.batch`` pipelines
    too, but still runs ``Producer.publish``'s Python per message: half the gain, see
    ``bench/README.md``.) Messages so built bypass Celery's publish
    signals, which nothing here listens to.

    A failed pipeline raises: the records stay in the due index, which sends them again
    after the stall timeout, so nothing is lost, at worst sent twice.
    """
    if not pairs:
        return
    with app_.producer_or_acquire() as producer:
        channel = producer.channel
        if not isinstance(channel, RedisChannel):  # another broker: kombu's own publish, one by one
            _publish_each(app_, producer, pairs)
            return
        queue = app_.conf.task_default_queue
        template = _stored_template(app_, channel, queue)
        # The priority-0 list of the queue, which is where an apply_async without a priority lands.
        key = channel._q_for_pri(queue, template["properties"]["priority"])
        args, _, embed = json.loads(base64.b64decode(template["body"]))
        with channel.conn_or_acquire() as client:  # the client kombu's own _put would use
            for start in range(0, len(pairs), PUBLISH_CHUNK):
                pipe = client.pipeline(transaction=False)
                for item in pairs[start:start + PUBLISH_CHUNK]:
                    task_id = str(uuid.uuid4())
                    kwargs = _kwargs(*item)
                    body = json.dumps([args, kwargs, embed]).encode()
                    message = dict(template, body=base64.b64encode(body).decode(),
                                   headers=dict(template["headers"], id=task_id, root_id=task_id,
                                                kwargsrepr=repr(kwargs)),
                                   properties=dict(template["properties"], correlation_id=task_id,
                                                   delivery_tag=str(uuid.uuid4())))
                    pipe.lpush(key, json.dumps(message))
                pipe.execute()


def _stored_template(app_: Celery, channel, queue: str) -> dict:
    """One cancel message as kombu's Redis transport stores it (``Channel._put``: LPUSH of this, as JSON).

    Built by Celery (``as_task_v2``: protocol 2 headers and body) and kombu (serialized,
    enveloped, body base64-encoded, delivery info for the anonymous exchange, which is
    how Celery sends to a direct queue), never by hand; a test holds it equal to what
    ``apply_async`` stores, ids aside.
    """
    task = app_.amqp.as_task_v2("", CANCEL_TASK, kwargs={}, ignore_result=True)
    content_type, encoding, body = serialization.dumps(task.body, serializer="json")
    message = channel.prepare_message(body, 0, content_type, encoding, task.headers, {
        "correlation_id": "", "reply_to": "",
        "delivery_mode": maybe_delivery_mode(app_.conf.task_default_delivery_mode)})
    channel._inplace_augment_message(message, "", queue)
    if message["properties"].get("body_encoding") != "base64":
        raise RuntimeError("kombu's Redis transport no longer base64-encodes bodies; update publish()")
    return message


def _kwargs(request_id: str, payment_link_id: str, account: str = DEFAULT_ACCOUNT) -> dict[str, str]:
    """A cancel message's keyword arguments (the task's)."""
    kwargs = {"payment_link_id": payment_link_id, "request_id": request_id}
    if account != DEFAULT_ACCOUNT:
        kwargs["account"] = account
    return kwargs


def _publish_each(app_: Celery, producer, pairs: list[tuple[str, ...]]) -> None:
    for item in pairs:
        app_.send_task(CANCEL_TASK, kwargs=_kwargs(*item), producer=producer, ignore_result=True)


def pump(app_: Celery) -> int:
    """Send live cancels whose time has come back to the queue (run by every worker); returns
    how many: deferred ones now due, any whose message was lost or whose lease ran out, then
    bulk cancels from each account's backlog, as far as the fleet has room for that
    account's in the next ``BACKLOG_AHEAD`` seconds at its rate (none while its breaker is
    open): each account has a room of its own, so a long backlog of one never holds
    another's back.

    At most about two ticks' worth of the current rate limit per tick: a backlog that
    comes due at once (the breaker reopening) then reaches the queue at roughly the
    pace the limiter will let it through, instead of bouncing off it in a burst.
    Taking and publishing are two steps with nothing to undo between them: a pump that
    dies after taking leaves each cancel in the index, due again after the stall timeout.
    """
    rt = app_.runtime
    rate = rt.limiter.effective_rate()
    fleet = max(rate, sum(rt.published_accounts().values()) * PACING)
    limit = max(PUMP_MIN_BATCH, math.ceil(min(PUMP_BATCH, fleet * PUMP_INTERVAL * 2)))
    # Each account's pace is the script's to read (its own throttling); ``rate`` stands for one unpublished.
    items = rt.ledger.take_due(limit, ahead=BACKLOG_AHEAD, rate=rt.limiter.rate, pacing=PACING)
    publish(app_, items)
    return len(items)


def send_callbacks(app_: Celery) -> int:
    """Send the callbacks of cancels that have ended (run by every worker, with the pump);
    returns how many were sent.

    Each is one Celery message to the producer's own task and queue, ``status=<status
    record>``, with a task id the same for every copy of one ending. Taking holds an entry
    for ``CALLBACK_LEASE`` seconds; it leaves the index once its message is pushed. A
    sender that dies (or a Redis that fails) in between leaves it to be sent again when
    the lease ends: at least once, and a copy more only then.
    """
    ledger = app_.runtime.ledger
    taken = ledger.take_callbacks(CALLBACK_BATCH, CALLBACK_LEASE)
    if not taken:
        return 0
    sent = []
    try:
        with app_.producer_or_acquire() as producer:
            for pending in taken:
                name, queue = pending.callback.task, pending.callback.queue
                # A Queue object, not a name: the app never adds the host's queue to its own
                # (which a worker would then consume), and declare=[] leaves the host's
                # bindings to the host. A direct queue is published through the default
                # exchange: a push onto the list named ``queue``.
                app_.send_task(name, kwargs={"status": pending.status}, task_id=pending.task_id,
                               queue=Queue(queue, Exchange(queue, "direct"), routing_key=queue), declare=[],
                               producer=producer, ignore_result=True)
                sent.append(pending)
    finally:
        ledger.callbacks_sent(sent)
    log.debug("sent %d callbacks", len(sent))
    return len(sent)
