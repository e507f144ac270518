"""The Plural access token and the stores the client takes it from: in memory, or shared through Redis.

In Redis: one token per account (``Keys.token`` of its client id for the default account,
``Keys.account_key`` for another, encrypted under a key of its own). It is refreshed 60 s
before it expires (a quarter of its life before, for a token that lives under 4 minutes: see :func:`refresh_margin`), by
one process at a time (a single-flight lock: N processes needing a token cause one
Generate Token call, the others wait briefly and reuse it), and dropped on a 401.

The token is stored encrypted with Fernet (AES-128-CBC + HMAC-SHA256) under a key
derived from the client secret, so a Redis dump or replica holds no usable bearer
token. A fingerprint (a keyed hash) of the token sits beside the ciphertext so that
"drop this token, if it is still the cached one" is one atomic Lua script. Its refresh
time, on Redis's clock, is stored beside it (:class:`RedisTokenCache`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import redis
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from plural_cancel.errors import TokenUnavailable
from plural_cancel.worker.keys import DEFAULT_ACCOUNT, Keys

log = logging.getLogger(__name__)

REFRESH_MARGIN = 60.0
"""Seconds before expiry at which a cached token is replaced (less for a short-lived token)."""

LIFETIME_SHARE = 0.25
"""Share of a token's lifetime kept as its refresh margin when that is under REFRESH_MARGIN."""

LOCK_TTL_MS = 15_000
"""How long a refresh may hold the single-flight lock, in milliseconds (covers a slow token call)."""

WAIT_STEP = 0.05
"""Seconds between looks at Redis while another process fetches the token."""


@dataclass(frozen=True)
class AccessToken:
    """A bearer token from Generate Token, with its expiry as Plural gave it: ``expires_at``
    (epoch seconds, Plural's clock) or ``expires_in`` (seconds from when it was received).
    Its value never shows in ``repr``."""

    value: str = field(repr=False)
    expires_at: float | None = None
    expires_in: float | None = None

    def lifetime(self, now: float) -> float:
        """Seconds the token has left at ``now`` (epoch seconds, of the store's clock)."""
        if self.expires_in is not None:
            return self.expires_in
        return (self.expires_at or 0.0) - now


def refresh_margin(lifetime: float, margin: float = REFRESH_MARGIN) -> float:
    """Seconds before expiry to replace a token that lived ``lifetime`` seconds when fetched.

    ``margin`` (60 s) for ordinary tokens; a quarter of the life for one shorter than four
    margins, so that a 55-s token serves about 41 s of cancels between Generate Token calls
    instead of none. The margin only has to cover a request in flight and ordinary clock
    skew between this host and Plural (seconds for a token of any useful life); should a
    token still run out on the way, Plural's 401 costs one retry with a fresh token
    (``PluralClient._bearer``), not a failed cancel.
    """
    return min(margin, max(lifetime, 0.0) * LIFETIME_SHARE)


@dataclass(frozen=True)
class _Held:
    """A token and when this process is to stop using it (``monotonic`` seconds)."""

    value: str = field(repr=False)
    until: float


class TokenStore(Protocol):
    """Where the client gets its bearer token from: :class:`MemoryTokenStore` or :class:`RedisTokenCache`."""

    def get(self, fetch: Callable[[], AccessToken]) -> str:
        """A valid token, calling ``fetch()`` when none is cached or the cached one is about to expire."""

    def invalidate(self, token: str) -> None:
        """Drop ``token`` (Plural rejected it), only if it is still the cached one."""


class MemoryTokenStore:
    """An in-process :class:`TokenStore`: thread-safe, one fetch at a time, refreshed before expiry."""

    def __init__(self, clock: Callable[[], float] = time.time, refresh_margin: float = REFRESH_MARGIN):
        self._clock = clock
        self._margin = refresh_margin
        self._lock = threading.Lock()
        self._token: AccessToken | None = None
        self._refresh_at = 0.0

    def get(self, fetch: Callable[[], AccessToken]) -> str:
        # The lock is held across fetch() on purpose: threads that need a token at the
        # same moment wait for the one Generate Token call instead of each making one.
        with self._lock:
            if self._token is not None and self._clock() < self._refresh_at:
                return self._token.value
            token = fetch()
            now = self._clock()
            lifetime = token.lifetime(now)
            self._refresh_at = now + lifetime - refresh_margin(lifetime, self._margin)
            self._token = token
            return token.value

    def invalidate(self, token: str) -> None:
        with self._lock:
            if self._token is not None and self._token.value == token:
                self._token = None


# KEYS: [1] token hash   ARGV: [1] fingerprint of the token to drop
# Deletes the cached token only when it is still the one that was rejected, so a
# 401 seen late never throws away a fresher token fetched by another process.
DROP_IF_SAME = """
local token, fingerprint = KEYS[1], ARGV[1]
if redis.call('HGET', token, 'fp') == fingerprint then
  return redis.call('DEL', token)
end
return 0
"""

# KEYS: [1] lock key   ARGV: [1] owner token
RELEASE_LOCK = """
local lock, owner = KEYS[1], ARGV[1]
if redis.call('GET', lock) == owner then
  return redis.call('DEL', lock)
end
return 0
"""


class RedisTokenCache:
    """A :class:`TokenStore` backed by Redis, shared across processes and hosts.

    A token's life is judged on Redis's clock, as every due time is: its lifetime is
    counted from Redis's time when it is stored, its refresh time is a time of Redis's
    (``refresh_at`` beside it, and the key's expiry), and each process keeps its copy for
    the time that was left by Redis's clock when it read it (on its monotonic clock). A
    host whose clock is off (``plural-cancel check`` reports it) neither refetches on every
    call nor keeps a token past its life. ``clock``: Redis's time (epoch seconds) for tests;
    by default Redis's own ``TIME``, read in the same round trip as the token.
    ``on_refresh_failure``: called with the error each time this process's refresh fails
    (Generate Token refused or unreachable), before it is raised: the worker counts it.
    """

    def __init__(self, client: redis.Redis, client_id: str, client_secret: str, *,
                 keys: Keys = Keys(), clock: Callable[[], float] | None = None,
                 monotonic: Callable[[], float] = time.monotonic, wait_timeout: float = 20.0,
                 account: str = DEFAULT_ACCOUNT,
                 on_refresh_failure: Callable[[BaseException], None] = lambda exc: None):
        self._redis = client
        self._on_refresh_failure = on_refresh_failure
        if account == DEFAULT_ACCOUNT:
            self._key, self._lock_key = keys.token(client_id), keys.token_lock(client_id)
            info = client_id
        else:
            # Two accounts may share a client id (one per Plural environment): each has its own key.
            self._key, self._lock_key = keys.account_key(account, "token"), keys.account_key(account, "token-lock")
            info = f"{account}/{client_id}"
        self._fernet, self._fp_key = _derive_keys(info, client_secret)
        self._clock = clock
        self._monotonic = monotonic
        self._wait_timeout = wait_timeout
        self._drop = client.register_script(DROP_IF_SAME)
        self._release = client.register_script(RELEASE_LOCK)
        # A per-process memo saves a Redis round trip and a decryption per cancel;
        # it follows the same refresh deadline as the shared copy.
        self._local: _Held | None = None
        self._local_lock = threading.Lock()

    def get(self, fetch: Callable[[], AccessToken]) -> str:
        """A token with at least its refresh margin (:func:`refresh_margin`) left; calls ``fetch``
        in at most one process."""
        local = self._local
        if local is not None and self._fresh(local):
            return local.value
        with self._local_lock:  # one thread per process goes to Redis
            local = self._local
            if local is not None and self._fresh(local):
                return local.value
            held = self._get_shared(fetch)
            self._local = held
            return held.value

    def invalidate(self, token: str) -> None:
        """Drop ``token`` here and in Redis, unless a newer one has replaced it already."""
        with self._local_lock:
            if self._local is not None and self._local.value == token:
                self._local = None
        self._drop(keys=[self._key], args=[self._fingerprint(token)])
        log.info("plural token dropped after a 401")

    def _get_shared(self, fetch: Callable[[], AccessToken]) -> _Held:
        deadline = time.monotonic() + self._wait_timeout
        while True:
            cached = self._read()
            if cached is not None:
                return cached
            owner = secrets.token_hex(8)
            if self._redis.set(self._lock_key, owner, nx=True, px=LOCK_TTL_MS):
                try:
                    # Another process may have stored a token between our read and the lock.
                    cached = self._read()
                    if cached is not None:
                        return cached
                    try:
                        token = fetch()
                    except Exception as exc:
                        self._on_refresh_failure(exc)
                        raise
                    return self._write(token)
                finally:
                    self._release(keys=[self._lock_key], args=[owner])
            if time.monotonic() >= deadline:
                raise TokenUnavailable("timed out waiting for another process to fetch the Plural token")
            time.sleep(WAIT_STEP)

    def _fresh(self, held: _Held) -> bool:
        return self._monotonic() < held.until

    def _now(self, pipe) -> Callable[[list], float]:
        """Redis's time, read in ``pipe``'s round trip: returns the reader of ``pipe``'s replies."""
        if self._clock is not None:
            return lambda replies: self._clock()
        pipe.time()
        return lambda replies: replies[-1][0] + replies[-1][1] / 1e6

    def _read(self) -> _Held | None:
        """The shared token while it is before its refresh time (Redis's clock), else None."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(self._key, "blob", "refresh_at")
        now = self._now(pipe)
        replies = pipe.execute()
        blob, refresh_at = replies[0]
        if blob is None or refresh_at is None:
            return None  # none, or one stored by an earlier version: fetched anew
        left = float(refresh_at) - now(replies)
        if left <= 0:
            return None
        try:
            value = json.loads(self._fernet.decrypt(blob))["t"]
        except (InvalidToken, ValueError, KeyError, TypeError):
            # Written under another secret (rotated credentials) or damaged: refetch.
            log.warning("cached plural token unreadable; fetching a new one")
            return None
        return _Held(value, self._monotonic() + left)

    def _write(self, token: AccessToken) -> _Held:
        """Share ``token`` until its refresh time (Redis expires the copy then); returns it held."""
        pipe = self._redis.pipeline(transaction=False)
        now = self._now(pipe)
        replies = pipe.execute() if self._clock is None else []
        redis_now = now(replies)
        life = token.lifetime(redis_now)
        refresh_in = life - refresh_margin(life)
        if refresh_in <= 0:
            # Expired, or all but, by Redis's clock: used for this call, not shared. Plural's
            # clock and Redis's disagree by the token's whole life, or Plural issued it so.
            log.warning("plural token has %.0f s of life left by Redis's clock: used once, not kept; check the "
                        "clocks of Redis's host and Plural's answer", life)
            return _Held(token.value, self._monotonic())
        blob = self._fernet.encrypt(json.dumps({"t": token.value}).encode())
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._key, mapping={"blob": blob, "fp": self._fingerprint(token.value),
                                      "refresh_at": repr(redis_now + refresh_in)})
        pipe.pexpire(self._key, max(1, int(refresh_in * 1000)))
        pipe.execute()
        return _Held(token.value, self._monotonic() + refresh_in)

    def _fingerprint(self, token: str) -> str:
        return hmac.new(self._fp_key, token.encode(), hashlib.sha256).hexdigest()[:32]


def _derive_keys(info: str, client_secret: str) -> tuple[Fernet, bytes]:
    """A Fernet key and a fingerprint key, both derived from the client secret with HKDF
    (``info``: the client id, ``<account>/<client id>`` for an account but the default)."""
    material = HKDF(algorithm=hashes.SHA256(), length=64, salt=b"plural-cancel/token-cache/v1",
                    info=info.encode()).derive(client_secret.encode())
    return Fernet(base64.urlsafe_b64encode(material[:32])), material[32:]
