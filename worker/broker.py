"""The broker transport: kombu's Redis transport, with one Redis client per channel.

kombu builds a new ``redis.Redis`` for every acknowledgement and for the bookkeeping of
every delivery (``Channel.conn_or_acquire``), and building one copies redis-py's table
of some 200 response callbacks: about 8 % of a worker process's CPU, which is what
limits a worker (``bench/README.md``). Written here because kombu has no setting for
it. A ``redis.Redis`` is safe to share between threads (each command takes a
connection from its pool), and this pool is the channel's for the channel's life, so
one client serves every operation of the channel. The asynchronous client (BRPOP in
the event loop) is left as kombu makes it.

It also keeps a worker alive when Redis goes away (:meth:`Channel._get_pool`): kombu's
teardown of a lost connection could raise an AttributeError that ended the worker.

Used through Celery's ``broker_transport`` setting (``config.celery``), with the
``redis://`` URL unchanged.
"""

from __future__ import annotations

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; :meth:`_create_client` reuses one client over the channel's pool,
    and a channel cut off from its connection fails as a connection error (:meth:`_get_pool`)."""

    _shared_client = None

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
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
