"""The broker transport: kombu's Redis transport, with one Redis client per channel.

kombu builds a new ``redis.Redis`` for every acknowledgement and for the bookkeeping of
every delivery (``Channel.conn_or_acquire``), and building one copies redis-py's table
of some 200 response callbacks, a share of a worker process's CPU worth saving, since
CPU is what limits a worker (``bench/README.md``). Written here because kombu has no setting for
it. A ``redis.Redis`` is safe to share between threads (each command takes a
connection from its pool), and this pool is the channel's for the channel's life, so
one client serves every operation of the channel. The asynchronous client (BRPOP in
the event loop) is left as kombu makes it.

A queue item that is not a kombu message (not JSON, JSON of another shape, a body
that is not the base64 it claims) is dropped here with one ERROR line and
:data:`message_dropped` sent, where kombu would raise out of the worker's event loop
and stop the worker (``Unrecoverable error: JSONDecodeError``): one bad push onto the
queue would then stop every worker in turn.

It keeps kombu's bookkeeping of the messages our workers hold unacknowledged under our
own keys (:attr:`worker.keys.Keys.unacked`), not the ``unacked`` hash that every Celery
app on the database shares and sweeps on its own visibility timeout.

It also keeps a worker alive when Redis goes away (:meth:`Channel._get_pool`): kombu's
teardown of a lost connection could raise an AttributeError that ended the worker; and
when Redis refuses writes (:class:`QoS`, :meth:`Channel._brpop_read`), for any of
``plural_cancel.errors.WRITE_REFUSALS``.

Used through Celery's ``broker_transport`` setting (``config.celery``), with the
``redis://`` URL unchanged; :class:`SentinelTransport` is the same over kombu's Sentinel
channel (``sentinel://`` URLs, ``REDIS_SENTINELS``: ``config.sentinel``), and says in one
short line when no Sentinel names a master.
"""

from __future__ import annotations

import json
import logging
import time
from queue import Empty
from urllib.parse import urlsplit

import redis
from celery.utils.dispatch import Signal
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from redis.sentinel import MasterNotFoundError

from plural_cancel.config.sentinel import master_not_found
from plural_cancel.errors import REDIS_AWAY, refusal_code, write_refused
from plural_cancel.worker.keys import Keys
from plural_cancel.worker.malformed import NOT_A_TASK_MESSAGE, UNDECODABLE

log = logging.getLogger(__name__)

message_dropped = Signal(name="message_dropped", providing_args={"queue", "reason", "client"})
"""Sent once for each queue item dropped as not a kombu message; ``sender`` is the channel or
the transport that dropped it, ``queue`` the queue's name, ``reason`` ``worker.malformed.UNDECODABLE`` or
``NOT_A_TASK_MESSAGE``, ``client`` a Redis client of the broker's database. The worker's app
counts them there (``worker.app``)."""


def is_kombu_message(payload) -> bool:
    """Whether a decoded queue item has the shape kombu's Redis transport publishes and reads
    back: a JSON object with a string ``body`` and ``properties`` holding a ``delivery_tag``
    and a ``delivery_info`` with ``exchange`` and ``routing_key`` (kombu's ``Message`` and
    its Redis ``QoS`` index these without a check)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("body"), str):
        return False
    properties = payload.get("properties")
    if not isinstance(properties, dict) or "delivery_tag" not in properties:
        return False
    delivery_info = properties.get("delivery_info")
    return isinstance(delivery_info, dict) and "exchange" in delivery_info and "routing_key" in delivery_info


class _UndecodableBody(Exception):
    """A kombu message whose body is not what its ``body_encoding`` says (raised while kombu builds it)."""


def _drop(sender, queue: str, reason: str, what: str, **fields) -> None:
    # The content is never logged: a foreign producer's message may hold personal data.
    log.error("dropped a queue item that is %s", what, extra={"queue": queue, "reason": reason, **fields})
    # Counted in the broker's own database (the product's): the channel's client, or for
    # the transport, any of its channels' (they share one Redis).
    channel = sender if isinstance(sender, Channel) else next(iter(getattr(sender, "channels", ())), None)
    message_dropped.send(sender=sender, queue=queue, reason=reason,
                         client=channel._create_client() if channel is not None else None)


REFUSAL_PAUSE = 1.0
"""Seconds the consumer waits after Redis refused its BRPOP (no replica for
``min-replicas-to-write``, a failing disk): Redis answers at once, and asking again at once
would spin the event loop on the refusal."""


class _NotHeld(Exception):
    """A popped message could not be held for acknowledgement: Redis refused the write."""


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS; a write that Redis refuses (``plural_cancel.errors.write_refused``:
    maxmemory, a demoted master, too few replicas, a failing disk) does not stop the worker."""

    # kombu removes the message from its unacked hash, then forgets the delivery in memory;
    # a refused write raised out of the first step into Celery's consumer ("Unrecoverable
    # error") and the worker exited. Here the delivery is still forgotten in memory (or
    # the worker's prefetch slot would stay taken for good); the message stays in the
    # unacked hash, kombu restores it after the visibility timeout, and the ledger drops
    # that copy (its cancel has ended, or is held).

    def append(self, message, delivery_tag):
        try:
            super().append(message, delivery_tag)
        except redis.ResponseError as exc:
            if not write_refused(exc):
                raise
            raise _NotHeld(refusal_code(exc)) from exc

    def ack(self, delivery_tag):
        try:
            super().ack(delivery_tag)
        except redis.ResponseError as exc:
            if not write_refused(exc):
                raise
            self._refused("acknowledge", exc, delivery_tag)
        except REDIS_AWAY as exc:
            # Redis away (a restart): the same way out, one warning rather than Celery's
            # CRITICAL "Couldn't ack" with a traceback (and a Sentry event) per message.
            log.warning("could not acknowledge a message: Redis unreachable (%s); it comes back after the "
                        "visibility timeout and the ledger skips it", type(exc).__name__)
            kombu_virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        try:
            super().reject(delivery_tag, requeue=requeue)
        except redis.ResponseError as exc:
            if not write_refused(exc):
                raise
            self._refused("reject", exc, delivery_tag)

    def _refused(self, what: str, exc: Exception, delivery_tag) -> None:
        log.error("could not %s a message: Redis refused the write (%s); it comes back after the visibility "
                  "timeout and the ledger skips it", what, refusal_code(exc))
        kombu_virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; :meth:`_create_client` reuses one client over the channel's pool,
    and a channel cut off from its connection fails as a connection error (:meth:`_get_pool`)."""

    QoS = QoS
    _shared_client = None

    # kombu's defaults are "unacked", "unacked_index" and "unacked_mutex", one set per
    # database: every app's worker sweeps that index and hands back whatever it finds
    # older than its own visibility timeout. Ours is under a minute; a host app's ETA task
    # held for an hour would be handed back (and run twice) by our sweep. With keys of our
    # own, each app sweeps only its own messages. Producers never touch these keys, so a
    # service sending by name needs no setting of ours.
    unacked_key = Keys().unacked
    unacked_index_key = f"{Keys().unacked}_index"
    unacked_mutex_key = f"{Keys().unacked}_mutex"

    # kombu decodes a popped item in the middle of _brpop_read (BRPOP, the worker's path)
    # and _get (RPOP, basic_get), with no setting, hook or error handler around that
    # json.loads: a JSONDecodeError raises out of the event loop and the worker exits. Both
    # are wrapped, not copied, so kombu's own reading (queue rotation, re-auth) stays
    # kombu's. Only JSONDecodeError is caught, which nothing after the item's decode raises:
    # the task body's own decode raises kombu's DecodeError, which Celery handles, and the
    # task itself runs in the pool's threads.

    _refusing = False
    """The last BRPOP was refused (:meth:`_brpop_read`): the next one that is not says so."""

    def _brpop_read(self, **options):
        try:
            delivered = super()._brpop_read(**options)
        except json.JSONDecodeError as exc:
            _drop(self, self._consumed_queue(), UNDECODABLE, "not JSON", bytes=len(exc.doc.encode()))
            raise Empty() from None  # what kombu raises for "nothing delivered"; the loop goes on
        except _NotHeld as exc:
            # kombu delivers in two steps: BRPOP, then a write that holds the message for
            # acknowledgement. Redis refused that write (maxmemory, a demoted master), so the
            # popped message is gone; nothing here can put it back (the same write would be
            # refused). The worker carries on, and the ledger's due index sends the cancel
            # again after CANCEL_STALL_TIMEOUT, once Redis takes writes.
            log.error("a delivered message was lost: Redis refused to hold it for acknowledgement (%s); "
                      "its cancel is sent again from the ledger", exc, extra={"queue": self._consumed_queue()})
            raise Empty() from None
        except redis.ResponseError as exc:
            if not write_refused(exc):
                raise
            # The BRPOP itself was refused (it is a write: NOREPLICAS, MISCONF): nothing was
            # popped. Said once, not once a second; the consumer asks again after a pause.
            if not self._refusing:
                log.error("Redis refuses writes (%s): no message is taken until it takes them again; cancels "
                          "in flight finish, and what they could not write is sent again from the ledger",
                          refusal_code(exc), extra={"queue": self._consumed_queue()})
            self._refusing = True
            time.sleep(REFUSAL_PAUSE)
            raise Empty() from None
        if self._refusing:
            self._refusing = False
            log.warning("Redis takes writes again: messages are taken again", extra={"queue": self._consumed_queue()})
        return delivered

    def _get(self, queue):
        try:
            payload = super()._get(queue)
        except json.JSONDecodeError as exc:
            _drop(self, queue, UNDECODABLE, "not JSON", bytes=len(exc.doc.encode()))
            raise Empty() from None
        if not is_kombu_message(payload):
            _drop(self, queue, NOT_A_TASK_MESSAGE, "JSON but not a kombu message", json_type=type(payload).__name__)
            raise Empty()
        return payload

    def decode_body(self, body, encoding=None):
        # kombu's Message calls this while it is built from a delivered item, before the
        # message is held for acknowledgement: a body that is not valid base64 (or an
        # encoding kombu does not know) raises binascii.Error / AttributeError there, out of
        # the event loop. One exception of ours lets Transport._deliver drop just that item.
        if encoding and encoding not in self.codecs:
            raise _UndecodableBody(f"unknown body_encoding {encoding!r}")
        try:
            return super().decode_body(body, encoding)
        except (ValueError, TypeError):  # binascii.Error is a ValueError
            raise _UndecodableBody(f"not valid {encoding}") from None

    def _consumed_queue(self) -> str:
        """The queue a BRPOP popped from: kombu knows it only inside ``_brpop_read``, so this
        names the channel's one consumed queue (a worker's case), or all of them."""
        return ",".join(self.active_queues)

    def _create_client(self, asynchronous=False):
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client

    def _get_pool(self, asynchronous=False):
        # When Redis goes away, Celery's consumer collects the kombu connection (which
        # detaches the transport: ``transport.client = None``), then closes it. A channel
        # whose BRPOP was cut off is only closed then: kombu disconnects its pools, then
        # restores its unacknowledged messages through a new pool built from
        # ``transport.client``. The AttributeError ("'NoneType' object has no attribute
        # 'hostname'") escaped kombu's ``maybe_close_channel`` and Celery's ``ignore_errors``,
        # which expect connection errors, and the worker exited. No setting skips that
        # restore (it is also the soft shutdown's hand-back), so a detached channel fails as
        # what it is, a channel that cannot reach Redis; the teardown goes on and the
        # consumer reconnects. The messages it could not restore are still in Redis's
        # unacked hash: the visibility timeout brings them back.
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("this broker channel's connection is closed")
        return super()._get_pool(asynchronous)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`; drops decoded items that are not kombu messages."""

    Channel = Channel

    def _deliver(self, message, queue):
        # Every consumed item passes here decoded, before kombu builds its Message from it:
        # on another shape that raises KeyError or TypeError out of the event loop (the
        # worker stops) or, from the QoS, a KeyError that Celery takes for a lost connection.
        if not is_kombu_message(message):
            _drop(self, queue, NOT_A_TASK_MESSAGE, "JSON but not a kombu message",
                  json_type=type(message).__name__)
            return
        try:
            super()._deliver(message, queue)
        except _UndecodableBody as exc:
            _drop(self, queue, UNDECODABLE, f"a kombu message with an undecodable body ({exc})",
                  bytes=len(message["body"].encode()))


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """:class:`Channel` over kombu's Sentinel channel: its pools ask the Sentinels for the
    master at every connect, and a demoted master's ``READONLY`` fails as a connection error
    (redis-py's ``SentinelManagedConnection``), which the consumer rides out as a restart."""

    # Nothing to add: ours (drops, refused writes, _get_pool's guard, our unacked keys)
    # comes first in the MRO, kombu's Sentinel pool and transport options after it.


class SentinelTransport(Transport):
    """:class:`Transport` with :class:`SentinelChannel`: the broker through Redis Sentinel."""

    Channel = SentinelChannel
    default_port = kombu_redis.SentinelTransport.default_port

    def create_channel(self, connection):
        # A channel pings the master as it is made, so this is where a worker (and a publish)
        # learns that no Sentinel names one. redis-py's text holds each Sentinel client's repr,
        # and Celery logs it on every attempt to connect: one short line instead, of the same
        # type (a ConnectionError, which kombu and Celery retry).
        try:
            return super().create_channel(connection)
        except MasterNotFoundError as exc:
            client = self.client  # kombu's connection: one Sentinel's URL, or several as alternates
            sentinels = [(url.hostname, url.port or self.default_port) for url in map(urlsplit, client.alt)] \
                or [(client.hostname, client.port or self.default_port)]
            line = master_not_found(exc, client.transport_options.get("master_name"), sentinels)
            raise MasterNotFoundError(line) from None
