"""What one worker or producer process needs, built once from the settings.

One Redis connection pool and one ledger per process; per Plural account (``lane``), one
rate limit, breaker, token cache and Plural client on one pooled HTTP session, built
when the account is first met and again when the accounts file changes it. Threads of
the pool share them.
"""

from __future__ import annotations

import random
import threading
import time
from functools import cached_property
from typing import Callable

import redis

from plural_cancel.config import sentinel
from plural_cancel.config.accounts import Account, AccountBook
from plural_cancel.config.settings import Settings
from plural_cancel.errors import ConfigError
from plural_cancel.worker.attempts import Attempts
from plural_cancel.worker.breaker import RedisCircuitBreaker
from plural_cancel.worker.keys import DEFAULT_ACCOUNT, Keys
from plural_cancel.worker.ledger import Ledger
from plural_cancel.worker.plural import PluralClient
from plural_cancel.worker.policy import RetryPolicy
from plural_cancel.worker.ratelimit import RedisRateLimiter
from plural_cancel.worker.redaction import Redactor, redactor_for
from plural_cancel.worker.replication import ReplicaWait
from plural_cancel.worker.tokens import RedisTokenCache

MASTER_CHECK_INTERVAL = 1.0
"""Seconds between asks of the Sentinels for the master's address (``REDIS_SENTINELS`` only)."""

PACING = 0.97
"""Share of ``PLURAL_RATE_LIMIT`` the limiter grants, leaving room for jitter on the way to Plural."""


class Runtime:
    """Long-lived collaborators of one process. ``clock`` and ``jitter`` are injectable for tests."""

    def __init__(self, settings: Settings, *, keys: Keys = Keys(), clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random,
                 on_reload_failure: Callable[[Exception], None] | None = None,
                 token_failures: Callable[[str], Callable[[Exception], None]] | None = None):
        self.settings = settings
        self.keys = keys
        self.clock = clock
        self.jitter = jitter
        """Returns a float in [0, 1): the one source of randomness for retry delays."""
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._lanes: dict[str, Lane] = {}
        self.on_reload_failure = on_reload_failure
        """Called with the error when a reload of the accounts file fails (the worker counts it)."""
        self.token_failures = token_failures
        """Given an account's name, what to call with the error when its token cannot be had
        (the worker counts it, per account, from the lane's start)."""
        self.accounts_published_at: float | None = None
        """Monotonic time this process last published its accounts (``worker.accounts.refresh``)."""
        self.accounts_generation = 0
        """The accounts book's ``generation`` this process last published and learnt the secrets of."""
        self.known_accounts: dict[str, float] = {}
        """Account name -> monotonic time until which this process takes it as known
        (``worker.accounts.check_account``)."""

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
                      clock=self.clock, redactor=self.redactor, replicas=self.replicas,
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
    def redactor(self) -> Redactor:
        """What masks secrets and personal data in this process's logs, Sentry events and
        stored errors: it knows the client secret and every account's by value, those of
        accounts added at run time too (``worker.accounts.refresh``)."""
        return redactor_for(self.settings, (a.client_secret.reveal() for a in self.local_accounts().values()))

    @cached_property
    def book(self) -> AccountBook:
        """The Plural accounts in force (``PLURAL_ACCOUNTS_FILE``, and ``default`` from
        ``PLURAL_CLIENT_ID``), re-read as the file changes (``worker.accounts.refresh``)."""
        return AccountBook(self.settings, on_reload_failure=self.on_reload_failure)

    def local_accounts(self) -> dict[str, Account]:
        """This process's own accounts ({} when it has none, or its file cannot be read: a
        producer host needs none, ``worker.accounts.check_account``)."""
        try:
            return self.book.accounts()
        except ConfigError:
            return {}

    def published_accounts(self) -> dict[str, float]:
        """The accounts the workers published (``worker.accounts``), name -> rate limit (calls
        per second); the default one at ``PLURAL_RATE_LIMIT`` when none is published yet."""
        published = {(k.decode() if isinstance(k, bytes) else k): float(v)
                     for k, v in self.redis.hgetall(self.keys.accounts).items()}
        return published or {DEFAULT_ACCOUNT: self.settings.rate_limit}

    def lane(self, account: str) -> Lane | None:
        """``account``'s own rate limit, breaker and Plural client, or None when this process
        does not know the account (the accounts file is read again first). Built when first
        asked, and again when the file changes the account."""
        found = self.book.get(account)
        if found is None:
            return None
        lane = self._lanes.get(account)
        if lane is not None and lane.account == found:
            return lane
        with self._lock:
            lane = self._lanes.get(account)
            if lane is None or lane.account != found:
                # The lane replaced stays with the threads still using it; its HTTP session
                # closes when the last of them lets it go.
                lane = self._lanes[account] = Lane.build(self, found)
        return lane

    def limiter_of(self, account: str, rate: float) -> RedisRateLimiter:
        """The rate limit of ``account``'s calls to Plural (``rate`` per second), shared by every
        worker process and host."""
        # Paced a little under the limit: a granted slot still has a thread wake-up and a
        # network hop before it reaches Plural, and that jitter must not push a second
        # past the limit there (``bench/README.md``, limiter precision).
        return RedisRateLimiter(self.redis, self.keys.account_key(account, "ratelimit"), rate * PACING,
                                self.settings.rate_burst)

    def breaker_of(self, account: str) -> RedisCircuitBreaker:
        """``account``'s circuit breaker, shared by every worker process and host."""
        return RedisCircuitBreaker.from_settings(self.redis, self.keys.account_key(account, "breaker"), self.settings)

    @cached_property
    def limiter(self) -> RedisRateLimiter:
        """The default account's rate limit (``PLURAL_RATE_LIMIT``, or the accounts file's for
        ``[accounts.default]``): the pump's measure of the default account's pace."""
        own = self.local_accounts().get(DEFAULT_ACCOUNT)
        return self.limiter_of(DEFAULT_ACCOUNT, own.rate_limit if own else self.settings.rate_limit)

    @cached_property
    def breaker(self) -> RedisCircuitBreaker:
        """The default account's circuit breaker."""
        return self.breaker_of(DEFAULT_ACCOUNT)

    @cached_property
    def attempts(self) -> Attempts:
        """The default account's ledger, breaker and limiter asked together (a lane's own are
        ``lane(name).attempts``); also the writer of a refused message's record."""
        return Attempts(self.ledger, self.breaker, self.limiter)

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
        for lane in list(self._lanes.values()):
            lane.plural.close()
        if "redis" in self.__dict__:
            self.redis.close()
            if self.settings.redis_sentinels:  # and its connections to the Sentinels
                for client in self.redis.connection_pool.sentinel_manager.sentinels:
                    client.close()


class Lane:
    """One Plural account's own: its rate limit and pace, its breaker, its token cache and
    client, and the ``Attempts`` that asks them with the ledger. None of it is shared with
    another account, so one account's throttling, outage or bad credentials never slows,
    holds or fails another's cancels."""

    def __init__(self, account: Account, limiter: RedisRateLimiter, breaker: RedisCircuitBreaker,
                 attempts: Attempts, plural: PluralClient):
        self.account = account
        self.limiter = limiter
        self.breaker = breaker
        self.attempts = attempts
        self.plural = plural

    @classmethod
    def build(cls, rt: Runtime, account: Account) -> "Lane":
        name = account.name
        limiter = rt.limiter_of(name, account.rate_limit)
        breaker = rt.breaker_of(name)
        counted = {"on_refresh_failure": rt.token_failures(name)} if rt.token_failures else {}
        tokens = RedisTokenCache(rt.redis, account.client_id, account.client_secret.reveal(), keys=rt.keys,
                                 account=name, **counted)
        plural = PluralClient.from_settings(account.settings(rt.settings), tokens=tokens)
        return cls(account, limiter, breaker, Attempts(rt.ledger, breaker, limiter, account=name), plural)
