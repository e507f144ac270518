"""Prometheus metrics of the worker, served on ``METRICS_PORT`` (0 = off).

Counted in this process, as things happen (names as Prometheus shows them):

Every figure of one account's cancels carries its ``account`` label (one series per account
the workers know: bounded by the accounts file).

- ``plural_cancel_cancels_total{outcome,account}``: cancels that reached a final outcome;
- ``plural_cancel_enqueue_to_end_seconds{outcome,account}``: of those, seconds from the
  record's ``created_at`` to its end (Redis's clock, so every host agrees), observed by the
  worker that ends it. Followers that end with their leader are left out, as they are of
  ``cancels_total``: each was created while its leader was live, so the leader's age bounds it;
- ``plural_cancel_plural_request_seconds{call}``: latency of each call to Plural
  (``cancel``: the PUT, ``get``: the GET after an unclear refusal), in seconds;
- ``plural_cancel_retries_total{reason,account}``: attempts that ended in a retry, by error;
- ``plural_cancel_deferrals_total{reason,account}``: cancels held back before calling Plural
  (``breaker``: it is open; ``rate_limit``: no slot soon enough);
- ``plural_cancel_limiter_wait_seconds``: seconds slept for a granted rate-limit slot;
- ``plural_cancel_breaker_openings_total{account}``: openings of a breaker caused here;
- ``plural_cancel_token_refresh_failures_total{account}``: Generate Token calls of this
  process that failed (``worker.tokens``), 0 from the start for each account it serves.

Read from Redis at each scrape (shared by every worker, so each one shows the same):
``plural_cancel_breaker_state{state,account}`` (1 for the current one of closed, open,
half_open), ``plural_cancel_breaker_open_since_seconds{account}`` (seconds since the breaker
first opened, kept through its half-open probes until one closes it; 0 while closed),
``plural_cancel_oldest_live_seconds{account}`` (age of the account's oldest queued, running
or retrying cancel; 0 when none: ``Ledger.oldest_live``), ``plural_cancel_records{state}`` (see ``Ledger.stats``) and
``plural_cancel_account_records{state,account}`` (queued, running, retrying, and
``backlog``: ``Ledger.account_stats``),
``plural_cancel_queue_depth``, ``plural_cancel_backlog``, ``plural_cancel_deferred``,
``plural_cancel_dead_letters``, ``plural_cancel_rate_limit_per_second{account}`` (the
pace) and ``plural_cancel_throttled_share{account}`` (what it follows, ``worker.pace``),
``plural_cancel_accounts_reload_failures_total`` (this process's failed reloads of the
accounts file: the last good one stays in force), the counters
``plural_cancel_malformed_messages_total{reason}`` (messages dropped as malformed by
any worker, see ``worker.malformed``) and ``plural_cancel_unreplicated_writes_total``
(``worker.replication``), ``plural_cancel_clock_offset_seconds`` (this worker's host
clock against Redis's), and for each consumer group of the outcome stream
``plural_cancel_outcome_consumer_lag{group}``, ``..._behind_seconds{group}`` and
``..._pending{group}`` (``Ledger.consumer_groups``).

One process, one set of numbers: the worker runs Celery's threads pool
(``config/celery.py``), so every task updates the counters of the process that serves
them. A prefork pool would count in child processes that this server cannot see, so
under prefork the server is not started at all (a warning says so) rather than serve
numbers that are silently wrong.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from plural_cancel.errors import SlotMissed
from plural_cancel.worker import malformed
from plural_cancel.worker.breaker import STATE, parse_state
from plural_cancel.worker.redis_clock import clock_offset
from plural_cancel.worker.replication import unreplicated_writes

log = logging.getLogger(__name__)

CANCELS = Counter("plural_cancel_cancels", "Cancels that reached a final outcome, by outcome.",
                  ["outcome", "account"])
PLURAL_SECONDS = Histogram(
    "plural_cancel_plural_request_seconds", "Seconds each call to Plural took, by call (cancel, get).",
    ["call"], buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0))
RETRIES = Counter("plural_cancel_retries", "Attempts that ended in a retry, by the error behind it.",
                  ["reason", "account"])
DEFERRALS = Counter("plural_cancel_deferrals", "Cancels held back before calling Plural (breaker, rate_limit).",
                    ["reason", "account"])
LIMITER_WAIT = Histogram("plural_cancel_limiter_wait_seconds", "Seconds slept for a granted rate-limit slot.",
                         buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
BREAKER_OPENINGS = Counter("plural_cancel_breaker_openings",
                           "Openings of an account's circuit breaker caused by this process.", ["account"])
ENQUEUE_TO_END = Histogram(
    "plural_cancel_enqueue_to_end_seconds",
    "Seconds from a cancel's enqueue (its record's created_at) to its end, by outcome, Redis's clock.",
    ["outcome", "account"], buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400))
TOKEN_REFRESH_FAILURES = Counter("plural_cancel_token_refresh_failures",
                                 "Generate Token calls of this process that failed, by account.", ["account"])
ACCOUNTS_RELOAD_FAILURES = Counter("plural_cancel_accounts_reload_failures",
                                   "Reloads of the accounts file (PLURAL_ACCOUNTS_FILE) that failed in this process: "
                                   "the last good accounts stay in force (see the worker log).")

BREAKER_STATES = ("closed", "open", "half_open")
SUCCEEDED = ("cancelled", "already_cancelled")
"""Outcomes of the state ``succeeded``; every other outcome is ``failed``."""


def ended(outcome: str, account: str, age: float | None) -> None:
    """Count a cancel that has just ended with ``outcome``, and observe its ``age``: seconds from
    its record's ``created_at`` to its end (None: unknown, not observed)."""
    CANCELS.labels(outcome, account).inc()
    if age is not None:
        ENQUEUE_TO_END.labels(outcome, account).observe(age)


@contextmanager
def plural_call(call: str) -> Iterator[None]:
    """Time one call to Plural (``cancel`` or ``get``), whether it answers or raises; not one
    that gave up its rate-limit slot before anything was sent (``SlotMissed``)."""
    start, sent = time.perf_counter(), True
    try:
        yield
    except SlotMissed:
        sent = False
        raise
    finally:
        if sent:
            PLURAL_SECONDS.labels(call).observe(time.perf_counter() - start)


def snapshot(rt) -> dict[str, Any]:
    """The state every worker shares, read from Redis now (``rt`` is a ``worker.runtime.Runtime``):
    ``{"states": {state: n}, "outcomes": {outcome: n}, "deferred": n, "backlog": n, "dead_letters": n,
    "queue_depth": n, "breaker": {...}, "rate": calls per second, "malformed": {reason: n}}``.
    ``accounts``: per account, its counts, rate ``limit`` (published, per second), breaker, pace
    and ``oldest_live`` (seconds, or None: none live). ``queued``, ``running`` and ``retrying``
    are counted now; ``succeeded``, ``failed`` and the outcomes over the last ``RESULT_TTL``
    seconds (see ``Ledger.stats``); ``malformed`` since the count began (``worker.malformed``)."""
    shared = rt.ledger.stats()
    finished = shared["outcomes"]
    shared["states"] = {**shared.pop("active"),
                        "succeeded": sum(n for k, n in finished.items() if k in SUCCEEDED),
                        "failed": sum(n for k, n in finished.items() if k not in SUCCEEDED)}
    # The Celery queue is kombu's list in the same database; its length is the backlog.
    shared["queue_depth"] = rt.redis.llen(rt.settings.cancel_queue)
    rates = rt.published_accounts()
    oldest = rt.ledger.oldest_live(rates)
    paces, breakers = _paces_and_breakers(rt, rates)
    shared["accounts"] = {name: {**own, "limit": rates[name], "breaker": breakers[name], "rate": paces[name][0],
                                 "throttled_share": paces[name][1], "oldest_live": oldest.get(name)}
                          for name, own in rt.ledger.account_stats(rates).items()}
    default = shared["accounts"].get("default")
    shared["breaker"] = default["breaker"] if default else rt.breaker.state()
    shared["rate"], shared["throttled_share"] = (default["rate"], default["throttled_share"]) if default \
        else rt.limiter.pace()
    shared["malformed"] = malformed.counts(rt.redis, rt.keys)
    shared["unreplicated_writes"] = unreplicated_writes(rt.redis, rt.keys)
    shared["consumer_groups"] = rt.ledger.consumer_groups()
    shared["clock_offset"] = clock_offset(rt.redis)
    return shared


def _paces_and_breakers(rt, rates: dict[str, float]) -> tuple[dict[str, tuple[float, float]], dict[str, dict]]:
    """Each account's pace (calls per second granted, share throttled) and breaker state, read
    in one pipeline: a scrape of a fleet of 1,000 accounts is then a few round trips, not
    two per account (``bench/accounts.py``)."""
    limiters = {name: rt.limiter_of(name, rate) for name, rate in rates.items()}
    breakers = {name: rt.breaker_of(name) for name in rates}
    state = rt.redis.register_script(STATE)
    pipe = rt.redis.pipeline(transaction=False)
    for name in rates:
        pipe.hgetall(limiters[name].pace_key)
        state(*breakers[name].state_call(), client=pipe)
    pipe.time()
    *replies, (seconds, micros) = pipe.execute()
    now = seconds + micros / 1e6
    paces = {name: limiters[name].pace_at(fields, now) for name, fields in zip(rates, replies[0::2])}
    return paces, {name: parse_state(reply) for name, reply in zip(rates, replies[1::2])}


class SharedStateCollector(Collector):
    """Gauges read from Redis when Prometheus scrapes: the state every worker shares.

    ``read`` returns what :func:`snapshot` does; when it fails (Redis away) the gauges
    are left out of that scrape rather than reported as zero.
    """

    def __init__(self, read: Callable[[], dict[str, Any]]):
        self.read = read

    def collect(self):
        try:
            shared = self.read()
        except Exception as exc:  # a scrape must not fail because Redis blinked
            log.warning("metrics: shared state unreadable (%s)", type(exc).__name__)
            return
        accounts = shared.get("accounts") or {"default": shared}
        breaker = GaugeMetricFamily("plural_cancel_breaker_state", "1 for an account's breaker's current state.",
                                    labels=["state", "account"])
        for name, own in accounts.items():
            for state in BREAKER_STATES:
                breaker.add_metric([state, name], 1.0 if own["breaker"]["state"] == state else 0.0)
        yield breaker
        yield _by_account("plural_cancel_breaker_open_since_seconds", "Seconds since an account's breaker first "
                          "opened, kept while it turns half-open to probe and opens again; 0 while closed.",
                          accounts, lambda own: own["breaker"].get("open_seconds") or 0.0)
        yield _by_account("plural_cancel_oldest_live_seconds", "Age in seconds of an account's oldest live cancel "
                          "(queued, running or retrying), from its enqueue (Redis's clock); 0 when it has none.",
                          accounts, lambda own: own.get("oldest_live") or 0.0)
        records = GaugeMetricFamily("plural_cancel_records", "Cancels in the ledger by state (queued, running, "
                                    "retrying: now; succeeded, failed: within RESULT_TTL).", labels=["state"])
        for state, n in shared["states"].items():
            records.add_metric([state], n)
        yield records
        own_records = GaugeMetricFamily("plural_cancel_account_records", "An account's live cancels by state "
                                        "(queued, running, retrying; backlog: of its queued, those held in "
                                        "its backlog).", labels=["state", "account"])
        for name, own in accounts.items():
            for state, n in {**own.get("active", {}), "backlog": own.get("backlog", 0)}.items():
                own_records.add_metric([state, name], n)
        yield own_records
        yield GaugeMetricFamily("plural_cancel_queue_depth", "Messages waiting in the Celery queue.",
                                value=shared["queue_depth"])
        yield GaugeMetricFamily("plural_cancel_backlog", "Bulk cancels waiting their turn in the ledger (held "
                                "until the workers have room for them).", value=shared["backlog"])
        yield GaugeMetricFamily("plural_cancel_deferred", "Cancels waiting in Redis for their due time.",
                                value=shared["deferred"])
        yield GaugeMetricFamily("plural_cancel_dead_letters",
                                "Cancels that ended failed (plural-cancel failed list).",
                                value=shared["dead_letters"])
        yield _by_account("plural_cancel_rate_limit_per_second", "Calls per second an account's limiter grants "
                          "now: the pace, lower while Plural throttles a share of calls (worker.pace).",
                          accounts, lambda own: own["rate"])
        yield _by_account("plural_cancel_throttled_share", "Share of Plural's recent answers to an account's calls "
                          "that were throttles (429, or a rate limit in Plural's words), weighted over about the "
                          "last 2 s.", accounts, lambda own: own["throttled_share"])
        # A counter: the hash only grows, so rate() and increase() apply. Every worker
        # serves the same fleet-wide figure; aggregate with max, not sum.
        dropped = CounterMetricFamily("plural_cancel_malformed_messages",
                                      "Messages dropped as malformed by any worker, by reason (see the worker log).",
                                      labels=["reason"])
        for reason, n in shared["malformed"].items():
            dropped.add_metric([reason], n)
        yield dropped
        yield CounterMetricFamily("plural_cancel_unreplicated_writes",
                                  "Producer writes that went through with no replica connected to Redis's master "
                                  "(REDIS_WAIT_REPLICAS=auto): a failover could have lost them.",
                                  value=shared["unreplicated_writes"])
        lag = GaugeMetricFamily("plural_cancel_outcome_consumer_lag",
                                "Outcome events not yet delivered to a consumer group of plural-cancel:events.",
                                labels=["group"])
        behind = GaugeMetricFamily("plural_cancel_outcome_consumer_behind_seconds",
                                   "Age of the oldest outcome event a consumer group has not read (0: none).",
                                   labels=["group"])
        pending = GaugeMetricFamily("plural_cancel_outcome_consumer_pending",
                                    "Outcome events delivered to a consumer group and not acknowledged.",
                                    labels=["group"])
        for group, figures in shared["consumer_groups"].items():
            if figures["lag"] is not None:
                lag.add_metric([group], figures["lag"])
            behind.add_metric([group], figures["oldest_unread_seconds"] or 0.0)
            pending.add_metric([group], figures["pending"])
        yield lag
        yield behind
        yield pending
        yield GaugeMetricFamily("plural_cancel_clock_offset_seconds",
                                "Seconds this worker's host clock is ahead of Redis's (negative: behind); Plural "
                                "sees it in every Request-Timestamp.", value=shared["clock_offset"])


def _by_account(name: str, documentation: str, accounts: dict[str, dict],
                value: Callable[[dict], float]) -> GaugeMetricFamily:
    """A gauge with one sample per account, ``value`` of each account's shared figures."""
    family = GaugeMetricFamily(name, documentation, labels=["account"])
    for account, own in accounts.items():
        family.add_metric([account], value(own))
    return family


class MetricsServer:
    """The HTTP endpoint (``/metrics``) of one worker process, on all interfaces."""

    def __init__(self, port: int, read_shared: Callable[[], dict[str, Any]],
                 registry: CollectorRegistry = REGISTRY):
        self.port = port
        self.registry = registry
        self.collector = SharedStateCollector(read_shared)
        self._server = None

    def start(self) -> None:
        self.registry.register(self.collector)
        self._server, _thread = start_http_server(self.port, addr="0.0.0.0", registry=self.registry)
        log.info("metrics served on port %d", self.port, extra={"metrics_port": self.port})

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self.registry.unregister(self.collector)
