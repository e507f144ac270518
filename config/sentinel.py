"""Redis Sentinel: ``REDIS_SENTINELS`` and ``REDIS_SENTINEL_MASTER`` as each Redis client of
the product takes them.

Three clients reach Redis, and each names Sentinel its own way: kombu (the broker) by a
``sentinel://`` URL per Sentinel, joined by ``;``, with ``master_name`` in its transport
options; RedBeat by a ``redis-sentinel://`` URL with ``sentinels`` and ``service_name``
in ``redbeat_redis_options``; redis-py (the ledger, limiter, breaker, token cache and
schedules of ``worker.runtime``) by ``Sentinel(...).master_for(name)``. All three are
built here from the one setting, so they cannot disagree on the master.

Each asks a Sentinel for the master's address whenever it connects, and a connection
to a master demoted in a failover fails on its first write (redis-py turns its
``READONLY`` into a ``ConnectionError``: ``redis.sentinel.SentinelManagedConnection``),
so every client follows a failover by reconnecting, as it rides out a restart.
"""

from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import quote

import redis
from redis.connection import parse_url
from redis.sentinel import MasterNotFoundError, Sentinel

from plural_cancel.config.settings import Settings

SENTINEL_KWARGS = {"socket_timeout": 2, "socket_connect_timeout": 1}
"""Connection options for the Sentinels themselves (seconds): a Sentinel answers from memory,
so one that is slow or away is skipped for the next one quickly."""


def credentials(settings: Settings) -> dict:
    """The master's database, user and password, from ``REDIS_URL`` (its host and port are not used)."""
    parsed = parse_url(settings.redis_url)
    return {"db": int(parsed.get("db") or 0), "username": parsed.get("username"),
            "password": parsed.get("password")}


def master_client(settings: Settings, **options) -> redis.Redis:
    """A redis-py client of the master the Sentinels name now, re-asked at every connect;
    ``options``: the connection options a ``redis.Redis.from_url`` would take."""
    auth = {key: value for key, value in credentials(settings).items() if value is not None}
    sentinel = Sentinel(list(settings.redis_sentinels), sentinel_kwargs=dict(SENTINEL_KWARGS), **auth, **options)
    return sentinel.master_for(settings.redis_sentinel_master)


def broker_url(settings: Settings) -> str:
    """kombu's Sentinel URL: ``sentinel://[user:password@]host:port/db``, one per Sentinel, joined by ``;``.

    Each carries the credentials and database: kombu reads them from whichever of these
    URLs its connection is on, and moves to the next one when a connection fails.
    """
    auth = credentials(settings)
    userinfo = ""
    if auth["username"] or auth["password"]:
        userinfo = quote(auth["username"] or "", safe="")
        if auth["password"]:
            userinfo += ":" + quote(auth["password"], safe="")
        userinfo += "@"
    return ";".join(f"sentinel://{userinfo}{_netloc(host, port)}/{auth['db']}"
                    for host, port in settings.redis_sentinels)


def broker_transport_options(settings: Settings) -> dict:
    """What kombu's Sentinel channel reads beyond the URL."""
    return {"master_name": settings.redis_sentinel_master, "sentinel_kwargs": dict(SENTINEL_KWARGS)}


def redbeat_url(settings: Settings) -> str:
    """RedBeat's switch to Sentinel: it reads only the scheme (the Sentinels are in its options);
    beat's banner shows it, so it names the first Sentinel and holds no password."""
    host, port = settings.redis_sentinels[0]
    return f"redis-sentinel://{_netloc(host, port)}/{credentials(settings)['db']}"


def redbeat_options(settings: Settings) -> dict:
    """The keys RedBeat's Sentinel branch reads from ``redbeat_redis_options`` (redbeat 2.x,
    ``redbeat.schedulers.get_redis``). It passes no other option on to its client:
    ``worker.beat.Scheduler`` adds the rest."""
    auth = credentials(settings)
    options = {"sentinels": list(settings.redis_sentinels), "service_name": settings.redis_sentinel_master,
               "db": auth["db"], "sentinel_kwargs": dict(SENTINEL_KWARGS)}
    options.update({key: auth[key] for key in ("username", "password") if auth[key] is not None})
    return options


def master_not_found(error: MasterNotFoundError, master: str, sentinels: Iterable[tuple[str, int]]) -> str:
    """One short line for redis-py's ``MasterNotFoundError``, naming ``REDIS_SENTINELS`` and
    ``REDIS_SENTINEL_MASTER``: whether the Sentinels answered, and why not.

    redis-py's own text holds the ``repr`` of every Sentinel's client (some 600 characters
    each), and the command line and Celery's "Cannot connect" line printed it whole. What
    it says of each Sentinel that did not answer (``<client> - ConnectionError('...')``) is
    read back from it here: the exception carries nothing else.
    """
    sentinels = list(sentinels)
    where = f"the Sentinels in REDIS_SENTINELS ({', '.join(_netloc(host, port) for host, port in sentinels)})"
    failed = re.findall(r" - (?:ConnectionError|TimeoutError)\((['\"])(.*?)\1\)(?=, <|$)", str(error))
    reasons = "; ".join(dict.fromkeys(_unanswered(text) for _, text in failed))
    if not failed:
        return f"{where} know no master {master!r} that is up (REDIS_SENTINEL_MASTER)"
    if len(failed) < len(sentinels):
        return (f"{len(failed)} of {where} did not answer ({reasons}), the others know no master {master!r} "
                f"that is up (REDIS_SENTINEL_MASTER)")
    return f"none of {where} answered ({reasons}): no master {master!r} (REDIS_SENTINEL_MASTER) found"


def _unanswered(text: str) -> str:
    """``Connection refused`` from redis-py's ``Error 111 connecting to 127.0.0.1:1. Connection refused.``"""
    if text.startswith("Timeout"):
        return "timed out"
    found = re.search(r"connecting to \S+\. (.+?)\.?$", text)
    return found.group(1) if found else text.rstrip(".")


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
