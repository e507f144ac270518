"""Settings: the environment read once, validated, frozen, and passed on.

This is the only module that reads ``os.environ``. Every other module receives a
:class:`Settings` (or the few values it needs) as an argument.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Mapping
from urllib.parse import urlsplit

from plural_cancel.errors import ConfigError

PLURAL_BASES = {
    "uat": "https://pluraluat.v2.pinepg.in/api",
    "prod": "https://api.pluralpay.in/api",
}


VARIABLES = (
    "PLURAL_ENV", "PLURAL_BASE_URL", "PLURAL_CLIENT_ID", "PLURAL_CLIENT_SECRET", "REDIS_URL",
    "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "REDIS_WAIT_REPLICAS", "PLURAL_RATE_LIMIT", "PLURAL_RATE_BURST",
    "CANCEL_RETRY_BUDGET", "CANCEL_RETRY_BASE", "CANCEL_RETRY_CAP",
    "RESULT_TTL", "PLURAL_CONNECT_TIMEOUT", "PLURAL_READ_TIMEOUT", "BREAKER_WINDOW", "BREAKER_MIN_LINKS",
    "BREAKER_FAILURE_RATE", "BREAKER_COOLDOWN", "LIMITER_MAX_WAIT", "CANCEL_ATTEMPT_TIMEOUT",
    "CANCEL_STALL_TIMEOUT", "SENTRY_DSN", "SENTRY_ENVIRONMENT", "METRICS_PORT", "https_proxy", "HTTPS_PROXY",
    "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE",
    "WORKER_SHUTDOWN_GRACE", "HEALTH_DIR", "CANCEL_QUEUE",
)
"""Every environment variable :meth:`Settings.from_env` reads, in the README's order
(and ``BREAKER_THRESHOLD``, read only to be refused)."""

WAIT_AUTO = "auto"
"""``REDIS_WAIT_REPLICAS=auto``: a producer's writes wait for one replica whenever the master has one."""
MAX_WAIT_REPLICAS = 16
"""The most replicas ``REDIS_WAIT_REPLICAS`` may ask to acknowledge a write."""

MAX_ATTEMPT_TIMEOUT = 300.0
"""Seconds: the longest an attempt (and so each of its timeouts) may be set to take."""
MAX_LIMITER_WAIT = 30.0
"""Seconds: the longest a cancel may be set to wait in-line for a rate-limit slot."""

QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
"""A Celery queue name as this product accepts one (``CANCEL_QUEUE``, a callback's queue):
1-100 of ``A-Za-z0-9._:-``, starting with a letter or digit."""

SENTINEL_MASTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
"""A Sentinel master (service) name as this product accepts one (``REDIS_SENTINEL_MASTER``)."""

CELERY_DEFAULT_QUEUE = "celery"
"""Celery's default queue: a merchant's own Celery app on the same Redis consumes it."""


def plain_http_allowed(url: str) -> bool:
    """True when ``url`` is https, or http to this host's loopback (127.0.0.0/8, ::1, ``localhost``).

    The token call carries the client secret and every other call a bearer token: in
    clear text they may only cross the loopback interface (a local sandbox), whatever
    ``PLURAL_ENV`` says.
    """
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False





class Secret:
    """A string that never shows itself in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Settings:
    """Everything the worker, the producer API and the command line need to know."""

    plural_env: str = "uat"
    plural_base_url: str = PLURAL_BASES["uat"]
    client_id: str | None = None
    client_secret: Secret | None = field(default=None)
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis's URL; with ``redis_sentinels`` only its database number and credentials are used."""
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    """(host, port) of each Redis Sentinel; empty: no Sentinel, ``redis_url`` names the server."""
    redis_sentinel_master: str | None = None
    """The master's name in the Sentinels' configuration (``sentinel monitor NAME ...``)."""
    wait_replicas: int | str = "auto"
    """Replicas that must hold a producer's writes (Redis ``WAIT``) before an enqueue,
    schedule or unschedule returns; ``auto`` (:data:`WAIT_AUTO`): one whenever the master
    has a replica connected, none (counted and warned about) when it has none; 0: the call
    returns once the master has them."""
    cancel_queue: str = "plural-cancel"
    """The Celery queue (a Redis list of that name) the product's messages travel on and its
    workers consume; never Celery's default ``celery``, which a host app on the same Redis
    consumes."""
    rate_limit: float = 10.0
    """Cancels per second to Plural, across every worker process and host."""
    rate_burst: int = 0
    """Calls allowed at once above the steady rate."""
    retry_budget: float = 86400.0
    """Seconds a cancel keeps retrying through outages."""
    breaker_window: float = 10.0
    """Seconds of recent outcomes the circuit breaker looks at (``worker.breaker``)."""
    breaker_min_links: int = 5
    """Distinct links whose latest call in the window failed like an outage (5xx, timeout,
    reset, unreachable) that it takes to open the breaker; at least 2, so one link never can."""
    breaker_failure_rate: float = 0.5
    """Share of the window's links whose latest call failed, at or above which (with
    ``breaker_min_links``) the breaker opens."""
    breaker_cooldown: float = 30.0
    """Seconds the breaker stays open before one probe may test Plural again."""
    limiter_max_wait: float = 1.0
    """Seconds a cancel may wait in-line for a rate-limit slot before it is deferred instead."""
    attempt_timeout: float = 27.1
    """Seconds one attempt may take in all: the rate-limit wait, the token, the PUT and the
    GET. Unset, it is ``LIMITER_MAX_WAIT + 2 * (PLURAL_CONNECT_TIMEOUT + PLURAL_READ_TIMEOUT)``
    (a wait and two calls in full). Its lease (``config.celery.lease_seconds``) is derived from it."""
    stall_timeout: float = 60.0
    """Seconds a live cancel may go untaken (its message lost, or never sent) before its
    message is sent again; more while the queue holds a backlog (the time it needs at
    the rate limit)."""
    retry_base: float = 2.0
    """Seconds: the first retry waits up to this long; each later one up to twice as long."""
    retry_cap: float = 600.0
    """Seconds: no retry waits longer than this (before Plural's own Retry-After)."""
    result_ttl: int = 604800
    """Seconds a status record is kept in Redis."""
    connect_timeout: float = 3.05
    """Seconds to wait for a TCP/TLS connection to Plural."""
    read_timeout: float = 10.0
    """Seconds to wait for Plural's answer once connected."""
    plural_proxy: str | None = None
    """Proxy for calls to Plural: ``HTTPS_PROXY`` (``HTTP_PROXY`` for an http base URL)
    unless ``NO_PROXY`` names Plural's host, as requests reads them. Credentials in it
    (``http://user:pw@proxy:3128``) are sent as ``Proxy-Authorization``; ``repr`` masks them."""
    ca_bundle: str | None = None
    """CA bundle that verifies Plural's certificate (``REQUESTS_CA_BUNDLE`` or
    ``SSL_CERT_FILE``); unset means certifi's bundle."""
    sentry_dsn: str | None = None
    sentry_environment: str | None = None
    metrics_port: int = 0
    """Port of the worker's Prometheus endpoint; 0 means off."""
    shutdown_grace: float = 15.0
    """Seconds a worker told to stop (SIGTERM) lets its cancels in flight finish before it
    hands their messages back to Redis (Celery's ``worker_soft_shutdown_timeout``)."""
    health_dir: str = "/tmp"
    """Directory where a worker and beat write their heartbeat files, and where
    ``plural-cancel health`` reads them (``plural_cancel.heartbeat``): one worker and one beat per
    directory."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read and validate the environment. Raises :class:`ConfigError` on the first bad value."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None or value.strip() == "":
                return None
            return value.strip()

        if get("BREAKER_THRESHOLD") is not None:
            # Read by earlier versions (consecutive failures); silently ignoring it would
            # leave an operator believing it still applies.
            raise ConfigError("BREAKER_THRESHOLD", "unset: the breaker now counts failing links, "
                              "see BREAKER_MIN_LINKS, BREAKER_FAILURE_RATE and BREAKER_WINDOW")
        plural_env = (get("PLURAL_ENV") or "uat").lower()
        if plural_env not in PLURAL_BASES:
            raise ConfigError("PLURAL_ENV", "one of uat, prod", plural_env)

        base_url = get("PLURAL_BASE_URL")
        if base_url is None:
            base_url = PLURAL_BASES[plural_env]
        else:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("PLURAL_BASE_URL", "an http(s) URL such as https://host/api", base_url)
            if not plain_http_allowed(base_url):
                raise ConfigError("PLURAL_BASE_URL", "an https URL (plain http only to a loopback host: "
                                  "127.0.0.1, ::1, localhost)", base_url)
            if parts.username or parts.password:
                raise ConfigError("PLURAL_BASE_URL", "a URL without credentials in it")
            base_url = base_url.rstrip("/")

        redis_url = get("REDIS_URL") or cls.redis_url
        if urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
            # Never echo the URL: it may carry a password.
            raise ConfigError("REDIS_URL", "a redis://, rediss:// or unix:// URL")
        sentinels = _sentinels(get("REDIS_SENTINELS"))
        sentinel_master = get("REDIS_SENTINEL_MASTER")
        if sentinels:
            if sentinel_master is None:
                raise ConfigError("REDIS_SENTINEL_MASTER", "set to the master's name in the Sentinels' "
                                  "configuration (sentinel monitor NAME ...) when REDIS_SENTINELS is set")
            if not SENTINEL_MASTER_NAME.fullmatch(sentinel_master):
                raise ConfigError("REDIS_SENTINEL_MASTER", "1-100 characters of A-Z a-z 0-9 . _ -",
                                  sentinel_master[:100])
            if urlsplit(redis_url).scheme != "redis":
                # kombu, RedBeat and redis-py each take TLS through Sentinel differently; not wired up.
                raise ConfigError("REDIS_URL", "a redis:// URL when REDIS_SENTINELS is set (its database and "
                                  "credentials are used; TLS and unix sockets are not, through Sentinel)")
        elif sentinel_master is not None:
            raise ConfigError("REDIS_SENTINEL_MASTER", "unset, or set with REDIS_SENTINELS")

        cancel_queue = get("CANCEL_QUEUE") or cls.cancel_queue
        if not QUEUE_NAME.fullmatch(cancel_queue) or cancel_queue == CELERY_DEFAULT_QUEUE:
            raise ConfigError("CANCEL_QUEUE", "a queue name of 1-100 characters of A-Z a-z 0-9 . _ : - other than "
                              "Celery's default 'celery' (which a host app on the same Redis consumes)",
                              cancel_queue[:100])

        secret = get("PLURAL_CLIENT_SECRET")
        settings = cls(
            plural_env=plural_env,
            plural_base_url=base_url,
            client_id=get("PLURAL_CLIENT_ID"),
            client_secret=Secret(secret) if secret else None,
            redis_url=redis_url,
            redis_sentinels=sentinels,
            redis_sentinel_master=sentinel_master,
            wait_replicas=_wait_replicas(get("REDIS_WAIT_REPLICAS")),
            cancel_queue=cancel_queue,
            rate_limit=_number(get, "PLURAL_RATE_LIMIT", cls.rate_limit, positive=True),
            rate_burst=int(_number(get, "PLURAL_RATE_BURST", cls.rate_burst, integer=True)),
            retry_budget=_number(get, "CANCEL_RETRY_BUDGET", cls.retry_budget, positive=True),
            breaker_window=_number(get, "BREAKER_WINDOW", cls.breaker_window, positive=True),
            breaker_min_links=int(_number(get, "BREAKER_MIN_LINKS", cls.breaker_min_links, positive=True,
                                          integer=True, minimum=2)),
            breaker_failure_rate=_number(get, "BREAKER_FAILURE_RATE", cls.breaker_failure_rate, positive=True,
                                         maximum=1),
            breaker_cooldown=_number(get, "BREAKER_COOLDOWN", cls.breaker_cooldown, positive=True),
            limiter_max_wait=_number(get, "LIMITER_MAX_WAIT", cls.limiter_max_wait, maximum=MAX_LIMITER_WAIT),
            attempt_timeout=_number(get, "CANCEL_ATTEMPT_TIMEOUT", 0.0, positive=True, maximum=MAX_ATTEMPT_TIMEOUT),
            stall_timeout=_number(get, "CANCEL_STALL_TIMEOUT", cls.stall_timeout, positive=True),
            retry_base=_number(get, "CANCEL_RETRY_BASE", cls.retry_base, positive=True),
            retry_cap=_number(get, "CANCEL_RETRY_CAP", cls.retry_cap, positive=True),
            result_ttl=int(_number(get, "RESULT_TTL", cls.result_ttl, positive=True, integer=True)),
            connect_timeout=_number(get, "PLURAL_CONNECT_TIMEOUT", cls.connect_timeout, positive=True,
                                    maximum=MAX_ATTEMPT_TIMEOUT),
            read_timeout=_number(get, "PLURAL_READ_TIMEOUT", cls.read_timeout, positive=True,
                                 maximum=MAX_ATTEMPT_TIMEOUT),
            plural_proxy=_proxy_for(base_url, get),
            ca_bundle=get("REQUESTS_CA_BUNDLE") or get("SSL_CERT_FILE"),
            sentry_dsn=_sentry_dsn(get("SENTRY_DSN")),
            sentry_environment=get("SENTRY_ENVIRONMENT"),
            metrics_port=int(_number(get, "METRICS_PORT", cls.metrics_port, integer=True, maximum=65535)),
            shutdown_grace=_number(get, "WORKER_SHUTDOWN_GRACE", cls.shutdown_grace),
            health_dir=get("HEALTH_DIR") or cls.health_dir,
        )
        # An attempt that cannot fit one wait and one call in its time would outlive its
        # lease on every call: refuse it rather than let two deliveries run at once.
        least = settings.limiter_max_wait + settings.connect_timeout + settings.read_timeout
        if not settings.attempt_timeout:
            settings = replace(settings, attempt_timeout=round(least + settings.connect_timeout + settings.read_timeout, 3))
        elif settings.attempt_timeout < least:
            raise ConfigError("CANCEL_ATTEMPT_TIMEOUT", f"at least LIMITER_MAX_WAIT + PLURAL_CONNECT_TIMEOUT + "
                              f"PLURAL_READ_TIMEOUT ({least:g} s)", str(settings.attempt_timeout))
        return settings

    def require_credentials(self) -> "Settings":
        """Return self when Plural credentials are set; the worker cannot run without them."""
        if not self.client_id:
            raise ConfigError("PLURAL_CLIENT_ID", "set to the client id from Plural's dashboard (required by the worker)")
        if not self.client_secret:
            raise ConfigError("PLURAL_CLIENT_SECRET", "set to the client secret from Plural's dashboard (required by the worker)")
        return self

    def with_overrides(self, **changes) -> "Settings":
        """A copy with some fields changed (tests and the command line use this)."""
        return replace(self, **changes)

    def __repr__(self) -> str:
        # The dataclass's own repr would show the proxy's and Redis's passwords.
        shown = ", ".join(f"{f.name}={self._shown(f.name)!r}" for f in fields(self))
        return f"Settings({shown})"

    def describe(self) -> dict[str, str]:
        """Every setting as text, secrets masked, for ``plural-cancel check`` and start-up logs."""
        return {f.name: "" if self._shown(f.name) is None else str(self._shown(f.name)) for f in fields(self)}

    def _shown(self, name: str):
        """A field's value with any password in it masked (``client_secret`` masks itself)."""
        value = getattr(self, name)
        if name in ("redis_url", "plural_proxy") and value:
            return _mask_url_password(value)
        if name == "redis_sentinels":
            return ",".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in value) or None
        if name == "sentry_dsn" and value:
            return _mask_url_password(value, mask_user=True)
        return value


def exports(environ: Mapping[str, str], reveal: Iterable[str] = ()) -> list[str]:
    """``export NAME=value`` lines, shell-quoted, for each of :data:`VARIABLES` set in ``environ``:
    what another shell needs to act on the same system (``make run`` prints them).

    A value that holds a secret (``PLURAL_CLIENT_SECRET``, a URL with a password) is
    written only when ``reveal`` names it (a made-up one, such as the local sandbox's);
    otherwise a comment line says it is set but not shown.
    """
    lines = []
    for name in VARIABLES:
        value = environ.get(name)
        if value is None or value.strip() == "":
            continue
        if secret_value(name, value) and name not in reveal:
            lines.append(f"# {name} is set here but not shown (it holds a secret): export the same value there")
        else:
            lines.append(f"export {name}={shlex.quote(value)}")
    return lines


def secret_value(name: str, value: str) -> bool:
    """Whether an environment variable's value holds a secret: the client secret, or a URL
    with a password in it (``REDIS_URL``, a proxy's)."""
    if name == "PLURAL_CLIENT_SECRET":
        return True
    try:
        return urlsplit(value.strip()).password is not None
    except ValueError:  # not a URL urlsplit can read: keep it back if it could hold credentials
        return "@" in value


def _number(get, name: str, default: float, *, positive: bool = False, integer: bool = False,
            minimum: float | None = None, maximum: float | None = None, accepts: str | None = None) -> float:
    raw = get(name)
    if raw is None:
        return default
    kind = "an integer" if integer else "a number"
    stated, accepts = accepts is not None, accepts or f"{'a positive' if positive else 'a non-negative'} {kind.split(' ', 1)[1]}"
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(name, accepts, raw) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(name, accepts, raw)
    if value < 0 or (positive and value == 0):
        raise ConfigError(name, accepts, raw)
    if minimum is not None and value < minimum:
        raise ConfigError(name, accepts if stated else f"{accepts} no smaller than {minimum:g}", raw)
    if maximum is not None and value > maximum:
        raise ConfigError(name, accepts if stated else f"{accepts} no larger than {maximum:g}", raw)
    return value


def _wait_replicas(raw: str | None) -> int | str:
    if raw is None or raw.lower() == WAIT_AUTO:
        return WAIT_AUTO
    return int(_number(lambda _: raw, "REDIS_WAIT_REPLICAS", 0, integer=True, maximum=MAX_WAIT_REPLICAS,
                       accepts=f"auto, or an integer from 0 to {MAX_WAIT_REPLICAS}"))


def _sentinels(raw: str | None) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (``[::1]:26379`` for an IPv6 address) as (host, port) pairs."""
    if raw is None:
        return ()
    accepts = "a comma-separated list of host:port (Redis Sentinels, e.g. 10.0.0.1:26379,10.0.0.2:26379)"
    found = []
    for item in raw.split(","):
        host, _, port = item.strip().rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/@ "):
            raise ConfigError("REDIS_SENTINELS", accepts, raw)
        found.append((host, int(port)))
    return tuple(found)


def _proxy_for(base_url: str, get) -> str | None:
    """The proxy the environment names for ``base_url``, or None (none set, or NO_PROXY matches)."""
    scheme = "https" if base_url.startswith("https://") else "http"
    # Lower case first, as requests (urllib's getproxies) and curl read them.
    proxy = get(f"{scheme}_proxy") or get(f"{scheme.upper()}_PROXY")
    if proxy is None:
        return None
    if urlsplit(proxy).scheme not in ("http", "https") or not urlsplit(proxy).hostname:
        raise ConfigError(f"{scheme.upper()}_PROXY", "an http(s) URL such as http://proxy.internal:3128")
    no_proxy = get("no_proxy") or get("NO_PROXY")
    # requests' own rule (the client's session no longer reads the environment), so that
    # NO_PROXY means here what it means to requests: host suffixes with or without a
    # leading dot, host:port, CIDR blocks for IP hosts, "*". Where its own matching finds
    # nothing it asks urllib, with our value put in os.environ's no_proxy for the moment of
    # the call: harmless here, once, at start-up.
    if not no_proxy:
        return proxy
    # Imported here: requests is heavy, and only a proxy with NO_PROXY set needs it.
    from requests.utils import should_bypass_proxies

    return None if should_bypass_proxies(base_url, no_proxy=no_proxy) else proxy


def _sentry_dsn(raw: str | None) -> str | None:
    if raw is None:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.username:
        raise ConfigError("SENTRY_DSN", "a Sentry DSN such as https://KEY@host/PROJECT_ID")
    return raw


def _mask_url_password(url: str, mask_user: bool = False) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        if mask_user:
            creds = "***"
        elif ":" in creds:
            creds = creds.split(":", 1)[0] + ":***"
        netloc = f"{creds}@{host}"
    # redis-py also takes the password as a query parameter: redis://host/0?password=...
    query = "&".join("password=***" if item.split("=", 1)[0] == "password" else item
                     for item in parts.query.split("&")) if parts.query else parts.query
    return parts._replace(netloc=netloc, query=query).geturl()
