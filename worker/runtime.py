"""What one worker or producer process needs, built once from the settings.

One Redis connection pool, one ledger, one Plural client on one pooled HTTP session
and one shared token cache per process; threads of the pool share them.
"""

from __future__ import annotations

import random
import threading
import time
from functools import cached_property
from typing import Callable

import redis

from plural_cancel.config import sentinel
from plural_cancel.config.settings import Settings
from plural_cancel.worker.attempts import Attempts
from plural_cancel.worker.breaker import RedisCircuitBreaker
from plural_cancel.worker.keys import Keys
from plural_cancel.worker.ledger import Ledger
from plural_cancel.worker.plural import PluralClient
from plural_cancel.worker.policy import RetryPolicy
from plural_cancel.worker.ratelimit import RedisRateLimiter
from plural_cancel.worker.redaction import redactor_for
from plural_cancel.worker.replication import ReplicaWait
from plural_cancel.worker.tokens import RedisTokenCache

MASTER_CHECK_INTERVAL = 1.0
"""Seconds between asks of the Sentinels for the master's address (``REDIS_SENTINELS`` only)."""

PACING = 0.97
"""Share of ``PLURAL_RATE_LIMIT`` the limiter grants, leaving room for jitter on the way to Plural."""


class Runtime:
    """Long-lived collaborators of one process. ``clock`` and ``jitter`` are injectable for tests."""

    def __init__(self, settings: Settings, *, keys: Keys = Keys(), clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random):
        self.settings = settings
        self.keys = keys
        self.clock = clock
        self.jitter = jitter
        """Returns a float in [0, 1): the one source of randomness for retry delays."""
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @cached_property
    def redis(self) -> redis.Redis:
        """The client of the ledger, limiter, breaker, token cache and schedules: of ``REDIS_URL``'s
        server, or of the master ``REDIS_SENTINELS`` name, followed through failovers."""
        if self.settings.redis_sentinels:
            client = sentinel.master_client(self.settings, socket_timeout=10, socket_connect_timeout=5,
                                            health_check_interval=30, max_connections=256)
            threading.Thread(target=self._follow_master, args=(client.connection_pool,), daemon=True,
                             name="plural-cancel-sentinel").start()
            return client
        return redis.Redis.from_url(self.settings.redis_url, socket_timeout=10, socket_connect_timeout=5,
                                    health_check_interval=30, max_connections=256)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.redis, result_ttl=self.settings.result_ttl, stall_timeout=self.settings.stall_timeout,
                      rate=self.settings.rate_limit * PACING, queue=self.settings.cancel_queue, keys=self.keys,
                      clock=self.clock, redactor=redactor_for(self.settings), replicas=self.replicas,
                      outcome_retention=self.settings.outcome_retention)

    @cached_property
    def policy(self) -> RetryPolicy:
        """The retry rules (``worker.policy``) with this process's settings and jitter."""
        s = self.settings
        return RetryPolicy(base=s.retry_base, cap=s.retry_cap, budget=s.retry_budget, jitter=self.jitter)

    @cached_property
    def replicas(self) -> ReplicaWait:
        """How a producer's writes wait for Redis's replicas (``REDIS_WAIT_REPLICAS``)."""
        return ReplicaWait(self.redis, self.settings.wait_replicas, keys=self.keys,
                           sentinel=bool(self.settings.redis_sentinels))

    @cached_property
    def limiter(self) -> RedisRateLimiter:
        """The one rate limit to Plural shared by every worker process and host."""
        # Paced a little under the limit: a granted slot still has a thread wake-up and a
        # network hop before it reaches Plural, and that jitter must not push a second
        # past the limit there (``bench/README.md``, limiter precision).
        return RedisRateLimiter(self.redis, self.keys.ratelimit, self.settings.rate_limit * PACING,
                                self.settings.rate_burst)

    @cached_property
    def breaker(self) -> RedisCircuitBreaker:
        """The circuit breaker shared by every worker process and host."""
        return RedisCircuitBreaker.from_settings(self.redis, self.keys.breaker, self.settings)

    @cached_property
    def attempts(self) -> Attempts:
        """Ledger, breaker and limiter asked together: one round trip before a call to Plural, one after."""
        return Attempts(self.ledger, self.breaker, self.limiter)

    @cached_property
    def plural(self) -> PluralClient:
        """The Plural client; needs credentials, so only the worker (not producers) builds it."""
        settings = self.settings.require_credentials()
        tokens = RedisTokenCache(self.redis, settings.client_id, settings.client_secret.reveal(), keys=self.keys)
        return PluralClient.from_settings(settings, tokens=tokens)

    def _follow_master(self, pool) -> None:
        # redis-py asks the Sentinels for the master only when it opens a connection. After a
        # SENTINEL FAILOVER the old master is not down: it takes writes on the connections
        # already open to it until Sentinel turns it into a replica (~10 s, at its next INFO),
        # and drops them then; measured, half the cancels of that window were sent to Plural
        # a second time. Asked every second, the pool learns the new address, closes its idle
        # connections to the old one and never takes a busy one back (redis-py's
        # SentinelConnectionPool), so writes move to the new master within about a second.
        while not self._closed.wait(MASTER_CHECK_INTERVAL):
            try:
                pool.get_master_address()
            except redis.RedisError:
                pass  # no Sentinel answers or none names a master: the next connect says so

    def close(self) -> None:
        self._closed.set()
        if "plural" in self.__dict__:
            self.plural.close()
        if "redis" in self.__dict__:
            self.redis.close()
            if self.settings.redis_sentinels:  # and its connections to the Sentinels
                for client in self.redis.connection_pool.sentinel_manager.sentinels:
                    client.close()
