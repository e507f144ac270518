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
from urllib.parse import SplitResult, parse_qsl, urlsplit

from plural_cancel.errors import ConfigError

PLURAL_BASES = {
    "uat": "https://pluraluat.v2.pinepg.in/api",
    "prod": "https://api.pluralpay.in/api",
}


@dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: ``low`` to ``high``, both included, in ``unit``."""

    low: float
    high: float
    unit: str = ""
    """What the number counts, in words (``seconds``, ``calls per second``)."""
    integer: bool = False
    note: str = ""
    """The range again in words, where they read better (``1 hour to 90 days``)."""

    def accepts(self) -> str:
        """What a refused value's line says: ``a number from 0.01 to 10000 calls per second``."""
        text = " ".join(part for part in ("an integer" if self.integer else "a number", "from", _plain(self.low),
                                          "to", _plain(self.high), self.unit) if part)
        return f"{text} ({self.note})" if self.note else text

    def __contains__(self, value) -> bool:
        return self.low <= value <= self.high and (not self.integer or value == int(value))


@dataclass(frozen=True)
class Variable:
    """One environment variable :meth:`Settings.from_env` reads: a row of the settings reference."""

    name: str
    meaning: str
    accepts: str = ""
    """What it accepts, in words; for a number, :meth:`Range.accepts` unless said here."""
    range: Range | None = None
    """A number's documented range, enforced by :meth:`Settings.from_env`."""
    field: str | None = None
    """The :class:`Settings` field it sets (whose default is the variable's)."""

    def accepted(self) -> str:
        return self.accepts or (self.range.accepts() if self.range else "")


MAX_WAIT_REPLICAS = 16
"""The most replicas ``REDIS_WAIT_REPLICAS`` may ask to acknowledge a write."""

MAX_ATTEMPT_TIMEOUT = 300.0
"""Seconds: the longest an attempt (and so each of its timeouts) may be set to take."""
MAX_LIMITER_WAIT = 30.0
"""Seconds: the longest a cancel may be set to wait in-line for a rate-limit slot."""

HOUR, DAY = 3600, 86400
"""Seconds."""

_PROXY = "an http(s) URL such as http://proxy.internal:3128"
_FILE = "a file path"

# The bounds are a production's, with room either side: below them a value is a typo or
# stops the fleet (1e-320 calls per second: every cancel stuck running); above them it
# breaks Redis's arithmetic (a TTL Redis refuses: every finish script dies partway) or
# makes every read of it slow (stats reads one hash per hour of RESULT_TTL).
REFERENCE = (
    Variable("PLURAL_ENV", "picks Plural's API base", "uat or prod", field="plural_env"),
    Variable("PLURAL_BASE_URL", "overrides the API base (a sandbox, a proxy)", "an https URL, or plain http to a "
             "loopback host (127.0.0.1, ::1, localhost); port 1-65535, no credentials", field="plural_base_url"),
    Variable("PLURAL_CLIENT_ID", "Generate Token client id (required by the worker)", "text", field="client_id"),
    Variable("PLURAL_CLIENT_SECRET", "Generate Token client secret (required by the worker)", "text",
             field="client_secret"),
    Variable("PLURAL_ACCOUNTS_FILE", "TOML file of Plural accounts (see Many Plural accounts)", _FILE,
             field="accounts_file"),
    Variable("REDIS_URL", "broker, ledger, token cache, limiter, breaker, schedules", "a redis://, rediss:// or "
             "unix:// URL: port 1-65535, path a database number, no query but a rediss:// URL's ssl_* options",
             field="redis_url"),
    Variable("REDIS_SENTINELS", "Redis Sentinels that name the master", "host:port,host:port (port 1-65535, an IPv6 "
             "host in brackets)", field="redis_sentinels"),
    Variable("REDIS_SENTINEL_MASTER", "the master's name in the Sentinels' configuration",
             "1-100 of A-Z a-z 0-9 . _ -; required with REDIS_SENTINELS", field="redis_sentinel_master"),
    Variable("REDIS_WAIT_REPLICAS", "replicas that must hold a producer's writes before the call returns",
             f"auto, or an integer from 0 to {MAX_WAIT_REPLICAS}", Range(0, MAX_WAIT_REPLICAS, integer=True),
             field="wait_replicas"),
    Variable("PLURAL_RATE_LIMIT", "calls per second to Plural, across all workers",
             range=Range(0.01, 10_000, "calls per second"), field="rate_limit"),
    Variable("PLURAL_RATE_BURST", "calls allowed at once above the steady rate",
             range=Range(0, 10_000, "calls", integer=True), field="rate_burst"),
    Variable("CANCEL_RETRY_BUDGET", "seconds a cancel keeps retrying, from its first attempt",
             range=Range(1, 30 * DAY, "seconds", note="up to 30 days"), field="retry_budget"),
    Variable("CANCEL_RETRY_BASE", "seconds: the first backoff ceiling", range=Range(0.01, HOUR, "seconds"),
             field="retry_base"),
    Variable("CANCEL_RETRY_CAP", "seconds: the largest backoff ceiling",
             range=Range(0.01, DAY, "seconds", note="up to a day"), field="retry_cap"),
    Variable("RESULT_TTL", "seconds a status record is kept after its cancel ends",
             range=Range(HOUR, 90 * DAY, "seconds", integer=True, note="1 hour to 90 days"), field="result_ttl"),
    Variable("OUTCOME_RETENTION", "seconds an outcome event stays on the stream plural-cancel:events, whether "
             "or not a consumer has read it; unset: RESULT_TTL",
             range=Range(HOUR, 90 * DAY, "seconds", integer=True, note="1 hour to 90 days"),
             field="outcome_retention"),
    Variable("PLURAL_CONNECT_TIMEOUT", "seconds to wait for a connection to Plural",
             range=Range(0.1, MAX_ATTEMPT_TIMEOUT, "seconds"), field="connect_timeout"),
    Variable("PLURAL_READ_TIMEOUT", "seconds to wait for Plural's answer once connected",
             range=Range(0.1, MAX_ATTEMPT_TIMEOUT, "seconds"), field="read_timeout"),
    Variable("BREAKER_WINDOW", "seconds of recent outcomes the circuit breaker looks at",
             range=Range(1, HOUR, "seconds"), field="breaker_window"),
    Variable("BREAKER_MIN_LINKS", "links failing like an outage in the window that open the breaker",
             range=Range(2, 10_000, "links", integer=True), field="breaker_min_links"),
    Variable("BREAKER_FAILURE_RATE", "share of the window's links failing that, with BREAKER_MIN_LINKS, opens it",
             range=Range(0.01, 1, note="a share of the window's links"), field="breaker_failure_rate"),
    # At most the breaker's own ceiling (worker.breaker.MAX_COOLDOWN), which each failed probe doubles it up to.
    Variable("BREAKER_COOLDOWN", "seconds the breaker stays open before one probe",
             range=Range(0.1, 600, "seconds"), field="breaker_cooldown"),
    Variable("LIMITER_MAX_WAIT", "seconds a cancel may wait in-line for a rate-limit slot",
             range=Range(0, MAX_LIMITER_WAIT, "seconds"), field="limiter_max_wait"),
    Variable("CANCEL_ATTEMPT_TIMEOUT", "seconds one attempt may take in all; at least LIMITER_MAX_WAIT + "
             "PLURAL_CONNECT_TIMEOUT + PLURAL_READ_TIMEOUT", range=Range(1, MAX_ATTEMPT_TIMEOUT, "seconds"),
             field="attempt_timeout"),
    Variable("CANCEL_STALL_TIMEOUT", "seconds a live cancel may go untaken before it is sent again",
             range=Range(1, DAY, "seconds", note="up to a day"), field="stall_timeout"),
    Variable("SENTRY_DSN", "error reporting; unset means off", "a Sentry DSN such as https://KEY@host/PROJECT_ID",
             field="sentry_dsn"),
    Variable("SENTRY_ENVIRONMENT", "Sentry's environment name", "text", field="sentry_environment"),
    Variable("METRICS_PORT", "port of the worker's Prometheus endpoint", "0 (off), or a port from 1 to 65535",
             Range(0, 65535, integer=True), field="metrics_port"),
    Variable("https_proxy", "proxy for calls to an https Plural (read before HTTPS_PROXY)", _PROXY,
             field="plural_proxy"),
    Variable("HTTPS_PROXY", "proxy for calls to an https Plural", _PROXY, field="plural_proxy"),
    Variable("http_proxy", "proxy for calls to an http Plural (read before HTTP_PROXY)", _PROXY, field="plural_proxy"),
    Variable("HTTP_PROXY", "proxy for calls to an http Plural", _PROXY, field="plural_proxy"),
    Variable("no_proxy", "hosts that skip the proxy (read before NO_PROXY)", "host suffixes, host:port, CIDR "
             "blocks or *, comma-separated"),
    Variable("NO_PROXY", "hosts that skip the proxy", "host suffixes, host:port, CIDR blocks or *, comma-separated"),
    Variable("REQUESTS_CA_BUNDLE", "CA bundle that verifies Plural's certificate", _FILE, field="ca_bundle"),
    Variable("SSL_CERT_FILE", "CA bundle, when REQUESTS_CA_BUNDLE is unset", _FILE, field="ca_bundle"),
    Variable("WORKER_SHUTDOWN_GRACE", "seconds a stopping worker lets its cancels in flight finish",
             range=Range(0, HOUR, "seconds"), field="shutdown_grace"),
    Variable("HEALTH_DIR", "where a worker and beat write their heartbeat files", "a directory path",
             field="health_dir"),
    Variable("CANCEL_QUEUE", "the Celery queue of the product's messages", "1-100 of A-Z a-z 0-9 . _ : -, starting "
             "with a letter or digit; not celery", field="cancel_queue"),
)
"""Every environment variable :meth:`Settings.from_env` reads, with what it means and what it
accepts: the one place a number's range is stated. The docs' settings table is made from it
(``docs/_ext/settings_reference.py``), ``.env.example`` repeats it, and ``tests/test_docs.py``
holds the variables the code reads to it."""

VARIABLES = tuple(variable.name for variable in REFERENCE)
"""Every environment variable :meth:`Settings.from_env` reads, in :data:`REFERENCE`'s order
(but ``BREAKER_THRESHOLD``, read only to be refused)."""

_BY_NAME = {variable.name: variable for variable in REFERENCE}

WAIT_AUTO = "auto"
"""``REDIS_WAIT_REPLICAS=auto``: a producer's writes wait for one replica whenever the master has one."""

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
    accounts_file: str | None = None
    """Path of the TOML file of Plural accounts (``PLURAL_ACCOUNTS_FILE``), read by
    ``config.accounts`` and never here: the settings stay a value; unset: one account, from
    ``client_id`` and ``client_secret``."""
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
    outcome_retention: int = 0
    """Seconds an outcome event stays on the stream, read or not (trimmed by age, never by
    count); 0 (unset): ``result_ttl``."""
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
        """Read and validate the environment. Raises :class:`ConfigError` on the first bad value:
        one line naming the variable and what it accepts (:data:`REFERENCE`)."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None or value.strip() == "":
                return None
            value = value.strip()
            if _CONTROL.search(value):
                # A newline or NUL inside a value is a paste gone wrong (a secret file's second
                # line); it would reach a socket, a path or a header. Never repeated: it may be a secret.
                raise ConfigError(name, "a value without control characters (newline, tab, NUL...)")
            return value

        if get("BREAKER_THRESHOLD") is not None:
            # Read by earlier versions (consecutive failures); silently ignoring it would
            # leave an operator believing it still applies.
            raise ConfigError("BREAKER_THRESHOLD", "unset: the breaker now counts failing links, "
                              "see BREAKER_MIN_LINKS, BREAKER_FAILURE_RATE and BREAKER_WINDOW")
        plural_env = (get("PLURAL_ENV") or "uat").lower()
        if plural_env not in PLURAL_BASES:
            raise ConfigError("PLURAL_ENV", "one of uat, prod", plural_env)

        base_url = get("PLURAL_BASE_URL")
        base_url = PLURAL_BASES[plural_env] if base_url is None else _plural_base_url(base_url)

        redis_url = _redis_url(get("REDIS_URL") or cls.redis_url)
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

        # Every plain number of the table, read and checked against its range; unset: the field's default.
        numbers = {variable.field: _number(get, variable.name) for variable in REFERENCE
                   if variable.range is not None and variable.name != "REDIS_WAIT_REPLICAS"}
        secret = get("PLURAL_CLIENT_SECRET")
        settings = cls(
            plural_env=plural_env,
            plural_base_url=base_url,
            client_id=get("PLURAL_CLIENT_ID"),
            client_secret=Secret(secret) if secret else None,
            accounts_file=get("PLURAL_ACCOUNTS_FILE"),
            redis_url=redis_url,
            redis_sentinels=sentinels,
            redis_sentinel_master=sentinel_master,
            wait_replicas=_wait_replicas(get("REDIS_WAIT_REPLICAS")),
            cancel_queue=cancel_queue,
            plural_proxy=_proxy_for(base_url, get),
            ca_bundle=get("REQUESTS_CA_BUNDLE") or get("SSL_CERT_FILE"),
            sentry_dsn=_sentry_dsn(get("SENTRY_DSN")),
            sentry_environment=get("SENTRY_ENVIRONMENT"),
            health_dir=get("HEALTH_DIR") or cls.health_dir,
            **{field: value for field, value in numbers.items() if value is not None},
        )
        # An attempt that cannot fit one wait and one call in its time would outlive its
        # lease on every call: refuse it rather than let two deliveries run at once.
        least = settings.limiter_max_wait + settings.connect_timeout + settings.read_timeout
        if numbers["attempt_timeout"] is None:
            settings = replace(settings,
                               attempt_timeout=round(least + settings.connect_timeout + settings.read_timeout, 3))
        elif settings.attempt_timeout < least:
            raise ConfigError("CANCEL_ATTEMPT_TIMEOUT", f"at least LIMITER_MAX_WAIT + PLURAL_CONNECT_TIMEOUT + "
                              f"PLURAL_READ_TIMEOUT ({least:g} s)", str(settings.attempt_timeout))
        if not settings.outcome_retention:
            settings = replace(settings, outcome_retention=settings.result_ttl)
        return settings

    def require_credentials(self) -> "Settings":
        """Return self when Plural credentials are set; the worker cannot run without them."""
        if not self.client_id:
            raise ConfigError("PLURAL_CLIENT_ID",
                              "set to the client id from Plural's dashboard (required by the worker)")
        if not self.client_secret:
            raise ConfigError("PLURAL_CLIENT_SECRET",
                              "set to the client secret from Plural's dashboard (required by the worker)")
        return self

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


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _number(get, name: str) -> float | None:
    """``name``'s value, within its :data:`REFERENCE` range (an int for an integer range), or
    None when it is unset."""
    raw = get(name)
    if raw is None:
        return None
    variable = _BY_NAME[name]
    bounds = variable.range
    # ASCII digits only, and short: float() and int() would also take '1_000', Arabic-Indic
    # digits, 'nan' and 'infinity', and int() spends time on a thousand-digit value.
    if len(raw) > 30 or not (_INTEGER if bounds.integer else _DECIMAL).fullmatch(raw):
        raise ConfigError(name, variable.accepted(), raw)
    value = int(raw) if bounds.integer else float(raw)
    if value not in bounds:
        raise ConfigError(name, variable.accepted(), raw)
    return value


def _plain(number: float) -> str:
    """``10000``, ``0.01``: a bound as the docs write it (never ``1e+04``)."""
    return str(int(number)) if number == int(number) else f"{number:g}"


def _wait_replicas(raw: str | None) -> int | str:
    if raw is None or raw.lower() == WAIT_AUTO:
        return WAIT_AUTO
    return _number(lambda _: raw, "REDIS_WAIT_REPLICAS")


_SENTINEL = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?)\]|(?P<host>[A-Za-z0-9._-]+))"
                       r":(?P<port>[0-9]{1,5})")
"""One Sentinel's address: ``host:port``, an IPv6 address in brackets (``[::1]:26379``)."""


def _sentinels(raw: str | None) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (``[::1]:26379`` for an IPv6 address) as (host, port) pairs."""
    if raw is None:
        return ()
    accepts = ("a comma-separated list of host:port, such as 10.0.0.1:26379,10.0.0.2:26379, an IPv6 host in "
               "brackets ([::1]:26379)")
    found = []
    for item in raw.split(","):
        match = _SENTINEL.fullmatch(item.strip())
        if not match or not 0 < int(match["port"]) < 65536 or (match["ipv6"] and not _is_ipv6(match["ipv6"])):
            # Repeated unless it could hold credentials (user:password@host).
            raise ConfigError("REDIS_SENTINELS", accepts, None if "@" in raw else raw)
        found.append((match["ipv6"] or match["host"], int(match["port"])))
    return tuple(found)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


_IN_BRACKETS = "an IPv6 host in brackets ([::1])"
_A_PORT = "its port a number from 1 to 65535"


def _url(name: str, raw: str, accepts: str, schemes: tuple[str, ...] = ("http", "https"), *,
         host: bool = True) -> SplitResult:
    """``raw`` split into its parts, or :class:`ConfigError` naming ``name``: a scheme of
    ``schemes``, a host (when ``host``), a port from 1 to 65535 when one is given. Its value
    is never repeated: a URL may carry a password."""
    try:
        parts = urlsplit(raw)
    except ValueError:  # an unbalanced '[' or ']': urlsplit's "Invalid IPv6 URL"
        raise ConfigError(name, f"{accepts}, {_IN_BRACKETS}") from None
    try:
        port = parts.port
    except ValueError:  # not a number, or past 65535
        raise ConfigError(name, f"{accepts}, {_A_PORT}") from None
    if port == 0:  # urllib3 and redis-py would quietly take the scheme's default instead
        raise ConfigError(name, f"{accepts}, {_A_PORT}")
    if parts.scheme not in schemes or (host and not parts.hostname):
        raise ConfigError(name, accepts)
    return parts


def _plural_base_url(raw: str) -> str:
    parts = _url("PLURAL_BASE_URL", raw, "an http(s) URL such as https://host/api")
    if parts.username or parts.password:
        raise ConfigError("PLURAL_BASE_URL", "a URL without credentials in it")
    if not plain_http_allowed(raw):
        raise ConfigError("PLURAL_BASE_URL", "an https URL (plain http only to a loopback host: "
                          "127.0.0.1, ::1, localhost)", raw)
    return raw.rstrip("/")


REDIS_URL_SSL_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
"""The query options ``REDIS_URL`` may carry (a rediss:// URL only): the ones both of its
readers take, kombu (the broker: any other raises a TypeError when it connects, ``socket_timeout``
too) and redis-py (the ledger and the rest: ``ssl_*`` on a redis:// URL raises one)."""


def _redis_url(raw: str) -> str:
    parts = _url("REDIS_URL", raw, "a redis://, rediss:// or unix:// URL such as redis://host:6379/0",
                 ("redis", "rediss", "unix"), host=False)  # no host: localhost, or the master Sentinel names
    if parts.scheme != "unix" and parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]{1,9}", parts.path):
        # redis-py would quietly take database 0 (redis://host/abc), and kombu refuse the name.
        raise ConfigError("REDIS_URL", "a URL whose path is a database number, such as redis://host:6379/0")
    options = {name for name, _ in parse_qsl(parts.query)}
    if options - set(REDIS_URL_SSL_OPTIONS if parts.scheme == "rediss" else ()):
        raise ConfigError("REDIS_URL", f"a URL whose query holds only a rediss:// URL's "
                          f"{', '.join(REDIS_URL_SSL_OPTIONS)} (the broker, kombu, takes no others)")
    return raw


def _proxy_for(base_url: str, get) -> str | None:
    """The proxy the environment names for ``base_url``, or None (none set, or NO_PROXY matches)."""
    scheme = "https" if base_url.startswith("https://") else "http"
    # Lower case first, as requests (urllib's getproxies) and curl read them.
    name = next((name for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY") if get(name) is not None), None)
    if name is None:
        return None
    proxy = get(name)
    _url(name, proxy, _PROXY)
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
    accepts = "a Sentry DSN such as https://KEY@host/PROJECT_ID"
    parts = _url("SENTRY_DSN", raw, accepts)
    # What sentry-sdk's Dsn needs, or its BadDsn stops the worker at start-up: a public key,
    # and a number as the path's last segment.
    if not parts.username or not re.fullmatch(r"[0-9]+", parts.path.rsplit("/", 1)[-1]):
        raise ConfigError("SENTRY_DSN", accepts)
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
