"""The broker transport: kombu's Redis transport, with one Redis client per channel.

kombu builds a new ``redis.Redis`` for every acknowledgement and for the bookkeeping of
every delivery (``Channel.conn_or_acquire``), and building one copies redis-py's table
of some 200 response callbacks: about 8 % of a worker process's CPU, which is what
limits a worker (``bench/README.md``). Written here because kombu has no setting for
it. A ``redis.Redis`` is safe to share between threads (each command takes a
connection from its pool), and this pool is the channel's for the channel's life, so
one client serves every operation of the channel. The asynchronous client (BRPOP in
the event loop) is left as kombu makes it.

Used through Celery's ``broker_transport`` setting (``config.celery``), with the
``redis://`` URL unchanged.
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; :meth:`_create_client` reuses one client over the channel's pool."""

    _shared_client = None

    def _create_client(self, asynchronous=False):
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
